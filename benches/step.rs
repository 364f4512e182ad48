//! The optimizer step's overhead: `SafetyProjectedOptimizer<AdamW>::step` against `AdamW::step`
//! on the same gradients, on ndarray, for every projection mode, both projection targets and
//! `k ∈ {4, 8, 16}`.
//!
//! Two parameter sets: the lab transformer's (every matrix protected: embeddings, attention,
//! MLP, head; vectors pass through) and one Llama-shaped block scaled to the CPU (four
//! `[512, 512]`, two `[512, 1376]` and one `[1376, 512]` matrices). Each iteration steps on a
//! fresh copy of one fixed set of standard-normal gradients against random orthonormal bases, so
//! about half of all directions conflict. The copy is made outside the timer.
//!
//! Beside the sweep, the rows of docs/performance.md's targets: `ConflictOnly`, `Gradient`,
//! `k = 8` with the statistics read (the default) and with no read at all (`StatsPolicy::Off`,
//! `NonFinitePolicy::Unchecked`), and plain AdamW stepping while a clone of the module is held,
//! as the wrapper holds one to hand the module back if the inner step panics: that shows what
//! the extra reference costs AdamW's in-place updates.
//!
//! Run: `cargo bench --bench step`. After criterion's output, each group prints a table of
//! medians and their ratio to the plain AdamW step of the same run. The backend is the CPU's as
//! the workspace builds it (burn's default features off: one thread, no SIMD): `flex`, or
//! `ndarray` with `SPF_BENCH_CPU=ndarray` in a build with `--features ndarray`.

#![allow(missing_docs)]

mod common;

use std::time::Duration;

use burn::module::Module;
use burn::optim::AdamWConfig;
use common::{GradientSet, Group, Matrices, autodiff_device, device, llama_block, random_bases};
use criterion::{Criterion, criterion_group, criterion_main};
use spf::{NonFinitePolicy, ProjectionMode, ProjectionTarget, SpfConfig, StatsPolicy};
use spf_lab::model::TransformerConfig;
use spf_lab::world::{World, WorldConfig};

const LR: f64 = 1e-4;

/// Times AdamW, then every wrapped configuration, on `module`'s parameters.
fn bench_set<M>(c: &mut Criterion, name: &str, module: M, measurement: Duration)
where
    M: Module + Clone + 'static,
{
    let device = device();
    let grads = GradientSet::new(&module, &device);
    let mut group = Group::new(c, name, 10, measurement);

    let mut optim = AdamWConfig::new().init();
    let mut model = Some(module.clone());
    group.bench(
        "adamw",
        || grads.fresh(),
        |g| {
            model = Some(optim.step(LR, model.take().expect("returned"), g));
        },
    );

    let mut optim = AdamWConfig::new().init();
    let mut model = Some(module.clone());
    group.bench(
        "adamw, module clone held",
        || grads.fresh(),
        |g| {
            let module = model.take().expect("returned");
            let held = module.clone();
            model = Some(optim.step(LR, module, g));
            drop(held);
        },
    );

    let bases = random_bases(&module, 8, 7, &device);
    for (label, stats, non_finite) in [
        (
            "spf/k8/ConflictOnly, read",
            StatsPolicy::EveryStep,
            NonFinitePolicy::Error,
        ),
        (
            "spf/k8/ConflictOnly, no read",
            StatsPolicy::Off,
            NonFinitePolicy::Unchecked,
        ),
    ] {
        let config = SpfConfig::new()
            .with_stats(stats)
            .with_non_finite(non_finite);
        let mut optim = config
            .init(AdamWConfig::new().init(), &module, bases.clone())
            .expect("bases fit the module");
        let mut model = Some(module.clone());
        group.bench(
            label,
            || grads.fresh(),
            |g| {
                model = Some(optim.step(LR, model.take().expect("returned"), g));
            },
        );
    }

    for k in [4, 8, 16] {
        let bases = random_bases(&module, k, 7, &device);
        for target in [ProjectionTarget::Gradient, ProjectionTarget::Update] {
            for mode in ProjectionMode::ALL {
                let mut optim = SpfConfig::new()
                    .with_mode(mode)
                    .with_target(target)
                    .init(AdamWConfig::new().init(), &module, bases.clone())
                    .expect("bases fit the module");
                let mut model = Some(module.clone());
                let label = format!("spf/k{k}/{target:?}/{mode:?}");
                group.bench(
                    &label,
                    || grads.fresh(),
                    |g| {
                        model = Some(optim.step(LR, model.take().expect("returned"), g));
                    },
                );
            }
        }
    }
    group.finish("adamw");
}

fn benches(c: &mut Criterion) {
    let device = autodiff_device();
    let world = World::new(WorldConfig::new()).expect("the default world is valid");
    let vocab = world.vocab();
    let lab = TransformerConfig::new().init(vocab.size(), vocab.max_len(), &device);
    bench_set(c, "step_lab_transformer", lab, Duration::from_secs(1));

    let block = Matrices::new(&llama_block(512, 1376), &device);
    bench_set(c, "step_llama_block_512", block, Duration::from_secs(3));
}

criterion_group!(step, benches);
criterion_main!(step);
