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

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use burn::module::{AutodiffModule, ParamId};
use burn::optim::{GradientsParams, LearningRate, MultiGradientsParams, Optimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use spf_subspace::{LowRankBasis, SafetySubspace, Targets, direction_overlap};

use crate::error::panic_message;
use crate::record::{BasisRecord, ParamPath, RECORD_VERSION, SpfRecord};
use crate::walk::{
    BasisPlacement, GradientProjection, GradientReduction, NonFiniteProbe, NonFiniteZeroing,
    UpdateProjection, UpdateSnapshot,
};
use crate::{
    NoSafetySource, NonFinitePolicy, NonFiniteStats, ProjectionTarget, RefreshStats,
    SafetyGradientSource, SpfConfig, SpfError, StatsFeed, StepStats, TensorStats,
};

/// A basis on the backend the gradients live on.
pub(crate) type InnerBasis<B> = LowRankBasis<<B as AutodiffBackend>::InnerBackend>;

/// The bases of the protected parameters.
pub(crate) type Bases<B> = HashMap<ParamId, InnerBasis<B>>;

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
pub struct SafetyProjectedOptimizer<O, B: AutodiffBackend, S = NoSafetySource> {
    inner: O,
    config: SpfConfig,
    targets: Arc<Targets>,
    bases: Bases<B>,
    source: S,
    steps: usize,
    /// The step at which the current bases were estimated (or a refresh last failed).
    refresh_since: Option<usize>,
    refresh: RefreshStats,
    non_finite: NonFiniteStats,
    last_stats: StepStats,
    feed: StatsFeed,
}

/// A step that did not happen, with the module handed back untouched.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct StepError<M> {
    /// The module as it was passed in.
    pub module: M,
    /// Why the step was refused.
    #[source]
    pub error: SpfError,
}

impl<O: Clone, B: AutodiffBackend, S: Clone> Clone for SafetyProjectedOptimizer<O, B, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: self.config.clone(),
            targets: self.targets.clone(),
            bases: self.bases.clone(),
            source: self.source.clone(),
            steps: self.steps,
            refresh_since: self.refresh_since,
            refresh: self.refresh.clone(),
            non_finite: self.non_finite,
            last_stats: self.last_stats.clone(),
            feed: self.feed.clone(),
        }
    }
}

impl<O, B: AutodiffBackend> SafetyProjectedOptimizer<O, B, NoSafetySource> {
    pub(crate) fn new<M: AutodiffModule<B>>(
        inner: O,
        module: &M,
        config: SpfConfig,
        bases: impl IntoIterator<Item = (ParamId, InnerBasis<B>)>,
    ) -> Result<Self, SpfError> {
        let estimator = &config.estimator;
        let targets = Targets::of(module, &estimator.filter, estimator.vector_policy)?;
        let refresh = RefreshStats {
            period: config.refresh.initial_period(),
            ..RefreshStats::default()
        };
        let mut optim = Self {
            inner,
            targets: Arc::new(targets),
            config,
            bases: HashMap::new(),
            source: NoSafetySource,
            steps: 0,
            refresh_since: None,
            refresh,
            non_finite: NonFiniteStats::default(),
            last_stats: StepStats::default(),
            feed: StatsFeed::default(),
        };
        optim.insert_bases(bases)?;
        if !optim.bases.is_empty() {
            optim.refresh_since = Some(0);
        }
        Ok(optim)
    }
}

