//! The wrapper inside real burn steps: against manual SGD and plain AdamW on projected
//! gradients, the `Update` target's guarantee, pass-through, `step_multi`, records and errors.

use burn::module::{Module, Param, ParamId};
use burn::nn::Linear;
use burn::optim::{AdamWConfig, GradientsParams, MultiGradientsParams, Optimizer, SgdConfig};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::DeviceOps;
use burn::tensor::{Tensor, TensorData, activation::tanh, backend::Backend};
use faer::Mat;

use super::*;
use crate::testing::{Gaussian, TestAutodiffBackend, TestBackend, to_host, to_tensor};
use crate::{ParamFilter, ProjectionMode, RankPolicy, SubspaceConfig, VectorPolicy, project};
use spf_subspace::SubspaceError;

type B = TestAutodiffBackend;
type Inner = TestBackend;

/// Three layers named so that a path filter can tell them apart, and a rank-3 parameter.
#[derive(Module, Debug)]
struct Net<B: Backend> {
    attn: Linear<B>,
    mlp: Linear<B>,
    head: Linear<B>,
    cube: Param<Tensor<B, 3>>,
}

impl<B: Backend> Net<B> {
    /// Seeded and initialized eagerly: clones of a lazily initialized module would each draw
    /// their own random weights.
    fn new(device: &B::Device) -> Self {
        let mut rng = Gaussian::new(99);
        let mut param = |dims: &[usize]| {
            let n = dims.iter().product();
            let values: Vec<f32> = (0..n).map(|_| 0.5 * rng.sample() as f32).collect();
            TensorData::new(values, dims.to_vec())
        };
        let mut linear = |d_in: usize, d_out: usize| Linear {
            weight: Param::from_data(param(&[d_in, d_out]), device),
            bias: Some(Param::from_data(param(&[d_out]), device)),
        };
        Self {
            attn: linear(4, 6),
            mlp: linear(6, 5),
            head: linear(5, 3),
            cube: Param::from_data(param(&[3, 2, 2]), device),
        }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let h = tanh(self.attn.forward(x));
        let h = tanh(self.mlp.forward(h));
        // The cube mixes the first three outputs: out[:, j] += Σ_i h[:, i] · Σ cube[i, j, :].
        let mix = self.cube.val().sum_dim(2).reshape([3, 2]);
        let out = self.head.forward(h);
        let extra = out.clone().slice([0..out.dims()[0], 0..3]).matmul(mix);
        out.slice_assign([0..extra.dims()[0], 0..2], extra)
    }
}

/// The gradients of a seeded regression loss at `model`.
fn grads(model: &Net<B>, seed: u64) -> GradientsParams {
    let device = Default::default();
    let mut rng = Gaussian::new(seed);
    let x = to_tensor::<B>(&rng.matrix(8, 4), &device);
    let y = to_tensor::<B>(&rng.matrix(8, 3), &device);
    let loss = (model.forward(x) - y).square().mean();
    GradientsParams::from_grads(loss.backward(), model)
}

/// Random bases for the two protected weights and the rank-3 cube (viewed as 3 × 4).
fn bases(model: &Net<B>) -> Vec<(ParamId, LowRankBasis<Inner>)> {
    let device = Default::default();
    let mut rng = Gaussian::new(1234);
    vec![
        (model.attn.weight.id, rng.basis(4, 6, 3).to_device(&device)),
        (model.mlp.weight.id, rng.basis(6, 5, 2).to_device(&device)),
        (model.cube.id, rng.basis(3, 4, 2).to_device(&device)),
    ]
}

fn estimator() -> SubspaceConfig {
    SubspaceConfig::new().with_filter(ParamFilter::path_regex(r"(attn|mlp)\..*|cube"))
}

fn config(mode: ProjectionMode) -> SpfConfig {
    SpfConfig::new().with_mode(mode).with_estimator(estimator())
}

/// Every float parameter of the model on the host, as 2-D views, by id.
fn params(model: &Net<B>) -> Vec<(ParamId, Mat<f64>)> {
    let linear = |l: &Linear<B>| {
        let mut out = vec![(l.weight.id, to_host(l.weight.val().inner()))];
        if let Some(bias) = &l.bias {
            out.push((bias.id, to_host(bias.val().inner().unsqueeze_dim(1))));
        }
        out
    };
    let mut all = linear(&model.attn);
    all.extend(linear(&model.mlp));
    all.extend(linear(&model.head));
    all.push((
        model.cube.id,
        to_host(model.cube.val().inner().reshape([3, 4])),
    ));
    all
}

/// The rank of a matrix-or-larger parameter, `None` for the vectors.
fn rank_of(model: &Net<B>, id: ParamId) -> Option<usize> {
    if id == model.cube.id {
        Some(3)
    } else {
        [&model.attn, &model.mlp, &model.head]
            .iter()
            .any(|l| l.weight.id == id)
            .then_some(2)
    }
}

fn assert_close(a: &Net<B>, b: &Net<B>, tol: f64) {
    for ((id, x), (_, y)) in params(a).iter().zip(params(b)) {
        let err = crate::testing::max_abs_diff(x, &y);
        assert!(err <= tol, "parameter {id}: {err:e} > {tol:e}");
    }
}

/// Steps `optim` on the gradients of `grads(model, seed)` for each seed in `steps`.
fn train<S: SafetyGradientSource<Net<B>, B>>(
    optim: &mut SafetyProjectedOptimizer<impl Optimizer<Net<B>, B>, B, S>,
    mut model: Net<B>,
    steps: std::ops::Range<u64>,
) -> Net<B> {
    for seed in steps {
        let g = grads(&model, seed);
        model = optim.step(1e-2, model, g);
    }
    model
}

