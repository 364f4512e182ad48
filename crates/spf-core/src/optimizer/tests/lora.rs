//! Weights trained through burn's LoRA adapters: the wrapper projects the factors' gradients (or
//! updates) against the basis of the weight they adapt, and refreshes that basis from the
//! effective weight's safety gradient.

use std::collections::HashMap;

use burn::module::{Lora, ModuleMapper, ParamGroup};

use super::refresh::safety_loss;
use super::*;
use crate::RefreshPolicy;
use crate::projection::{LoraFactors, LoraGrads, project_lora};
use spf_subspace::SketchConfig;

/// Sets each listed parameter to its seeded value, keeping its id and autodiff state.
struct Seeded(HashMap<ParamId, Tensor<2>>);

impl ModuleMapper for Seeded {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(value) = self.0.remove(&param.id) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let value = Tensor::from_inner(value.reshape(tensor.dims())).require_grad();
        Param::from_mapped_value(id, value, mapper)
    }
}

/// The fixture net with LoRA adapters of rank 2 on its two protected linear weights; every
/// other parameter is frozen. `A` is drawn from a seeded generator rather than burn's global
/// one (which tests running beside each other share), and two plain SGD steps move `B` off
/// burn's zero initialization, so that both factors' gradients are nonzero.
fn lora_net(device: &Device) -> Net {
    let group = ParamGroup::from_paths(vec!["attn.weight", "mlp.weight"]);
    let model = Net::new(device).apply_lora(Lora::new(2, 4.0).set_param_group(group));
    let mut rng = Gaussian::new(5);
    let seeded = [&model.attn, &model.mlp].map(|l| {
        let a = l.weight.adapter().expect("adapted").a.clone();
        let [d_in, r] = a.lazy_shape().dims();
        (
            a.id,
            upload(&rng.matrix(d_in, r), &test_device()).mul_scalar(0.5),
        )
    });
    let mut model = model.map(&mut Seeded(seeded.into_iter().collect()));
    let mut sgd = SgdConfig::new().init();
    for seed in 10..12 {
        let g = grads(&model, seed);
        model = sgd.step(0.1, model, g);
    }
    model
}

/// The adapted weights: (base id, factors' ids, factors' values).
fn adapters(model: &Net) -> Vec<(ParamId, [ParamId; 2], LoraFactors)> {
    [&model.attn, &model.mlp]
        .iter()
        .map(|l| {
            let lora = l.weight.adapter().expect("adapted");
            let factors = LoraFactors {
                a: lora.a.val().inner(),
                b: lora.b.val().inner(),
            };
            (l.weight.id, [lora.a.id, lora.b.id], factors)
        })
        .collect()
}

/// `grads` with each adapter's factors' gradients replaced by their projection.
fn projected_lora_grads(model: &Net, seed: u64, mode: ProjectionMode) -> GradientsParams {
    let mut grads = grads(model, seed);
    let bases: HashMap<ParamId, LowRankBasis> = bases(model).into_iter().collect();
    for (weight, [a, b], factors) in adapters(model) {
        let lora = LoraGrads {
            a: grads.remove::<2>(a).unwrap(),
            b: grads.remove::<2>(b).unwrap(),
        };
        let projected = project_lora(lora, &factors, &bases[&weight], mode).unwrap();
        grads.register(a, projected.grads.a);
        grads.register(b, projected.grads.b);
    }
    grads
}

/// The factors of every adapter, on the host.
fn factors(model: &Net) -> Vec<(Mat<f64>, Mat<f64>)> {
    adapters(model)
        .into_iter()
        .map(|(_, _, f)| (download(f.a), download(f.b)))
        .collect()
}

/// The frozen bases of `a` and `b` are bit-identical.
fn assert_same_base(a: &Net, b: &Net) {
    for (x, y) in [(&a.attn, &b.attn), (&a.mlp, &b.mlp)] {
        assert_eq!(x.weight.base().into_data(), y.weight.base().into_data());
    }
}

#[test]
fn sgd_on_adapters_equals_sgd_on_projected_factor_gradients() {
    let device = test_device();
    for mode in ProjectionMode::ALL {
        let model = lora_net(&device);
        let mut optim = config(mode)
            .init(SgdConfig::new().init(), &model, bases(&model))
            .unwrap();
        let stepped = optim.step(0.05, model.clone(), grads(&model, 1));
        let stats = optim.last_stats();
        assert_eq!(
            stats.tensors.len(),
            2,
            "{mode:?}: one entry per adapted weight"
        );
        assert!(stats.removed() > 0, "{mode:?}: nothing conflicted");
        let paths: Vec<&str> = stats.tensors.iter().map(|t| &*t.path).collect();
        assert!(paths.contains(&"attn.weight") && paths.contains(&"mlp.weight"));

        let mut plain = SgdConfig::new().init();
        let manual = plain.step(0.05, model.clone(), projected_lora_grads(&model, 1, mode));
        for ((a, b), (a2, b2)) in factors(&stepped).iter().zip(factors(&manual)) {
            assert!(crate::testing::max_abs_diff(a, &a2) <= 1e-6, "{mode:?}");
            assert!(crate::testing::max_abs_diff(b, &b2) <= 1e-6, "{mode:?}");
        }
        // The frozen bases do not move.
        assert_same_base(&stepped, &model);
    }
}

