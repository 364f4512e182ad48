//! SPF (Safety-Preserving Fine-tuning): a burn optimizer wrapper that keeps fine-tuning from
//! undoing a model's safety alignment.
//!
//! The gradient `G_s` of a safety loss (the negative log-likelihood of a refusal) is close to low
//! rank in each weight matrix, `G_s ≈ U Σ Vᵀ`. A utility gradient `G` whose coefficient
//! `c_i = u_iᵀ G v_i` is negative would raise the safety loss along direction `i`, to first order.
//! [`SafetyProjectedOptimizer`] removes those components before (or after) any burn optimizer
//! steps:
//!
//! - [`projection`]: the projection modes and their statistics, for one tensor;
//! - [`SpfConfig`]: which parameters are protected and how;
//! - [`RefreshPolicy`] and [`SafetyGradientSource`]: re-estimating the safety subspace as
//!   training moves the weights;
//! - [`SafetyProjectedOptimizer`]: the wrapper around any burn optimizer (a
//!   [`ModuleOptimizer`](burn::optim::ModuleOptimizer), with its parameter groups), stepping on
//!   one device's gradients or on several devices' (burn-train's multi-device strategy);
//! - [`SpfRecord`]: its versioned saved state, and [`checkpoint`]: crash-safe burnpack files for
//!   it and for burn's module and optimizer records;
//! - [`screen`]: scoring each training sample's own gradient against the safety subspace, to
//!   drop the samples that conflict with it most.

mod bases;
pub mod checkpoint;
mod config;
mod error;
mod host;
mod kernels;
mod non_finite;
mod optimizer;
pub mod projection;
mod protection;
mod record;
mod refresh;
pub mod screen;
mod state;
mod stats;
mod visitors;

#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;

pub use config::{NonFinitePolicy, ProjectionTarget, SpfConfig, StatsPolicy};
pub use error::{LoadError, SpfError, StepError};
pub use optimizer::SafetyProjectedOptimizer;
pub use projection::{Projected, ProjectionMode, ProjectionStats, project, project_without_stats};
pub use protection::Protection;
pub use record::{BasisRecord, ParamPath, RECORD_VERSION, SpfRecord};
pub use refresh::require_lora_base_gradients;
pub use refresh::{NoSafetySource, RefreshPolicy, RefreshStats, SafetyGradientSource, SourceError};
pub use spf_subspace::{ParamFilter, RankPolicy, SubspaceConfig, VectorPolicy};
pub use stats::{NonFiniteStats, StatsFeed, StepStats, TensorStats};
