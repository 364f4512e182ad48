//! The passes of a step for weights trained through LoRA adapters: the factors' gradients (or
//! updates) projected against the basis of the weight they adapt (`projection/lora.rs`).
//!
//! burn visits a LoRA-adapted weight as its frozen base (the parameter that holds the basis,
//! without a gradient) and then the factors `A` and `B` (parameters of their own, with
//! gradients). [`Targets`] records which factors belong to which weight, so each pass reads the
//! factors by id and never needs the base's value or the adapter's scale (which cancels).

use std::collections::{HashMap, HashSet};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use spf_subspace::view::into_2d;
use spf_subspace::{Adapter, Targets};

use super::{Bases, ProjectionSet, UpdateReplacement, on_device};
use crate::error::SpfError;
use crate::projection::ProjectionMode;
use crate::projection::lora::{LoraFactors, LoraGrads, LoraMeasured, LoraPending, solve};
use crate::stats::TensorStats;

/// One protected adapted weight: its id (the base's, which holds the basis), its factors' ids,
/// and their values.
pub(crate) struct Adapted {
    weight: ParamId,
    adapter: Adapter,
    factors: LoraFactors,
}

/// The LoRA projections of a step, keyed by the adapted weight.
pub(crate) type LoraMeasuredSet = ProjectionSet<LoraMeasured>;

/// The values of every listed parameter (the factors, all 2-D), as tensors without autodiff.
struct FactorValues<'a> {
    wanted: &'a HashSet<ParamId>,
    found: HashMap<ParamId, Tensor<2>>,
}

impl ModuleVisitor for FactorValues<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.wanted.contains(&param.id) {
            self.found.insert(param.id, into_2d(param.val().inner()));
        }
    }
}

/// Every protected adapted weight of `module` that has a basis and whose factors have a
/// gradient in `grads` (all of them without `grads`), with its factors' current values, in a
/// fixed order (by id).
pub(crate) fn adapted<M: Module>(
    module: &M,
    targets: &Targets,
    bases: &Bases,
    grads: Option<&GradientsParams>,
) -> Vec<Adapted> {
    let has_grad = |id: ParamId| grads.is_none_or(|g| g.get::<2>(id).is_some());
    let mut weights: Vec<(ParamId, Adapter)> = targets
        .iter()
        .filter(|(id, t)| t.targeted && bases.contains(id))
        .filter_map(|(id, t)| t.adapter.map(|adapter| (*id, adapter)))
        .filter(|(_, adapter)| has_grad(adapter.a) || has_grad(adapter.b))
        .collect();
    if weights.is_empty() {
        return Vec::new();
    }
    weights.sort_by_key(|(id, _)| id.val());
    let wanted: HashSet<ParamId> = weights.iter().flat_map(|(_, a)| [a.a, a.b]).collect();
    let mut values = FactorValues {
        wanted: &wanted,
        found: HashMap::new(),
    };
    module.visit(&mut values);
    let mut found = values.found;
    weights
        .into_iter()
        .filter_map(|(weight, adapter)| {
            let factors = LoraFactors {
                a: found.remove(&adapter.a)?,
                b: found.remove(&adapter.b)?,
            };
            Some(Adapted {
                weight,
                adapter,
                factors,
            })
        })
        .collect()
}

/// The factors' gradients of `adapted` taken out of `grads`; a factor without one (the other has
/// one) counts as a zero gradient.
fn take_grads(grads: &mut GradientsParams, adapted: &Adapted) -> LoraGrads {
    let (a, b) = (adapted.adapter.a, adapted.adapter.b);
    let zeros = |t: &Tensor<2>| t.zeros_like();
    LoraGrads {
        a: grads
            .remove::<2>(a)
            .unwrap_or_else(|| zeros(&adapted.factors.a)),
        b: grads
            .remove::<2>(b)
            .unwrap_or_else(|| zeros(&adapted.factors.b)),
    }
}

/// Projects, in place, the factors' gradients of every protected adapted weight of `module`
/// that has a basis; with `measure`, keeps what their statistics need for one read. A subspace
/// mode reads once more, for its solve.
pub(crate) fn project_lora_gradients<M: Module>(
    module: &M,
    grads: &mut GradientsParams,
    targets: &Targets,
    bases: &Bases,
    mode: ProjectionMode,
    measure: bool,
) -> Result<LoraMeasuredSet, SpfError> {
    let mut started = Vec::new();
    let mut pending = Vec::new();
    for adapted in adapted(module, targets, bases, Some(grads)) {
        let lora_grads = take_grads(grads, &adapted);
        let basis = bases.get(&adapted.weight).expect("listed with its basis");
        let basis = on_device(basis, &lora_grads.a.device());
        pending.push(LoraPending::new(
            lora_grads,
            &adapted.factors,
            &basis,
            mode,
        )?);
        started.push(adapted);
    }
    solve(&mut pending)?;
    let mut entries = Vec::new();
    for (adapted, pending) in started.into_iter().zip(pending) {
        let (projected, measured) = pending.finish_measured(measure);
        grads.register(adapted.adapter.a, projected.a);
        grads.register(adapted.adapter.b, projected.b);
        entries.extend(measured.map(|m| (adapted.weight, m)));
    }
    Ok(ProjectionSet { entries })
}

