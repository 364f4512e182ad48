//! Low-rank safety subspaces for SPF (Safety-Preserving Fine-tuning).
//!
//! The gradient `G_s` of a safety loss with respect to one weight matrix is close to low rank.
//! This crate estimates its rank-`k` factors `G_s ≈ U Σ Vᵀ`:
//!
//! - [`LowRankBasis`]: the checked factors of one parameter;
//! - [`rsvd`]: randomized SVD on burn tensors, one call ([`RandomizedSvd::compute`]) or step by
//!   step;
//! - [`SafetySubspace`]: one basis per targeted parameter ([`Targets`]) of a module, from the
//!   gradients of a safety loss;
//! - [`captured_energy`], [`subspace_overlap`], [`principal_angles`]: diagnostics;
//! - [`view`]: a parameter of any rank as the matrix SPF projects.

mod basis;
mod diagnostics;
mod error;
pub mod rsvd;
mod subspace;
mod targets;
pub mod view;

pub use basis::LowRankBasis;
pub use diagnostics::{
    captured_energy, direction_overlap, principal_angles, rank_for_energy, subspace_overlap,
};
pub use error::SubspaceError;
pub use rsvd::{MAX_POWER_ITERATIONS, RandomizedSvd, RandomizedSvdConfig, SketchConfig};
pub use subspace::{RankPolicy, SafetySubspace, SubspaceConfig};
pub use targets::{Adapter, ParamFilter, Target, Targets, VectorPolicy};

/// The device of the unit tests: burn's default device, which is the CPU (`flex`) here, and WGPU
/// with the `test-wgpu` feature (for example on Mesa's lavapipe in CI), since burn prefers a GPU
/// backend to the CPU when one is compiled in.
#[cfg(test)]
pub(crate) mod testing {
    use burn::tensor::Device;

    /// The device the unit tests compute on.
    pub(crate) fn device() -> Device {
        Device::default()
    }

    /// [`device`] with autodiff, for the tests that take gradients.
    pub(crate) fn autodiff_device() -> Device {
        device().autodiff()
    }
}
