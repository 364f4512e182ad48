//! Randomized SVD against faer's exact thin SVD, on the spectrum a one-sample safety gradient
//! has: rank 32 with `σ_i = 0.8^i`, plus Gaussian noise at 1% of its norm, `k = 8`.
//!
//! Run: `cargo bench --bench rsvd`. Besides criterion's timings it prints the overlap of the
//! top-8 subspaces of both methods, and fails below 0.99.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use burn::tensor::Tensor;
use criterion::{Criterion, criterion_group, criterion_main};
use faer::Mat;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use spf::{RandomizedSvd, RandomizedSvdConfig, subspace_overlap};
use spf_core::testing::upload;

const RANK: usize = 32;
const K: usize = 8;
const NOISE: f64 = 0.01;
/// The accuracy the timings are only worth with (docs/performance.md).
const MIN_OVERLAP: f64 = 0.99;

fn gaussian(rows: usize, cols: usize, rng: &mut StdRng) -> Mat<f32> {
    Mat::from_fn(rows, cols, |_, _| StandardNormal.sample(rng))
}

/// `U diag(0.8^i) Vᵀ + noise` with `‖noise‖_F = 1%·‖signal‖_F`.
fn test_matrix(m: usize, n: usize) -> Mat<f32> {
    let mut rng = StdRng::seed_from_u64(2011);
    let u = gaussian(m, RANK, &mut rng).qr().compute_thin_Q();
    let v = gaussian(n, RANK, &mut rng).qr().compute_thin_Q();
    let us = Mat::from_fn(m, RANK, |i, j| u[(i, j)] * 0.8f32.powi(j as i32));
    let signal = us * v.transpose();
    let noise = gaussian(m, n, &mut rng);
    let scale = (NOISE * f64::from(signal.norm_l2()) / f64::from(noise.norm_l2())) as f32;
    signal + noise * faer::Scale(scale)
}

/// `m` on the CPU backend (an `f32` matrix is exact there).
fn to_tensor(m: &Mat<f32>) -> Tensor<2> {
    upload(m, &burn::tensor::Device::default())
}

fn bench_shape(c: &mut Criterion, m: usize, n: usize) {
    let host = test_matrix(m, n);
    let device = to_tensor(&host);
    let svd = RandomizedSvd::new(RandomizedSvdConfig::new(K));

    let exact = host.thin_svd().expect("faer's SVD converges");
    let exact_u = to_tensor(&exact.U().get(.., ..K).to_owned());
    let estimate = svd.compute(&device).expect("finite input");
    let overlap = subspace_overlap(estimate.u(), &exact_u).expect("both factors have m rows");
    println!(
        "rsvd {m}x{n} k={K}: overlap of top-{K} subspaces with faer's exact SVD = {overlap:.6}"
    );
    // A fast estimate of the wrong subspace is no estimate: the target the timings stand on.
    assert!(
        overlap >= MIN_OVERLAP,
        "rsvd {m}x{n}: overlap {overlap} below {MIN_OVERLAP}"
    );

    let mut group = c.benchmark_group(format!("svd_{m}x{n}_k{K}"));
    group.sample_size(10);
    group.bench_function("randomized", |b| b.iter(|| svd.compute(&device).unwrap()));
    group.bench_function("faer_exact_thin_f32", |b| {
        b.iter(|| host.thin_svd().unwrap())
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    for (m, n) in [(2048, 2048), (4096, 1024), (1024, 4096)] {
        bench_shape(c, m, n);
    }
}

criterion_group!(rsvd, benches);
criterion_main!(rsvd);