/// The `Update` target for adapted weights: their factors before the inner optimizer's step.
pub(crate) struct LoraUpdates {
    before: Vec<Adapted>,
}

/// The projections of the factors' updates, started, and the factors before the step.
pub(crate) struct LoraPendingUpdates {
    before: Vec<Adapted>,
    pending: Vec<LoraPending>,
}

/// The factors of every protected adapted weight whose factors have a gradient, before the step.
pub(crate) fn snapshot_lora_updates<M: Module>(
    module: &M,
    grads: &GradientsParams,
    targets: &Targets,
    bases: &Bases,
) -> LoraUpdates {
    LoraUpdates {
        before: adapted(module, targets, bases, Some(grads)),
    }
}

impl LoraUpdates {
    /// Starts the projection of each snapshotted adapter's descent `(A_old − A_new,
    /// B_old − B_new)`, with the pulled-back directions taken at the factors before the step.
    pub(crate) fn prepare<M: Module>(
        self,
        module: &M,
        bases: &Bases,
        mode: ProjectionMode,
    ) -> Result<LoraPendingUpdates, SpfError> {
        let wanted: HashSet<ParamId> = (self.before.iter())
            .flat_map(|a| [a.adapter.a, a.adapter.b])
            .collect();
        let mut values = FactorValues {
            wanted: &wanted,
            found: HashMap::new(),
        };
        module.visit(&mut values);
        let mut pending = Vec::with_capacity(self.before.len());
        for adapted in &self.before {
            let (Some(a), Some(b)) = (
                values.found.get(&adapted.adapter.a),
                values.found.get(&adapted.adapter.b),
            ) else {
                return Err(SpfError::ModuleMismatch);
            };
            let descent = LoraGrads {
                a: adapted.factors.a.clone().to_device(&a.device()) - a.clone(),
                b: adapted.factors.b.clone().to_device(&b.device()) - b.clone(),
            };
            let basis = bases.get(&adapted.weight).expect("listed with its basis");
            let basis = on_device(basis, &descent.a.device());
            pending.push(LoraPending::new(descent, &adapted.factors, &basis, mode)?);
        }
        solve(&mut pending)?;
        Ok(LoraPendingUpdates {
            before: self.before,
            pending,
        })
    }
}

impl LoraPendingUpdates {
    /// Every projection's readout, in order, for one read.
    pub(crate) fn readouts(&self) -> Vec<Tensor<1>> {
        self.pending.iter().map(LoraPending::readout).collect()
    }

    /// Each projection's statistics, from the host copy of [`Self::readouts`].
    pub(crate) fn stats(&self, targets: &Targets, host: &[f64]) -> Vec<TensorStats> {
        let mut rest = host;
        (self.before.iter().zip(&self.pending))
            .map(|(adapted, pending)| {
                let (own, tail) = rest.split_at(pending.readout_len());
                rest = tail;
                super::tensor_stats(targets, adapted.weight, pending.stats(own))
            })
            .collect()
    }

    /// Sets each factor to its value before the step minus its projected descent; `stats`, when
    /// read, leaves the adapters from which nothing is removed as the inner optimizer made them.
    pub(crate) fn replace<M: Module>(self, module: M, stats: &[TensorStats]) -> M {
        let unchanged = |weight: ParamId| {
            stats
                .iter()
                .any(|t| t.param == weight && t.stats.removed == 0)
        };
        let mut replacement = UpdateReplacement {
            before: HashMap::new(),
            projected: HashMap::new(),
        };
        for (adapted, pending) in self.before.into_iter().zip(self.pending) {
            if unchanged(adapted.weight) {
                continue;
            }
            let projected = pending.finish(false);
            let Adapted {
                adapter, factors, ..
            } = adapted;
            replacement.before.insert(adapter.a, factors.a);
            replacement.before.insert(adapter.b, factors.b);
            replacement.projected.insert(adapter.a, projected.a);
            replacement.projected.insert(adapter.b, projected.b);
        }
        if replacement.before.is_empty() {
            return module;
        }
        module.map(&mut replacement)
    }
}
