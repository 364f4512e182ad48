//! [`ColumnSpace`](crate::ProjectionMode::ColumnSpace) and
//! [`RowSpace`](crate::ProjectionMode::RowSpace) for a LoRA adapter: the least change to the
//! factors' gradients after which the effective first-order direction has no component in the
//! basis' column space (row space).
//!
//! # The problem
//!
//! With `W = W₀ + s·A B`, `A: [d_in, r]`, `B: [r, n]` (`n = d_out`), the adapter descent
//! `g = (g_A, g_B)` moves `W` along `D = s(g_A B + A g_B)` to first order. ColumnSpace on a full
//! weight leaves `UᵀG̃ = 0`; here the same constraint on `D̃` is linear in `g̃`:
//!
//! ```text
//! L(g) = Uᵀ g_A B + Qᵀ g_B = 0   ([k, n]),   Q = Aᵀ U   ([r, k])
//! ```
//!
//! The least change is the orthogonal projection `g̃ = g − L*(M)` onto `ker L`, with the adjoint
//! `L*(M) = (U M Bᵀ, Q M)` and `M` any solution of `L L*(M) = L(g) =: R`, that is of the Sylvester
//! equation
//!
//! ```text
//! QᵀQ M + M BᵀB = R
//! ```
//!
//! The constraints are not orthogonal to one another (`L L*` is not a multiple of the identity),
//! unlike the direction modes', so the projection needs this solve.
//!
//! # The solve
//!
//! Both Gram matrices are diagonalised by small SVDs: `B = Z diag(s) Wᵀ` (thin, `W: [n, m_B]`)
//! and `Q = Z_Q diag(σ) Yᵀ` (full, `Y: [k, k]`, `σ_i = 0` beyond `min(r, k)`). In the
//! coordinates `Yᵀ · [W, W⊥]` the operator is diagonal, with eigenvalue `σ_i² + s_j²` on the
//! `W` columns and `σ_i²` on `W⊥`. With `C = Yᵀ R W` and `H = Z_Qᵀ g_B (I − W Wᵀ)`:
//!
//! ```text
//! F_ij = C_ij / (σ_i² + s_j²)       (0 where both are 0: there C_ij = 0)
//! M Bᵀ = Y F diag(s) Zᵀ                                   ([k, r]: the change of g_A is U·M Bᵀ)
//! Q M  = Z_Q (diag(σ) F) Wᵀ + Z_Q H                       ([r, n]: the change of g_B)
//! ‖g‖² − ‖g̃‖² = ⟨R, M⟩ = Σ C_ij F_ij + ‖H‖²
//! ```
//!
//! `C = Yᵀ X Z diag(s) + diag(σ) Z_Qᵀ (g_B W)` with `X = Uᵀ g_A`, so only `Q`, `X`, `B` and `g_B`
//! come to the host (`2rk + 2rn` numbers a weight, read for every adapter in one transfer a
//! step). Every quotient enters multiplied by `σ_i` or `s_j`, and `σ_i s_j / (σ_i² + s_j²) ≤ ½`,
//! so no small singular value amplifies a rounding error: no tolerance is needed. `R` and `M` are
//! never formed.
//!
//! [`RowSpace`](crate::ProjectionMode::RowSpace) leaves `D̃ V = 0`: it is ColumnSpace for `Wᵀ = W₀ᵀ +
//! s·Bᵀ Aᵀ`, with the factors `(Bᵀ, Aᵀ)`, the basis `(V, U)` and the gradients `(g_Bᵀ, g_Aᵀ)`.

use faer::{Mat, MatRef};

/// The host half of the solve for one adapter, oriented as ColumnSpace (see the module docs).
pub(super) struct Solution {
    /// `M Bᵀ`, `[k, r]`: `g̃_A = g_A − U · M Bᵀ`.
    pub(super) a_change: Mat<f64>,
    /// `Q M`, `[r, n]`: `g̃_B = g_B − Q M`.
    pub(super) b_change: Mat<f64>,
    /// `‖g‖² − ‖g̃‖²`.
    pub(super) removed_energy: f64,
    /// `‖R_i‖²`, the energy of the effective direction along each `u_i`.
    pub(super) direction_energy: Vec<f64>,
}

/// The problem's host inputs: `Q = AᵀU` (`[r, k]`), `X = Uᵀ g_A` (`[k, r]`), `B` and `g_B`
/// (`[r, n]`).
pub(super) struct Inputs<'a> {
    pub(super) q: MatRef<'a, f64>,
    pub(super) x: MatRef<'a, f64>,
    pub(super) b: MatRef<'a, f64>,
    pub(super) g_b: MatRef<'a, f64>,
}

