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
