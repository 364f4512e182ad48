//! The projection invariants of the SPF method note, property-tested on random shapes
//! `1..=48 × 1..=48`, ranks `0..=min(d_in, d_out)`, every mode, and both paths (the bare
//! `project` and one step of the optimizer wrapper), on the `f32` backend.
//!
//! Adversarial inputs are part of the strategy: all-zero gradients, gradients scaled by `1e-30`
//! and `1e30`, full-rank bases, and gradients lying entirely inside the subspace.
//!
//! # Tolerances
//!
//! Every computed quantity (a coefficient, an entry of the rank-k update, a check's inner product)
//! is a sum of at most `n = d_in + d_out + k` rounded products, whose error is bounded by
//! `γ_n ≈ n·ε_f32` times the norms involved (Higham §3.1). A check composes at most four such
//! steps (the projection, a second projection, and the check itself on rounded inputs), hence
//! `tol = 4·γ_n`, relative to `‖G‖` (or `‖G‖²` for energies).

use faer::Mat;
use proptest::prelude::*;
use spf_core::ProjectionMode;
use spf_theory::{Gaussian, HostBasis, Path, inner, projected, round_f32};

/// The kinds of gradient a case draws.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Gaussian.
    Random,
    /// `Σ a_i B_i`: entirely inside the subspace.
    Inside,
    /// All zero.
    Zero,
}

#[derive(Debug, Clone)]
struct Case {
    d_in: usize,
    d_out: usize,
    k: usize,
    seed: u64,
    scale: f64,
    kind: Kind,
}

impl Case {
    /// The relative tolerance `4·(d_in + d_out + k)·ε_f32`; see the module docs.
    fn tol(&self) -> f64 {
        4.0 * (self.d_in + self.d_out + self.k) as f64 * f64::from(f32::EPSILON)
    }

    /// The basis and the gradient, rounded to `f32` so that host and device agree on the input.
    fn build(&self) -> (HostBasis, Mat<f64>) {
        let mut rng = Gaussian::new(self.seed);
        let basis = HostBasis::random(&mut rng, self.d_in, self.d_out, self.k).rounded();
        let g = match self.kind {
            Kind::Random => rng.matrix(self.d_in, self.d_out),
            Kind::Inside => (0..self.k).fold(Mat::zeros(self.d_in, self.d_out), |acc, i| {
                acc + rng.sample() * basis.direction(i)
            }),
            Kind::Zero => Mat::zeros(self.d_in, self.d_out),
        };
        let g = Mat::from_fn(self.d_in, self.d_out, |i, j| g[(i, j)] * self.scale);
        (basis, round_f32(&g))
    }
}

fn cases() -> impl Strategy<Value = Case> {
    (1usize..=48, 1usize..=48)
        .prop_flat_map(|(d_in, d_out)| {
            let full = d_in.min(d_out);
            // A quarter of the cases use a full-rank basis.
            let k = prop_oneof![1 => Just(full), 3 => 0..=full];
            let scale = prop_oneof![4 => Just(1.0), 1 => Just(1e-30), 1 => Just(1e30)];
            let kind = prop_oneof![4 => Just(Kind::Random), 1 => Just(Kind::Inside), 1 => Just(Kind::Zero)];
            (Just(d_in), Just(d_out), k, any::<u64>(), scale, kind)
        })
        .prop_map(|(d_in, d_out, k, seed, scale, kind)| Case { d_in, d_out, k, seed, scale, kind })
}

fn norm(m: &Mat<f64>) -> f64 {
    m.norm_l2()
}

/// `G` with every coefficient made clearly positive: `Σ a_i B_i` with `a_i ∈ [0.5, 1.5]·s`, plus
/// the part of `G` outside `span{B_i}`. Nothing conflicts, for any mode but the subspace ones.
fn without_conflict(basis: &HostBasis, g: &Mat<f64>, case: &Case) -> Mat<f64> {
    let mut rng = Gaussian::new(case.seed ^ 1);
    let c = basis.coefficients(g);
    let mut out = g.clone();
    for (i, ci) in c.iter().enumerate() {
        let target = (0.5 + rng.sample().abs().min(1.0)) * case.scale;
        out += (target - ci) * basis.direction(i);
    }
    round_f32(&out)
}

