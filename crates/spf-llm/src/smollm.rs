//! The SPF experiment on a real model: SmolLM2-135M-Instruct ([`crate::llama`], from its GGUF
//! file), real harmful prompts (AdvBench, HarmBench) and harmful fine-tuning data (pyrit's
//! many-shot pairs), all fetched by `scripts/fetch-assets.sh`.
//!
//! [`protocol`] holds the field's attack protocol (splits, the task, its scorer, the mixer),
//! [`experiment`] runs the grid as a list of stages, one stage a file: the prompts (`splits`),
//! alignment (`align`), what a seed's cells share (`seed`), the attack (`attack`) and scoring
//! (`score`), over `blocks`, which trains the top of the model over its cached frozen bottom;
//! `cache` keeps finished cells, [`config`] and [`results`] are what goes in and comes out;
//! `lora` adapts the whole model for LoRA fine-tuning.

mod align;
mod attack;
mod blocks;
mod cache;
pub mod config;
pub mod data;
pub mod experiment;
mod lora;
mod pairs;
pub mod protocol;
pub mod results;
mod salt;
mod score;
mod seed;
mod splits;

pub use config::{ScreenPass, SmolConfig, SmolLora, SmolMethod};
pub use data::{Assets, DataError};
pub use experiment::run;
pub use protocol::EvalSplit;
pub use results::{MeanStd, Sample, SmolModel, SmolResults, SmolRow, SmolSummary};
pub use score::{COMPLIANT_OPENING, REFUSAL_OPENING};
