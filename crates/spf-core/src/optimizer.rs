//! [`SafetyProjectedOptimizer`]: any burn optimizer and the [`Protection`] that projects its
//! every step against the safety bases.

use burn::module::{Module, ParamId};
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{GradientsParams, ModuleOptimizer, MultiGradientsParams};
use spf_subspace::LowRankBasis;

use crate::config::SpfConfig;
use crate::error::{LoadError, SpfError, StepError};
use crate::protection::Protection;
use crate::record::SpfRecord;
use crate::refresh::{NoSafetySource, SafetyGradientSource};
use crate::stats::{StatsFeed, StepStats};

/// Wraps a burn [`ModuleOptimizer`] so that each step removes the components that conflict with
/// the per-parameter safety bases; build it with [`SpfConfig::init`].
///
/// The inner optimizer is any of burn's: a bare per-tensor [`Optimizer`](burn::optim::Optimizer)
/// (`AdamWConfig::new().build()`, SGD, Adam, AdamW, Adagrad, RMSProp, Lion, Lamb, Adan,
/// Adafactor, Muon), or a [`ModuleOptimizer`] with parameter groups (`AdamWConfig::new().init()`,
/// `.with_group(..)`), whose groups keep their own optimizers, learning rates and clipping. Which
/// parameters SPF protects is the wrapper's own choice (its targets and bases), independent of
/// the groups.
///
/// # Example
///
/// ```
/// use burn::module::Module;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::optim::{GradientsParams, SgdConfig};
/// use burn::tensor::{Device, Tensor};
/// use spf_core::SpfConfig;
/// use spf_subspace::LowRankBasis;
///
/// let device = Device::default().autodiff();
/// let model: Linear = LinearConfig::new(2, 2).with_bias(false).init(&device);
/// // Protect the weight against one safety direction e_1 e_1ᵀ (bases live off the tape).
/// let plain = device.clone().inner();
/// let basis = LowRankBasis::new(
///     Tensor::from_floats([[1.0], [0.0]], &plain),
///     Tensor::from_floats([1.0], &plain),
///     Tensor::from_floats([[1.0], [0.0]], &plain),
/// )?;
/// let mut optim = SpfConfig::new().init(SgdConfig::new().build(), &model, [(model.weight.id, basis)])?;
///
/// let x = Tensor::<2>::from_floats([[1.0, 0.0]], &device);
/// let loss = model.forward(x).slice([0..1, 0..1]).sum(); // dL/dW = e_1 e_1ᵀ, so c_1 = 1 ≥ 0
/// let grads = GradientsParams::from_grads(loss.backward(), &model);
/// let model = optim.step(0.1, model, grads);
/// assert_eq!(optim.last_stats().conflicting(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct SafetyProjectedOptimizer<S = NoSafetySource> {
    inner: ModuleOptimizer,
    protection: Protection<S>,
}

impl SpfConfig {
    /// Wraps `inner` (a burn optimizer, or a [`ModuleOptimizer`] with its groups) so that every
    /// step is projected against `bases`, one per targeted parameter of `module`. Targeted
    /// parameters without a basis, and all other parameters, pass through untouched.
    ///
    /// A weight trained through burn's LoRA adapter (`apply_lora`, `apply_qlora`) is protected
    /// as the effective weight `W₀ + s·A B`: its basis is keyed by the weight's id, and each
    /// step projects its factors' gradients or updates
    /// ([`projection::lora`](crate::projection::lora)). A refresh makes the frozen base require
    /// a gradient for the safety source, so bases can also be left to the first step.
    ///
    /// # Errors
    ///
    /// [`SpfError::Subspace`] for a bad filter regex; for a basis,
    /// [`SpfError::UnknownParam`], [`SpfError::UntargetedParam`] or [`SpfError::ShapeMismatch`]
    /// when it does not belong to a targeted parameter of `module` of the right shape.
    pub fn init<M: Module>(
        &self,
        inner: impl Into<ModuleOptimizer>,
        module: &M,
        bases: impl IntoIterator<Item = (ParamId, LowRankBasis)>,
    ) -> Result<SafetyProjectedOptimizer<NoSafetySource>, SpfError> {
        Ok(SafetyProjectedOptimizer {
            inner: inner.into(),
            protection: self.protection(module, bases)?,
        })
    }
}

impl<S> SafetyProjectedOptimizer<S> {
    /// The same wrapper, refreshing its bases from `source` as the
    /// [`RefreshPolicy`](crate::RefreshPolicy) says. A closure returning the safety loss,
    /// `|model: &M| -> Tensor<1>`, is a source.
    pub fn with_safety_source<S2>(self, source: S2) -> SafetyProjectedOptimizer<S2> {
        SafetyProjectedOptimizer {
            inner: self.inner,
            protection: self.protection.with_safety_source(source),
        }
    }

    /// Adds or replaces the bases of the given parameters, keeping the others and the inner
    /// optimizer's state.
    ///
    /// # Errors
    ///
    /// As [`SpfConfig::init`]. On error no basis is changed.
    pub fn insert_bases(
        &mut self,
        bases: impl IntoIterator<Item = (ParamId, LowRankBasis)>,
    ) -> Result<(), SpfError> {
        self.protection.insert_bases(bases)
    }

    /// The basis of each protected parameter.
    pub fn bases(&self) -> &std::collections::HashMap<ParamId, LowRankBasis> {
        self.protection.bases()
    }

    /// The configuration the wrapper was built with.
    pub fn config(&self) -> &SpfConfig {
        self.protection.config()
    }