/// The invariants of `ConflictOnly` and `Orthogonal`.
fn check_coefficient_mode(
    case: &Case,
    mode: ProjectionMode,
    path: Path,
) -> Result<(), TestCaseError> {
    let (basis, g) = case.build();
    let tol = case.tol();
    let gn = norm(&g);
    let p = projected(&g, &basis, mode, path);

    // G̃ − G lies in span{B_i}: nothing is left after removing its components along each B_i.
    let change = &p - &g;
    let mut outside = change.clone();
    for (i, c) in basis.coefficients(&change).into_iter().enumerate() {
        outside -= c * basis.direction(i);
    }
    prop_assert!(
        norm(&outside) <= tol * gn,
        "change outside the span: {:e}",
        norm(&outside)
    );

    // ⟨G̃, G⟩ = ‖G̃‖² ≤ ‖G‖².
    let (cross, energy) = (inner(&p, &g), inner(&p, &p));
    prop_assert!(
        (cross - energy).abs() <= tol * gn * gn,
        "⟨G̃,G⟩ {cross:e} vs ‖G̃‖² {energy:e}"
    );
    prop_assert!(
        energy <= (1.0 + tol) * gn * gn,
        "norm grew: {energy:e} > {:e}",
        gn * gn
    );

    // No coefficient conflicts afterwards (Orthogonal: every one is zero).
    for c in basis.coefficients(&p) {
        match mode {
            ProjectionMode::Orthogonal => prop_assert!(c.abs() <= tol * gn, "c̃ = {c:e}"),
            _ => prop_assert!(c >= -tol * gn, "c̃ = {c:e} conflicts"),
        }
    }
    // ⟨UΣVᵀ, G̃⟩ ≥ 0.
    let d = basis.d();
    prop_assert!(
        inner(&d, &p) >= -tol * gn * norm(&d),
        "⟨D, G̃⟩ = {:e}",
        inner(&d, &p)
    );

    // Idempotent.
    let twice = projected(&round_f32(&p), &basis, mode, path);
    prop_assert!(
        norm(&(&twice - &p)) <= tol * gn,
        "P(P(G)) ≠ P(G): {:e}",
        norm(&(&twice - &p))
    );

    // Positively homogeneous.
    let alpha = 1.0 + (case.seed % 1000) as f64;
    let scaled = round_f32(&Mat::from_fn(g.nrows(), g.ncols(), |i, j| {
        g[(i, j)] * alpha
    }));
    let p_scaled = projected(&scaled, &basis, mode, path);
    let expected = Mat::from_fn(p.nrows(), p.ncols(), |i, j| p[(i, j)] * alpha);
    prop_assert!(
        norm(&(&p_scaled - &expected)) <= tol * alpha * gn,
        "P(αG) ≠ αP(G): {:e}",
        norm(&(&p_scaled - &expected))
    );
    check_no_conflict_is_identity(case, &basis, &g, mode, path)
}

/// No conflict means no change, bit for bit.
fn check_no_conflict_is_identity(
    case: &Case,
    basis: &HostBasis,
    g: &Mat<f64>,
    mode: ProjectionMode,
    path: Path,
) -> Result<(), TestCaseError> {
    let calm = without_conflict(basis, g, case);
    let p = projected(&calm, basis, mode, path);
    if mode == ProjectionMode::Orthogonal && basis.rank() > 0 && case.scale > 0.0 {
        return Ok(()); // Orthogonal removes agreeing components too.
    }
    prop_assert!(p == calm, "no conflict, yet G̃ ≠ G");
    Ok(())
}

/// `ColumnSpace` (`UᵀG̃ = 0`) and `RowSpace` (`G̃V = 0`): annihilation, idempotence, no growth.
fn check_subspace_mode(case: &Case, mode: ProjectionMode, path: Path) -> Result<(), TestCaseError> {
    let (basis, g) = case.build();
    let tol = case.tol();
    let gn = norm(&g);
    let p = projected(&g, &basis, mode, path);
    let annihilated = match mode {
        ProjectionMode::ColumnSpace => norm(&(basis.u.transpose() * &p)),
        _ => norm(&(&p * &basis.v)),
    };
    prop_assert!(annihilated <= tol * gn, "{mode:?} leaves {annihilated:e}");
    let twice = projected(&round_f32(&p), &basis, mode, path);
    prop_assert!(norm(&(&twice - &p)) <= tol * gn, "not idempotent");
    prop_assert!(norm(&p) <= (1.0 + tol) * gn, "norm grew");
    Ok(())
}

/// `Pcgrad`: `⟨G̃, D⟩ ≥ 0`, and no conflict means no change.
fn check_pcgrad(case: &Case, path: Path) -> Result<(), TestCaseError> {
    let (basis, g) = case.build();
    let tol = case.tol();
    let gn = norm(&g);
    let p = projected(&g, &basis, ProjectionMode::Pcgrad, path);
    let d = basis.d();
    prop_assert!(
        inner(&p, &d) >= -tol * gn * norm(&d),
        "⟨G̃, D⟩ = {:e}",
        inner(&p, &d)
    );
    check_no_conflict_is_identity(case, &basis, &g, ProjectionMode::Pcgrad, path)
}

fn check(case: &Case, mode: ProjectionMode) -> Result<(), TestCaseError> {
    for path in [Path::Direct, Path::Wrapper] {
        match mode {
            ProjectionMode::ConflictOnly | ProjectionMode::Orthogonal => {
                check_coefficient_mode(case, mode, path)?
            }
            ProjectionMode::ColumnSpace | ProjectionMode::RowSpace => {
                check_subspace_mode(case, mode, path)?
            }
            ProjectionMode::Pcgrad => check_pcgrad(case, path)?,
        }
    }
    Ok(())
}

/// Cases per mode in the default run (both paths each); the ignored sweep runs 2048.
const CASES: u32 = 256;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn conflict_only(case in cases()) { check(&case, ProjectionMode::ConflictOnly)?; }

    #[test]
    fn orthogonal(case in cases()) { check(&case, ProjectionMode::Orthogonal)?; }

    #[test]
    fn column_space(case in cases()) { check(&case, ProjectionMode::ColumnSpace)?; }

    #[test]
    fn row_space(case in cases()) { check(&case, ProjectionMode::RowSpace)?; }

    #[test]
    fn pcgrad(case in cases()) { check(&case, ProjectionMode::Pcgrad)?; }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    #[ignore = "long sweep: cargo test -p spf-theory --release -- --ignored"]
    fn every_mode_long_sweep(case in cases()) {
        for mode in [
            ProjectionMode::ConflictOnly,
            ProjectionMode::Orthogonal,
            ProjectionMode::ColumnSpace,
            ProjectionMode::RowSpace,
            ProjectionMode::Pcgrad,
        ] {
            check(&case, mode)?;
        }
    }
}
