//! Randomized SVD (Halko, Martinsson & Tropp, *Finding structure with randomness*, SIAM Review
//! 2011) on burn tensors: the large products run on the device, only `l × l` and `l × n` problems
//! (`l = k + p`) are solved on the host with faer.
//!
//! For `A: [m, n]`, rank `k`, oversampling `p` and `q` power iterations:
//!
//! 1. **Sketch** ([`gaussian_sketch`]): `Ω: [n, l]` with i.i.d. standard normal entries, drawn on
//!    the host from a seeded generator so that every backend sees the same `Ω`.
//! 2. **Range** ([`range_finder`]): `Q = orth(A Ω)`, then `q` times `Q = orth(A · orth(Aᵀ Q))`.
//!    Re-orthonormalizing after every product keeps the sketch well conditioned.
//! 3. **Orthonormalization** ([`orthonormalize`]): CholeskyQR2 — the Gram matrix `YᵀY` on the
//!    device, its Cholesky factor `L` on the host, `Y ← Y L⁻ᵀ`, twice. When the Cholesky fails or
//!    its diagonal shows `κ(Y) > ε^{-1/2}/8` (a rank-deficient or ill-conditioned sketch), a
//!    Householder QR on the host takes over.
//! 4. **Small SVD** ([`truncated_svd`]): `B = QᵀA: [l, n]`, `B = Ũ S Wᵀ` by faer, and
//!    `U = Q Ũ_k`, `Σ = S_k`, `V = W_k`.
//!
//! Directions with `σ_i ≤ τ·σ_1` are dropped, so a matrix of numerical rank `r < k` (including
//! zero) gives a basis of rank `r`. The default `τ = max(m, n)·ε_f32`
//! ([`default_rank_tolerance`]) is the usual numerical-rank threshold (as in LAPACK-based
//! `matrix_rank`): singular values below it are indistinguishable from the rounding of `A`.
//!
//! With `p ≥ 2`, `E‖A − QQᵀA‖_F ≤ (1 + k/(p−1))^{1/2} (Σ_{j>k} σ_j²)^{1/2}` (HMT Thm 10.5); power
//! iterations sharpen it for slowly decaying spectra.

use burn::config::Config;
use burn::tensor::{Tensor, TensorCreationOptions, TensorData};
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::{Mat, MatRef, Par, Side};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use crate::{LowRankBasis, SubspaceError};

/// The random sketch of a randomized SVD, shared by [`RandomizedSvdConfig`] and
/// [`SubspaceConfig`](crate::SubspaceConfig).
#[derive(Config, Debug)]
pub struct SketchConfig {
    /// Extra sketch columns `p`; the sketch has `l = k + p` columns.
    #[config(default = 8)]
    pub oversampling: usize,
    /// Power iterations `q`.
    #[config(default = 2)]
    pub power_iterations: usize,
    /// Seed of the Gaussian sketch.
    #[config(default = 0)]
    pub seed: u64,
}

/// Configuration of [`RandomizedSvd`].
#[derive(Config, Debug)]
pub struct RandomizedSvdConfig {
    /// The number of directions `k` to estimate.
    pub rank: usize,
    /// Oversampling, power iterations and seed.
    #[config(default = "SketchConfig::new()")]
    pub sketch: SketchConfig,
    /// Relative threshold `τ`: directions with `σ_i ≤ τ·σ_1` are dropped. `None` means
    /// [`default_rank_tolerance`].
    #[config(default = "None")]
    pub rank_tolerance: Option<f64>,
}

/// The most power iterations a sketch may ask for. Two to four are typical; each costs two
/// passes over the matrix, and past a few dozen the orthonormalisation, not the spectrum, limits
/// the accuracy, so a larger count is a mistake, not a setting.
pub const MAX_POWER_ITERATIONS: usize = 64;

impl RandomizedSvdConfig {
    /// Checks what [`RandomizedSvd::compute`] cannot run.
    ///
    /// # Errors
    ///
    /// [`SubspaceError::InvalidSketch`] naming the setting.
    pub fn check(&self) -> Result<(), SubspaceError> {
        if self.sketch.power_iterations > MAX_POWER_ITERATIONS {
            return Err(SubspaceError::InvalidSketch {
                reason: format!(
                    "{} power iterations (at most {MAX_POWER_ITERATIONS})",
                    self.sketch.power_iterations
                ),
            });
        }
        if let Some(tolerance) = self.rank_tolerance
            && !(tolerance.is_finite() && tolerance >= 0.0)
        {
            return Err(SubspaceError::InvalidSketch {
                reason: format!("rank tolerance {tolerance} must be finite and non-negative"),
            });
        }
        Ok(())
    }
}