/// Every parameter of `a` and `b` is bit-identical.
fn assert_same(a: &Net<B>, b: &Net<B>, context: &str) {
    for ((id, x), (_, y)) in params(a).into_iter().zip(params(b)) {
        assert_eq!(x, y, "{context}: parameter {id} differs");
    }
}

fn assert_bitwise<const D: usize>(a: &Param<Tensor<B, D>>, b: &Param<Tensor<B, D>>) {
    assert_eq!(
        a.val().into_data(),
        b.val().into_data(),
        "parameter {}",
        a.id
    );
}

/// The gradients with each protected one replaced by its projection.
fn projected_grads(model: &Net<B>, seed: u64, mode: ProjectionMode) -> GradientsParams {
    let mut grads = grads(model, seed);
    for (id, basis) in bases(model) {
        // `remove` must be called with the parameter's true rank.
        let grad: Tensor<Inner, 2> = if id == model.cube.id {
            grads.remove::<Inner, 3>(id).unwrap().reshape([3, 4])
        } else {
            grads.remove::<Inner, 2>(id).unwrap()
        };
        let projected = project(grad, &basis, mode).unwrap().grad;
        if id == model.cube.id {
            grads.register(id, projected.reshape([3, 2, 2]));
        } else {
            grads.register(id, projected);
        }
    }
    grads
}

#[test]
fn sgd_step_equals_manual_step_on_projected_gradients() {
    let device = Default::default();
    let lr = 0.05;
    for mode in ProjectionMode::ALL {
        let model = Net::<B>::new(&device);
        let mut optim = config(mode)
            .init(SgdConfig::new().init(), &model, bases(&model))
            .unwrap();
        let stepped = optim.step(lr, model.clone(), grads(&model, 1));
        assert!(
            optim.last_stats().removed() > 0,
            "{mode:?}: nothing conflicted"
        );
        assert_eq!(optim.last_stats().tensors.len(), 3);

        // W − lr·P(G) for protected weights, W − lr·G for the rest.
        let expected = grads(&model, 1);
        let projected = projected_grads(&model, 1, mode);
        for (id, w) in params(&model) {
            let g = rank_of(&model, id).map_or_else(
                || to_host(expected.get::<Inner, 1>(id).unwrap().unsqueeze_dim(1)),
                |rank| match rank {
                    3 => to_host(projected.get::<Inner, 3>(id).unwrap().reshape([3, 4])),
                    _ => to_host(projected.get::<Inner, 2>(id).unwrap()),
                },
            );
            let manual = &w - lr * &g;
            let got = params(&stepped)
                .into_iter()
                .find(|(i, _)| *i == id)
                .unwrap()
                .1;
            let err = crate::testing::max_abs_diff(&manual, &got);
            assert!(err <= 1e-6, "{mode:?} parameter {id}: {err:e}");
        }
    }
}

#[test]
fn adamw_gradient_target_equals_adamw_on_projected_gradients() {
    let device = Default::default();
    let model = Net::<B>::new(&device);
    let mut wrapped = config(ProjectionMode::ConflictOnly)
        .init(AdamWConfig::new().init(), &model, bases(&model))
        .unwrap();
    let mut plain = AdamWConfig::new().init::<B, Net<B>>();
    let (mut a, mut b) = (model.clone(), model);
    for seed in 0..3 {
        let grads_a = grads(&a, seed);
        a = wrapped.step(1e-2, a, grads_a);
        let grads_b = projected_grads(&b, seed, ProjectionMode::ConflictOnly);
        b = plain.step(1e-2, b, grads_b);
    }
    assert_close(&a, &b, 1e-6);
}

/// `u_iᵀ ΔW v_i` for each direction of each protected weight.
fn update_coefficients(before: &Net<B>, after: &Net<B>) -> Vec<f64> {
    let old = params(before);
    let new = params(after);
    let mut out = Vec::new();
    for (id, basis) in bases(before) {
        let w0 = &old.iter().find(|(i, _)| *i == id).unwrap().1;
        let w1 = &new.iter().find(|(i, _)| *i == id).unwrap().1;
        let delta = w1 - w0;
        let u = to_host(basis.u().clone());
        let v = to_host(basis.v().clone());
        out.extend((0..basis.rank()).map(|i| u.col(i).transpose() * &delta * v.col(i)));
    }
    out
}

#[test]
fn adamw_update_target_leaves_no_conflicting_coefficient() {
    let device = Default::default();
    let model = Net::<B>::new(&device);
    let lr = 1e-2;
    // An AdamW update is about lr per coordinate; rounding the parameters and the update in f32
    // bounds what is left of a removed coefficient.
    let tol = 64.0 * f64::from(f32::EPSILON) * lr;

    let mut plain = AdamWConfig::new().init::<B, Net<B>>();
    let raw = plain.step(lr, model.clone(), grads(&model, 3));
    let raw_worst = update_coefficients(&model, &raw)
        .into_iter()
        .fold(f64::MIN, f64::max);
    assert!(
        raw_worst > 1e3 * tol,
        "the raw AdamW update should conflict: {raw_worst:e}"
    );

    for target in [ProjectionTarget::Gradient, ProjectionTarget::Update] {
        let mut optim = config(ProjectionMode::ConflictOnly)
            .with_target(target)
            .init(AdamWConfig::new().init(), &model, bases(&model))
            .unwrap();
        let stepped = optim.step(lr, model.clone(), grads(&model, 3));
        let worst = update_coefficients(&model, &stepped)
            .into_iter()
            .fold(f64::MIN, f64::max);
        match target {
            // A descent step −ηG̃ has u_iᵀΔWv_i = −η c̃_i, so no conflict means every one ≤ 0.
            ProjectionTarget::Update => assert!(worst <= tol, "Update target: {worst:e} > {tol:e}"),
            // Adam's per-coordinate scaling brings conflict back: the reason `Update` exists.
            ProjectionTarget::Gradient => assert!(worst > tol, "Gradient target: {worst:e}"),
        }
    }

    let mut optim = config(ProjectionMode::Orthogonal)
        .with_target(ProjectionTarget::Update)
        .init(AdamWConfig::new().init(), &model, bases(&model))
        .unwrap();
    let stepped = optim.step(lr, model.clone(), grads(&model, 3));
    for c in update_coefficients(&model, &stepped) {
        assert!(
            c.abs() <= tol,
            "Orthogonal update keeps a safety component {c:e}"
        );
    }
}

