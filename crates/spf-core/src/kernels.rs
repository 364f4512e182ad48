//! The projection's two matrix products and `‖G‖²`: the one place where a backend-specific
//! kernel can replace burn's generic operations.
//!
//! On burn 0.21 the removal `G ← G − A B` ran as one general matrix product into `G`'s own buffer
//! on burn-ndarray, reading and writing `G` once, where burn's operations write the product to a
//! new buffer and read it back. On burn 0.22 these functions are burn's generic operations for
//! now; the in-place kernels come back through burn's `extension` feature (the backend's own
//! primitives), measured against these.

use burn::tensor::Tensor;

/// `g − a·b`, for `a: [d_in, k]` and `b: [k, d_out]`.
pub(crate) fn subtract_product(g: Tensor<2>, a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
    g - a.matmul(b)
}

/// `a·b`.
pub(crate) fn product(a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
    a.matmul(b)
}

/// `‖g‖²`, as a one-element tensor.
pub(crate) fn squared_norm(g: &Tensor<2>) -> Tensor<1> {
    g.clone().square().sum()
}
