//! Reads from the device: at most one per step, none when neither the statistics nor the
//! non-finite probe are asked for, and the same step whichever way it reads.

use super::*;
use crate::{NonFinitePolicy, ProjectionTarget, StatsPolicy};

#[test]
fn a_step_reads_from_the_device_once_or_not_at_all() {
    use NonFinitePolicy::{Error, Unchecked};
    use ProjectionTarget::{Gradient, Update};
    use StatsPolicy::{EveryStep, Off};
    let model = Net::new(&test_device());
    // (statistics, probe, target, reads per step): the probe shares the statistics' read,
    // except under the Update target, whose statistics come after the inner step.
    let cases = [
        (EveryStep, Error, Gradient, 1),
        (EveryStep, Unchecked, Gradient, 1),
        (Off, Error, Gradient, 1),
        (Off, Unchecked, Gradient, 0),
        (EveryStep, Error, Update, 2),
        (EveryStep, Unchecked, Update, 1),
        (Off, Error, Update, 1),
        (Off, Unchecked, Update, 0),
    ];
    for (stats, probe, target, reads) in cases {
        for mode in ProjectionMode::ALL {
            let context = format!("{stats:?} {probe:?} {target:?} {mode:?}");
            let config = config(mode)
                .with_stats(stats)
                .with_non_finite(probe)
                .with_target(target);
            let mut optim = adamw(config, &model);
            let feed = optim.stats_feed();
            let mut m = model.clone();
            for seed in 0..3 {
                let g = grads(&m, seed);
                m = optim.step(1e-2, m, g);
                let last = optim.last_stats();
                assert_eq!(last.host_reads, reads, "{context}");
                assert_eq!(feed.latest().host_reads, reads, "{context}: the feed");
                // Three protected parameters, each with statistics when they are read.
                let projected = if stats == EveryStep { 3 } else { 0 };
                assert_eq!(last.tensors.len(), projected, "{context}");
            }
        }
    }
}

#[test]
fn reading_the_statistics_or_not_takes_the_same_step() {
    let model = Net::new(&test_device());
    for target in [ProjectionTarget::Gradient, ProjectionTarget::Update] {
        for mode in ProjectionMode::ALL {
            let run = |stats: StatsPolicy| {
                let config = config(mode).with_target(target).with_stats(stats);
                train(&mut adamw(config, &model), model.clone(), 0..4)
            };
            let (read, unread) = (run(StatsPolicy::EveryStep), run(StatsPolicy::Off));
            let context = format!("{target:?} {mode:?}");
            match target {
                // The same device rule and removal: equal, as numbers (an untouched `−0` entry
                // may come out `+0`, which compares equal).
                ProjectionTarget::Gradient => assert_same(&read, &unread, &context),
                // Unread, an update from which nothing is removed is still rebuilt as
                // `W_old − (W_old − W_new)`, which rounds.
                ProjectionTarget::Update => assert_close(&read, &unread, 1e-6),
            }
        }
    }
}

#[test]
fn the_probe_acts_the_same_inside_the_statistics_read_or_alone() {
    let model = Net::new(&test_device());
    for policy in [
        NonFinitePolicy::Error,
        NonFinitePolicy::SkipStep,
        NonFinitePolicy::ZeroNonFinite,
    ] {
        for bad in [f32::NAN, f32::INFINITY, 1e38] {
            let run = |stats: StatsPolicy| {
                let config = config(ProjectionMode::ConflictOnly)
                    .with_non_finite(policy)
                    .with_stats(stats);
                let mut optim = adamw(config, &model);
                let mut g = grads(&model, 1);
                let w: Tensor<2> = g.remove(model.attn.weight.id).unwrap();
                let w = w
                    .clone()
                    .slice_assign([0..2, 0..1], Tensor::full([2, 1], bad, &test_device()));
                g.register(model.attn.weight.id, w);
                let outcome = optim.try_step(1e-2, model.clone(), g);
                let (module, error) = match outcome {
                    Ok(module) => (module, None),
                    Err(refused) => (refused.module, Some(refused.error)),
                };
                (module, error, optim.steps(), optim.last_stats().non_finite)
            };
            let (folded, alone) = (run(StatsPolicy::EveryStep), run(StatsPolicy::Off));
            let context = format!("{policy:?} {bad}");
            assert_same(&folded.0, &alone.0, &context);
            assert_eq!(folded.1, alone.1, "{context}");
            assert_eq!((folded.2, folded.3), (alone.2, alone.3), "{context}");
            // Four entries of 1e38 overflow the fast probe's sum but are finite (and stay finite
            // through the projection): a step, not a refusal.
            let finite = bad.is_finite();
            assert_eq!(folded.3.this_step, usize::from(!finite), "{context}");
        }
    }
}