#[test]
fn unprotected_parameters_pass_through_bit_for_bit() {
    let device = Default::default();
    let model = Net::<B>::new(&device);
    for target in [ProjectionTarget::Gradient, ProjectionTarget::Update] {
        let mut plain = AdamWConfig::new().init::<B, Net<B>>();
        // mlp.weight is targeted but gets no basis; head and every bias are not targeted.
        let only_attn = bases(&model).into_iter().take(1);
        let mut wrapped = config(ProjectionMode::Orthogonal)
            .with_target(target)
            .init(AdamWConfig::new().init(), &model, only_attn)
            .unwrap();
        let a = plain.step(1e-2, model.clone(), grads(&model, 5));
        let b = wrapped.step(1e-2, model.clone(), grads(&model, 5));
        assert!(wrapped.last_stats().removed() > 0);
        assert_bitwise(&a.mlp.weight, &b.mlp.weight);
        assert_bitwise(&a.head.weight, &b.head.weight);
        assert_bitwise(&a.cube, &b.cube);
        for (x, y) in [(&a.attn, &b.attn), (&a.mlp, &b.mlp), (&a.head, &b.head)] {
            assert_bitwise(x.bias.as_ref().unwrap(), y.bias.as_ref().unwrap());
        }
        assert_ne!(
            a.attn.weight.val().into_data(),
            b.attn.weight.val().into_data()
        );
    }
}

/// Data parallelism on burn's own engine: burn-train's multi-device strategy hands each
/// replica's optimizer the gradients of every device in one `MultiGradientsParams`. burn 0.21's
/// ndarray backend has one device, so the three "devices" here are three handles on it. Every
/// replica of the wrapper applies the same projected update, bit for bit, and it is the step on
/// the summed gradients.
#[test]
fn step_multi_replicas_apply_the_step_on_summed_gradients() {
    let device: burn::tensor::Device<B> = Default::default();
    let model = Net::<B>::new(&device);
    let seeds = [7, 8, 9];
    for target in [ProjectionTarget::Gradient, ProjectionTarget::Update] {
        let build = || {
            config(ProjectionMode::ConflictOnly)
                .with_target(target)
                .init(AdamWConfig::new().init(), &model, bases(&model))
                .unwrap()
        };
        let mut single = build();
        let mut summed = GradientsParams::new();
        let all: Vec<_> = seeds.iter().map(|&s| grads(&model, s)).collect();
        for (id, _) in params(&model) {
            match rank_of(&model, id) {
                None => summed.register(id, sum_of::<1>(&all, id)),
                Some(2) => summed.register(id, sum_of::<2>(&all, id)),
                Some(_) => summed.register(id, sum_of::<3>(&all, id)),
            }
        }
        let expected = single.step(1e-2, model.clone(), summed);
        assert!(single.last_stats().removed() > 0);

        let replicas: Vec<_> = (0..3)
            .map(|_| {
                let mut optim = build();
                let multi = MultiGradientsParams {
                    grads: seeds
                        .iter()
                        .map(|&s| (grads(&model, s), device.id()))
                        .collect(),
                };
                let stepped = optim.step_multi(1e-2, model.clone(), multi);
                (stepped, optim.last_stats().clone())
            })
            .collect();
        for (replica, (stepped, stats)) in replicas.iter().enumerate() {
            let context = format!("{target:?}, replica {replica}");
            // Every replica applies the same update, bit for bit, on any backend.
            assert_same(&replicas[0].0, stepped, &context);
            assert_eq!(&replicas[0].1, stats, "{context}");
            // It is the step on the summed gradients, to rounding: burn's reduction starts each
            // parameter's sum at the device its (random) id selects, so the order of the three
            // additions differs from `sum_of`'s for some parameters.
            assert_eq!(single.last_stats().conflicting(), stats.conflicting());
            assert_eq!(single.last_stats().removed(), stats.removed());
            assert_close(&expected, stepped, 1e-5);
        }
    }
}

/// `Σ_g g[id]` over the gradient sets, in their order.
fn sum_of<const D: usize>(all: &[GradientsParams], id: ParamId) -> Tensor<Inner, D> {
    all.iter()
        .map(|g| g.get::<Inner, D>(id).unwrap())
        .reduce(|a, b| a + b)
        .unwrap()
}

#[test]
fn record_round_trip_continues_identically() {
    let device = Default::default();
    let model = Net::<B>::new(&device);
    let cfg = config(ProjectionMode::ConflictOnly).with_target(ProjectionTarget::Update);
    let mut optim = cfg
        .init(AdamWConfig::new().init(), &model, bases(&model))
        .unwrap();
    let model = train(&mut optim, model, 0..2);

    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let bytes = recorder.record(optim.to_record(), ()).unwrap();
    let record = recorder.load(bytes, &device).unwrap();
    let mut restored = cfg
        .init(AdamWConfig::new().init(), &model, [])
        .unwrap()
        .load_record(record);
    assert_eq!(restored.steps(), 2);
    assert_eq!(restored.bases().len(), 3);

    let a = optim.step(1e-2, model.clone(), grads(&model, 2));
    let b = restored.step(1e-2, model.clone(), grads(&model, 2));
    assert_same(&a, &b, "after the round trip");
}

