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
    /// A sampler found no prompt of the split it was asked for.
    #[error("no {split:?} prompt of the asked task and topics turned up in {draws} draws")]
    EmptySplit {
        /// The split.
        split: crate::world::Split,
        /// Draws made.
        draws: usize,
    },
    /// burn-collective failed to register a replica or to all-reduce its gradients.
    #[error("burn-collective: {0}")]
    Collective(String),
    /// The configuration asks for something the lab cannot do.
    #[error("invalid configuration: {0}")]
    Config(String),
}
