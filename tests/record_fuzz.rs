//! Any bytes handed to the record loader give a typed error or a wrapper that works, never a
//! panic or an abort: random byte strings, and mutations (flips, truncations, insertions,
//! splices) of a real checkpoint of a wrapped AdamW. What each input must give is asserted: random
//! bytes and a checkpoint cut short are refused with [`SpfError::Checkpoint`]; a mutated file
//! that loads (its checksum catches nearly every change) gives a wrapper whose next step succeeds
//! with finite weights or is refused with an error, and whose own record saves and loads again.
//! Each mutated file that is refused is also resealed with a valid checksum, as a faulty writer
//! would save it, to fuzz the record's own checks beneath the checksum: it must load or be
//! refused without a panic. The counts are printed; beneath the checksum both outcomes must
//! occur. 1 000 cases by default, 10 000 under `--ignored`.

use std::path::PathBuf;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use spf::checkpoint;
use spf::{
    ProjectionTarget, RefreshPolicy, SafetyProjectedOptimizer, SafetySubspace, SpfConfig, SpfError,
};
use spf_core::testing::seal_checkpoint;

#[path = "common/mutate.rs"]
mod mutate;

use mutate::{Case, fuzz};

/// The wrapper the checkpoints are of: AdamW under SPF, for a linear layer.
type Wrapped = SafetyProjectedOptimizer;

fn config() -> SpfConfig {
    SpfConfig::new()
        .with_target(ProjectionTarget::Update)
        .with_refresh(RefreshPolicy::Every(2))
}

fn model() -> Linear {
    let model: Linear = LinearConfig::new(4, 3).init(&Device::default().autodiff());
    model.clone().load_record(model.into_record())
}

/// The bytes of a real checkpoint: the wrapper after two steps.
fn valid_checkpoint(model: &Linear, dir: &std::path::Path) -> Vec<u8> {
    let safety = |m: &Linear| {
        m.forward(Tensor::<2>::ones([1, 4], &Device::default()))
            .sum()
    };
    let grads = GradientsParams::from_grads(safety(model).backward(), model);
    let subspace = SafetySubspace::estimate(model, &grads, &config().estimator).unwrap();
    let mut optim = config()
        .init(AdamWConfig::new().init(), model, subspace)
        .unwrap()
        .with_safety_source(safety);
    let mut m = model.clone();
    for _ in 0..2 {
        let loss = m
            .forward(Tensor::<2>::ones([2, 4], &Device::default()))
            .mean();
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        m = optim.step(1e-2, m, grads);
    }
    let file = checkpoint::save_atomic(optim.to_record(), dir.join("valid")).unwrap();
    std::fs::read(file).unwrap()
}

/// Loads `bytes` as a checkpoint into a fresh wrapper for `model`; any panic fails the test. A
/// record that loads must give a wrapper that steps or refuses the step with an error, and whose
/// record saves and loads again; with `finite`, a step must also leave the weights finite.
fn load(
    model: &Linear,
    bytes: &[u8],
    path: &std::path::Path,
    finite: bool,
) -> Result<(), SpfError> {
    std::fs::write(path.with_extension("bpk"), bytes).unwrap();
    let mut optim = restore(model, path)?;
    let loss = model
        .forward(Tensor::<2>::ones([1, 4], &Device::default()))
        .sum();
    let grads = GradientsParams::from_grads(loss.backward(), model);
    if let Ok(stepped) = optim.try_step(1e-3, model.clone(), grads) {
        let weights: Vec<f32> = stepped.weight.val().into_data().try_to_vec().unwrap();
        assert!(
            !finite || weights.iter().all(|w| w.is_finite()),
            "a loaded record stepped to non-finite weights"
        );
    }
    let again = path.with_file_name("again");
    checkpoint::save_atomic(optim.to_record(), &again).expect("a loaded record saves");
    restore(model, &again).expect("and loads again into a fresh wrapper");
    Ok(())
}

/// A fresh wrapper for `model` with the checkpoint at `path` loaded.
fn restore(model: &Linear, path: &std::path::Path) -> Result<Wrapped, SpfError> {
    let record = checkpoint::load(path)?;
    config()
        .init(AdamWConfig::new().init(), model, [])?
        .try_load_record(record)
        .map_err(|refused| refused.error)
}

struct Fixture {
    dir: PathBuf,
    model: Linear,
    valid: Vec<u8>,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("spf-fuzz-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = model();
        let valid = valid_checkpoint(&model, &dir);
        Self { dir, model, valid }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Loaded and refused inputs.
#[derive(Default)]
struct Counts {
    loaded: usize,
    refused: usize,
}

impl Counts {
    fn add(&mut self, outcome: &Result<(), SpfError>) {
        match outcome {
            Ok(()) => self.loaded += 1,
            Err(_) => self.refused += 1,
        }
    }
}

fn run(cases: u32, name: &str) {
    let fixture = Fixture::new(name);
    let path = fixture.dir.join("case");
    assert!(
        load(&fixture.model, &fixture.valid, &path, true).is_ok(),
        "the unmutated checkpoint loads"
    );
    let (mut files, mut resealed) = (Counts::default(), Counts::default());
    fuzz(cases, &fixture.valid, &[b""], |case| {
        let outcome = load(&fixture.model, case.bytes(), &path, true);
        let must_refuse = matches!(case, Case::Random(_)) || case.truncated(&fixture.valid);
        if must_refuse {
            assert!(
                matches!(outcome, Err(SpfError::Checkpoint { .. })),
                "random or truncated bytes must be refused as a bad checkpoint, got {outcome:?}"
            );
        }
        files.add(&outcome);
        // The same bytes under a valid checksum: what a faulty writer would save. The record's
        // checks must still hold, but the inner optimizer's state is its own to interpret (an
        // AdamW second moment made negative steps to NaN), so the weights may not be finite.
        if let (Case::Mutated(bytes), Err(_)) = (&case, &outcome)
            && let Some(sealed) = seal_checkpoint(bytes)
        {
            resealed.add(&load(&fixture.model, &sealed, &path, false));
        }
    });
    println!(
        "record fuzz: {} files, {} loaded, {} refused; {} resealed, {} loaded, {} refused",
        files.loaded + files.refused,
        files.loaded,
        files.refused,
        resealed.loaded + resealed.refused,
        resealed.loaded,
        resealed.refused,
    );
    // Both outcomes occur beneath the checksum: flips inside the numbers give records that load,
    // and many mutations break the record. A fuzzer whose every input is refused (or accepted)
    // tests nothing.
    assert!(
        files.refused > 0 && resealed.loaded > 0 && resealed.refused > 0,
        "files: {} refused; resealed: {} loaded, {} refused",
        files.refused,
        resealed.loaded,
        resealed.refused
    );
}

#[test]
fn any_bytes_give_an_error_or_a_valid_optimizer() {
    run(1_000, "default");
}

#[test]
#[ignore = "long: cargo test --release --test record_fuzz -- --ignored"]
fn any_bytes_give_an_error_or_a_valid_optimizer_long() {
    run(10_000, "long");
}
