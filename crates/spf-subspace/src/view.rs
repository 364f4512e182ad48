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
        t.reshape(view)
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
        t.reshape(dims)
    })
}
