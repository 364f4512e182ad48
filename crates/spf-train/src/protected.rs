//! [`Protected`]: a model that burn-train's `Learner` trains under SPF, its protection's state
//! carried in the model's record so that burn-train's checkpoints hold it.
//!
//! burn-train 0.22's `Learner` owns the optimizer (a `ModuleOptimizer`) and calls the model's
//! `TrainStep::optimize` with it: `Protected` projects that step through its
//! [`Protection`]. burn-train saves the model's record, the optimizer's and the scheduler's at
//! each checkpoint. The optimizer's is written on a checkpointer thread after the training
//! thread has moved on, so a state read there could be a later step's; the model's record is
//! taken on the training thread, between two steps. The protection's state therefore rides in
//! the model: [`SpfState`], a module of host-visible parameters that every step rewrites (the
//! bases only when they change) and that a resumed run's first step reads back.
//!
//! A record must keep its tensors' shapes (burn refuses "shape mismatch" on load), so the layout
//! is fixed when the model is wrapped: one `U`, `σ`, `V` per protected parameter, in the order
//! of their module paths, padded to the rank policy's largest rank, and integer tensors for the
//! parameter ids, the ranks and the counters. The last refresh's error message is not carried
//! (a resumed run reports `None` until its next failure).

use burn::module::{Module, Param, ParamId};
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{GradientsParams, ModuleOptimizer, MultiGradientsParams, OptimizerRecord};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use spf_core::{
    BasisRecord, ParamPath, Protection, RECORD_VERSION, SafetyGradientSource, SpfError, SpfRecord,
    StatsFeed,
};
use spf_subspace::{LowRankBasis, Target};

/// The layout of [`SpfState`] this build writes and reads.
const LAYOUT: i64 = 1;

/// Indices into [`SpfState::counters`]; the ranks of the bases follow.
const COUNTERS: usize = 8;

/// A model trained under SPF by burn-train's `Learner`: `TrainStep` and `InferenceStep` are the
/// model's own, and the optimizer step is projected through the [`Protection`].
///
/// See the [crate docs](crate) for its use, and `examples/learner.rs` for a whole run.
#[derive(Module, Debug)]
pub struct Protected<M, S> {
    /// The model.
    pub model: M,
    /// The protection's state, as the model's record holds it.
    state: SpfState,
    /// The protection itself, live.
    #[module(skip)]
    protection: Protection<S>,
    /// The id of the counters parameter this value last wrote: a loaded record brings another.
    #[module(skip)]
    written: ParamId,
}

/// A safety source as `Protected` holds it: burn's module derive asks every field to be `Debug`,
/// and a closure is not.
#[derive(Clone)]
pub struct Source<S>(S);

impl<S> core::fmt::Debug for Source<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Source")
    }
}

impl<M: Module, S: SafetyGradientSource<M>> SafetyGradientSource<M> for Source<S> {
    fn safety_gradients(&mut self, module: &M) -> Result<GradientsParams, spf_core::SourceError> {
        self.0.safety_gradients(module)
    }
}

impl<M: Module, F> Protected<M, Source<F>> {
    /// `model`, protected by `protection` (built for `model` with
    /// [`SpfConfig::protection`](spf_core::SpfConfig::protection)).
    pub fn new(model: M, protection: Protection<F>) -> Self {
        let device = model.devices().into_iter().next().unwrap_or_default();
        let state = SpfState::layout(&protection, &device);
        let written = state.counters.id;
        let mut protected = Self {
            model,
            state,
            protection: protection.map_source(Source),
            written,
        };
        protected.write_state(true);
        protected
    }
}

impl<M: Module, S> Protected<M, S> {
    /// The protection: the bases, the statistics, the safety source.
    pub fn protection(&self) -> &Protection<S> {
        &self.protection
    }

    /// A shared handle on the latest step's statistics, for [`SpfMetric`](crate::SpfMetric).
    pub fn stats_feed(&self) -> StatsFeed {
        self.protection.stats_feed()
    }

    /// Writes the protection's state into [`SpfState`]: the counters at every step, the bases
    /// and the refresh overlap when `bases` (they changed, or this is the first write). Nothing
    /// is read from the device: the bases are copied there.
    fn write_state(&mut self, bases: bool) {
        let device = self.state.counters.val().device();
        let record = self
            .protection
            .to_record_without_bases(OptimizerRecord::default());
        let slots = targeted(&self.protection);
        let mut ranks = Vec::with_capacity(slots.len());
        for (slot, (id, _)) in slots.iter().enumerate() {
            let basis = self.protection.bases().get(id);
            ranks.push(basis.map_or(-1, |b| b.rank() as i64));
            if let (true, Some(basis)) = (bases, basis) {
                self.state.put(slot, basis, &device);
            }
        }
        let counters = [
            LAYOUT,
            record.steps as i64,
            record.refreshes as i64,
            record.refresh_failures as i64,
            record.refresh_since.map_or(0, |s| s as i64 + 1),
            record.refresh_period.map_or(0, |p| p as i64 + 1),
            record.non_finite_total as i64,
            record.skipped_steps as i64,
        ];
        let values: Vec<i64> = counters.into_iter().chain(ranks).collect();
        self.state.counters = int_param(values, &device);
        if bases {
            let overlap = record.refresh_last_overlap.unwrap_or(f64::NAN) as f32;
            self.state.overlap = Param::initialized(
                ParamId::new(),
                Tensor::from_data(TensorData::new(vec![overlap], [1]), &device),
            );
        }
        self.written = self.state.counters.id;
    }

