//! [`SafetyProjectedOptimizer`]: any burn optimizer, with every step projected against the
//! safety bases.
//!
//! One step, with the [`Gradient`](ProjectionTarget::Gradient) target:
//!
//! ```text
//! [refresh due?] ─▶ safety source ─▶ SafetySubspace::estimate ─▶ new bases
//! grads ─▶ for each parameter with a basis: G (2-D view) ─▶ P(G) registered back ─▶ inner.step
//! ```
//!
//! With the [`Update`](ProjectionTarget::Update) target the inner optimizer steps on the raw
//! gradients first, and each protected parameter's update `ΔW` is then replaced by `−P(−ΔW)`.
//! Parameters without a basis, and those without a gradient, pass through bit for bit.

use std::panic::{AssertUnwindSafe, catch_unwind};

use burn::module::{Module, ParamId};
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{GradientsParams, ModuleOptimizer, MultiGradientsParams};
use spf_subspace::LowRankBasis;

use crate::bases::admit;
use crate::config::{NonFinitePolicy, ProjectionTarget, SpfConfig, StatsPolicy};
use crate::error::{LoadError, SpfError, StepError, panic_message};
use crate::host;
use crate::non_finite::ended;
use crate::record::SpfRecord;
use crate::refresh::{NoSafetySource, SafetyGradientSource};
use crate::state::State;
use crate::stats::{StatsFeed, StepStats};
use crate::visitors::{
    Probes, check_gradient_shapes, place_bases, prepare_gradients, prepare_updates,
    probe_gradients, project_gradients, reduce_gradients, replace_updates, snapshot_updates,
};

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
    source: S,
    state: State,
}

