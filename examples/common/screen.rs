//! `--screen` for the examples: a fixed threshold or the self-set rule.

use spf_core::screen::ScreenThreshold;

/// `0.004`: a fixed share; `auto`: the self-set outlier rule at its default `k`; `auto:K`: at
/// `k = K` (`spf_core::screen::ScreenThreshold`).
pub fn parse(text: &str) -> Result<ScreenThreshold, String> {
    let threshold = match text.split_once(':') {
        None if text == "auto" => ScreenThreshold::self_set(),
        Some(("auto", k)) => ScreenThreshold::Outlier {
            sigmas: k.parse().map_err(|e| format!("auto:K, K a number: {e}"))?,
        },
        _ => ScreenThreshold::Fixed(
            text.parse()
                .map_err(|e| format!("a share in [0, 1], auto or auto:K: {e}"))?,
        ),
    };
    threshold.validate().map_err(|e| e.to_string())
}
