//! The sign rule, checked without the sign rule: a projected step never raises the safety loss to
//! first order, measured by evaluating the loss itself, not by comparing with a reference
//! projection that could share a flipped sign with the code under test.
//!
//! The safety loss is the quadratic `L_s(W) = ½‖W − W*‖_F²`, whose gradient at `W` is
//! `G_s = W − W* = U Σ Vᵀ`, a rank-`k` matrix built from a random basis, which is therefore exact.
//! For a step `W' = W − η P(G)`, `L_s(W') − L_s(W) = −η⟨G_s, P(G)⟩ + ½η²‖P(G)‖²`: every mode
//! promises `⟨G_s, P(G)⟩ ≥ 0` (`ConflictOnly` keeps only `c_i ≥ 0` along the safety
//! directions, the others remove them), so the measured change is at most the second-order term.
//! Had `ConflictOnly` removed the *agreeing* components instead (`r = max(c, 0)`), the change
//! would be `η Σ σ_i |min(c_i, 0)|` above it, which these cases make far larger than rounding.
//! The check runs through the wrapper too (one SGD step), on the `f32` backend.

use faer::Mat;
use spf_core::ProjectionMode;
use spf_theory::{Gaussian, HostBasis, Path, inner, projected};

/// `L_s(W) = ½‖W − W*‖²` at `W = W* + G_s`, after a step `−η·step`: `½‖G_s − η·step‖²`.
fn safety_loss_after(g_s: &Mat<f64>, step: &Mat<f64>, eta: f64) -> f64 {
    let moved = g_s - eta * step;
    0.5 * inner(&moved, &moved)
}

#[test]
fn a_projected_step_never_raises_the_safety_loss_to_first_order() {
    let eta = 1e-2;
    let mut rng = Gaussian::new(2024);
    let mut conflicted = 0;
    for case in 0..40 {
        let (d_in, d_out, k) = (3 + rng.below(6), 3 + rng.below(6), 1 + rng.below(3));
        let basis = HostBasis::random(&mut rng, d_in, d_out, k).rounded();
        let g_s = basis.d();
        let g = rng.matrix(d_in, d_out);
        let before = safety_loss_after(&g_s, &g, 0.0);
        // The unprojected step: the first-order change is −η⟨G_s, G⟩.
        let raw = safety_loss_after(&g_s, &g, eta) - before;
        let raw_first_order = -eta * inner(&g_s, &g);
        assert!((raw - raw_first_order).abs() <= eta * eta * inner(&g, &g));
        let c = basis.coefficients(&g);
        // The flipped rule, removing the agreeing components, must break the bound whenever a
        // direction conflicts clearly: so the check below can tell the two rules apart.
        let mut flipped = g.clone();
        for (i, &ci) in c.iter().enumerate() {
            flipped -= ci.max(0.0) * basis.direction(i);
        }
        if c.iter().any(|&ci| ci < -0.1) {
            conflicted += 1;
            let change = safety_loss_after(&g_s, &flipped, eta) - before;
            assert!(
                change > 0.5 * eta * eta * inner(&flipped, &flipped),
                "case {case}: the flipped rule went unnoticed"
            );
        }
        for mode in ProjectionMode::ALL {
            for path in [Path::Direct, Path::Wrapper] {
                let p = projected(&g, &basis, mode, path);
                let change = safety_loss_after(&g_s, &p, eta) - before;
                let second_order = 0.5 * eta * eta * inner(&p, &p);
                // f32 rounding of the projection, relative to the sizes involved.
                let rounding = 1e-5 * eta * (inner(&g_s, &g_s) * inner(&g, &g)).sqrt();
                assert!(
                    change <= second_order + rounding,
                    "case {case}, {mode:?} via {path:?}: the safety loss rose by {change:e} \
                     (second-order bound {second_order:e})"
                );
            }
        }
    }
    assert!(
        conflicted >= 10,
        "the cases must conflict for the check to mean anything: {conflicted} of 40 did"
    );
}