impl SpfConfig {
    /// Wraps `inner` (a burn optimizer, or a [`ModuleOptimizer`] with its groups) so that every
    /// step is projected against `bases`, one per targeted parameter of `module`. Targeted
    /// parameters without a basis, and all other parameters, pass through untouched.
    ///
    /// # Errors
    ///
    /// [`SpfError::Subspace`] for a bad filter regex; for a basis, [`SpfError::UnknownParam`],
    /// [`SpfError::UntargetedParam`] or [`SpfError::ShapeMismatch`] when it does not belong to a
    /// targeted parameter of `module` of the right shape.
    pub fn init<M: Module>(
        &self,
        inner: impl Into<ModuleOptimizer>,
        module: &M,
        bases: impl IntoIterator<Item = (ParamId, LowRankBasis)>,
    ) -> Result<SafetyProjectedOptimizer<NoSafetySource>, SpfError> {
        Ok(SafetyProjectedOptimizer {
            inner: inner.into(),
            source: NoSafetySource,
            state: State::new(self, module, bases)?,
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
            source,
            state: self.state,
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
        let max_rank = self.state.config.estimator.rank.max_rank();
        let admitted = admit(&self.state.targets, max_rank, bases)?;
        self.state.bases.extend(admitted);
        Ok(())
    }

    /// The basis of each protected parameter.
    pub fn bases(&self) -> &std::collections::HashMap<ParamId, LowRankBasis> {
        self.state.bases.as_map()
    }

    /// The configuration the wrapper was built with.
    pub fn config(&self) -> &SpfConfig {
        &self.state.config
    }

    /// The wrapped optimizer.
    pub fn inner(&self) -> &ModuleOptimizer {
        &self.inner
    }

    /// Optimizer steps taken, including those restored from a record.
    pub fn steps(&self) -> usize {
        self.state.steps
    }

    /// What the projection (and any refresh) did in the last step.
    pub fn last_stats(&self) -> &StepStats {
        &self.state.last_stats
    }

    /// A shared handle on [`Self::last_stats`] that follows this wrapper (and its clones) as it
    /// steps; see [`StatsFeed`].
    pub fn stats_feed(&self) -> StatsFeed {
        self.state.feed.clone()
    }

    /// What projecting `grads` at `module` would do, without stepping, refreshing or changing
    /// any state: the statistics a [`ProjectionTarget::Gradient`] step on them would publish,
    /// in the configured mode, whatever the configured target. [`crate::screen`] scores each
    /// training sample's own gradient with it.
    ///
    /// # Errors
    ///
    /// [`SpfError::ShapeMismatch`] naming the first parameter whose gradient in `grads` does not
    /// have the parameter's shape.
    pub fn measure<M: Module>(
        &self,
        module: &M,
        mut grads: GradientsParams,
    ) -> Result<StepStats, SpfError> {
        let state = &self.state;
        check_gradient_shapes(module, &grads, &state.targets)?;
        let set = prepare_gradients(module, &mut grads, &state.bases, state.config.mode)?;
        let tensors = set.stats(&state.targets, &host::read(set.readouts()));
        Ok(StepStats {
            tensors,
            refresh: state.refresh.stats(),
            non_finite: state.non_finite,
            host_reads: 1,
        })
    }

    /// The wrapper's state as a record: the inner optimizer's record, the bases, the step
    /// counter, the refresh state and the non-finite counts.
    pub fn to_record(&self) -> SpfRecord {
        self.state.to_record(self.inner.to_record())
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
        // Everything is checked before anything changes, so a refused record loses nothing.
        match self.state.restore(record) {
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

    /// [`Self::step`] that reports what it refuses instead of panicking: an invalid learning
    /// rate, a gradient that does not have its parameter's shape, and non-finite gradients under
    /// [`NonFinitePolicy::Error`]. The module comes back untouched in the error. These are found
    /// before anything changes: neither the bases nor the inner optimizer have changed (the
    /// non-finite counts in [`Self::last_stats`] have).
    ///
    /// # Errors
    ///
    /// [`SpfError::InvalidLearningRate`] for a NaN, infinite or negative `lr`;
    /// [`SpfError::ModuleMismatch`] when the wrapper has bases but the module none of their
    /// parameters; [`SpfError::ShapeMismatch`] naming the first parameter whose gradient is not
    /// of its shape; [`SpfError::NonFiniteGradient`] as above; [`SpfError::StepPanicked`] when
    /// the inner optimizer panics (on state that does not fit the module, from a corrupt record
    /// for example): the module comes back as it was, but the inner optimizer's state may be
    /// incomplete, so reload it before stepping again, and a refresh that was due has already
    /// run, so the bases are the refreshed ones.
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
        let lr = lr.into();
        if let Some(lr) = self.invalid_learning_rate(&lr) {
            let error = SpfError::InvalidLearningRate { lr };
            return Err(StepError { module, error });
        }
        if !self.state.bases.is_empty() && place_bases(&module, &mut self.state.bases) == 0 {
            let error = SpfError::ModuleMismatch;
            return Err(StepError { module, error });
        }
        if let Err(error) = check_gradient_shapes(&module, &grads, &self.state.targets) {
            return Err(StepError { module, error });
        }
        let reads = host::reads();
        self.state.non_finite.this_step = 0;
        let result = self.checked_step(lr, module, grads);
        self.state.last_stats.host_reads = host::reads() - reads;
        self.state.feed.publish(&self.state.last_stats);
        result
    }

    /// [`Self::try_step`] after its checks of the learning rate and the bases: the non-finite
    /// probe, the refresh, the projection and the inner step, with one read from the device
    /// outside a refresh under the default settings (see [`StepStats::host_reads`]).
    fn checked_step<M>(
        &mut self,
        lr: ModuleLearningRate,
        module: M,
        mut grads: GradientsParams,
    ) -> Result<M, StepError<M>>
    where
        M: Module,
        S: SafetyGradientSource<M>,
    {
        let config = &self.state.config;
        let read_stats = config.stats == StatsPolicy::EveryStep;
        let refresh_due = self.state.refresh.due(self.state.steps);
        // The probe shares the statistics' read, after the projection, when nothing has to
        // happen in between: no refresh (which must not run on a refused step), the Gradient
        // target (whose projection precedes the inner step), and a policy that needs only to
        // know (`ZeroNonFinite` needs the raw gradients, which the projection overwrites).
        let fold = read_stats
            && !refresh_due
            && config.target == ProjectionTarget::Gradient
            && matches!(
                config.non_finite,
                NonFinitePolicy::Error | NonFinitePolicy::SkipStep
            );
        let mut probes = (config.non_finite != NonFinitePolicy::Unchecked)
            .then(|| probe_gradients(&module, &grads));
        if !fold && let Some(probes) = probes.take() {
            let values = host::read(probes.values());
            if let Some(done) = self
                .state
                .on_non_finite(&probes, &values, &module, &mut grads)
            {
                return ended(done, module);
            }
        }

        let state = &mut self.state;
        state.refresh.counts.refreshed = false;
        if refresh_due {
            state.refresh.refresh(
                &state.config.refresh,
                &state.config.estimator,
                &state.targets,
                &mut state.bases,
                &mut self.source,
                &module,
                state.steps,
            );
        }
        let (bases, mode) = (&state.bases, state.config.mode);
        let tensors = match state.config.target {
            ProjectionTarget::Gradient => {
                let set = match project_gradients(&module, &mut grads, bases, mode, read_stats) {
                    Ok(set) => set,
                    Err(error) => return Err(StepError { module, error }),
                };
                let mut parts = probes.as_ref().map(Probes::values).unwrap_or_default();
                let probed = parts.len();
                parts.extend(set.readouts());
                let host = host::read(parts);
                let (probe_values, readouts) = host.split_at(probed);
                // The exact probe sees the projected gradients: a projection that turned finite
                // entries near f32::MAX into ±Inf refuses the step, as it should.
                if let Some(probes) = &probes
                    && let Some(done) =
                        self.state
                            .on_non_finite(probes, probe_values, &module, &mut grads)
                {
                    return ended(done, module);
                }
                Some(set.stats(&self.state.targets, readouts))
            }
            ProjectionTarget::Update => None,
        };
        // burn's optimizers panic on state that does not fit the module (a corrupt record, say):
        // hand the module back with an error instead. The clone shares the parameters' storage.
        let before = module.clone();
        let (state, inner) = (&self.state, &mut self.inner);
        let (bases, targets, mode) = (&state.bases, &*state.targets, state.config.mode);
        let stepped = catch_unwind(AssertUnwindSafe(|| match tensors {
            Some(tensors) => Ok((inner.step(lr.clone(), module, grads), tensors)),
            None => {
                let before = snapshot_updates(&module, &grads, bases);
                let module = inner.step(lr.clone(), module, grads);
                let set = prepare_updates(&module, &before, bases, mode)?;
                let tensors = if read_stats {
                    set.stats(targets, &host::read(set.readouts()))
                } else {
                    Vec::new()
                };
                Ok((replace_updates(module, before, set, &tensors), tensors))
            }
        }));
        match stepped {
            Ok(Ok((module, tensors))) => {
                self.state.publish(tensors);
                self.state.steps += 1;
                Ok(module)
            }
            Ok(Err(error)) => Err(StepError {
                module: before,
                error,
            }),
            Err(panic) => Err(StepError {
                module: before,
                error: SpfError::StepPanicked {
                    message: panic_message(&*panic).to_owned(),
                },
            }),
        }
    }
}

impl<S> SafetyProjectedOptimizer<S> {
    /// Refreshes the bases if the policy says so, projects, then lets the inner optimizer step
    /// (or the reverse, for the `Update` target); see [`Self::try_step`].
    ///
    /// # Panics
    ///
    /// With the message of the [`SpfError`] that `try_step` returns (an invalid learning rate, or
    /// non-finite gradients under [`NonFinitePolicy::Error`]), and if a gradient does not have the
    /// shape of its parameter, which burn's autodiff never produces.
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
        self.try_step(lr, module, grads)
            .unwrap_or_else(|err| panic!("SPF step refused: {}", err.error))
    }

    /// [`Self::try_step`] on gradients from several devices (burn-train's multi-device
    /// strategy): each parameter's gradients are summed on one device first, by burn's own
    /// reduction, and the projected step is taken on the sum. A device without some parameter's
    /// gradient (a branch its shard never took) adds nothing to it. To step on the mean rather
    /// than the sum, scale each device's loss by the inverse of their number.
    ///
    /// # Errors
    ///
    /// As [`Self::try_step`], and before anything changes: [`SpfError::MixedGradientTypes`] when
    /// one parameter's gradients are of two float types, [`SpfError::ForeignGradients`] when
    /// some belong to no parameter of `module`.
    pub fn try_step_multi<M>(
        &mut self,
        lr: impl Into<ModuleLearningRate>,
        module: M,
        mut grads: MultiGradientsParams,
    ) -> Result<M, StepError<M>>
    where
        M: Module,
        S: SafetyGradientSource<M>,
    {
        match reduce_gradients(&module, &mut grads) {
            Ok(reduced) => self.try_step(lr, module, reduced),
            Err(error) => Err(StepError { module, error }),
        }
    }

    /// The first learning rate of a parameter that is NaN, infinite or negative, if any.
    fn invalid_learning_rate(&self, lr: &ModuleLearningRate) -> Option<f64> {
        let base = std::iter::once(lr.base());
        let per_param = (self.state.targets.iter())
            .map(|(id, target)| lr.lr_from_param(*id, Some(&target.path)));
        base.chain(per_param)
            .find(|lr| !(lr.is_finite() && *lr >= 0.0))
    }
}

#[cfg(test)]
mod tests;
