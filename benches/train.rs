//! The whole training step's overhead: forward, backward and optimizer step on the lab
//! transformer, plain AdamW against SPF(AdamW) (`ConflictOnly`, `Gradient` target, rank 8) with
//! the bases re-estimated from an 8-sample safety batch `Every(n)` steps, `n ∈ {1, 10, 50}`.
//!
//! One timed iteration is 50 training steps (batch 32 of the lab's benign fine-tuning set), so
//! every iteration holds the same number of refreshes: 50, 5 or 1. The batches are built once,
//! outside the timer; the safety batch is the lab's default one (8 refusals).
//!
//! A second group splits one refresh into its two parts, the safety loss's backward pass and the
//! estimation of the bases from its gradients (rank 8, the lab's default): under data
//! parallelism every replica runs both, and sharding the estimation across replicas could save
//! at most the second part (docs/guide.md, "Several devices").
//!
//! Run: `cargo bench --bench train`. After criterion's output it prints the time per training
//! step and its ratio to plain AdamW's, then the two parts of a refresh.

#![allow(missing_docs)]

mod common;

use std::time::Duration;

use burn::optim::{AdamWConfig, GradientsParams};
use common::Group;
use criterion::{Criterion, criterion_group, criterion_main};
use spf::{RankPolicy, RefreshPolicy, SafetySubspace, SpfConfig, SubspaceConfig};
use spf_lab::batch::{Batch, answer_loss};
use spf_lab::finetune::{DefenceConfig, FinetuneConfig, Method, finetune_set, safety_batch};
use spf_lab::model::{Transformer, TransformerConfig};
use spf_lab::world::{Task, World, WorldConfig};

const STEPS: usize = 50;
const BATCH: usize = 32;
const LR: f64 = 1e-3;

/// Runs `STEPS` training steps of `model` with `step`, cycling through `batches`.
fn train(
    model: Transformer,
    batches: &[Batch],
    mut step: impl FnMut(Transformer, GradientsParams) -> Transformer,
) -> Transformer {
    (0..STEPS).fold(model, |model, i| {
        let loss = answer_loss(&model, &batches[i % batches.len()]);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        step(model, grads)
    })
}

fn benches(c: &mut Criterion) {
    let device = common::autodiff_device();
    let world = World::new(WorldConfig::new()).expect("the default world is valid");
    let vocab = world.vocab();
    let model = TransformerConfig::new().init(vocab.size(), vocab.max_len(), &device);
    // The lab's own benign fine-tuning set and safety batch (seed 0, default configs).
    let finetune = FinetuneConfig::new().with_batch_size(BATCH);
    let set = finetune_set(&world, &finetune, 0.0, Method::SpfConflictOnly, 0).unwrap();
    let batches: Vec<Batch> = set
        .chunks(BATCH)
        .take(10)
        .map(|examples| Batch::new(vocab, examples, &device))
        .collect();
    let safety_examples = safety_batch(
        &world,
        &DefenceConfig::new(),
        &finetune,
        &[Task::Copy, Task::Reverse],
        0,
    )
    .unwrap();
    let safety = Batch::new(vocab, &safety_examples, &device);

    let mut group = Group::new(c, "train_step_lab_transformer", 10, Duration::from_secs(8));
    let mut optim = AdamWConfig::new().init();
    let mut current = Some(model.clone());
    group.bench(
        "adamw",
        || (),
        |()| {
            let model = current.take().expect("returned");
            current = Some(train(model, &batches, |m, g| optim.step(LR, m, g)));
        },
    );

    let estimator = SubspaceConfig::new().with_rank(RankPolicy::Fixed(8));
    let safety_grads = GradientsParams::from_grads(answer_loss(&model, &safety).backward(), &model);
    let subspace =
        SafetySubspace::estimate(&model, &safety_grads, &estimator).expect("finite gradients");
    for n in [1, 10, 50] {
        let batch = safety.clone();
        let mut optim = SpfConfig::new()
            .with_refresh(RefreshPolicy::Every(n))
            .with_estimator(estimator.clone())
            .init(AdamWConfig::new().init(), &model, subspace.clone())
            .expect("the estimate fits the model")
            .with_safety_source(move |m: &Transformer| answer_loss(m, &batch));
        let mut current = Some(model.clone());
        group.bench(
            &format!("spf/every{n}"),
            || (),
            |()| {
                let model = current.take().expect("returned");
                current = Some(train(model, &batches, |m, g| optim.step(LR, m, g)));
            },
        );
    }
    group.finish_per(STEPS, "adamw");

    let mut group = Group::new(
        c,
        "refresh_parts_lab_transformer",
        10,
        Duration::from_secs(4),
    );
    let gradients = || GradientsParams::from_grads(answer_loss(&model, &safety).backward(), &model);
    group.bench("safety backward", || (), |()| drop(gradients()));
    group.bench("estimate (rank 8)", gradients, |grads| {
        drop(SafetySubspace::estimate(&model, &grads, &estimator).expect("finite gradients"));
    });
    group.finish("safety backward");
}

criterion_group!(train_step, benches);
criterion_main!(train_step);