    /// Restores the protection from [`SpfState`] when a record was loaded into it since this
    /// value last wrote it (a resumed run's first step).
    ///
    /// # Errors
    ///
    /// [`SpfError::RecordMismatch`] for a state of another layout or module, and what
    /// [`Protection::restore`] refuses.
    fn adopt_loaded_state(&mut self) -> Result<(), SpfError> {
        if self.state.counters.id == self.written {
            return Ok(());
        }
        let record = self.state.record(&self.protection)?;
        self.protection.restore(record)?;
        self.write_state(true);
        Ok(())
    }

    /// Steps `optim` through the protection, with the loaded state adopted first and the new
    /// state written after.
    fn projected(
        mut self,
        step: impl FnOnce(&mut Protection<S>, M) -> Result<M, spf_core::StepError<M>>,
    ) -> Self {
        if let Err(error) = self.adopt_loaded_state() {
            panic!("the SPF state in the loaded model does not fit: {error}");
        }
        let refreshes = self.protection.last_stats().refresh.count;
        let model = step(&mut self.protection, self.model)
            .unwrap_or_else(|refused| panic!("SPF step refused: {}", refused.error));
        self.model = model;
        let refreshed = self.protection.last_stats().refresh.count != refreshes;
        self.write_state(refreshed);
        self
    }
}

impl<M, S> TrainStep for Protected<M, S>
where
    M: TrainStep + Module,
    S: SafetyGradientSource<M> + Clone + Send + Sync + 'static,
{
    type Input = M::Input;
    type Output = M::Output;

    fn step(&self, item: Self::Input) -> TrainOutput<Self::Output> {
        self.model.step(item)
    }

    /// The model's own `optimize` is bypassed: SPF steps `optim` on the model's parameters.
    ///
    /// # Panics
    ///
    /// When the protection refuses the step (see [`Protection::try_step`]), or a loaded record's
    /// SPF state does not fit this model.
    fn optimize(
        self,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        grads: GradientsParams,
    ) -> Self {
        self.projected(|protection, model| protection.try_step(optim, lr, model, grads))
    }

    /// As [`Self::optimize`], on the gradients of several devices (burn-train's multi-device
    /// strategy), summed by burn before the projection.
    fn optimize_multi(
        self,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        grads: MultiGradientsParams,
    ) -> Self {
        self.projected(|protection, model| protection.try_step_multi(optim, lr, model, grads))
    }
}

impl<M, S> InferenceStep for Protected<M, S>
where
    M: InferenceStep + Module,
    S: Clone + Send + Sync + 'static,
{
    type Input = M::Input;
    type Output = M::Output;

    fn step(&self, item: Self::Input) -> Self::Output {
        self.model.step(item)
    }
}

/// The protection's state as module parameters, in a layout fixed by the protected module.
#[derive(Module, Debug)]
pub struct SpfState {
    /// Every float parameter's id (as `i64` bits), in the order of their module paths.
    ids: Param<Tensor<1, Int>>,
    /// The layout, the counters (see [`Protected::write_state`]) and each slot's rank (−1: no
    /// basis).
    counters: Param<Tensor<1, Int>>,
    /// The last refresh's mean overlap, NaN for none.
    overlap: Param<Tensor<1>>,
    /// One `U` per slot, padded with zero columns to the largest rank.
    u: Vec<Param<Tensor<2>>>,
    /// One `σ` per slot, padded with zeros.
    sigma: Vec<Param<Tensor<1>>>,
    /// One `V` per slot, padded with zero columns.
    v: Vec<Param<Tensor<2>>>,
}

