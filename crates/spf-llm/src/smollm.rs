//! The SPF experiment on a real model: SmolLM2-135M-Instruct ([`crate::llama`], from its GGUF
//! file), real harmful prompts (AdvBench, HarmBench) and harmful fine-tuning data (pyrit's
//! many-shot pairs), all fetched by `scripts/fetch-assets.sh`.
//!
//! [`protocol`] holds the field's attack protocol (splits, the task, its scorer, the mixer),
//! [`experiment`] runs and scores the grid, `blocks` trains the top of the model over its cached
//! frozen bottom.

mod blocks;
pub mod data;
pub mod experiment;
pub mod protocol;

pub use data::{Assets, DataError};
pub use experiment::{SmolConfig, SmolMethod, SmolModel, SmolResults, SmolRow, SmolSummary};
pub use protocol::EvalSplit;
