//! [`SafetyProjectedOptimizer`]: any burn optimizer, with every step projected against the
//! safety bases.
//!
//! One step, with the [`Gradient`](ProjectionTarget::Gradient) target:
//!
//! ```text
//! grads ─▶ for each parameter with a basis: G (2-D view) ─▶ P(G) registered back ─▶ inner.step
//! ```
//!
//! With the [`Update`](ProjectionTarget::Update) target the inner optimizer steps on the raw
//! gradients first, and each protected parameter's update `ΔW` is then replaced by `−P(−ΔW)`.
//! Parameters without a basis, and those without a gradient, pass through bit for bit.

use std::collections::HashMap;
use std::sync::Arc;

use burn::module::{AutodiffModule, ParamId};
use burn::optim::{GradientsParams, LearningRate, MultiGradientsParams, Optimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use spf_subspace::LowRankBasis;

use crate::inventory::Inventory;
use crate::record::{BasisRecord, RECORD_VERSION, SpfRecord};
use crate::walk::{GradientProjection, GradientReduction, UpdateProjection, UpdateSnapshot};
use crate::{ProjectionTarget, SpfConfig, SpfError, StepStats};

/// Wraps the optimizer `O` so that each step removes the components that conflict with the
/// per-parameter safety bases; build it with [`SpfConfig::init`].
///
/// It implements burn's [`Optimizer`] for every module `M` that `O` does, so it drops into a
/// hand-written loop or burn-train's `Learner` unchanged.
///
/// # Example
///
/// ```
/// use burn::backend::{Autodiff, NdArray};
/// use burn::module::Module;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::optim::{GradientsParams, Optimizer, SgdConfig};
/// use burn::tensor::Tensor;
/// use spf_core::SpfConfig;
/// use spf_subspace::LowRankBasis;
///
/// type B = Autodiff<NdArray>;
/// let device = Default::default();
/// let model: Linear<B> = LinearConfig::new(2, 2).with_bias(false).init(&device);
/// // Protect the weight against one safety direction e_1 e_1ᵀ.
/// let basis = LowRankBasis::new(
///     Tensor::from_floats([[1.0], [0.0]], &device),
///     Tensor::from_floats([1.0], &device),
///     Tensor::from_floats([[1.0], [0.0]], &device),
/// )?;
/// let mut optim = SpfConfig::new().init(SgdConfig::new().init(), &model, [(model.weight.id, basis)])?;
///
/// let x = Tensor::<B, 2>::from_floats([[1.0, 0.0]], &device);
/// let loss = model.forward(x).slice([0..1, 0..1]).sum(); // dL/dW = e_1 e_1ᵀ, so c_1 = 1 ≥ 0
/// let grads = GradientsParams::from_grads(loss.backward(), &model);
/// let model = optim.step(0.1, model, grads);
/// assert_eq!(optim.last_stats().conflicting(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SafetyProjectedOptimizer<O, B: AutodiffBackend> {
    inner: O,
    config: SpfConfig,
    inventory: Arc<Inventory>,
    bases: HashMap<ParamId, LowRankBasis<B::InnerBackend>>,
    steps: usize,
    last_stats: StepStats,
}

impl<O: Clone, B: AutodiffBackend> Clone for SafetyProjectedOptimizer<O, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: self.config.clone(),
            inventory: self.inventory.clone(),
            bases: self.bases.clone(),
            steps: self.steps,
            last_stats: self.last_stats.clone(),
        }
    }
}

impl<O, B: AutodiffBackend> SafetyProjectedOptimizer<O, B> {
    pub(crate) fn new<M: AutodiffModule<B>>(
        inner: O,
        module: &M,
        config: SpfConfig,
        bases: impl IntoIterator<Item = (ParamId, LowRankBasis<B::InnerBackend>)>,
    ) -> Result<Self, SpfError> {
        let mut optim = Self {
            inner,
            inventory: Arc::new(Inventory::of(module, &config)?),
            config,
            bases: HashMap::new(),
            steps: 0,
            last_stats: StepStats::default(),
        };
        optim.insert_bases(bases)?;
        Ok(optim)
    }

    /// Adds or replaces the bases of the given parameters, keeping the others and the inner
    /// optimizer's state. This is how a subspace re-estimated during training comes in.
    ///
    /// # Errors
    ///
    /// As [`SpfConfig::init`]. On error no basis is changed.
    pub fn insert_bases(
        &mut self,
        bases: impl IntoIterator<Item = (ParamId, LowRankBasis<B::InnerBackend>)>,
    ) -> Result<(), SpfError> {
        let admitted = bases
            .into_iter()
            .map(|(id, basis)| Ok((id, self.inventory.admit(id, basis, self.config.rank)?)))
            .collect::<Result<Vec<_>, SpfError>>()?;
        self.bases.extend(admitted);
        Ok(())
    }

    /// The basis of each protected parameter.
    pub fn bases(&self) -> &HashMap<ParamId, LowRankBasis<B::InnerBackend>> {
        &self.bases
    }

    /// The configuration the wrapper was built with.
    pub fn config(&self) -> &SpfConfig {
        &self.config
    }

    /// The wrapped optimizer.
    pub fn inner(&self) -> &O {
        &self.inner
    }