/// The files of the step path read from the device only through `host::read`, so the count in
/// `StepStats::host_reads` is every read a step makes outside a refresh.
#[test]
fn the_step_path_reads_only_through_the_counted_function() {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    for file in [
        "optimizer.rs",
        "visitors.rs",
        "projection.rs",
        "kernels/mod.rs",
        "kernels/dispatch.rs",
        "kernels/flex.rs",
        "kernels/ndarray.rs",
        "kernels/lanes.rs",
        "stats.rs",
        "config.rs",
        "bases.rs",
    ] {
        let text = std::fs::read_to_string(format!("{src}/{file}")).unwrap();
        // The library code: everything before the unit tests, doc comments left out.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (n, line) in code.lines().enumerate() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            for read in [
                "into_data(",
                "to_data(",
                "into_scalar(",
                "into_scalar_async(",
            ] {
                assert!(
                    !line.contains(read),
                    "{file}:{}: `{read}` reads from the device outside host::read",
                    n + 1
                );
            }
        }
    }
}

/// The statistics are read after the removal has overwritten `G`, so at magnitudes where `‖G‖²`
/// overflows or underflows in `f32` they are rebuilt from `G̃` and the removed energy: the same
/// shares, cosines and (scaled) energies as at magnitude 1.
#[test]
fn statistics_read_after_the_step_are_exact_at_extreme_magnitudes() {
    let model = Net::new(&test_device());
    let scaled = |scale: f32| {
        let mut g = grads(&model, 5);
        for (id, _) in bases(&model) {
            if id == model.cube.id {
                let t: Tensor<3> = g.remove(id).unwrap();
                g.register(id, t.mul_scalar(scale));
            } else {
                let t: Tensor<2> = g.remove(id).unwrap();
                g.register(id, t.mul_scalar(scale));
            }
        }
        g
    };
    for mode in ProjectionMode::ALL {
        let stats_at = |scale: f32| {
            let mut optim = config(mode)
                .init(SgdConfig::new().init(), &model, bases(&model))
                .unwrap();
            optim.step(0.0, model.clone(), scaled(scale));
            optim.last_stats().tensors.clone()
        };
        let reference = stats_at(1.0);
        for scale in [1e-30_f32, 1e30] {
            for (got, want) in stats_at(scale).iter().zip(&reference) {
                let (got, want) = (got.stats, want.stats);
                let context = format!("{mode:?} scale {scale:e}");
                let ratio = got.grad_energy / (want.grad_energy * f64::from(scale).powi(2));
                assert!(
                    (ratio - 1.0).abs() < 1e-4,
                    "{context}: energy ratio {ratio}"
                );
                let share = got.removed_energy_share() - want.removed_energy_share();
                assert!(share.abs() < 1e-4, "{context}: share {share}");
                assert!(
                    (got.cosine_before - want.cosine_before).abs() < 1e-4,
                    "{context}"
                );
                assert!(
                    (got.cosine_after - want.cosine_after).abs() < 1e-3,
                    "{context}"
                );
                assert_eq!(
                    (got.conflicting, got.removed),
                    (want.conflicting, want.removed)
                );
            }
        }
    }
}
