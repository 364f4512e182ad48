//! The screen's threshold: a fixed share, or one the scores set themselves.
//!
//! A fixed threshold `τ` is a property of the model, not of the method: the task's scores sit
//! where the model and its subspace put them (on SmolLM2 a median near `0.001`, in the lab near
//! `0.008`), and they move with the seed. The self-set rule reads the threshold off the scores
//! the screen has seen, as a robust outlier rule on their logarithms. With `ℓ_i = ln s_i` over
//! every score judged so far (the current batch's included),
//!
//! ```text
//! m = median(ℓ),   MAD = median(|ℓ_i − m|),   τ = min(1, exp(m + k · 1.4826 · MAD)),
//! ```
//!
//! so a sample is dropped when its score lies more than `k` robust standard deviations above
//! the typical score, on a log scale (scores are shares spanning decades; `1.4826 · MAD` is the
//! standard deviation of a normal distribution with that MAD). For log-normal task scores the
//! rule drops a fixed share of the task, `1 − Φ(k)`, whatever their scale: 2.3% at `k = 2`.
//!
//! What it assumes: the samples that conflict with the safety subspace are a minority of the
//! data. The median and MAD ignore up to half the sample, so a share `p` of harmful samples
//! moves them little while `p` is small; when most of the data is harmful (`p → 1`) the harmful
//! scores *are* the typical score, and the rule keeps most of them. It reads scores only, never
//! a sample's label; scores of 0 (no energy on a protected tensor) count as [`FLOOR`], and
//! non-finite scores are left out of the reference (and dropped, as by a fixed threshold).
//!
//! When most of the data may be harmful, the reference must come from elsewhere: a few samples
//! of the task that the user trusts (a clean calibration set, which anyone who evaluates their
//! fine-tune already has). The calibrated rule is split conformal outlier detection on their
//! scores, taken at the same weights and subspace as the batches they judge: with the `n` finite
//! calibration scores so far sorted, `c_(1) ≤ … ≤ c_(n)`, and a drop share `α`,
//!
//! ```text
//! τ = c_(⌈(n + 1)(1 − α)⌉)        (τ = 1 when that rank exceeds n),
//! ```
//!
//! so a clean sample exchangeable with the calibration set scores above `τ` with probability at
//! most `α`, whatever the scores' distribution, and whatever share of the data is harmful: the
//! harmful samples never enter the reference.

use serde::{Deserialize, Serialize};

use crate::error::SpfError;

/// The smallest score the self-set rule takes the logarithm of; a score below it (0, a
/// gradient with no energy on a protected tensor) counts as this.
pub const FLOOR: f64 = 1e-12;

/// `1 / Φ⁻¹(3/4)`: the standard deviation of a normal distribution per unit of its MAD.
const MAD_TO_SIGMA: f64 = 1.482_602_218_505_602;

/// How the sample screen sets its threshold: a fixed share, or the outlier rule `τ =
/// min(1, exp(m + k · 1.4826 · MAD))` over the logarithms `ℓ` of every score judged so far,
/// `m = median(ℓ)` and `MAD = median(|ℓ − m|)`. The rule drops a fixed share of log-normal task
/// scores, `1 − Φ(k)`, whatever their scale; it assumes the conflicting samples are a minority.
///
/// Or, from trusted samples, the calibrated rule: the conformal `(1 − α)` quantile of the
/// scores of a clean calibration set (module docs), which drops at most a share `α` of clean data
/// and assumes nothing about the share of harmful samples.
///
/// Serialized as the bare number for [`Fixed`](Self::Fixed), as `{"outlier_sigmas": k}` for
/// [`Outlier`](Self::Outlier) and as `{"calibrated_drop_share": α}` for
/// [`Calibrated`](Self::Calibrated), so a configuration saved with a fixed threshold reads back.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ScreenThreshold {
    /// A fixed share in `[0, 1]`: samples scoring above it leave the batch.
    Fixed(f64),
    /// Set by the scores: samples scoring more than `sigmas` robust standard deviations above
    /// the median of every score seen so far, on a log scale, leave the batch.
    Outlier {
        /// `k` in the module docs' rule.
        #[serde(rename = "outlier_sigmas")]
        sigmas: f64,
    },
    /// Set by a clean calibration set: samples scoring above the conformal `(1 − α)` quantile
    /// of the calibration scores seen so far leave the batch, so at most a share `α` of clean
    /// samples does. The loop scores the calibration samples and hands their scores to
    /// [`SampleScreen::calibrate`](super::SampleScreen::calibrate).
    Calibrated {
        /// `α` in the module docs' rule: the share of clean samples it may drop, in `(0, 1)`.
        #[serde(rename = "calibrated_drop_share")]
        drop_share: f64,
    },
}

