//! The 2-D view of a parameter: SPF treats a tensor of rank `D > 2` as the matrix
//! `[dim0, rest]` and a vector of length `n` as `[n, 1]`. These helpers move a tensor into that
//! view and back; [`Targets`](crate::Targets) records each parameter's view.

use burn::tensor::Tensor;

use crate::SubspaceError;

/// The 2-D view of a parameter of shape `dims`: `[dim0, rest]`, or `[n, 1]` for a vector.
pub fn view_2d(dims: &[usize]) -> [usize; 2] {
    match dims {
        [] => [1, 1],
        [n] => [*n, 1],
        [first, rest @ ..] => [*first, rest.iter().product()],
    }
}

/// `t` as its 2-D view (see [`view_2d`]). A matrix is handed back as it is: a `reshape` to the
/// same shape copied its input on burn-ndarray, which would cost the optimizer step two copies of
/// every protected gradient.
pub fn into_2d<const D: usize>(t: Tensor<D>) -> Tensor<2> {
    if D == 2 {
        Tensor::from_bridge(t.into_bridge())
    } else {
        let view = view_2d(&t.dims());
        reshaped(t, view)
    }
}

/// The inverse of [`into_2d`]: `t` back in the shape `dims` of its parameter, without a copy for a
/// matrix.
///
/// # Errors
///
/// [`SubspaceError::ViewMismatch`] when `t` is not the 2-D view of `dims` (it used to be
/// returned unchanged for any `dims` of rank 2, and to panic in burn's reshape otherwise).
pub fn from_2d<const D: usize>(t: Tensor<2>, dims: [usize; D]) -> Result<Tensor<D>, SubspaceError> {
    let found = t.dims();
    if view_2d(&dims) != found {
        return Err(SubspaceError::ViewMismatch {
            view: found.to_vec(),
            dims: dims.to_vec(),
        });
    }
    Ok(if D == 2 {
        Tensor::from_bridge(t.into_bridge())
    } else {
        reshaped(t, dims)
    })
}

/// `t.reshape(dims)`, also for a shape with a zero: burn 0.22's `reshape` reads a 0 in the new
/// shape as "keep the input's dimension at this index" (and panics past the input's rank), so a
/// tensor without elements is built anew in its new shape instead.
fn reshaped<const D1: usize, const D2: usize>(t: Tensor<D1>, dims: [usize; D2]) -> Tensor<D2> {
    if dims.contains(&0) {
        Tensor::zeros(dims, (&t.device(), t.dtype()))
    } else {
        t.reshape(dims)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor};

    use super::*;

    #[test]
    fn tensors_without_elements_keep_their_shape_both_ways() {
        // burn 0.22's reshape reads a 0 as "keep the input's dimension": [3, 4, 0] would have
        // become [3, 4] and [4, 0] → [4, 0, 0] panicked (found by spf-theory's property test).
        let device = Device::default();
        let t = Tensor::<3>::zeros([3, 4, 0], &device);
        let flat = into_2d(t);
        assert_eq!(flat.dims(), [3, 0]);
        let back = from_2d(flat, [3, 4, 0]).expect("the view of [3, 4, 0]");
        assert_eq!(back.dims(), [3, 4, 0]);
        let empty = Tensor::<2>::zeros([4, 0], &device);
        assert_eq!(from_2d(empty, [4, 0, 0]).expect("a view").dims(), [4, 0, 0]);
        // A tensor with elements still reshapes.
        let t = Tensor::<3>::ones([2, 3, 4], &device);
        assert_eq!(
            from_2d(into_2d(t), [2, 3, 4]).expect("a view").dims(),
            [2, 3, 4]
        );
    }
}
