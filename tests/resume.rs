//! End to end through the facade: a wrapped AdamW with refresh inside a training loop, saved to
//! crash-safe checkpoint files halfway, restored in a fresh process, continues bit for bit, under
//! every refresh policy.
//!
//! The first layer is 64 × 64 and the safety batch has 32 samples, so its safety gradient has
//! rank up to 32 while the sketch has `k + p = 10` columns: the estimated basis depends on the
//! sketch's seed (checked below), which is the refresh counter the record restores. With the
//! whole range in the sketch, a resume that lost the counter would still pass.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::store::ModuleRecord;
use burn::tensor::{Device, Tensor, TensorData};
use spf::{
    ProjectionMode, ProjectionTarget, RankPolicy, RefreshPolicy, SafetyGradientSource,
    SafetyProjectedOptimizer, SafetySubspace, SpfConfig, SubspaceConfig,
};
use spf::{SpfRecord, checkpoint};
use spf_core::testing::Mlp;

const HALF: usize = 3;
const WIDTH: usize = 64;
const ENV_DIR: &str = "SPF_RESUME_DIR";
const ENV_POLICY: &str = "SPF_RESUME_POLICY";

/// The tests' MLP on the autodiff CPU device, its weights drawn now so that clones share them.
fn mlp() -> Mlp {
    Mlp::new(&[WIDTH, WIDTH, 2], &Device::default().autodiff()).materialized()
}

fn wave(rows: usize, cols: usize, phase: f32) -> Tensor<2> {
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| (i as f32 * 0.7 + phase).sin())
        .collect();
    Tensor::from_data(TensorData::new(values, [rows, cols]), &Device::default())
}

/// The deterministic batch at data position `step`.
fn batch(step: usize) -> (Tensor<2>, Tensor<2>) {
    (
        wave(6, WIDTH, step as f32),
        wave(6, 2, 1.0 + 2.0 * step as f32),
    )
}

/// The safety loss: a fixed batch of 32 "safety samples".
fn safety_loss(model: &Mlp) -> Tensor<1> {
    (model.forward(wave(32, WIDTH, 0.3)) - wave(32, 2, -1.0))
        .square()
        .mean()
}

