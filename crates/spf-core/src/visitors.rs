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
use crate::error::SpfError;
use crate::host;
use crate::projection::{Measured, Pending, ProjectionMode, ProjectionStats, Readout};
use crate::stats::TensorStats;

/// The bases of a wrapper over the autodiff backend `B`.
type Bases<B> = ProtectedBases<<B as AutodiffBackend>::InnerBackend>;

/// Projections of one step, one per protected gradient or update, in module order, whose
/// statistics wait for one read of all their readouts.
pub(crate) struct ProjectionSet<P> {
    entries: Vec<(ParamId, P)>,
}

/// Projections started on the device, not finished: the `Update` target's, which are finished
/// after the read (leaving untouched the parameters from which nothing is removed), and
/// [`SafetyProjectedOptimizer::measure`](crate::SafetyProjectedOptimizer::measure)'s.
pub(crate) type PendingSet<B> = ProjectionSet<Pending<B>>;

/// Projections finished on the device: the `Gradient` target's.
pub(crate) type MeasuredSet<B> = ProjectionSet<Measured<B>>;

impl<P> ProjectionSet<P> {
    /// Every entry's readout, in order, for one read.
    pub(crate) fn readouts<B: Backend>(&self) -> Vec<Tensor<B, 1>>
    where
        P: Readout<B>,
    {
        self.entries.iter().map(|(_, p)| p.readout()).collect()
    }

    /// Each entry's statistics, from the host copy of [`Self::readouts`].
    pub(crate) fn stats<B: Backend>(&self, targets: &Targets, host: &[f64]) -> Vec<TensorStats>
    where
        P: Readout<B>,
    {
        let mut rest = host;
        self.entries
            .iter()
            .map(|(id, projection)| {
                let (own, tail) = rest.split_at(projection.readout_len());
                rest = tail;
                tensor_stats(targets, *id, projection.stats(own))
            })
            .collect()
    }
}

impl<B: Backend> PendingSet<B> {
    /// The finished projections, by parameter; those whose statistics say nothing was removed
    /// come back untouched.
    fn finish(self, stats: &[TensorStats]) -> HashMap<ParamId, Tensor<B, 2>> {
        let unchanged = |i: usize| stats.get(i).is_some_and(|t| t.stats.removed == 0);
        self.entries
            .into_iter()
            .enumerate()
            .map(|(i, (id, pending))| (id, pending.finish(unchanged(i))))
            .collect()
    }
}

/// What a gradient pass does with each projection it starts.
#[derive(Clone, Copy)]
enum Then {
    /// Keeps it pending, the gradient taken out of `grads` (for a measurement).
    Keep,
    /// Finishes it at once, while the gradient is still in the CPU's caches, and registers `G̃`
    /// back; with `measure`, keeps what its statistics need.
    Finish { measure: bool },
}

/// Takes every gradient in `grads` that has a basis and starts its projection, one after the
/// other, then does with it what `then` says.
struct GradientProjection<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    bases: &'a Bases<B>,
    mode: ProjectionMode,
    then: Then,
    pending: Vec<(ParamId, Pending<B::InnerBackend>)>,
    measured: Vec<(ParamId, Measured<B::InnerBackend>)>,
    /// The first gradient that did not fit its basis (none after [`check_gradient_shapes`]).
    error: Option<SpfError>,
}

impl<'a, B: AutodiffBackend> GradientProjection<'a, B> {
    fn new(
        grads: &'a mut GradientsParams,
        bases: &'a Bases<B>,
        mode: ProjectionMode,
        then: Then,
    ) -> Self {
        Self {
            grads,
            bases,
            mode,
            then,
            pending: Vec::new(),
            measured: Vec::new(),
            error: None,
        }
    }
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
        let pending = match Pending::new(into_2d(grad), &basis, mode_for::<D>(self.mode)) {
            Ok(pending) => pending,
            Err(error) => {
                self.error.get_or_insert(error);
                return;
            }
        };
        match self.then {
            Then::Keep => self.pending.push((param.id, pending)),
            Then::Finish { measure } => {
                let (projected, measured) = pending.finish_measured(measure);
                let projected = from_2d(projected, dims).expect("the 2-D view of this gradient");
                self.grads.register(param.id, projected);
                self.measured.extend(measured.map(|m| (param.id, m)));
            }
        }
    }
}

/// Finds the first gradient whose shape is not its parameter's.
struct GradientShapes<'a> {
    grads: &'a GradientsParams,
    targets: &'a Targets,
    mismatch: Option<SpfError>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradientShapes<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.mismatch.is_some() {
            return;
        }
        let Some(grad) = self.grads.get::<B::InnerBackend, D>(param.id) else {
            return;
        };
        let (expected, found) = (param.lazy_shape().to_vec(), grad.dims().to_vec());
        if expected != found {
            self.mismatch = Some(SpfError::ShapeMismatch {
                path: Some(path_of(self.targets, param.id).to_string()),
                expected,
                found,
            });
        }
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