/// The randomized SVD estimator; see the [module docs](self).
///
/// # Example
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use spf_subspace::{RandomizedSvd, RandomizedSvdConfig};
///
/// let device = Device::default();
/// // A rank-1 matrix: x yᵀ with ‖x‖ = 5, ‖y‖ = 1.
/// let a = Tensor::<2>::from_floats([[3.0, 0.0], [4.0, 0.0], [0.0, 0.0]], &device);
/// let basis = RandomizedSvd::new(RandomizedSvdConfig::new(2)).compute(&a)?;
/// assert_eq!(basis.rank(), 1); // truncated to the numerical rank
/// assert!((basis.singular_values()[0] - 5.0).abs() < 1e-5);
/// # Ok::<(), spf_subspace::SubspaceError>(())
/// ```
#[derive(Debug, Clone)]
pub struct RandomizedSvd {
    config: RandomizedSvdConfig,
}

impl RandomizedSvd {
    /// An estimator with `config`.
    pub fn new(config: RandomizedSvdConfig) -> Self {
        Self { config }
    }

    /// Its configuration.
    pub fn config(&self) -> &RandomizedSvdConfig {
        &self.config
    }

    /// The rank-`k` basis of `a`, truncated to its numerical rank.
    ///
    /// # Errors
    ///
    /// [`SubspaceError::InvalidSketch`] for more than [`MAX_POWER_ITERATIONS`] power iterations
    /// or a rank tolerance that is not a finite non-negative number,
    /// [`SubspaceError::NonFinite`] (factor `"input"`) when `a` holds NaN or ±Inf, and
    /// [`SubspaceError::SvdFailed`] if the small SVD does not converge.
    pub fn compute(&self, a: &Tensor<2>) -> Result<LowRankBasis, SubspaceError> {
        self.config.check()?;
        let [m, n] = a.dims();
        let k = self.config.rank.min(m).min(n);
        if k == 0 {
            return Ok(LowRankBasis::empty(m, n, &a.device()));
        }
        let sketch = &self.config.sketch;
        let l = k.saturating_add(sketch.oversampling).min(m).min(n);
        let q = range_finder(a, l, sketch.power_iterations, sketch.seed)?;
        let tolerance = self
            .config
            .rank_tolerance
            .unwrap_or_else(|| default_rank_tolerance(m, n));
        truncated_svd(a, q, k, tolerance)
    }
}

/// `max(m, n)·ε_f32`, the default relative threshold below which singular values count as zero.
pub fn default_rank_tolerance(m: usize, n: usize) -> f64 {
    m.max(n) as f64 * f64::from(f32::EPSILON)
}

/// `Ω: [rows, cols]` with i.i.d. standard normal entries from a generator seeded with `seed`,
/// created with `options` (a device, or a device and a dtype).
///
/// # Errors
///
/// [`SubspaceError::InvalidSketch`] when `rows × cols` entries do not fit in memory (the count
/// overflows, or the allocation is refused).
pub fn gaussian_sketch(
    rows: usize,
    cols: usize,
    seed: u64,
    options: impl Into<TensorCreationOptions>,
) -> Result<Tensor<2>, SubspaceError> {
    let too_large = || SubspaceError::InvalidSketch {
        reason: format!("a {rows} × {cols} sketch does not fit in memory"),
    };
    // A dimension past isize::MAX is no shape a backend can index, even with no entries.
    if rows.max(cols) > isize::MAX as usize {
        return Err(too_large());
    }
    let len = rows.checked_mul(cols).ok_or_else(too_large)?;
    let mut values: Vec<f32> = Vec::new();
    values.try_reserve_exact(len).map_err(|_| too_large())?;
    let mut rng = StdRng::seed_from_u64(seed);
    values.extend((0..len).map(|_| -> f32 { StandardNormal.sample(&mut rng) }));
    Ok(Tensor::from_data(
        TensorData::new(values, [rows, cols]),
        options,
    ))
}