/// burn-train resumes by building the model and the wrapper afresh (new parameter ids) and then
/// loading both records: the wrapper adopts the saved ids, the module takes them on, and training
/// continues exactly. Stepping a module that never loaded its record is refused.
#[test]
fn a_record_loads_into_a_wrapper_built_for_a_fresh_copy_of_the_model() {
    let device = Default::default();
    let cfg = config(ProjectionMode::ConflictOnly).with_refresh(crate::RefreshPolicy::Never);
    let model = Net::<B>::new(&device);
    let mut optim = cfg
        .init(AdamWConfig::new().init(), &model, bases(&model))
        .unwrap();
    let model = train(&mut optim, model, 0..2);

    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let optim_bytes = recorder.record(optim.to_record(), ()).unwrap();
    let model_bytes = recorder.record(model.clone().into_record(), ()).unwrap();

    let fresh = Net::<B>::new(&device);
    assert_ne!(fresh.attn.weight.id, model.attn.weight.id, "new ids");
    let mut restored = cfg
        .init(AdamWConfig::new().init(), &fresh, [])
        .unwrap()
        .try_load_record::<Net<B>>(recorder.load(optim_bytes, &device).unwrap())
        .unwrap();
    assert_eq!(restored.bases().len(), 3);

    let refused = restored
        .try_step(1e-2, fresh.clone(), grads(&fresh, 2))
        .unwrap_err();
    assert_eq!(refused.error, SpfError::ModuleMismatch);

    let resumed = fresh.load_record(recorder.load(model_bytes, &device).unwrap());
    assert_eq!(resumed.attn.weight.id, model.attn.weight.id);
    let a = optim.step(1e-2, model.clone(), grads(&model, 2));
    let b = restored.step(1e-2, resumed.clone(), grads(&resumed, 2));
    assert!(optim.last_stats().removed() > 0);
    assert_eq!(optim.last_stats(), restored.last_stats());
    assert_same(&a, &b, "after resuming into a fresh copy");
}

#[test]
fn init_rejects_bases_that_do_not_fit() {
    let device = Default::default();
    let model = Net::<B>::new(&device);
    let basis = |d_in, d_out| {
        Gaussian::new(0)
            .basis(d_in, d_out, 1)
            .to_device::<Inner>(&device)
    };
    let init = |bases: Vec<(ParamId, LowRankBasis<Inner>)>| {
        config(ProjectionMode::ConflictOnly)
            .init(SgdConfig::new().init::<B, Net<B>>(), &model, bases)
            .map(|_| ())
    };

    let stranger = ParamId::new();
    assert_eq!(
        init(vec![(stranger, basis(4, 6))]),
        Err(SpfError::UnknownParam { id: stranger })
    );
    assert_eq!(
        init(vec![(model.head.weight.id, basis(5, 3))]),
        Err(SpfError::UntargetedParam {
            path: "head.weight".into()
        })
    );
    assert_eq!(
        init(vec![(model.attn.bias.as_ref().unwrap().id, basis(6, 1))]),
        Err(SpfError::UntargetedParam {
            path: "attn.bias".into()
        })
    );
    assert_eq!(
        init(vec![(model.attn.weight.id, basis(6, 4))]),
        Err(SpfError::ShapeMismatch {
            path: Some("attn.weight".into()),
            expected: vec![4, 6],
            found: vec![6, 4],
        })
    );
    let bad_regex = SpfConfig::new()
        .with_estimator(SubspaceConfig::new().with_filter(ParamFilter::path_regex("(")))
        .init(SgdConfig::new().init::<B, Net<B>>(), &model, []);
    assert!(matches!(
        bad_regex,
        Err(SpfError::Subspace(SubspaceError::InvalidFilter { .. }))
    ));
}

#[test]
fn bases_are_truncated_to_the_configured_rank() {
    let device = Default::default();
    let model = Net::<B>::new(&device);
    let optim = config(ProjectionMode::ConflictOnly)
        .with_estimator(estimator().with_rank(RankPolicy::Fixed(1)))
        .init(SgdConfig::new().init::<B, Net<B>>(), &model, bases(&model))
        .unwrap();
    assert!(optim.bases().values().all(|b| b.rank() == 1));
}

#[test]
fn load_record_rejects_records_that_do_not_fit() {
    let device = Default::default();
    let model = Net::<B>::new(&device);
    let cfg = config(ProjectionMode::ConflictOnly);
    let optim = cfg
        .init(SgdConfig::new().init::<B, Net<B>>(), &model, bases(&model))
        .unwrap();
    let fresh = || {
        cfg.init(SgdConfig::new().init::<B, Net<B>>(), &model, [])
            .unwrap()
    };

    let mut record = optim.to_record();
    record.version = RECORD_VERSION + 1;
    assert_eq!(
        fresh().try_load_record::<Net<B>>(record).err(),
        Some(SpfError::UnsupportedRecordVersion {
            found: RECORD_VERSION + 1,
            supported: RECORD_VERSION
        })
    );

    // A record saved for another architecture: a parameter path it does not have, or one
    // parameter fewer.
    let mut renamed = optim.to_record();
    renamed.params[0].path = "elsewhere.weight".into();
    assert!(matches!(
        fresh().try_load_record::<Net<B>>(renamed),
        Err(SpfError::RecordMismatch { .. })
    ));
    let mut fewer = optim.to_record();
    fewer.params.pop();
    assert!(matches!(
        fresh().try_load_record::<Net<B>>(fewer),
        Err(SpfError::RecordMismatch { .. })
    ));

    // The right id with factors of another shape.
    let mut record = optim.to_record();
    let wrong = Gaussian::new(2).basis(5, 4, 1).to_device::<Inner>(&device);
    let (u, sigma, v) = wrong.into_parts();
    record.bases[0].u = Tensor::from_inner(u);
    record.bases[0].sigma = Tensor::from_inner(sigma);
    record.bases[0].v = Tensor::from_inner(v);
    assert!(matches!(
        fresh().try_load_record::<Net<B>>(record),
        Err(SpfError::ShapeMismatch { .. })
    ));

    // Factors that are not a basis at all.
    let mut record = optim.to_record();
    record.bases[0].u = record.bases[0].u.clone().mul_scalar(2.0);
    assert!(matches!(
        fresh().try_load_record::<Net<B>>(record),
        Err(SpfError::InvalidBasis { .. })
    ));
}

