//! Refresh: the wrapper re-estimates its bases from a safety source as training goes.

use super::*;
use crate::{RefreshPolicy, SafetyGradientSource, SourceError};
use spf_subspace::{SafetySubspace, SketchConfig};

/// The safety loss: fit two fixed inputs to fixed targets (a two-objective problem with the
/// regression loss of `grads`).
pub(super) fn safety_loss(model: &Net) -> Tensor<1> {
    let device = test_device();
    let mut rng = Gaussian::new(77);
    let x = upload(&rng.matrix(2, 4), &device);
    let y = upload(&rng.matrix(2, 3), &device);
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
    let device = test_device();
    for target in [ProjectionTarget::Gradient, ProjectionTarget::Update] {
        let mut model = Net::new(&device);
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
        let projected = |optim: &SafetyProjectedOptimizer<_>| {
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
    let device = test_device();
    let mut model = Net::new(&device);
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
    let device = test_device();
    let model = Net::new(&device);
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
    let device = test_device();
    let model = Net::new(&device);
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
    let mut second = fresh().load_record(round_trip(first.to_record()));
    let resumed = train(&mut second, halfway, 4..7);
    assert_eq!(second.last_stats().refresh.count, 7);

    assert_same(&end, &resumed, "after resuming");
}

/// A source that works `good` times, then fails.
#[derive(Clone)]
struct Flaky {
    good: usize,
}

impl SafetyGradientSource<Net> for Flaky {
    fn safety_gradients(&mut self, module: &Net) -> Result<GradientsParams, SourceError> {
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
    let device = test_device();
    let model = Net::new(&device);
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
        .init(AdamWConfig::new().init(), &Net::new(&device), [])
        .unwrap();
    let m = Net::new(&device);
    let g = grads(&m, 0);
    let _ = sourceless.step(1e-2, m, g);
    assert_eq!(sourceless.last_stats().refresh.failures, 1);
}

#[test]
fn adaptive_period_doubles_while_the_subspace_is_settled() {
    let device = test_device();
    let model = Net::new(&device);
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

/// A record resumes under the policy the loading wrapper was configured with, for every pair
/// of saving and loading policies: `Never` never refreshes (and counts no failure, even without
/// a safety source), `Every(n)` refreshes every `n` steps, `Adaptive` resumes the saved period
/// clamped to its own bounds. (Before, the saved period won: a record saved under `Every(2)`
/// kept refreshing under `Never`, and one saved under `Never` never refreshed under `Every`.)
#[test]
fn resume_obeys_the_configured_refresh_policy() {
    let device = test_device();
    let model = Net::new(&device);
    let adaptive = |initial, max| RefreshPolicy::Adaptive {
        initial,
        max,
        overlap: 2.0, // never settled: the period resets to `initial` after each refresh
    };
    let policies = [
        RefreshPolicy::Never,
        RefreshPolicy::Every(2),
        RefreshPolicy::Every(3),
        adaptive(1, 4),
        adaptive(3, 6),
    ];
    for saved in policies {
        let mut first = refreshing(saved, ProjectionTarget::Gradient)
            .init(AdamWConfig::new().init(), &model, bases(&model))
            .unwrap()
            .with_safety_source(safety_loss);
        let halfway = train(&mut first, model.clone(), 0..4);
        let bytes = encode(first.to_record());
        let saved_counts = first.last_stats().refresh.clone();
        for loaded in policies {
            let context = format!("saved under {saved:?}, loaded under {loaded:?}");
            let mut second = refreshing(loaded, ProjectionTarget::Gradient)
                .init(AdamWConfig::new().init(), &model, [])
                .unwrap()
                .with_safety_source(safety_loss)
                .load_record(decode(&bytes));
            // Which of the next six steps refresh, and the period the wrapper reports.
            let mut refreshed = Vec::new();
            let mut m = halfway.clone();
            for seed in 4..10 {
                let g = grads(&m, seed);
                m = second.step(1e-2, m, g);
                refreshed.push(second.last_stats().refresh.refreshed);
            }
            let stats = &second.last_stats().refresh;
            assert_eq!(stats.failures, saved_counts.failures, "{context}");
            let count = refreshed.iter().filter(|&&r| r).count();
            assert_eq!(stats.count, saved_counts.count + count, "{context}");
            match loaded {
                RefreshPolicy::Never => {
                    assert_eq!(count, 0, "{context}: {refreshed:?}");
                    assert_eq!(stats.period, None, "{context}");
                }
                RefreshPolicy::Every(n) => {
                    assert_eq!(stats.period, Some(n), "{context}");
                    // Refreshes are exactly n steps apart.
                    let at: Vec<usize> = (0..6).filter(|&i| refreshed[i]).collect();
                    assert!(!at.is_empty(), "{context}: {refreshed:?}");
                    assert!(at.windows(2).all(|w| w[1] - w[0] == n), "{context}: {at:?}");
                    assert!(at[0] < n, "{context}: due within one period: {at:?}");
                }
                RefreshPolicy::Adaptive { initial, max, .. } => {
                    let period = stats.period.expect("adaptive always has a period");
                    assert!((initial..=max).contains(&period), "{context}: {period}");
                    assert!(count >= 6 / max, "{context}: {refreshed:?}");
                }
            }
        }
    }
}

/// The refresh counts, the last overlap and error, and the non-finite counts survive a save
/// and load (before, only the counts did; the others restarted at zero).
#[test]
fn resume_restores_the_last_overlap_error_and_non_finite_counts() {
    let device = test_device();
    let model = Net::new(&device);
    let config = refreshing(RefreshPolicy::Every(1), ProjectionTarget::Gradient)
        .with_non_finite(crate::NonFinitePolicy::SkipStep);
    let mut first = config
        .init(AdamWConfig::new().init(), &model, bases(&model))
        .unwrap()
        .with_safety_source(Flaky { good: 2 });
    // Steps 1 and 2 refresh (the bases from init count as step 0), step 3's refresh fails.
    let mut m = train(&mut first, model.clone(), 0..4);
    let mut poisoned = grads(&m, 4);
    let w: Tensor<2> = poisoned.remove(m.attn.weight.id).unwrap();
    poisoned.register(m.attn.weight.id, w.mul_scalar(f32::NAN));
    m = first.step(1e-2, m, poisoned);
    let before = first.last_stats().clone();
    assert!(before.refresh.last_overlap.is_some() && before.refresh.last_error.is_some());
    assert_eq!(
        (before.non_finite.total, before.non_finite.skipped_steps),
        (1, 1)
    );

    let bytes = encode(first.to_record());
    let resume = |good: usize| {
        let mut second = config
            .init(AdamWConfig::new().init(), &model, [])
            .unwrap()
            .with_safety_source(Flaky { good })
            .load_record(decode(&bytes));
        second.step(1e-2, m.clone(), grads(&m, 5));
        second.last_stats().clone()
    };
    // A step whose refresh fails again: the counts go on from the saved ones, and the overlap
    // is the saved one.
    let after = resume(0);
    assert_eq!(after.refresh.count, before.refresh.count);
    assert_eq!(after.refresh.failures, before.refresh.failures + 1);
    assert_eq!(after.refresh.last_overlap, before.refresh.last_overlap);
    assert_eq!(after.non_finite.total, before.non_finite.total);
    assert_eq!(
        after.non_finite.skipped_steps,
        before.non_finite.skipped_steps
    );
    // A step whose refresh succeeds: the saved error is still the last one.
    let after = resume(1);
    assert_eq!(after.refresh.count, before.refresh.count + 1);
    assert_eq!(after.refresh.failures, before.refresh.failures);
    assert_eq!(after.refresh.last_error, before.refresh.last_error);
}
