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
//! the samples [`SampleScreen::keeps`]. The threshold is a fixed share, set by the scores
//! themselves as an outlier rule on their running distribution, or set by a clean calibration
//! set that the loop scores beside each batch and hands to [`SampleScreen::calibrate`]
//! ([`ScreenThreshold`]; `screen/threshold.rs` has the rules).
//!
//! For weights used as linear maps, [`traced_scores`] gives every sample's score from the
//! batch's one backward pass instead, from the layers' inputs and output gradients recorded by a
//! [`LinearTap`] (`screen/traced.rs` has the mathematics); [`SampleScreen::score`] is its
//! reference.

mod threshold;
mod traced;

pub use threshold::{FLOOR, ScreenThreshold};
pub use traced::{LinearTap, LinearTrace, traced_scores};

use threshold::{CalibrationScores, LogScores};

use burn::module::Module;
use burn::optim::GradientsParams;

use crate::error::SpfError;
use crate::optimizer::SafetyProjectedOptimizer;

/// Keeps the training samples whose gradient conflicts with the safety subspace by at most a
/// threshold share of its energy (see the [module docs](self)): a fixed share, one set by the
/// scores themselves, or one set by a clean calibration set ([`ScreenThreshold`]).
///
/// A loop hands each batch's scores to [`judge`](Self::judge), which returns the threshold they
/// are judged against; under the self-set rule that threshold moves as scores arrive, so the
/// screen keeps the logarithms of every score it has judged. Under the calibrated rule the loop
/// first hands it the scores of calibration samples taken at the same weights
/// ([`calibrate`](Self::calibrate)), and the batch's own scores never enter the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleScreen {
    rule: ScreenThreshold,
    seen: LogScores,
    calibration: CalibrationScores,
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
    /// [`SpfError::InvalidScreenThreshold`], [`SpfError::InvalidScreenSigmas`] or
    /// [`SpfError::InvalidScreenDropShare`] for a setting out of its range
    /// ([`ScreenThreshold::validate`]).
    pub fn with_threshold(rule: ScreenThreshold) -> Result<Self, SpfError> {
        let threshold = match rule.validate()? {
            ScreenThreshold::Fixed(threshold) => threshold,
            // Before any score, nothing is an outlier.
            ScreenThreshold::Outlier { .. } | ScreenThreshold::Calibrated { .. } => 1.0,
        };
        Ok(Self {
            rule,
            seen: LogScores::default(),
            calibration: CalibrationScores::default(),
            threshold,
        })
    }

    /// How the threshold is set.
    pub fn rule(&self) -> ScreenThreshold {
        self.rule
    }

    /// The threshold of the latest [`judge`](Self::judge) (a fixed one from the start; 1, which
    /// keeps everything, for the self-set and calibrated rules before any score).
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Takes the scores of clean calibration samples, taken at the weights and subspace of the
    /// batches they will judge, into the calibrated rule's reference (the other rules ignore
    /// them). The loop calls it before [`judge`](Self::judge), every step or as often as it
    /// re-scores its calibration set.
    pub fn calibrate(&mut self, scores: &[f64]) {
        if self.rule.is_calibrated() {
            self.calibration.extend(scores);
        }
    }

    /// How many calibration scores the calibrated rule holds (0 under the other rules).
    pub fn calibration_len(&self) -> usize {
        self.calibration.len()
    }

    /// Takes one batch's `scores` into the self-set rule's reference (a fixed threshold and the
    /// calibrated rule ignore them) and returns the threshold that every one of them is judged
    /// against by [`keeps`](Self::keeps). The scores only: never which sample they came from.
    ///
    /// # Errors
    ///
    /// [`SpfError::ScreenNotCalibrated`] under the calibrated rule before any calibration
    /// score ([`calibrate`](Self::calibrate)): the screen is left as it was.
    pub fn judge(&mut self, scores: &[f64]) -> Result<f64, SpfError> {
        match self.rule {
            ScreenThreshold::Fixed(_) => {}
            ScreenThreshold::Outlier { sigmas } => {
                self.seen.extend(scores);
                if let Some(threshold) = self.seen.threshold(sigmas) {
                    self.threshold = threshold;
                }
            }
            ScreenThreshold::Calibrated { drop_share } => {
                self.threshold = self
                    .calibration
                    .threshold(drop_share)
                    .ok_or(SpfError::ScreenNotCalibrated)?;
            }
        }
        Ok(self.threshold)
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
