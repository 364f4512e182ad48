#![doc = include_str!("../README.md")]

pub use spf_core::projection;
pub use spf_core::{
    BasisRecord, ParamFilter, Projected, ProjectionMode, ProjectionStats, ProjectionTarget,
    RECORD_VERSION, SafetyProjectedOptimizer, SpfConfig, SpfError, SpfRecord, StepStats,
    TensorStats, VectorPolicy, project,
};
pub use spf_subspace::{LowRankBasis, SubspaceError};
