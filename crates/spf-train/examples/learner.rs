//! SPF inside burn-train's `Learner`: the model goes in wrapped as `spf_train::Protected`, whose
//! optimizer step is projected through SPF and whose record carries SPF's state, so burn-train's
//! checkpoints hold it; the projection statistics appear beside the loss on the dashboard (a
//! terminal UI in a terminal, plain lines otherwise) and in the metric logs.
//!
//! An MLP learns a regression task while SPF (AdamW inside, `ConflictOnly`, rank 4) keeps it from
//! moving against a four-sample "safety" regression, re-estimating its bases every 5 steps.
//!
//! Run: `cargo run -p spf-train --example learner`, which trains 3 epochs into
//! `target/spf-runs/learner`. `-- --epochs 4 --resume 3` continues that run from its epoch-3
//! checkpoint: burn-train reloads the model (with SPF's bases, step counter and refresh state),
//! the inner AdamW state and the scheduler, and the fourth epoch is the one an uninterrupted
//! four-epoch run takes (`tests/learner.rs` checks it bit for bit). `--devices N` trains on N
//! replicas under burn-train's multi-device strategy.
//!
//! `--lora R` trains LoRA adapters of rank `R` instead of the weights. Protecting a LoRA run takes
//! no other change: adapt the model with burn's `apply_lora` before wrapping it, and SPF keys its
//! bases by the adapted weights, estimates them from the effective weights' safety gradient and
//! projects the factors' gradients (docs/method.md, "LoRA adapters"):
//!
//! ```text
//! let model = Regressor::new(&device).apply_lora(Lora::new(rank, 2.0 * rank as f64));
//! let protection = SpfConfig::new()
//!     .with_refresh(RefreshPolicy::Every(5))
//!     .protection(&model, [])?                      // the first step estimates the bases
//!     .with_safety_source(move |m: &Regressor| m.regression(safety.clone()).loss);
//! let model = Protected::new(model, protection);     // then burn-train's Learner, as usual
//! ```

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::module::{Lora, Module};
use burn::optim::AdamWConfig;
use burn::tensor::{Device, Distribution, Tensor, TensorData, activation::tanh};
use burn::train::metric::LossMetric;
use burn::train::{
    ExecutionStrategy, InferenceStep, Learner, MultiDeviceOptim, RegressionOutput,
    SupervisedTraining, TrainOutput, TrainStep,
};
use spf_core::testing::Mlp;
use spf_core::{RankPolicy, RefreshPolicy, SpfConfig, StepStats, SubspaceConfig};
use spf_train::{Protected, SpfMetric, SpfStatistic};

const INPUT: usize = 8;
const WIDTH: usize = 32;
const OUTPUT: usize = 4;
const SAMPLES: usize = 512;
const BATCH: usize = 32;
const LR: f64 = 3e-3;

/// A three-layer tanh MLP as burn-train's regression model (the MLP is the one the tests share;
/// burn-train's step traits are implemented here, on this crate's own type).
#[derive(Module, Debug)]
pub struct Regressor {
    mlp: Mlp,
}

