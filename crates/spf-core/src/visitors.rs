//! The passes over a module that one wrapped step makes, as burn's module visitors and mappers.
//! `GradientsParams` cannot list its ids, and reading a gradient needs its rank as a constant,
//! so every pass walks the module with a `ModuleVisitor` (or `ModuleMapper`), which supplies
//! both. The functions at the end run the passes the step is made of.

use std::borrow::Cow;
use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, MultiGradientsParams};
use burn::tensor::{Device, Tensor};
use spf_subspace::view::{from_2d, into_2d};
use spf_subspace::{LowRankBasis, Targets};

use crate::bases::ProtectedBases;
use crate::error::SpfError;
use crate::host;
use crate::projection::{Measured, Pending, ProjectionMode, ProjectionStats, Readout};
use crate::stats::TensorStats;

pub(crate) mod lora;

/// The bases of a wrapper.
type Bases = ProtectedBases;

/// Projections of one step, one per protected gradient or update, in module order, whose
/// statistics wait for one read of all their readouts.
pub(crate) struct ProjectionSet<P> {
    entries: Vec<(ParamId, P)>,
}

/// Projections started on the device, not finished: the `Update` target's, which are finished
/// after the read (leaving untouched the parameters from which nothing is removed), and
/// [`SafetyProjectedOptimizer::measure`](crate::SafetyProjectedOptimizer::measure)'s.
pub(crate) type PendingSet = ProjectionSet<Pending>;

/// Projections finished on the device: the `Gradient` target's.
pub(crate) type MeasuredSet = ProjectionSet<Measured>;

impl<P> ProjectionSet<P> {
    /// Every entry's readout, in order, for one read.
    pub(crate) fn readouts(&self) -> Vec<Tensor<1>>
    where
        P: Readout,
    {
        self.entries.iter().map(|(_, p)| p.readout()).collect()
    }

    /// How many numbers [`Self::readouts`] hold together.
    pub(crate) fn numbers_to_read(&self) -> usize
    where
        P: Readout,
    {
        self.entries.iter().map(|(_, p)| p.readout_len()).sum()
    }

    /// Each entry's statistics, from the host copy of [`Self::readouts`].
    pub(crate) fn stats(&self, targets: &Targets, host: &[f64]) -> Vec<TensorStats>
    where
        P: Readout,
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

impl PendingSet {
    /// The finished projections, by parameter; those whose statistics say nothing was removed
    /// come back untouched.
    fn finish(self, stats: &[TensorStats]) -> HashMap<ParamId, Tensor<2>> {
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
struct GradientProjection<'a> {
    grads: &'a mut GradientsParams,
    bases: &'a Bases,
    mode: ProjectionMode,
    then: Then,
    pending: Vec<(ParamId, Pending)>,
    measured: Vec<(ParamId, Measured)>,
    /// The first gradient that did not fit its basis (none after [`check_gradient_shapes`]).
    error: Option<SpfError>,
}

impl<'a> GradientProjection<'a> {
    fn new(
        grads: &'a mut GradientsParams,
        bases: &'a Bases,
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

impl ModuleVisitor for GradientProjection<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(basis) = self.bases.get(&param.id) else {
            return;
        };
        let Some(grad) = self.grads.remove::<D>(param.id) else {
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

impl ModuleVisitor for GradientShapes<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.mismatch.is_some() {
            return;
        }
        let Some(grad) = self.grads.get::<D>(param.id) else {
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
struct BasisPlacement<'a> {
    bases: &'a mut Bases,
    found: usize,
}

impl ModuleVisitor for BasisPlacement<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
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
/// burn's own reduction picks for it, after checking that they share one float type (burn would
/// add an `f32` to an `f64` gradient without a word, or panic).
struct GradientReduction<'a> {
    multi: &'a mut MultiGradientsParams,
    reduced: GradientsParams,
    path: Vec<String>,
    mixed: Option<SpfError>,
}

impl ModuleVisitor for GradientReduction<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let mut dtypes =
            (self.multi.grads.iter()).filter_map(|(g, _)| g.get::<D>(param.id).map(|g| g.dtype()));
        if let Some(first) = dtypes.next()
            && let Some(other) = dtypes.find(|dtype| *dtype != first)
        {
            self.mixed.get_or_insert(SpfError::MixedGradientTypes {
                path: self.path.join("."),
                types: format!("{first:?} and {other:?}"),
            });
            return;
        }
        if let Some((grad, _device)) = self.multi.remove::<D>(param.id) {
            self.reduced.register(param.id, grad);
        }
    }
}

/// Records `W_old` (as its 2-D view) for every parameter that has a basis and a gradient, before
/// the inner optimizer steps.
struct UpdateSnapshot<'a> {
    grads: &'a GradientsParams,
    bases: &'a Bases,
    before: HashMap<ParamId, Tensor<2>>,
}

impl ModuleVisitor for UpdateSnapshot<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let has_grad = || self.grads.get::<D>(param.id).is_some();
        if self.bases.contains(&param.id) && has_grad() {
            self.before.insert(param.id, into_2d(param.val().inner()));
        }
    }
}