impl ScreenThreshold {
    /// The self-set rule at its default `k`, [`Self::DEFAULT_SIGMAS`].
    pub const fn self_set() -> Self {
        Self::Outlier {
            sigmas: Self::DEFAULT_SIGMAS,
        }
    }

    /// The self-set rule's default `k`: chosen on SmolLM2's validation split
    /// (docs/results.md, "A threshold that sets itself").
    pub const DEFAULT_SIGMAS: f64 = 2.0;

    /// The calibrated rule at its default drop share, [`Self::DEFAULT_DROP_SHARE`].
    pub const fn calibrated() -> Self {
        Self::Calibrated {
            drop_share: Self::DEFAULT_DROP_SHARE,
        }
    }

    /// The calibrated rule's default `α`: chosen on SmolLM2's validation split
    /// (docs/results.md, "A threshold from a clean calibration set").
    pub const DEFAULT_DROP_SHARE: f64 = 0.1;

    /// Whether the rule needs a calibration set's scores ([`Self::Calibrated`]).
    pub const fn is_calibrated(self) -> bool {
        matches!(self, Self::Calibrated { .. })
    }

    /// For the calibrated rule, the fewest calibration scores from which it can drop a sample
    /// at all (`⌈1/α⌉ − 1`: below it the conformal rank exceeds `n` and `τ = 1`); `None` for the
    /// other rules and for an `α` out of range.
    pub fn fewest_calibration_scores(self) -> Option<usize> {
        match self.validate() {
            Ok(Self::Calibrated { drop_share }) => {
                (1..).find(|&n| conformal_rank(n, drop_share) <= n)
            }
            _ => None,
        }
    }

    /// Checks the setting.
    ///
    /// # Errors
    ///
    /// [`SpfError::InvalidScreenThreshold`] for a fixed threshold outside `[0, 1]` (a score is
    /// a share), [`SpfError::InvalidScreenSigmas`] for an outlier rule whose `k` is negative or
    /// not finite (NaN included), [`SpfError::InvalidScreenDropShare`] for a calibrated rule
    /// whose `α` is not strictly between 0 and 1.
    pub fn validate(self) -> Result<Self, SpfError> {
        match self {
            Self::Fixed(threshold) if !(0.0..=1.0).contains(&threshold) => {
                Err(SpfError::InvalidScreenThreshold { threshold })
            }
            Self::Outlier { sigmas } if !(sigmas.is_finite() && sigmas >= 0.0) => {
                Err(SpfError::InvalidScreenSigmas { sigmas })
            }
            Self::Calibrated { drop_share } if !(drop_share > 0.0 && drop_share < 1.0) => {
                Err(SpfError::InvalidScreenDropShare { drop_share })
            }
            _ => Ok(self),
        }
    }
}

impl std::fmt::Display for ScreenThreshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(threshold) => write!(f, "{threshold}"),
            Self::Outlier { sigmas } => write!(f, "median + {sigmas} robust sd of ln(score)"),
            Self::Calibrated { drop_share } => {
                write!(
                    f,
                    "calibrated, at most {drop_share} of clean samples dropped"
                )
            }
        }
    }
}

/// The self-set rule's reference: the logarithms of every finite score seen, kept sorted.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct LogScores {
    sorted: Vec<f64>,
}

impl LogScores {
    /// Adds `scores` (non-finite ones left out).
    pub(super) fn extend(&mut self, scores: &[f64]) {
        for &score in scores.iter().filter(|s| s.is_finite()) {
            insert_sorted(&mut self.sorted, score.max(FLOOR).ln());
        }
    }

    /// `min(1, exp(m + k · 1.4826 · MAD))` over the scores added so far; `None` before any.
    pub(super) fn threshold(&self, sigmas: f64) -> Option<f64> {
        let m = median(&self.sorted)?;
        let mut deviations: Vec<f64> = self.sorted.iter().map(|x| (x - m).abs()).collect();
        deviations.sort_by(f64::total_cmp);
        let mad = median(&deviations)?;
        Some((m + sigmas * MAD_TO_SIGMA * mad).exp().min(1.0))
    }
}

/// The calibrated rule's reference: every finite calibration score seen, kept sorted.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct CalibrationScores {
    sorted: Vec<f64>,
}

impl CalibrationScores {
    /// Adds `scores` (non-finite ones left out).
    pub(super) fn extend(&mut self, scores: &[f64]) {
        for &score in scores.iter().filter(|s| s.is_finite()) {
            insert_sorted(&mut self.sorted, score);
        }
    }

    /// How many scores it holds.
    pub(super) fn len(&self) -> usize {
        self.sorted.len()
    }

