//! What the data-parallel tests share: the regression loss of the tests' MLP, its batches and
//! safety batch, the wrapper both runs build, snapshots of a run, the single-device run on the
//! merged batches, and the comparison against it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
pub use spf_core::testing::Mlp;
use spf_core::testing::{Gaussian, upload};
use spf_core::{
    ProjectionTarget, RankPolicy, RefreshPolicy, SafetyGradientSource, SafetyProjectedOptimizer,
    SourceError, SpfConfig, SubspaceConfig,
};

/// The device every run computes on: burn's default (the CPU's `flex` here).
pub fn device() -> Device {
    Device::default()
}

/// [`device`] with autodiff, where the models live.
pub fn autodiff() -> Device {
    device().autodiff()
}

pub const SHARD: usize = 8;
pub const REPLICAS: usize = 2;
pub const STEPS: usize = 7;
pub const LR: f64 = 1e-2;

/// The regression loss of `model` on `batch`.
pub fn loss(model: &Mlp, (x, y): &(TensorData, TensorData), device: &Device) -> Tensor<1> {
    let x = Tensor::from_data(x.clone(), device);
    let y = Tensor::from_data(y.clone(), device);
    (model.forward(x) - y).square().mean()
}

/// `n` samples of a random regression, drawn with `seed` on the host: burn's seeded random
/// state is one per process, so a test running beside this one could draw between a `seed` and
/// its draws, and two calls with one seed would then differ (seen once on WGPU in CI, where the
/// replicas and the single run then trained on different batches).
pub fn samples(n: usize, seed: u64) -> (TensorData, TensorData) {
    let mut rng = Gaussian::new(seed);
    let (x, y) = (rng.matrix(n, 6), rng.matrix(n, 4));
    let float = |m| upload(&m, &device()).into_data();
    (float(x), float(y))
}

/// Rows `from..to` of a batch.
pub fn rows((x, y): &(TensorData, TensorData), from: usize, to: usize) -> (TensorData, TensorData) {
    let pick = |t: &TensorData| {
        Tensor::<2>::from_data(t.clone(), &device())
            .slice(from..to)
            .into_data()
    };
    (pick(x), pick(y))
}

/// The safety loss on a fixed four-sample batch: every replica holds the same one.
#[derive(Clone)]
pub struct Safety(pub (TensorData, TensorData));

impl SafetyGradientSource<Mlp> for Safety {
    fn safety_gradients(&mut self, module: &Mlp) -> Result<GradientsParams, SourceError> {
        let loss = loss(module, &self.0, &device());
        Ok(GradientsParams::from_grads(loss.backward(), module))
    }
}

pub type Spf = SafetyProjectedOptimizer<Safety>;

/// The wrapper every replica (and the single-device run) builds: SGD with momentum under SPF,
/// the Update target, rank 2, bases estimated at the first step and every 3 steps. SGD rather
/// than Adam because its step scales with the gradient: a sum where the average belongs (a
/// learning rate off by the number of replicas) shows, where Adam's normalization would hide it.
pub fn optimizer(model: &Mlp, safety: &Safety) -> Spf {
    SpfConfig::new()
        .with_target(ProjectionTarget::Update)
        .with_refresh(RefreshPolicy::Every(3))
        .with_estimator(SubspaceConfig::new().with_rank(RankPolicy::Fixed(2)))
        .init(
            SgdConfig::new()
                .with_momentum(Some(MomentumConfig::new()))
                .init(),
            model,
            [],
        )
        .unwrap()
        .with_safety_source(safety.clone())
}

/// Every parameter's values and every basis's factors (`U`, `Σ`, `V`) after one step, by the
/// parameter's place in the module (parameter ids are drawn afresh in each process).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub params: Vec<Vec<f32>>,
    pub bases: BTreeMap<usize, [Vec<f32>; 3]>,
    pub refreshes: usize,
}

struct Collect<'a>(&'a mut Vec<(ParamId, Vec<f32>)>);

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let values = param.val().into_data().try_to_vec().unwrap();
        self.0.push((param.id, values));
    }
}

fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.clone().into_data().try_to_vec().unwrap()
}

pub fn snapshot(model: &Mlp, optim: &Spf) -> Snapshot {
    let mut params = Vec::new();
    model.visit(&mut Collect(&mut params));
    let place = |id: &ParamId| params.iter().position(|(p, _)| p == id).unwrap();
    let bases = optim
        .bases()
        .iter()
        .map(|(id, b)| (place(id), [values(b.u()), values(b.sigma()), values(b.v())]))
        .collect();
    Snapshot {
        params: params.into_iter().map(|(_, values)| values).collect(),
        bases,
        refreshes: optim.last_stats().refresh.count,
    }
}

/// The batches of every step: `REPLICAS * SHARD` samples each.
pub fn batches() -> Vec<(TensorData, TensorData)> {
    (0..STEPS as u64)
        .map(|step| samples(REPLICAS * SHARD, step))
        .collect()
}

/// One replica on the merged batches, steps `0..STEPS`.
pub fn single(start: &Mlp, safety: &Safety) -> Vec<Snapshot> {
    let (mut model, mut optim) = (start.clone(), optimizer(start, safety));
    batches()
        .iter()
        .map(|batch| {
            let grads =
                GradientsParams::from_grads(loss(&model, batch, &device()).backward(), &model);
            model = optim.step(LR, model.clone(), grads);
            snapshot(&model, &optim)
        })
        .collect()
}

