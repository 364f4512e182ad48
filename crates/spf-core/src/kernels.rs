//! The projection's two matrix products and `‖G‖²`, without the copies burn's generic operations
//! make on the CPU backend.
//!
//! The removal is a rank-`k` product subtracted from the gradient. With burn's tensor
//! operations that is a matrix product written to a new `d_in × d_out` buffer and a subtraction
//! that reads it back: two passes over memory the size of `G` and an allocation. On burn-ndarray
//! (feature `ndarray`) [`subtract_product`] instead runs one general matrix product with `β = 1`
//! into `G`'s own buffer, `G ← G − A B`, which reads and writes `G` once; when the buffer is
//! shared (another handle on it is alive), ndarray copies it first, as burn would.
//!
//! The coefficients need `UᵀG` (or `G V`). burn-ndarray 0.21's `matmul` reshapes both operands
//! to a batch of one, and its `reshape` copies, so each product wrote a whole copy of `G` before
//! reading it: [`product`] hands the operands' own arrays to the same matrix product.
//!
//! `‖G‖²` squared `G` into a copy and summed it; [`squared_norm`] sums the squares in one read.
//!
//! The two products give the generic path's results bit for bit (the same products, in the same
//! order; a test holds them to it); the norm sums in another order, equal to rounding, and only
//! the statistics read it. Every other backend takes the generic path, so this crate stays
//! generic and a user's backend needs nothing from it. The backend is recognised at run time, by
//! downcasting burn's tensor primitive to burn-ndarray's: Rust has no specialisation, and a trait
//! bound for a faster kernel would have to appear on every generic signature of the wrapper and
//! of the code that uses it.

use burn::tensor::{Tensor, backend::Backend};

/// `g − a·b`, for `a: [d_in, k]` and `b: [k, d_out]`.
pub(crate) fn subtract_product<B: Backend>(
    g: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
) -> Tensor<B, 2> {
    #[cfg(feature = "ndarray")]
    let (a, b, g) = match ndarray::gemm(a, b, Some(g)) {
        Ok(result) => return result,
        Err((a, b, g)) => (a, b, g.expect("given")),
    };
    g - a.matmul(b)
}

/// `a·b`.
pub(crate) fn product<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(feature = "ndarray")]
    let (a, b) = match ndarray::gemm(a, b, None) {
        Ok(result) => return result,
        Err((a, b, _)) => (a, b),
    };
    a.matmul(b)
}

/// `‖g‖²`, as a one-element tensor.
pub(crate) fn squared_norm<B: Backend>(g: &Tensor<B, 2>) -> Tensor<B, 1> {
    #[cfg(feature = "ndarray")]
    if let Some(energy) = ndarray::squared_norm(g) {
        return energy;
    }
    g.clone().square().sum()
}

#[cfg(feature = "ndarray")]
mod ndarray {
    use std::any::Any;

    use burn::backend::ndarray::{NdArrayTensor, SharedArray};
    use burn::tensor::{Tensor, TensorPrimitive, backend::Backend};
    use ndarray::linalg::general_mat_mul;
    use ndarray::{Array2, Ix2, IxDyn, LinalgScalar};

    type Inputs<B> = (Tensor<B, 2>, Tensor<B, 2>, Option<Tensor<B, 2>>);

