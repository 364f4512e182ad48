//! The wrapper around each of the ten optimizers that implement burn 0.22's per-tensor
//! `Optimizer` (SGD, Adam, AdamW, AdaGrad, RMSProp, Lion, Lamb, Adan, Adafactor, Muon), in every
//! projection mode, for both targets, over several steps (so that momenta and second moments
//! take part): each step is the one the definition asks for, checked against a twin of the same
//! optimizer stepped from the same weights. And SPF on one parameter group with a plain optimizer
//! on another, in one `ModuleOptimizer`.

use burn::module::ParamGroup;
use burn::optim::{
    AdaGradConfig, AdafactorConfig, AdamConfig, AdanConfig, LambConfig, LionConfig,
    ModuleOptimizer, MuonConfig, RmsPropConfig,
};

use super::*;
use crate::testing::{HostBasis, max_abs_diff, reference_projection};

/// Two bias-free layers: Muon orthogonalizes matrices only.
#[derive(Module, Debug)]
struct Pair {
    first: Linear,
    second: Linear,
}

impl Pair {
    fn new(device: &Device) -> Self {
        let device = &device.clone().autodiff();
        let mut rng = Gaussian::new(5);
        let mut linear = |d_in: usize, d_out: usize| {
            let values: Vec<f32> = (0..d_in * d_out)
                .map(|_| 0.4 * rng.sample() as f32)
                .collect();
            Linear {
                weight: Param::from_data(TensorData::new(values, [d_in, d_out]), device),
                bias: None,
            }
        };
        Self {
            first: linear(6, 5),
            second: linear(5, 4),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.second.forward(tanh(self.first.forward(x)))
    }

    fn weights(&self) -> [Mat<f64>; 2] {
        [&self.first, &self.second].map(|l| download(l.weight.val().inner()))
    }
}

/// The gradients of a seeded regression loss at `model`.
fn pair_grads(model: &Pair, seed: u64) -> GradientsParams {
    let device = test_device();
    let mut rng = Gaussian::new(seed);
    let x = upload(&rng.matrix(7, 6), &device);
    let y = upload(&rng.matrix(7, 4), &device);
    let loss = (model.forward(x) - y).square().mean();
    GradientsParams::from_grads(loss.backward(), model)
}

/// Builds a fresh optimizer.
type Build = fn() -> ModuleOptimizer;

/// The ten optimizers, each a fresh `ModuleOptimizer` on every call.
fn optimizers() -> Vec<(&'static str, Build)> {
    vec![
        ("sgd", || SgdConfig::new().init()),
        ("adam", || AdamConfig::new().init()),
        ("adamw", || AdamWConfig::new().init()),
        ("adagrad", || AdaGradConfig::new().init()),
        ("rmsprop", || RmsPropConfig::new().init()),
        ("lion", || LionConfig::new().init()),
        ("lamb", || LambConfig::new().init()),
        ("adan", || AdanConfig::new().init()),
        ("adafactor", || AdafactorConfig::new().init()),
        ("muon", || MuonConfig::new().init()),
    ]
}

/// Random bases of rank 2 for both weights, on the host and on the device.
fn pair_bases(model: &Pair) -> Vec<(ParamId, HostBasis)> {
    let mut rng = Gaussian::new(77);
    vec![
        (model.first.weight.id, rng.basis(6, 5, 2)),
        (model.second.weight.id, rng.basis(5, 4, 2)),
    ]
}

#[test]
fn every_optimizer_steps_as_the_definition_says_in_every_mode_and_target() {
    const LR: f64 = 1e-2;
    let device = test_device();
    for (name, optimizer) in optimizers() {
        for target in [ProjectionTarget::Gradient, ProjectionTarget::Update] {
            for mode in ProjectionMode::ALL {
                let context = format!("{name}, {target:?}, {mode:?}");
                let mut model = Pair::new(&device);
                let host = pair_bases(&model);
                let bases = host.iter().map(|(id, b)| (*id, b.to_device(&device)));
                let mut spf = SpfConfig::new()
                    .with_mode(mode)
                    .with_target(target)
                    .init(optimizer(), &model, bases)
                    .unwrap();
                let mut twin = optimizer();
                for seed in 0..3 {
                    let before = model.weights();
                    let twin_grads = match target {
                        // The inner optimizer sees the projected gradients.
                        ProjectionTarget::Gradient => {
                            let mut g = pair_grads(&model, seed);
                            for (id, basis) in &host {
                                let raw: Tensor<2> = g.remove(*id).unwrap();
                                let projected = project(raw, &basis.to_device(&device), mode);
                                g.register(*id, projected.unwrap().grad);
                            }
                            g
                        }
                        // The inner optimizer steps on the raw gradients.
                        ProjectionTarget::Update => pair_grads(&model, seed),
                    };
                    let twin_step = twin.step(LR, model.clone(), twin_grads).weights();
                    let grads = pair_grads(&model, seed);
                    model = spf.step(LR, model, grads);
                    let after = model.weights();
                    for (i, (id, basis)) in host.iter().enumerate() {
                        let expected = match target {
                            ProjectionTarget::Gradient => twin_step[i].clone(),
                            // W_old − P(W_old − W_twin): the update's descent part, projected.
                            ProjectionTarget::Update => {
                                let descent = &before[i] - &twin_step[i];
                                let kept = reference_projection(&descent, basis, mode);
                                &before[i] - kept
                            }
                        };
                        let scale = 1.0 + max_abs_diff(&before[i], &twin_step[i]) * 1e3;
                        let err = max_abs_diff(&after[i], &expected);
                        assert!(
                            err <= 2e-6 * scale,
                            "{context}, step {seed}, parameter {id}: {err:e}"
                        );
                    }
                }
                assert_eq!(spf.steps(), 3, "{context}");
            }
        }
    }
}

/// One `ModuleOptimizer` with two groups: AdamW for the first layer, which SPF protects, and
/// SGD for the second, which it does not. Stepped from the same weights as a twin without SPF,
/// the second layer comes out bit for bit as the twin moves it, and the first as the projection
/// of the twin's AdamW update.
#[test]
fn spf_on_one_group_and_a_plain_optimizer_on_another() {
    let device = test_device();
    let groups = || -> ModuleOptimizer {
        ModuleOptimizer::from(AdamWConfig::new().build()).with_group(
            ParamGroup::from_path("second.weight"),
            SgdConfig::new().build(),
            None,
        )
    };
    let mut model = Pair::new(&device);
    let (id, basis) = pair_bases(&model).swap_remove(0);
    assert_eq!(id, model.first.weight.id);
    let mut spf = SpfConfig::new()
        .with_target(ProjectionTarget::Update)
        .with_estimator(estimator().with_filter(ParamFilter::path_regex(r"first\..*")))
        .init(groups(), &model, [(id, basis.to_device(&device))])
        .unwrap();
    let mut twin = groups();
    let mut removed = 0;
    for seed in 0..3 {
        let before = model.weights();
        let reference = twin.step(1e-2, model.clone(), pair_grads(&model, seed));
        let grads = pair_grads(&model, seed);
        model = spf.step(1e-2, model, grads);
        removed += spf.last_stats().removed();
        assert_bitwise(&model.second.weight, &reference.second.weight);
        let descent = &before[0] - &reference.weights()[0];
        let expected =
            &before[0] - reference_projection(&descent, &basis, ProjectionMode::ConflictOnly);
        let err = max_abs_diff(&model.weights()[0], &expected);
        assert!(err <= 1e-6, "step {seed}: {err:e}");
    }
    assert!(removed > 0, "some conflicting component was removed");
}
