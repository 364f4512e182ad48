//! Low-rank safety subspaces for SPF (Safety-Preserving Fine-tuning).
//!
//! The gradient `G_s` of a safety loss with respect to one weight matrix is close to low rank.
//! This crate holds its rank-`k` factors `G_s ≈ U Σ Vᵀ` as a [`LowRankBasis`], checked for shape
//! and orthonormality, ready for the projection in `spf-core`.

mod basis;
mod error;

pub use basis::LowRankBasis;
pub use error::SubspaceError;