/// The first-order change `δA B + A δB` of each adapted weight (up to the adapter's scale), with
/// its basis' `U` and `V` on the host.
fn first_order_changes(before: &Net, after: &Net) -> Vec<(Mat<f64>, Mat<f64>, Mat<f64>)> {
    let bases: HashMap<ParamId, LowRankBasis> = bases(before).into_iter().collect();
    let mut out = Vec::new();
    for ((weight, _, _), ((a, b), (a1, b1))) in adapters(before)
        .into_iter()
        .zip(factors(before).into_iter().zip(factors(after)))
    {
        let basis = &bases[&weight];
        let delta = (&a1 - &a) * &b + &a * (&b1 - &b);
        out.push((
            delta,
            download(basis.u().clone()),
            download(basis.v().clone()),
        ));
    }
    out
}

/// `u_iᵀ (δA B + A δB) v_i` of each direction of each adapted weight: the first-order change
/// of the effective weight along the basis, up to the adapter's scale.
fn first_order_coefficients(before: &Net, after: &Net) -> Vec<f64> {
    let mut out = Vec::new();
    for (delta, u, v) in first_order_changes(before, after) {
        out.extend((0..u.ncols()).map(|i| u.col(i).transpose() * &delta * v.col(i)));
    }
    out
}

/// One AdamW step of `model` under `mode` and the `Update` target, which removes something.
fn adamw_update_step(mode: ProjectionMode, model: &Net) -> Net {
    let mut optim = config(mode)
        .with_target(ProjectionTarget::Update)
        .init(AdamWConfig::new().init(), model, bases(model))
        .unwrap();
    let stepped = optim.step(1e-2, model.clone(), grads(model, 1));
    assert!(optim.last_stats().removed() > 0, "{mode:?}");
    stepped
}

/// Under the `Update` target with AdamW, the first-order change of each adapted weight never
/// moves it against the safety directions (ConflictOnly: `u_iᵀ δW v_i ≤ 0` is a descent of the
/// safety loss's rise, i.e. no coefficient of the descent is negative), and Orthogonal leaves
/// none along them; AdamW alone does move against them.
#[test]
fn update_target_keeps_the_first_order_guarantee_under_adamw() {
    let device = test_device();
    let model = lora_net(&device);
    let mut plain = AdamWConfig::new().init();
    let unprotected = plain.step(1e-2, model.clone(), grads(&model, 1));
    let rises = first_order_coefficients(&model, &unprotected);
    assert!(
        rises.iter().any(|c| *c > 1e-6),
        "AdamW alone conflicts: {rises:?}"
    );
    for mode in [ProjectionMode::ConflictOnly, ProjectionMode::Orthogonal] {
        let stepped = adamw_update_step(mode, &model);
        // δW = −η·descent, so a conflict is a positive coefficient of δW.
        let coefficients = first_order_coefficients(&model, &stepped);
        for c in &coefficients {
            match mode {
                ProjectionMode::ConflictOnly => assert!(*c <= 1e-6, "{mode:?}: {coefficients:?}"),
                _ => assert!(c.abs() <= 1e-6, "{mode:?}: {coefficients:?}"),
            }
        }
        assert_ne!(
            factors(&stepped)[0].1,
            factors(&model)[0].1,
            "{mode:?}: it trains"
        );
    }
    // ColumnSpace and RowSpace leave no first-order change in the column (row) space at all.
    for mode in [ProjectionMode::ColumnSpace, ProjectionMode::RowSpace] {
        let stepped = adamw_update_step(mode, &model);
        for (delta, u, v) in first_order_changes(&model, &stepped) {
            let left = match mode {
                ProjectionMode::ColumnSpace => u.transpose() * &delta,
                _ => &delta * v,
            };
            assert!(left.norm_max() <= 1e-6, "{mode:?}: {:e}", left.norm_max());
            assert!(delta.norm_max() > 1e-4, "{mode:?}: it trains");
        }
    }
}

