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
//! # fn shard(peer: usize, step: usize) -> Tensor<2> { unimplemented!() }
//! # let model: Linear = LinearConfig::new(8, 8).with_bias(false).init(&Default::default());
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
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, LearningRate, Optimizer};
use burn::tensor::{DType, Tensor, TensorCreationOptions, TensorData, TensorPrimitive};

/// Why the gradients could not be averaged across replicas.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AllReduceError {
    /// burn-collective failed (a peer that never registered, replicas whose modules differ in
    /// size, a lost node).
    #[error("burn-collective: {0}")]
    Collective(String),
    /// The gradients are not all of one float type, so they cannot travel as one tensor.
    #[error("gradient of parameter {param} is {found:?}, the others {expected:?}")]
    MixedDtypes {
        /// The parameter whose gradient differs.
        param: String,
        /// The type of the gradients before it.
        expected: DType,
        /// Its type.
        found: DType,
    },
    /// Gradients of parameters that the module does not have: they would never be averaged.
    #[error("{count} gradient(s) belong to no parameter of the module")]
    ForeignGradients {
        /// How many.
        count: usize,
    },
}

/// Why a replica's step did not happen, with the module handed back untouched.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaStepError<M> {
    /// The gradients could not be averaged ([`AllReduceError`]): no step was taken.
    #[error("all-reduce of the gradients failed: {error}")]
    AllReduce {
        /// The module as it was passed in.
        module: M,
        /// Why.
        error: AllReduceError,
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
    M: Module,
    O: Optimizer<M, B>,
    S: SafetyGradientSource<M>,
{
    let grads = match all_reduce_mean(peer, &module, grads) {
        Ok(grads) => grads,
        Err(error) => return Err(ReplicaStepError::AllReduce { module, error }),
    };
    optim
        .try_step(lr, module, grads)
        .map_err(|err| ReplicaStepError::Step {
            module: err.module,
            error: err.error,
        })
}

/// Replaces `grads` by their mean over every replica, through one burn-collective all-reduce:
/// the gradient of every float parameter of `module`, in the order the module lists them,
/// flattened into one tensor on the gradients' backend (the autodiff backend's inner one), with
/// one more number per parameter that says whether this replica has its gradient, averaged, and
/// cut back into the parameters' shapes. Every replica must call it, with the same module
/// structure, at the same step; `peer` must have been registered (`burn::collective::register`)
/// on that backend.
///
/// A replica without a parameter's gradient (a branch its shard never took, an expert no token
/// of it was routed to) adds zeros in its place: the parameter's gradient is the mean over the
/// replicas with 0 for those without, and every replica gets it; a parameter that no replica
/// has a gradient for gets none. So every replica sends the same number of values, pairs the
/// same parameters, and takes part in the all-reduce even with no gradient at all.
///
/// # Errors
///
/// [`AllReduceError::MixedDtypes`] when the gradients are not of one float type,
/// [`AllReduceError::ForeignGradients`] when `grads` holds gradients of parameters `module`
/// does not have (both checked before any communication, so every replica of the same module
/// refuses alike), and [`AllReduceError::Collective`] with burn-collective's error.
pub fn all_reduce_mean<M, B>(
    peer: PeerId,
    module: &M,
    mut grads: GradientsParams,
) -> Result<GradientsParams, AllReduceError>
where
    M: Module,
{
    let mut flatten = Flatten {
        grads: &mut grads,
        parts: Vec::new(),
        params: Vec::new(),
        first_device: None,
        dtype: None,
        mixed: None,
    };
    module.visit(&mut flatten);
    let Flatten {
        parts,
        params,
        first_device,
        dtype,
        mixed,
        ..
    } = flatten;
    if let Some(error) = mixed {
        return Err(error);
    }
    if !grads.is_empty() {
        return Err(AllReduceError::ForeignGradients { count: grads.len() });
    }
    // Built where the gradients are, or, with none here, where the parameters are.
    let gradients_device = parts.iter().find_map(|p| p.as_ref().map(Tensor::device));
    let Some(device) = gradients_device.or(first_device) else {
        // A module without a float parameter: nothing to average.
        return Ok(grads);
    };
    // The zeros of missing gradients, and the presence flags, in the gradients' type.
    let options = |device: &burn::tensor::Device| match dtype {
        Some(dtype) => TensorCreationOptions::from((device, dtype)),
        None => TensorCreationOptions::from(device),
    };
    let present: Vec<f32> = parts
        .iter()
        .map(|p| if p.is_some() { 1.0 } else { 0.0 })
        .collect();
    let mut pieces: Vec<Tensor<1>> = parts
        .into_iter()
        .zip(&params)
        .map(|(part, param)| part.unwrap_or_else(|| Tensor::zeros([param.len()], options(&device))))
        .collect();
    let flags = present.len();
    pieces.push(Tensor::from_data(
        TensorData::new(present, [flags]),
        options(&device),
    ));
    let flat = Tensor::cat(pieces, 0).into_primitive().tensor();
    let mean = all_reduce(peer, flat, ReduceOperation::Mean)
        .map_err(|err| AllReduceError::Collective(format!("{err:?}")))?;
    let mean: Tensor<1> = Tensor::from_primitive(TensorPrimitive::Float(mean));
    let total = mean.dims()[0];
    let had: Vec<f64> = mean
        .clone()
        .slice(total - flags..total)
        .into_data()
        .iter::<f64>()
        .collect();
    let mut restore = Restore {
        grads: &mut grads,
        flat: mean,
        params: params.into_iter().zip(had).collect::<Vec<_>>().into_iter(),
        at: 0,
    };
    module.visit(&mut restore);
    Ok(grads)
}

/// A float parameter of the module, as [`Flatten`] met it.
struct Flat {
    id: ParamId,
    dims: Vec<usize>,
}

impl Flat {
    fn len(&self) -> usize {
        self.dims.iter().product()
    }
}

/// Takes each parameter's gradient out of the set, flattened, in the module's order (`None` for
/// a parameter without one), and checks that they share one float type.
struct Flatten<'a> {
    grads: &'a mut GradientsParams,
    parts: Vec<Option<Tensor<1>>>,
    params: Vec<Flat>,
    /// The first parameter's device.
    first_device: Option<burn::tensor::Device>,
    dtype: Option<DType>,
    mixed: Option<AllReduceError>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let dims = param.lazy_shape().to_vec();
        let grad = self.grads.remove::<D>(param.id);
        let part = grad.map(|grad| {
            let found = grad.dtype();
            match self.dtype {
                None => self.dtype = Some(found),
                Some(expected) if expected != found && self.mixed.is_none() => {
                    self.mixed = Some(AllReduceError::MixedDtypes {
                        param: param.id.to_string(),
                        expected,
                        found,
                    });
                }
                Some(_) => {}
            }
            grad.reshape([dims.iter().product::<usize>()])
        });
        if self.first_device.is_none() {
            self.first_device = Some(param.lazy_device());
        }
        self.parts.push(part);
        self.params.push(Flat { id: param.id, dims });
    }
}

/// Cuts the averaged tensor back into the parameters' gradients, in the order [`Flatten`] met
/// them, registering those that some replica had.
struct Restore<'a> {
    grads: &'a mut GradientsParams,
    flat: Tensor<1>,
    params: std::vec::IntoIter<(Flat, f64)>,
    at: usize,
}

impl ModuleVisitor for Restore<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some((flat, had)) = self.params.next() else {
            return;
        };
        debug_assert_eq!(
            flat.id, param.id,
            "the module lists its parameters in one order"
        );
        let len = flat.len();
        let part = self.flat.clone().slice(self.at..self.at + len);
        self.at += len;
        if had > 0.0 {
            let dims: [usize; D] = flat
                .dims
                .try_into()
                .expect("the dims of a rank-D parameter");
            self.grads
                .register::<<B as AutodiffBackend>::InnerBackend, D>(flat.id, part.reshape(dims));
        }
    }
}
