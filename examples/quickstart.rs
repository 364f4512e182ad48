//! Quickstart: a small MLP is fine-tuned on a new task while a "safety" loss is watched.
//!
//! 1. Align: train the MLP on task B plus a few "safety" examples until it fits both.
//! 2. Fine-tune on task A alone, from the same weights on the same batches: with plain AdamW,
//!    and with AdamW wrapped by SPF, projecting either the gradient or AdamW's update. Before
//!    every step the safety basis of each layer is re-estimated from the safety gradient at the
//!    current weights, by an exact SVD on the host.
//!
//! Run: `cargo run --release --example quickstart`

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Device, Distribution, Tensor, TensorData, activation::tanh};
use faer::Mat;
use spf::{LowRankBasis, ProjectionTarget, SafetyProjectedOptimizer, SpfConfig, VectorPolicy};

type Inner = NdArray;
type B = Autodiff<Inner>;

const WIDTH: usize = 64;
const INPUT: usize = 8;
const OUTPUT: usize = 4;
const SAFETY_SAMPLES: usize = 4;
const ALIGN_STEPS: usize = 600;
const FINETUNE_STEPS: usize = 300;
const PRINT_EVERY: usize = 30;
const LR: f64 = 3e-3;

#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
    fc3: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    fn new(device: &B::Device) -> Self {
        Self {
            fc1: LinearConfig::new(INPUT, WIDTH).init(device),
            fc2: LinearConfig::new(WIDTH, WIDTH).init(device),
            fc3: LinearConfig::new(WIDTH, OUTPUT).init(device),
        }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.fc3
            .forward(tanh(self.fc2.forward(tanh(self.fc1.forward(x)))))
    }

    fn layers(&self) -> [&Linear<B>; 3] {
        [&self.fc1, &self.fc2, &self.fc3]
    }
}

/// A regression task `y = tanh(x T)` for a fixed random teacher `T`.
struct Task {
    teacher: Tensor<B, 2>,
}

impl Task {
    fn new(device: &Device<B>) -> Self {
        let teacher = Tensor::random([INPUT, OUTPUT], Distribution::Normal(0.0, 1.0), device);
        Self { teacher }
    }

    fn batch(&self, size: usize, device: &Device<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let x = Tensor::random([size, INPUT], Distribution::Normal(0.0, 1.0), device);
        let y = tanh(x.clone().matmul(self.teacher.clone()));
        (x, y)
    }
}

fn mse(model: &Mlp<B>, (x, y): &(Tensor<B, 2>, Tensor<B, 2>)) -> Tensor<B, 1> {
    (model.forward(x.clone()) - y.clone()).square().mean()
}

fn value(loss: Tensor<B, 1>) -> f64 {
    loss.into_scalar() as f64
}

/// The exact rank-`k` basis of a matrix on the host (faer's thin SVD), keeping only directions
/// whose singular value is above `1e-6·σ_1`.
fn exact_basis(grad: Tensor<Inner, 2>, k: usize) -> LowRankBasis<Inner> {
    let [rows, cols] = grad.dims();
    let device = grad.device();
    let values: Vec<f64> = grad.into_data().iter::<f64>().collect();
    let matrix = Mat::from_fn(rows, cols, |i, j| values[i * cols + j]);
    let svd = matrix.thin_svd().expect("SVD of a finite matrix converges");
    let sigma = svd.S().column_vector();
    let k = (0..k.min(rows).min(cols))
        .take_while(|&i| sigma[i] > 1e-6 * sigma[0])
        .count();
    let factor = |m: faer::MatRef<f64>, n: usize| {
        let data: Vec<f32> = (0..n)
            .flat_map(|i| (0..k).map(move |j| m[(i, j)] as f32))
            .collect();
        Tensor::from_data(TensorData::new(data, [n, k]), &device)
    };
    let s: Vec<f32> = (0..k).map(|i| sigma[i] as f32).collect();
    LowRankBasis::new(
        factor(svd.U(), rows),
        Tensor::from_data(TensorData::new(s, [k]), &device),
        factor(svd.V(), cols),
    )
    .expect("an SVD's factors are orthonormal")
}

/// One basis per weight (rank `SAFETY_SAMPLES`, which is exact: a batch of n samples gives a
/// weight gradient of rank at most n) and one per bias, from the safety gradient at `model`.
fn safety_bases(
    model: &Mlp<B>,
    safety: &(Tensor<B, 2>, Tensor<B, 2>),
) -> Vec<(ParamId, LowRankBasis<Inner>)> {
    let grads = GradientsParams::from_grads(mse(model, safety).backward(), model);
    let mut bases = Vec::new();
    for layer in model.layers() {
        let weight = grads
            .get::<Inner, 2>(layer.weight.id)
            .expect("weight gradient");
        bases.push((layer.weight.id, exact_basis(weight, SAFETY_SAMPLES)));
        if let Some(bias) = &layer.bias {
            let grad = grads.get::<Inner, 1>(bias.id).expect("bias gradient");
            let basis = LowRankBasis::from_vector(grad).expect("finite bias gradient");
            bases.push((bias.id, basis));
        }
    }
    bases
}

/// Safety and task-A test losses, every `PRINT_EVERY` steps, of one fine-tuning run.
type Curve = Vec<(f64, f64)>;

/// Fine-tunes a copy of `aligned` on `batches`; `refresh` runs before every step.
fn finetune<O: Optimizer<Mlp<B>, B>>(
    aligned: &Mlp<B>,
    mut optim: O,
    data: &FineTuning,
    mut refresh: impl FnMut(&mut O, &Mlp<B>),
) -> Curve {
    let mut model = aligned.clone();
    let point = |m: &Mlp<B>| (value(mse(m, &data.test)), value(mse(m, &data.safety)));
    let mut curve = vec![point(&model)];
    for (step, batch) in data.batches.iter().enumerate() {
        refresh(&mut optim, &model);
        let grads = GradientsParams::from_grads(mse(&model, batch).backward(), &model);
        model = optim.step(LR, model, grads);
        if (step + 1) % PRINT_EVERY == 0 {
            curve.push(point(&model));
        }
    }
    curve
}

/// What every fine-tuning run sees: the same batches of task A, its test set, and the safety set.
struct FineTuning {
    batches: Vec<(Tensor<B, 2>, Tensor<B, 2>)>,
    test: (Tensor<B, 2>, Tensor<B, 2>),
    safety: (Tensor<B, 2>, Tensor<B, 2>),
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Default::default();
    B::seed(&device, 7);
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
    let mut model = Mlp::<B>::new(&device);
    let mut optim = AdamWConfig::new().init::<B, Mlp<B>>();
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
    let plain = finetune(&aligned, AdamWConfig::new().init(), &data, |_, _| {});
    let mut spf_curves = Vec::new();
    for target in [ProjectionTarget::Gradient, ProjectionTarget::Update] {
        let config = SpfConfig::new()
            .with_target(target)
            .with_vector_policy(VectorPolicy::Pcgrad)
            .with_rank(SAFETY_SAMPLES);
        let spf = config.init(AdamWConfig::new().init(), &aligned, [])?;
        // Re-estimate the safety subspace at the current weights before every step.
        let refresh = |spf: &mut SafetyProjectedOptimizer<_, B>, model: &Mlp<B>| {
            spf.insert_bases(safety_bases(model, &data.safety))
                .expect("bases estimated from this model fit it");
        };
        spf_curves.push(finetune(&aligned, spf, &data, refresh));
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
