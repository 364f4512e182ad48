//! Bad input: typed errors, nothing lost, everything counted.

use super::*;
use crate::{NonFinitePolicy, RefreshPolicy};

fn poisoned_grads(model: &Net, seed: u64, value: f32) -> GradientsParams {
    let mut g = grads(model, seed);
    let mut w: Tensor<2> = g.remove(model.attn.weight.id).unwrap();
    w = w.slice_assign([0..1, 0..1], Tensor::full([1, 1], value, &test_device()));
    g.register(model.attn.weight.id, w);
    g
}

fn wrapper(policy: NonFinitePolicy, model: &Net) -> SafetyProjectedOptimizer {
    adamw(
        config(ProjectionMode::ConflictOnly).with_non_finite(policy),
        model,
    )
}

#[test]
fn non_finite_gradient_is_an_error_and_loses_nothing() {
    let device = test_device();
    let model = Net::new(&device);
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

/// The fast probe sums each gradient; huge finite entries overflow that sum, and the exact
/// re-check must clear them. (Entries of `f32::MAX / 20`: their 24 sum past `f32::MAX`, while the
/// projection, which sums at most a few of them per entry, stays finite; under the default
/// settings the re-check sees the projected gradient, see `NonFinitePolicy`.)
#[test]
fn huge_finite_gradients_are_not_mistaken_for_non_finite_ones() {
    let device = test_device();
    let model = Net::new(&device);
    let mut g = grads(&model, 1);
    let w: Tensor<2> = g.remove(model.attn.weight.id).unwrap();
    let huge = Tensor::<2>::full(w.dims(), f32::MAX / 20.0, &device);
    assert!(
        !huge.clone().sum().into_scalar::<f32>().is_finite(),
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
    let device = test_device();
    let model = Net::new(&device);
    let mut optim = wrapper(NonFinitePolicy::Error, &model);
    let _ = optim.step(1e-2, model.clone(), poisoned_grads(&model, 1, f32::NAN));
}

#[test]
fn skip_step_leaves_parameters_and_state_untouched() {
    let device = test_device();
    let model = Net::new(&device);
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
    let device = test_device();
    let model = Net::new(&device);
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
    let device = test_device();
    let model = Net::new(&device);
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
        .init(SgdConfig::new().init(), &model, bases(&model))
        .unwrap();
    let same = sgd.try_step(0.0, model.clone(), grads(&model, 1)).unwrap();
    assert_same(&same, &model, "learning rate 0");
}

fn refreshing_every_step(model: &Net) -> SafetyProjectedOptimizer {
    adamw(
        config(ProjectionMode::ConflictOnly).with_refresh(RefreshPolicy::Every(1)),
        model,
    )
}

#[test]
fn a_panicking_safety_source_is_a_counted_failure() {
    let device = test_device();
    let model = Net::new(&device);
    let mut optim = refreshing_every_step(&model)
        .with_safety_source(|_: &Net| -> Tensor<1> { panic!("safety data went away") });
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

/// A source whose gradients are the model's regression gradients with one NaN in the cube's:
/// what a backend's rounding (`0·∞`) can give from a finite loss.
#[derive(Clone)]
struct PoisonedCube;

impl SafetyGradientSource<Net> for PoisonedCube {
    fn safety_gradients(&mut self, module: &Net) -> Result<GradientsParams, crate::SourceError> {
        let mut g = grads(module, 7);
        let cube: Tensor<3> = g.remove(module.cube.id).expect("the cube has a gradient");
        let nan = Tensor::full([1, 1, 1], f32::NAN, &cube.device());
        g.register(module.cube.id, cube.slice_assign([0..1, 0..1, 0..1], nan));
        Ok(g)
    }
}

#[test]
fn a_non_finite_safety_gradient_is_a_counted_failure() {
    let device = test_device();
    let model = Net::new(&device);
    let mut optim = refreshing_every_step(&model).with_safety_source(PoisonedCube);
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
    let device = test_device();
    let model = Net::new(&device);
    let mut optim = refreshing_every_step(&model).with_safety_source(|m: &Net| {
        let x = Tensor::<2>::ones([1, 4], &test_device());
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
    let device = test_device();
    let model = Net::new(&device);
    let empty = move |m: &Net| {
        let x = Tensor::<2>::zeros([0, 4], &test_device());
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
    let error = stats.last_error.as_deref().unwrap_or_default();
    assert!(error.contains("not finite"), "{error}");
}

/// An inner optimizer that panics, as burn's do on state that does not fit the module.
#[derive(Clone)]
struct Panicking;

impl burn::optim::Optimizer for Panicking {
    type State<const D: usize> = ();

    fn step<const D: usize>(
        &self,
        _lr: f64,
        _tensor: Tensor<D>,
        _grad: Tensor<D>,
        _state: Option<()>,
    ) -> (Tensor<D>, Option<()>) {
        panic!("moment shape [32, 3] does not match [4, 3]")
    }

    fn to_device<const D: usize>(state: (), _device: &Device) {
        state
    }
}

#[test]
fn a_panicking_inner_optimizer_is_an_error_with_the_module_handed_back() {
    let device = test_device();
    let model = Net::new(&device);
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

/// A gradient that is not of its parameter's shape, protected or not, under either target: the
/// step is refused with [`SpfError::ShapeMismatch`] naming the parameter, the module comes back,
/// and nothing has changed (the wrapper steps on as if the call had not been made);
/// [`SafetyProjectedOptimizer::measure`] and the sample screen refuse it the same way. Each used
/// to panic inside the projection, outside the guard around the inner step.
#[test]
fn a_gradient_of_the_wrong_shape_is_refused_naming_its_parameter() {
    let device = test_device();
    let model = Net::new(&device);
    for target in [ProjectionTarget::Gradient, ProjectionTarget::Update] {
        for (path, wrong) in [("attn.weight", true), ("head.weight", false)] {
            let cfg = config(ProjectionMode::ConflictOnly)
                .with_target(target)
                .with_refresh(RefreshPolicy::Every(1));
            let mut optim = cfg
                .init(AdamWConfig::new().init(), &model, bases(&model))
                .unwrap()
                .with_safety_source(|m: &Net| {
                    m.forward(Tensor::ones([2, 4], &test_device())).sum()
                });
            let mut twin = optim.clone();
            let mut bad = grads(&model, 1);
            let id = if wrong {
                model.attn.weight.id
            } else {
                model.head.weight.id
            };
            let _: Option<Tensor<2>> = bad.remove(id);
            bad.register(id, Tensor::<2>::zeros([2, 7], &device));
            let expected = |error: &SpfError| {
                matches!(error, SpfError::ShapeMismatch { path: Some(p), found, .. }
                    if p == path && *found == vec![2, 7])
            };
            let measured = optim.measure(&model, grads_like(&bad, &model));
            assert!(
                measured.as_ref().is_err_and(expected),
                "{target:?} {path}: {measured:?}"
            );
            let refused = optim.try_step(1e-2, model.clone(), bad).unwrap_err();
            assert!(
                expected(&refused.error),
                "{target:?} {path}: {}",
                refused.error
            );
            assert_same(&refused.module, &model, "the module comes back untouched");
            assert_eq!((optim.steps(), optim.last_stats().refresh.count), (0, 0));
            // Nothing changed: both wrappers take the same next step.
            let a = optim.step(1e-2, model.clone(), grads(&model, 2));
            let b = twin.step(1e-2, model.clone(), grads(&model, 2));
            assert_same(&a, &b, "after a refused step");
        }
    }
}

/// A copy of `grads` (burn's gradients cannot be cloned), for the parameters of `model`.
fn grads_like(grads: &GradientsParams, model: &Net) -> GradientsParams {
    let mut copy = GradientsParams::new();
    let weights = [&model.attn.weight, &model.mlp.weight, &model.head.weight];
    for id in weights.iter().map(|w| w.id) {
        if let Some(g) = grads.get::<2>(id) {
            copy.register(id, g);
        }
    }
    copy
}