/// An orthonormal basis `Q: [m, l]` of the range of `A Ω` after `power_iterations` rounds,
/// with `Ω` from [`gaussian_sketch`]`(n, l, seed)`.
///
/// # Errors
///
/// [`SubspaceError::NonFinite`] (factor `"input"`) when `A` holds NaN or ±Inf. It is detected
/// on the sketch `A Ω`, which is non-finite exactly then (or if the product overflows `f32`),
/// at the cost of one reduction over `m × l` numbers instead of `m × n`.
/// [`SubspaceError::InvalidSketch`] for an empty matrix or sketch (`m`, `n` or `l` zero), or
/// one [`gaussian_sketch`] cannot draw.
pub fn range_finder(
    a: &Tensor<2>,
    l: usize,
    power_iterations: usize,
    seed: u64,
) -> Result<Tensor<2>, SubspaceError> {
    let [m, n] = a.dims();
    if m == 0 || n == 0 || l == 0 {
        return Err(SubspaceError::InvalidSketch {
            reason: format!("the range of a {m} × {n} matrix by a sketch of {l} columns is empty"),
        });
    }
    let omega = gaussian_sketch(n, l, seed, like(a))?;
    let sketch = a.clone().matmul(omega);
    let probe: f64 = sketch.clone().sum().into_scalar::<f64>();
    if !probe.is_finite() {
        return Err(SubspaceError::NonFinite { factor: "input" });
    }
    let mut q = orthonormalize(sketch)?;
    for _ in 0..power_iterations {
        // Aᵀ Q as (Qᵀ A)ᵀ: transposing the small factor is much cheaper than multiplying by a
        // transposed A (28 ms against 3 ms for 2048² on ndarray, measured).
        let z = orthonormalize(q.transpose().matmul(a.clone()).transpose())?;
        q = orthonormalize(a.clone().matmul(z))?;
    }
    Ok(q)
}

/// Orthonormal columns spanning those of `y: [m, l]` (`m ≥ l`): CholeskyQR2, or a host
/// Householder QR when the sketch is rank-deficient or too ill-conditioned for it.
///
/// # Errors
///
/// [`SubspaceError::InvalidSketch`] when `y` has no row or no column: there is nothing to
/// orthonormalize.
pub fn orthonormalize(y: Tensor<2>) -> Result<Tensor<2>, SubspaceError> {
    let [m, l] = y.dims();
    if m == 0 || l == 0 {
        return Err(SubspaceError::InvalidSketch {
            reason: format!("a {m} × {l} matrix has no columns to orthonormalize"),
        });
    }
    Ok(cholesky_qr(y.clone())
        .and_then(cholesky_qr)
        .unwrap_or_else(|| householder_qr(y)))
}

/// The largest `κ(Y)`, as estimated from the Cholesky diagonal, that one CholeskyQR pass accepts.
/// A pass leaves `‖QᵀQ − I‖ ≈ κ²ε`; at `κ ≤ ε^{-1/2}/8` that is at most 1/64, which the second
/// pass brings down to `O(ε)` (Yamamoto, Nakatsukasa, Yanagisawa & Fukaya, ETNA 2015).
fn cholesky_qr_max_condition() -> f64 {
    1.0 / (8.0 * f64::from(f32::EPSILON).sqrt())
}

/// One CholeskyQR pass `Y L⁻ᵀ` with `YᵀY = L Lᵀ`, or `None` when it would not be reliable.
fn cholesky_qr(y: Tensor<2>) -> Option<Tensor<2>> {
    let [_, l] = y.dims();
    let gram = host_matrix(y.clone().transpose().matmul(y.clone()));
    let factor = gram.llt(Side::Lower).ok()?;
    let lower = factor.L();
    let diagonal = (0..l).map(|i| lower[(i, i)]);
    let (min, max) = diagonal.fold((f64::INFINITY, 0.0f64), |(lo, hi), d| {
        (lo.min(d), hi.max(d))
    });
    if !(min > 0.0 && max / min <= cholesky_qr_max_condition()) {
        return None;
    }
    let mut inverse = Mat::<f64>::zeros(l, l);
    invert_lower_triangular(inverse.as_mut(), lower, Par::Seq);
    let r_inverse = device_matrix(inverse.transpose(), like(&y));
    Some(y.matmul(r_inverse))
}

fn householder_qr(y: Tensor<2>) -> Tensor<2> {
    let options = like(&y);
    let q = host_matrix(y).qr().compute_thin_Q();
    device_matrix(q.as_ref(), options)
}