    /// The conformal `(1 − α)` quantile, `c_(⌈(n + 1)(1 − α)⌉)` clamped to `[0, 1]`, or 1 when
    /// that rank exceeds `n` (too few scores to drop anything at level `α`); `None` before any
    /// score.
    pub(super) fn threshold(&self, drop_share: f64) -> Option<f64> {
        let n = self.sorted.len();
        if n == 0 {
            return None;
        }
        let rank = conformal_rank(n, drop_share);
        // A share lies in [0, 1]; a caller's score outside it moves the threshold no further.
        Some(
            self.sorted
                .get(rank - 1)
                .copied()
                .unwrap_or(1.0)
                .clamp(0.0, 1.0),
        )
    }
}

/// `⌈(n + 1)(1 − α)⌉`, at least 1: the 1-based rank of the calibrated rule's threshold among
/// `n` sorted scores. The small slack keeps `(n + 1)(1 − α) = 9.000000000000002` at 9.
fn conformal_rank(n: usize, drop_share: f64) -> usize {
    (((n + 1) as f64) * (1.0 - drop_share) - 1e-9)
        .ceil()
        .max(1.0) as usize
}

/// Inserts `value` into `sorted`, keeping it sorted (after any equal values).
fn insert_sorted(sorted: &mut Vec<f64>, value: f64) {
    let at = sorted.partition_point(|&x| x <= value);
    sorted.insert(at, value);
}

