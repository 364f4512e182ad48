//! Re-estimating the safety subspace during training: [`RefreshPolicy`] says when, a
//! [`SafetyGradientSource`] supplies the safety gradient of the *current* module.

use std::time::Duration;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

/// When the wrapper re-estimates its bases. The bases given at `init` count as estimated at step
/// 0; with none, the first step estimates them.
///
/// Training moves the weights, and with them the safety gradient. Every refresh computes the
/// safety loss's gradients at the current weights (a safety batch of one sample suffices: the paper's
/// single-sample estimate), re-estimates each targeted parameter's basis with
/// [`SafetySubspace::estimate`](spf_subspace::SafetySubspace::estimate), and replaces the old
/// bases. Parameters the safety loss does not reach (no gradient) keep their bases. A refresh
/// that fails — the source returns an error or panics, or its gradient is not finite — keeps the
/// previous bases, is counted, and training goes on.
///
/// The `t`-th refresh seeds its sketches with the estimator's seed mixed with `t`, so the whole
/// random state is the refresh counter, which the wrapper's record keeps: a resumed run draws the
/// same sketches.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub enum RefreshPolicy {
    /// Keep the bases given at `init` (or later through `insert_bases`).
    #[default]
    Never,
    /// Re-estimate every `n` steps (`n = 0` counts as 1).
    Every(usize),
    /// Re-estimate after `initial` steps; after each refresh whose mean
    /// [direction overlap](spf_subspace::direction_overlap) with the previous bases is at least
    /// `overlap`, double the period up to `max`, otherwise reset it to `initial` (as Q-GaLore
    /// adapts its projection updates).
    Adaptive {
        /// The first and the reset period.
        initial: usize,
        /// The longest period.
        max: usize,
        /// The overlap above which the subspace counts as settled.
        overlap: f64,
    },
}

impl RefreshPolicy {
    /// The period to start with, or `None` for [`RefreshPolicy::Never`].
    pub(crate) fn initial_period(&self) -> Option<usize> {
        match *self {
            Self::Never => None,
            Self::Every(n) => Some(n.max(1)),
            Self::Adaptive { initial, .. } => Some(initial.max(1)),
        }
    }

    /// The period after a refresh whose mean overlap with the previous bases was `overlap`.
    pub(crate) fn next_period(&self, period: usize, overlap: Option<f64>) -> usize {
        match *self {
            Self::Adaptive {
                initial,
                max,
                overlap: settled,
            } => match overlap {
                Some(o) if o >= settled => (period * 2).min(max.max(1)),
                _ => initial.max(1),
            },
            _ => period,
        }
    }
}

/// The error a [`SafetyGradientSource`] reports.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Computes the gradients of the safety loss at the current module, for a refresh.
///
/// Implemented for closures that return the safety loss, `FnMut(&M) -> Tensor<B, 1>`: the
/// wrapper then calls `backward` itself.
pub trait SafetyGradientSource<M: AutodiffModule<B>, B: AutodiffBackend>: Clone + Send {
    /// The safety loss's gradients with respect to `module`'s parameters.
    ///
    /// # Errors
    ///
    /// Whatever keeps the source from producing them; the refresh is then skipped and counted.
    fn safety_gradients(&mut self, module: &M) -> Result<GradientsParams, SourceError>;
}

impl<M, B, F> SafetyGradientSource<M, B> for F
where
    M: AutodiffModule<B>,
    B: AutodiffBackend,
    F: FnMut(&M) -> Tensor<B, 1> + Clone + Send,
{
    fn safety_gradients(&mut self, module: &M) -> Result<GradientsParams, SourceError> {
        let loss = self(module);
        Ok(GradientsParams::from_grads(loss.backward(), module))
    }
}

/// The source of a wrapper built without one: every refresh fails with a message saying so.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSafetySource;

impl<M: AutodiffModule<B>, B: AutodiffBackend> SafetyGradientSource<M, B> for NoSafetySource {
    fn safety_gradients(&mut self, _module: &M) -> Result<GradientsParams, SourceError> {
        Err("no safety source: build the wrapper with `with_safety_source` to refresh".into())
    }
}

/// What the refreshes so far have done; part of [`StepStats`](crate::StepStats).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RefreshStats {
    /// Whether the bases were re-estimated before this step.
    pub refreshed: bool,
    /// Successful refreshes since the start of training.
    pub count: usize,
    /// Refreshes that failed and kept the previous bases.
    pub failures: usize,
    /// Wall time spent refreshing since this wrapper was built (not restored from records).
    pub time: Duration,
    /// Mean [direction overlap](spf_subspace::direction_overlap) between the last refresh's bases
    /// and the ones they replaced, over parameters that had both.
    pub last_overlap: Option<f64>,
    /// The error of the last failed refresh.
    pub last_error: Option<String>,
    /// Steps between refreshes now (it changes under [`RefreshPolicy::Adaptive`]).
    pub period: Option<usize>,
}
