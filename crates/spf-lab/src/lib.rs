//! The SPF evaluation lab: the field's fine-tuning attack, reproduced at small scale.
//!
//! A small decoder-only [transformer](model) is **aligned** ([`align`]) in a synthetic
//! [world]: it learns two benign tasks and to answer every prompt that carries a
//! harm-topic token with a fixed refusal. It is then **fine-tuned** ([`finetune`]) on a new
//! task whose data has a share `p` of harmful prompts with compliant answers, with plain AdamW
//! (SFT), with SPF in several modes, and with a data baseline. The held-out **evaluation**
//! ([`eval`]) reports the harmful score (the share of harmful prompts not refused, on harm
//! topics the fine-tuning saw and on ones it never saw) and the fine-tune accuracy. [`insights`]
//! measures the paper's three observations on the same model, and [`experiment`] runs the whole
//! grid over seeds and summarises it; [`report`] and [`plot`] turn the results into tables and
//! SVG curves.
//!
//! What a fine-tuning run needs besides its data (the optimizer of a method, plain AdamW or
//! AdamW under SPF, the order of its batches, SPF's sample screen inside a training loop, the
//! named seed salts and progress reports) is the shared harness, [`spf_harness`], which the same
//! attack on a real model (the `spf-llm` crate) uses too.
//!
//! Everything is generic over the burn backend, and every random choice is seeded from the
//! configuration, so CPU, WGPU and CUDA runs can be compared. `examples/finetune.rs` in the
//! root package is the command-line front end; docs/results.md holds its measured numbers.
//!
//! ```
//! use burn::tensor::Device;
//! use spf_lab::experiment::ExperimentConfig;
//! use spf_lab::finetune::{FinetuneConfig, Method};
//! use spf_harness::progress::Silent;
//! use spf_lab::align::AlignConfig;
//!
//! // A tiny grid: two methods, one share, a few steps.
//! let config = ExperimentConfig::new()
//!     .with_align(AlignConfig::new().with_steps(5))
//!     .with_finetune(FinetuneConfig::new().with_steps(3).with_eval_every(3))
//!     .with_methods(vec![Method::Sft, Method::SpfConflictOnly])
//!     .with_shares(vec![0.1])
//!     .with_seeds(vec![0])
//!     .with_eval_prompts(8);
//! let device = Device::default().autodiff();
//! let results = spf_lab::experiment::run(&config, "cpu", &device, None, &mut Silent)?;
//! let spf = results.get(Method::SpfConflictOnly, 0.1).expect("it ran");
//! assert_eq!(spf.p, 0.1);
//! // SPF projected: some safety directions conflicted with the fine-tuning gradient.
//! let run = &results.seeds[0].runs[1];
//! assert_eq!(run.method, Method::SpfConflictOnly);
//! assert!(run.projection.expect("an SPF run").conflict_share > 0.0);
//! # Ok::<(), spf_lab::LabError>(())
//! ```

pub mod ablation;
pub mod align;
pub mod batch;
pub mod decode;
mod error;
pub mod eval;
pub mod experiment;
pub mod finetune;
pub mod insights;
pub mod model;
pub mod plot;
pub mod replicas;
pub mod report;
pub mod world;

pub use error::LabError;
