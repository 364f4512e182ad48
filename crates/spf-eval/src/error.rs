//! The lab's one error type.

use std::path::PathBuf;

/// Why a lab stage failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The optimizer wrapper refused a configuration or a step.
    #[error("SPF: {0}")]
    Spf(#[from] spf_core::SpfError),
    /// Estimating a safety subspace failed.
    #[error("subspace estimation: {0}")]
    Subspace(#[from] spf_subspace::SubspaceError),
    /// A checkpoint could not be written or read.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// burn's recorder error, as text.
        message: String,
    },
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
    /// A GGUF model file could not be read.
    #[error("model file: {0}")]
    Gguf(#[from] crate::gguf::GgufError),
    /// The model's tokenizer could not be built or used.
    #[error("{0}")]
    Chat(#[from] crate::chat::ChatError),
    /// The real-model experiment's data could not be read.
    #[error("data: {0}")]
    Data(#[from] crate::smollm::DataError),
    /// The configuration asks for something the lab cannot do.
    #[error("invalid configuration: {0}")]
    Config(String),
}
