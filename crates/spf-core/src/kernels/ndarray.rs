//! The kernels on burn-ndarray's primitive: `C ← C − A B` as one general matrix product into
//! `C`'s buffer, `A B` with the operands' own arrays, and `Σ x²` in one read.
//!
//! burn 0.22 deprecates burn-ndarray for flex; it stays for the users who name it.
#![allow(deprecated)]
// The error side hands the operands back by value, once per call: boxing them would cost an
// allocation on the path that exists to save allocations.
#![allow(clippy::result_large_err)]

use burn::backend::ndarray::{NdArrayTensor, SharedArray};
use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, Ix2, IxDyn, LinalgScalar};

use super::lanes;

/// `g − a·b` in `g`'s buffer (copied first when another handle shares it, as burn would), on
/// `f32` or `f64` operands of one dtype; the operands back otherwise.
pub(super) fn subtract_product(
    g: NdArrayTensor,
    a: NdArrayTensor,
    b: NdArrayTensor,
) -> Result<NdArrayTensor, (NdArrayTensor, NdArrayTensor, NdArrayTensor)> {
    match (g, a, b) {
        (NdArrayTensor::F32(g), NdArrayTensor::F32(a), NdArrayTensor::F32(b)) => {
            let (a, b) = (a.into_shared(), b.into_shared());
            Ok(NdArrayTensor::from(subtract(g.into_shared(), &a, &b)))
        }
        (NdArrayTensor::F64(g), NdArrayTensor::F64(a), NdArrayTensor::F64(b)) => {
            let (a, b) = (a.into_shared(), b.into_shared());
            Ok(NdArrayTensor::from(subtract(g.into_shared(), &a, &b)))
        }
        inputs => Err(inputs),
    }
}

/// `a·b` into a new array, on `f32` or `f64` operands of one dtype; the operands back otherwise.
pub(super) fn product(
    a: NdArrayTensor,
    b: NdArrayTensor,
) -> Result<NdArrayTensor, (NdArrayTensor, NdArrayTensor)> {
    match (a, b) {
        (NdArrayTensor::F32(a), NdArrayTensor::F32(b)) => Ok(NdArrayTensor::from(multiply(
            &a.into_shared(),
            &b.into_shared(),
        ))),
        (NdArrayTensor::F64(a), NdArrayTensor::F64(b)) => Ok(NdArrayTensor::from(multiply(
            &a.into_shared(),
            &b.into_shared(),
        ))),
        inputs => Err(inputs),
    }
}

/// `Σ x²` as a one-element tensor, on `f32` or `f64`; `None` otherwise.
pub(super) fn squared_norm(g: NdArrayTensor) -> Option<NdArrayTensor> {
    match g {
        NdArrayTensor::F32(g) => Some(NdArrayTensor::from(sum_of_squares(&g.into_shared()))),
        NdArrayTensor::F64(g) => Some(NdArrayTensor::from(sum_of_squares(&g.into_shared()))),
        _ => None,
    }
}

/// Tensors of rank 2 hold 2-D arrays: the conversions below cannot fail.
const AS_2D: &str = "a rank-2 tensor holds a 2-D array";

fn matrix<E>(a: &SharedArray<E>) -> ArrayView2<'_, E> {
    a.view().into_dimensionality::<Ix2>().expect(AS_2D)
}

/// `c ← c − a·b` through one general matrix product into `c`'s buffer.
fn subtract<E: LinalgScalar + std::ops::Neg<Output = E>>(
    c: SharedArray<E>,
    a: &SharedArray<E>,
    b: &SharedArray<E>,
) -> SharedArray<E> {
    let mut c = c.into_dimensionality::<Ix2>().expect(AS_2D);
    general_mat_mul(-E::one(), &matrix(a), &matrix(b), E::one(), &mut c);
    c.into_dimensionality::<IxDyn>()
        .expect("any array is n-dimensional")
}

/// `a·b` into a new array.
fn multiply<E: LinalgScalar>(a: &SharedArray<E>, b: &SharedArray<E>) -> SharedArray<E> {
    let (a, b) = (matrix(a), matrix(b));
    let mut c = Array2::zeros((a.nrows(), b.ncols()));
    general_mat_mul(E::one(), &a, &b, E::zero(), &mut c);
    c.into_shared().into_dyn()
}

/// `Σ x²` over `a`, as a one-element array, summed in eight lanes (which the compiler vectorises)
/// when `a` is contiguous.
fn sum_of_squares<E: LinalgScalar + Default>(a: &SharedArray<E>) -> SharedArray<E> {
    let total = match a.as_slice_memory_order() {
        Some(values) => lanes::sum_of_squares(values),
        None => a.iter().fold(E::zero(), |s, x| s + *x * *x),
    };
    ndarray::arr1(&[total]).into_shared().into_dyn()
}