/// Starts the projection of each snapshotted parameter's descent `G = W_old − W_new`: the update
/// `ΔW = W_new − W_old` is projected as the descent step `−ηG̃` it stands for.
struct UpdatePreparation<'a> {
    before: &'a HashMap<ParamId, Tensor<2>>,
    bases: &'a Bases,
    mode: ProjectionMode,
    pending: Vec<(ParamId, Pending)>,
    /// The first update that did not fit its basis (none after [`check_gradient_shapes`]).
    error: Option<SpfError>,
}

impl ModuleVisitor for UpdatePreparation<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
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

/// Sets each listed parameter to `W_old − G̃`, keeping the autodiff state that marks the
/// parameter, as burn's own optimizer step does: whether it requires a gradient, its
/// gradient-checkpointing strategy (without which the next forward pass would meet its inputs
/// under two strategies, which autodiff refuses) and its mark as distributed (without which the
/// next backward pass would stop synchronizing its gradient).
struct UpdateReplacement {
    before: HashMap<ParamId, Tensor<2>>,
    projected: HashMap<ParamId, Tensor<2>>,
}

impl ModuleMapper for UpdateReplacement {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
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
        if let Some(strategy) = tensor.gradient_checkpointing_strategy() {
            value = value.with_gradient_checkpointing_strategy(strategy);
        }
        if tensor.is_require_grad() {
            value = value.require_grad();
        }
        if tensor.is_distributed() {
            value = value.set_distributed(id);
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
struct NonFiniteProbe<'a> {
    grads: &'a GradientsParams,
    only: Option<&'a [ParamId]>,
    probes: Vec<(ParamId, Tensor<1>)>,
}

impl ModuleVisitor for NonFiniteProbe<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.only.is_some_and(|only| !only.contains(&param.id)) {
            return;
        }
        if let Some(grad) = self.grads.get::<D>(param.id) {
            let probe = match self.only {
                None => crate::kernels::sum(grad),
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

impl ModuleVisitor for NonFiniteZeroing<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.ids.contains(&param.id) {
            return;
        }
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            let bad = grad.clone().is_finite().bool_not();
            self.grads.register(param.id, grad.mask_fill(bad, 0.0));
        }
    }
}