#[test]
fn vector_policy_pcgrad_projects_biases_against_their_safety_gradient() {
    let device = Default::default();
    let model = Net::<B>::new(&device);
    let bias = model.attn.bias.as_ref().unwrap();
    // The safety gradient of the bias is the negated utility gradient: a full conflict.
    let g: Tensor<Inner, 1> = grads(&model, 4).get(bias.id).unwrap();
    let safety = LowRankBasis::from_vector(g.clone().neg().add_scalar(0.01)).unwrap();
    let mut optim = SpfConfig::new()
        .with_mode(ProjectionMode::Orthogonal) // ignored for vectors
        .with_estimator(
            SubspaceConfig::new()
                .with_vector_policy(VectorPolicy::Pcgrad)
                .with_filter(ParamFilter::path_regex(r"attn\.bias")),
        )
        .init(SgdConfig::new().init(), &model, [(bias.id, safety.clone())])
        .unwrap();
    let stepped = optim.step(1.0, model.clone(), grads(&model, 4));
    assert_eq!(optim.last_stats().removed(), 1);

    let n = g.dims()[0];
    let expected = project(g.reshape([n, 1]), &safety, ProjectionMode::Pcgrad)
        .unwrap()
        .grad;
    let delta = stepped.attn.bias.as_ref().unwrap().val().inner() - bias.val().inner();
    let err =
        crate::testing::max_abs_diff(&to_host(delta.unsqueeze_dim(1)), &to_host(expected.neg()));
    assert!(err <= 1e-6, "{err:e}");
}

/// Refresh: the wrapper re-estimates its bases from a safety source as training goes.
mod refresh {
    use super::*;
    use crate::{RefreshPolicy, SafetyGradientSource, SourceError};
    use spf_subspace::{SafetySubspace, SketchConfig};

    /// The safety loss: fit two fixed inputs to fixed targets (a two-objective problem with the
    /// regression loss of `grads`).
    fn safety_loss(model: &Net<B>) -> Tensor<B, 1> {
        let device = Default::default();
        let mut rng = Gaussian::new(77);
        let x = to_tensor::<B>(&rng.matrix(2, 4), &device);
        let y = to_tensor::<B>(&rng.matrix(2, 3), &device);
        (model.forward(x) - y).square().mean()
    }

    fn refreshing(policy: RefreshPolicy, target: ProjectionTarget) -> SpfConfig {
        config(ProjectionMode::ConflictOnly)
            .with_target(target)
            .with_refresh(policy)
            .with_estimator(
                estimator()
                    .with_rank(RankPolicy::Fixed(2))
                    .with_sketch(SketchConfig::new().with_seed(3)),
            )
    }

    /// A frozen layer (outside the autodiff graph, so without gradients, in both the utility
    /// and the safety loss) passes through bit for bit, keeps its basis through refreshes, and
    /// is projected again once unfrozen.
    #[test]
    fn frozen_parameters_pass_through_and_keep_their_bases() {
        let device = Default::default();
        for target in [ProjectionTarget::Gradient, ProjectionTarget::Update] {
            let mut model = Net::<B>::new(&device);
            model.attn = model.attn.no_grad();
            let mut optim = refreshing(RefreshPolicy::Every(1), target)
                .init(AdamWConfig::new().init(), &model, bases(&model))
                .unwrap()
                .with_safety_source(safety_loss);
            let attn = model.attn.weight.id;
            let basis_before = optim.bases()[&attn].u().to_data();

            let stepped = train(&mut optim, model.clone(), 0..3);
            assert_bitwise(&stepped.attn.weight, &model.attn.weight);
            assert_bitwise(
                stepped.attn.bias.as_ref().unwrap(),
                model.attn.bias.as_ref().unwrap(),
            );
            assert_ne!(
                params(&stepped)[2..],
                params(&model)[2..],
                "{target:?}: the rest trains"
            );
            // The bases given at init serve step 0; steps 1 and 2 re-estimate.
            assert_eq!(optim.last_stats().refresh.count, 2, "{target:?}");
            assert_eq!(optim.bases()[&attn].u().to_data(), basis_before);
            let projected = |optim: &SafetyProjectedOptimizer<_, B, _>| {
                optim
                    .last_stats()
                    .tensors
                    .iter()
                    .any(|t: &crate::TensorStats| t.param == attn)
            };
            assert!(
                !projected(&optim),
                "{target:?}: nothing to project while frozen"
            );

            let mut unfrozen = stepped;
            unfrozen.attn.weight = unfrozen.attn.weight.set_require_grad(true);
            let g = grads(&unfrozen, 9);
            let after = optim.step(1e-2, unfrozen.clone(), g);
            assert!(projected(&optim), "{target:?}: projected once unfrozen");
            assert_ne!(
                after.attn.weight.val().into_data(),
                unfrozen.attn.weight.val().into_data()
            );
        }
    }

