//! The kernels on flex's primitive: `Σ x` and `Σ x²` in one read of a contiguous `f32` or `f64`
//! tensor.

use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, TensorData};

use super::lanes::{lane_sum, sum_of_squares};

/// `Σ x²` as a one-element tensor; `None` for a strided view or another dtype.
pub(super) fn squared_norm(g: &FlexTensor) -> Option<FlexTensor> {
    let total = match g.dtype() {
        DType::F32 => TensorData::new(vec![sum_of_squares(g.as_slice::<f32>()?)], [1]),
        DType::F64 => TensorData::new(vec![sum_of_squares(g.as_slice::<f64>()?)], [1]),
        _ => return None,
    };
    Some(FlexTensor::from_data(total))
}

/// `Σ x` as a one-element tensor; `None` for a strided view or another dtype.
pub(super) fn sum(g: &FlexTensor) -> Option<FlexTensor> {
    let total = match g.dtype() {
        DType::F32 => TensorData::new(vec![lane_sum(g.as_slice::<f32>()?, |x| x)], [1]),
        DType::F64 => TensorData::new(vec![lane_sum(g.as_slice::<f64>()?, |x| x)], [1]),
        _ => return None,
    };
    Some(FlexTensor::from_data(total))
}
