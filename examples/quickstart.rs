//! Quickstart: a small MLP is fine-tuned on a new task while a "safety" loss is watched.
//!
//! 1. Align: train the MLP on task B plus a few "safety" examples until it fits both.
//! 2. Fine-tune on task A alone, from the same weights on the same batches: with plain AdamW,
//!    and with AdamW wrapped by SPF, projecting either the gradient or AdamW's update. Before
//!    every step SPF re-estimates the safety basis of each layer from the safety gradient at the
//!    current weights, by randomized SVD (`RefreshPolicy::Every(1)`).
//!
//! Run: `cargo run --release --example quickstart`

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Tensor, activation::tanh};
use spf::{ProjectionTarget, RankPolicy, RefreshPolicy, SpfConfig, SubspaceConfig, VectorPolicy};
// A three-layer tanh MLP, the one the tests train too; SPF wraps the optimizer of any module.
use spf_core::testing::Mlp;

const WIDTH: usize = 64;
const INPUT: usize = 8;
const OUTPUT: usize = 4;
const SAFETY_SAMPLES: usize = 4;
const ALIGN_STEPS: usize = 600;
const FINETUNE_STEPS: usize = 300;
const PRINT_EVERY: usize = 30;
const LR: f64 = 3e-3;

/// A regression task `y = tanh(x T)` for a fixed random teacher `T`.
struct Task {
    teacher: Tensor<2>,
}

impl Task {
    fn new(device: &Device) -> Self {
        let teacher = Tensor::random([INPUT, OUTPUT], Distribution::Normal(0.0, 1.0), device);
        Self { teacher }
    }

    fn batch(&self, size: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let x = Tensor::random([size, INPUT], Distribution::Normal(0.0, 1.0), device);
        let y = tanh(x.clone().matmul(self.teacher.clone()));
        (x, y)
    }
}

fn mse(model: &Mlp, (x, y): &(Tensor<2>, Tensor<2>)) -> Tensor<1> {
    (model.forward(x.clone()) - y.clone()).square().mean()
}

fn value(loss: Tensor<1>) -> f64 {
    loss.into_scalar::<f64>()
}

/// Safety and task-A test losses, every `PRINT_EVERY` steps, of one fine-tuning run.
type Curve = Vec<(f64, f64)>;

/// Fine-tunes a copy of `aligned` on the batches of `data`, each step taken by `step`.
fn finetune(
    aligned: &Mlp,
    mut step: impl FnMut(Mlp, GradientsParams) -> Mlp,
    data: &FineTuning,
) -> Curve {
    let mut model = aligned.clone();
    let point = |m: &Mlp| (value(mse(m, &data.test)), value(mse(m, &data.safety)));
    let mut curve = vec![point(&model)];
    for (i, batch) in data.batches.iter().enumerate() {
        let grads = GradientsParams::from_grads(mse(&model, batch).backward(), &model);
        model = step(model, grads);
        if (i + 1) % PRINT_EVERY == 0 {
            curve.push(point(&model));
        }
    }
    curve
}

/// What every fine-tuning run sees: the same batches of task A, its test set, and the safety set.
struct FineTuning {
    batches: Vec<(Tensor<2>, Tensor<2>)>,
    test: (Tensor<2>, Tensor<2>),
    safety: (Tensor<2>, Tensor<2>),
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::default().autodiff();
    device.seed(7);
    let task_a = Task::new(&device);
    let task_b = Task::new(&device);
    let safety_x = Tensor::random(
        [SAFETY_SAMPLES, INPUT],
        Distribution::Normal(0.0, 2.0),
        &device,
    );
    let safety_y = Tensor::random(
        [SAFETY_SAMPLES, OUTPUT],
        Distribution::Uniform(-0.8, 0.8),
        &device,
    );
    let safety = (safety_x, safety_y);

    // Stage 1: align on task B plus the safety examples.
    let mut model = Mlp::new(&[INPUT, WIDTH, WIDTH, OUTPUT], &device);
    let mut optim = AdamWConfig::new().init();
    for _ in 0..ALIGN_STEPS {
        let loss = mse(&model, &task_b.batch(64, &device)) + mse(&model, &safety);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(LR, model, grads);
    }
    let aligned = model;
    println!(
        "aligned: task-B test loss {:.4}, safety loss {:.4}",
        value(mse(&aligned, &task_b.batch(1024, &device))),
        value(mse(&aligned, &safety)),
    );

    // Stage 2: fine-tune on task A alone, from the same weights on the same batches.
    let data = FineTuning {
        batches: (0..FINETUNE_STEPS)
            .map(|_| task_a.batch(64, &device))
            .collect(),
        test: task_a.batch(1024, &device),
        safety,
    };
    let mut adamw = AdamWConfig::new().init();
    let plain = finetune(&aligned, |m, g| adamw.step(LR, m, g), &data);
    let mut spf_curves = Vec::new();
    for target in [ProjectionTarget::Gradient, ProjectionTarget::Update] {
        // Every weight keeps SAFETY_SAMPLES directions, which is exact here: a batch of n samples
        // gives a weight gradient of rank at most n. Biases are protected by the Pcgrad rule.
        let estimator = SubspaceConfig::new()
            .with_vector_policy(VectorPolicy::Pcgrad)
            .with_rank(RankPolicy::Fixed(SAFETY_SAMPLES));
        let config = SpfConfig::new()
            .with_target(target)
            .with_refresh(RefreshPolicy::Every(1))
            .with_estimator(estimator);
        let safety = data.safety.clone();
        let mut spf = config
            .init(AdamWConfig::new().init(), &aligned, [])?
            .with_safety_source(move |model: &Mlp| mse(model, &safety));
        spf_curves.push(finetune(&aligned, |m, g| spf.step(LR, m, g), &data));
    }

    println!(
        "\nfine-tuning on task A ({FINETUNE_STEPS} AdamW steps, lr {LR}); test loss on A / safety loss"
    );
    println!("         plain AdamW        SPF, Gradient target   SPF, Update target");
    println!(" step    task-A  safety     task-A  safety         task-A  safety");
    for (i, ((p, g), u)) in plain
        .iter()
        .zip(&spf_curves[0])
        .zip(&spf_curves[1])
        .enumerate()
    {
        println!(
            "{:>5}    {:.4}  {:.4}     {:.4}  {:.4}         {:.4}  {:.4}",
            i * PRINT_EVERY,
            p.0,
            p.1,
            g.0,
            g.1,
            u.0,
            u.1
        );
    }
    Ok(())
}
