//! [`Protection`]: SPF's state (the bases, the refresh schedule, the statistics) and the safety
//! source, and the projected step on any burn [`ModuleOptimizer`].
//!
//! One step, with the [`Gradient`](ProjectionTarget::Gradient) target:
//!
//! ```text
//! [refresh due?] ─▶ safety source ─▶ SafetySubspace::estimate ─▶ new bases
//! grads ─▶ for each parameter with a basis: G (2-D view) ─▶ P(G) registered back ─▶ optim.step
//! ```
//!
//! With the [`Update`](ProjectionTarget::Update) target the optimizer steps on the raw gradients
//! first, and each protected parameter's update `ΔW` is then replaced by `−P(−ΔW)`. Parameters
//! without a basis, and those without a gradient, pass through bit for bit.
//!
//! The optimizer is an argument, not a field: [`SafetyProjectedOptimizer`](crate::SafetyProjectedOptimizer)
//! owns one, and a burn-train `Learner` (which owns its own) hands its optimizer to the step.

use std::panic::{AssertUnwindSafe, catch_unwind};

use burn::module::{Module, ParamId};
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{GradientsParams, ModuleOptimizer, MultiGradientsParams, OptimizerRecord};
use spf_subspace::{LowRankBasis, Targets};

use crate::bases::admit;
use crate::config::{NonFinitePolicy, ProjectionTarget, SpfConfig, StatsPolicy};
use crate::error::{SpfError, StepError, panic_message};
use crate::host;
use crate::non_finite::ended;
use crate::record::SpfRecord;
use crate::refresh::{NoSafetySource, SafetyGradientSource};
use crate::state::State;
use crate::stats::{StatsFeed, StepStats};
use crate::visitors::lora::{project_lora_gradients, snapshot_lora_updates};
use crate::visitors::{
    Probes, check_gradient_shapes, place_bases, prepare_gradients, prepare_updates,
    probe_gradients, project_gradients, reduce_gradients, replace_updates, snapshot_updates,
};

/// SPF's state for one module and the safety source that refreshes it; its
/// [`try_step`](Self::try_step) projects any [`ModuleOptimizer`]'s step against the bases. Build
/// it with [`SpfConfig::protection`], or get it with the optimizer it wraps from
/// [`SpfConfig::init`].
#[derive(Clone)]
pub struct Protection<S = NoSafetySource> {
    source: S,
    state: State,
}

/// Shows the configuration and the progress only: the source need not be `Debug` (a closure is
/// not).
impl<S> std::fmt::Debug for Protection<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Protection")
            .field("config", &self.state.config)
            .field("steps", &self.state.steps)
            .field("bases", &self.state.bases.as_map().len())
            .finish_non_exhaustive()
    }
}

impl SpfConfig {
    /// The protection of `module` by `bases`, one per targeted parameter, for a
    /// [`ModuleOptimizer`] held elsewhere (a burn-train `Learner`'s). Targeted parameters
    /// without a basis, and all other parameters, pass through untouched.
    ///
    /// # Errors
    ///
    /// As [`SpfConfig::init`].
    pub fn protection<M: Module>(
        &self,
        module: &M,
        bases: impl IntoIterator<Item = (ParamId, LowRankBasis)>,
    ) -> Result<Protection<NoSafetySource>, SpfError> {
        Ok(Protection {
            source: NoSafetySource,
            state: State::new(self, module, bases)?,
        })
    }
}

impl<S> Protection<S> {
    /// The same protection, its safety source passed through `f` (to wrap it, say).
    pub fn map_source<S2>(self, f: impl FnOnce(S) -> S2) -> Protection<S2> {
        Protection {
            source: f(self.source),
            state: self.state,
        }
    }

    /// The same protection, refreshing its bases from `source` as the
    /// [`RefreshPolicy`](crate::RefreshPolicy) says. A closure returning the safety loss,
    /// `|model: &M| -> Tensor<1>`, is a source.
    pub fn with_safety_source<S2>(self, source: S2) -> Protection<S2> {
        Protection {
            source,
            state: self.state,
        }
    }

