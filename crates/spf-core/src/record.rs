//! [`SpfRecord`]: the wrapper's saved state, versioned.

use burn::record::Record;
use burn::tensor::{Tensor, backend::Backend};

/// The record format this build writes and reads.
pub const RECORD_VERSION: u32 = 2;

/// The saved state of a [`SafetyProjectedOptimizer`](crate::SafetyProjectedOptimizer): the inner
/// optimizer's record, every basis keyed by parameter id, the step counter and the refresh state.
///
/// Parameter ids are those of the module the wrapper was built for, so save the module's record
/// together with this one. The record also maps every parameter id to its module path, so a
/// wrapper built for a fresh copy of the same architecture (new ids) can load it and adopt the
/// saved ids, which the module takes on when its own record is loaded: this is what resuming
/// from burn-train's checkpoints does.
#[derive(Record)]
pub struct SpfRecord<R: Record<B>, B: Backend> {
    /// [`RECORD_VERSION`] at the time of saving.
    pub version: u32,
    /// The inner optimizer's record.
    pub inner: R,
    /// Every float parameter of the module: its id and module path, sorted by id.
    pub params: Vec<ParamPath>,
    /// Optimizer steps taken.
    pub steps: usize,
    /// One entry per basis, sorted by parameter id.
    pub bases: Vec<BasisRecord<B>>,
    /// Successful refreshes so far: the random state of the refresh sketches.
    pub refreshes: usize,
    /// Failed refreshes so far.
    pub refresh_failures: usize,
    /// The step at which the current bases were estimated.
    pub refresh_since: Option<usize>,
    /// The current refresh period (`None` when refresh is off).
    pub refresh_period: Option<usize>,
}

/// The saved factors of one [`LowRankBasis`](spf_subspace::LowRankBasis).
#[derive(Record)]
pub struct BasisRecord<B: Backend> {
    /// The parameter's id, [`ParamId::val`](burn::module::ParamId::val).
    pub param: u64,
    /// `U: [d_in, k]`.
    pub u: Tensor<B, 2>,
    /// `σ: [k]`.
    pub sigma: Tensor<B, 1>,
    /// `V: [d_out, k]`.
    pub v: Tensor<B, 2>,
}

/// A parameter id and the module path it belongs to.
#[derive(Record)]
pub struct ParamPath {
    /// [`ParamId::val`](burn::module::ParamId::val).
    pub param: u64,
    /// The `.`-joined module path, as in [`Targets`](spf_subspace::Targets).
    pub path: String,
}