/// A wrapper built without bases estimates them at its first step from the effective weights'
/// safety gradients (the bases are frozen, so it makes them require a gradient for the
/// source), keys them by the adapted weights, never by the factors, and projects with them.
#[test]
fn refresh_estimates_the_bases_of_the_effective_weights() {
    let device = test_device();
    let model = lora_net(&device);
    for target in [ProjectionTarget::Gradient, ProjectionTarget::Update] {
        let mut optim = config(ProjectionMode::ConflictOnly)
            .with_target(target)
            .with_refresh(RefreshPolicy::Every(1))
            .with_estimator(
                estimator()
                    .with_rank(RankPolicy::Fixed(2))
                    .with_sketch(SketchConfig::new().with_seed(3)),
            )
            .init(AdamWConfig::new().init(), &model, [])
            .unwrap()
            .with_safety_source(safety_loss);
        let stepped = optim.step(1e-2, model.clone(), grads(&model, 1));
        let stats = optim.last_stats();
        assert_eq!(
            (stats.refresh.count, stats.refresh.failures),
            (1, 0),
            "{target:?}"
        );
        let mut keyed: Vec<ParamId> = optim.bases().keys().copied().collect();
        keyed.sort_by_key(|id| id.val());
        let mut expected = vec![model.attn.weight.id, model.mlp.weight.id];
        expected.sort_by_key(|id| id.val());
        assert_eq!(keyed, expected, "{target:?}");
        assert_eq!(stats.tensors.len(), 2, "{target:?}");
        // The base stays frozen for the next forward pass, and still does not move.
        assert!(!stepped.attn.weight.base().is_require_grad(), "{target:?}");
        assert_same_base(&stepped, &model);
    }
}

/// A record taken mid-run and loaded into a fresh wrapper continues the run bit for bit.
#[test]
fn a_lora_run_resumes_bit_for_bit() {
    let device = test_device();
    let model = lora_net(&device);
    let build = || {
        config(ProjectionMode::ConflictOnly)
            .with_target(ProjectionTarget::Update)
            .init(AdamWConfig::new().init(), &model, bases(&model))
            .unwrap()
    };
    let mut whole = build();
    let halfway = train(&mut whole, model.clone(), 0..2);
    let record = round_trip_spf(whole.to_record());
    let straight = train(&mut whole, halfway.clone(), 2..4);
    let mut resumed = build().load_record(record);
    let again = train(&mut resumed, halfway, 2..4);
    assert_eq!(factors(&straight), factors(&again));
}

fn round_trip_spf(record: SpfRecord) -> SpfRecord {
    decode(&encode(record))
}

/// The subspace modes read once more than the direction modes, for their solve, whatever the
/// statistics and the probe: with both off, once.
#[test]
fn the_subspace_modes_read_once_for_their_solve() {
    let model = lora_net(&test_device());
    for (mode, reads) in [
        (ProjectionMode::ConflictOnly, 0),
        (ProjectionMode::ColumnSpace, 1),
        (ProjectionMode::RowSpace, 1),
    ] {
        let mut optim = config(mode)
            .with_stats(crate::StatsPolicy::Off)
            .with_non_finite(crate::NonFinitePolicy::Unchecked)
            .init(SgdConfig::new().init(), &model, bases(&model))
            .unwrap();
        optim.step(1e-2, model.clone(), grads(&model, 1));
        assert_eq!(optim.last_stats().host_reads, reads, "{mode:?}");
    }
}

/// Bases estimated before training, from the safety gradients of the module that
/// `require_lora_base_gradients` returns, are the bases the first refresh estimates.
#[test]
fn bases_estimated_before_training_match_the_first_refresh() {
    let model = lora_net(&test_device());
    let estimator = estimator()
        .with_rank(RankPolicy::Fixed(2))
        .with_sketch(SketchConfig::new().with_seed(3));
    let plain = GradientsParams::from_grads(safety_loss(&model).backward(), &model);
    assert!(
        plain.get::<2>(model.attn.weight.id).is_none(),
        "the base is frozen"
    );
    let safety = crate::require_lora_base_gradients(&model);
    let safety_grads = GradientsParams::from_grads(safety_loss(&safety).backward(), &safety);
    let subspace =
        spf_subspace::SafetySubspace::estimate(&safety, &safety_grads, &estimator).unwrap();
    let before: HashMap<ParamId, LowRankBasis> = subspace.into_iter().collect();
    let mut optim = config(ProjectionMode::ConflictOnly)
        .with_refresh(RefreshPolicy::Every(1))
        .with_estimator(estimator)
        .init(SgdConfig::new().init(), &model, [])
        .unwrap()
        .with_safety_source(safety_loss);
    optim.step(1e-2, model.clone(), grads(&model, 1));
    for (id, basis) in optim.bases() {
        assert_eq!(basis.u().to_data(), before[id].u().to_data());
    }
    assert_eq!(optim.bases().len(), 2);
}
