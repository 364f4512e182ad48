//! The first-order guarantee of SPF on LoRA adapters (`spf_core::projection::lora`),
//! property-tested: for a weight `W = W₀ + s·A B` whose factors take a projected step, the
//! first-order change of `W` keeps what the full-weight SPF step guarantees. With the descent
//! `g̃ = (g̃_A, g̃_B)` and its effective direction `D̃ = s(g̃_A B + A g̃_B)`, each coefficient
//! `c̃_i = u_iᵀ D̃ v_i` is `≥ 0` under ConflictOnly and `0` under Orthogonal, `UᵀD̃ = 0` under
//! ColumnSpace and `D̃ V = 0` under RowSpace, and `Σ σ_i c̃_i = ⟨U Σ Vᵀ, D̃⟩ ≥ 0` under every
//! mode: to first order the step does not raise the rank-`k` safety loss. The full-weight step
//! guarantees exactly these of its own `G̃`.
//!
//! Both targets: the `Gradient` target projects the factors' gradients of a full-weight
//! gradient `G`, `g = s(G Bᵀ, Aᵀ G)`; the `Update` target projects whatever descent the inner
//! optimizer took, which an adaptive optimizer rescales entry by entry: modelled here as `g`
//! with each entry scaled by a random positive factor. `B = 0` (burn's initialization) is drawn
//! in a fifth of the cases.
//!
//! Tolerance: every number is a sum of at most `n = d_in + d_out + r + k` rounded products of
//! factors bounded by the norms involved, through at most four such steps, so `4·n·ε_f32` times
//! `‖σ‖·‖g‖·(1 + ‖A‖ + ‖B‖)²`.

use faer::Mat;
use proptest::prelude::*;
use spf_core::projection::{LoraFactors, LoraGrads, project_lora};
use spf_core::{ProjectionMode, SpfError};
use spf_theory::{Gaussian, HostBasis, download, round_f32, test_device, upload};

#[derive(Debug, Clone, Copy)]
enum Target {
    Gradient,
    Update,
}

#[derive(Debug, Clone)]
struct Case {
    d_in: usize,
    d_out: usize,
    r: usize,
    k: usize,
    seed: u64,
    zero_b: bool,
    target: Target,
}

/// A case's factors, basis and descent on the host, rounded to `f32`.
struct Problem {
    basis: HostBasis,
    a: Mat<f64>,
    b: Mat<f64>,
    s: f64,
    g_a: Mat<f64>,
    g_b: Mat<f64>,
}

impl Case {
    fn build(&self) -> Problem {
        let mut rng = Gaussian::new(self.seed);
        let basis = HostBasis::random(&mut rng, self.d_in, self.d_out, self.k).rounded();
        let a = round_f32(&rng.matrix(self.d_in, self.r));
        let b = if self.zero_b {
            Mat::zeros(self.r, self.d_out)
        } else {
            round_f32(&rng.matrix(self.r, self.d_out))
        };
        let s = 0.1 + 4.0 * rng.sample().abs();
        // A full-weight gradient that conflicts with some directions and agrees with others.
        let mut g = rng.matrix(self.d_in, self.d_out);
        for i in 0..self.k {
            g += (3.0 * rng.sample()) * basis.direction(i);
        }
        let mut g_a = s * (&g * b.transpose());
        let mut g_b = s * (a.transpose() * &g);
        if let Target::Update = self.target {
            let mut rescale = |m: &mut Mat<f64>| {
                let scales = Mat::from_fn(m.nrows(), m.ncols(), |_, _| rng.sample().exp());
                *m = Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] * scales[(i, j)]);
            };
            rescale(&mut g_a);
            rescale(&mut g_b);
        }
        Problem {
            basis,
            a,
            b,
            s,
            g_a: round_f32(&g_a),
            g_b: round_f32(&g_b),
        }
    }
}

