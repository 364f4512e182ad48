//! The error type of this crate.

use burn::module::ParamId;
use spf_subspace::SubspaceError;
use thiserror::Error;

/// A step that did not happen, with the module handed back untouched.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct StepError<M> {
    /// The module as it was passed in.
    pub module: M,
    /// Why the step was refused.
    #[source]
    pub error: SpfError,
}

/// A record that was not loaded, with the optimizer handed back unchanged.
#[derive(thiserror::Error)]
#[error("{error}")]
pub struct LoadError<W> {
    /// The optimizer as it was before the load: its bases, counters and inner state intact
    /// (boxed: a wrapper is large, and an error should be cheap to pass up).
    pub optimizer: Box<W>,
    /// Why the record was refused.
    #[source]
    pub error: SpfError,
}

/// Shows the error only: the optimizer it holds need not be `Debug` (the SPF wrapper is not).
impl<W> std::fmt::Debug for LoadError<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

/// Everything that can go wrong when configuring, stepping or restoring the SPF wrapper.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SpfError {
    /// Targeting or estimation failed in `spf-subspace` (a bad filter regex, a non-finite safety
    /// gradient, an SVD that did not converge).
    #[error(transparent)]
    Subspace(#[from] SubspaceError),

    /// The safety gradient source failed during a refresh.
    #[error("safety gradient source failed: {0}")]
    SafetySource(String),

    /// A basis names a parameter the module does not have.
    #[error("basis given for parameter {id}, which the module does not have")]
    UnknownParam {
        /// The unknown parameter.
        id: ParamId,
    },

    /// Gradients from several devices hold one parameter's gradient in two float types.
    #[error("the gradients of `{path}` are {types}: they cannot be summed")]
    MixedGradientTypes {
        /// The parameter's module path.
        path: String,
        /// The two types met.
        types: String,
    },

    /// Gradients of parameters that the module does not have: they would never be applied.
    #[error("{count} gradient(s) belong to no parameter of the module")]
    ForeignGradients {
        /// How many.
        count: usize,
    },

    /// A record was saved for a module whose parameters (by path) are not this module's.
    #[error("the record does not fit the module: {reason}")]
    RecordMismatch {
        /// Which parameter is missing on which side.
        reason: String,
    },

    /// The module handed to a step has none of the parameters the bases belong to: it is not the
    /// module the wrapper was built for, or a record was loaded into the wrapper but not the
    /// module's own record into the module.
    #[error(
        "none of the module's parameters has a basis; load the module's record saved with the \
         optimizer's, or build the wrapper for this module"
    )]
    ModuleMismatch,

    /// A basis names a parameter that the configuration does not target: its path does not match
    /// the filter, or it is a vector and the vector policy is `Skip`.
    #[error("basis given for parameter `{path}`, which the configuration does not target")]
    UntargetedParam {
        /// Module path of the parameter.
        path: String,
    },

    /// A basis (or gradient) does not fit the 2-D view of its parameter.
    #[error(
        "shape mismatch{}: expected {expected:?}, found {found:?}",
        path.as_ref().map(|p| format!(" for `{p}`")).unwrap_or_default()
    )]
    ShapeMismatch {
        /// Module path of the parameter, where known.
        path: Option<String>,
        /// The 2-D view `[d_in, d_out]` that was expected.
        expected: Vec<usize>,
        /// What was found.
        found: Vec<usize>,
    },

    /// The traced screen met weights with a basis but without a trace: every score would miss
    /// their share.
    #[error(
        "{count} protected weight(s) have no trace: tap every protected weight in the forward pass"
    )]
    UntracedWeights {
        /// How many.
        count: usize,
    },

    /// The learning rate is NaN, infinite or negative.
    #[error("invalid learning rate {lr}: it must be finite and non-negative")]
    InvalidLearningRate {
        /// The learning rate given.
        lr: f64,
    },

    /// A fixed [`SampleScreen`](crate::screen::SampleScreen) threshold outside `[0, 1]`, or
    /// NaN.
    #[error("invalid screen threshold {threshold}: a score is a share, in [0, 1]")]
    InvalidScreenThreshold {
        /// The threshold given.
        threshold: f64,
    },

    /// The self-set screen threshold's `k`
    /// ([`ScreenThreshold::Outlier`](crate::screen::ScreenThreshold::Outlier)) negative or not
    /// finite (NaN included).
    #[error("invalid outlier rule k = {sigmas}: robust standard deviations, finite and at least 0")]
    InvalidScreenSigmas {
        /// The `k` given.
        sigmas: f64,
    },

    /// The calibrated screen threshold's drop share `α`
    /// ([`ScreenThreshold::Calibrated`](crate::screen::ScreenThreshold::Calibrated)) not
    /// strictly between 0 and 1 (NaN included).
    #[error(
        "invalid calibrated screen drop share {drop_share}: a share of clean samples, in (0, 1)"
    )]
    InvalidScreenDropShare {
        /// The `α` given.
        drop_share: f64,
    },

    /// A calibrated sample screen
    /// ([`ScreenThreshold::Calibrated`](crate::screen::ScreenThreshold::Calibrated)) asked to
    /// judge a batch before any calibration score reached it
    /// ([`SampleScreen::calibrate`](crate::screen::SampleScreen::calibrate)): it has no
    /// reference, and keeping every sample would silently turn the screen off.
    #[error("the calibrated sample screen judged a batch before any calibration score")]
    ScreenNotCalibrated,

    /// Gradients hold NaN or ±Inf (under [`NonFinitePolicy::Error`](crate::NonFinitePolicy)),
    /// or, when the probe shares the statistics' read, their projections do (see
    /// [`NonFinitePolicy`](crate::NonFinitePolicy)).
    #[error("non-finite gradient for {}", paths.join(", "))]
    NonFiniteGradient {
        /// Module paths of the parameters whose gradients are not finite.
        paths: Vec<String>,
    },

    /// The step panicked inside the inner optimizer or the projection, typically on optimizer
    /// state that does not fit the module.
    #[error("the optimizer step panicked: {message}")]
    StepPanicked {
        /// The panic's message.
        message: String,
    },

    /// A checkpoint could not be written or read.
    #[error("checkpoint `{path}`: {message}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },

    /// A record was written by an incompatible version of this crate.
    #[error("SPF record version {found} is not supported (this build reads version {supported})")]
    UnsupportedRecordVersion {
        /// Version stored in the record.
        found: u32,
        /// The version this build writes and reads.
        supported: u32,
    },

    /// A basis is invalid (shape, rank, finiteness or orthonormality).
    #[error("invalid basis{}: {source}", path.as_ref().map(|p| format!(" for `{p}`")).unwrap_or_default())]
    InvalidBasis {
        /// Module path of the parameter, where known.
        path: Option<String>,
        /// What is wrong with it.
        source: SubspaceError,
    },
}

/// The message a caught panic carried, when it was a string.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-string payload")
}
