//! The real-model stack's one error type.

use std::path::PathBuf;

/// Why loading the model or running the experiment failed.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// A GGUF model file could not be read.
    #[error("model file: {0}")]
    Gguf(#[from] crate::gguf::GgufError),
    /// The model's tokenizer could not be built or used.
    #[error("{0}")]
    Chat(#[from] crate::chat::ChatError),
    /// The experiment's data could not be read.
    #[error("data: {0}")]
    Data(#[from] crate::smollm::DataError),
    /// The optimizer wrapper refused a configuration or a step.
    #[error("SPF: {0}")]
    Spf(#[from] spf_core::SpfError),
    /// Estimating a safety subspace failed.
    #[error("subspace estimation: {0}")]
    Subspace(#[from] spf_subspace::SubspaceError),
    /// An aligned checkpoint could not be written ([`spf_core::checkpoint`] says why).
    #[error("checkpoint: {0}")]
    Checkpoint(#[source] spf_core::SpfError),
    /// A directory for the outputs could not be made.
    #[error("writing {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A training stage diverged: its loss stopped being finite.
    #[error("{stage}: the loss became {loss}")]
    Diverged {
        /// The stage, in words.
        stage: String,
        /// The loss it reached.
        loss: f64,
    },
    /// A training step found no parameter with a gradient: nothing would be learned.
    #[error("{stage}: no parameter has a gradient")]
    NoGradients {
        /// The stage, in words.
        stage: String,
    },
    /// The configuration asks for something the experiment cannot do.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl From<spf_harness::settings::InvalidSetting> for LlmError {
    fn from(invalid: spf_harness::settings::InvalidSetting) -> Self {
        Self::Config(invalid.0)
    }
}
