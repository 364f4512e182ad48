//! End to end through the facade: a wrapped AdamW inside a training loop, saved to files with
//! burn's recorder halfway through, restored into fresh objects, continues bit for bit.

use std::path::PathBuf;

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::{Tensor, TensorData, activation::tanh, backend::Backend};
use spf::{LowRankBasis, ProjectionTarget, SafetyProjectedOptimizer, SpfConfig};

type B = Autodiff<NdArray>;

#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    fn new(device: &B::Device) -> Self {
        Self {
            fc1: LinearConfig::new(3, 5).init(device),
            fc2: LinearConfig::new(5, 2).init(device),
        }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.fc2.forward(tanh(self.fc1.forward(x)))
    }
}

/// A deterministic batch for step `step`.
fn batch(step: usize) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let device = Default::default();
    let wave = |n: usize, cols: usize, phase: f32| {
        let values: Vec<f32> = (0..n * cols)
            .map(|i| (i as f32 * 0.7 + phase).sin())
            .collect();
        Tensor::from_data(TensorData::new(values, [n, cols]), &device)
    };
    (wave(6, 3, step as f32), wave(6, 2, 1.0 + 2.0 * step as f32))
}

fn train(
    mut model: Mlp<B>,
    optim: &mut SafetyProjectedOptimizer<impl Optimizer<Mlp<B>, B>, B>,
    steps: std::ops::Range<usize>,
) -> Mlp<B> {
    for step in steps {
        let (x, y) = batch(step);
        let loss = (model.forward(x) - y).square().mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    model
}

/// The leading `k` standard basis vectors of `R^n`, as the columns of an `n × k` factor.
fn leading(n: usize, k: usize) -> Tensor<NdArray, 2> {
    Tensor::eye(n, &Default::default()).slice([0..n, 0..k])
}

fn config() -> SpfConfig {
    SpfConfig::new().with_target(ProjectionTarget::Update)
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn training_resumed_from_files_matches_uninterrupted_training() {
    let device = Default::default();
    let model = Mlp::<B>::new(&device);
    // Eager copies, so that both runs start from the same initialized weights.
    let model = model.clone().load_record(model.into_record());
    let bases = || {
        let sigma = Tensor::from_floats([3.0, 1.0], &Default::default());
        [
            (
                model.fc1.weight.id,
                LowRankBasis::new(leading(3, 2), sigma.clone(), leading(5, 2)).unwrap(),
            ),
            (
                model.fc2.weight.id,
                LowRankBasis::new(leading(5, 2), sigma, leading(2, 2)).unwrap(),
            ),
        ]
    };

    let mut optim = config()
        .init(AdamWConfig::new().init(), &model, bases())
        .unwrap();
    let straight = train(model.clone(), &mut optim, 0..6);

    let dir = TempDir(std::env::temp_dir().join(format!("spf-resume-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    let mut optim = config()
        .init(AdamWConfig::new().init(), &model, bases())
        .unwrap();
    let halfway = train(model, &mut optim, 0..3);
    assert!(
        optim.last_stats().removed() > 0,
        "the run should exercise the projection"
    );
    halfway.save_file(dir.0.join("model"), &recorder).unwrap();
    recorder
        .record(optim.to_record(), dir.0.join("optim"))
        .unwrap();
    drop(optim);

    let restored = Mlp::<B>::new(&device)
        .load_file(dir.0.join("model"), &recorder, &device)
        .unwrap();
    let record = recorder.load(dir.0.join("optim"), &device).unwrap();
    let mut optim = config()
        .init(AdamWConfig::new().init(), &restored, [])
        .unwrap()
        .try_load_record::<Mlp<B>>(record)
        .unwrap();
    assert_eq!(optim.steps(), 3);
    let resumed = train(restored, &mut optim, 3..6);

    for (a, b) in [(&straight.fc1, &resumed.fc1), (&straight.fc2, &resumed.fc2)] {
        assert_eq!(a.weight.val().into_data(), b.weight.val().into_data());
        assert_eq!(
            a.bias.as_ref().unwrap().val().into_data(),
            b.bias.as_ref().unwrap().val().into_data()
        );
    }
}
