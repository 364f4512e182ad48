//! [`SpfConfig`]: which parameters SPF protects, how it projects, and where.

use burn::config::Config;
use burn::module::{AutodiffModule, ParamId};
use burn::tensor::backend::AutodiffBackend;
use regex::Regex;
use serde::{Deserialize, Serialize};
use spf_subspace::LowRankBasis;

use crate::{ProjectionMode, SafetyProjectedOptimizer, SpfError};

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

/// What to do with targeted parameters of rank 1 (biases, norm scales).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum VectorPolicy {
    /// Leave them alone.
    #[default]
    Skip,
    /// View them as `n × 1` and apply the `Pcgrad` rule against their raw safety gradient, given
    /// as the exact basis [`LowRankBasis::from_vector`].
    Pcgrad,
}

/// Which parameters SPF protects, chosen by module path.
///
/// A path is the chain of field names (and container indices) from the root module to the
/// parameter, joined with `.`, for example `blocks.0.attn.query.weight`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ParamFilter {
    /// Every parameter.
    #[default]
    All,
    /// Parameters whose whole path matches the regular expression (it is anchored at both ends).
    PathRegex(String),
}

impl ParamFilter {
    /// A filter on the module path, for example `.*(attn|mlp).*`.
    pub fn path_regex(pattern: impl Into<String>) -> Self {
        Self::PathRegex(pattern.into())
    }

    /// Compiles the filter into a predicate on paths.
    pub(crate) fn compile(&self) -> Result<PathMatcher, SpfError> {
        match self {
            Self::All => Ok(PathMatcher(None)),
            Self::PathRegex(pattern) => Regex::new(&format!("^(?:{pattern})$"))
                .map(|regex| PathMatcher(Some(regex)))
                .map_err(|err| SpfError::InvalidFilter {
                    pattern: pattern.clone(),
                    message: err.to_string(),
                }),
        }
    }
}

/// A compiled [`ParamFilter`].
pub(crate) struct PathMatcher(Option<Regex>);

impl PathMatcher {
    pub(crate) fn matches(&self, path: &str) -> bool {
        self.0.as_ref().is_none_or(|regex| regex.is_match(path))
    }
}

/// Configuration of [`SafetyProjectedOptimizer`].
///
/// A parameter is *targeted* when its path matches [`filter`](Self::filter) and it has rank 2 or
/// more, or rank 1 with [`VectorPolicy::Pcgrad`]. A tensor of rank greater than 2 is viewed as
/// `[dim0, rest]`, a vector of length `n` as `[n, 1]`.
#[derive(Config, Debug)]
pub struct SpfConfig {
    /// What the projection removes.
    #[config(default = "ProjectionMode::ConflictOnly")]
    pub mode: ProjectionMode,
    /// Whether the gradient or the inner optimizer's update is projected.
    #[config(default = "ProjectionTarget::Gradient")]
    pub target: ProjectionTarget,
    /// Which parameters are protected.
    #[config(default = "ParamFilter::All")]
    pub filter: ParamFilter,
    /// What happens to targeted vectors.
    #[config(default = "VectorPolicy::Skip")]
    pub vector_policy: VectorPolicy,
    /// The largest number of safety directions kept per parameter: bases with more are truncated
    /// to their `rank` leading directions.
    #[config(default = 8)]
    pub rank: usize,
}

impl SpfConfig {
    /// Wraps `inner` so that every step is projected against `bases`, one per targeted parameter
    /// of `module`. Targeted parameters without a basis, and all other parameters, pass through
    /// untouched.
    ///
    /// # Errors
    ///
    /// [`SpfError::InvalidFilter`] for a bad regex; for a basis, [`SpfError::UnknownParam`],
    /// [`SpfError::UntargetedParam`] or [`SpfError::ShapeMismatch`] when it does not belong to a
    /// targeted parameter of `module` of the right shape.
    pub fn init<O, M, B>(
        &self,
        inner: O,
        module: &M,
        bases: impl IntoIterator<Item = (ParamId, LowRankBasis<B::InnerBackend>)>,
    ) -> Result<SafetyProjectedOptimizer<O, B>, SpfError>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
    {
        SafetyProjectedOptimizer::new(inner, module, self.clone(), bases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_regex_is_anchored_at_both_ends() {
        let matcher = ParamFilter::path_regex(".*(attn|mlp).*").compile().unwrap();
        assert!(matcher.matches("blocks.0.attn.query.weight"));
        assert!(matcher.matches("mlp.weight"));
        assert!(!matcher.matches("head.weight"));

        let matcher = ParamFilter::path_regex("weight").compile().unwrap();
        assert!(matcher.matches("weight"));
        assert!(
            !matcher.matches("attn.weight"),
            "a bare name must not match a longer path"
        );

        assert!(
            ParamFilter::All
                .compile()
                .unwrap()
                .matches("anything.at.all")
        );
    }

    #[test]
    fn invalid_regex_is_a_typed_error() {
        let err = ParamFilter::path_regex("(attn").compile().err().unwrap();
        assert!(matches!(err, SpfError::InvalidFilter { ref pattern, .. } if pattern == "(attn"));
    }

    #[test]
    fn config_round_trips_through_json() {
        let config = SpfConfig::new()
            .with_mode(ProjectionMode::Pcgrad)
            .with_target(ProjectionTarget::Update)
            .with_filter(ParamFilter::path_regex(r".*\.weight"))
            .with_vector_policy(VectorPolicy::Pcgrad)
            .with_rank(16);
        let json = serde_json::to_string(&config).unwrap();
        let back: SpfConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(format!("{back:?}"), format!("{config:?}"));

        let defaults = SpfConfig::new();
        assert_eq!(defaults.mode, ProjectionMode::ConflictOnly);
        assert_eq!(defaults.target, ProjectionTarget::Gradient);
        assert_eq!(defaults.filter, ParamFilter::All);
        assert_eq!(defaults.vector_policy, VectorPolicy::Skip);
    }
}
