//! [`ProjectionMode`] and every decision that differs between modes, as its methods: which side
//! product gives the coefficients, the rule that takes the removal coefficients `r` from `c` on
//! the device, how a subspace mode removes, what a readout amounts to, and the `f64` reference
//! the tests hold the device projection to. Adding a mode is one new variant and one new arm in
//! each method of this file; nothing else matches on the mode.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use spf_subspace::LowRankBasis;

use super::stats::ProjectionStats;
use crate::kernels::{product, subtract_product};

/// What the projection removes from a gradient; see the [module docs](super) for the formulas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ProjectionMode {
    /// Remove only the directions with `c_i < 0` (the paper's rule).
    #[default]
    ConflictOnly,
    /// Remove every safety-direction component `c_i B_i`.
    Orthogonal,
    /// Remove the whole left subspace: `G − U UᵀG`.
    ColumnSpace,
    /// Remove the whole right subspace: `G − G V Vᵀ`.
    RowSpace,
    /// Gradient surgery against the single direction `D = U Σ Vᵀ`.
    Pcgrad,
}

impl ProjectionMode {
    /// Every mode, in declaration order.
    pub const ALL: [Self; 5] = [
        Self::ConflictOnly,
        Self::Orthogonal,
        Self::ColumnSpace,
        Self::RowSpace,
        Self::Pcgrad,
    ];

    /// Whether the mode removes a whole subspace (`G − U UᵀG` or `G − G V Vᵀ`) rather than a
    /// rank-`k` update `U diag(r) Vᵀ`; its statistics then need the energy along each direction.
    pub(crate) fn removes_subspace(self) -> bool {
        match self {
            Self::ColumnSpace | Self::RowSpace => true,
            Self::ConflictOnly | Self::Orthogonal | Self::Pcgrad => false,
        }
    }

    /// `c` and the side product it is read from, for a basis of rank `k > 0`: `UᵀG` (`[k,
    /// d_out]`), or `G V` (`[d_in, k]`) for `RowSpace`, whose removal needs it.
    pub(crate) fn coefficients(
        self,
        grad: &Tensor<2>,
        basis: &LowRankBasis,
    ) -> (Tensor<1>, Tensor<2>) {
        let k = basis.rank();
        match self {
            Self::RowSpace => {
                let gv = product(grad.clone(), basis.v().clone()); // [d_in, k]
                let c = (gv.clone() * basis.u().clone()).sum_dim(0).reshape([k]);
                (c, gv)
            }
            Self::ConflictOnly | Self::Orthogonal | Self::ColumnSpace | Self::Pcgrad => {
                let utg = product(basis.u().clone().transpose(), grad.clone()); // [k, d_out]
                let c = (utg.clone() * basis.v().clone().transpose())
                    .sum_dim(1)
                    .reshape([k]);
                (c, utg)
            }
        }
    }

    /// The axis of the side product that indexes the directions (its energies sum the other).
    pub(crate) fn direction_axis(self) -> usize {
        match self {
            Self::RowSpace => 1,
            Self::ConflictOnly | Self::Orthogonal | Self::ColumnSpace | Self::Pcgrad => 0,
        }
    }

    /// `r`, the coefficients of `U diag(r) Vᵀ` that the rank-`k` modes subtract, from `c`, on
    /// the device; `None` for the subspace modes and for `Pcgrad` against `D = 0`.
    pub(crate) fn removal(self, c: &Tensor<1>, basis: &LowRankBasis) -> Option<Tensor<1>> {
        match self {
            // r_i = c_i where direction i conflicts (c_i < 0), else 0.
            Self::ConflictOnly => Some(c.clone().clamp_max(0.0)),
            Self::Orthogonal => Some(c.clone()),
            Self::Pcgrad => {
                // r = α σ with α = min(⟨G, D⟩, 0) / ‖D‖², ⟨G, D⟩ = Σ σ_i c_i.
                let d_energy = basis.energy();
                if d_energy == 0.0 {
                    return None;
                }
                let sigma = basis.sigma();
                let alpha = (c.clone() * sigma.clone())
                    .sum()
                    .clamp_max(0.0)
                    .div_scalar(d_energy);
                Some(sigma.clone() * alpha)
            }
            Self::ColumnSpace | Self::RowSpace => None,
        }
    }

