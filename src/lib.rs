#![doc = include_str!("../README.md")]

pub use spf_core::checkpoint;
pub use spf_core::projection;
pub use spf_core::screen;
pub use spf_core::{
    BasisRecord, LoadError, NoSafetySource, NonFinitePolicy, NonFiniteStats, ParamFilter,
    ParamPath, Projected, ProjectionMode, ProjectionStats, ProjectionTarget, Protection,
    RECORD_VERSION, RankPolicy, RefreshPolicy, RefreshStats, SafetyGradientSource,
    SafetyProjectedOptimizer, SourceError, SpfConfig, SpfError, SpfRecord, StatsFeed, StatsPolicy,
    StepError, StepStats, SubspaceConfig, TensorStats, VectorPolicy, project,
    project_without_stats, require_lora_base_gradients,
};
pub use spf_subspace::{
    Adapter, LowRankBasis, MAX_POWER_ITERATIONS, RandomizedSvd, RandomizedSvdConfig,
    SafetySubspace, SketchConfig, SubspaceError, Target, Targets, captured_energy,
    direction_overlap, principal_angles, rank_for_energy, subspace_overlap,
};
pub use spf_subspace::{rsvd, view};

/// burn-train integration: the projection statistics as `Learner` metrics (feature `train`).
#[cfg(feature = "train")]
pub use spf_train as train;
