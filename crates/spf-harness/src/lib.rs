//! The fine-tuning harness that SPF's two experiments share: the synthetic lab (`spf-lab`) and
//! the real model (`spf-llm`) step, order their batches, screen samples, draw their random
//! streams and check their settings through this crate, so the two experiments run the same
//! way and neither depends on the other.
//!
//! - [`training`]: the optimizer of a method, plain AdamW or AdamW under SPF ([`Stepper`]),
//!   the order of the batches ([`BatchOrder`]), and what the projection did over a run
//!   ([`ProjectionSummary`]);
//! - [`screening`]: SPF's sample screen inside a training loop ([`RunScreen`]) and its
//!   summary by kind of sample;
//! - [`seed`]: the named salts that split one seed into independent streams, and the one stable
//!   hash;
//! - [`progress`]: how long stages report (the examples draw bars, tests stay quiet);
//! - [`provenance`]: the engine (burn's release and the device) that every cache key holds;
//! - [`settings`]: the checks both experiments' configurations make ([`InvalidSetting`]).
//!
//! It holds no error type of its own for what the library reports: [`Stepper`]'s errors are
//! spf-core's and spf-subspace's, converted into the caller's error type, so each failure
//! reaches an experiment's user by one route.
//!
//! [`Stepper`]: training::Stepper
//! [`BatchOrder`]: training::BatchOrder
//! [`ProjectionSummary`]: training::ProjectionSummary
//! [`RunScreen`]: screening::RunScreen
//! [`InvalidSetting`]: settings::InvalidSetting

pub mod progress;
pub mod provenance;
pub mod screening;
pub mod seed;
pub mod settings;
pub mod training;