/// The rank-`k` basis of `a` from an orthonormal range basis `q: [m, l]`: the SVD of `B = QᵀA`,
/// lifted back by `U = Q Ũ`. Directions with `σ_i ≤ rank_tolerance·σ_1` are dropped.
///
/// # Errors
///
/// [`SubspaceError::RowMismatch`] when `q` and `a` have different numbers of rows, and
/// [`SubspaceError::SvdFailed`] if faer's SVD does not converge. An empty `a` or `q` gives the
/// empty basis.
pub fn truncated_svd(
    a: &Tensor<2>,
    q: Tensor<2>,
    k: usize,
    rank_tolerance: f64,
) -> Result<LowRankBasis, SubspaceError> {
    let [m, n] = a.dims();
    let [rows, l] = q.dims();
    if rows != m {
        return Err(SubspaceError::RowMismatch {
            left: rows,
            right: m,
        });
    }
    let device = a.device();
    // No direction to find, and burn-ndarray's matmul divides by an inner dimension of 0.
    if m == 0 || n == 0 || l == 0 || k == 0 {
        return Ok(LowRankBasis::empty(m, n, &device));
    }
    let b = host_matrix(q.clone().transpose().matmul(a.clone()));
    let svd = b.thin_svd().map_err(|err| SubspaceError::SvdFailed {
        message: format!("{err:?}"),
    })?;
    let s = svd.S().column_vector();
    let k = (0..k.min(s.nrows()))
        .take_while(|&i| s[i] > rank_tolerance * s[0])
        .count();
    if k == 0 {
        return Ok(LowRankBasis::empty(m, n, &device));
    }
    let u = q.matmul(device_matrix(svd.U().get(.., ..k), like(a)));
    let v = device_matrix(svd.V().get(.., ..k), like(a));
    let sigma: Vec<f64> = (0..k).map(|i| s[i]).collect();
    let sigma = Tensor::from_data(TensorData::new(sigma, [k]), like(a));
    LowRankBasis::new(u, sigma, v)
}

pub(crate) fn host_matrix(t: Tensor<2>) -> Mat<f64> {
    let [rows, cols] = t.dims();
    let values: Vec<f64> = t.into_data().iter::<f64>().collect();
    Mat::from_fn(rows, cols, |i, j| values[i * cols + j])
}

/// The device and dtype of `t`, for creating tensors that combine with it. burn resolves a bare
/// device to the float dtype of the device's settings, so tensors of another dtype (`f64` factors
/// on an `f32` device) would otherwise meet `f32` sketches.
fn like<const D: usize>(t: &Tensor<D>) -> TensorCreationOptions {
    (&t.device(), t.dtype()).into()
}

