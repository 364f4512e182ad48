//! Steps against manual SGD and plain AdamW on projected gradients, the `Update` target's
//! guarantee, pass-through of unprotected parameters, `step_multi`, and vector parameters.

use super::*;

#[test]
fn sgd_step_equals_manual_step_on_projected_gradients() {
    let device = test_device();
    let lr = 0.05;
    for mode in ProjectionMode::ALL {
        let model = Net::new(&device);
        let optim = config(mode)
            .init(SgdConfig::new().init(), &model, bases(&model))
            .unwrap();
        // A feed taken before the wrapper is moved (as into burn-train's Learner) reports the
        // copy that steps.
        let feed = optim.stats_feed();
        let mut optim = optim.clone();
        let stepped = optim.step(lr, model.clone(), grads(&model, 1));
        assert!(
            optim.last_stats().removed() > 0,
            "{mode:?}: nothing conflicted"
        );
        assert_eq!(optim.last_stats().tensors.len(), 3);
        assert_eq!(&feed.latest(), optim.last_stats());

        // W − lr·P(G) for protected weights, W − lr·G for the rest.
        let expected = grads(&model, 1);
        let projected = projected_grads(&model, 1, mode);
        for (id, w) in params(&model) {
            let g = rank_of(&model, id).map_or_else(
                || download(expected.get::<1>(id).unwrap().unsqueeze_dim(1)),
                |rank| match rank {
                    3 => download(projected.get::<3>(id).unwrap().reshape([3, 4])),
                    _ => download(projected.get::<2>(id).unwrap()),
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
    let device = test_device();
    let model = Net::new(&device);
    let mut wrapped = config(ProjectionMode::ConflictOnly)
        .init(AdamWConfig::new().init(), &model, bases(&model))
        .unwrap();
    let mut plain = AdamWConfig::new().init();
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
fn update_coefficients(before: &Net, after: &Net) -> Vec<f64> {
    let old = params(before);
    let new = params(after);
    let mut out = Vec::new();
    for (id, basis) in bases(before) {
        let w0 = &old.iter().find(|(i, _)| *i == id).unwrap().1;
        let w1 = &new.iter().find(|(i, _)| *i == id).unwrap().1;
        let delta = w1 - w0;
        let u = download(basis.u().clone());
        let v = download(basis.v().clone());
        out.extend((0..basis.rank()).map(|i| u.col(i).transpose() * &delta * v.col(i)));
    }
    out
}

#[test]
fn adamw_update_target_leaves_no_conflicting_coefficient() {
    let device = test_device();
    let model = Net::new(&device);
    let lr = 1e-2;
    // An AdamW update is about lr per coordinate; rounding the parameters and the update in f32
    // bounds what is left of a removed coefficient.
    let tol = 64.0 * f64::from(f32::EPSILON) * lr;

    let mut plain = AdamWConfig::new().init();
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
    let device = test_device();
    let model = Net::new(&device);
    for target in [ProjectionTarget::Gradient, ProjectionTarget::Update] {
        let mut plain = AdamWConfig::new().init();
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
    let device: burn::tensor::Device = Default::default();
    let model = Net::new(&device);
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
                        .map(|&s| (grads(&model, s), device.clone()))
                        .collect(),
                };
                let stepped = optim.try_step_multi(1e-2, model.clone(), multi).unwrap();
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
fn sum_of<const D: usize>(all: &[GradientsParams], id: ParamId) -> Tensor<D> {
    all.iter()
        .map(|g| g.get::<D>(id).unwrap())
        .reduce(|a, b| a + b)
        .unwrap()
}

#[test]
fn vector_policy_pcgrad_projects_biases_against_their_safety_gradient() {
    let device = test_device();
    let model = Net::new(&device);
    let bias = model.attn.bias.as_ref().unwrap();
    // The safety gradient of the bias is the negated utility gradient: a full conflict.
    let g: Tensor<1> = grads(&model, 4).get(bias.id).unwrap();
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
        crate::testing::max_abs_diff(&download(delta.unsqueeze_dim(1)), &download(expected.neg()));
    assert!(err <= 1e-6, "{err:e}");
}
