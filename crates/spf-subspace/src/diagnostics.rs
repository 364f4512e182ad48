//! The quantities the paper's insights are stated in: how low-rank a safety gradient is
//! (captured energy), and how well one estimate of its subspace agrees with another (overlap and
//! principal angles).

use burn::tensor::Tensor;

use crate::rsvd::host_matrix;
use crate::{LowRankBasis, SubspaceError};

/// `CER(k) = Σ_{i≤k} σ_i² / ‖A‖_F²` for the given leading singular values of `A` and
/// `total_energy = ‖A‖_F²`, clamped to `[0, 1]`. A zero matrix has nothing left to capture:
/// its `CER` is 1.
///
/// ```
/// assert_eq!(spf_subspace::captured_energy(&[3.0, 1.0], 10.0), 1.0);
/// assert_eq!(spf_subspace::captured_energy(&[3.0], 10.0), 0.9);
/// ```
pub fn captured_energy(singular_values: &[f64], total_energy: f64) -> f64 {
    if total_energy <= 0.0 {
        return 1.0;
    }
    let captured: f64 = singular_values.iter().map(|s| s * s).sum();
    (captured / total_energy).clamp(0.0, 1.0)
}

/// The smallest `k` with `CER(k) ≥ threshold`, capped at `max_rank` and at the number of
/// singular values given.
pub fn rank_for_energy(
    singular_values: &[f64],
    total_energy: f64,
    threshold: f64,
    max_rank: usize,
) -> usize {
    let cap = max_rank.min(singular_values.len());
    (0..=cap)
        .find(|&k| captured_energy(&singular_values[..k], total_energy) >= threshold)
        .unwrap_or(cap)
}

/// `‖U₁ᵀ U₂‖_F² / min(k₁, k₂)` for orthonormal `U₁: [d, k₁]`, `U₂: [d, k₂]`: 1 when one subspace
/// contains the other, 0 when they are orthogonal, and 0 when either is empty (no direction, or
/// `d = 0`: no dimension to hold one).
///
/// # Errors
///
/// [`SubspaceError::RowMismatch`] when the factors have different numbers of rows.
pub fn subspace_overlap(u1: &Tensor<2>, u2: &Tensor<2>) -> Result<f64, SubspaceError> {
    let ([left, k1], [right, k2]) = (u1.dims(), u2.dims());
    if left != right {
        return Err(SubspaceError::RowMismatch { left, right });
    }
    let k = k1.min(k2);
    // burn-ndarray's matmul divides by an inner dimension of 0.
    if k == 0 || left == 0 {
        return Ok(0.0);
    }
    let cross = u1.clone().transpose().matmul(u2.clone());
    let energy: f64 = cross.square().sum().into_data().iter::<f64>().sum();
    Ok(energy / k as f64)
}

/// The overlap of two bases' direction sets `{u_i v_iᵀ}` under the Frobenius inner product:
/// `Σ_ij ⟨B¹_i, B²_j⟩² / min(k₁, k₂)` with `⟨u v₁ᵀ, u′ v′ᵀ⟩ = (uᵀu′)(vᵀv′)`, so
/// `‖(U₁ᵀU₂) ⊙ (V₁ᵀV₂)‖_F² / min(k₁, k₂)`. 1 when one set spans the other, 0 when they are
/// orthogonal or either is empty. This is how far a refreshed basis moved.
///
/// # Panics
///
/// If the bases belong to parameters of different shapes.
pub fn direction_overlap(a: &LowRankBasis, b: &LowRankBasis) -> f64 {
    let k = a.rank().min(b.rank());
    if k == 0 {
        return 0.0;
    }
    let left = a.u().clone().transpose().matmul(b.u().clone());
    let right = a.v().clone().transpose().matmul(b.v().clone());
    let energy: f64 = (left * right)
        .square()
        .sum()
        .into_data()
        .iter::<f64>()
        .sum();
    energy / k as f64
}