/// The median of sorted values: the middle one, or the mean of the two middle ones.
fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some(0.5 * (sorted[n / 2 - 1] + sorted[n / 2])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Odd and even counts, unsorted input, and a symmetric spread: the rule's median and MAD
    /// by hand.
    #[test]
    fn the_rule_is_the_median_plus_k_robust_deviations_of_the_log_scores() {
        let mut seen = LogScores::default();
        assert_eq!(seen.threshold(2.0), None, "no score, no threshold");
        // ln s = -7, -6, -5, -4, -3: median -5, deviations 2, 1, 0, 1, 2: MAD 1.
        let scores: Vec<f64> = [-4.0_f64, -7.0, -5.0, -3.0, -6.0].map(f64::exp).to_vec();
        seen.extend(&scores);
        let expected = (-5.0 + 2.0 * MAD_TO_SIGMA).exp();
        assert!((seen.threshold(2.0).unwrap() - expected).abs() < 1e-12 * expected);
        assert!((seen.threshold(0.0).unwrap() - (-5.0_f64).exp()).abs() < 1e-15);
        // A sixth, ln s = -1: median (-5 + -4)/2 = -4.5, deviations 2.5, 1.5, 0.5, 0.5, 1.5,
        // 3.5: MAD (1.5 + 1.5)/2 = 1.5.
        seen.extend(&[(-1.0_f64).exp()]);
        let expected = (-4.5 + 1.0 * MAD_TO_SIGMA * 1.5).exp();
        assert!((seen.threshold(1.0).unwrap() - expected).abs() < 1e-12 * expected);
    }

    /// A tenth of the scores far above the rest moves the median and MAD little: the threshold
    /// stays below every outlier and above most of the bulk, whatever the bulk's scale.
    #[test]
    fn a_minority_of_outliers_sits_above_the_threshold_at_any_scale() {
        for scale in [1e-4, 1e-2] {
            let bulk: Vec<f64> = (0..90)
                .map(|i| scale * (1.0 + 0.5 * ((i as f64) * 0.7).sin()))
                .collect();
            let outliers: Vec<f64> = (0..10).map(|i| scale * (20.0 + i as f64)).collect();
            let mut seen = LogScores::default();
            seen.extend(&bulk);
            seen.extend(&outliers);
            let tau = seen.threshold(ScreenThreshold::DEFAULT_SIGMAS).unwrap();
            assert!(
                outliers.iter().all(|&s| s > tau),
                "scale {scale}: τ = {tau}"
            );
            let kept = bulk.iter().filter(|&&s| s <= tau).count();
            assert!(kept >= 85, "scale {scale}: τ = {tau} keeps {kept} of 90");
        }
    }

    #[test]
    fn zero_scores_count_as_the_floor_and_non_finite_ones_are_left_out() {
        let mut seen = LogScores::default();
        seen.extend(&[f64::NAN, f64::INFINITY]);
        assert_eq!(seen.threshold(2.0), None);
        seen.extend(&[0.0, 0.0, 0.0]);
        assert!((seen.threshold(2.0).unwrap() - FLOOR).abs() < 1e-24);
        seen.extend(&[1.0; 10]);
        assert_eq!(seen.threshold(2.0), Some(1.0), "the threshold is at most 1");
    }

    /// The conformal rank by hand, the rank past `n` that keeps everything, and the guarantee
    /// itself: over many draws of clean scores, a fresh clean score is dropped at most `α` of
    /// the time, whatever the scores' distribution.
    #[test]
    fn the_calibrated_rule_is_the_conformal_quantile_and_drops_at_most_alpha_of_clean_scores() {
        let mut calibration = CalibrationScores::default();
        assert_eq!(calibration.threshold(0.1), None, "no score, no threshold");
        // n = 9, α = 0.1: rank ⌈10 · 0.9⌉ = 9, the largest.
        let score = |i: u8| f64::from(i) * 1e-3;
        let scores: Vec<f64> = (1..=9).rev().map(score).collect();
        calibration.extend(&scores);
        assert_eq!(calibration.threshold(0.1), Some(score(9)));
        // α = 0.3: rank ⌈10 · 0.7⌉ = 7.
        assert_eq!(calibration.threshold(0.3), Some(score(7)));
        // α = 0.05: rank ⌈10 · 0.95⌉ = 10 > n: too few scores to drop anything.
        assert_eq!(calibration.threshold(0.05), Some(1.0));
        calibration.extend(&[f64::NAN, f64::NEG_INFINITY]);
        assert_eq!(calibration.len(), 9, "non-finite scores are left out");
        // The fewest scores that can drop anything: 9 at α = 0.1, 19 at 0.05, 3 at 0.3.
        for (alpha, fewest) in [(0.1, 9), (0.05, 19), (0.3, 3)] {
            let rule = ScreenThreshold::Calibrated { drop_share: alpha };
            assert_eq!(
                rule.fewest_calibration_scores(),
                Some(fewest),
                "α = {alpha}"
            );
            let mut calibration = CalibrationScores::default();
            calibration.extend(&vec![1e-3; fewest - 1]);
            assert_eq!(calibration.threshold(alpha), Some(1.0), "α = {alpha}");
            calibration.extend(&[1e-3]);
            assert!(calibration.threshold(alpha).unwrap() < 1.0, "α = {alpha}");
        }
        assert_eq!(
            ScreenThreshold::self_set().fewest_calibration_scores(),
            None
        );

        // The guarantee, on a heavy-tailed distribution (a deterministic stream of draws).
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut draw = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let u = ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            1e-3 * (u / (1.0 - u)).powi(2)
        };
        for alpha in [0.1, 0.25] {
            let (trials, mut dropped) = (4000, 0);
            for _ in 0..trials {
                let mut calibration = CalibrationScores::default();
                calibration.extend(&(0..19).map(|_| draw()).collect::<Vec<_>>());
                let tau = calibration.threshold(alpha).unwrap();
                dropped += usize::from(draw() > tau);
            }
            let rate = dropped as f64 / trials as f64;
            // Exactly ⌊20 α⌋ / 20 in expectation; 3 binomial standard errors above it fails.
            let bound = (20.0 * alpha).floor() / 20.0;
            let slack = 3.0 * (bound * (1.0 - bound) / trials as f64).sqrt();
            assert!(rate <= bound + slack, "α = {alpha}: dropped {rate}");
            assert!(rate >= bound - slack, "α = {alpha}: dropped only {rate}");
        }
    }

    #[test]
    fn settings_outside_their_range_are_refused_and_fixed_ones_serialize_as_numbers() {
        for bad in [-0.1, 1.5, f64::NAN] {
            let fixed = ScreenThreshold::Fixed(bad);
            let refused = fixed.validate();
            assert!(matches!(
                refused,
                Err(SpfError::InvalidScreenThreshold { .. })
            ));
        }
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let outlier = ScreenThreshold::Outlier { sigmas: bad };
            let refused = outlier.validate();
            assert!(matches!(refused, Err(SpfError::InvalidScreenSigmas { .. })));
        }
        for bad in [0.0, 1.0, -0.1, f64::NAN] {
            let calibrated = ScreenThreshold::Calibrated { drop_share: bad };
            let refused = calibrated.validate();
            assert!(matches!(
                refused,
                Err(SpfError::InvalidScreenDropShare { .. })
            ));
        }
        let fixed = ScreenThreshold::Fixed(0.004);
        assert_eq!(serde_json::to_string(&fixed).unwrap(), "0.004");
        let outlier = ScreenThreshold::self_set();
        let json = serde_json::to_string(&outlier).unwrap();
        assert_eq!(json, r#"{"outlier_sigmas":2.0}"#);
        let calibrated = ScreenThreshold::calibrated();
        let json = serde_json::to_string(&calibrated).unwrap();
        assert_eq!(json, r#"{"calibrated_drop_share":0.1}"#);
        for t in [fixed, outlier, calibrated] {
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::from_str::<ScreenThreshold>(&json).unwrap(), t);
            assert_eq!(t.validate().unwrap(), t);
        }
    }
}
