//! [`SpfConfig`]: which parameters SPF protects, how it projects, and where.

use burn::config::Config;
use serde::{Deserialize, Serialize};
use spf_subspace::SubspaceConfig;

use crate::projection::ProjectionMode;
use crate::refresh::RefreshPolicy;

/// Where the projection acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ProjectionTarget {
    /// Project the gradient before the inner optimizer sees it (the paper's setting). With an
    /// adaptive inner optimizer the update it makes can bring conflict back.
    #[default]
    Gradient,
    /// Let the inner optimizer step on the raw gradient, then replace each targeted update
    /// `ΔW = W_new − W_old` by `−P(−ΔW)`: the update itself never conflicts, whatever the inner
    /// optimizer does.
    Update,
}

/// What a step does when a gradient holds NaN or ±Inf.
///
/// The probe sums each gradient on the device; a sum that is not finite is re-checked exactly
/// (finite entries near `f32::MAX` can overflow a sum). Under `Error` and `SkipStep`, with the
/// statistics read and no refresh due, the probe shares the statistics' read after the
/// projection, so the exact re-check sees the *projected* gradient: a finite gradient whose
/// projection overflowed to ±Inf is refused too (the step would have applied it). Otherwise the
/// probe reads before anything else happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum NonFinitePolicy {
    /// [`SafetyProjectedOptimizer::try_step`](crate::SafetyProjectedOptimizer::try_step) returns
    /// [`SpfError::NonFiniteGradient`](crate::SpfError::NonFiniteGradient) with the
    /// module untouched; [`Optimizer::step`](burn::optim::Optimizer::step) panics with that
    /// message.
    #[default]
    Error,
    /// Skip the step: the parameters, the inner optimizer's state and the step counter are left
    /// untouched.
    SkipStep,
    /// Replace every NaN and ±Inf gradient entry with 0, then step.
    ZeroNonFinite,
    /// Do not look: NaN and ±Inf reach the projection and the inner optimizer as they would
    /// without SPF. The probe is one read from the device per step (folded into the statistics'
    /// read when there is one); with [`StatsPolicy::Off`] this is the policy under which a step
    /// makes no read at all, which matters on a GPU.
    Unchecked,
}

/// Whether each step reads its projection statistics back from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum StatsPolicy {
    /// Read the statistics of every projected matrix once per step, in one transfer together
    /// with the non-finite probe, and publish them in
    /// [`last_stats`](crate::SafetyProjectedOptimizer::last_stats) and the
    /// [`StatsFeed`](crate::StatsFeed). A matrix from which nothing is removed is then left
    /// untouched, bit for bit.
    #[default]
    EveryStep,
    /// Read nothing: the projection runs entirely on the device, and the published statistics
    /// hold no per-tensor entries (refresh and non-finite counts are still kept). The update is
    /// the same; a matrix from which nothing is removed gets a zero update subtracted.
    Off,
}

/// Configuration of [`SafetyProjectedOptimizer`](crate::SafetyProjectedOptimizer); its
/// `init` builds one.
///
/// Which parameters are protected, and how their bases are estimated, is the
/// [`estimator`](Self::estimator)'s business, so that the wrapper and
/// [`SafetySubspace::estimate`](spf_subspace::SafetySubspace::estimate) always agree: a parameter
/// is *targeted* when its path matches the estimator's filter and it has rank 2 or more, or rank
/// 1 with [`VectorPolicy::Pcgrad`](spf_subspace::VectorPolicy::Pcgrad). A tensor of rank greater
/// than 2 is viewed as `[dim0, rest]`, a vector of length `n` as `[n, 1]`. Bases with more than
/// the estimator's maximum rank are truncated to their leading directions.
#[derive(Config, Debug)]
pub struct SpfConfig {
    /// What the projection removes.
    #[config(default = "ProjectionMode::ConflictOnly")]
    pub mode: ProjectionMode,
    /// Whether the gradient or the inner optimizer's update is projected.
    #[config(default = "ProjectionTarget::Gradient")]
    pub target: ProjectionTarget,
    /// When the bases are re-estimated from the safety source.
    #[config(default = "RefreshPolicy::Never")]
    pub refresh: RefreshPolicy,
    /// Targeting, rank and randomized-SVD settings of the safety subspace.
    #[config(default = "SubspaceConfig::new()")]
    pub estimator: SubspaceConfig,
    /// What a step does with NaN or ±Inf gradients.
    #[config(default = "NonFinitePolicy::Error")]
    pub non_finite: NonFinitePolicy,
    /// Whether each step reads its projection statistics back from the device.
    #[config(default = "StatsPolicy::EveryStep")]
    pub stats: StatsPolicy,
}

#[cfg(test)]
mod tests {
    use super::*;
    use spf_subspace::{ParamFilter, RankPolicy, VectorPolicy};

    #[test]
    fn config_round_trips_through_json() {
        let config = SpfConfig::new()
            .with_mode(ProjectionMode::Pcgrad)
            .with_target(ProjectionTarget::Update)
            .with_refresh(RefreshPolicy::Adaptive {
                initial: 10,
                max: 80,
                overlap: 0.9,
            })
            .with_estimator(
                SubspaceConfig::new()
                    .with_filter(ParamFilter::path_regex(r".*\.weight"))
                    .with_vector_policy(VectorPolicy::Pcgrad)
                    .with_rank(RankPolicy::Energy {
                        threshold: 0.85,
                        max_rank: 16,
                    }),
            );
        let json = serde_json::to_string(&config).unwrap();
        let back: SpfConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(format!("{back:?}"), format!("{config:?}"));

        let defaults = SpfConfig::new();
        assert_eq!(defaults.mode, ProjectionMode::ConflictOnly);
        assert_eq!(defaults.target, ProjectionTarget::Gradient);
        assert_eq!(defaults.refresh, RefreshPolicy::Never);
        assert_eq!(defaults.estimator.filter, ParamFilter::All);
    }
}