    #[test]
    fn every_one_re_estimates_before_every_step() {
        let device = Default::default();
        let mut model = Net::<B>::new(&device);
        let config = refreshing(RefreshPolicy::Every(1), ProjectionTarget::Gradient);
        let mut optim = config
            .init(AdamWConfig::new().init(), &model, [])
            .unwrap()
            .with_safety_source(safety_loss);
        for t in 0..4u64 {
            // The bases the step will use: the estimate at the current weights, refresh t.
            let safety = GradientsParams::from_grads(safety_loss(&model).backward(), &model);
            let mut seeded = config.estimator.clone();
            seeded.sketch.seed += t;
            let expected = SafetySubspace::estimate(&model, &safety, &seeded).unwrap();

            let g = grads(&model, t);
            model = optim.step(1e-2, model, g);
            let stats = &optim.last_stats().refresh;
            assert!(stats.refreshed, "step {t}");
            assert_eq!((stats.count, stats.failures), (t as usize + 1, 0));
            assert_eq!(optim.bases().len(), expected.len());
            for (id, basis) in expected.iter() {
                assert_eq!(
                    optim.bases()[id].u().to_data(),
                    basis.u().to_data(),
                    "step {t}"
                );
            }
        }
        let stats = &optim.last_stats().refresh;
        assert!(stats.time > std::time::Duration::ZERO);
        let overlap = stats.last_overlap.expect("successive bases overlap");
        assert!((0.0..=1.0 + 1e-6).contains(&overlap), "{overlap}");
    }

    #[test]
    fn bases_given_at_init_count_as_step_zero() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        let mut optim = refreshing(RefreshPolicy::Every(2), ProjectionTarget::Gradient)
            .init(AdamWConfig::new().init(), &model, bases(&model))
            .unwrap()
            .with_safety_source(safety_loss);
        let refreshed: Vec<bool> = (0..5u64)
            .scan(model, |model, seed| {
                let g = grads(model, seed);
                *model = optim.step(1e-2, model.clone(), g);
                Some(optim.last_stats().refresh.refreshed)
            })
            .collect();
        assert_eq!(refreshed, [false, false, true, false, true]);
    }

    #[test]
    fn record_round_trip_resumes_refreshing_identically() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        let config = refreshing(RefreshPolicy::Every(1), ProjectionTarget::Update);
        let fresh = || {
            config
                .init(AdamWConfig::new().init(), &model, [])
                .unwrap()
                .with_safety_source(safety_loss)
        };
        let mut straight = fresh();
        let end = train(&mut straight, model.clone(), 0..7);

        let mut first = fresh();
        let halfway = train(&mut first, model.clone(), 0..4);
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        let bytes = recorder.record(first.to_record(), ()).unwrap();
        let mut second = fresh().load_record(recorder.load(bytes, &device).unwrap());
        let resumed = train(&mut second, halfway, 4..7);
        assert_eq!(second.last_stats().refresh.count, 7);

        assert_same(&end, &resumed, "after resuming");
    }

    /// A source that works `good` times, then fails.
    #[derive(Clone)]
    struct Flaky {
        good: usize,
    }

    impl SafetyGradientSource<Net<B>, B> for Flaky {
        fn safety_gradients(&mut self, module: &Net<B>) -> Result<GradientsParams, SourceError> {
            if self.good == 0 {
                return Err("safety batch unavailable".into());
            }
            self.good -= 1;
            Ok(GradientsParams::from_grads(
                safety_loss(module).backward(),
                module,
            ))
        }
    }

    #[test]
    fn failed_refresh_keeps_the_previous_bases_and_is_counted() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        let mut optim = refreshing(RefreshPolicy::Every(1), ProjectionTarget::Gradient)
            .init(AdamWConfig::new().init(), &model, [])
            .unwrap()
            .with_safety_source(Flaky { good: 1 });
        let model = train(&mut optim, model, 0..1);
        let kept: Vec<_> = optim
            .bases()
            .iter()
            .map(|(id, b)| (*id, b.u().to_data()))
            .collect();
        assert!(!kept.is_empty());
        train(&mut optim, model, 1..3);
        let stats = optim.last_stats();
        assert_eq!((stats.refresh.count, stats.refresh.failures), (1, 2));
        assert!(
            stats
                .refresh
                .last_error
                .as_deref()
                .unwrap()
                .contains("safety batch unavailable")
        );
        assert!(!stats.tensors.is_empty(), "the old bases still project");
        for (id, u) in kept {
            assert_eq!(optim.bases()[&id].u().to_data(), u);
        }

        // Without a source, refreshes fail the same way.
        let mut sourceless = refreshing(RefreshPolicy::Every(1), ProjectionTarget::Gradient)
            .init(AdamWConfig::new().init(), &Net::<B>::new(&device), [])
            .unwrap();
        let m = Net::<B>::new(&device);
        let g = grads(&m, 0);
        let _ = sourceless.step(1e-2, m, g);
        assert_eq!(sourceless.last_stats().refresh.failures, 1);
    }

    #[test]
    fn adaptive_period_doubles_while_the_subspace_is_settled() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        let policy = RefreshPolicy::Adaptive {
            initial: 1,
            max: 4,
            overlap: 0.9,
        };
        // Fixed-rank-1 bases of a fixed safety loss at weights that do not move (lr = 0): every
        // refresh finds the same subspace, so the period grows 1, 2, 4 and stays at the cap.
        let mut optim = refreshing(policy, ProjectionTarget::Gradient)
            .with_estimator(estimator().with_rank(RankPolicy::Fixed(1)))
            .init(SgdConfig::new().init(), &model, [])
            .unwrap()
            .with_safety_source(safety_loss);
        let mut periods = Vec::new();
        let mut model = model;
        for seed in 0..12u64 {
            let g = grads(&model, seed);
            model = optim.step(0.0, model, g);
            let stats = &optim.last_stats().refresh;
            if stats.refreshed {
                periods.push(stats.period.unwrap());
            }
        }
        assert_eq!(
            periods,
            [1, 2, 4, 4, 4],
            "refreshes at steps 0, 1, 3, 7, 11"
        );
    }
}

