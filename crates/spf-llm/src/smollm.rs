//! The SPF experiment on a real model: SmolLM2-135M-Instruct ([`crate::llama`], from its GGUF
//! file), real harmful prompts (AdvBench, HarmBench) and harmful fine-tuning data (pyrit's
//! many-shot pairs), all fetched by `scripts/fetch-assets.sh`.

pub mod data;

pub use data::{Assets, DataError};
pub mod experiment;

pub use experiment::{Attack, SmolConfig, SmolMethod, SmolModel, SmolResults, SmolRow};