    /// `c − a·b` in `c`'s buffer, or `a·b` when there is no `c`, on burn-ndarray's `f32` or
    /// `f64` tensors; the inputs back, untouched, on any other backend or dtype.
    pub(super) fn gemm<B: Backend>(
        a: Tensor<B, 2>,
        b: Tensor<B, 2>,
        c: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 2>, Inputs<B>> {
        let (a, b) = match (unwrap(a), unwrap(b)) {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => return Err((rewrap(a), rewrap(b), c)),
        };
        let c = match c.map(unwrap) {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(c)) => return Err((wrap(a), wrap(b), Some(c))),
        };
        let result = match (a, b, c) {
            (NdArrayTensor::F32(a), NdArrayTensor::F32(b), None) => {
                NdArrayTensor::from(fused(&a.into_shared(), &b.into_shared(), None))
            }
            (NdArrayTensor::F32(a), NdArrayTensor::F32(b), Some(NdArrayTensor::F32(c))) => {
                let (a, b) = (a.into_shared(), b.into_shared());
                NdArrayTensor::from(fused(&a, &b, Some(c.into_shared())))
            }
            (NdArrayTensor::F64(a), NdArrayTensor::F64(b), None) => {
                NdArrayTensor::from(fused(&a.into_shared(), &b.into_shared(), None))
            }
            (NdArrayTensor::F64(a), NdArrayTensor::F64(b), Some(NdArrayTensor::F64(c))) => {
                let (a, b) = (a.into_shared(), b.into_shared());
                NdArrayTensor::from(fused(&a, &b, Some(c.into_shared())))
            }
            (a, b, c) => return Err((wrap(a), wrap(b), c.map(wrap))),
        };
        Ok(wrap(result))
    }

    /// `‖g‖²` in one read of `g`, with no squared copy, on burn-ndarray's `f32` or `f64` tensors;
    /// `None` on any other backend or dtype.
    pub(super) fn squared_norm<B: Backend>(g: &Tensor<B, 2>) -> Option<Tensor<B, 1>> {
        let sum = match unwrap(g.clone()).ok()? {
            NdArrayTensor::F32(g) => NdArrayTensor::from(sum_of_squares(&g.into_shared())),
            NdArrayTensor::F64(g) => NdArrayTensor::from(sum_of_squares(&g.into_shared())),
            _ => return None,
        };
        Some(wrap(sum))
    }

    /// `Σ x²` over `a`, as a one-element array, summed in eight lanes (which the compiler
    /// vectorises) when `a` is contiguous.
    fn sum_of_squares<E: LinalgScalar>(a: &SharedArray<E>) -> SharedArray<E> {
        let total = match a.as_slice_memory_order() {
            Some(values) => {
                let mut lanes = [E::zero(); 8];
                let mut chunks = values.chunks_exact(8);
                for chunk in &mut chunks {
                    for (lane, x) in lanes.iter_mut().zip(chunk) {
                        *lane = *lane + *x * *x;
                    }
                }
                let tail = chunks
                    .remainder()
                    .iter()
                    .fold(E::zero(), |s, x| s + *x * *x);
                lanes.iter().fold(tail, |s, lane| s + *lane)
            }
            None => a.iter().fold(E::zero(), |s, x| s + *x * *x),
        };
        ndarray::arr1(&[total]).into_shared().into_dyn()
    }

    /// `c ← c − a·b` through one general matrix product into `c`'s buffer, or `a·b` into a new
    /// one.
    fn fused<E: LinalgScalar + std::ops::Neg<Output = E>>(
        a: &SharedArray<E>,
        b: &SharedArray<E>,
        c: Option<SharedArray<E>>,
    ) -> SharedArray<E> {
        // Tensors of rank 2 have 2-D arrays; the conversions cannot fail.
        let as_2d = "a rank-2 tensor holds a 2-D array";
        let a = a.view().into_dimensionality::<Ix2>().expect(as_2d);
        let b = b.view().into_dimensionality::<Ix2>().expect(as_2d);
        let out = match c {
            Some(c) => {
                let mut c = c.into_dimensionality::<Ix2>().expect(as_2d);
                general_mat_mul(-E::one(), &a, &b, E::one(), &mut c);
                c
            }
            None => {
                let mut c = Array2::zeros((a.nrows(), b.ncols()));
                general_mat_mul(E::one(), &a, &b, E::zero(), &mut c);
                c.into_shared()
            }
        };
        out.into_dimensionality::<IxDyn>()
            .expect("any array is n-dimensional")
    }

    /// The burn-ndarray primitive of `t`, or `t` back when `B` is another backend.
    fn unwrap<B: Backend>(t: Tensor<B, 2>) -> Result<NdArrayTensor, Tensor<B, 2>> {
        match t.into_primitive() {
            TensorPrimitive::Float(primitive) => {
                let boxed: Box<dyn Any> = Box::new(primitive);
                boxed
                    .downcast::<NdArrayTensor>()
                    .map(|t| *t)
                    .map_err(from_any)
            }
            quantized => Err(Tensor::from_primitive(quantized)),
        }
    }