/// `basis` on `device`: borrowed when it is there already, else a moved copy (a record loaded onto
/// one device while the parameters live on another).
fn on_device<'b>(basis: &'b LowRankBasis, device: &Device) -> Cow<'b, LowRankBasis> {
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
pub(crate) fn check_gradient_shapes<M: Module>(
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
pub(crate) fn prepare_gradients<M: Module>(
    module: &M,
    grads: &mut GradientsParams,
    bases: &Bases,
    mode: ProjectionMode,
) -> Result<PendingSet, SpfError> {
    let mut pass = GradientProjection::new(grads, bases, mode, Then::Keep);
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
pub(crate) fn project_gradients<M: Module>(
    module: &M,
    grads: &mut GradientsParams,
    bases: &Bases,
    mode: ProjectionMode,
    measure: bool,
) -> Result<MeasuredSet, SpfError> {
    let mut pass = GradientProjection::new(grads, bases, mode, Then::Finish { measure });
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
pub(crate) fn snapshot_updates<M: Module>(
    module: &M,
    grads: &GradientsParams,
    bases: &Bases,
) -> HashMap<ParamId, Tensor<2>> {
    let mut snapshot = UpdateSnapshot {
        grads,
        bases,
        before: HashMap::new(),
    };
    module.visit(&mut snapshot);
    snapshot.before
}

/// Starts the projection of the update of every parameter snapshotted in `before`.
pub(crate) fn prepare_updates<M: Module>(
    module: &M,
    before: &HashMap<ParamId, Tensor<2>>,
    bases: &Bases,
    mode: ProjectionMode,
) -> Result<PendingSet, SpfError> {
    let mut pass = UpdatePreparation {
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
pub(crate) fn replace_updates<M: Module>(
    module: M,
    before: HashMap<ParamId, Tensor<2>>,
    set: PendingSet,
    stats: &[TensorStats],
) -> M {
    let mut projected = set.finish(stats);
    for t in stats.iter().filter(|t| t.stats.removed == 0) {
        projected.remove(&t.param);
    }
    module.map(&mut UpdateReplacement { before, projected })
}

/// Moves every basis onto its parameter's device; returns how many of `module`'s parameters
/// have a basis.
pub(crate) fn place_bases<M: Module>(module: &M, bases: &mut Bases) -> usize {
    let mut placement = BasisPlacement { bases, found: 0 };
    module.visit(&mut placement);
    placement.found
}

/// The fast probe of every gradient of `module`, on the device: see [`NonFiniteProbe`].
pub(crate) struct Probes {
    ids: Vec<ParamId>,
    sums: Vec<Tensor<1>>,
}

impl Probes {
    /// The probe values, one per gradient, for one read.
    pub(crate) fn values(&self) -> Vec<Tensor<1>> {
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
pub(crate) fn probe_gradients<M: Module>(module: &M, grads: &GradientsParams) -> Probes {
    let mut probe = NonFiniteProbe {
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
pub(crate) fn non_finite_among<M: Module>(
    module: &M,
    grads: &GradientsParams,
    suspects: &[ParamId],
) -> Vec<ParamId> {
    if suspects.is_empty() {
        return Vec::new();
    }
    let mut probe = NonFiniteProbe {
        grads,
        only: Some(suspects),
        probes: Vec::new(),
    };
    module.visit(&mut probe);
    let (ids, probes): (Vec<ParamId>, Vec<_>) = probe.probes.into_iter().unzip();
    let values = host::read(probes);
    let exact = Probes {
        ids,
        sums: Vec::new(),
    };
    exact.suspects(&values)
}

/// Replaces the NaN and ±Inf entries of the gradients of `ids` with 0.
pub(crate) fn zero_non_finite<M: Module>(module: &M, grads: &mut GradientsParams, ids: &[ParamId]) {
    module.visit(&mut NonFiniteZeroing { grads, ids });
}

/// Each parameter's gradients summed over the devices of `multi`, by burn's own reduction.
///
/// # Errors
///
/// [`SpfError::MixedGradientTypes`] when one parameter's gradients are of two float types, and
/// [`SpfError::ForeignGradients`] when `multi` holds gradients of parameters `module` does not
/// have (they would never be applied).
pub(crate) fn reduce_gradients<M: Module>(
    module: &M,
    multi: &mut MultiGradientsParams,
) -> Result<GradientsParams, SpfError> {
    let mut reduction = GradientReduction {
        multi,
        reduced: GradientsParams::new(),
        path: Vec::new(),
        mixed: None,
    };
    module.visit(&mut reduction);
    if let Some(error) = reduction.mixed {
        return Err(error);
    }
    let count = reduction.multi.grads.iter().map(|(g, _)| g.len()).sum();
    if count > 0 {
        return Err(SpfError::ForeignGradients { count });
    }
    Ok(reduction.reduced)
}
