//! `--screen` for the examples: a fixed threshold, the self-set rule or the calibrated rule.

use spf_core::screen::ScreenThreshold;

/// `0.004`: a fixed share; `auto`: the self-set outlier rule at its default `k`; `auto:K`: at
/// `k = K`; `calibrated`: the conformal rule over a clean calibration set at its default drop
/// share `α`; `calibrated:A`: at `α = A` (`spf_core::screen::ScreenThreshold`).
pub fn parse(text: &str) -> Result<ScreenThreshold, String> {
    let threshold = match text.split_once(':') {
        None if text == "auto" => ScreenThreshold::self_set(),
        Some(("auto", k)) => ScreenThreshold::Outlier {
            sigmas: k.parse().map_err(|e| format!("auto:K, K a number: {e}"))?,
        },
        None if text == "calibrated" => ScreenThreshold::calibrated(),
        Some(("calibrated", a)) => ScreenThreshold::Calibrated {
            drop_share: a
                .parse()
                .map_err(|e| format!("calibrated:A, A a share: {e}"))?,
        },
        _ => ScreenThreshold::Fixed(text.parse().map_err(|e| {
            format!("a share in [0, 1], auto, auto:K, calibrated or calibrated:A: {e}")
        })?),
    };
    threshold.validate().map_err(|e| e.to_string())
}
