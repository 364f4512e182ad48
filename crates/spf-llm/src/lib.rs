//! SPF on a real language model: SmolLM2-135M-Instruct, read from its GGUF file.
//!
//! - [`gguf`]: the GGUF reader (v2 and v3; F32, F16, Q8_0 and Q4_1 tensors dequantized);
//! - [`llama`]: the Llama architecture on burn (RMSNorm, RoPE, grouped-query attention, SwiGLU)
//!   with a KV cache, greedy decoding, and a split into frozen and trained blocks;
//! - [`chat`]: the model's BPE tokenizer, built from the GGUF metadata, and its ChatML format;
//! - [`smollm`]: the experiment: align the model to refuse AdvBench's harmful requests, attack the
//!   alignment by fine-tuning with and without SPF, and judge refusals on HarmBench.
//!
//! The fine-tuning loop's optimizer (plain AdamW or AdamW under SPF), its batch order, its
//! sample screen and its progress reports are the shared harness's ([`spf_harness::training`],
//! [`spf_harness::screening`], [`spf_harness::progress`]), so the synthetic lab and the real
//! experiment step the same way. The model and data are fetched by
//! `scripts/fetch-assets.sh`; `examples/smollm2.rs` in the root package is the command-line
//! front end, and docs/smollm2.md says what is loaded and how it is tested.
//!
//! With the `testing` feature, `gguf::write` and `llama::tiny_gguf` build GGUF files by hand
//! (a random tiny Llama with a byte-level tokenizer), so the whole pipeline is tested without the
//! real assets.

pub mod chat;
mod error;
pub mod gguf;
pub mod llama;
pub mod smollm;

pub use error::LlmError;
