//! The passes over a module that one wrapped step makes. `GradientsParams` cannot list its ids,
//! and reading a gradient needs its rank as a constant, so every pass walks the module with
//! burn's `ModuleVisitor` (or `ModuleMapper`), which supplies both.

use std::borrow::Cow;
use std::collections::HashMap;

use burn::module::{ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, MultiGradientsParams};
use burn::tensor::{
    Tensor,
    backend::{AutodiffBackend, Backend},
};

use crate::optimizer::Bases;
use crate::{ProjectionMode, TensorStats, project};
use spf_subspace::{LowRankBasis, Targets, from_2d, into_2d};

/// Projects, in place, every gradient in `grads` that has a basis.
pub(crate) struct GradientProjection<'a, B: AutodiffBackend> {
    pub grads: &'a mut GradientsParams,
    pub bases: &'a Bases<B>,
    pub targets: &'a Targets,
    pub mode: ProjectionMode,
    pub stats: Vec<TensorStats>,
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
pub(crate) struct BasisPlacement<'a, B: AutodiffBackend> {
    pub bases: &'a mut Bases<B>,
    pub found: usize,
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
pub(crate) struct GradientReduction<'a> {
    pub multi: &'a mut MultiGradientsParams,
    pub reduced: GradientsParams,
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
pub(crate) struct UpdateSnapshot<'a, B: AutodiffBackend> {
    pub grads: &'a GradientsParams,
    pub bases: &'a Bases<B>,
    pub before: HashMap<ParamId, Tensor<B::InnerBackend, 2>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for UpdateSnapshot<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let has_grad = || self.grads.get::<B::InnerBackend, D>(param.id).is_some();
        if self.bases.contains_key(&param.id) && has_grad() {
            self.before.insert(param.id, into_2d(param.val().inner()));
        }
    }
}

/// Replaces each snapshotted parameter's update `ΔW = W_new − W_old` by `−P(−ΔW)`: the update is
/// projected as the descent step `−ηG̃` it stands for, with `G = −ΔW`.
pub(crate) struct UpdateProjection<'a, B: AutodiffBackend> {
    pub before: HashMap<ParamId, Tensor<B::InnerBackend, 2>>,
    pub bases: &'a Bases<B>,
    pub targets: &'a Targets,
    pub mode: ProjectionMode,
    pub stats: Vec<TensorStats>,
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
pub(crate) struct NonFiniteProbe<'a, B: AutodiffBackend> {
    pub grads: &'a GradientsParams,
    pub only: Option<&'a [ParamId]>,
    pub probes: Vec<(ParamId, Tensor<B::InnerBackend, 1>)>,
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
pub(crate) struct NonFiniteZeroing<'a> {
    pub grads: &'a mut GradientsParams,
    pub ids: &'a [ParamId],
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

fn tensor_stats(targets: &Targets, param: ParamId, stats: crate::ProjectionStats) -> TensorStats {
    let path = targets
        .get(&param)
        .map(|target| target.path.clone())
        .unwrap_or_else(|| param.to_string().into());
    TensorStats { param, path, stats }
}
