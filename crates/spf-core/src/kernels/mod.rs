//! The projection's two matrix products, `‖G‖²` and the non-finite probe's `Σ G`: the one place
//! where a CPU backend's own kernels replace burn's generic operations.
//!
//! The removal is a rank-`k` product subtracted from the gradient. With burn's tensor operations
//! that is a matrix product written to a new `d_in × d_out` buffer and a subtraction that reads
//! it back; `‖G‖²` squares `G` into a copy and sums it. On the CPU backends, with burn's
//! `extension` feature, this module reaches the backend's tensor primitive
//! ([`Tensor::into_dispatch`]) and does better where the backend leaves room:
//!
//! - **burn-ndarray** (feature `ndarray`, [`ndarray`]): the removal runs one general matrix
//!   product with `β = 1` into `G`'s own buffer, `G ← G − A B`, reading and writing `G` once; the
//!   coefficients' products hand the operands' arrays straight to the matrix product (burn-ndarray
//!   reshapes both operands of `matmul` to a batch of one, and a reshape of a transposed view
//!   copies it); `‖G‖²` sums the squares in one read.
//! - **flex** (feature `flex`, [`flex`]): `‖G‖²` and the non-finite probe's `Σ g` in one read
//!   each (flex's own reductions, built without its SIMD feature as here, took 3.5× ndarray's
//!   time for a plain sum: docs/performance.md). flex's own 2-D `matmul` already reads strided
//!   operands without copying and subtracts in place into a gradient no other handle shares, so
//!   the removal stays burn's. Fusing the subtraction into the product would
//!   save the product's buffer and one pass, but only through `unsafe` calls into `gemm` on
//!   flex's raw storage; not done (this crate has no `unsafe`).
//!
//! The products give the generic path's results bit for bit (the same products, in the same order;
//! the tests hold them to it); the norm and the probe's sum add in another order, equal to
//! rounding, and only the statistics and the probe's finite-or-not read them. Every other backend,
//! an autodiff-tracked tensor, and a dtype other than `f32`/`f64` take the generic path, so a
//! user's backend needs nothing from this crate.

#[cfg(any(feature = "flex", feature = "ndarray"))]
mod dispatch;
#[cfg(feature = "flex")]
mod flex;
#[cfg(any(feature = "flex", feature = "ndarray"))]
mod lanes;
#[cfg(feature = "ndarray")]
mod ndarray;

use burn::tensor::Tensor;

/// `g − a·b`, for `a: [d_in, k]` and `b: [k, d_out]`.
pub(crate) fn subtract_product(g: Tensor<2>, a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
    #[cfg(feature = "ndarray")]
    let (g, a, b) = match dispatch::subtract_product(g, a, b) {
        Ok(result) => return result,
        Err(inputs) => inputs,
    };
    g - a.matmul(b)
}

/// `a·b`.
pub(crate) fn product(a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
    #[cfg(feature = "ndarray")]
    let (a, b) = match dispatch::product(a, b) {
        Ok(result) => return result,
        Err(inputs) => inputs,
    };
    a.matmul(b)
}

/// `Σ g` over every entry, as a one-element tensor: the non-finite probe's one read.
pub(crate) fn sum<const D: usize>(g: Tensor<D>) -> Tensor<1> {
    #[cfg(feature = "flex")]
    if let Some(total) = dispatch::sum(&g) {
        return total;
    }
    g.sum()
}

/// `‖g‖²`, as a one-element tensor.
pub(crate) fn squared_norm(g: &Tensor<2>) -> Tensor<1> {
    #[cfg(any(feature = "flex", feature = "ndarray"))]
    if let Some(energy) = dispatch::squared_norm(g) {
        return energy;
    }
    g.clone().square().sum()
}

#[cfg(test)]
mod tests;
