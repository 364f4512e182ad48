//! Refresh: the wrapper re-estimates its bases from a safety source as training goes.

use super::*;
use crate::{RefreshPolicy, SafetyGradientSource, SourceError};
use spf_subspace::{SafetySubspace, SketchConfig};

/// The safety loss: fit two fixed inputs to fixed targets (a two-objective problem with the
/// regression loss of `grads`).
fn safety_loss(model: &Net<B>) -> Tensor<B, 1> {
    let device = Default::default();
    let mut rng = Gaussian::new(77);
    let x = upload::<B>(&rng.matrix(2, 4), &device);
    let y = upload::<B>(&rng.matrix(2, 3), &device);
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
