//! From burn's tensors to a CPU backend's primitives and back ([`Tensor::into_dispatch`], burn's
//! `extension` feature): a kernel runs when every operand is a plain (untracked) float tensor of
//! one backend that has it; anything else is handed back untouched, for the generic path.

// The error side hands the operands back by value, once per call: boxing them would cost an
// allocation on the path that exists to save allocations.
#![allow(clippy::result_large_err)]

use burn::backend::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind};
use burn::tensor::Tensor;

#[cfg(feature = "flex")]
use super::flex;
#[cfg(feature = "ndarray")]
use super::ndarray;

/// The pattern of a plain float tensor of backend `$backend`, its primitive bound to `$x`.
macro_rules! on {
    ($backend:ident, $x:pat) => {
        DispatchTensor {
            kind: DispatchTensorKind::$backend(BackendTensor::Float($x)),
            autodiff: DispatchAutodiffContext::Disabled,
        }
    };
}

/// The tensor that backend `$backend`'s primitive `$x` is.
macro_rules! tensor {
    ($backend:ident, $x:expr) => {
        Tensor::from_dispatch(DispatchTensor {
            kind: DispatchTensorKind::$backend(BackendTensor::Float($x)),
            autodiff: DispatchAutodiffContext::Disabled,
        })
    };
}

/// `g − a·b` by the backend's kernel, or the operands back.
#[cfg(feature = "ndarray")]
pub(super) fn subtract_product(
    g: Tensor<2>,
    a: Tensor<2>,
    b: Tensor<2>,
) -> Result<Tensor<2>, (Tensor<2>, Tensor<2>, Tensor<2>)> {
    match (g.into_dispatch(), a.into_dispatch(), b.into_dispatch()) {
        (on!(NdArray, g), on!(NdArray, a), on!(NdArray, b)) => {
            match ndarray::subtract_product(g, a, b) {
                Ok(t) => Ok(tensor!(NdArray, t)),
                Err((g, a, b)) => Err((
                    tensor!(NdArray, g),
                    tensor!(NdArray, a),
                    tensor!(NdArray, b),
                )),
            }
        }
        (g, a, b) => Err((
            Tensor::from_dispatch(g),
            Tensor::from_dispatch(a),
            Tensor::from_dispatch(b),
        )),
    }
}

/// `a·b` by the backend's kernel, or the operands back.
#[cfg(feature = "ndarray")]
pub(super) fn product(a: Tensor<2>, b: Tensor<2>) -> Result<Tensor<2>, (Tensor<2>, Tensor<2>)> {
    match (a.into_dispatch(), b.into_dispatch()) {
        (on!(NdArray, a), on!(NdArray, b)) => match ndarray::product(a, b) {
            Ok(t) => Ok(tensor!(NdArray, t)),
            Err((a, b)) => Err((tensor!(NdArray, a), tensor!(NdArray, b))),
        },
        (a, b) => Err((Tensor::from_dispatch(a), Tensor::from_dispatch(b))),
    }
}

/// `‖g‖²` by the backend's kernel, or `None`.
pub(super) fn squared_norm(g: &Tensor<2>) -> Option<Tensor<1>> {
    match g.clone().into_dispatch() {
        #[cfg(feature = "flex")]
        on!(Flex, g) => flex::squared_norm(&g).map(|t| tensor!(Flex, t)),
        #[cfg(feature = "ndarray")]
        on!(NdArray, g) => ndarray::squared_norm(g).map(|t| tensor!(NdArray, t)),
        _ => None,
    }
}

/// `Σ g` by the backend's kernel, or `None`.
#[cfg(feature = "flex")]
pub(super) fn sum<const D: usize>(g: &Tensor<D>) -> Option<Tensor<1>> {
    match g.clone().into_dispatch() {
        on!(Flex, g) => flex::sum(&g).map(|t| tensor!(Flex, t)),
        _ => None,
    }
}