/// The principal angles `θ_1 ≤ … ≤ θ_min(k₁,k₂)` (radians) between the spans of orthonormal
/// `U₁` and `U₂`: `cos θ_i` are the singular values of `U₁ᵀ U₂` (Björck & Golub, 1973).
///
/// # Errors
///
/// [`SubspaceError::RowMismatch`] when the factors have different numbers of rows,
/// [`SubspaceError::NonFinite`] when `U₁ᵀ U₂` holds NaN or ±Inf, and
/// [`SubspaceError::SvdFailed`] if its SVD does not converge.
pub fn principal_angles(u1: &Tensor<2>, u2: &Tensor<2>) -> Result<Vec<f64>, SubspaceError> {
    let ([left, k1], [right, k2]) = (u1.dims(), u2.dims());
    if left != right {
        return Err(SubspaceError::RowMismatch { left, right });
    }
    // No direction, or no dimension to hold one (burn-ndarray's matmul divides by an inner
    // dimension of 0: found by spf-theory's public-input property test).
    if k1.min(k2) == 0 || left == 0 {
        return Ok(Vec::new());
    }
    let cross = host_matrix(u1.clone().transpose().matmul(u2.clone()));
    let finite = (0..cross.nrows()).all(|i| (0..cross.ncols()).all(|j| cross[(i, j)].is_finite()));
    if !finite {
        return Err(SubspaceError::NonFinite { factor: "input" });
    }
    let singular = cross
        .singular_values()
        .map_err(|err| SubspaceError::SvdFailed {
            message: format!("{err:?}"),
        })?;
    Ok(singular.iter().map(|c| c.clamp(-1.0, 1.0).acos()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn columns(rows: &[&[f32]]) -> Tensor<2> {
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(
            TensorData::new(flat, [rows.len(), rows[0].len()]),
            &Default::default(),
        )
    }

    #[test]
    fn rank_for_energy_is_the_smallest_sufficient_rank() {
        let sigma = [4.0, 2.0, 1.0, 1.0]; // energies 16, 4, 1, 1 of 22
        assert_eq!(rank_for_energy(&sigma, 22.0, 0.7, 8), 1);
        assert_eq!(rank_for_energy(&sigma, 22.0, 0.9, 8), 2);
        assert_eq!(rank_for_energy(&sigma, 22.0, 0.99, 8), 4);
        assert_eq!(rank_for_energy(&sigma, 22.0, 0.99, 3), 3, "capped");
        assert_eq!(
            rank_for_energy(&sigma, 0.0, 0.85, 8),
            0,
            "a zero matrix needs no direction"
        );
    }

    #[test]
    fn overlap_and_angles_of_known_subspaces() {
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let e1 = columns(&[&[1.0], &[0.0], &[0.0]]);
        let e12 = columns(&[&[1.0, 0.0], &[0.0, 1.0], &[0.0, 0.0]]);
        let diagonal = columns(&[&[h], &[0.0], &[h]]);
        let e3 = columns(&[&[0.0], &[0.0], &[1.0]]);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;

        assert!(close(subspace_overlap(&e12, &e12).unwrap(), 1.0));
        assert!(
            close(subspace_overlap(&e1, &e12).unwrap(), 1.0),
            "contained"
        );
        assert!(
            close(subspace_overlap(&e1, &e3).unwrap(), 0.0),
            "orthogonal"
        );
        assert!(close(subspace_overlap(&e1, &diagonal).unwrap(), 0.5));

        let angles = principal_angles(&e1, &diagonal).unwrap();
        assert_eq!(angles.len(), 1);
        assert!(close(angles[0], std::f64::consts::FRAC_PI_4), "{angles:?}");
        let angles =
            principal_angles(&e12, &columns(&[&[0.0, h], &[1.0, 0.0], &[0.0, h]])).unwrap();
        assert!(
            close(angles[0], 0.0) && close(angles[1], std::f64::consts::FRAC_PI_4),
            "{angles:?}"
        );
        assert!(
            principal_angles(&e1, &columns(&[&[], &[], &[]]))
                .unwrap()
                .is_empty()
        );
        let no_rows = Tensor::<2>::zeros([0, 2], &Default::default());
        assert!(principal_angles(&no_rows, &no_rows).unwrap().is_empty());
        // Factors of two different spaces are an error, not a panic (it used to be a panic).
        assert_eq!(
            principal_angles(&e1, &columns(&[&[1.0], &[0.0]])),
            Err(SubspaceError::RowMismatch { left: 3, right: 2 })
        );
        let nan = columns(&[&[f32::NAN], &[0.0], &[0.0]]);
        assert_eq!(
            principal_angles(&e1, &nan),
            Err(SubspaceError::NonFinite { factor: "input" })
        );
    }

    #[test]
    fn direction_overlap_needs_both_factors_to_agree() {
        let sigma = || Tensor::<1>::from_floats([1.0], &Default::default());
        let e = |i: usize| {
            let mut column = [[0.0f32]; 2];
            column[i] = [1.0];
            Tensor::<2>::from_floats(column, &Default::default())
        };
        let basis = |u, v| LowRankBasis::new(e(u), sigma(), e(v)).unwrap();
        assert!((direction_overlap(&basis(0, 0), &basis(0, 0)) - 1.0).abs() < 1e-6);
        assert_eq!(
            direction_overlap(&basis(0, 0), &basis(0, 1)),
            0.0,
            "same u, other v"
        );
        assert_eq!(
            direction_overlap(&basis(0, 0), &basis(1, 0)),
            0.0,
            "other u, same v"
        );
    }
}