    /// Optimizer steps taken, including those restored from a record.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// What the projection did in the last step.
    pub fn last_stats(&self) -> &StepStats {
        &self.last_stats
    }

    /// Restores a record saved by [`Optimizer::to_record`], checking it against the module the
    /// wrapper was built for.
    ///
    /// # Errors
    ///
    /// [`SpfError::UnsupportedRecordVersion`], [`SpfError::InvalidBasis`] for factors that do not
    /// form a valid basis, and the errors of [`Self::insert_bases`] for a basis that does not fit
    /// its parameter. The bases in the record replace the current ones.
    pub fn try_load_record<M>(
        mut self,
        record: SpfRecord<<O as Optimizer<M, B>>::Record, B>,
    ) -> Result<Self, SpfError>
    where
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        if record.version != RECORD_VERSION {
            return Err(SpfError::UnsupportedRecordVersion {
                found: record.version,
                supported: RECORD_VERSION,
            });
        }
        let mut bases = HashMap::with_capacity(record.bases.len());
        for saved in record.bases {
            let id = ParamId::from(saved.param);
            let path = self.inventory.get(&id).map(|info| info.path.to_string());
            let basis = LowRankBasis::new(saved.u.inner(), saved.sigma.inner(), saved.v.inner())
                .map_err(|source| SpfError::InvalidBasis { path, source })?;
            bases.insert(id, self.inventory.admit(id, basis, self.config.rank)?);
        }
        self.bases = bases;
        self.steps = record.steps;
        self.inner = self.inner.load_record(record.inner);
        Ok(self)
    }
}

impl<O, B: AutodiffBackend> SafetyProjectedOptimizer<O, B> {
    fn project_gradients<M: AutodiffModule<B>>(&mut self, module: &M, grads: &mut GradientsParams) {
        let mut pass = GradientProjection::<B> {
            grads,
            bases: &self.bases,
            inventory: &self.inventory,
            mode: self.config.mode,
            stats: Vec::new(),
        };
        module.visit(&mut pass);
        self.last_stats = StepStats {
            tensors: pass.stats,
        };
    }

    fn step_update<M, F>(&mut self, module: M, grads: GradientsParams, inner_step: F) -> M
    where
        M: AutodiffModule<B>,
        F: FnOnce(&mut O, M, GradientsParams) -> M,
    {
        let mut snapshot = UpdateSnapshot::<B> {
            grads: &grads,
            bases: &self.bases,
            before: HashMap::new(),
        };
        module.visit(&mut snapshot);
        let before = snapshot.before;
        let module = inner_step(&mut self.inner, module, grads);
        let mut pass = UpdateProjection::<B> {
            before,
            bases: &self.bases,
            inventory: &self.inventory,
            mode: self.config.mode,
            stats: Vec::new(),
        };
        let module = module.map(&mut pass);
        self.last_stats = StepStats {
            tensors: pass.stats,
        };
        module
    }
}

impl<O, M, B> Optimizer<M, B> for SafetyProjectedOptimizer<O, B>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    type Record = SpfRecord<O::Record, B>;

    /// Projects, then lets the inner optimizer step (or the reverse, for the `Update` target).
    ///
    /// # Panics
    ///
    /// If a gradient does not have the shape of the parameter it belongs to, which burn's
    /// autodiff never produces.
    fn step(&mut self, lr: LearningRate, module: M, mut grads: GradientsParams) -> M {
        self.steps += 1;
        match self.config.target {
            ProjectionTarget::Gradient => {
                self.project_gradients(&module, &mut grads);
                self.inner.step(lr, module, grads)
            }
            ProjectionTarget::Update => {
                self.step_update(module, grads, |inner, m, g| inner.step(lr, m, g))
            }
        }
    }

    /// Sums each parameter's gradients over the devices first (burn's own reduction), then steps
    /// as [`Optimizer::step`] on the sum, so every replica applies the same projected update.
    fn step_multi(&mut self, lr: LearningRate, module: M, mut grads: MultiGradientsParams) -> M {
        let mut reduction = GradientReduction {
            multi: &mut grads,
            reduced: GradientsParams::new(),
        };
        module.visit(&mut reduction);
        let reduced = reduction.reduced;
        Optimizer::<M, B>::step(self, lr, module, reduced)
    }

    fn to_record(&self) -> Self::Record {
        let mut bases: Vec<_> = self
            .bases
            .iter()
            .map(|(id, basis)| {
                let (u, sigma, v) = basis.clone().into_parts();
                BasisRecord {
                    param: id.val(),
                    u: Tensor::from_inner(u),
                    sigma: Tensor::from_inner(sigma),
                    v: Tensor::from_inner(v),
                }
            })
            .collect();
        bases.sort_by_key(|basis| basis.param);
        SpfRecord {
            version: RECORD_VERSION,
            inner: self.inner.to_record(),
            steps: self.steps,
            bases,
        }
    }

    /// # Panics
    ///
    /// With the message of the [`SpfError`] that [`SafetyProjectedOptimizer::try_load_record`]
    /// returns, when the record does not fit the module the wrapper was built for.
    fn load_record(self, record: Self::Record) -> Self {
        self.try_load_record::<M>(record)
            .unwrap_or_else(|err| panic!("cannot load SPF optimizer record: {err}"))
    }
}

#[cfg(test)]
mod tests;