/// Uploads a host matrix; burn converts the `f64` values to the requested dtype.
fn device_matrix(m: MatRef<'_, f64>, options: impl Into<TensorCreationOptions>) -> Tensor<2> {
    let (rows, cols) = (m.nrows(), m.ncols());
    let values: Vec<f64> = (0..rows)
        .flat_map(|i| (0..cols).map(move |j| m[(i, j)]))
        .collect();
    Tensor::from_data(TensorData::new(values, [rows, cols]), options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subspace_overlap;

    fn gaussian(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        Mat::from_fn(rows, cols, |_, _| StandardNormal.sample(&mut rng))
    }

    /// `U diag(spectrum) Vᵀ` with random orthonormal `U: [m, r]`, `V: [n, r]`.
    fn with_spectrum(m: usize, n: usize, spectrum: &[f64], seed: u64) -> Mat<f64> {
        let r = spectrum.len();
        let u = gaussian(m, r, seed).qr().compute_thin_Q();
        let v = gaussian(n, r, seed + 1).qr().compute_thin_Q();
        let scaled = Mat::from_fn(m, r, |i, j| u[(i, j)] * spectrum[j]);
        scaled * v.transpose()
    }

    fn device(m: &Mat<f64>) -> Tensor<2> {
        device_matrix(m.as_ref(), &Default::default())
    }

    /// The exact top-`k` left singular vectors, from faer.
    fn exact_left(a: &Mat<f64>, k: usize) -> Tensor<2> {
        let svd = a.thin_svd().unwrap();
        device_matrix(svd.U().get(.., ..k), &Default::default())
    }

    /// `‖A − U Σ Vᵀ‖_F`, in `f64` on the host.
    fn residual(a: &Mat<f64>, basis: &LowRankBasis) -> f64 {
        let u = host_matrix(basis.u().clone());
        let v = host_matrix(basis.v().clone());
        let s = basis.singular_values();
        let us = Mat::from_fn(u.nrows(), u.ncols(), |i, j| u[(i, j)] * s[j]);
        (a - us * v.transpose()).norm_l2()
    }

    fn orthonormality_error(f: &Tensor<2>) -> f64 {
        let f = host_matrix(f.clone());
        let gram = f.transpose() * &f;
        (gram - Mat::<f64>::identity(f.ncols(), f.ncols())).norm_max()
    }

    #[test]
    fn exactly_low_rank_input_is_recovered() {
        for (m, n, r, k) in [(60, 40, 3, 5), (40, 60, 5, 5), (30, 30, 1, 8)] {
            let spectrum: Vec<f64> = (0..r).map(|i| 10.0 / (i + 1) as f64).collect();
            let a = with_spectrum(m, n, &spectrum, 7);
            let basis = RandomizedSvd::new(RandomizedSvdConfig::new(k))
                .compute(&device(&a))
                .unwrap();
            assert_eq!(basis.rank(), r, "{m}x{n}: truncated to the numerical rank");
            let overlap = subspace_overlap(basis.u(), &exact_left(&a, r)).unwrap();
            assert!(overlap >= 0.999, "{m}x{n} r={r}: overlap {overlap}");
            // f32 storage of A, Q and the factors: O(ε·(m + n + l)) relative error.
            let tol = 4.0 * (m + n + k + 8) as f64 * f64::from(f32::EPSILON) * a.norm_l2();
            let err = residual(&a, &basis);
            assert!(err <= tol, "{m}x{n} r={r}: residual {err:e} > {tol:e}");
            for (got, want) in basis.singular_values().iter().zip(&spectrum) {
                assert!((got - want).abs() <= tol, "σ {got} vs {want}");
            }
        }
    }

    #[test]
    fn low_rank_plus_noise_finds_the_dominant_subspace() {
        let (m, n, k) = (200, 120, 8);
        let spectrum: Vec<f64> = (0..32).map(|i| 0.8f64.powi(i)).collect();
        let signal = with_spectrum(m, n, &spectrum, 3);
        let noise = gaussian(m, n, 99);
        let a = &signal + (0.01 * signal.norm_l2() / noise.norm_l2()) * noise;
        let basis = RandomizedSvd::new(RandomizedSvdConfig::new(k))
            .compute(&device(&a))
            .unwrap();
        let overlap = subspace_overlap(basis.u(), &exact_left(&a, k)).unwrap();
        assert!(overlap >= 0.99, "overlap {overlap}");
        let exact = a.thin_svd().unwrap();
        let exact_s = exact.S().column_vector();
        for (i, s) in basis.singular_values().iter().enumerate() {
            let rel = (s - exact_s[i]).abs() / exact_s[i];
            assert!(rel < 1e-3, "σ_{i}: {s} vs {}", exact_s[i]);
        }
    }

    #[test]
    fn flat_spectrum_meets_the_halko_martinsson_tropp_bound() {
        let (m, n, k, p) = (80, 80, 6, 8);
        let spectrum = vec![1.0; 40];
        let a = with_spectrum(m, n, &spectrum, 5);
        let sketch = SketchConfig::new()
            .with_oversampling(p)
            .with_power_iterations(0);
        let config = RandomizedSvdConfig::new(k).with_sketch(sketch);
        let basis = RandomizedSvd::new(config).compute(&device(&a)).unwrap();
        // HMT Thm 10.5 bounds the expected error of the range; the rank-k truncation adds at most
        // the tail itself. One seeded draw: allow a factor of 2 over the expectation.
        let tail = ((spectrum.len() - k) as f64).sqrt();
        let bound = 2.0 * (1.0 + k as f64 / (p as f64 - 1.0)).sqrt() * tail + tail;
        let err = residual(&a, &basis);
        assert!(err <= bound, "residual {err} > {bound}");
        assert!(basis.singular_values().iter().all(|s| *s <= 1.0 + 1e-4));
    }

    /// CholeskyQR takes a well-conditioned sketch (the fast path) and refuses one whose
    /// condition exceeds its limit, which then goes to Householder and still comes out
    /// orthonormal; a zero column (rank-deficient) is refused too.
    #[test]
    fn cholesky_qr_takes_well_conditioned_sketches_and_refuses_the_rest() {
        let tol = LowRankBasis::default_tolerance(64, 8);
        let well = device(&gaussian(64, 8, 3));
        let q = cholesky_qr(well).expect("a Gaussian 64 × 8 sketch is well conditioned");
        assert!(orthonormality_error(&cholesky_qr(q).unwrap()) <= tol);

        // Column scales from 1 to 1e-5: κ ≈ 1e5, far above the limit (about 360 in f32).
        let scaled = gaussian(64, 8, 4);
        let ill = Mat::from_fn(64, 8, |i, j| {
            scaled[(i, j)] * 10f64.powf(-5.0 * j as f64 / 7.0)
        });
        assert!(cholesky_qr(device(&ill)).is_none(), "κ ≈ 1e5 accepted");
        assert!(orthonormality_error(&orthonormalize(device(&ill)).unwrap()) <= tol);

        let mut deficient = gaussian(64, 8, 5);
        deficient.col_mut(3).fill(0.0);
        assert!(
            cholesky_qr(device(&deficient)).is_none(),
            "a zero column accepted"
        );
    }

    #[test]
    fn factors_are_orthonormal_and_sigma_sorted() {
        let a = gaussian(64, 48, 11);
        let basis = RandomizedSvd::new(RandomizedSvdConfig::new(10))
            .compute(&device(&a))
            .unwrap();
        let tol = LowRankBasis::default_tolerance(64, 48);
        assert!(orthonormality_error(basis.u()) <= tol);
        assert!(orthonormality_error(basis.v()) <= tol);
        let s = basis.singular_values();
        assert!(s.windows(2).all(|w| w[0] >= w[1]) && s.iter().all(|x| *x >= 0.0));
    }

    #[test]
    fn fixed_seed_is_bit_identical() {
        let a = device(&gaussian(50, 30, 1));
        let svd = RandomizedSvd::new(
            RandomizedSvdConfig::new(4).with_sketch(SketchConfig::new().with_seed(42)),
        );
        let (first, second) = (svd.compute(&a).unwrap(), svd.compute(&a).unwrap());
        assert_eq!(first.u().to_data(), second.u().to_data());
        assert_eq!(first.v().to_data(), second.v().to_data());
        assert_eq!(first.singular_values(), second.singular_values());
    }

    /// The sketch is the documented stream, independent of what the code printed once: rand's
    /// `StandardNormal` drawn from `StdRng::seed_from_u64(seed)`, laid out row-major; and its
    /// entries have the moments of `N(0, 1)`, within five standard errors.
    #[test]
    fn the_sketch_is_the_seeded_standard_normal_stream() {
        let (rows, cols, seed) = (64, 48, 42);
        let sketch_of = |seed: u64| -> Vec<f32> {
            gaussian_sketch(rows, cols, seed, &Default::default())
                .unwrap()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
        };
        let sketch = sketch_of(seed);
        let mut rng = StdRng::seed_from_u64(seed);
        let stream: Vec<f32> = (0..rows * cols)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        assert_eq!(sketch, stream);

        let n = sketch.len() as f64;
        let mean = sketch.iter().map(|x| f64::from(*x)).sum::<f64>() / n;
        let var = sketch
            .iter()
            .map(|x| (f64::from(*x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 5.0 / n.sqrt(), "mean {mean}");
        assert!((var - 1.0).abs() < 5.0 * (2.0 / n).sqrt(), "variance {var}");

        assert_ne!(sketch, sketch_of(seed + 1), "the seed selects the stream");
    }

    #[test]
    fn check_refuses_only_what_cannot_run() {
        let with = |iterations: usize, tolerance: Option<f64>| {
            RandomizedSvdConfig::new(2)
                .with_sketch(SketchConfig::new().with_power_iterations(iterations))
                .with_rank_tolerance(tolerance)
                .check()
        };
        assert!(with(MAX_POWER_ITERATIONS, None).is_ok());
        assert!(with(MAX_POWER_ITERATIONS + 1, None).is_err());
        for fine in [Some(0.0), Some(0.5), None] {
            assert!(with(2, fine).is_ok(), "{fine:?}");
        }
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            assert!(with(2, Some(bad)).is_err(), "{bad}");
        }
    }

    /// The rank tolerance is relative to `σ_1`: at `τ = 0.1`, `σ_2/σ_1 = 0.05` is dropped and
    /// `0.2` kept, whatever the scale of the matrix.
    #[test]
    fn the_rank_tolerance_is_relative_to_the_largest_singular_value() {
        for (second, rank) in [(5.0, 1), (20.0, 2)] {
            let a = with_spectrum(30, 20, &[100.0, second], 9);
            let svd =
                RandomizedSvd::new(RandomizedSvdConfig::new(2).with_rank_tolerance(Some(0.1)));
            assert_eq!(
                svd.compute(&device(&a)).unwrap().rank(),
                rank,
                "σ_2 = {second}"
            );
        }
    }

    /// `f64` input gives `f64` factors, exact to `f64` rounding, on a device whose default float
    /// dtype is `f32` (so the sketch must follow the input, not the device).
    #[test]
    fn f64_input_gets_f64_factors() {
        use burn::tensor::DType;
        let _f32_first = Tensor::<1>::zeros([1], &Default::default());
        let a = with_spectrum(40, 30, &[3.0, 2.0, 1.0], 12);
        let device64 = crate::testing::device();
        let input: Tensor<2> = device_matrix(a.as_ref(), (&device64, DType::F64));
        assert_eq!(input.dtype(), DType::F64);
        let basis = RandomizedSvd::new(RandomizedSvdConfig::new(3))
            .compute(&input)
            .unwrap();
        assert_eq!(basis.u().dtype(), DType::F64);
        assert_eq!(basis.v().dtype(), DType::F64);
        let err = residual(&a, &basis);
        assert!(
            err < 1e-10,
            "rank-3 reconstruction error {err:e} is not f64 rounding"
        );
    }

    #[test]
    fn degenerate_inputs() {
        let svd = RandomizedSvd::new(RandomizedSvdConfig::new(3));
        let zero = Tensor::<2>::zeros([5, 4], &Default::default());
        assert_eq!(svd.compute(&zero).unwrap().rank(), 0);

        for bad in [f32::NAN, f32::INFINITY] {
            let mut values = vec![1.0f32; 20];
            values[7] = bad;
            let a = Tensor::<2>::from_data(TensorData::new(values, [5, 4]), &Default::default());
            assert_eq!(
                svd.compute(&a).unwrap_err(),
                SubspaceError::NonFinite { factor: "input" }
            );
        }
        let thin = device(&gaussian(6, 2, 4));
        assert_eq!(
            svd.compute(&thin).unwrap().rank(),
            2,
            "k is capped at min(m, n)"
        );
    }

    #[test]
    fn orthonormalize_handles_rank_deficient_sketches() {
        // Columns 3 and 4 repeat columns 0 and 1: CholeskyQR must give way to Householder.
        let base = gaussian(20, 3, 8);
        let y = Mat::from_fn(20, 5, |i, j| base[(i, j % 3)]);
        let q = orthonormalize(device(&y)).unwrap();
        assert!(orthonormality_error(&q) <= LowRankBasis::default_tolerance(20, 5));
        // Q spans Y: ‖Y − QQᵀY‖ is rounding only.
        let qh = host_matrix(q);
        let residual = (&y - &qh * (qh.transpose() * &y)).norm_l2();
        assert!(
            residual <= 64.0 * f64::from(f32::EPSILON) * y.norm_l2(),
            "{residual:e}"
        );
    }

    /// The public steps refuse what they cannot compute with a typed error: a sketch without a
    /// column, one too large to count, and a range basis of another matrix. Each used to panic
    /// (a division by zero in the sketch product, an overflowed `rows × cols`, a mismatched
    /// product).
    #[test]
    fn the_steps_refuse_an_empty_sketch_an_uncountable_one_and_a_foreign_range() {
        let device = Default::default();
        let a = Tensor::<2>::ones([4, 3], &device);
        let invalid = |r: Result<Tensor<2>, SubspaceError>| {
            matches!(r, Err(SubspaceError::InvalidSketch { .. }))
        };
        assert!(invalid(range_finder(&a, 0, 1, 7)));
        assert!(invalid(gaussian_sketch(usize::MAX, 2, 7, &device)));
        let q = range_finder(&a, 2, 0, 7).unwrap();
        let other = Tensor::<2>::ones([5, 3], &device);
        assert_eq!(
            truncated_svd(&other, q, 2, 1e-6).err(),
            Some(SubspaceError::RowMismatch { left: 4, right: 5 })
        );
    }
}