    /// Adds or replaces the bases of the given parameters, keeping the others.
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

    /// Every float parameter of the module, with its path and whether it is protected.
    pub fn targets(&self) -> &Targets {
        &self.state.targets
    }

    /// The configuration the protection was built with.
    pub fn config(&self) -> &SpfConfig {
        &self.state.config
    }

    /// Optimizer steps taken, including those restored from a record.
    pub fn steps(&self) -> usize {
        self.state.steps
    }

    /// What the projection (and any refresh) did in the last step.
    pub fn last_stats(&self) -> &StepStats {
        &self.state.last_stats
    }

    /// A shared handle on [`Self::last_stats`] that follows this protection (and its clones) as
    /// it steps; see [`StatsFeed`].
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

    /// The protection's state as a record, holding `inner`, the record of the optimizer it
    /// steps: the bases, the step counter, the refresh state and the non-finite counts.
    pub fn to_record(&self, inner: OptimizerRecord) -> SpfRecord {
        self.state.to_record(inner)
    }

    /// [`Self::to_record`] without the bases (`bases` empty): the step counter, the refresh
    /// state and the non-finite counts, without reading anything from the device.
    pub fn to_record_without_bases(&self, inner: OptimizerRecord) -> SpfRecord {
        self.state.to_record_without_bases(inner)
    }

    /// Restores a record saved by [`Self::to_record`], checking it against the module the
    /// protection was built for, and hands back the optimizer's record it holds (for the caller
    /// to load into that optimizer). Everything is checked before anything changes: on error
    /// the protection is as it was. See
    /// [`SafetyProjectedOptimizer::try_load_record`](crate::SafetyProjectedOptimizer::try_load_record)
    /// for what the record restores and how a fresh copy of the module adopts the saved ids.
    ///
    /// # Errors
    ///
    /// As [`SafetyProjectedOptimizer::try_load_record`](crate::SafetyProjectedOptimizer::try_load_record).
    pub fn restore(&mut self, record: SpfRecord) -> Result<OptimizerRecord, SpfError> {
        self.state.restore(record)
    }

    /// Steps `optim` on `grads`, projected against the bases, refreshing them first when the
    /// policy says so (or projecting the update, for the `Update` target). It reports what it
    /// refuses instead of panicking: an invalid learning rate, a gradient that does not have its
    /// parameter's shape, and non-finite gradients under [`NonFinitePolicy::Error`]. The module
    /// comes back untouched in the error. These are found before anything changes: neither the
    /// bases nor `optim` have changed (the non-finite counts in [`Self::last_stats`] have).
    ///
    /// # Errors
    ///
    /// [`SpfError::InvalidLearningRate`] for a NaN, infinite or negative `lr`;
    /// [`SpfError::ModuleMismatch`] when the protection has bases but the module none of their
    /// parameters; [`SpfError::ShapeMismatch`] naming the first parameter whose gradient is not
    /// of its shape; [`SpfError::NonFiniteGradient`] as above; [`SpfError::StepPanicked`] when
    /// `optim` panics (on state that does not fit the module, from a corrupt record for
    /// example): the module comes back as it was, but `optim`'s state may be incomplete, so
    /// reload it before stepping again, and a refresh that was due has already run, so the bases
    /// are the refreshed ones.
    pub fn try_step<M>(
        &mut self,
        optim: &mut ModuleOptimizer,
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
        let result = self.checked_step(optim, lr, module, grads);
        self.state.last_stats.host_reads = host::reads() - reads;
        self.state.feed.publish(&self.state.last_stats);
        result
    }

