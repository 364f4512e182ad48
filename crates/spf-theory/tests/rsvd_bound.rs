//! Halko, Martinsson & Tropp (2011), Theorem 10.5: with a Gaussian sketch of `k + p` columns,
//! `p ≥ 2`, and no power iterations, `E‖A − QQᵀA‖_F ≤ (1 + k/(p−1))^{1/2} (Σ_{j>k} σ_j²)^{1/2}`.
//! The mean error over 200 seeds is checked against it, for `p ∈ {2, 4, 8}` and three spectra,
//! in `f64`.

use faer::Mat;
use spf_subspace::rsvd::range_finder;
use spf_theory::{F64, Gaussian, Margin, download, test_device, upload};

const M: usize = 60;
const N: usize = 40;
const K: usize = 5;

/// `U diag(spectrum) Vᵀ` with random orthonormal factors.
fn with_spectrum(spectrum: &[f64], seed: u64) -> Mat<f64> {
    let mut rng = Gaussian::new(seed);
    let u = rng.orthonormal(M, spectrum.len());
    let v = rng.orthonormal(N, spectrum.len());
    let us = Mat::from_fn(M, spectrum.len(), |i, j| u[(i, j)] * spectrum[j]);
    us * v.transpose()
}

fn check(name: &str, spectrum: &[f64], seeds: u64) {
    let a = with_spectrum(spectrum, 7);
    let device = test_device();
    let a_device = upload(&a, (&device, F64));
    let tail: f64 = spectrum[K..].iter().map(|s| s * s).sum::<f64>().sqrt();
    for p in [2usize, 4, 8] {
        let mean: f64 = (0..seeds)
            .map(|seed| {
                let q = download(range_finder(&a_device, K + p, 0, seed).unwrap());
                (&a - &q * (q.transpose() * &a)).norm_l2()
            })
            .sum::<f64>()
            / seeds as f64;
        let bound = (1.0 + K as f64 / (p as f64 - 1.0)).sqrt() * tail;
        Margin {
            name: format!("randomized SVD, {name}, k = {K}, p = {p}, mean of {seeds} seeds"),
            bound,
            observed: mean,
        }
        .report();
    }
}

fn spectra() -> [(&'static str, Vec<f64>); 3] {
    [
        ("flat spectrum σ_j = 1", vec![1.0; N]),
        (
            "polynomial σ_j = 1/j",
            (1..=N).map(|j| 1.0 / j as f64).collect(),
        ),
        (
            "geometric σ_j = 0.8^j",
            (0..N).map(|j| 0.8f64.powi(j as i32)).collect(),
        ),
    ]
}

#[test]
fn mean_error_is_within_the_halko_martinsson_tropp_bound() {
    for (name, spectrum) in spectra() {
        check(name, &spectrum, 200);
    }
}