/// Solves the Sylvester equation of the module docs.
///
/// # Errors
///
/// The message of faer's SVD when it does not converge (on finite input it does).
pub(super) fn solve(inputs: &Inputs<'_>) -> Result<Solution, String> {
    let Inputs { q, x, b, g_b } = *inputs;
    let (r, k, n) = (q.nrows(), q.ncols(), b.ncols());
    if r == 0 || k == 0 || n == 0 {
        return Ok(Solution {
            a_change: Mat::zeros(k, r),
            b_change: Mat::zeros(r, n),
            removed_energy: 0.0,
            direction_energy: vec![0.0; k],
        });
    }
    let b_svd = b.thin_svd().map_err(|e| format!("{e:?}"))?;
    let q_svd = q.svd().map_err(|e| format!("{e:?}"))?;
    let (z, w) = (b_svd.U(), b_svd.V());
    let s = b_svd.S().column_vector();
    let (z_q, y) = (q_svd.U(), q_svd.V());
    let sigma_q = q_svd.S().column_vector();
    let sigma = |i: usize| if i < sigma_q.nrows() { sigma_q[i] } else { 0.0 };
    let m_b = s.nrows();

    // C = Yᵀ X Z diag(s) + diag(σ) Z_Qᵀ (g_B W), and F = C / (σ² + s²).
    let xz = y.transpose() * x * z;
    let g_w = g_b * w;
    let zq_g_w = z_q.transpose() * &g_w;
    let c = Mat::from_fn(k, m_b, |i, j| {
        let from_b = xz[(i, j)] * s[j];
        let from_q = if i < r {
            sigma(i) * zq_g_w[(i, j)]
        } else {
            0.0
        };
        from_b + from_q
    });
    let f = Mat::from_fn(k, m_b, |i, j| {
        let d = sigma(i) * sigma(i) + s[j] * s[j];
        if d > 0.0 { c[(i, j)] / d } else { 0.0 }
    });
    let a_change = y * Mat::from_fn(k, m_b, |i, j| f[(i, j)] * s[j]) * z.transpose();

    // H = Z_Qᵀ g_B (I − W Wᵀ), on the first min(r, k) rows of Z_Q (the others meet σ_i = 0).
    let m_q = sigma_q.nrows();
    let z_q = z_q.get(.., ..m_q);
    let h = z_q.transpose() * g_b - z_q.transpose() * &g_w * w.transpose();
    let sigma_f = Mat::from_fn(m_q, m_b, |i, j| sigma(i) * f[(i, j)]);
    let b_change = z_q * (sigma_f * w.transpose() + &h);

    let removed_energy = (0..k)
        .flat_map(|i| (0..m_b).map(move |j| (i, j)))
        .map(|(i, j)| c[(i, j)] * f[(i, j)])
        .sum::<f64>()
        + h.squared_norm_l2();
    // R = X B + Qᵀ g_B, by rows.
    let effective = x * b + q.transpose() * g_b;
    let direction_energy = (0..k)
        .map(|i| (0..n).map(|j| effective[(i, j)].powi(2)).sum())
        .collect();
    Ok(Solution {
        a_change,
        b_change,
        removed_energy,
        direction_energy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Gaussian, inner};

    /// `L(δA, δB) = Uᵀ(δA B + A δB)` for the problem `(u, a, b)`.
    fn constraint(
        u: &Mat<f64>,
        a: &Mat<f64>,
        b: &Mat<f64>,
        da: &Mat<f64>,
        db: &Mat<f64>,
    ) -> Mat<f64> {
        u.transpose() * (da * b + a * db)
    }

    /// The solution keeps `L(g̃) = 0` and is the least change: `g − g̃ = L*(M)` lies in the range
    /// of the adjoint, checked as orthogonality to a random element of `ker L`.
    #[test]
    fn the_solve_removes_the_constraint_and_changes_the_least() {
        for seed in 0..64 {
            let mut rng = Gaussian::new(seed);
            let (d_in, n, r) = (1 + rng.below(9), 1 + rng.below(9), 1 + rng.below(5));
            let k = rng.below(d_in + 1);
            let u = rng.orthonormal(d_in, k);
            let a = rng.matrix(d_in, r);
            let b = if seed % 7 == 0 {
                Mat::zeros(r, n)
            } else {
                rng.matrix(r, n)
            };
            let (g_a, g_b) = (rng.matrix(d_in, r), rng.matrix(r, n));
            let q = a.transpose() * &u;
            let x = u.transpose() * &g_a;
            let inputs = Inputs {
                q: q.as_ref(),
                x: x.as_ref(),
                b: b.as_ref(),
                g_b: g_b.as_ref(),
            };
            let solution = solve(&inputs).unwrap();
            let new_a = &g_a - &u * &solution.a_change;
            let new_b = &g_b - &solution.b_change;
            let scale = 1.0 + g_a.norm_l2() + g_b.norm_l2();
            let left = constraint(&u, &a, &b, &new_a, &new_b).norm_l2();
            assert!(
                left <= 1e-10 * scale * (1.0 + a.norm_l2() + b.norm_l2()),
                "seed {seed}: {left:e}"
            );
            // A random element of ker L: project a random pair with the same solve.
            let (h_a, h_b) = (rng.matrix(d_in, r), rng.matrix(r, n));
            let hx = u.transpose() * &h_a;
            let kernel = solve(&Inputs {
                q: q.as_ref(),
                x: hx.as_ref(),
                b: b.as_ref(),
                g_b: h_b.as_ref(),
            })
            .unwrap();
            let (k_a, k_b) = (&h_a - &u * &kernel.a_change, &h_b - &kernel.b_change);
            let (removed_a, removed_b) = (&g_a - &new_a, &g_b - &new_b);
            let inner = inner(&removed_a, &k_a) + inner(&removed_b, &k_b);
            assert!(
                inner.abs() <= 1e-10 * scale * scale,
                "seed {seed}: {inner:e}"
            );
            let energy = g_a.squared_norm_l2() + g_b.squared_norm_l2()
                - new_a.squared_norm_l2()
                - new_b.squared_norm_l2();
            assert!(
                (energy - solution.removed_energy).abs() <= 1e-10 * scale * scale,
                "seed {seed}: {energy} vs {}",
                solution.removed_energy
            );
        }
    }
}