    /// [`Self::try_step`] after its checks of the learning rate and the bases: the non-finite
    /// probe, the refresh, the projection and the inner step, with one read from the device
    /// outside a refresh under the default settings (see [`StepStats::host_reads`]).
    fn checked_step<M>(
        &mut self,
        inner: &mut ModuleOptimizer,
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
        let (bases, mode, targets) = (&state.bases, state.config.mode, &*state.targets);
        let tensors = match state.config.target {
            ProjectionTarget::Gradient => {
                let projected = project_gradients(&module, &mut grads, bases, mode, read_stats)
                    .and_then(|set| {
                        let lora = project_lora_gradients(
                            &module, &mut grads, targets, bases, mode, read_stats,
                        )?;
                        Ok((set, lora))
                    });
                let (set, lora) = match projected {
                    Ok(sets) => sets,
                    Err(error) => return Err(StepError { module, error }),
                };
                let mut parts = probes.as_ref().map(Probes::values).unwrap_or_default();
                let probed = parts.len();
                parts.extend(set.readouts());
                parts.extend(lora.readouts());
                let host = host::read(parts);
                let (probe_values, readouts) = host.split_at(probed);
                let (readouts, lora_readouts) = readouts.split_at(set.numbers_to_read());
                // The exact probe sees the projected gradients: a projection that turned finite
                // entries near f32::MAX into ±Inf refuses the step, as it should.
                if let Some(probes) = &probes
                    && let Some(done) =
                        self.state
                            .on_non_finite(probes, probe_values, &module, &mut grads)
                {
                    return ended(done, module);
                }
                let mut tensors = set.stats(&self.state.targets, readouts);
                tensors.extend(lora.stats(&self.state.targets, lora_readouts));
                Some(tensors)
            }
            ProjectionTarget::Update => None,
        };
        // burn's optimizers panic on state that does not fit the module (a corrupt record, say):
        // hand the module back with an error instead. The clone shares the parameters' storage.
        let before = module.clone();
        let state = &self.state;
        let (bases, targets, mode) = (&state.bases, &*state.targets, state.config.mode);
        let stepped = catch_unwind(AssertUnwindSafe(|| match tensors {
            Some(tensors) => Ok((inner.step(lr.clone(), module, grads), tensors)),
            None => {
                let before = snapshot_updates(&module, &grads, bases);
                let lora = snapshot_lora_updates(&module, &grads, targets, bases);
                let module = inner.step(lr.clone(), module, grads);
                let set = prepare_updates(&module, &before, bases, mode)?;
                let lora = lora.prepare(&module, bases, mode)?;
                let (tensors, lora_tensors) = if read_stats {
                    let mut parts = set.readouts();
                    parts.extend(lora.readouts());
                    let host = host::read(parts);
                    let (own, rest) = host.split_at(set.numbers_to_read());
                    (set.stats(targets, own), lora.stats(targets, rest))
                } else {
                    (Vec::new(), Vec::new())
                };
                let module = replace_updates(module, before, set, &tensors);
                let module = lora.replace(module, &lora_tensors);
                let mut tensors = tensors;
                tensors.extend(lora_tensors);
                Ok((module, tensors))
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

impl<S> Protection<S> {
    /// [`Self::try_step`], panicking on a refused step.
    ///
    /// # Panics
    ///
    /// With the message of the [`SpfError`] that `try_step` returns (an invalid learning rate, or
    /// non-finite gradients under [`NonFinitePolicy::Error`]), and if a gradient does not have the
    /// shape of its parameter, which burn's autodiff never produces.
    pub fn step<M>(
        &mut self,
        optim: &mut ModuleOptimizer,
        lr: impl Into<ModuleLearningRate>,
        module: M,
        grads: GradientsParams,
    ) -> M
    where
        M: Module,
        S: SafetyGradientSource<M>,
    {
        self.try_step(optim, lr, module, grads)
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
        optim: &mut ModuleOptimizer,
        lr: impl Into<ModuleLearningRate>,
        module: M,
        mut grads: MultiGradientsParams,
    ) -> Result<M, StepError<M>>
    where
        M: Module,
        S: SafetyGradientSource<M>,
    {
        match reduce_gradients(&module, &mut grads) {
            Ok(reduced) => self.try_step(optim, lr, module, reduced),
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
