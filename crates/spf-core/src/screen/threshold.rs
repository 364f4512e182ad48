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
/// Serialized as the bare number for [`Fixed`](Self::Fixed) and as `{"outlier_sigmas": k}` for
/// [`Outlier`](Self::Outlier), so a configuration saved with a fixed threshold reads back.
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

    /// Checks the setting.
    ///
    /// # Errors
    ///
    /// [`SpfError::InvalidScreenThreshold`] for a fixed threshold outside `[0, 1]` (a score is
    /// a share), [`SpfError::InvalidScreenSigmas`] for an outlier rule whose `k` is negative or
    /// not finite (NaN included).
    pub fn validate(self) -> Result<Self, SpfError> {
        match self {
            Self::Fixed(threshold) if !(0.0..=1.0).contains(&threshold) => {
                Err(SpfError::InvalidScreenThreshold { threshold })
            }
            Self::Outlier { sigmas } if !(sigmas.is_finite() && sigmas >= 0.0) => {
                Err(SpfError::InvalidScreenSigmas { sigmas })
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
            let log = score.max(FLOOR).ln();
            let at = self.sorted.partition_point(|&x| x <= log);
            self.sorted.insert(at, log);
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
        let fixed = ScreenThreshold::Fixed(0.004);
        assert_eq!(serde_json::to_string(&fixed).unwrap(), "0.004");
        let outlier = ScreenThreshold::self_set();
        let json = serde_json::to_string(&outlier).unwrap();
        assert_eq!(json, r#"{"outlier_sigmas":2.0}"#);
        for t in [fixed, outlier] {
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::from_str::<ScreenThreshold>(&json).unwrap(), t);
            assert_eq!(t.validate().unwrap(), t);
        }
    }
}