    /// `G̃` for a mode without a rank-`k` removal: the subspace modes remove their subspace
    /// through the side product; a rank-`k` mode with nothing to remove (`Pcgrad` with `D = 0`)
    /// leaves `G` as it is.
    pub(crate) fn remove_without_rule(
        self,
        grad: Tensor<2>,
        basis: &LowRankBasis,
        side: Tensor<2>,
    ) -> Tensor<2> {
        match self {
            Self::RowSpace => subtract_product(grad, side, basis.v().clone().transpose()),
            Self::ColumnSpace => subtract_product(grad, basis.u().clone(), side),
            Self::ConflictOnly | Self::Orthogonal | Self::Pcgrad => grad,
        }
    }

    /// What the device's removal `r` (rank-`k` modes) or the per-direction energies (subspace
    /// modes) amount to, from a readout on the host.
    pub(crate) fn plan(self, c: &[f64], r: &[f64], side_energy: &[f64]) -> Plan {
        let nonzero = || r.iter().filter(|x| **x != 0.0).count();
        let rank_k = |removed: usize| Plan {
            after: c.iter().zip(r).map(|(c, r)| c - r).collect(),
            removed,
            removed_energy: r.iter().map(|x| x * x).sum(),
        };
        match self {
            Self::ColumnSpace | Self::RowSpace => Plan {
                after: vec![0.0; c.len()],
                removed: side_energy.iter().filter(|e| **e > 0.0).count(),
                removed_energy: side_energy.iter().sum(),
            },
            Self::ConflictOnly | Self::Orthogonal => rank_k(nonzero()),
            // Pcgrad removes the one direction D, whatever its rank.
            Self::Pcgrad => rank_k(nonzero().min(1)),
        }
    }

    /// `G̃` from the formulas of the SPF method note, in `f64` on the host, for the basis
    /// `U diag(σ) Vᵀ`: the reference the tests hold the device projection to.
    #[cfg(feature = "testing")]
    pub(crate) fn reference(
        self,
        g: &faer::Mat<f64>,
        (u, sigma, v): (&faer::Mat<f64>, &[f64], &faer::Mat<f64>),
    ) -> faer::Mat<f64> {
        let k = sigma.len();
        let c: Vec<f64> = (0..k)
            .map(|i| u.col(i).transpose() * g * v.col(i))
            .collect();
        let rank_k = |r: &dyn Fn(usize) -> f64| {
            let mut out = g.clone();
            for i in 0..k {
                out -= r(i) * (u.col(i) * v.col(i).transpose());
            }
            out
        };
        match self {
            Self::ConflictOnly => rank_k(&|i| c[i].min(0.0)),
            Self::Orthogonal => rank_k(&|i| c[i]),
            Self::ColumnSpace => g - u * (u.transpose() * g),
            Self::RowSpace => g - (g * v) * v.transpose(),
            Self::Pcgrad => {
                let dot: f64 = (0..k).map(|i| sigma[i] * c[i]).sum();
                let d_energy: f64 = sigma.iter().map(|s| s * s).sum();
                if dot < 0.0 {
                    rank_k(&|i| dot / d_energy * sigma[i])
                } else {
                    g.clone()
                }
            }
        }
    }
}

/// What a projection removed, read off its readout: the closed-form quantities the statistics
/// need.
pub(crate) struct Plan {
    /// Coefficients after projection, `c̃_i`.
    after: Vec<f64>,
    /// Directions removed.
    removed: usize,
    /// `‖G‖² − ‖G̃‖²`, as the sum of what each removed direction carried.
    pub(crate) removed_energy: f64,
}

impl Plan {
    /// The statistics of a projection with coefficients `c` against singular values `sigma` of a
    /// gradient of energy `grad_energy`.
    pub(crate) fn stats(&self, c: &[f64], sigma: &[f64], grad_energy: f64) -> ProjectionStats {
        let d_norm = sigma.iter().map(|s| s * s).sum::<f64>().sqrt();
        let removed_energy = self.removed_energy.min(grad_energy);
        let cosine = |coefficients: &[f64], energy: f64| {
            let dot: f64 = sigma.iter().zip(coefficients).map(|(s, c)| s * c).sum();
            let denominator = energy.sqrt() * d_norm;
            if denominator > 0.0 {
                (dot / denominator).clamp(-1.0, 1.0)
            } else {
                0.0
            }
        };
        ProjectionStats {
            directions: c.len(),
            conflicting: c.iter().filter(|c| **c < 0.0).count(),
            removed: self.removed,
            grad_energy,
            removed_energy,
            cosine_before: cosine(c, grad_energy),
            cosine_after: cosine(&self.after, grad_energy - removed_energy),
        }
    }
}
