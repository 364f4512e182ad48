//! Test fixtures shared by this crate's tests, `spf-theory`, `spf-train`'s Learner example and
//! the facade's examples, tests and benches (the `testing` feature): the backend the tests run
//! on, the small MLP they train, seeded Gaussian matrices and bases on the host (`f64`, faer),
//! moving matrices between host and device, and an `f64` reference of every projection mode
//! written straight from the formulas of the SPF method note. Not part of the library's API.

#![allow(missing_docs)]

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::tanh;
use burn::tensor::{Device, Tensor, TensorCreationOptions, TensorData};
use faer::Mat;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spf_subspace::LowRankBasis;

use crate::projection::ProjectionMode;

/// The device the tests compute on: burn's default, which is the CPU (`flex`) unless a GPU
/// backend is compiled in (the `test-wgpu` feature: WGPU, on Mesa's lavapipe in CI), since burn
/// prefers a GPU to the CPU.
pub fn test_device() -> Device {
    Device::default()
}

/// [`test_device`] with autodiff, where the tests' models live.
pub fn test_autodiff_device() -> Device {
    test_device().autodiff()
}

/// `bytes` sealed with a new checksum, as [`crate::checkpoint::save_atomic`] seals a file, or
/// `None` when they are not a burnpack container whose tensors fit their shapes: for fuzzing the
/// loader beneath the checksum.
pub fn seal_checkpoint(bytes: &[u8]) -> Option<Vec<u8>> {
    let sealed = crate::checkpoint::seal::seal(burn_pack::Bytes::from_bytes_vec(bytes.to_vec()));
    sealed.ok().map(|bytes| bytes.to_vec())
}

/// A multilayer perceptron with `tanh` between its layers: the small model of the quickstart,
/// the Learner example and the data-parallel and resume tests. Any burn module works with SPF;
/// this one is written once so that every example and test means the same model by it.
#[derive(Module, Debug)]
pub struct Mlp {
    /// The linear layers, input first.
    pub layers: Vec<Linear>,
}

impl Mlp {
    /// Layers of widths `widths = [input, hidden…, output]`, initialized by burn's defaults.
    pub fn new(widths: &[usize], device: &Device) -> Self {
        let layers = widths
            .windows(2)
            .map(|w| LinearConfig::new(w[0], w[1]).init(device))
            .collect();
        Self { layers }
    }

    /// The same model with its weights drawn now. burn initializes parameters lazily, at first
    /// use, so a clone taken before that would draw values of its own.
    pub fn materialized(self) -> Self {
        self.clone().load_record(self.into_record())
    }

    /// `layer_n(tanh(… tanh(layer_1(x))))`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len().saturating_sub(1);
        self.layers.iter().enumerate().fold(x, |h, (i, layer)| {
            let h = layer.forward(h);
            if i < last { tanh(h) } else { h }
        })
    }
}

/// A seeded source of Gaussian matrices.
pub struct Gaussian(StdRng);

impl Gaussian {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    /// A uniform index below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n)
    }

    /// One standard normal sample (Box–Muller).
    pub fn sample(&mut self) -> f64 {
        let u1: f64 = 1.0 - self.0.random::<f64>();
        let u2: f64 = self.0.random();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A `rows × cols` matrix of standard normal samples.
    pub fn matrix(&mut self, rows: usize, cols: usize) -> Mat<f64> {
        Mat::from_fn(rows, cols, |_, _| self.sample())
    }

    /// An `n × k` matrix with orthonormal columns (the thin Q of a Gaussian matrix).
    pub fn orthonormal(&mut self, n: usize, k: usize) -> Mat<f64> {
        if k == 0 {
            return Mat::zeros(n, 0);
        }
        self.matrix(n, k).qr().compute_thin_Q()
    }

    /// A random basis for a `d_in × d_out` parameter ([`HostBasis::random`]).
    pub fn basis(&mut self, d_in: usize, d_out: usize, k: usize) -> HostBasis {
        HostBasis::random(self, d_in, d_out, k)
    }
}

/// The factors `U Σ Vᵀ` of a basis on the host.
#[derive(Debug, Clone)]
pub struct HostBasis {
    /// `U: [d_in, k]`.
    pub u: Mat<f64>,
    /// `σ`, non-increasing.
    pub sigma: Vec<f64>,
    /// `V: [d_out, k]`.
    pub v: Mat<f64>,
}

