//! The passes over a module that one wrapped step makes, as burn's module visitors and mappers.
//! `GradientsParams` cannot list its ids, and reading a gradient needs its rank as a constant,
//! so every pass walks the module with a `ModuleVisitor` (or `ModuleMapper`), which supplies
//! both. The functions at the end run the passes the step is made of.

use std::borrow::Cow;
use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, MultiGradientsParams};
use burn::tensor::{
    Tensor,
    backend::{AutodiffBackend, Backend},
};
use spf_subspace::view::{from_2d, into_2d};
use spf_subspace::{LowRankBasis, Targets};

use crate::bases::ProtectedBases;
use crate::projection::{ProjectionMode, ProjectionStats, project};
use crate::stats::TensorStats;

/// The bases of a wrapper over the autodiff backend `B`.
type Bases<B> = ProtectedBases<<B as AutodiffBackend>::InnerBackend>;

/// Projects, in place, every gradient in `grads` that has a basis.
struct GradientProjection<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    bases: &'a Bases<B>,
    targets: &'a Targets,
    mode: ProjectionMode,
    stats: Vec<TensorStats>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradientProjection<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(basis) = self.bases.get(&param.id) else {
            return;
        };
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
            return;
        };
        let dims = grad.dims();
        let basis = on_device(basis, &grad.device());
        let projected = project(into_2d(grad), &basis, mode_for::<D>(self.mode))
            .unwrap_or_else(|err| panic!("gradient of parameter {} does not fit: {err}", param.id));
        self.grads.register(param.id, from_2d(projected.grad, dims));
        self.stats
            .push(tensor_stats(self.targets, param.id, projected.stats));
    }
}

/// Counts the module's parameters that have a basis, and moves each basis that is not on its
/// parameter's device there (a record loaded onto one device for parameters on another), once,
/// so that no later step pays for the transfer.
struct BasisPlacement<'a, B: AutodiffBackend> {
    bases: &'a mut Bases<B>,
    found: usize,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for BasisPlacement<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(basis) = self.bases.get_mut(&param.id) else {
            return;
        };
        self.found += 1;
        let device = param.device();
        if basis.device() != device {
            *basis = basis.clone().to_device(&device);
        }
    }
}

/// Sums each parameter's gradients over the devices of a [`MultiGradientsParams`], on the device
/// burn's own reduction picks for it.
struct GradientReduction<'a> {
    multi: &'a mut MultiGradientsParams,
    reduced: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradientReduction<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some((grad, _device)) = self.multi.remove::<B::InnerBackend, D>(param.id) {
            self.reduced.register(param.id, grad);
        }
    }
}

/// Records `W_old` (as its 2-D view) for every parameter that has a basis and a gradient, before
/// the inner optimizer steps.
struct UpdateSnapshot<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    bases: &'a Bases<B>,
    before: HashMap<ParamId, Tensor<B::InnerBackend, 2>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for UpdateSnapshot<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let has_grad = || self.grads.get::<B::InnerBackend, D>(param.id).is_some();
        if self.bases.contains(&param.id) && has_grad() {
            self.before.insert(param.id, into_2d(param.val().inner()));
        }
    }
}

/// Replaces each snapshotted parameter's update `ΔW = W_new − W_old` by `−P(−ΔW)`: the update is
/// projected as the descent step `−ηG̃` it stands for, with `G = −ΔW`.
struct UpdateProjection<'a, B: AutodiffBackend> {
    before: HashMap<ParamId, Tensor<B::InnerBackend, 2>>,
    bases: &'a Bases<B>,
    targets: &'a Targets,
    mode: ProjectionMode,
    stats: Vec<TensorStats>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for UpdateProjection<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (Some(before), Some(basis)) =
            (self.before.remove(&param.id), self.bases.get(&param.id))
        else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let after = tensor.clone().inner();
        let dims = after.dims();
        let before = before.to_device(&after.device());
        let descent = before.clone() - into_2d(after);
        let basis = on_device(basis, &descent.device());
        let projected = project(descent, &basis, mode_for::<D>(self.mode))
            .unwrap_or_else(|err| panic!("update of parameter {id} does not fit: {err}"));
        self.stats
            .push(tensor_stats(self.targets, id, projected.stats));
        if projected.stats.removed == 0 {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let mut value = Tensor::from_inner(from_2d(before - projected.grad, dims));
        if tensor.is_require_grad() {
            value = value.require_grad();
        }
        Param::from_mapped_value(id, value, mapper)
    }
}

/// A sum over each gradient whose value is not finite whenever the gradient holds NaN or ±Inf;
/// all are read back together in one transfer.
///
/// The fast probe is `Σ g`, one read of each gradient: a finite sum proves every entry finite,
/// but finite entries of size near `f32::MAX` can overflow it too. The exact probe, `Σ 0·g`, is NaN
/// exactly when an entry is NaN or ±Inf; it costs a written copy, so it only re-checks the
/// gradients in `only`, those whose fast probe was not finite.
struct NonFiniteProbe<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    only: Option<&'a [ParamId]>,
    probes: Vec<(ParamId, Tensor<B::InnerBackend, 1>)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for NonFiniteProbe<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.only.is_some_and(|only| !only.contains(&param.id)) {
            return;
        }
        if let Some(grad) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let probe = match self.only {
                None => grad.sum(),
                Some(_) => grad.mul_scalar(0.0).sum(),
            };
            self.probes.push((param.id, probe));
        }
    }
}

