//! SPF under data parallelism on burn's collective engine (`burn-collective`): one replica per
//! device (and per node), each computing the gradient of its shard of the batch, the gradients
//! averaged across replicas by burn's all-reduce, and every replica then stepping the same
//! wrapped optimizer on the same average.
//!
//! The projection needs no communication of its own. Every replica holds the same weights (they
//! started equal and took the same steps), so a refresh computes the same safety gradient from
//! the same safety batch, draws the same sketches (the `t`-th refresh is seeded by `t`), and
//! estimates the same bases; the policy, [`RefreshPolicy::Adaptive`](crate::RefreshPolicy::Adaptive)
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
//! # let model: Linear<B> = LinearConfig::new(8, 8).with_bias(false).init(&Default::default());
//! // burn initializes parameters lazily, and a clone taken before that draws its own values:
//! // fix them (read them, or load the model from a file) before cloning it for the replicas.
//! let _ = model.weight.val();
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
//!                 let id = PeerId::from(peer);
//!                 model = spf_core::collective::step(&mut optim, id, 1e-3, model, grads)
//!                     .map_err(|e| e.to_string())?;
//!             }
//!             Ok(())
//!         });
//!     }
//! });
//! ```
//!
//! The gradients travel as one tensor, in the module's order ([`all_reduce_mean`]): one
//! collective operation per step, and the same pairing of parameters on every replica whatever
//! their ids. burn's own `GradientsParams::all_reduce` pairs them by sorting their `ParamId`s,
//! which are drawn afresh in each process: nodes that built or loaded their models themselves
//! (from a GGUF file, say) would add up different parameters, and burn-collective stops on the
//! first mismatched shape (`PeerSentIncoherentTensor`), or sums the wrong ones silently where
//! shapes agree.
//!
//! `tests/collective.rs` checks that two replicas on batches of `b` take the steps one replica
//! takes on the merged batches of `2b`, through refreshes, with equal bases, and resume exactly;
//! `tests/nodes.rs` does the same with two processes over loopback, through burn-collective's
//! orchestrator.

use crate::error::SpfError;
use crate::optimizer::SafetyProjectedOptimizer;
use crate::refresh::SafetyGradientSource;
use burn::collective::{PeerId, ReduceOperation, all_reduce};
use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, LearningRate, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorPrimitive};

/// Why a replica's step did not happen, with the module handed back untouched.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaStepError<M> {
    /// burn-collective's all-reduce failed (a peer that never registered, gradients that
    /// differ in size between replicas, a lost node): no step was taken.
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

/// One data-parallel step of replica `peer`: averages `grads` with every other replica's
/// ([`all_reduce_mean`]), then steps `optim` on the average
/// ([`SafetyProjectedOptimizer::try_step`]: refresh when due, projection, inner step).
///
/// The average, not the sum: with a loss that is a mean over samples and equal shards, it is the
/// gradient of the merged batch, so the learning rate of a single-device run carries over.
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
    let grads = match all_reduce_mean(peer, &module, grads) {
        Ok(grads) => grads,
        Err(message) => return Err(ReplicaStepError::AllReduce { module, message }),
    };
    optim
        .try_step(lr, module, grads)
        .map_err(|err| ReplicaStepError::Step {
            module: err.module,
            error: err.error,
        })
}

/// Replaces `grads` by their mean over every replica, through one burn-collective all-reduce:
/// the gradients of `module`'s parameters, in the order the module lists them, flattened into
/// one tensor on the gradients' backend (the autodiff backend's inner one), averaged, and cut
/// back into their shapes. Every replica must call it, with the same module structure, at the
/// same step; `peer` must have been registered (`burn::collective::register`) on that backend.
///
/// # Errors
///
/// burn-collective's error, as it describes itself.
pub fn all_reduce_mean<M, B>(
    peer: PeerId,
    module: &M,
    mut grads: GradientsParams,
) -> Result<GradientsParams, String>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    let mut flatten = Flatten::<B> {
        grads: &mut grads,
        parts: Vec::new(),
        shapes: Vec::new(),
    };
    module.visit(&mut flatten);
    let Flatten { parts, shapes, .. } = flatten;
    if parts.is_empty() {
        return Ok(grads);
    }
    let flat = Tensor::cat(parts, 0).into_primitive().tensor();
    let mean = all_reduce::<B::InnerBackend>(peer, flat, ReduceOperation::Mean)
        .map_err(|err| format!("{err:?}"))?;
    let mut restore = Restore::<B> {
        grads: &mut grads,
        flat: Tensor::from_primitive(TensorPrimitive::Float(mean)),
        shapes: shapes.into_iter(),
        at: 0,
    };
    module.visit(&mut restore);
    Ok(grads)
}

/// Takes each parameter's gradient out of the set, flattened, in the module's order.
struct Flatten<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    parts: Vec<Tensor<B::InnerBackend, 1>>,
    shapes: Vec<(ParamId, Vec<usize>)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            let dims = grad.dims().to_vec();
            self.parts
                .push(grad.reshape([dims.iter().product::<usize>()]));
            self.shapes.push((param.id, dims));
        }
    }
}

/// Cuts the averaged tensor back into the gradients [`Flatten`] took, in the same order.
struct Restore<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    flat: Tensor<B::InnerBackend, 1>,
    shapes: std::vec::IntoIter<(ParamId, Vec<usize>)>,
    at: usize,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Restore<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some((id, dims)) = self.shapes.as_slice().first().cloned() else {
            return;
        };
        if id != param.id {
            return;
        }
        self.shapes.next();
        let len: usize = dims.iter().product();
        let part = self.flat.clone().slice(self.at..self.at + len);
        self.at += len;
        let dims: [usize; D] = dims.try_into().expect("taken from a rank-D gradient");
        self.grads
            .register::<<B as AutodiffBackend>::InnerBackend, D>(id, part.reshape(dims));
    }
}