impl<O, B: AutodiffBackend, S> SafetyProjectedOptimizer<O, B, S> {
    /// The same wrapper, refreshing its bases from `source` as the
    /// [`RefreshPolicy`](crate::RefreshPolicy) says. A closure returning the safety loss,
    /// `|model: &M| -> Tensor<B, 1>`, is a source.
    pub fn with_safety_source<S2>(self, source: S2) -> SafetyProjectedOptimizer<O, B, S2> {
        SafetyProjectedOptimizer {
            inner: self.inner,
            config: self.config,
            targets: self.targets,
            bases: self.bases,
            source,
            steps: self.steps,
            refresh_since: self.refresh_since,
            refresh: self.refresh,
            non_finite: self.non_finite,
            last_stats: self.last_stats,
            feed: self.feed,
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
        bases: impl IntoIterator<Item = (ParamId, InnerBasis<B>)>,
    ) -> Result<(), SpfError> {
        let admitted = self.admit(bases)?;
        self.bases.extend(admitted);
        Ok(())
    }

    /// Checks that each basis belongs to a targeted parameter of matching shape, and truncates
    /// it to the estimator's maximum rank.
    fn admit(
        &self,
        bases: impl IntoIterator<Item = (ParamId, InnerBasis<B>)>,
    ) -> Result<Vec<(ParamId, InnerBasis<B>)>, SpfError> {
        let max_rank = self.config.estimator.rank.max_rank();
        bases
            .into_iter()
            .map(|(id, basis)| {
                let target = self.targets.get(&id).ok_or(SpfError::UnknownParam { id })?;
                if !target.targeted {
                    return Err(SpfError::UntargetedParam {
                        path: target.path.to_string(),
                    });
                }
                let found = [basis.d_in(), basis.d_out()];
                if found != target.view {
                    return Err(SpfError::ShapeMismatch {
                        path: Some(target.path.to_string()),
                        expected: target.view.to_vec(),
                        found: found.to_vec(),
                    });
                }
                Ok((id, basis.truncate(max_rank)))
            })
            .collect()
    }

    /// The basis of each protected parameter.
    pub fn bases(&self) -> &Bases<B> {
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

    /// What the projection (and any refresh) did in the last step.
    pub fn last_stats(&self) -> &StepStats {
        &self.last_stats
    }

    /// A shared handle on [`Self::last_stats`] that follows this wrapper (and its clones) as it
    /// steps; see [`StatsFeed`].
    pub fn stats_feed(&self) -> StatsFeed {
        self.feed.clone()
    }

    /// Records the statistics of the step just taken (or refused).
    fn publish(&mut self, stats: StepStats) {
        self.feed.publish(&stats);
        self.last_stats = stats;
    }

    /// Restores a record saved by [`Optimizer::to_record`], checking it against the module the
    /// wrapper was built for.
    ///
    /// The record may come from a wrapper built for another instance of the same architecture
    /// (same parameter paths and shapes, other ids), as when burn-train resumes from a checkpoint
    /// in a fresh process: the wrapper then adopts the saved ids, which the module takes on when
    /// its own record, saved with this one, is loaded. A step on a module that has none of those
    /// ids is refused with [`SpfError::ModuleMismatch`].
    ///
    /// # Errors
    ///
    /// [`SpfError::UnsupportedRecordVersion`], [`SpfError::RecordMismatch`] when the record's
    /// parameter paths are not the module's, [`SpfError::InvalidBasis`] for factors that do not
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
        if let Some(targets) = rekeyed(&self.targets, &record.params)? {
            self.targets = Arc::new(targets);
        }
        self.bases = self.admit_saved(record.bases)?.into_iter().collect();
        self.steps = record.steps;
        self.refresh_since = record.refresh_since;
        self.refresh = RefreshStats {
            count: record.refreshes,
            failures: record.refresh_failures,
            period: record.refresh_period,
            ..RefreshStats::default()
        };
        self.inner = self.inner.load_record(record.inner);
        Ok(self)
    }

    /// The bases of a record, checked and admitted against the current targets.
    fn admit_saved(
        &self,
        saved: Vec<BasisRecord<B>>,
    ) -> Result<Vec<(ParamId, InnerBasis<B>)>, SpfError> {
        let mut bases = Vec::with_capacity(saved.len());
        for saved in saved {
            let id = ParamId::from(saved.param);
            let path = self.targets.get(&id).map(|t| t.path.to_string());
            let basis = LowRankBasis::new(saved.u.inner(), saved.sigma.inner(), saved.v.inner())
                .map_err(|source| SpfError::InvalidBasis { path, source })?;
            bases.push((id, basis));
        }
        self.admit(bases)
    }

    fn refresh_due(&self) -> bool {
        match (self.refresh.period, self.refresh_since) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(period), Some(since)) => self.steps.saturating_sub(since) >= period,
        }
    }

    /// Re-estimates the bases at `module`; on failure keeps the old ones and counts it.
    fn refresh<M>(&mut self, module: &M)
    where
        M: AutodiffModule<B>,
        S: SafetyGradientSource<M, B>,
    {
        let start = Instant::now();
        // The t-th refresh draws its sketches from seed + t: the counter is the random state.
        let mut estimator = self.config.estimator.clone();
        estimator.sketch.seed = estimator
            .sketch
            .seed
            .wrapping_add(self.refresh.count as u64);
        // A panicking source counts as a failed refresh: training goes on with the old bases.
        let source = &mut self.source;
        let gradients = catch_unwind(AssertUnwindSafe(|| source.safety_gradients(module)))
            .unwrap_or_else(|panic| Err(format!("it panicked: {}", panic_message(&*panic)).into()));
        let estimated = gradients
            .map_err(|err| SpfError::SafetySource(err.to_string()))
            .and_then(|grads| Ok(SafetySubspace::estimate(module, &grads, &estimator)?))
            .and_then(|subspace| self.admit(subspace));
        self.refresh_since = Some(self.steps);
        match estimated {
            Ok(bases) => {
                let overlaps: Vec<f64> = bases
                    .iter()
                    .filter_map(|(id, new)| {
                        let old = self.bases.get(id)?;
                        (old.rank() > 0 && new.rank() > 0).then(|| direction_overlap(old, new))
                    })
                    .collect();
                let overlap = (!overlaps.is_empty())
                    .then(|| overlaps.iter().sum::<f64>() / overlaps.len() as f64);
                self.bases.extend(bases);
                self.refresh.refreshed = true;
                self.refresh.count += 1;
                self.refresh.last_overlap = overlap;
                self.refresh.period = self
                    .refresh
                    .period
                    .map(|period| self.config.refresh.next_period(period, overlap));
            }
            Err(err) => {
                self.refresh.failures += 1;
                self.refresh.last_error = Some(err.to_string());
            }
        }
        self.refresh.time += start.elapsed();
    }

    /// The statistics of a step that projected `tensors`.
    fn stats(&self, tensors: Vec<TensorStats>) -> StepStats {
        StepStats {
            tensors,
            refresh: self.refresh.clone(),
            non_finite: self.non_finite,
        }
    }

    fn project_gradients<M: AutodiffModule<B>>(
        &self,
        module: &M,
        grads: &mut GradientsParams,
    ) -> Vec<TensorStats> {
        let mut pass = GradientProjection::<B> {
            grads,
            bases: &self.bases,
            targets: &self.targets,
            mode: self.config.mode,
            stats: Vec::new(),
        };
        module.visit(&mut pass);
        pass.stats
    }

    fn step_update<M, F>(
        &mut self,
        module: M,
        grads: GradientsParams,
        inner_step: F,
    ) -> (M, Vec<TensorStats>)
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
            targets: &self.targets,
            mode: self.config.mode,
            stats: Vec::new(),
        };
        (module.map(&mut pass), pass.stats)
    }

    /// The parameters whose gradient holds NaN or ±Inf: one device read of every gradient's sum,
    /// and a second, exact one of those whose sum is not finite.
    fn non_finite_gradients<M: AutodiffModule<B>>(
        &self,
        module: &M,
        grads: &GradientsParams,
    ) -> Vec<ParamId> {
        let probe = |only: Option<&[ParamId]>| {
            let mut probe = NonFiniteProbe::<B> {
                grads,
                only,
                probes: Vec::new(),
            };
            module.visit(&mut probe);
            if probe.probes.is_empty() {
                return Vec::new();
            }
            let (ids, probes): (Vec<ParamId>, Vec<_>) = probe.probes.into_iter().unzip();
            let values = Tensor::cat(probes, 0).into_data();
            ids.into_iter()
                .zip(values.iter::<f64>())
                .filter_map(|(id, probe)| (!probe.is_finite()).then_some(id))
                .collect::<Vec<_>>()
        };
        let suspects = probe(None);
        if suspects.is_empty() {
            return suspects;
        }
        probe(Some(&suspects))
    }

    /// [`Optimizer::step`] that reports what it refuses instead of panicking: an invalid learning
    /// rate, and non-finite gradients under [`NonFinitePolicy::Error`]. The module comes back
    /// untouched in the error, and neither the bases nor the inner optimizer have changed (the
    /// non-finite counts in [`Self::last_stats`] have).
    ///
    /// # Errors
    ///
    /// [`SpfError::InvalidLearningRate`] for a NaN, infinite or negative `lr`;
    /// [`SpfError::ModuleMismatch`] when the wrapper has bases but the module none of their
    /// parameters; [`SpfError::NonFiniteGradient`] as above; [`SpfError::StepPanicked`] when the
    /// inner optimizer panics (on state that does not fit the module, from a corrupt record for
    /// example): the module comes back as it was, but the inner optimizer's state may be
    /// incomplete, so reload it before stepping again.
    pub fn try_step<M>(
        &mut self,
        lr: LearningRate,
        module: M,
        mut grads: GradientsParams,
    ) -> Result<M, StepError<M>>
    where
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
        S: SafetyGradientSource<M, B>,
    {
        if !(lr.is_finite() && lr >= 0.0) {
            let error = SpfError::InvalidLearningRate { lr };
            return Err(StepError { module, error });
        }
        if !self.bases.is_empty() {
            let mut placement = BasisPlacement::<B> {
                bases: &mut self.bases,
                found: 0,
            };
            module.visit(&mut placement);
            if placement.found == 0 {
                let error = SpfError::ModuleMismatch;
                return Err(StepError { module, error });
            }
        }
        let bad = self.non_finite_gradients(&module, &grads);
        self.non_finite.this_step = bad.len();
        self.non_finite.total += bad.len();
        if !bad.is_empty() {
            self.refresh.refreshed = false;
            match self.config.non_finite {
                NonFinitePolicy::Error => {
                    self.publish(self.stats(Vec::new()));
                    let paths = bad
                        .iter()
                        .map(|id| {
                            self.targets
                                .get(id)
                                .map_or_else(|| id.to_string(), |t| t.path.to_string())
                        })
                        .collect();
                    let error = SpfError::NonFiniteGradient { paths };
                    return Err(StepError { module, error });
                }
                NonFinitePolicy::SkipStep => {
                    self.non_finite.skipped_steps += 1;
                    self.publish(self.stats(Vec::new()));
                    return Ok(module);
                }
                NonFinitePolicy::ZeroNonFinite => {
                    module.visit(&mut NonFiniteZeroing {
                        grads: &mut grads,
                        ids: &bad,
                    });
                }
            }
        }

        self.refresh.refreshed = false;
        if self.refresh_due() {
            self.refresh(&module);
        }
        // burn's optimizers panic on state that does not fit the module (a corrupt record, say):
        // hand the module back with an error instead. The clone shares the parameters' storage.
        let before = module.clone();
        let stepped = catch_unwind(AssertUnwindSafe(|| match self.config.target {
            ProjectionTarget::Gradient => {
                let tensors = self.project_gradients(&module, &mut grads);
                (self.inner.step(lr, module, grads), tensors)
            }
            ProjectionTarget::Update => {
                self.step_update(module, grads, |inner, m, g| inner.step(lr, m, g))
            }
        }));
        match stepped {
            Ok((module, tensors)) => {
                self.publish(self.stats(tensors));
                self.steps += 1;
                Ok(module)
            }
            Err(panic) => Err(StepError {
                module: before,
                error: SpfError::StepPanicked {
                    message: panic_message(&*panic).to_owned(),
                },
            }),
        }
    }
}