    fn rewrap<B: Backend>(t: Result<NdArrayTensor, Tensor<B, 2>>) -> Tensor<B, 2> {
        t.map_or_else(|t| t, wrap)
    }

    /// The tensor of backend `B` that `t` is; only called on primitives [`unwrap`] took from `B`.
    fn wrap<B: Backend, const D: usize>(t: NdArrayTensor) -> Tensor<B, D> {
        from_any(Box::new(t))
    }

    fn from_any<B: Backend, const D: usize>(boxed: Box<dyn Any>) -> Tensor<B, D> {
        let primitive = boxed
            .downcast::<B::FloatTensorPrimitive>()
            .expect("the primitive came from this backend");
        Tensor::from_primitive(TensorPrimitive::Float(*primitive))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Gaussian, TestBackend, upload};

    fn inputs(seed: u64) -> [Tensor<TestBackend, 2>; 3] {
        let device = Default::default();
        let mut rng = Gaussian::new(seed);
        [rng.matrix(37, 23), rng.matrix(37, 5), rng.matrix(5, 23)].map(|m| upload(&m, &device))
    }

    #[test]
    fn the_product_is_subtracted_as_the_generic_path_does_it() {
        for seed in 0..4 {
            let [g, a, b] = inputs(seed);
            let generic = g.clone() - a.clone().matmul(b.clone());
            let got = subtract_product(g, a, b).into_data();
            // Bit for bit on ndarray: the same product, subtracted once, so the one-pass removal
            // changes no result. Other backends take the generic path itself.
            assert_eq!(got, generic.into_data(), "seed {seed}");
        }
    }

    #[test]
    fn the_product_is_the_generic_matmul() {
        for seed in 0..4 {
            let [g, a, _] = inputs(seed);
            // Both operand layouts the projection uses: Uᵀ G (a transposed view on the left) and
            // G V.
            let left = a.clone().transpose();
            let generic = left.clone().matmul(g.clone()).into_data();
            assert_eq!(product(left, g.clone()).into_data(), generic, "seed {seed}");
            let v = inputs(seed + 10)[1].clone().slice([0..23, 0..5]);
            let generic = g.clone().matmul(v.clone()).into_data();
            assert_eq!(product(g, v).into_data(), generic, "seed {seed}");
        }
    }

    #[test]
    fn the_squared_norm_is_the_sum_of_squares() {
        for seed in 0..4 {
            let [g, _, _] = inputs(seed);
            let generic: f32 = g.clone().square().sum().into_scalar();
            let got: f32 = squared_norm(&g).into_scalar();
            // Summed in another order: equal to rounding.
            assert!(
                (got - generic).abs() <= 1e-5 * generic,
                "{got} vs {generic}"
            );
            // A transposed view is summed through its strides.
            let t: f32 = squared_norm(&g.transpose()).into_scalar();
            assert!((t - generic).abs() <= 1e-5 * generic, "{t} vs {generic}");
        }
    }

    #[test]
    fn a_shared_gradient_is_copied_not_overwritten() {
        let [g, a, b] = inputs(9);
        let kept = g.clone().into_data();
        let other_handle = g.clone();
        let got = subtract_product(g, a.clone(), b.clone());
        assert_eq!(other_handle.into_data(), kept);
        assert_ne!(got.into_data(), kept);
    }

    #[test]
    fn transposed_operands_are_read_through_their_strides() {
        let [g, a, b] = inputs(3);
        let (at, bt) = (a.clone().transpose(), b.clone().transpose());
        let expected = g.clone() - a.clone().matmul(b.clone());
        // `a` and `b` given as transposes of stored transposes: non-standard layouts.
        let got = subtract_product(g, at.transpose(), bt.transpose());
        got.into_data().assert_approx_eq::<f32>(
            &expected.into_data(),
            burn::tensor::Tolerance::absolute(1e-5),
        );
    }
}
