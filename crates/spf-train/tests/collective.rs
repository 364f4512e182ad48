//! Data parallelism on burn's collective engine: two replicas, each on a shard of `b` samples,
//! stepping through `spf_train::collective::step`, take the steps one replica takes on the
//! merged batches of `2b`, through refreshes of the bases; the replicas agree bit for bit; and a
//! run resumed from one replica's checkpoint ends where an uninterrupted one does, bit for bit.
//!
//! The replicas are two peers on burn-ndarray's one CPU device (burn-collective keys peers by id,
//! not device, as its own tests do): the all-reduce and everything the wrapper does are the same
//! on two devices, only slower here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use burn::collective::{CollectiveConfig, PeerId, finish_collective, register, reset_collective};
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer};
use burn::optim::{Sgd, SgdConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData, activation::tanh};
use spf_core::checkpoint;
use spf_core::{
    ProjectionTarget, RankPolicy, RefreshPolicy, SafetyGradientSource, SafetyProjectedOptimizer,
    SourceError, SpfConfig, SubspaceConfig,
};
use spf_train::collective;

type Inner = NdArray;
type B = Autodiff<Inner>;

const SHARD: usize = 8;
const REPLICAS: usize = 2;
const STEPS: usize = 7;
const LR: f64 = 1e-2;

#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.fc2.forward(tanh(self.fc1.forward(x)))
    }

    fn loss(&self, (x, y): &(TensorData, TensorData), device: &B::Device) -> Tensor<B, 1> {
        let x = Tensor::from_data(x.clone(), device);
        let y = Tensor::from_data(y.clone(), device);
        (self.forward(x) - y).square().mean()
    }
}

/// `n` samples of a random regression, drawn with `seed`.
fn samples(n: usize, seed: u64) -> (TensorData, TensorData) {
    let device = Default::default();
    Inner::seed(&device, seed);
    let x = Tensor::<Inner, 2>::random([n, 6], Distribution::Normal(0.0, 1.0), &device);
    let y = Tensor::<Inner, 2>::random([n, 4], Distribution::Normal(0.0, 1.0), &device);
    (x.into_data(), y.into_data())
}

/// Rows `from..to` of a batch.
fn rows((x, y): &(TensorData, TensorData), from: usize, to: usize) -> (TensorData, TensorData) {
    let pick = |t: &TensorData| {
        Tensor::<Inner, 2>::from_data(t.clone(), &Default::default())
            .slice([from..to])
            .into_data()
    };
    (pick(x), pick(y))
}

/// The safety loss on a fixed four-sample batch: every replica holds the same one.
#[derive(Clone)]
struct Safety((TensorData, TensorData));

impl SafetyGradientSource<Mlp<B>, B> for Safety {
    fn safety_gradients(&mut self, module: &Mlp<B>) -> Result<GradientsParams, SourceError> {
        let loss = module.loss(&self.0, &Default::default());
        Ok(GradientsParams::from_grads(loss.backward(), module))
    }
}

type Spf = SafetyProjectedOptimizer<OptimizerAdaptor<Sgd<Inner>, Mlp<B>, B>, B, Safety>;

/// The wrapper every replica (and the single-device run) builds: SGD with momentum under SPF,
/// the Update target, rank 2, bases estimated at the first step and every 3 steps. SGD rather
/// than Adam because its step scales with the gradient: a sum where the average belongs (a
/// learning rate off by the number of replicas) shows, where Adam's normalization would hide it.
fn optimizer(model: &Mlp<B>, safety: &Safety) -> Spf {
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

/// Every parameter's values and every basis's factors after one step, keyed by parameter id.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    params: BTreeMap<ParamId, Vec<f32>>,
    bases: BTreeMap<ParamId, [Vec<f32>; 3]>,
    refreshes: usize,
}

struct Collect<'a>(&'a mut BTreeMap<ParamId, Vec<f32>>);

impl<B: Backend> ModuleVisitor<B> for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let values = param.val().into_data().to_vec().unwrap();
        self.0.insert(param.id, values);
    }
}

fn values<const D: usize>(t: &Tensor<Inner, D>) -> Vec<f32> {
    t.clone().into_data().to_vec().unwrap()
}

fn snapshot(model: &Mlp<B>, optim: &Spf) -> Snapshot {
    let mut params = BTreeMap::new();
    model.visit(&mut Collect(&mut params));
    let bases = optim
        .bases()
        .iter()
        .map(|(id, b)| (*id, [values(b.u()), values(b.sigma()), values(b.v())]))
        .collect();
    Snapshot {
        params,
        bases,
        refreshes: optim.last_stats().refresh.count,
    }
}

/// The batches of every step: `REPLICAS * SHARD` samples each.
fn batches() -> Vec<(TensorData, TensorData)> {
    (0..STEPS as u64)
        .map(|step| samples(REPLICAS * SHARD, step))
        .collect()
}

/// One replica on the merged batches, steps `0..STEPS`.
fn single(start: &Mlp<B>, safety: &Safety) -> Vec<Snapshot> {
    let (mut model, mut optim) = (start.clone(), optimizer(start, safety));
    batches()
        .iter()
        .map(|batch| {
            let grads = GradientsParams::from_grads(
                model.loss(batch, &Default::default()).backward(),
                &model,
            );
            model = optim.step(LR, model.clone(), grads);
            snapshot(&model, &optim)
        })
        .collect()
}