impl<O, M, B, S> Optimizer<M, B> for SafetyProjectedOptimizer<O, B, S>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
    S: SafetyGradientSource<M, B>,
{
    type Record = SpfRecord<O::Record, B>;

    /// Refreshes the bases if the policy says so, projects, then lets the inner optimizer step
    /// (or the reverse, for the `Update` target); see
    /// [`SafetyProjectedOptimizer::try_step`].
    ///
    /// # Panics
    ///
    /// With the message of the [`SpfError`] that `try_step` returns (an invalid learning rate, or
    /// non-finite gradients under [`NonFinitePolicy::Error`]), and if a gradient does not have the
    /// shape of its parameter, which burn's autodiff never produces.
    fn step(&mut self, lr: LearningRate, module: M, grads: GradientsParams) -> M {
        self.try_step(lr, module, grads)
            .unwrap_or_else(|err| panic!("SPF step refused: {}", err.error))
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
        let mut params: Vec<_> = self
            .targets
            .iter()
            .map(|(id, target)| ParamPath {
                param: id.val(),
                path: target.path.to_string(),
            })
            .collect();
        params.sort_by_key(|p| p.param);
        SpfRecord {
            version: RECORD_VERSION,
            inner: self.inner.to_record(),
            params,
            steps: self.steps,
            bases,
            refreshes: self.refresh.count,
            refresh_failures: self.refresh.failures,
            refresh_since: self.refresh_since,
            refresh_period: self.refresh.period,
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

/// `targets` keyed by the ids of a record's `saved` parameters, matched by module path, or `None`
/// when the ids already agree. A module built afresh has new parameter ids; once its own record is
/// loaded it takes on the saved ones, so the wrapper adopts them too.
fn rekeyed(targets: &Targets, saved: &[ParamPath]) -> Result<Option<Targets>, SpfError> {
    let agree = saved.iter().all(|p| {
        targets
            .get(&ParamId::from(p.param))
            .is_some_and(|t| *t.path == *p.path)
    });
    if agree && saved.len() == targets.iter().count() {
        return Ok(None);
    }
    let by_path: HashMap<&str, u64> = saved.iter().map(|p| (p.path.as_str(), p.param)).collect();
    let mismatch = |reason: String| SpfError::RecordMismatch { reason };
    if by_path.len() != saved.len() {
        return Err(mismatch("two saved parameters share a path".into()));
    }
    let rekeyed: Targets = targets
        .iter()
        .map(|(_, target)| match by_path.get(&*target.path) {
            Some(&id) => Ok((ParamId::from(id), target.clone())),
            None => Err(mismatch(format!(
                "the module's parameter `{}` is not in the record",
                target.path
            ))),
        })
        .collect::<Result<_, _>>()?;
    if let Some(extra) = saved.iter().find(|p| {
        rekeyed
            .get(&ParamId::from(p.param))
            .is_none_or(|t| *t.path != *p.path)
    }) {
        return Err(mismatch(format!(
            "the record's parameter `{}` is not in the module",
            extra.path
        )));
    }
    Ok(Some(rekeyed))
}

#[cfg(test)]
mod tests;
