//! The projection: remove from a gradient `G` the components that conflict with a safety basis.
//!
//! Notation as in the SPF method note. `G` is a `d_in × d_out` utility gradient, the basis is
//! `U Σ Vᵀ` with orthonormal `U: [d_in, k]`, `V: [d_out, k]`, `B_i = u_i v_iᵀ` and
//! `D = U Σ Vᵀ`. The coefficients
//!
//! ```text
//! c_i = ⟨G, B_i⟩ = u_iᵀ G v_i        (all i at once: c = rowsum((UᵀG) ⊙ Vᵀ))
//! ```
//!
//! cost two device kernels and no loop over directions. A descent step `−ηG` changes the safety
//! loss by `−η⟨G_s, G⟩ ≈ −η Σ σ_i c_i` to first order, so direction `i` **conflicts** when
//! `c_i < 0`. The [`ProjectionMode`] decides what to remove:
//!
//! | mode | `G̃` |
//! |---|---|
//! | [`ConflictOnly`](ProjectionMode::ConflictOnly) | `G − Σ_{i: c_i<0} c_i B_i` |
//! | [`Orthogonal`](ProjectionMode::Orthogonal) | `G − Σ_i c_i B_i` |
//! | [`ColumnSpace`](ProjectionMode::ColumnSpace) | `G − U UᵀG` |
//! | [`RowSpace`](ProjectionMode::RowSpace) | `G − G V Vᵀ` |
//! | [`Pcgrad`](ProjectionMode::Pcgrad) | `G − (⟨G,D⟩/‖D‖²) D` if `⟨G,D⟩ < 0`, else `G` |
//!
//! The first, second and last are one rank-`k` update `G − U diag(r) Vᵀ` whose coefficients `r`
//! the mode's rule takes from `c` on the device (`r = min(c, 0)` for `ConflictOnly`), so a
//! projection needs no read back to the host: on a GPU, none of them waits for the device. The
//! update is one matrix product and a subtraction (`kernels.rs`, the one place a backend's own
//! in-place kernel can take over).
//!
//! # Statistics
//!
//! [`ProjectionStats`] is computed in closed form from `c` and `r` (or the per-direction
//! energies), in `f64` on the host, which avoids the cancellation of `‖G‖² − ‖G̃‖²` when most of
//! `G` is removed. That needs one read of `2k + 1` numbers per matrix; the optimizer reads those
//! of all matrices in one transfer per step, after their removals, or none (see
//! [`StatsPolicy`](crate::StatsPolicy)). [`project`] reads before it removes: when nothing is
//! removed it returns `G` untouched, so "no conflict" means `G̃ = G` bit for bit. The optimizer's
//! step (and [`project_without_stats`]) applies the removal whatever it is, so there a zero
//! update leaves `G̃ = G` as numbers: only a `−0` entry can change (to `+0`).

pub mod lora;
mod mode;
mod pending;
mod readout;
mod stats;

use burn::tensor::Tensor;
use spf_subspace::LowRankBasis;

use crate::error::SpfError;
use crate::host;

pub use lora::{LoraFactors, LoraGrads, LoraProjected, project_lora};
pub use mode::ProjectionMode;
pub(crate) use pending::Pending;
pub(crate) use readout::{Measured, Readout};
pub use stats::ProjectionStats;

/// A projected gradient and what the projection did.
#[derive(Debug, Clone)]
pub struct Projected {
    /// `G̃`.
    pub grad: Tensor<2>,
    /// Statistics of this projection.
    pub stats: ProjectionStats,
}

/// Projects the 2-D gradient `grad` against `basis` with `mode`, and measures what it did.
///
/// Costs `O(k·d_in·d_out)` on the device and one device-to-host read of `2k + 1` (or `2k + 2`)
/// numbers, for the statistics; the optimizer's step batches those reads over all matrices, or
/// skips them (see [`StatsPolicy`](crate::StatsPolicy)).
///
/// # Errors
///
/// [`SpfError::ShapeMismatch`] when `grad` is not `basis.d_in() × basis.d_out()`.
///
/// # Example
///
/// ```
/// use burn::tensor::Tensor;
/// use spf_core::{ProjectionMode, project};
/// use spf_subspace::LowRankBasis;
///
/// let device = burn::tensor::Device::default();
/// // One safety direction B_1 = e_1 e_1ᵀ.
/// let basis = LowRankBasis::new(
///     Tensor::<2>::from_floats([[1.0], [0.0]], &device),
///     Tensor::from_floats([1.0], &device),
///     Tensor::from_floats([[1.0], [0.0]], &device),
/// )?;
/// // c_1 = −2 < 0 conflicts and is removed; the rest of G is kept.
/// let g = Tensor::<2>::from_floats([[-2.0, 3.0], [4.0, 5.0]], &device);
/// let out = project(g, &basis, ProjectionMode::ConflictOnly)?;
/// out.grad.into_data().assert_eq(&Tensor::<2>::from_floats([[0.0, 3.0], [4.0, 5.0]], &device).into_data(), true);
/// assert_eq!((out.stats.conflicting, out.stats.removed), (1, 1));
/// assert!((out.stats.removed_energy_share() - 4.0 / 54.0).abs() < 1e-6);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn project(
    grad: Tensor<2>,
    basis: &LowRankBasis,
    mode: ProjectionMode,
) -> Result<Projected, SpfError> {
    let pending = Pending::new(grad, basis, mode)?;
    let stats = pending.stats(&host::read(vec![pending.readout()]));
    let grad = pending.finish(stats.removed == 0);
    Ok(Projected { grad, stats })
}