fn policies() -> [(&'static str, RefreshPolicy); 3] {
    [
        ("never", RefreshPolicy::Never),
        ("every-2", RefreshPolicy::Every(2)),
        (
            "adaptive",
            RefreshPolicy::Adaptive {
                initial: 1,
                max: 4,
                overlap: 0.5,
            },
        ),
    ]
}

/// `Orthogonal` removes every safety direction whatever its sign, so every step depends on the
/// bases (under `ConflictOnly` a step without a conflict would not, and a wrong basis could go
/// unseen).
fn config(policy: RefreshPolicy) -> SpfConfig {
    SpfConfig::new()
        .with_mode(ProjectionMode::Orthogonal)
        .with_target(ProjectionTarget::Update)
        .with_refresh(policy)
        .with_estimator(SubspaceConfig::new().with_rank(RankPolicy::Fixed(2)))
}

fn optimizer(
    model: &Mlp,
    policy: RefreshPolicy,
) -> SafetyProjectedOptimizer<impl SafetyGradientSource<Mlp> + use<>> {
    let config = config(policy);
    let grads = GradientsParams::from_grads(safety_loss(model).backward(), model);
    let subspace = SafetySubspace::estimate(model, &grads, &config.estimator).unwrap();
    config
        .init(AdamWConfig::new().init(), model, subspace)
        .unwrap()
        .with_safety_source(safety_loss)
}

/// Trains from the optimizer's own data position up to `end`.
fn train<S>(mut model: Mlp, optim: &mut SafetyProjectedOptimizer<S>, end: usize) -> Mlp
where
    S: SafetyGradientSource<Mlp>,
{
    while optim.steps() < end {
        let (x, y) = batch(optim.steps());
        let loss = (model.forward(x) - y).square().mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    model
}

fn weights(model: &Mlp) -> Vec<Vec<f32>> {
    model
        .layers
        .iter()
        .flat_map(|l| [l.weight.val(), l.bias.as_ref().unwrap().val().unsqueeze()])
        .map(|t: Tensor<2>| t.into_data().try_to_vec().unwrap())
        .collect()
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn policy_named(name: &str) -> RefreshPolicy {
    policies()
        .into_iter()
        .find(|(n, _)| *n == name)
        .expect("a known policy")
        .1
}

/// The basis of the 64 × 64 layer's safety gradient depends on the sketch's seed, so a resumed
/// run that drew its sketches from the wrong refresh counter would not match.
#[test]
fn the_first_layers_basis_depends_on_the_sketch_seed() {
    let model = mlp();
    let grads = GradientsParams::from_grads(safety_loss(&model).backward(), &model);
    let estimate = |seed| {
        let mut estimator = config(RefreshPolicy::Never).estimator;
        estimator.sketch.seed = seed;
        let subspace = SafetySubspace::estimate(&model, &grads, &estimator).unwrap();
        let basis = subspace
            .get(&model.layers[0].weight.id)
            .expect("the first layer is protected");
        basis.u().clone().into_data().try_to_vec::<f32>().unwrap()
    };
    assert_eq!(estimate(0), estimate(0));
    assert_ne!(estimate(0), estimate(1));
}

const ROLE_CHILD: &str = "SPF_RESUME_CHILD";

/// Run as a test, trains halfway, saves, and starts a copy of this test binary that runs only
/// this test with [`ROLE_CHILD`] set: that child loads the checkpoint, trains the second half
/// in its fresh process and writes the final weights, which must equal uninterrupted training.
#[test]
fn training_resumed_in_a_fresh_process_matches_uninterrupted_training() {
    if std::env::var_os(ROLE_CHILD).is_some() {
        return resume_in_this_process();
    }
    for (name, policy) in policies() {
        let model = mlp();
        let mut straight = optimizer(&model, policy);
        let expected = train(model.clone(), &mut straight, 2 * HALF);

        let dir =
            Scratch(std::env::temp_dir().join(format!("spf-resume-{name}-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let mut first = optimizer(&model, policy);
        let halfway = train(model.clone(), &mut first, HALF);
        assert_eq!(first.bases().len(), 2, "{name}: both weights are protected");
        let refreshes = first.last_stats().refresh.count;
        assert_eq!(
            refreshes > 0,
            policy != RefreshPolicy::Never,
            "{name}: {refreshes} refreshes"
        );
        checkpoint::save_atomic(halfway.into_record(), dir.0.join("model")).unwrap();
        checkpoint::save_atomic(first.to_record(), dir.0.join("optim")).unwrap();

        // The second half runs in a child process: this test binary, filtered to this test.
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "training_resumed_in_a_fresh_process_matches_uninterrupted_training",
                "--exact",
            ])
            .env(ROLE_CHILD, "1")
            .env(ENV_DIR, &dir.0)
            .env(ENV_POLICY, name)
            .output()
            .unwrap();
        assert!(
            child.status.success(),
            "{name}: the child process failed:\n{}\n{}",
            String::from_utf8_lossy(&child.stdout),
            String::from_utf8_lossy(&child.stderr)
        );
        let resumed: Vec<Vec<f32>> =
            serde_json::from_str(&std::fs::read_to_string(dir.0.join("final.json")).unwrap())
                .unwrap();
        let expected = weights(&expected);
        let first_difference = resumed
            .iter()
            .flatten()
            .zip(expected.iter().flatten())
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(
            first_difference, None,
            "{name}: resumed training differs (first differing weight by index)"
        );
        assert_eq!(resumed.len(), expected.len());
    }
}

/// The child's half of the test above, in its fresh process.
fn resume_in_this_process() {
    let (Ok(dir), Ok(name)) = (std::env::var(ENV_DIR), std::env::var(ENV_POLICY)) else {
        panic!("the child needs {ENV_DIR} and {ENV_POLICY}");
    };
    let dir = Path::new(&dir);
    let record: ModuleRecord = checkpoint::load(dir.join("model")).unwrap();
    let model = mlp().load_record(record);
    let record: SpfRecord = checkpoint::load(dir.join("optim")).unwrap();
    let mut optim = optimizer(&model, policy_named(&name))
        .try_load_record(record)
        .unwrap_or_else(|refused| panic!("{}", refused.error));
    assert_eq!(
        optim.steps(),
        HALF,
        "the data position comes back with the record"
    );
    let done = train(model, &mut optim, 2 * HALF);
    std::fs::write(
        dir.join("final.json"),
        serde_json::to_string(&weights(&done)).unwrap(),
    )
    .unwrap();
}