    /// The wrapped optimizer.
    pub fn inner(&self) -> &ModuleOptimizer {
        &self.inner
    }

    /// The protection: the bases, the refresh schedule, the statistics and the safety source.
    pub fn protection(&self) -> &Protection<S> {
        &self.protection
    }

    /// The wrapped optimizer and the protection, apart.
    pub fn into_parts(self) -> (ModuleOptimizer, Protection<S>) {
        (self.inner, self.protection)
    }

    /// Optimizer steps taken, including those restored from a record.
    pub fn steps(&self) -> usize {
        self.protection.steps()
    }

    /// What the projection (and any refresh) did in the last step.
    pub fn last_stats(&self) -> &StepStats {
        self.protection.last_stats()
    }

    /// A shared handle on [`Self::last_stats`] that follows this wrapper (and its clones) as it
    /// steps; see [`StatsFeed`].
    pub fn stats_feed(&self) -> StatsFeed {
        self.protection.stats_feed()
    }

    /// What projecting `grads` at `module` would do, without stepping, refreshing or changing
    /// any state; see [`Protection::measure`].
    ///
    /// # Errors
    ///
    /// As [`Protection::measure`].
    pub fn measure<M: Module>(
        &self,
        module: &M,
        grads: GradientsParams,
    ) -> Result<StepStats, SpfError> {
        self.protection.measure(module, grads)
    }

    /// The wrapper's state as a record: the inner optimizer's record, the bases, the step
    /// counter, the refresh state and the non-finite counts.
    pub fn to_record(&self) -> SpfRecord {
        self.protection.to_record(self.inner.to_record())
    }

    /// Restores a record saved by [`Self::to_record`], checking it against the module the
    /// wrapper was built for.
    ///
    /// The record may come from a wrapper built for another instance of the same architecture
    /// (same parameter paths and shapes, other ids), as when burn-train resumes from a checkpoint
    /// in a fresh process: the wrapper then adopts the saved ids, which the module takes on when
    /// its own record, saved with this one, is loaded. A step on a module that has none of those
    /// ids is refused with [`SpfError::ModuleMismatch`].
    ///
    /// The record restores the bases, the step counter, the refresh counts (the random state of
    /// the refresh sketches), the last refresh's overlap and error, and the non-finite counts.
    /// The *configuration* is the wrapper's own, not the record's: the refresh period follows
    /// the [`RefreshPolicy`](crate::RefreshPolicy) given at `init` (`Never` never refreshes,
    /// `Every(n)` refreshes every `n` steps from the last estimate, `Adaptive` resumes the saved
    /// period clamped to its bounds), so a run resumed under another policy obeys the new one.
    ///
    /// # Errors
    ///
    /// [`LoadError`], holding this wrapper unchanged (the inner optimizer's state included), with
    /// [`SpfError::UnsupportedRecordVersion`], [`SpfError::RecordMismatch`] when the record's
    /// parameter paths are not the module's, [`SpfError::InvalidBasis`] for factors that do not
    /// form a valid basis, or the errors of [`Self::insert_bases`] for a basis that does not fit
    /// its parameter. On success the bases in the record replace the current ones.
    pub fn try_load_record(mut self, record: SpfRecord) -> Result<Self, LoadError<Self>> {
        match self.protection.restore(record) {
            Ok(inner) => {
                self.inner = self.inner.load_record(inner);
                Ok(self)
            }
            Err(error) => Err(LoadError {
                optimizer: Box::new(self),
                error,
            }),
        }
    }

    /// [`Self::try_load_record`], panicking on a record that does not fit.
    ///
    /// # Panics
    ///
    /// With the message of the [`SpfError`] that [`Self::try_load_record`] returns.
    pub fn load_record(self, record: SpfRecord) -> Self {
        self.try_load_record(record)
            .unwrap_or_else(|err| panic!("cannot load SPF optimizer record: {}", err.error))
    }

    /// The projected step of the wrapped optimizer: [`Protection::try_step`] on it.
    ///
    /// # Errors
    ///
    /// As [`Protection::try_step`], with the module handed back untouched.
    pub fn try_step<M>(
        &mut self,
        lr: impl Into<ModuleLearningRate>,
        module: M,
        grads: GradientsParams,
    ) -> Result<M, StepError<M>>
    where
        M: Module,
        S: SafetyGradientSource<M>,
    {
        self.protection.try_step(&mut self.inner, lr, module, grads)
    }

    /// [`Self::try_step`], panicking on a refused step.
    ///
    /// # Panics
    ///
    /// As [`Protection::step`].
    pub fn step<M>(
        &mut self,
        lr: impl Into<ModuleLearningRate>,
        module: M,
        grads: GradientsParams,
    ) -> M
    where
        M: Module,
        S: SafetyGradientSource<M>,
    {
        self.protection.step(&mut self.inner, lr, module, grads)
    }

    /// [`Self::try_step`] on gradients from several devices (burn-train's multi-device
    /// strategy); see [`Protection::try_step_multi`].
    ///
    /// # Errors
    ///
    /// As [`Protection::try_step_multi`].
    pub fn try_step_multi<M>(
        &mut self,
        lr: impl Into<ModuleLearningRate>,
        module: M,
        grads: MultiGradientsParams,
    ) -> Result<M, StepError<M>>
    where
        M: Module,
        S: SafetyGradientSource<M>,
    {
        self.protection
            .try_step_multi(&mut self.inner, lr, module, grads)
    }
}

#[cfg(test)]
mod tests;
