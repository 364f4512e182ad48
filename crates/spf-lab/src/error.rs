//! The lab's one error type.

use std::path::PathBuf;

/// Why a lab stage failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The optimizer wrapper refused a configuration or a step.
    #[error("SPF: {0}")]
    Spf(#[from] spf_core::SpfError),
    /// Estimating a safety subspace failed.
    #[error("subspace estimation: {0}")]
    Subspace(#[from] spf_subspace::SubspaceError),
    /// A checkpoint could not be written or read ([`spf_core::checkpoint`] says why).
    #[error("checkpoint: {0}")]
    Checkpoint(#[source] spf_core::SpfError),
    /// A results file or plot could not be written.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error("plotting {path}: {message}")]
    Plot {
        /// The file.
        path: PathBuf,
        /// plotters' error, as text.
        message: String,
    },
    /// A configuration could not be serialized (to key a cache, or to save with results).
    #[error("serializing the configuration: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The synthetic world refused its configuration or ran out of prompts of a split.
    #[error("world: {0}")]
    World(#[from] crate::world::WorldError),
    /// The configuration asks for something the lab cannot do.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl From<spf_harness::settings::InvalidSetting> for LabError {
    fn from(invalid: spf_harness::settings::InvalidSetting) -> Self {
        Self::Config(invalid.0)
    }
}
