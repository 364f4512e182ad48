//! Fixtures for the numerical checks in `tests/`: host (`f64`, faer) versions of the quantities
//! in the SPF method note, random problems, projection through the bare function or through the
//! optimizer wrapper, and a [`Margin`] that every check reports.
//!
//! `cargo test -p spf-theory -- --nocapture` prints one `margin` line per check; the long sweeps
//! are `#[ignore]`d and run with `-- --ignored`.

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, Param};
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Element, Tensor, TensorData};
use faer::Mat;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use spf_core::{ProjectionMode, RankPolicy, SpfConfig, SubspaceConfig, project};
use spf_subspace::LowRankBasis;

/// The default backend of the library, for the projection invariants.
pub type F32 = NdArray<f32>;
/// An `f64` backend, for the theorems, whose constants are then exact to `1e-16`.
pub type F64 = NdArray<f64>;

/// A seeded source of Gaussian matrices.
pub struct Gaussian(StdRng);

impl Gaussian {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    /// One standard normal sample.
    pub fn sample(&mut self) -> f64 {
        StandardNormal.sample(&mut self.0)
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

    /// The basis on a device, checked by [`LowRankBasis::with_tolerance`] at `f32` accuracy.
    pub fn to_device<B: Backend>(&self, device: &B::Device) -> LowRankBasis<B> {
        let k = self.rank();
        let sigma = Tensor::from_data(
            TensorData::new(self.sigma.clone(), [k]),
            options::<B>(device),
        );
        let [d_in, d_out] = [self.u.nrows(), self.v.nrows()];
        LowRankBasis::with_tolerance(
            upload(&self.u, device),
            sigma,
            upload(&self.v, device),
            LowRankBasis::<B>::default_tolerance(d_in, d_out),
        )
        .expect("QR and SVD factors are orthonormal")
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

/// The device and the backend's own float dtype. burn 0.21's default dtype is per device and
/// shared by every backend on it, so an `f64` backend must ask for `f64` explicitly.
fn options<B: Backend>(device: &B::Device) -> (&B::Device, DType) {
    (device, <B::FloatElem as Element>::dtype())
}

/// `m` on the device, in the backend's float type.
pub fn upload<B: Backend>(m: &Mat<f64>, device: &B::Device) -> Tensor<B, 2> {
    let values: Vec<f64> = (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
        .collect();
    Tensor::from_data(
        TensorData::new(values, [m.nrows(), m.ncols()]),
        options::<B>(device),
    )
}

/// A device matrix back on the host.
pub fn download<B: Backend>(t: Tensor<B, 2>) -> Mat<f64> {
    let [rows, cols] = t.dims();
    let values: Vec<f64> = t.into_data().iter::<f64>().collect();
    Mat::from_fn(rows, cols, |i, j| values[i * cols + j])
}

/// How a check obtains `G̃ = P(G)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// [`spf_core::project`].
    Direct,
    /// One step of `SafetyProjectedOptimizer<Sgd>` with learning rate 1 on a zero parameter:
    /// `W' = 0 − 1·G̃ = −G̃`, exactly in floating point.
    Wrapper,
}

/// A module with one matrix parameter.
#[derive(Module, Debug)]
pub struct Matrix<B: Backend> {
    /// The parameter `W`.
    pub w: Param<Tensor<B, 2>>,
}

/// `P(G)` for the basis and mode, by `path`, on the `f32` backend.
pub fn projected(g: &Mat<f64>, basis: &HostBasis, mode: ProjectionMode, path: Path) -> Mat<f64> {
    let device = Default::default();
    let device_basis = basis.to_device::<F32>(&device);
    match path {
        Path::Direct => download(
            project(upload::<F32>(g, &device), &device_basis, mode)
                .unwrap()
                .grad,
        ),
        Path::Wrapper => {
            type B = Autodiff<F32>;
            let zero = Mat::<f64>::zeros(g.nrows(), g.ncols());
            let module = Matrix::<B> {
                w: Param::from_tensor(Tensor::from_inner(upload::<F32>(&zero, &device))),
            };
            let config = SpfConfig::new()
                .with_mode(mode)
                .with_estimator(SubspaceConfig::new().with_rank(RankPolicy::Fixed(basis.rank())));
            let mut optim = config
                .init(
                    SgdConfig::new().init::<B, Matrix<B>>(),
                    &module,
                    [(module.w.id, device_basis)],
                )
                .unwrap();
            let mut grads = GradientsParams::new();
            grads.register(module.w.id, upload::<F32>(g, &device));
            let stepped = optim.step(1.0, module, grads);
            let w = download(stepped.w.val().inner());
            Mat::from_fn(w.nrows(), w.ncols(), |i, j| -w[(i, j)])
        }
    }
}

/// One numerical check: an upper bound, the worst observed value, and their difference.
#[derive(Debug, Clone)]
pub struct Margin {
    /// What was checked.
    pub name: String,
    /// The bound the theory gives.
    pub bound: f64,
    /// The worst value observed over seeds and steps.
    pub observed: f64,
}

impl Margin {
    /// `bound − observed`: non-negative when the check holds.
    pub fn margin(&self) -> f64 {
        self.bound - self.observed
    }

    /// Prints the check as a table row and asserts that it holds.
    ///
    /// # Panics
    ///
    /// When `observed > bound`.
    pub fn report(&self) {
        println!(
            "margin | {} | bound {:.6e} | worst observed {:.6e} | margin {:.6e}",
            self.name,
            self.bound,
            self.observed,
            self.margin()
        );
        assert!(
            self.observed <= self.bound,
            "{} violated: {self:?}",
            self.name
        );
    }
}

/// A convex quadratic `L(θ) = ½ vec(θ − c)ᵀ H vec(θ − c)` over `d_in × d_out` matrices
/// (`vec` is row-major), with `H` symmetric positive semi-definite.
#[derive(Debug, Clone)]
pub struct Quadratic {
    /// `H: [n, n]`, `n = d_in·d_out`.
    pub h: Mat<f64>,
    /// The minimizer `c`, where `L = 0`.
    pub center: Mat<f64>,
    /// `λ_max(H)`: the smoothness constant `L`.
    pub smoothness: f64,
}

impl Quadratic {
    /// `H = Q diag(λ) Qᵀ` with a random orthogonal `Q`, the given eigenvalues (zeros allowed, for
    /// a low-rank `H`), and the minimizer `center`.
    pub fn new(rng: &mut Gaussian, eigenvalues: &[f64], center: Mat<f64>) -> Self {
        let n = eigenvalues.len();
        assert_eq!(
            n,
            center.nrows() * center.ncols(),
            "one eigenvalue per entry of θ"
        );
        let q = rng.orthonormal(n, n);
        let scaled = Mat::from_fn(n, n, |i, j| q[(i, j)] * eigenvalues[j]);
        let h = scaled * q.transpose();
        let smoothness = eigenvalues.iter().copied().fold(0.0, f64::max);
        Self {
            h,
            center,
            smoothness,
        }
    }

    fn offset(&self, theta: &Mat<f64>) -> Mat<f64> {
        let cols = theta.ncols();
        let d = theta - &self.center;
        Mat::from_fn(d.nrows() * cols, 1, |k, _| d[(k / cols, k % cols)])
    }

    /// `L(θ)`.
    pub fn value(&self, theta: &Mat<f64>) -> f64 {
        let x = self.offset(theta);
        0.5 * (x.transpose() * (&self.h * &x))[(0, 0)]
    }

    /// `∇L(θ) = H vec(θ − c)`, as a `d_in × d_out` matrix.
    pub fn gradient(&self, theta: &Mat<f64>) -> Mat<f64> {
        let g = &self.h * self.offset(theta);
        let cols = theta.ncols();
        Mat::from_fn(theta.nrows(), cols, |i, j| g[(i * cols + j, 0)])
    }
}

/// What a fine-tuning run on two quadratics recorded, step by step.
#[derive(Debug, Clone, Default)]
pub struct Trajectory {
    /// `L_u(θ_t)`, `t = 0..=T`.
    pub utility: Vec<f64>,
    /// `L_s(θ_t)`, `t = 0..=T`.
    pub safety: Vec<f64>,
    /// `‖G̃_t‖²`, the applied step direction, `t = 0..T`.
    pub step_energy: Vec<f64>,
    /// `‖∇L_s(θ_t)‖`, `t = 0..T`.
    pub safety_grad_norm: Vec<f64>,
    /// `ε_t = ‖G_s − G_s^k‖/‖G_s‖`, the part of the safety gradient outside the rank-`k` basis.
    pub epsilon: Vec<f64>,
}

/// How a run treats the utility gradient.
#[derive(Debug, Clone, Copy)]
pub enum Method {
    /// Plain SGD.
    Sgd,
    /// SGD wrapped by SPF in `mode`, with the exact rank-`k` truncated SVD of the safety gradient
    /// at the current weights inserted before every step.
    Spf {
        /// The projection mode.
        mode: ProjectionMode,
        /// The basis rank `k`.
        rank: usize,
    },
}

/// `steps` steps of SGD with learning rate `eta` on `utility`, from `theta0`, watching `safety`.
/// Runs on the `f64` backend through burn's `Sgd` and, for SPF, the wrapper.
pub fn fine_tune(
    utility: &Quadratic,
    safety: &Quadratic,
    theta0: &Mat<f64>,
    eta: f64,
    steps: usize,
    method: Method,
) -> Trajectory {
    type B = Autodiff<F64>;
    let device = Default::default();
    let mut module = Matrix::<B> {
        w: Param::from_tensor(Tensor::from_inner(upload::<F64>(theta0, &device))),
    };
    let id = module.w.id;
    let (mode, rank) = match method {
        Method::Sgd => (ProjectionMode::ConflictOnly, 0),
        Method::Spf { mode, rank } => (mode, rank),
    };
    let config = SpfConfig::new()
        .with_mode(mode)
        .with_estimator(SubspaceConfig::new().with_rank(RankPolicy::Fixed(rank)));
    let mut optim = config
        .init(SgdConfig::new().init::<B, Matrix<B>>(), &module, [])
        .unwrap();

    let mut theta = theta0.clone();
    let mut run = Trajectory::default();
    for _ in 0..steps {
        run.utility.push(utility.value(&theta));
        run.safety.push(safety.value(&theta));
        let g_s = safety.gradient(&theta);
        let g_s_norm = g_s.norm_l2();
        run.safety_grad_norm.push(g_s_norm);
        if matches!(method, Method::Spf { .. }) {
            let basis = HostBasis::truncated_svd(&g_s, rank);
            let residual = (&g_s - basis.d()).norm_l2();
            run.epsilon.push(if g_s_norm > 0.0 {
                residual / g_s_norm
            } else {
                0.0
            });
            optim
                .insert_bases([(id, basis.to_device::<F64>(&device))])
                .unwrap();
        }
        let mut grads = GradientsParams::new();
        grads.register(id, upload::<F64>(&utility.gradient(&theta), &device));
        module = optim.step(eta, module, grads);
        let next = download(module.w.val().inner());
        let step = (&theta - &next) * faer::Scale(1.0 / eta);
        run.step_energy.push(step.squared_norm_l2());
        theta = next;
    }
    run.utility.push(utility.value(&theta));
    run.safety.push(safety.value(&theta));
    run
}
