//! burn-train integration of [spf](https://github.com/spf-rs/spf).
//!
//! The wrapper, `SafetyProjectedOptimizer`, is already a burn `Optimizer`, so it goes into
//! burn-train's `Learner` unchanged, and its record into burn-train's checkpoints. What burn-train
//! cannot see is what the projection did: its metrics are computed from the model's output, and
//! the statistics live in the optimizer. [`SpfMetric`] reads them from the wrapper's
//! [`StatsFeed`](spf_core::StatsFeed) and shows them beside the loss, on the dashboard and in the
//! metric logs:
//!
//! ```no_run
//! # use burn::backend::{Autodiff, NdArray};
//! # use burn::nn::{Linear, LinearConfig};
//! # use burn::optim::SgdConfig;
//! # use spf_core::SpfConfig;
//! use spf_train::{SpfMetric, SpfStatistic};
//!
//! # type B = Autodiff<NdArray>;
//! # let model: Linear<B> = LinearConfig::new(2, 2).init(&Default::default());
//! let optim = SpfConfig::new().init(SgdConfig::new().init::<B, Linear<B>>(), &model, [])?;
//! let feed = optim.stats_feed();
//! let conflicts = SpfMetric::new(SpfStatistic::ConflictShare, feed.clone());
//! // SupervisedTraining::new(..).metric_train_numeric(conflicts) ...; then
//! // .launch(Learner::new(model, optim, lr_scheduler)).
//! # Ok::<(), spf_core::SpfError>(())
//! ```

mod metric;

pub use metric::{SpfMetric, SpfStatistic};
