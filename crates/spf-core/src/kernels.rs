//! `G − A B` in one pass over `G`, where the backend allows it.
//!
//! The projection's removal is a rank-`k` product subtracted from the gradient. With burn's
//! tensor operations that is a matrix product written to a new `d_in × d_out` buffer and a
//! subtraction that reads it back: two passes over memory the size of `G` and an allocation.
//! On burn-ndarray (feature `ndarray`) [`subtract_product`] instead runs one general matrix
//! product with `β = 1` into `G`'s own buffer, `G ← G − A B`, which reads and writes `G` once;
//! when the buffer is shared (another handle on it is alive), ndarray copies it first, as burn
//! would. Every other backend takes the generic path, so this crate stays generic and a user's
//! backend needs nothing from it.
//!
//! The backend is recognised at run time, by downcasting burn's tensor primitive to
//! burn-ndarray's: Rust has no specialisation, and a trait bound for a faster kernel would have
//! to appear on every generic signature of the wrapper and of the code that uses it.

use burn::tensor::{Tensor, backend::Backend};

/// `g − a·b`, for `a: [d_in, k]` and `b: [k, d_out]`.
pub(crate) fn subtract_product<B: Backend>(
    g: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
) -> Tensor<B, 2> {
    #[cfg(feature = "ndarray")]
    let (g, a, b) = match ndarray::subtract_product(g, a, b) {
        Ok(result) => return result,
        Err(inputs) => inputs,
    };
    g - a.matmul(b)
}

#[cfg(feature = "ndarray")]
mod ndarray {
    use std::any::Any;

    use burn::backend::ndarray::{NdArrayTensor, SharedArray};
    use burn::tensor::{Tensor, TensorPrimitive, backend::Backend};
    use ndarray::LinalgScalar;
    use ndarray::linalg::general_mat_mul;
    use ndarray::{Ix2, IxDyn};

    type Inputs<B> = (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>);

    /// `g − a·b` in place on burn-ndarray's `f32` or `f64` tensors; the inputs back, untouched,
    /// on any other backend or dtype.
    pub(super) fn subtract_product<B: Backend>(
        g: Tensor<B, 2>,
        a: Tensor<B, 2>,
        b: Tensor<B, 2>,
    ) -> Result<Tensor<B, 2>, Inputs<B>> {
        let (g, a, b) = match (unwrap(g), unwrap(a), unwrap(b)) {
            (Ok(g), Ok(a), Ok(b)) => (g, a, b),
            (g, a, b) => return Err((rewrap(g), rewrap(a), rewrap(b))),
        };
        let result = match (g, a, b) {
            (NdArrayTensor::F32(g), NdArrayTensor::F32(a), NdArrayTensor::F32(b)) => {
                NdArrayTensor::from(fused(g.into_shared(), &a.into_shared(), &b.into_shared()))
            }
            (NdArrayTensor::F64(g), NdArrayTensor::F64(a), NdArrayTensor::F64(b)) => {
                NdArrayTensor::from(fused(g.into_shared(), &a.into_shared(), &b.into_shared()))
            }
            (g, a, b) => return Err((wrap(g), wrap(a), wrap(b))),
        };
        Ok(wrap(result))
    }

    /// `g ← g − a·b` through one general matrix product into `g`'s buffer.
    fn fused<E: LinalgScalar + std::ops::Neg<Output = E>>(
        g: SharedArray<E>,
        a: &SharedArray<E>,
        b: &SharedArray<E>,
    ) -> SharedArray<E> {
        // Tensors of rank 2 have 2-D arrays; the conversions cannot fail.
        let as_2d = "a rank-2 tensor holds a 2-D array";
        let mut g = g.into_dimensionality::<Ix2>().expect(as_2d);
        let a = a.view().into_dimensionality::<Ix2>().expect(as_2d);
        let b = b.view().into_dimensionality::<Ix2>().expect(as_2d);
        general_mat_mul(-E::one(), &a, &b, E::one(), &mut g);
        g.into_dimensionality::<IxDyn>()
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
    fn wrap<B: Backend>(t: NdArrayTensor) -> Tensor<B, 2> {
        from_any(Box::new(t))
    }

    fn from_any<B: Backend>(boxed: Box<dyn Any>) -> Tensor<B, 2> {
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
