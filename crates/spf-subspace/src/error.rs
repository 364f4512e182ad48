//! The error type of this crate.

use thiserror::Error;

/// Why a [`LowRankBasis`](crate::LowRankBasis) could not be built.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SubspaceError {
    /// The factors do not agree on the number of directions `k`, or a factor has the wrong rank.
    #[error(
        "basis factors disagree on shape: u is {u:?}, sigma is {sigma:?}, v is {v:?} \
         (expected u: [d_in, k], sigma: [k], v: [d_out, k])"
    )]
    ShapeMismatch {
        /// Shape of `u`.
        u: Vec<usize>,
        /// Shape of `sigma`.
        sigma: Vec<usize>,
        /// Shape of `v`.
        v: Vec<usize>,
    },

    /// More directions than a `d_in × d_out` matrix can hold orthonormally.
    #[error("rank {k} exceeds min(d_in, d_out) = min({d_in}, {d_out})")]
    RankTooLarge {
        /// Requested number of directions.
        k: usize,
        /// Rows of the parameter's 2-D view.
        d_in: usize,
        /// Columns of the parameter's 2-D view.
        d_out: usize,
    },

    /// A factor holds NaN or ±Inf.
    #[error("basis factor `{factor}` holds a non-finite value")]
    NonFinite {
        /// `"u"`, `"sigma"`, `"v"`, `"vector"` or `"input"` (a matrix to decompose).
        factor: &'static str,
    },

    /// A singular value is negative.
    #[error("singular value sigma[{index}] = {value} is negative")]
    NegativeSigma {
        /// Position in `sigma`.
        index: usize,
        /// The offending value.
        value: f64,
    },

    /// The singular values are not sorted from largest to smallest.
    #[error("singular values must be non-increasing, but sigma[{index}] = {next} > sigma[{prev_index}] = {prev}", prev_index = index - 1)]
    UnsortedSigma {
        /// Position of the first value larger than its predecessor (at least 1).
        index: usize,
        /// `sigma[index - 1]`.
        prev: f64,
        /// `sigma[index]`.
        next: f64,
    },

    /// faer's SVD of the small projected matrix did not converge.
    #[error("the SVD of the projected sketch failed: {message}")]
    SvdFailed {
        /// faer's error.
        message: String,
    },

    /// Estimating the basis of one parameter failed.
    #[error("parameter `{path}`: {source}")]
    Parameter {
        /// Module path of the parameter.
        path: String,
        /// What went wrong.
        source: Box<SubspaceError>,
    },

    /// The parameter filter's regular expression does not compile.
    #[error("invalid parameter filter regex `{pattern}`: {message}")]
    InvalidFilter {
        /// The pattern as configured.
        pattern: String,
        /// The regex engine's explanation.
        message: String,
    },

    /// `max |FᵀF − I|` exceeds the tolerance for factor `F`.
    #[error(
        "basis factor `{factor}` is not orthonormal: max |FᵀF − I| = {deviation:e} exceeds tolerance {tolerance:e}"
    )]
    NotOrthonormal {
        /// `"u"` or `"v"`.
        factor: &'static str,
        /// The measured deviation.
        deviation: f64,
        /// The tolerance it was checked against.
        tolerance: f64,
    },

    /// An orthonormality tolerance that is NaN, infinite or negative: with it, any factors
    /// would pass (NaN compares false) or none would.
    #[error("orthonormality tolerance {tolerance} must be finite and non-negative")]
    InvalidTolerance {
        /// The tolerance given.
        tolerance: f64,
    },

    /// Two matrices that must have the same number of rows do not.
    #[error("the factors have {left} and {right} rows; they must span subspaces of one space")]
    RowMismatch {
        /// Rows of the first.
        left: usize,
        /// Rows of the second.
        right: usize,
    },

    /// A randomized-SVD setting that cannot run (see `RandomizedSvdConfig::check`).
    #[error("invalid randomized SVD configuration: {reason}")]
    InvalidSketch {
        /// What is wrong.
        reason: String,
    },

    /// A matrix is not the 2-D view of the shape it is to be returned to
    /// ([`view::from_2d`](crate::view::from_2d)).
    #[error("a {view:?} matrix is not the 2-D view of shape {dims:?}")]
    ViewMismatch {
        /// The matrix's shape.
        view: Vec<usize>,
        /// The shape asked for.
        dims: Vec<usize>,
    },
}