/// Bad input: typed errors, nothing lost, everything counted.
mod reliability {
    use super::*;
    use crate::{NonFinitePolicy, RefreshPolicy};

    fn poisoned_grads(model: &Net<B>, seed: u64, value: f32) -> GradientsParams {
        let mut g = grads(model, seed);
        let mut w: Tensor<Inner, 2> = g.remove(model.attn.weight.id).unwrap();
        w = w.slice_assign(
            [0..1, 0..1],
            Tensor::full([1, 1], value, &Default::default()),
        );
        g.register(model.attn.weight.id, w);
        g
    }

    /// AdamW wrapped with `config` around the fixture bases.
    fn adamw(
        config: SpfConfig,
        model: &Net<B>,
    ) -> SafetyProjectedOptimizer<impl Optimizer<Net<B>, B> + use<>, B> {
        config
            .init(AdamWConfig::new().init::<B, Net<B>>(), model, bases(model))
            .unwrap()
    }

    fn wrapper(
        policy: NonFinitePolicy,
        model: &Net<B>,
    ) -> SafetyProjectedOptimizer<impl Optimizer<Net<B>, B>, B> {
        adamw(
            config(ProjectionMode::ConflictOnly).with_non_finite(policy),
            model,
        )
    }

    #[test]
    fn non_finite_gradient_is_an_error_and_loses_nothing() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut optim = wrapper(NonFinitePolicy::Error, &model);
            let err = optim
                .try_step(1e-2, model.clone(), poisoned_grads(&model, 1, bad))
                .unwrap_err();
            assert_eq!(
                err.error,
                SpfError::NonFiniteGradient {
                    paths: vec!["attn.weight".into()]
                }
            );
            assert_same(&err.module, &model, "the module handed back");
            assert_eq!(optim.steps(), 0);
            assert_eq!(optim.last_stats().non_finite.total, 1);
            // The inner state is untouched: the next good step is a first step.
            let after = optim.try_step(1e-2, err.module, grads(&model, 2)).unwrap();
            let fresh =
                wrapper(NonFinitePolicy::Error, &model).step(1e-2, model.clone(), grads(&model, 2));
            assert_same(&after, &fresh, "the next step against a fresh wrapper");
        }
    }

    /// The fast probe sums each gradient; finite entries near `f32::MAX` overflow that sum, and
    /// the exact re-check must clear them.
    #[test]
    fn huge_finite_gradients_are_not_mistaken_for_non_finite_ones() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        let mut g = grads(&model, 1);
        let w: Tensor<Inner, 2> = g.remove(model.attn.weight.id).unwrap();
        let huge = Tensor::<Inner, 2>::full(w.dims(), f32::MAX / 2.0, &device);
        assert!(
            !huge.clone().sum().into_scalar().is_finite(),
            "the sum overflows"
        );
        g.register(model.attn.weight.id, huge);
        let mut optim = wrapper(NonFinitePolicy::Error, &model);
        optim
            .try_step(1e-2, model.clone(), g)
            .expect("every entry is finite");
        assert_eq!(optim.last_stats().non_finite.total, 0);
    }

    #[test]
    #[should_panic(expected = "non-finite gradient for attn.weight")]
    fn optimizer_step_panics_with_the_error_message() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        let mut optim = wrapper(NonFinitePolicy::Error, &model);
        let _ = optim.step(1e-2, model.clone(), poisoned_grads(&model, 1, f32::NAN));
    }

    #[test]
    fn skip_step_leaves_parameters_and_state_untouched() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        let mut optim = wrapper(NonFinitePolicy::SkipStep, &model);
        let skipped = optim.step(1e-2, model.clone(), poisoned_grads(&model, 1, f32::NAN));
        assert_same(&skipped, &model, "a skipped step");
        let stats = optim.last_stats().non_finite;
        assert_eq!(
            (stats.this_step, stats.total, stats.skipped_steps),
            (1, 1, 1)
        );
        assert_eq!(optim.steps(), 0);
        let after = optim.step(1e-2, skipped, grads(&model, 2));
        let fresh =
            wrapper(NonFinitePolicy::SkipStep, &model).step(1e-2, model.clone(), grads(&model, 2));
        assert_same(&after, &fresh, "the next step against a fresh wrapper");
        assert_eq!(optim.last_stats().non_finite.this_step, 0);
    }

    #[test]
    fn zero_non_finite_steps_on_the_cleaned_gradient() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        let mut optim = wrapper(NonFinitePolicy::ZeroNonFinite, &model);
        let stepped = optim.step(
            1e-2,
            model.clone(),
            poisoned_grads(&model, 1, f32::INFINITY),
        );
        let clean = wrapper(NonFinitePolicy::Error, &model).step(
            1e-2,
            model.clone(),
            poisoned_grads(&model, 1, 0.0),
        );
        assert_same(&stepped, &clean, "a step on the zeroed gradient");
        assert_eq!(optim.last_stats().non_finite.total, 1);
        assert_eq!(optim.steps(), 1);
    }

    #[test]
    fn learning_rate_must_be_finite_and_non_negative() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        for lr in [f64::NAN, f64::INFINITY, -1e-3] {
            let mut optim = wrapper(NonFinitePolicy::Error, &model);
            let err = optim
                .try_step(lr, model.clone(), grads(&model, 1))
                .unwrap_err();
            assert!(
                matches!(err.error, SpfError::InvalidLearningRate { .. }),
                "{lr}"
            );
            assert_same(&err.module, &model, "the module handed back");
        }
        // Zero is a valid (if idle) rate: SGD leaves every parameter where it was.
        let mut sgd = config(ProjectionMode::ConflictOnly)
            .init(SgdConfig::new().init::<B, Net<B>>(), &model, bases(&model))
            .unwrap();
        let same = sgd.try_step(0.0, model.clone(), grads(&model, 1)).unwrap();
        assert_same(&same, &model, "learning rate 0");
    }

    fn refreshing_every_step(
        model: &Net<B>,
    ) -> SafetyProjectedOptimizer<impl Optimizer<Net<B>, B>, B> {
        adamw(
            config(ProjectionMode::ConflictOnly).with_refresh(RefreshPolicy::Every(1)),
            model,
        )
    }

    #[test]
    fn a_panicking_safety_source_is_a_counted_failure() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        let mut optim = refreshing_every_step(&model)
            .with_safety_source(|_: &Net<B>| -> Tensor<B, 1> { panic!("safety data went away") });
        train(&mut optim, model.clone(), 0..2);
        let stats = &optim.last_stats().refresh;
        assert_eq!((stats.count, stats.failures), (0, 1));
        assert!(
            stats
                .last_error
                .as_deref()
                .unwrap()
                .contains("safety data went away")
        );
        assert_eq!(optim.bases().len(), 3, "the bases from init are kept");
    }

    #[test]
    fn a_non_finite_safety_gradient_is_a_counted_failure() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        let mut optim = refreshing_every_step(&model)
            .with_safety_source(|m: &Net<B>| m.cube.val().sum().mul_scalar(f32::NAN));
        train(&mut optim, model.clone(), 0..2);
        let stats = &optim.last_stats().refresh;
        assert_eq!((stats.count, stats.failures), (0, 1));
        assert!(
            stats.last_error.as_deref().unwrap().contains("cube"),
            "{:?}",
            stats.last_error
        );
    }

    #[test]
    fn an_all_zero_safety_gradient_leaves_nothing_to_protect() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        let mut optim = refreshing_every_step(&model).with_safety_source(|m: &Net<B>| {
            let x = Tensor::<B, 2>::ones([1, 4], &Default::default());
            m.forward(x).sum().mul_scalar(0.0)
        });
        train(&mut optim, model.clone(), 0..2);
        let stats = optim.last_stats();
        assert_eq!((stats.refresh.count, stats.refresh.failures), (1, 0));
        assert!(
            optim.bases().values().all(|b| b.rank() == 0),
            "a zero gradient has rank 0"
        );
        assert_eq!(stats.removed(), 0);
    }

    #[test]
    fn an_empty_safety_batch_is_a_counted_failure() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        let empty = move |m: &Net<B>| {
            let x = Tensor::<B, 2>::zeros([0, 4], &Default::default());
            m.forward(x).mean()
        };
        let mut optim = refreshing_every_step(&model).with_safety_source(empty);
        train(&mut optim, model.clone(), 0..2);
        let stats = &optim.last_stats().refresh;
        assert_eq!(stats.count + stats.failures, 1, "{stats:?}");
        assert_eq!(
            stats.failures, 1,
            "the mean of no samples is NaN: {stats:?}"
        );
    }

    /// An inner optimizer that panics, as burn's do on state that does not fit the module.
    #[derive(Clone)]
    struct Panicking;

    impl Optimizer<Net<B>, B> for Panicking {
        type Record = ();

        fn step(&mut self, _lr: f64, _module: Net<B>, _grads: GradientsParams) -> Net<B> {
            panic!("moment shape [32, 3] does not match [4, 3]")
        }

        fn step_multi(
            &mut self,
            _lr: f64,
            _module: Net<B>,
            _grads: MultiGradientsParams,
        ) -> Net<B> {
            panic!("unused")
        }

        fn to_record(&self) {}

        fn load_record(self, _record: ()) -> Self {
            self
        }
    }

    #[test]
    fn a_panicking_inner_optimizer_is_an_error_with_the_module_handed_back() {
        let device = Default::default();
        let model = Net::<B>::new(&device);
        let mut optim = config(ProjectionMode::ConflictOnly)
            .init(Panicking, &model, bases(&model))
            .unwrap();
        let err = optim
            .try_step(1e-2, model.clone(), grads(&model, 1))
            .unwrap_err();
        assert!(
            matches!(&err.error, SpfError::StepPanicked { message } if message.contains("does not match")),
            "{}",
            err.error
        );
        assert_same(&err.module, &model, "the module handed back");
        assert_eq!(optim.steps(), 0);
    }
}