/// Starts the projection of each snapshotted parameter's descent `G = W_old − W_new`: the update
/// `ΔW = W_new − W_old` is projected as the descent step `−ηG̃` it stands for.
struct UpdatePreparation<'a, B: AutodiffBackend> {
    before: &'a HashMap<ParamId, Tensor<B::InnerBackend, 2>>,
    bases: &'a Bases<B>,
    mode: ProjectionMode,
    pending: Vec<(ParamId, Pending<B::InnerBackend>)>,
    /// The first update that did not fit its basis (none after [`check_gradient_shapes`]).
    error: Option<SpfError>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for UpdatePreparation<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let (Some(before), Some(basis)) = (self.before.get(&param.id), self.bases.get(&param.id))
        else {
            return;
        };
        let after = into_2d(param.val().inner());
        let descent = before.clone().to_device(&after.device()) - after;
        let basis = on_device(basis, &descent.device());
        match Pending::new(descent, &basis, mode_for::<D>(self.mode)) {
            Ok(pending) => self.pending.push((param.id, pending)),
            Err(error) => {
                self.error.get_or_insert(error);
            }
        }
    }
}

/// Sets each listed parameter to `W_old − G̃`, keeping what marks the parameter: whether it
/// requires a gradient and, under burn's `distributed` feature (burn-train's DDP), its mark as
/// distributed, which burn's optimizers renew at each step and without which the next backward
/// pass would stop synchronizing its gradient.
struct UpdateReplacement<B: AutodiffBackend> {
    before: HashMap<ParamId, Tensor<B::InnerBackend, 2>>,
    projected: HashMap<ParamId, Tensor<B::InnerBackend, 2>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for UpdateReplacement<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (Some(before), Some(projected)) = (
            self.before.remove(&param.id),
            self.projected.remove(&param.id),
        ) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        let before = before.to_device(&projected.device());
        let after = from_2d(before - projected, dims).expect("the 2-D view of this parameter");
        let mut value = Tensor::from_inner(after);
        if tensor.is_require_grad() {
            value = value.require_grad();
        }
        #[cfg(feature = "distributed")]
        if tensor.is_distributed() {
            value = value.set_distributed(
                burn::tensor::backend::distributed::DistributedParamId::from(id.val()),
            );
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

/// The module path of `param`, or its id for a parameter the targets do not know.
pub(crate) fn path_of(targets: &Targets, param: ParamId) -> std::sync::Arc<str> {
    targets
        .get(&param)
        .map(|target| target.path.clone())
        .unwrap_or_else(|| param.to_string().into())
}

fn tensor_stats(targets: &Targets, param: ParamId, stats: ProjectionStats) -> TensorStats {
    let path = path_of(targets, param);
    TensorStats { param, path, stats }
}

/// Checks that every gradient in `grads` has its parameter's shape, before a step changes
/// anything: a gradient of another shape would otherwise reach the projection, or the inner
/// optimizer, and panic there.
///
/// # Errors
///
/// [`SpfError::ShapeMismatch`] naming the first parameter (in module order) whose gradient does
/// not have its shape.
pub(crate) fn check_gradient_shapes<M: AutodiffModule<B>, B: AutodiffBackend>(
    module: &M,
    grads: &GradientsParams,
    targets: &Targets,
) -> Result<(), SpfError> {
    let mut check = GradientShapes {
        grads,
        targets,
        mismatch: None,
    };
    module.visit(&mut check);
    check.mismatch.map_or(Ok(()), Err)
}

/// Takes the gradient of every parameter of `module` that has a basis out of `grads` and starts
/// its projection.
pub(crate) fn prepare_gradients<M: AutodiffModule<B>, B: AutodiffBackend>(
    module: &M,
    grads: &mut GradientsParams,
    bases: &Bases<B>,
    mode: ProjectionMode,
) -> Result<PendingSet<B::InnerBackend>, SpfError> {
    let mut pass = GradientProjection::<B>::new(grads, bases, mode, Then::Keep);
    module.visit(&mut pass);
    match pass.error {
        Some(error) => Err(error),
        None => Ok(PendingSet {
            entries: pass.pending,
        }),
    }
}

/// Projects, in place, the gradient of every parameter of `module` that has a basis; with
/// `measure`, keeps what their statistics need for one read.
pub(crate) fn project_gradients<M: AutodiffModule<B>, B: AutodiffBackend>(
    module: &M,
    grads: &mut GradientsParams,
    bases: &Bases<B>,
    mode: ProjectionMode,
    measure: bool,
) -> Result<MeasuredSet<B::InnerBackend>, SpfError> {
    let mut pass = GradientProjection::<B>::new(grads, bases, mode, Then::Finish { measure });
    module.visit(&mut pass);
    match pass.error {
        Some(error) => Err(error),
        None => Ok(MeasuredSet {
            entries: pass.measured,
        }),
    }
}

/// `W_old` (as its 2-D view) of every parameter of `module` that has a basis and a gradient,
/// taken before the inner optimizer steps.
pub(crate) fn snapshot_updates<M: AutodiffModule<B>, B: AutodiffBackend>(
    module: &M,
    grads: &GradientsParams,
    bases: &Bases<B>,
) -> HashMap<ParamId, Tensor<B::InnerBackend, 2>> {
    let mut snapshot = UpdateSnapshot::<B> {
        grads,
        bases,
        before: HashMap::new(),
    };
    module.visit(&mut snapshot);
    snapshot.before
}

/// Starts the projection of the update of every parameter snapshotted in `before`.
pub(crate) fn prepare_updates<M: AutodiffModule<B>, B: AutodiffBackend>(
    module: &M,
    before: &HashMap<ParamId, Tensor<B::InnerBackend, 2>>,
    bases: &Bases<B>,
    mode: ProjectionMode,
) -> Result<PendingSet<B::InnerBackend>, SpfError> {
    let mut pass = UpdatePreparation::<B> {
        before,
        bases,
        mode,
        pending: Vec::new(),
        error: None,
    };
    module.visit(&mut pass);
    match pass.error {
        Some(error) => Err(error),
        None => Ok(PendingSet {
            entries: pass.pending,
        }),
    }
}

/// Finishes every projection of `set` and sets each parameter to `W_old − G̃`; `stats`, when
/// read, leaves those from which nothing is removed as the inner optimizer made them.
pub(crate) fn replace_updates<M: AutodiffModule<B>, B: AutodiffBackend>(
    module: M,
    before: HashMap<ParamId, Tensor<B::InnerBackend, 2>>,
    set: PendingSet<B::InnerBackend>,
    stats: &[TensorStats],
) -> M {
    let mut projected = set.finish(stats);
    for t in stats.iter().filter(|t| t.stats.removed == 0) {
        projected.remove(&t.param);
    }
    module.map(&mut UpdateReplacement::<B> { before, projected })
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

/// The fast probe of every gradient of `module`, on the device: see [`NonFiniteProbe`].
pub(crate) struct Probes<B: Backend> {
    ids: Vec<ParamId>,
    sums: Vec<Tensor<B, 1>>,
}

impl<B: Backend> Probes<B> {
    /// The probe values, one per gradient, for one read.
    pub(crate) fn values(&self) -> Vec<Tensor<B, 1>> {
        self.sums.clone()
    }

    /// The parameters whose probe value (as read back, in order) is not finite.
    pub(crate) fn suspects(&self, read: &[f64]) -> Vec<ParamId> {
        let read = read.iter();
        let flagged = self.ids.iter().zip(read).filter(|(_, v)| !v.is_finite());
        flagged.map(|(id, _)| *id).collect()
    }
}

/// Sums every gradient of `module` in `grads`, on the device; nothing is read.
pub(crate) fn probe_gradients<M: AutodiffModule<B>, B: AutodiffBackend>(
    module: &M,
    grads: &GradientsParams,
) -> Probes<B::InnerBackend> {
    let mut probe = NonFiniteProbe::<B> {
        grads,
        only: None,
        probes: Vec::new(),
    };
    module.visit(&mut probe);
    let (ids, sums) = probe.probes.into_iter().unzip();
    Probes { ids, sums }
}

/// Of the `suspects` (gradients whose fast probe was not finite), those that hold NaN or ±Inf:
/// one exact probe of each, read back together.
pub(crate) fn non_finite_among<M: AutodiffModule<B>, B: AutodiffBackend>(
    module: &M,
    grads: &GradientsParams,
    suspects: &[ParamId],
) -> Vec<ParamId> {
    if suspects.is_empty() {
        return Vec::new();
    }
    let mut probe = NonFiniteProbe::<B> {
        grads,
        only: Some(suspects),
        probes: Vec::new(),
    };
    module.visit(&mut probe);
    let (ids, probes): (Vec<ParamId>, Vec<_>) = probe.probes.into_iter().unzip();
    let values = host::read(probes);
    let exact = Probes::<B::InnerBackend> {
        ids,
        sums: Vec::new(),
    };
    exact.suspects(&values)
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
