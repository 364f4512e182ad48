//! `measure` and the sample screen built on it: what a step would project, without the step.

use super::*;
use crate::screen::SampleScreen;

/// Gradients with only the attention weight set, to `g`.
fn attn_only(model: &Net, g: &Mat<f64>) -> GradientsParams {
    let mut grads = GradientsParams::new();
    grads.register(model.attn.weight.id, upload(g, &test_device()));
    grads
}

#[test]
fn measure_reports_what_the_step_then_does_and_changes_nothing() {
    let device = test_device();
    for mode in ProjectionMode::ALL {
        let model = Net::new(&device);
        let mut optim = config(mode)
            .init(SgdConfig::new().init(), &model, bases(&model))
            .unwrap();
        let measured = optim.measure(&model, grads(&model, 3)).unwrap();
        assert_eq!(optim.steps(), 0, "{mode:?}: measure stepped");
        assert_eq!(optim.last_stats().tensors.len(), 0, "{mode:?}: published");
        optim.step(0.05, model.clone(), grads(&model, 3));
        let stepped = optim.last_stats();
        assert_eq!(measured.tensors.len(), stepped.tensors.len());
        for (m, s) in measured.tensors.iter().zip(&stepped.tensors) {
            assert_eq!(m.param, s.param);
            assert_eq!(m.stats, s.stats, "{mode:?}: {}", m.path);
        }
        assert!(
            measured.removed_energy_share() > 0.0,
            "{mode:?}: nothing removed"
        );
    }
}

#[test]
fn screen_scores_a_gradient_against_safety_one_and_along_it_zero() {
    let device = test_device();
    let model = Net::new(&device);
    let optim = config(ProjectionMode::ConflictOnly)
        .init(SgdConfig::new().init(), &model, bases(&model))
        .unwrap();
    // The same draw as `bases`: its first basis is the attention weight's.
    let d = Gaussian::new(1234).basis(4, 6, 3).d();
    let score = |g: &Mat<f64>| SampleScreen::score(&optim, &model, attn_only(&model, g)).unwrap();
    let against = score(&(-1.0 * &d));
    let along = score(&d);
    assert!((against - 1.0).abs() < 1e-5, "against safety: {against}");
    assert!(along.abs() < 1e-5, "along safety: {along}");
    // A random gradient loses the energy of its conflicting components only: strictly between.
    let random = score(&Gaussian::new(7).matrix(4, 6));
    assert!(random > 0.0 && random < 1.0, "random: {random}");
    // No gradient on a protected tensor: nothing to remove.
    assert_eq!(
        SampleScreen::score(&optim, &model, GradientsParams::new()).unwrap(),
        0.0
    );

    let screen = SampleScreen::new(0.5).unwrap();
    assert!(!screen.keeps(against));
    assert!(screen.keeps(along));
    assert!(screen.keeps(0.5), "the threshold itself is kept");
}

#[test]
fn a_screen_threshold_outside_the_unit_interval_is_refused() {
    for bad in [f64::NAN, -0.01, 1.01, f64::INFINITY] {
        assert!(
            matches!(
                SampleScreen::new(bad),
                Err(SpfError::InvalidScreenThreshold { .. })
            ),
            "{bad}"
        );
    }
    for good in [0.0, 0.3, 1.0] {
        assert_eq!(SampleScreen::new(good).unwrap().threshold(), good);
    }
}

/// A fixed threshold ignores the scores it judges; the self-set one keeps everything until it
/// has seen a score, then moves with every batch to what all its scores so far set.
#[test]
fn the_self_set_threshold_follows_the_scores_and_a_fixed_one_does_not() {
    use crate::screen::ScreenThreshold;
    let mut fixed = SampleScreen::new(0.01).unwrap();
    assert_eq!(fixed.judge(&[0.5, 0.9]).unwrap(), 0.01);
    assert_eq!(fixed.rule(), ScreenThreshold::Fixed(0.01));

    let mut self_set = SampleScreen::with_threshold(ScreenThreshold::self_set()).unwrap();
    assert_eq!(
        self_set.threshold(),
        1.0,
        "before any score, nothing is an outlier"
    );
    assert_eq!(self_set.judge(&[]).unwrap(), 1.0);
    let bulk = [1e-3, 1.3e-3, 8e-4, 1.1e-3, 9e-4, 1.2e-3, 1e-3];
    let first = self_set.judge(&bulk).unwrap();
    assert!(first > 1.2e-3 && first < 2e-3, "τ = {first}");
    assert!(!self_set.keeps(0.05) && self_set.keeps(1.2e-3));
    // Ten times the scale: the threshold follows (the median moves up through the batch).
    let later = self_set.judge(&bulk.map(|s| 10.0 * s)).unwrap();
    assert!(later > first, "{later} after {first}");
    let mut all = SampleScreen::with_threshold(ScreenThreshold::self_set()).unwrap();
    let both: Vec<f64> = bulk
        .iter()
        .chain(&bulk.map(|s| 10.0 * s))
        .copied()
        .collect();
    assert_eq!(
        all.judge(&both).unwrap(),
        later,
        "batches pool into one reference"
    );
}