/// `G̃` alone: [`project`] without its statistics, so nothing is read back from the device (on a
/// GPU, nothing waits for it). When nothing is removed the (zero) update is still applied, so `G̃`
/// equals `G` as numbers, not necessarily bit for bit (a `−0` entry may become `+0`).
///
/// # Errors
///
/// [`SpfError::ShapeMismatch`] when `grad` is not `basis.d_in() × basis.d_out()`.
pub fn project_without_stats(
    grad: Tensor<2>,
    basis: &LowRankBasis,
    mode: ProjectionMode,
) -> Result<Tensor<2>, SpfError> {
    Ok(Pending::new(grad, basis, mode)?.finish(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        Gaussian, HostBasis, download, max_abs_diff, reference_projection, round_f32, test_device,
        upload,
    };
    use faer::Mat;

    /// Bound on the error of the `f32` projection against the `f64` reference: each coefficient
    /// and each entry of the rank-k update sums `O(d_in + d_out + k)` rounded products of factors
    /// of norm at most `‖G‖_F`.
    fn tolerance(g: &Mat<f64>, k: usize) -> f64 {
        let work = (g.nrows() + g.ncols() + k) as f64;
        4.0 * work * f64::from(f32::EPSILON) * g.norm_l2()
    }

    /// Random problems: non-square shapes, every rank from 0 to full, and gradients built to
    /// conflict with some directions and agree with others.
    fn cases(count: u64) -> impl Iterator<Item = (Mat<f64>, HostBasis)> {
        (0..count).map(|seed| {
            let mut rng = Gaussian::new(seed);
            let (d_in, d_out) = (1 + rng.below(24), 1 + rng.below(24));
            let full = d_in.min(d_out);
            let k = if seed % 4 == 0 {
                full
            } else {
                rng.below(full + 1)
            };
            let basis = rng.basis(d_in, d_out, k).rounded();
            let mut g = rng.matrix(d_in, d_out);
            for i in 0..k {
                let push = 2.0 * rng.sample();
                g += push * (basis.u.col(i) * basis.v.col(i).transpose());
            }
            (round_f32(&g), basis)
        })
    }

    fn project_host(g: &Mat<f64>, basis: &HostBasis, mode: ProjectionMode) -> Projected {
        let device = test_device();
        project(upload(g, &device), &basis.to_device(&device), mode).unwrap()
    }

    #[test]
    fn every_mode_matches_the_f64_reference() {
        for (case, (g, basis)) in cases(64).enumerate() {
            for mode in ProjectionMode::ALL {
                let expected = reference_projection(&g, &basis, mode);
                let got = download(project_host(&g, &basis, mode).grad);
                let err = max_abs_diff(&got, &expected);
                let tol = tolerance(&g, basis.sigma.len());
                assert!(
                    err <= tol,
                    "case {case} {mode:?} {}x{} k={}: error {err:e} > {tol:e}",
                    g.nrows(),
                    g.ncols(),
                    basis.sigma.len()
                );
            }
        }
    }

    #[test]
    fn statistics_match_the_f64_reference() {
        for (case, (g, basis)) in cases(64).enumerate() {
            let k = basis.sigma.len();
            let d = (0..k).fold(Mat::<f64>::zeros(g.nrows(), g.ncols()), |acc, i| {
                acc + basis.sigma[i] * (basis.u.col(i) * basis.v.col(i).transpose())
            });
            let cosine = |m: &Mat<f64>| {
                let denominator = m.norm_l2() * d.norm_l2();
                let dot: f64 = (0..m.nrows())
                    .flat_map(|i| (0..m.ncols()).map(move |j| (i, j)))
                    .map(|(i, j)| m[(i, j)] * d[(i, j)])
                    .sum();
                if denominator > 0.0 {
                    dot / denominator
                } else {
                    0.0
                }
            };
            let conflicting = (0..k)
                .filter(|&i| basis.u.col(i).transpose() * &g * basis.v.col(i) < 0.0)
                .count();
            for mode in ProjectionMode::ALL {
                let expected = reference_projection(&g, &basis, mode);
                let stats = project_host(&g, &basis, mode).stats;
                let share = 1.0 - expected.squared_norm_l2() / g.squared_norm_l2();
                // Shares and cosines are ratios of sums over the same O(d_in + d_out + k) terms.
                let tol = tolerance(&g, k) / g.norm_l2();
                let context = format!("case {case} {mode:?} k={k}: {stats:?}");
                assert_eq!(stats.directions, k, "{context}");
                assert_eq!(stats.conflicting, conflicting, "{context}");
                assert!(
                    (stats.removed_energy_share() - share).abs() < tol,
                    "{context} share {share}"
                );
                assert!((stats.cosine_before - cosine(&g)).abs() < tol, "{context}");
                // The direction of a residual that is all rounding error is noise.
                if share < 1.0 - 1e-6 {
                    assert!(
                        (stats.cosine_after - cosine(&expected)).abs() < tol,
                        "{context}"
                    );
                }
                let removes_all = match mode {
                    ProjectionMode::ConflictOnly => false,
                    ProjectionMode::Pcgrad => stats.cosine_before < 0.0,
                    _ => true,
                };
                if k > 0 && removes_all {
                    assert!(stats.cosine_after.abs() < tol, "{context}");
                }
                assert!(stats.cosine_after >= -tol, "{context}");
            }
        }
    }

    #[test]
    fn no_conflict_returns_the_gradient_bit_for_bit() {
        let mut rng = Gaussian::new(7);
        let basis = rng.basis(9, 5, 3).rounded();
        // G = D + (something orthogonal to every B_i): every c_i = σ_i > 0.
        let mut g = Mat::<f64>::zeros(9, 5);
        for i in 0..3 {
            g += basis.sigma[i] * (basis.u.col(i) * basis.v.col(i).transpose());
        }
        let u_perp = Mat::<f64>::identity(9, 9) - &basis.u * basis.u.transpose();
        g += u_perp * rng.matrix(9, 5);
        let device = test_device();
        let g = upload(&g, &device);
        for mode in [ProjectionMode::ConflictOnly, ProjectionMode::Pcgrad] {
            let out = project(g.clone(), &basis.to_device(&device), mode).unwrap();
            assert_eq!(out.stats.removed, 0);
            assert_eq!(out.grad.into_data(), g.clone().into_data(), "{mode:?}");
        }
    }

    #[test]
    fn empty_basis_changes_nothing() {
        let device = test_device();
        let g = upload(&Gaussian::new(3).matrix(4, 6), &device);
        for mode in ProjectionMode::ALL {
            let out = project(g.clone(), &LowRankBasis::empty(4, 6, &device), mode).unwrap();
            assert_eq!(out.grad.into_data(), g.clone().into_data());
            assert_eq!((out.stats.directions, out.stats.removed), (0, 0));
            assert!(out.stats.grad_energy > 0.0);
        }
    }

    #[test]
    fn extreme_magnitudes_keep_statistics_finite() {
        let mut rng = Gaussian::new(11);
        let basis = rng.basis(6, 4, 2).rounded();
        let g = round_f32(&rng.matrix(6, 4));
        let reference = project_host(&g, &basis, ProjectionMode::Orthogonal).stats;
        for scale in [1e-30, 1e30] {
            let scaled = Mat::from_fn(6, 4, |i, j| g[(i, j)] * scale);
            let stats = project_host(&scaled, &basis, ProjectionMode::Orthogonal).stats;
            let ratio = stats.grad_energy / (reference.grad_energy * scale * scale);
            assert!(
                (ratio - 1.0).abs() < 1e-4,
                "scale {scale:e}: energy ratio {ratio}"
            );
            assert!((stats.removed_energy_share() - reference.removed_energy_share()).abs() < 1e-4);
            assert!((stats.cosine_before - reference.cosine_before).abs() < 1e-4);
        }
    }

    #[test]
    fn zero_gradient_is_left_alone() {
        let mut rng = Gaussian::new(5);
        let basis = rng.basis(3, 3, 3).rounded();
        for mode in ProjectionMode::ALL {
            let stats = project_host(&Mat::zeros(3, 3), &basis, mode).stats;
            assert_eq!(
                stats,
                ProjectionStats {
                    directions: 3,
                    ..Default::default()
                },
                "{mode:?}"
            );
        }
        // No energy, no share: 0, not 0/0.
        assert_eq!(ProjectionStats::default().removed_energy_share(), 0.0);
    }

    #[test]
    fn f64_tensors_project_at_f64_precision() {
        // Host-side coefficients reach the device as f64, so f64 tensors are not held to f32.
        let device = (&test_device(), burn::tensor::DType::F64);
        let mut rng = Gaussian::new(21);
        let basis = rng.basis(12, 9, 4);
        let g = rng.matrix(12, 9);
        let expected = reference_projection(&g, &basis, ProjectionMode::ConflictOnly);
        let out = project(
            upload(&g, device),
            &basis.to_device(device),
            ProjectionMode::ConflictOnly,
        )
        .unwrap();
        let err = max_abs_diff(&download(out.grad), &expected);
        let tol = 4.0 * (12 + 9 + 4) as f64 * f64::EPSILON * g.norm_l2();
        assert!(err <= tol, "{err:e} > {tol:e}");
    }

    #[test]
    fn wrong_shape_is_an_error() {
        let device = test_device();
        let g = Tensor::<2>::zeros([3, 4], &device);
        let err = project(
            g,
            &LowRankBasis::empty(4, 3, &device),
            ProjectionMode::default(),
        );
        assert!(matches!(err, Err(SpfError::ShapeMismatch { .. })));
    }
}