/// `REPLICAS` replicas on their shards of steps `steps`, each through burn-collective; the
/// snapshots of each replica, and, with `save`, replica 0 checkpoints its model and wrapper
/// there after its last step.
fn replicas(
    first: &Mlp<B>,
    safety: &Safety,
    resume: Option<&Path>,
    steps: std::ops::Range<usize>,
    save: Option<&Path>,
) -> Vec<Vec<Snapshot>> {
    let all = batches();
    let config = CollectiveConfig::default().with_num_devices(REPLICAS);
    let traces = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..REPLICAS)
            .map(|peer| {
                let (steps, all, config) = (steps.clone(), &all, config.clone());
                scope.spawn(move || {
                    let device = Default::default();
                    let id = PeerId::from(peer);
                    register::<Inner>(id, device, config).unwrap();
                    let (mut model, mut optim) = (first.clone(), optimizer(first, safety));
                    if let Some(dir) = resume {
                        let record = checkpoint::load::<B, _>(dir.join("model"), &device).unwrap();
                        model = model.load_record(record);
                        let record = checkpoint::load::<B, _>(dir.join("optim"), &device).unwrap();
                        optim = optim.load_record(record);
                    }
                    let mut trace = Vec::new();
                    for step in steps {
                        let shard = rows(&all[step], peer * SHARD, (peer + 1) * SHARD);
                        let loss = model.loss(&shard, &device);
                        let grads = GradientsParams::from_grads(loss.backward(), &model);
                        model = collective::step(&mut optim, id, LR, model, grads).unwrap();
                        trace.push(snapshot(&model, &optim));
                    }
                    if let (Some(dir), 0) = (save, peer) {
                        let model = model.clone().into_record();
                        checkpoint::save_atomic::<B, _>(model, dir.join("model")).unwrap();
                        checkpoint::save_atomic::<B, _>(optim.to_record(), dir.join("optim"))
                            .unwrap();
                    }
                    finish_collective::<Inner>(id).unwrap();
                    trace
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    reset_collective::<Inner>();
    traces
}

/// The model every run starts from.
fn first_model() -> Mlp<B> {
    let device = Default::default();
    B::seed(&device, 7);
    let model = Mlp {
        fc1: LinearConfig::new(6, 16).init(&device),
        fc2: LinearConfig::new(16, 4).init(&device),
    };
    // burn initializes parameters lazily, at first use: a clone taken before that would draw
    // its own values. Reading them fixes them for every clone.
    model.visit(&mut Collect(&mut BTreeMap::new()));
    model
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One test, because burn-collective's state is one per backend in the process: the runs take
/// turns.
#[test]
fn two_replicas_step_as_one_on_the_merged_batch_and_resume_exactly() {
    let first = first_model();
    // Drawn once: burn's seeded random state is one per process, so replicas drawing their own
    // copy at the same time would interleave their draws and get different batches.
    let safety = Safety(samples(4, 99));
    let one = single(&first, &safety);
    let two = replicas(&first, &safety, None, 0..STEPS, None);

    // The replicas agree bit for bit: the same average, the same bases, the same step.
    assert!(two[0] == two[1], "the replicas differ");
    assert_eq!(
        two[0].last().unwrap().refreshes,
        3,
        "bases estimated at steps 0, 3 and 6"
    );
    // And they take the merged batch's steps, up to the order of the sums: the mean of two
    // shard means is the merged mean in exact arithmetic.
    for (step, (a, b)) in one.iter().zip(&two[0]).enumerate() {
        assert_eq!(a.refreshes, b.refreshes, "step {step}");
        for (id, values) in &a.params {
            let d = max_difference(values, &b.params[id]);
            assert!(d < 1e-5, "step {step}: parameter {id} differs by {d}");
        }
        assert_eq!(
            a.bases.keys().collect::<Vec<_>>(),
            b.bases.keys().collect::<Vec<_>>()
        );
        for (id, [u, sigma, v]) in &a.bases {
            let [u2, sigma2, v2] = &b.bases[id];
            // Singular vectors are defined up to sign; the factors' products are not.
            let d = max_difference(sigma, sigma2) / sigma[0];
            assert!(
                d < 1e-4,
                "step {step}: singular values of {id} differ by {d} (relative)"
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
            assert!(d < 1e-3, "step {step}: basis of {id} differs by {d}");
        }
    }

    // Interrupted after step 4 (past the second refresh) and resumed from replica 0's
    // checkpoint, every replica ends where the uninterrupted run ends, bit for bit.
    let dir = fresh_dir("collective-resume");
    let before = replicas(&first, &safety, None, 0..4, Some(&dir));
    assert!(
        before[0] == two[0][..4],
        "a rerun differs from the first run"
    );
    let after = replicas(&first, &safety, Some(&dir), 4..STEPS, None);
    for (peer, trace) in after.iter().enumerate() {
        assert!(trace[..] == two[0][4..], "replica {peer} resumed elsewhere");
    }
}