/// The calibrated threshold comes from the calibration scores alone: a batch of outliers, a
/// batch of anything, leaves it where the calibration set put it; it refuses to judge before
/// any calibration score, and the other rules ignore calibration scores.
#[test]
fn the_calibrated_threshold_follows_the_calibration_set_and_never_the_batch() {
    use crate::screen::ScreenThreshold;
    let mut calibrated = SampleScreen::with_threshold(ScreenThreshold::calibrated()).unwrap();
    assert!(matches!(
        calibrated.judge(&[1e-3]),
        Err(SpfError::ScreenNotCalibrated)
    ));
    assert_eq!(
        calibrated.threshold(),
        1.0,
        "a refused judgement changes nothing"
    );
    // 19 clean scores, α = 0.1: the 18th smallest.
    let clean: Vec<f64> = (1..=19).map(|i| f64::from(i) * 1e-4).collect();
    calibrated.calibrate(&clean);
    assert_eq!(calibrated.calibration_len(), 19);
    let (harmful, tau) = ([0.05; 8], clean[17]);
    assert_eq!(calibrated.judge(&harmful).unwrap(), tau);
    assert_eq!(
        calibrated.judge(&[1e-6; 8]).unwrap(),
        tau,
        "the batch never moves it"
    );
    assert!(!calibrated.keeps(0.05) && calibrated.keeps(tau));
    // A second calibration batch at higher scores moves it.
    calibrated.calibrate(&clean.iter().map(|s| 10.0 * s).collect::<Vec<_>>());
    assert!(calibrated.judge(&harmful).unwrap() > tau);

    let mut self_set = SampleScreen::with_threshold(ScreenThreshold::self_set()).unwrap();
    self_set.calibrate(&clean);
    assert_eq!(self_set.calibration_len(), 0);
    assert_eq!(self_set.judge(&[]).unwrap(), 1.0);
}

/// A batch of sequences `x: [N, T, 4]` through the attention and MLP weights, each tapped, with
/// the sum of the samples' squared errors against `y: [N, T, 3]`.
fn sequence_loss(
    model: &Net,
    x: Tensor<3>,
    y: Tensor<3>,
) -> (Tensor<1>, Vec<crate::screen::LinearTap>) {
    use crate::screen::LinearTap;
    let (h, attn) = LinearTap::linear(&model.attn, x);
    let (h, mlp) = LinearTap::linear(&model.mlp, tanh(h));
    let out = model.head.forward(tanh(h));
    ((out - y).square().sum(), vec![attn, mlp])
}

/// The traced screen's scores, from one backward pass of the batch, equal the exact screen's,
/// from one backward pass per sample, under every mode; a protected weight without a trace is
/// an error.
#[test]
fn traced_scores_equal_the_per_sample_scores() {
    let device = test_device();
    let model = Net::new(&device);
    let autodiff = model.attn.weight.val().device();
    let (n, t) = (6, 5);
    let mut rng = Gaussian::new(21);
    let x = upload(&rng.matrix(n * t, 4), &autodiff).reshape([n, t, 4]);
    let y = upload(&rng.matrix(n * t, 3), &autodiff).reshape([n, t, 3]);
    let linear_bases: Vec<(ParamId, LowRankBasis)> = bases(&model)
        .into_iter()
        .filter(|(id, _)| *id != model.cube.id)
        .collect();
    for mode in ProjectionMode::ALL {
        let optim = config(mode)
            .init(SgdConfig::new().init(), &model, linear_bases.clone())
            .unwrap();
        let (loss, taps) = sequence_loss(&model, x.clone(), y.clone());
        let grads = loss.backward();
        let traces: Vec<_> = taps.iter().map(|tap| tap.trace(&grads).unwrap()).collect();
        let traced = crate::screen::traced_scores(&traces, optim.bases(), mode).unwrap();
        assert_eq!(traced.len(), n);
        let exact: Vec<f64> = (0..n)
            .map(|i| {
                let slice = |m: &Tensor<3>| m.clone().narrow(0, i, 1);
                let (loss, _) = sequence_loss(&model, slice(&x), slice(&y));
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                SampleScreen::score(&optim, &model, grads).unwrap()
            })
            .collect();
        for (i, (a, b)) in traced.iter().zip(&exact).enumerate() {
            assert!((a - b).abs() <= 1e-5, "{mode:?} sample {i}: {a} vs {b}");
        }
        let spread =
            exact.iter().cloned().fold(0.0, f64::max) - exact.iter().cloned().fold(1.0, f64::min);
        assert!(
            spread > 0.01,
            "{mode:?}: the scores tell samples apart: {exact:?}"
        );
    }
    let all = bases(&model).into_iter().collect();
    let (loss, taps) = sequence_loss(&model, x, y);
    let grads = loss.backward();
    let traces: Vec<_> = taps.iter().map(|tap| tap.trace(&grads).unwrap()).collect();
    assert!(matches!(
        crate::screen::traced_scores(&traces, &all, ProjectionMode::ConflictOnly),
        Err(SpfError::UntracedWeights { count: 1 })
    ));
}