impl Regressor {
    fn new(device: &Device) -> Self {
        Self {
            mlp: Mlp::new(&[INPUT, WIDTH, WIDTH, OUTPUT], device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.mlp.forward(x)
    }

    fn regression(&self, batch: Pairs) -> RegressionOutput {
        let output = self.forward(batch.x);
        let loss = (output.clone() - batch.y.clone()).square().mean();
        RegressionOutput {
            loss,
            output,
            targets: batch.y,
        }
    }
}

impl TrainStep for Regressor {
    type Input = Pairs;
    type Output = RegressionOutput;

    fn step(&self, batch: Pairs) -> TrainOutput<RegressionOutput> {
        let output = self.regression(batch);
        TrainOutput::new(self, output.loss.backward(), output)
    }
}

impl InferenceStep for Regressor {
    type Input = Pairs;
    type Output = RegressionOutput;

    fn step(&self, batch: Pairs) -> RegressionOutput {
        self.regression(batch)
    }
}

/// One input and its target.
#[derive(Debug, Clone)]
pub struct Sample {
    x: Vec<f32>,
    y: Vec<f32>,
}

/// A batch of inputs and targets.
#[derive(Debug, Clone)]
pub struct Pairs {
    x: Tensor<2>,
    y: Tensor<2>,
}

#[derive(Clone)]
struct PairBatcher;

impl Batcher<Sample, Pairs> for PairBatcher {
    fn batch(&self, items: Vec<Sample>, device: &Device) -> Pairs {
        let n = items.len();
        let (x, y): (Vec<_>, Vec<_>) = items.into_iter().map(|s| (s.x, s.y)).unzip();
        Pairs {
            x: Tensor::from_data(TensorData::new(x.concat(), [n, INPUT]), device),
            y: Tensor::from_data(TensorData::new(y.concat(), [n, OUTPUT]), device),
        }
    }
}

/// `n` samples of `y = tanh(x T)`: the teacher `T` drawn with seed `teacher`, the inputs with
/// seed `inputs`.
fn task(n: usize, teacher: u64, inputs: u64, device: &Device) -> Vec<Sample> {
    let normal = Distribution::Normal(0.0, 1.0);
    device.seed(teacher);
    let teacher = Tensor::<2>::random([INPUT, OUTPUT], normal, device);
    device.seed(inputs);
    let x = Tensor::<2>::random([n, INPUT], normal, device);
    let y = tanh(x.clone().matmul(teacher));
    let rows = |t: Tensor<2>, width: usize| -> Vec<Vec<f32>> {
        let values: Vec<f32> = t.into_data().try_to_vec().expect("f32 data");
        values.chunks(width).map(<[f32]>::to_vec).collect()
    };
    rows(x, INPUT)
        .into_iter()
        .zip(rows(y, OUTPUT))
        .map(|(x, y)| Sample { x, y })
        .collect()
}

/// Batches of `BATCH` samples in order (no shuffling, so a resumed run sees the same batches).
fn loader(items: Vec<Sample>) -> Arc<dyn DataLoader<Pairs>> {
    DataLoaderBuilder::new(PairBatcher)
        .batch_size(BATCH)
        .build(InMemDataset::new(items))
}

/// What a run leaves behind.
pub struct Outcome {
    /// The trained model.
    pub model: Regressor,
    /// The wrapper's statistics after its last step.
    pub stats: StepStats,
}

/// How to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Epochs in all, counting those before `resume`.
    pub epochs: usize,
    /// From the checkpoint of this epoch (`None`: from scratch).
    pub resume: Option<usize>,
    /// Replicas (more than one: burn-train's multi-device strategy).
    pub devices: usize,
    /// Train LoRA adapters of this rank instead of the weights.
    pub lora: Option<usize>,
}

/// Trains into `dir` as `options` say. More than one device runs burn-train's multi-device
/// strategy (`ExecutionStrategy::MultiDevice` with the optimization sharded, which hands SPF the
/// devices' gradients), with the CPU device repeated, as the CPU has one.
pub fn run(dir: &Path, options: Options) -> Result<Outcome, Box<dyn Error>> {
    let Options {
        epochs,
        resume,
        devices,
        lora,
    } = options;
    let device = Device::default().autodiff();
    let plain = device.clone().inner();
    let train = task(SAMPLES, 1, 10, &plain);
    let valid = task(SAMPLES / 4, 1, 11, &plain);
    // The safety examples follow another teacher: the two objectives conflict.
    let safety = PairBatcher.batch(task(4, 2, 12, &plain), &device);

    device.seed(0);
    let mut model = Regressor::new(&device);
    if let Some(rank) = lora {
        // Every 2-D weight gets adapters (burn draws `A` from the seeded state); all else freezes.
        model = model.apply_lora(Lora::new(rank, 2.0 * rank as f64));
    }
    let protection = SpfConfig::new()
        .with_refresh(RefreshPolicy::Every(5))
        .with_estimator(SubspaceConfig::new().with_rank(RankPolicy::Fixed(4)))
        .protection(&model, [])?
        .with_safety_source(move |m: &Regressor| m.regression(safety.clone()).loss);
    let model = Protected::new(model, protection);
    let feed = model.stats_feed();

    let mut training = SupervisedTraining::new(dir, loader(train), loader(valid))
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .metric_train_numeric(SpfMetric::new(SpfStatistic::ConflictShare, feed.clone()))
        .metric_train_numeric(SpfMetric::new(
            SpfStatistic::RemovedEnergyShare,
            feed.clone(),
        ))
        .metric_train_numeric(SpfMetric::new(SpfStatistic::Refreshes, feed.clone()))
        .with_default_checkpointers()
        .num_epochs(epochs)
        .summary();
    if let Some(epoch) = resume {
        training = training.checkpoint(epoch);
    }
    if devices > 1 {
        let devices = vec![device; devices];
        let strategy = ExecutionStrategy::MultiDevice(devices, MultiDeviceOptim::OptimSharded);
        training = training.with_training_strategy(strategy.into());
    }
    let result = training.launch(Learner::new(model, AdamWConfig::new().init(), LR));
    Ok(Outcome {
        model: result.model.model,
        stats: feed.latest(),
    })
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        epochs: 3,
        resume: None,
        devices: 1,
        lora: None,
    };
    let mut dir = PathBuf::from("target/spf-runs/learner");
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--epochs" => options.epochs = value()?.parse()?,
            "--resume" => options.resume = Some(value()?.parse()?),
            "--out" => dir = value()?.into(),
            "--devices" => options.devices = value()?.parse()?,
            "--lora" => options.lora = Some(value()?.parse()?),
            _ => return Err(format!("unknown argument {flag}").into()),
        }
    }
    if options.resume.is_none() && dir.exists() {
        // A fresh run: burn-train appends to the logs of an old one.
        std::fs::remove_dir_all(&dir)?;
    }
    let outcome = run(&dir, options)?;
    let stats = &outcome.stats;
    println!(
        "last step: {:.1}% of safety directions conflicting, {:.3}% of gradient energy removed, \
         {} refreshes; checkpoints and logs in {}",
        100.0 * stats.conflict_share(),
        100.0 * stats.removed_energy_share(),
        stats.refresh.count,
        dir.display()
    );
    Ok(())
}
