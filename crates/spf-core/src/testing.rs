//! Shared fixtures of the unit tests: seeded random matrices and bases, and an `f64` host
//! reference of every projection mode written straight from the formulas of the SPF method note.

use burn::backend::Autodiff;
use burn::tensor::{DType, Element, Tensor, TensorData, backend::Backend};
use faer::Mat;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spf_subspace::LowRankBasis;

use crate::ProjectionMode;

/// The backend every unit test runs on: ndarray, or WGPU with the `test-wgpu` feature (for
/// example on Mesa's lavapipe in CI).
#[cfg(not(feature = "test-wgpu"))]
pub type TestBackend = burn::backend::NdArray;
/// The backend every unit test runs on: ndarray, or WGPU with the `test-wgpu` feature (for
/// example on Mesa's lavapipe in CI).
#[cfg(feature = "test-wgpu")]
pub type TestBackend = burn::backend::Wgpu;
/// Its autodiff counterpart.
pub type TestAutodiffBackend = Autodiff<TestBackend>;

/// A seeded source of Gaussian matrices.
pub struct Gaussian(StdRng);

impl Gaussian {
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n)
    }

    /// A standard normal sample (Box–Muller).
    pub fn sample(&mut self) -> f64 {
        let u1: f64 = 1.0 - self.0.random::<f64>();
        let u2: f64 = self.0.random();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    pub fn matrix(&mut self, rows: usize, cols: usize) -> Mat<f64> {
        Mat::from_fn(rows, cols, |_, _| self.sample())
    }

    /// An `n × k` matrix with orthonormal columns: the thin Q of a Gaussian matrix.
    pub fn orthonormal(&mut self, n: usize, k: usize) -> Mat<f64> {
        if k == 0 {
            return Mat::zeros(n, 0);
        }
        self.matrix(n, k).qr().compute_thin_Q()
    }

    /// A random basis for a `d_in × d_out` parameter: orthonormal factors and sorted positive
    /// singular values.
    pub fn basis(&mut self, d_in: usize, d_out: usize, k: usize) -> HostBasis {
        let mut sigma: Vec<f64> = (0..k).map(|_| 0.1 + self.sample().abs()).collect();
        sigma.sort_by(|a, b| b.total_cmp(a));
        HostBasis {
            u: self.orthonormal(d_in, k),
            sigma,
            v: self.orthonormal(d_out, k),
        }
    }
}

/// The `f64` factors of a basis; [`HostBasis::rounded`] gives what an `f32` device holds.
pub struct HostBasis {
    pub u: Mat<f64>,
    pub sigma: Vec<f64>,
    pub v: Mat<f64>,
}

impl HostBasis {
    pub fn to_device<B: Backend>(&self, device: &B::Device) -> LowRankBasis<B> {
        let sigma = self.sigma.clone();
        let k = sigma.len();
        LowRankBasis::new(
            to_tensor(&self.u, device),
            Tensor::from_data(TensorData::new(sigma, [k]), float_options::<B>(device)),
            to_tensor(&self.v, device),
        )
        .expect("a QR factor is orthonormal")
    }

    /// The same factors as the device holds them (rounded through `f32`).
    pub fn rounded(&self) -> Self {
        Self {
            u: round_f32(&self.u),
            sigma: self.sigma.iter().map(|s| f64::from(*s as f32)).collect(),
            v: round_f32(&self.v),
        }
    }
}

pub fn round_f32(m: &Mat<f64>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| f64::from(m[(i, j)] as f32))
}

/// Uploads `m`; burn rounds it to the backend's float type.
pub fn to_tensor<B: Backend>(m: &Mat<f64>, device: &B::Device) -> Tensor<B, 2> {
    let data: Vec<f64> = (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
        .collect();
    Tensor::from_data(
        TensorData::new(data, [m.nrows(), m.ncols()]),
        float_options::<B>(device),
    )
}

/// `device` with the backend's own float dtype: burn 0.21's per-device default dtype is shared by
/// all backends on a device type, so `NdArray<f64>` would otherwise get `f32` tensors after any
/// `NdArray<f32>` test ran first.
fn float_options<B: Backend>(device: &B::Device) -> (&B::Device, DType) {
    (device, <B::FloatElem as Element>::dtype())
}

pub fn to_host<B: Backend>(t: Tensor<B, 2>) -> Mat<f64> {
    let [rows, cols] = t.dims();
    let values: Vec<f64> = t.into_data().iter::<f64>().collect();
    Mat::from_fn(rows, cols, |i, j| values[i * cols + j])
}

/// `G̃` from the formulas of the SPF method note, in `f64`.
pub fn reference_projection(g: &Mat<f64>, b: &HostBasis, mode: ProjectionMode) -> Mat<f64> {
    let k = b.sigma.len();
    let c: Vec<f64> = (0..k)
        .map(|i| b.u.col(i).transpose() * g * b.v.col(i))
        .collect();
    let rank_k = |r: &dyn Fn(usize) -> f64| {
        let mut out = g.clone();
        for i in 0..k {
            out -= r(i) * (b.u.col(i) * b.v.col(i).transpose());
        }
        out
    };
    match mode {
        ProjectionMode::ConflictOnly => rank_k(&|i| c[i].min(0.0)),
        ProjectionMode::Orthogonal => rank_k(&|i| c[i]),
        ProjectionMode::ColumnSpace => g - &b.u * (b.u.transpose() * g),
        ProjectionMode::RowSpace => g - (g * &b.v) * b.v.transpose(),
        ProjectionMode::Pcgrad => {
            let dot: f64 = (0..k).map(|i| b.sigma[i] * c[i]).sum();
            let d_energy: f64 = b.sigma.iter().map(|s| s * s).sum();
            if dot < 0.0 {
                rank_k(&|i| dot / d_energy * b.sigma[i])
            } else {
                g.clone()
            }
        }
    }
}

/// The largest absolute entry of `a − b`.
pub fn max_abs_diff(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    let mut worst = 0.0f64;
    for i in 0..a.nrows() {
        for j in 0..a.ncols() {
            worst = worst.max((a[(i, j)] - b[(i, j)]).abs());
        }
    }
    worst
}