impl SpfState {
    /// The layout for `protection`'s module, with no basis yet.
    fn layout<S>(protection: &Protection<S>, device: &Device) -> Self {
        let max_rank = protection.config().estimator.rank.max_rank();
        let (mut u, mut sigma, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for (_, target) in targeted(protection) {
            let [d_in, d_out] = target.view;
            let k = max_rank.min(d_in).min(d_out);
            u.push(zeros_param([d_in, k], device));
            sigma.push(Param::initialized(
                ParamId::new(),
                Tensor::zeros([k], device),
            ));
            v.push(zeros_param([d_out, k], device));
        }
        let ids = paths(protection)
            .into_iter()
            .map(|(id, _)| id.val() as i64)
            .collect();
        Self {
            ids: int_param(ids, device),
            counters: int_param(vec![LAYOUT], device),
            overlap: Param::initialized(ParamId::new(), Tensor::zeros([1], device)),
            u,
            sigma,
            v,
        }
    }

    /// Slot `slot`'s factors set to `basis`, padded to the slot's width.
    fn put(&mut self, slot: usize, basis: &LowRankBasis, device: &Device) {
        let width = self.sigma[slot].val().dims()[0];
        let pad = width - basis.rank();
        let padded = |t: Tensor<2>| {
            let rows = t.dims()[0];
            Tensor::cat(
                vec![t.to_device(device), Tensor::zeros([rows, pad], device)],
                1,
            )
        };
        self.u[slot] = Param::initialized(ParamId::new(), padded(basis.u().clone()));
        self.v[slot] = Param::initialized(ParamId::new(), padded(basis.v().clone()));
        let sigma = Tensor::cat(
            vec![
                basis.sigma().clone().to_device(device),
                Tensor::zeros([pad], device),
            ],
            0,
        );
        self.sigma[slot] = Param::initialized(ParamId::new(), sigma);
    }

    /// The record this state holds, for `protection`'s module (matched by path).
    fn record<S>(&self, protection: &Protection<S>) -> Result<SpfRecord, SpfError> {
        let mismatch = |reason: &str| SpfError::RecordMismatch {
            reason: format!("the SPF state in the model record: {reason}"),
        };
        let ints = |p: &Param<Tensor<1, Int>>| -> Vec<i64> {
            p.val()
                .into_data()
                .convert::<i64>()
                .try_into_vec()
                .unwrap_or_default()
        };
        let counters = ints(&self.counters);
        let slots = targeted(protection);
        if counters.first() != Some(&LAYOUT) || counters.len() != COUNTERS + slots.len() {
            return Err(mismatch("another layout"));
        }
        let saved_ids = ints(&self.ids);
        let paths = paths(protection);
        if saved_ids.len() != paths.len() {
            return Err(mismatch("another number of parameters"));
        }
        let params: Vec<ParamPath> = saved_ids
            .iter()
            .zip(&paths)
            .map(|(&id, (_, path))| ParamPath {
                param: id as u64,
                path: path.clone(),
            })
            .collect();
        let saved_id_of = |path: &str| {
            params
                .iter()
                .find(|p| p.path == path)
                .map(|p| p.param)
                .expect("every targeted path is a parameter path")
        };
        let mut bases = Vec::new();
        for (slot, (_, target)) in slots.iter().enumerate() {
            let rank = counters[COUNTERS + slot];
            if rank < 0 {
                continue;
            }
            let k = rank as usize;
            let [d_in, d_out] = target.view;
            if k > self.sigma[slot].val().dims()[0] {
                return Err(mismatch("a rank larger than its slot"));
            }
            bases.push(BasisRecord {
                param: saved_id_of(&target.path),
                u: self.u[slot].val().slice([0..d_in, 0..k]).into_data(),
                sigma: self.sigma[slot].val().slice(0..k).into_data(),
                v: self.v[slot].val().slice([0..d_out, 0..k]).into_data(),
            });
        }
        let optional = |value: i64| (value > 0).then(|| value as usize - 1);
        let overlap: Vec<f64> = (self
            .overlap
            .val()
            .into_data()
            .convert::<f64>()
            .try_into_vec())
        .unwrap_or_default();
        Ok(SpfRecord {
            version: RECORD_VERSION,
            inner: OptimizerRecord::default(),
            params,
            steps: counters[1] as usize,
            bases,
            refreshes: counters[2] as usize,
            refresh_failures: counters[3] as usize,
            refresh_since: optional(counters[4]),
            refresh_period: optional(counters[5]),
            refresh_last_overlap: overlap.first().copied().filter(|o| o.is_finite()),
            refresh_last_error: None,
            non_finite_total: counters[6] as usize,
            skipped_steps: counters[7] as usize,
        })
    }
}

/// The targeted parameters of `protection`'s module with their targets, in path order.
fn targeted<S>(protection: &Protection<S>) -> Vec<(ParamId, Target)> {
    let mut all: Vec<_> = protection
        .targets()
        .iter()
        .filter(|(_, t)| t.targeted)
        .map(|(id, t)| (*id, t.clone()))
        .collect();
    all.sort_by(|a, b| a.1.path.cmp(&b.1.path));
    all
}

/// Every float parameter of `protection`'s module with its path, in path order.
fn paths<S>(protection: &Protection<S>) -> Vec<(ParamId, String)> {
    let mut all: Vec<_> = protection
        .targets()
        .iter()
        .map(|(id, t)| (*id, t.path.to_string()))
        .collect();
    all.sort_by(|a, b| a.1.cmp(&b.1));
    all
}

/// `values` as a 64-bit integer parameter (a device's default integer type may be narrower, and
/// parameter ids take all 64 bits).
fn int_param(values: Vec<i64>, device: &Device) -> Param<Tensor<1, Int>> {
    let n = values.len();
    Param::initialized(
        ParamId::new(),
        Tensor::from_data(TensorData::new(values, [n]), (device, DType::I64)),
    )
}

fn zeros_param(shape: [usize; 2], device: &Device) -> Param<Tensor<2>> {
    Param::initialized(ParamId::new(), Tensor::zeros(shape, device))
}
