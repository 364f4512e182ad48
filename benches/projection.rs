//! The projection alone, on the shapes and rank of the PyTorch reference
//! (`shared/bench/torch_ref_spf.py` on a CPU: two Llama-shaped blocks of width 512 and MLP width
//! 1376, `k = 8`), beside an AdamW step and a copy of the same gradients.
//!
//! As in the reference, gradients are `(out, in)` matrices of standard normals and bases are
//! random orthonormal, so about half of all directions conflict. Unlike the reference, which
//! projects the same buffers over and over (after the first pass nothing conflicts, though it
//! still pays for the update), each iteration here projects a fresh copy made outside the timer,
//! so every removal is real. `project` also computes its statistics, which the reference does
//! not; the `…, no statistics` rows (`project_without_stats`) leave them out, as the reference does.
//! The `part/…` rows time tensor operations `project` is made of, over the same set; the removal
//! part is the generic two-pass form that a one-pass kernel (burn-ndarray's, on burn 0.21) replaces.
//!
//! Run: `cargo bench --bench projection`, or `bench/compare.sh` for both sides back to back.

#![allow(missing_docs)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use burn::optim::AdamWConfig;
use burn::tensor::Tensor;
use common::{GradientSet, Group, Matrices, random_bases};
use criterion::{Criterion, criterion_group, criterion_main};
use spf::{LowRankBasis, ProjectionMode, project, project_without_stats};

const K: usize = 8;

/// The reference's shapes, `(out, in)`: on a CPU two layers of width 512 and MLP width 1376;
/// `SPF_BENCH_SHAPES=d,f,layers` sets others (bench/gpu.sh: the reference's CUDA shapes).
fn reference_shapes() -> Vec<[usize; 2]> {
    let given = std::env::var("SPF_BENCH_SHAPES").unwrap_or_else(|_| "512,1376,2".into());
    let numbers: Vec<usize> = given
        .split(',')
        .map(|n| n.trim().parse().expect("SPF_BENCH_SHAPES is d,f,layers"))
        .collect();
    let [d, f, layers] = numbers[..] else {
        panic!("SPF_BENCH_SHAPES is d,f,layers, got {given}");
    };
    (0..layers)
        .flat_map(|_| [[d, d], [d, d], [d, d], [d, d], [f, d], [f, d], [d, f]])
        .collect()
}

fn benches(c: &mut Criterion) {
    let device = common::device();
    // burn's optimizers step modules on autodiff devices; gradients and bases live without it.
    let module = Matrices::new(&reference_shapes(), &common::autodiff_device());
    let grads = GradientSet::new(&module, &device);
    let ids: Vec<_> = module.weights.iter().map(|w| w.id).collect();
    let mut by_id: HashMap<_, _> = random_bases(&module, K, 11, &device).into_iter().collect();
    let bases: Vec<LowRankBasis> = ids
        .iter()
        .map(|id| by_id.remove(id).expect("every matrix has a basis"))
        .collect();
    let fresh = || -> Vec<Tensor<2>> {
        let mut g = grads.fresh();
        ids.iter().map(|id| g.remove(*id).expect("drawn")).collect()
    };

    let mut group = Group::new(c, "projection_torch_ref_shapes", 20, Duration::from_secs(3));
    let mut optim = AdamWConfig::new().init();
    let mut model = Some(module.clone());
    group.bench(
        "adamw",
        || grads.fresh(),
        |g| {
            model = Some(optim.step(1e-4, model.take().expect("returned"), g));
        },
    );
    for (label, mode) in [
        ("conflict_only", ProjectionMode::ConflictOnly),
        ("hard_left", ProjectionMode::ColumnSpace),
    ] {
        group.bench(label, fresh, |gs| {
            for (g, basis) in gs.into_iter().zip(&bases) {
                let out = project(g, basis, mode).expect("shapes fit");
                std::hint::black_box(out);
            }
        });
        // As the reference: no statistics, so no read back from the device either.
        group.bench(&format!("{label}, no statistics"), fresh, |gs| {
            for (g, basis) in gs.into_iter().zip(&bases) {
                let out = project_without_stats(g, basis, mode).expect("shapes fit");
                std::hint::black_box(out);
            }
        });
    }
    // The parts of `project`, each over the whole set, to show where its time goes.
    group.bench("part/read: sum(G)", fresh, |gs| {
        for g in gs {
            std::hint::black_box(g.sum());
        }
    });
    group.bench("part/write: copy(G)", fresh, |gs| {
        for g in gs {
            // A read of every element and a write into a new buffer, as the reference's `copy_`.
            let copy = g.clone().mul_scalar(1.0);
            std::hint::black_box((copy, g));
        }
    });
    group.bench("part/energy: sum(G*G)", fresh, |gs| {
        for g in gs {
            // On a shared handle, as in `project`, which still needs G afterwards.
            std::hint::black_box((g.clone().square().sum(), g));
        }
    });
    group.bench("part/coefficients: U^T G", fresh, |gs| {
        for (g, basis) in gs.into_iter().zip(&bases) {
            std::hint::black_box(basis.u().clone().transpose().matmul(g));
        }
    });
    group.bench("part/removal, two passes: G - (U R V^T)", fresh, |gs| {
        for (g, basis) in gs.into_iter().zip(&bases) {
            let product = basis.u().clone().matmul(basis.v().clone().transpose());
            std::hint::black_box(g - product);
        }
    });
    group.finish("adamw");
}

criterion_group!(projection, benches);
criterion_main!(projection);