impl HostBasis {
    /// A random basis: orthonormal factors and sorted singular values in `[0.1, 3.1)`.
    pub fn random(rng: &mut Gaussian, d_in: usize, d_out: usize, k: usize) -> Self {
        let mut sigma: Vec<f64> = (0..k).map(|_| 0.1 + rng.sample().abs().min(3.0)).collect();
        sigma.sort_by(|a, b| b.total_cmp(a));
        Self {
            u: rng.orthonormal(d_in, k),
            sigma,
            v: rng.orthonormal(d_out, k),
        }
    }

    /// The exact rank-`k` truncated SVD of `g` (faer), without directions whose singular value
    /// is zero.
    pub fn truncated_svd(g: &Mat<f64>, k: usize) -> Self {
        let svd = g.thin_svd().expect("the SVD of a finite matrix converges");
        let s = svd.S().column_vector();
        let k = (0..k.min(s.nrows())).take_while(|&i| s[i] > 0.0).count();
        Self {
            u: svd.U().get(.., ..k).to_owned(),
            sigma: (0..k).map(|i| s[i]).collect(),
            v: svd.V().get(.., ..k).to_owned(),
        }
    }

    /// Number of directions.
    pub fn rank(&self) -> usize {
        self.sigma.len()
    }

    /// The same factors rounded to `f32`, as an `f32` device holds them.
    pub fn rounded(&self) -> Self {
        Self {
            u: round_f32(&self.u),
            sigma: self.sigma.iter().map(|s| f64::from(*s as f32)).collect(),
            v: round_f32(&self.v),
        }
    }

    /// `B_i = u_i v_iᵀ`.
    pub fn direction(&self, i: usize) -> Mat<f64> {
        self.u.col(i) * self.v.col(i).transpose()
    }

    /// `D = U Σ Vᵀ`.
    pub fn d(&self) -> Mat<f64> {
        let us = Mat::from_fn(self.u.nrows(), self.rank(), |i, j| {
            self.u[(i, j)] * self.sigma[j]
        });
        us * self.v.transpose()
    }

    /// `c_i = u_iᵀ G v_i`.
    pub fn coefficients(&self, g: &Mat<f64>) -> Vec<f64> {
        (0..self.rank())
            .map(|i| self.u.col(i).transpose() * g * self.v.col(i))
            .collect()
    }

    /// The basis on a device (and in a dtype: a device alone means its default float type),
    /// checked by [`LowRankBasis::new`] at `f32` accuracy.
    pub fn to_device(&self, options: impl Into<TensorCreationOptions>) -> LowRankBasis {
        let options: TensorCreationOptions = options.into();
        let k = self.rank();
        let sigma = Tensor::from_data(TensorData::new(self.sigma.clone(), [k]), options.clone());
        let (u, v) = (upload(&self.u, options.clone()), upload(&self.v, options));
        LowRankBasis::new(u, sigma, v).expect("QR and SVD factors are orthonormal")
    }
}

/// `m` with every entry rounded to the nearest `f32`.
pub fn round_f32(m: &Mat<f64>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| f64::from(m[(i, j)] as f32))
}

/// `⟨a, b⟩_F`.
pub fn inner(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    let mut sum = 0.0;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            sum += a[(i, j)] * b[(i, j)];
        }
    }
    sum
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

/// `m` on a device (and in a dtype: a device alone means its default float type).
pub fn upload(
    m: &Mat<impl Copy + Into<f64>>,
    options: impl Into<TensorCreationOptions>,
) -> Tensor<2> {
    let values: Vec<f64> = (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)].into()))
        .collect();
    Tensor::from_data(TensorData::new(values, [m.nrows(), m.ncols()]), options)
}

/// A device matrix back on the host.
pub fn download(t: Tensor<2>) -> Mat<f64> {
    let [rows, cols] = t.dims();
    let values: Vec<f64> = t.into_data().iter::<f64>().collect();
    Mat::from_fn(rows, cols, |i, j| values[i * cols + j])
}

/// `G̃` from the formulas of the SPF method note, in `f64` ([`ProjectionMode`]'s reference).
pub fn reference_projection(g: &Mat<f64>, b: &HostBasis, mode: ProjectionMode) -> Mat<f64> {
    mode.reference(g, (&b.u, &b.sigma, &b.v))
}