/// Replaces the NaN and ±Inf entries of the listed gradients with 0.
struct NonFiniteZeroing<'a> {
    grads: &'a mut GradientsParams,
    ids: &'a [ParamId],
}

impl<B: AutodiffBackend> ModuleVisitor<B> for NonFiniteZeroing<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !self.ids.contains(&param.id) {
            return;
        }
        if let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            let bad = grad.clone().is_finite().bool_not();
            self.grads.register(param.id, grad.mask_fill(bad, 0.0));
        }
    }
}

/// `basis` on `device`: borrowed when it is there already, else a moved copy (a record loaded onto
/// one device while the parameters live on another).
fn on_device<'b, B: Backend>(
    basis: &'b LowRankBasis<B>,
    device: &B::Device,
) -> Cow<'b, LowRankBasis<B>> {
    if basis.device() == *device {
        Cow::Borrowed(basis)
    } else {
        Cow::Owned(basis.clone().to_device(device))
    }
}

/// Vectors are only ever targeted under `VectorPolicy::Pcgrad`, whatever the matrix mode.
fn mode_for<const D: usize>(matrix_mode: ProjectionMode) -> ProjectionMode {
    if D == 1 {
        ProjectionMode::Pcgrad
    } else {
        matrix_mode
    }
}

fn tensor_stats(targets: &Targets, param: ParamId, stats: ProjectionStats) -> TensorStats {
    let path = targets
        .get(&param)
        .map(|target| target.path.clone())
        .unwrap_or_else(|| param.to_string().into());
    TensorStats { param, path, stats }
}

/// Projects, in place, the gradient of every parameter of `module` that has a basis; returns
/// what the projection did to each.
pub(crate) fn project_gradients<M: AutodiffModule<B>, B: AutodiffBackend>(
    module: &M,
    grads: &mut GradientsParams,
    bases: &Bases<B>,
    targets: &Targets,
    mode: ProjectionMode,
) -> Vec<TensorStats> {
    let mut pass = GradientProjection::<B> {
        grads,
        bases,
        targets,
        mode,
        stats: Vec::new(),
    };
    module.visit(&mut pass);
    pass.stats
}

/// Lets `inner_step` step on the raw gradients, then replaces the update of every parameter
/// that has a basis and a gradient by its projection; returns the module and what the projection
/// did to each update.
pub(crate) fn step_then_project_updates<M, B, F>(
    module: M,
    grads: GradientsParams,
    bases: &Bases<B>,
    targets: &Targets,
    mode: ProjectionMode,
    inner_step: F,
) -> (M, Vec<TensorStats>)
where
    M: AutodiffModule<B>,
    B: AutodiffBackend,
    F: FnOnce(M, GradientsParams) -> M,
{
    let mut snapshot = UpdateSnapshot::<B> {
        grads: &grads,
        bases,
        before: HashMap::new(),
    };
    module.visit(&mut snapshot);
    let before = snapshot.before;
    let module = inner_step(module, grads);
    let mut pass = UpdateProjection::<B> {
        before,
        bases,
        targets,
        mode,
        stats: Vec::new(),
    };
    (module.map(&mut pass), pass.stats)
}

/// Moves every basis onto its parameter's device; returns how many of `module`'s parameters
/// have a basis.
pub(crate) fn place_bases<M: AutodiffModule<B>, B: AutodiffBackend>(
    module: &M,
    bases: &mut Bases<B>,
) -> usize {
    let mut placement = BasisPlacement::<B> { bases, found: 0 };
    module.visit(&mut placement);
    placement.found
}

/// The parameters whose gradient holds NaN or ±Inf: one device read of every gradient's sum,
/// and a second, exact one of those whose sum is not finite.
pub(crate) fn non_finite_gradients<M: AutodiffModule<B>, B: AutodiffBackend>(
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

/// Replaces the NaN and ±Inf entries of the gradients of `ids` with 0.
pub(crate) fn zero_non_finite<M: AutodiffModule<B>, B: AutodiffBackend>(
    module: &M,
    grads: &mut GradientsParams,
    ids: &[ParamId],
) {
    module.visit(&mut NonFiniteZeroing { grads, ids });
}

/// Each parameter's gradients summed over the devices of `multi`, by burn's own reduction.
pub(crate) fn reduce_gradients<M: AutodiffModule<B>, B: AutodiffBackend>(
    module: &M,
    multi: &mut MultiGradientsParams,
) -> GradientsParams {
    let mut reduction = GradientReduction {
        multi,
        reduced: GradientsParams::new(),
    };
    module.visit(&mut reduction);
    reduction.reduced
}