/// The model every run starts from.
pub fn first_model() -> Mlp {
    let device = autodiff();
    device.seed(7);
    // Drawn now: a clone taken before burn's lazy initialization would draw its own values.
    Mlp::new(&[6, 16, 4], &device).materialized()
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Asserts that `other`, a data-parallel run, took the steps of `one`, the single replica on the
/// merged batches: every weight within 1e-5, every basis (`UΣVᵀ`, as singular vectors are defined
/// up to sign) within 1e-3 and its singular values within 1e-4 of the largest, the same refreshes.
/// The difference is the order of the sums: the mean of the shards' means is the merged mean in
/// exact arithmetic.
pub fn assert_same_steps(one: &[Snapshot], other: &[Snapshot], what: &str) {
    assert_eq!(one.len(), other.len(), "{what}: steps");
    for (step, (a, b)) in one.iter().zip(other).enumerate() {
        assert_eq!(a.refreshes, b.refreshes, "{what}, step {step}: refreshes");
        for (i, (x, y)) in a.params.iter().zip(&b.params).enumerate() {
            let d = max_difference(x, y);
            assert!(
                d < 1e-5,
                "{what}, step {step}: parameter {i} differs by {d}"
            );
        }
        let keys = |s: &Snapshot| s.bases.keys().copied().collect::<Vec<_>>();
        assert_eq!(
            keys(a),
            keys(b),
            "{what}, step {step}: protected parameters"
        );
        for (i, [u, sigma, v]) in &a.bases {
            let [u2, sigma2, v2] = &b.bases[i];
            let d = max_difference(sigma, sigma2) / sigma[0];
            assert!(
                d < 1e-4,
                "{what}, step {step}: singular values of {i} differ by {d}"
            );
            let outer = |u: &[f32], v: &[f32]| -> Vec<f32> {
                let (k, m, n) = (sigma.len(), u.len() / sigma.len(), v.len() / sigma.len());
                (0..m * n)
                    .map(|ij| {
                        (0..k)
                            .map(|r| u[(ij / n) * k + r] * v[(ij % n) * k + r])
                            .sum()
                    })
                    .collect()
            };
            let d = max_difference(&outer(u, v), &outer(u2, v2));
            assert!(d < 1e-3, "{what}, step {step}: basis of {i} differs by {d}");
        }
    }
}

/// A model with two parameters of each size: `layers.0.weight` and `layers.1.weight` are both
/// 4 × 4, `layers.0.bias` and `layers.1.bias` both of length 4.
pub fn square_model() -> Mlp {
    Mlp::new(&[4, 4, 4], &autodiff()).materialized()
}

/// The uneven gradients the data-parallel tests reduce: per scenario, which of the square
/// model's four parameters (module order: weight, bias, weight, bias) each of two replicas has a
/// gradient for.
pub const UNEVEN: [(&str, [[bool; 4]; 2]); 3] = [
    // Each replica misses a different parameter of the same size (a branch, an expert).
    (
        "swapped",
        [[true, false, false, false], [false, false, true, false]],
    ),
    // One replica misses gradients the other has.
    ("one missing", [[true; 4], [true, false, true, false]]),
    // One replica has no gradient at all.
    ("one empty", [[false; 4], [true; 4]]),
];

/// Replica `peer`'s gradients: `peer + 1` in every entry of each parameter it `has`.
pub fn uneven_grads(model: &Mlp, has: [bool; 4], peer: usize) -> GradientsParams {
    let device = device();
    let value = (peer + 1) as f32;
    let mut grads = GradientsParams::new();
    for (layer, (weight, bias)) in model.layers.iter().zip([(0, 1), (2, 3)]) {
        if has[weight] {
            grads.register(layer.weight.id, Tensor::<2>::full([4, 4], value, &device));
        }
        if has[bias]
            && let Some(b) = &layer.bias
        {
            grads.register(b.id, Tensor::<1>::full([4], value, &device));
        }
    }
    grads
}

/// The square model's gradients in `grads`, in module order: `None` for a parameter without
/// one, else its entries.
pub fn uneven_values(model: &Mlp, grads: &GradientsParams) -> Vec<Option<Vec<f32>>> {
    let mut out = Vec::new();
    for layer in &model.layers {
        out.push(grads.get::<2>(layer.weight.id).map(|g| values(&g)));
        let bias = layer.bias.as_ref().expect("a bias");
        out.push(grads.get::<1>(bias.id).map(|g| values(&g)));
    }
    out
}

/// What the reduced gradients must be: a parameter no replica has gets none; any other the sum
/// over the replicas that have it, in every entry.
pub fn uneven_expected(has: [[bool; 4]; 2]) -> Vec<Option<Vec<f32>>> {
    (0..4)
        .map(|param| {
            let sum: f32 = (0..2)
                .filter(|&peer| has[peer][param])
                .map(|peer| (peer + 1) as f32)
                .sum();
            let len = if param % 2 == 0 { 16 } else { 4 };
            (has[0][param] || has[1][param]).then(|| vec![sum; len])
        })
        .collect()
}
