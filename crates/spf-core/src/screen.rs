//! Screening a fine-tuning batch sample by sample against the safety subspace.
//!
//! SPF projects the *batch* gradient: a harmful sample's pull against safety is averaged with
//! the benign samples' before the projection sees it, and what survives the projection (the
//! directions the rank-`k` subspace does not span) still teaches compliance. The screen looks
//! at each sample on its own. For sample `i` with gradient `G_{i,t}` on protected tensor `t`,
//! its score is the share of its energy that the projection would remove,
//!
//! ```text
//! s_i = Σ_t (‖G_{i,t}‖² − ‖P_t(G_{i,t})‖²) / Σ_t ‖G_{i,t}‖²   ∈ [0, 1],
//! ```
//!
//! with `P_t` the wrapper's projection in its configured mode (under `ConflictOnly`, the
//! energy of the components `c_j = u_jᵀ G v_j < 0` that would raise the safety loss). A sample
//! that mostly teaches the model to comply with a harmful prompt points against the refusal
//! directions and scores high; a sample of an unrelated task has little energy in a rank-`k`
//! subspace of a large matrix and scores near 0. The screen drops the samples that score above
//! a threshold, and the step is taken on the rest.
//!
//! It needs one gradient per sample, which the optimizer never sees (burn hands it the batch's
//! sum), so it is a tool for the training loop, not a setting of [`SpfConfig`](crate::SpfConfig):
//! the loop computes each sample's gradient (a backward pass per sample), asks
//! [`SampleScreen::score`], hands the batch's scores to [`SampleScreen::judge`], and steps on
//! the samples [`SampleScreen::keeps`]. The threshold is a fixed share or set by the scores
//! themselves, as an outlier rule on their running distribution ([`ScreenThreshold`];
//! `screen/threshold.rs` has the rule).
//!
//! For weights used as linear maps, [`traced_scores`] gives every sample's score from the
//! batch's one backward pass instead, from the layers' inputs and output gradients recorded by a
//! [`LinearTap`] (`screen/traced.rs` has the mathematics); [`SampleScreen::score`] is its
//! reference.

mod threshold;
mod traced;

pub use threshold::{FLOOR, ScreenThreshold};
pub use traced::{LinearTap, LinearTrace, traced_scores};

use threshold::LogScores;

use burn::module::Module;
use burn::optim::GradientsParams;

use crate::error::SpfError;
use crate::optimizer::SafetyProjectedOptimizer;

/// Keeps the training samples whose gradient conflicts with the safety subspace by at most a
/// threshold share of its energy (see the [module docs](self)): a fixed share, or one set by
/// the scores themselves ([`ScreenThreshold`]).
///
/// A loop hands each batch's scores to [`judge`](Self::judge), which returns the threshold they
/// are judged against; under the self-set rule that threshold moves as scores arrive, so the
/// screen keeps the logarithms of every score it has judged.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleScreen {
    rule: ScreenThreshold,
    seen: LogScores,
    threshold: f64,
}

impl SampleScreen {
    /// A screen that drops samples scoring above the fixed share `threshold`.
    ///
    /// # Errors
    ///
    /// [`SpfError::InvalidScreenThreshold`] unless `0 ≤ threshold ≤ 1` (a score is a share).
    pub fn new(threshold: f64) -> Result<Self, SpfError> {
        Self::with_threshold(ScreenThreshold::Fixed(threshold))
    }

    /// A screen whose threshold is set as `rule` says.
    ///
    /// # Errors
    ///
    /// [`SpfError::InvalidScreenThreshold`] or [`SpfError::InvalidScreenSigmas`] for a setting
    /// out of its range ([`ScreenThreshold::validate`]).
    pub fn with_threshold(rule: ScreenThreshold) -> Result<Self, SpfError> {
        let threshold = match rule.validate()? {
            ScreenThreshold::Fixed(threshold) => threshold,
            // Before any score, nothing is an outlier.
            ScreenThreshold::Outlier { .. } => 1.0,
        };
        Ok(Self {
            rule,
            seen: LogScores::default(),
            threshold,
        })
    }

    /// How the threshold is set.
    pub fn rule(&self) -> ScreenThreshold {
        self.rule
    }

    /// The threshold of the latest [`judge`](Self::judge) (a fixed one from the start; 1, which
    /// keeps everything, for the self-set rule before any score).
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Takes one batch's `scores` into the self-set rule's reference (a fixed threshold ignores
    /// them) and returns the threshold that every one of them is judged against by
    /// [`keeps`](Self::keeps). The scores only: never which sample they came from.
    pub fn judge(&mut self, scores: &[f64]) -> f64 {
        if let ScreenThreshold::Outlier { sigmas } = self.rule {
            self.seen.extend(scores);
            if let Some(threshold) = self.seen.threshold(sigmas) {
                self.threshold = threshold;
            }
        }
        self.threshold
    }

    /// The score of one sample: the share of the energy of its gradient `grads` (at `module`)
    /// that `optim`'s projection would remove. 0 for a gradient with no energy on a protected
    /// tensor.
    ///
    /// # Errors
    ///
    /// As [`SafetyProjectedOptimizer::measure`]: a gradient that is not of its parameter's shape.
    pub fn score<M, S>(
        optim: &SafetyProjectedOptimizer<S>,
        module: &M,
        grads: GradientsParams,
    ) -> Result<f64, SpfError>
    where
        M: Module,
    {
        Ok(optim.measure(module, grads)?.removed_energy_share())
    }

    /// Whether a sample with `score` stays in the batch, at the current threshold (a NaN score
    /// does not).
    pub fn keeps(&self, score: f64) -> bool {
        score <= self.threshold
    }
}
