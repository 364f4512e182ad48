//! burn-train integration of [spf](https://github.com/spf-rs/spf).
//!
//! burn-train 0.22's `Learner` owns a `ModuleOptimizer` and calls the model's
//! `TrainStep::optimize` with it. [`Protected`] wraps a model so that this step is projected by
//! SPF (a [`Protection`](spf_core::Protection), built for the model), and carries SPF's state in
//! the model's record, so that burn-train's checkpoints hold it and a resumed run continues bit
//! for bit. [`SpfMetric`] shows what the projection did beside the loss, on the dashboard and in
//! the metric logs, read from the protection's [`StatsFeed`](spf_core::StatsFeed):
//!
//! ```no_run
//! # use burn::nn::{Linear, LinearConfig};
//! # use burn::tensor::Device;
//! use spf_core::SpfConfig;
//! use spf_train::{Protected, SpfMetric, SpfStatistic};
//!
//! # let model: Linear = LinearConfig::new(2, 2).init(&Device::default().autodiff());
//! let protection = SpfConfig::new().protection(&model, [])?;
//! let model = Protected::new(model, protection);
//! let conflicts = SpfMetric::new(SpfStatistic::ConflictShare, model.stats_feed());
//! // SupervisedTraining::new(..).metric_train_numeric(conflicts) ...; then
//! // .launch(Learner::new(model, AdamWConfig::new().init(), lr)); the trained model is
//! // `result.model.model`.
//! # Ok::<(), spf_core::SpfError>(())
//! ```
//!
//! `examples/learner.rs` is the whole of it, with a safety source that re-estimates the bases,
//! resumption, and burn-train's multi-device strategy.

mod metric;
mod protected;

pub use metric::{SpfMetric, SpfStatistic};
pub use protected::{Protected, Source, SpfState};