impl Problem {
    fn project(&self, mode: ProjectionMode) -> Result<(Mat<f64>, Mat<f64>), SpfError> {
        let device = test_device();
        let factors = LoraFactors {
            a: upload(&self.a, &device),
            b: upload(&self.b, &device),
        };
        let grads = LoraGrads {
            a: upload(&self.g_a, &device),
            b: upload(&self.g_b, &device),
        };
        let out = project_lora(grads, &factors, &self.basis.to_device(&device), mode)?;
        Ok((download(out.grads.a), download(out.grads.b)))
    }

    /// `u_iᵀ s(g_A B + A g_B) v_i` for each direction.
    fn effective(&self, g_a: &Mat<f64>, g_b: &Mat<f64>) -> Vec<f64> {
        let d = self.s * (g_a * &self.b + &self.a * g_b);
        self.basis.coefficients(&d)
    }

    fn tol(&self, case: &Case) -> f64 {
        let n = (case.d_in + case.d_out + case.r + case.k) as f64;
        let sigma = self.basis.sigma.iter().map(|s| s * s).sum::<f64>().sqrt();
        let g = (self.g_a.squared_norm_l2() + self.g_b.squared_norm_l2()).sqrt();
        let factors = (1.0 + self.a.norm_l2() + self.b.norm_l2()).powi(2);
        4.0 * n * f64::from(f32::EPSILON) * self.s * sigma.max(1.0) * g * factors
    }
}

fn cases() -> impl Strategy<Value = Case> {
    (1usize..=24, 1usize..=24, 1usize..=6)
        .prop_flat_map(|(d_in, d_out, r)| {
            let full = d_in.min(d_out);
            let k = prop_oneof![1 => Just(full), 3 => 0..=full];
            let zero_b = prop_oneof![4 => Just(false), 1 => Just(true)];
            let target = prop_oneof![Just(Target::Gradient), Just(Target::Update)];
            (
                Just(d_in),
                Just(d_out),
                Just(r),
                k,
                any::<u64>(),
                zero_b,
                target,
            )
        })
        .prop_map(|(d_in, d_out, r, k, seed, zero_b, target)| Case {
            d_in,
            d_out,
            r,
            k,
            seed,
            zero_b,
            target,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn an_spf_lora_step_keeps_the_full_weight_first_order_guarantee(case in cases()) {
        let problem = case.build();
        let tol = problem.tol(&case);
        let sigma = &problem.basis.sigma;
        let before = problem.effective(&problem.g_a, &problem.g_b);
        for mode in ProjectionMode::ALL {
            let (g_a, g_b) = problem.project(mode).unwrap();
            let after = problem.effective(&g_a, &g_b);
            let d = problem.s * (&g_a * &problem.b + &problem.a * &g_b);
            let left = match mode {
                ProjectionMode::ColumnSpace => (problem.basis.u.transpose() * &d).norm_max(),
                ProjectionMode::RowSpace => (&d * &problem.basis.v).norm_max(),
                _ => 0.0,
            };
            prop_assert!(left <= tol, "{mode:?}: the subspace keeps {left:e}");
            let safety: f64 = after.iter().zip(sigma).map(|(c, s)| c * s).sum();
            prop_assert!(safety >= -tol, "{mode:?}: ⟨UΣVᵀ, D̃⟩ = {safety:e} < 0");
            for (i, c) in after.iter().enumerate() {
                match mode {
                    ProjectionMode::ConflictOnly => {
                        prop_assert!(*c >= -tol, "{mode:?}: c̃_{i} = {c:e}");
                        // Directions that did not conflict are kept.
                        if before[i] >= 0.0 {
                            prop_assert!((c - before[i]).abs() <= tol, "{mode:?}: c_{i} moved");
                        }
                    }
                    ProjectionMode::Orthogonal => {
                        prop_assert!(c.abs() <= tol, "{mode:?}: c̃_{i} = {c:e}");
                    }
                    _ => {}
                }
            }
            // Still a descent direction for the loss it came from, never longer.
            let kept = g_a.squared_norm_l2() + g_b.squared_norm_l2();
            let energy = problem.g_a.squared_norm_l2() + problem.g_b.squared_norm_l2();
            prop_assert!(kept <= energy * (1.0 + 1e-5) + 1e-30, "{mode:?}: {kept} > {energy}");
        }
    }
}
