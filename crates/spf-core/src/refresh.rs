//! Re-estimating the safety subspace during training: [`RefreshPolicy`] says when, a
//! [`SafetyGradientSource`] supplies the safety gradient of the *current* module.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use spf_subspace::{SafetySubspace, SubspaceConfig, Targets};

use crate::bases::{ProtectedBases, admit};
use crate::error::{SpfError, panic_message};

mod base_gradients;

pub use base_gradients::require_lora_base_gradients;
use base_gradients::with_base_gradients;

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

    /// The period of a run resumed under this policy from a record whose period was `saved`:
    /// the policy's own for `Never` and `Every`, the saved one clamped to `[initial, max]` for
    /// `Adaptive` (its `initial` when the record had none).
    pub(crate) fn resumed_period(&self, saved: Option<usize>) -> Option<usize> {
        match *self {
            Self::Adaptive { initial, max, .. } => {
                let (low, high) = (initial.max(1), max.max(initial).max(1));
                Some(saved.unwrap_or(low).clamp(low, high))
            }
            _ => self.initial_period(),
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
/// Implemented for closures that return the safety loss, `FnMut(&M) -> Tensor<1>`: the
/// wrapper then calls `backward` itself.
pub trait SafetyGradientSource<M: Module>: Clone + Send {
    /// The safety loss's gradients with respect to `module`'s parameters.
    ///
    /// # Errors
    ///
    /// Whatever keeps the source from producing them; the refresh is then skipped and counted.
    fn safety_gradients(&mut self, module: &M) -> Result<GradientsParams, SourceError>;
}

impl<M, F> SafetyGradientSource<M> for F
where
    M: Module,
    F: FnMut(&M) -> Tensor<1> + Clone + Send,
{
    /// The gradients of the closure's loss, refused when the loss is not finite: the mean over
    /// an empty safety batch is NaN, but burn 0.22's backward pass gives it zero gradients, which
    /// would estimate rank-0 bases and silently end the protection.
    fn safety_gradients(&mut self, module: &M) -> Result<GradientsParams, SourceError> {
        let loss = self(module);
        let value = loss.clone().sum().into_scalar::<f64>();
        if !value.is_finite() {
            return Err(format!("the safety loss is {value}, not finite").into());
        }
        Ok(GradientsParams::from_grads(loss.backward(), module))
    }
}

/// The source of a wrapper built without one: every refresh fails with a message saying so.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSafetySource;

impl<M: Module> SafetyGradientSource<M> for NoSafetySource {
    fn safety_gradients(&mut self, _module: &M) -> Result<GradientsParams, SourceError> {
        Err("no safety source: build the wrapper with `with_safety_source` to refresh".into())
    }
}

/// What the refreshes so far have done, as of one step: a snapshot of the wrapper's refresh
/// state, part of [`StepStats`](crate::StepStats).
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

/// The wrapper's live refresh state: the counts that [`RefreshStats`] publishes, and the step at
/// which the current bases were estimated.
#[derive(Debug, Clone, Default)]
pub(crate) struct RefreshState {
    /// What the refreshes so far have done; [`Self::stats`] hands out copies.
    pub counts: RefreshStats,
    /// The step at which the current bases were estimated (or a refresh last failed).
    pub since: Option<usize>,
}

impl RefreshState {
    /// The state of a wrapper built under `policy` without bases: the first step estimates
    /// them, unless refresh is off.
    pub fn new(policy: &RefreshPolicy) -> Self {
        Self {
            counts: RefreshStats {
                period: policy.initial_period(),
                ..RefreshStats::default()
            },
            since: None,
        }
    }

    /// The same, for bases estimated before step `step` (given at `init`: step 0).
    pub fn estimated_at(self, step: usize) -> Self {
        Self {
            since: Some(step),
            ..self
        }
    }

    /// A snapshot of what the refreshes so far have done.
    pub fn stats(&self) -> RefreshStats {
        self.counts.clone()
    }

    /// Whether a refresh is due before step `steps` (counted from 0).
    pub fn due(&self, steps: usize) -> bool {
        match (self.counts.period, self.since) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(period), Some(since)) => steps.saturating_sub(since) >= period,
        }
    }

    /// Re-estimates the bases of the `targets` at `module` from `source` before step `steps`;
    /// on failure keeps the old ones and counts it.
    #[allow(clippy::too_many_arguments)]
    pub fn refresh<M, S>(
        &mut self,
        policy: &RefreshPolicy,
        estimator: &SubspaceConfig,
        targets: &Targets,
        bases: &mut ProtectedBases,
        source: &mut S,
        module: &M,
        steps: usize,
    ) where
        M: Module,
        S: SafetyGradientSource<M>,
    {
        let start = Instant::now();
        // The t-th refresh draws its sketches from seed + t: the counter is the random state.
        let mut estimator = estimator.clone();
        estimator.sketch.seed = estimator.sketch.seed.wrapping_add(self.counts.count as u64);
        // A weight trained through a LoRA adapter is frozen, so the source's backward pass would
        // not reach it: it gets a copy whose adapted weights require a gradient.
        let adapted = targets
            .has_adapters()
            .then(|| with_base_gradients(module, targets));
        let module = adapted.as_ref().unwrap_or(module);
        // A panicking source counts as a failed refresh: training goes on with the old bases.
        let gradients = catch_unwind(AssertUnwindSafe(|| source.safety_gradients(module)))
            .unwrap_or_else(|panic| Err(format!("it panicked: {}", panic_message(&*panic)).into()));
        let estimated = gradients
            .map_err(|err| SpfError::SafetySource(err.to_string()))
            .and_then(|grads| Ok(SafetySubspace::estimate(module, &grads, &estimator)?))
            .and_then(|subspace| admit(targets, estimator.rank.max_rank(), subspace));
        self.since = Some(steps);
        let counts = &mut self.counts;
        match estimated {
            Ok(new) => {
                let overlap = bases.mean_overlap(&new);
                bases.extend(new);
                counts.refreshed = true;
                counts.count += 1;
                counts.last_overlap = overlap;
                counts.period = counts
                    .period
                    .map(|period| policy.next_period(period, overlap));
            }
            Err(err) => {
                counts.failures += 1;
                counts.last_error = Some(err.to_string());
            }
        }
        counts.time += start.elapsed();
    }
}
