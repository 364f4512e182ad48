//! Fixtures for the numerical checks in `tests/`: host (`f64`, faer) versions of the quantities
//! in the SPF method note, random problems, projection through the bare function or through the
//! optimizer wrapper, and a [`Margin`] that every check reports.
//!
//! `cargo test -p spf-theory -- --nocapture` prints one `margin` line per check; the long sweeps
//! are `#[ignore]`d and run with `-- --ignored`.

use burn::module::{Module, Param};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{DType, Device, Tensor};
use faer::Mat;
use spf_core::{ProjectionMode, RankPolicy, SpfConfig, SubspaceConfig, project};

/// The fixtures this crate shares with spf-core's unit tests (spf-core's `testing` feature).
pub use spf_core::testing::{Gaussian, HostBasis, download, inner, round_f32, upload};

/// The library's default float type, for the projection invariants.
pub const F32: DType = DType::F32;
/// `f64`, for the theorems, whose constants are then exact to `1e-16`.
pub const F64: DType = DType::F64;

/// The device the checks compute on: burn's default (the CPU here).
pub fn test_device() -> Device {
    Device::default()
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
pub struct Matrix {
    /// The parameter `W`.
    pub w: Param<Tensor<2>>,
}

/// `P(G)` for the basis and mode, by `path`, on the `f32` backend.
pub fn projected(g: &Mat<f64>, basis: &HostBasis, mode: ProjectionMode, path: Path) -> Mat<f64> {
    let device = test_device();
    let device_basis = basis.to_device((&device, F32));
    match path {
        Path::Direct => download(
            project(upload(g, (&device, F32)), &device_basis, mode)
                .unwrap()
                .grad,
        ),
        Path::Wrapper => {
            let zero = Mat::<f64>::zeros(g.nrows(), g.ncols());
            let module = Matrix {
                w: Param::from_tensor(upload(&zero, (&device.clone().autodiff(), F32))),
            };
            let config = SpfConfig::new()
                .with_mode(mode)
                .with_estimator(SubspaceConfig::new().with_rank(RankPolicy::Fixed(basis.rank())));
            let mut optim = config
                .init(
                    SgdConfig::new().init(),
                    &module,
                    [(module.w.id, device_basis)],
                )
                .unwrap();
            let mut grads = GradientsParams::new();
            grads.register(module.w.id, upload(g, (&device, F32)));
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
        Self::with_eigenvectors(&rng.orthonormal(n, n), eigenvalues, center)
    }

    /// `H = Q diag(λ) Qᵀ` for orthonormal eigenvectors `Q: [n, r]` (`vec` of `d_in × d_out`
    /// matrices, row-major) and their `r` eigenvalues: `H` is zero outside the span of `Q`, so the
    /// gradient `H vec(θ − c)` always lies in that span.
    pub fn with_eigenvectors(q: &Mat<f64>, eigenvalues: &[f64], center: Mat<f64>) -> Self {
        let n = center.nrows() * center.ncols();
        assert_eq!(q.nrows(), n, "one eigenvector entry per entry of θ");
        assert_eq!(
            q.ncols(),
            eigenvalues.len(),
            "one eigenvalue per eigenvector"
        );
        let scaled = Mat::from_fn(n, q.ncols(), |i, j| q[(i, j)] * eigenvalues[j]);
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
    /// `‖G_t‖² = ‖∇L_u(θ_t)‖²`, the utility gradient before the projection, `t = 0..T`.
    pub gradient_energy: Vec<f64>,
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
    let device = test_device();
    let mut module = Matrix {
        w: Param::from_tensor(upload(theta0, (&device.clone().autodiff(), F64))),
    };
    let id = module.w.id;
    let (mode, rank) = match method {
        Method::Sgd => (ProjectionMode::ConflictOnly, 0),
        Method::Spf { mode, rank } => (mode, rank),
    };
    let config = SpfConfig::new()
        .with_mode(mode)
        .with_estimator(SubspaceConfig::new().with_rank(RankPolicy::Fixed(rank)));
    let mut optim = config.init(SgdConfig::new().init(), &module, []).unwrap();

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
                .insert_bases([(id, basis.to_device((&device, F64)))])
                .unwrap();
        }
        let g = utility.gradient(&theta);
        run.gradient_energy.push(g.squared_norm_l2());
        let mut grads = GradientsParams::new();
        grads.register(id, upload(&g, (&device, F64)));
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