/// A record loaded onto one device for parameters on another: the step is the same as with the
/// bases in place, and afterwards every basis lives on its parameter's device. WGPU only (the
/// `test-wgpu` feature): ndarray has a single device, so nothing could be apart. Plain SGD,
/// because burn 0.21's own optimizers move their state with `Tensor::to_device`, which panics
/// between two WGPU devices (so AdamW state loaded onto another WGPU device cannot step).
#[cfg(feature = "test-wgpu")]
#[test]
fn bases_loaded_onto_another_device_move_to_their_parameters() {
    use burn::backend::wgpu::WgpuDevice;
    let (here, there) = (WgpuDevice::DefaultDevice, WgpuDevice::Cpu);
    let model = Net::<B>::new(&here);
    let cfg = config(ProjectionMode::ConflictOnly);
    let mut optim = cfg
        .init(SgdConfig::new().init(), &model, bases(&model))
        .unwrap();
    let model = train(&mut optim, model, 0..2);

    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let bytes = recorder.record(optim.to_record(), ()).unwrap();
    let record = recorder.load(bytes, &there).unwrap();
    let mut restored = cfg
        .init(SgdConfig::new().init(), &model, [])
        .unwrap()
        .load_record(record);
    assert!(restored.bases().values().all(|b| b.device() == there));

    let a = optim.step(1e-2, model.clone(), grads(&model, 2));
    let b = restored.step(1e-2, model.clone(), grads(&model, 2));
    assert!(restored.bases().values().all(|b| b.device() == here));
    assert_close(&a, &b, 1e-6);
}
