//! SPF under data parallelism on burn's collective engine (`burn-collective`): one replica per
//! device (and per node), each computing the gradient of its shard of the batch, the gradients
//! averaged across replicas by burn's all-reduce, and every replica then stepping the same
//! wrapped optimizer on the same average.
//!
//! The projection needs no communication of its own. Every replica holds the same weights (they
//! started equal and took the same steps), so a refresh computes the same safety gradient from
//! the same safety batch, draws the same sketches (the `t`-th refresh is seeded by `t`), and
//! estimates the same bases; the policy, [`RefreshPolicy::Adaptive`](spf_core::RefreshPolicy)
//! included, decides from those identical numbers, so every replica refreshes at the same step.
//! The projection of an identical average with identical bases is identical. What this asks of
//! the caller: build every replica's wrapper from the same configuration and give each the same
//! safety batch, and take every step on every replica.
//!
//! ```no_run
//! # use burn::backend::{Autodiff, NdArray};
//! # use burn::collective::{CollectiveConfig, PeerId, register};
//! # use burn::nn::{Linear, LinearConfig};
//! # use burn::optim::{AdamWConfig, GradientsParams};
//! # use burn::tensor::Tensor;
//! # use spf_core::SpfConfig;
//! # type B = Autodiff<NdArray>;
//! # fn shard(peer: usize, step: usize) -> Tensor<B, 2> { unimplemented!() }
//! # let model: Linear<B> = LinearConfig::new(8, 8).init(&Default::default());
//! let replicas = 2;
//! let config = CollectiveConfig::default().with_num_devices(replicas);
//! std::thread::scope(|scope| {
//!     for peer in 0..replicas {
//!         let (mut model, config) = (model.clone(), config.clone());
//!         scope.spawn(move || -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//!             let device = Default::default(); // this replica's device
//!             register::<NdArray>(PeerId::from(peer), device, config)
//!                 .map_err(|e| format!("{e:?}"))?;
//!             let mut optim = SpfConfig::new().init(AdamWConfig::new().init(), &model, [])?;
//!             for step in 0..100 {
//!                 let loss = model.forward(shard(peer, step)).powi_scalar(2).mean();
//!                 let grads = GradientsParams::from_grads(loss.backward(), &model);
//!                 model = spf_train::collective::step(&mut optim, PeerId::from(peer), 1e-3, model, grads)
//!                     .map_err(|e| e.to_string())?;
//!             }
//!             Ok(())
//!         });
//!     }
//! });
//! ```
//!
//! `tests/collective.rs` checks that two replicas on batches of `b` take the steps one replica
//! takes on the merged batches of `2b`, through refreshes, with equal bases, and resume exactly.

use burn::collective::{PeerId, ReduceOperation};
use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, LearningRate, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use spf_core::{SafetyGradientSource, SafetyProjectedOptimizer, SpfError};

/// Why a replica's step did not happen, with the module handed back untouched.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaStepError<M> {
    /// burn-collective's all-reduce failed (a peer that never registered, shapes that differ
    /// between replicas, a lost node): no step was taken.
    #[error("all-reduce of the gradients failed: {message}")]
    AllReduce {
        /// The module as it was passed in.
        module: M,
        /// burn-collective's error, as it describes itself.
        message: String,
    },
    /// The wrapper refused the step on the averaged gradients.
    #[error("SPF step refused: {error}")]
    Step {
        /// The module as it was passed in.
        module: M,
        /// Why the step was refused.
        error: SpfError,
    },
}

impl<M> ReplicaStepError<M> {
    /// The module as it was passed in.
    pub fn into_module(self) -> M {
        match self {
            Self::AllReduce { module, .. } | Self::Step { module, .. } => module,
        }
    }
}

/// One data-parallel step of replica `peer`: averages `grads` with every other replica's through
/// burn-collective's all-reduce ([`GradientsParams::all_reduce`], in parameter-id order on every
/// replica), then steps `optim` on the average
/// ([`SafetyProjectedOptimizer::try_step`]: refresh when due, projection, inner step).
///
/// The average, not the sum: with a loss that is a mean over samples and equal shards, it is the
/// gradient of the merged batch, so the learning rate of a single-device run carries over.
/// `peer` must have been registered with burn-collective (`burn::collective::register`) on the
/// gradients' backend, the autodiff backend's inner one.
///
/// # Errors
///
/// [`ReplicaStepError::AllReduce`] when burn-collective fails, [`ReplicaStepError::Step`] when
/// the wrapper refuses the step; either way the module comes back as it was.
pub fn step<O, M, B, S>(
    optim: &mut SafetyProjectedOptimizer<O, B, S>,
    peer: PeerId,
    lr: LearningRate,
    module: M,
    grads: GradientsParams,
) -> Result<M, ReplicaStepError<M>>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
    S: SafetyGradientSource<M, B>,
{
    let grads = match grads.all_reduce::<B::InnerBackend>(peer, ReduceOperation::Mean) {
        Ok(grads) => grads,
        Err(err) => {
            let message = format!("{err:?}");
            return Err(ReplicaStepError::AllReduce { module, message });
        }
    };
    optim
        .try_step(lr, module, grads)
        .map_err(|err| ReplicaStepError::Step {
            module: err.module,
            error: err.error,
        })
}
