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
//! update runs in one pass over `G` where the backend allows it (burn-ndarray; see `kernels.rs`).
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

use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};
use spf_subspace::LowRankBasis;

use crate::error::SpfError;
use crate::host;
use crate::kernels::{product, squared_norm, subtract_product};

/// What the projection removes from a gradient; see the [module docs](self) for the formulas.
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
}

/// What one projection did to one gradient tensor.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ProjectionStats {
    /// Directions in the basis, `k`.
    pub directions: usize,
    /// Directions with `c_i < 0` before projection.
    pub conflicting: usize,
    /// Directions whose component was removed. `Pcgrad` removes at most the one direction `D`;
    /// `ColumnSpace`/`RowSpace` count the `u_i` (or `v_i`) along which `G` had any energy.
    pub removed: usize,
    /// `‖G‖²`.
    pub grad_energy: f64,
    /// `‖G‖² − ‖G̃‖²`, the energy removed.
    pub removed_energy: f64,
    /// `⟨G, D⟩ / (‖G‖‖D‖)` before projection; 0 when `G = 0` or `D = 0`.
    pub cosine_before: f64,
    /// `⟨G̃, D⟩ / (‖G̃‖‖D‖)` after projection; 0 when `G̃ = 0` or `D = 0`.
    pub cosine_after: f64,
}

impl ProjectionStats {
    /// `1 − ‖G̃‖²/‖G‖²`, or 0 for a zero gradient.
    pub fn removed_energy_share(&self) -> f64 {
        if self.grad_energy > 0.0 {
            self.removed_energy / self.grad_energy
        } else {
            0.0
        }
    }
}

/// A projected gradient and what the projection did.
#[derive(Debug, Clone)]
pub struct Projected<B: Backend> {
    /// `G̃`.
    pub grad: Tensor<B, 2>,
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
/// use burn::backend::NdArray;
/// use burn::tensor::Tensor;
/// use spf_core::{ProjectionMode, project};
/// use spf_subspace::LowRankBasis;
///
/// let device = Default::default();
/// // One safety direction B_1 = e_1 e_1ᵀ.
/// let basis = LowRankBasis::new(
///     Tensor::<NdArray, 2>::from_floats([[1.0], [0.0]], &device),
///     Tensor::from_floats([1.0], &device),
///     Tensor::from_floats([[1.0], [0.0]], &device),
/// )?;
/// // c_1 = −2 < 0 conflicts and is removed; the rest of G is kept.
/// let g = Tensor::<NdArray, 2>::from_floats([[-2.0, 3.0], [4.0, 5.0]], &device);
/// let out = project(g, &basis, ProjectionMode::ConflictOnly)?;
/// out.grad.into_data().assert_eq(&Tensor::<NdArray, 2>::from_floats([[0.0, 3.0], [4.0, 5.0]], &device).into_data(), true);
/// assert_eq!((out.stats.conflicting, out.stats.removed), (1, 1));
/// assert!((out.stats.removed_energy_share() - 4.0 / 54.0).abs() < 1e-6);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn project<B: Backend>(
    grad: Tensor<B, 2>,
    basis: &LowRankBasis<B>,
    mode: ProjectionMode,
) -> Result<Projected<B>, SpfError> {
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
pub fn project_without_stats<B: Backend>(
    grad: Tensor<B, 2>,
    basis: &LowRankBasis<B>,
    mode: ProjectionMode,
) -> Result<Tensor<B, 2>, SpfError> {
    Ok(Pending::new(grad, basis, mode)?.finish(false))
}

/// One projection before anything is read back: everything so far is computed on the device.
/// [`project`] reads its [`readout`](Self::readout), then [`finish`](Self::finish)es it (leaving
/// `G` untouched when nothing is removed); the optimizer's step
/// [`finish_measured`](Self::finish_measured)es each gradient at once, while it is still in the
/// caches, and reads all their readouts in one transfer after the last (or none).
pub(crate) struct Pending<B: Backend> {
    grad: Tensor<B, 2>,
    basis: LowRankBasis<B>,
    mode: ProjectionMode,
    /// `c`, when `k > 0`.
    coefficients: Option<Tensor<B, 1>>,
    /// `UᵀG` (`[k, d_out]`), or `G V` (`[d_in, k]`) for `RowSpace`, when `k > 0`.
    side: Option<Tensor<B, 2>>,
    /// `r` of the rank-`k` modes, the rule of the [module docs](self) applied on the device.
    removal: Option<Tensor<B, 1>>,
}

impl<B: Backend> Pending<B> {
    /// The device half of projecting `grad` against `basis`: the coefficients, and the removal
    /// coefficients that `mode`'s rule takes from them, with no read back to the host.
    ///
    /// # Errors
    ///
    /// [`SpfError::ShapeMismatch`] when `grad` is not `basis.d_in() × basis.d_out()`.
    pub(crate) fn new(
        grad: Tensor<B, 2>,
        basis: &LowRankBasis<B>,
        mode: ProjectionMode,
    ) -> Result<Self, SpfError> {
        let [d_in, d_out] = grad.dims();
        if [d_in, d_out] != [basis.d_in(), basis.d_out()] {
            return Err(SpfError::ShapeMismatch {
                path: None,
                expected: vec![basis.d_in(), basis.d_out()],
                found: vec![d_in, d_out],
            });
        }
        let k = basis.rank();
        let (coefficients, side) = match (k, mode) {
            (0, _) => (None, None),
            (_, ProjectionMode::RowSpace) => {
                let gv = product(grad.clone(), basis.v().clone()); // [d_in, k]
                let c = (gv.clone() * basis.u().clone()).sum_dim(0).reshape([k]);
                (Some(c), Some(gv))
            }
            _ => {
                let utg = product(basis.u().clone().transpose(), grad.clone()); // [k, d_out]
                let c = (utg.clone() * basis.v().clone().transpose())
                    .sum_dim(1)
                    .reshape([k]);
                (Some(c), Some(utg))
            }
        };
        let removal = coefficients
            .as_ref()
            .and_then(|c| removal_coefficients(mode, c, basis));
        Ok(Self {
            grad,
            basis: basis.clone(),
            mode,
            coefficients,
            side,
            removal,
        })
    }

    /// The side product when the subspace modes need its per-direction energies.
    fn subspace_side(&self) -> Option<&Tensor<B, 2>> {
        self.side.as_ref().filter(|_| {
            matches!(
                self.mode,
                ProjectionMode::ColumnSpace | ProjectionMode::RowSpace
            )
        })
    }

    /// Where each number sits in [`Self::readout`].
    fn layout(&self) -> Layout {
        Layout {
            mode: self.mode,
            k: self.basis.rank(),
            has_removal: self.removal.is_some(),
        }
    }

    /// `G̃` now, with the removal always applied, and (when `measure`) what its statistics need
    /// later: the readout, computed from `G` before the removal overwrites it, and `G̃` itself.
    /// No read: the optimizer reads every matrix's readout in one transfer after the last.
    pub(crate) fn finish_measured(self, measure: bool) -> (Tensor<B, 2>, Option<Measured<B>>) {
        let measured = measure.then(|| Measured {
            layout: self.layout(),
            readout: self.readout(),
            side: self.subspace_side().cloned(),
            sigma: self.basis.singular_values().to_vec(),
            projected: None,
        });
        let projected = self.finish(false);
        let measured = measured.map(|m| Measured {
            projected: Some(projected.clone()),
            ..m
        });
        (projected, measured)
    }

    /// `G̃`: the removal applied on the device, or `G` itself, untouched, when `unchanged` (the
    /// host has read that nothing is removed).
    pub(crate) fn finish(self, unchanged: bool) -> Tensor<B, 2> {
        let Self {
            grad,
            basis,
            side,
            removal,
            mode,
            ..
        } = self;
        let Some(side) = side.filter(|_| !unchanged) else {
            return grad;
        };
        match (mode, removal) {
            (_, Some(r)) => {
                let k = r.dims()[0];
                let left = basis.u().clone() * r.reshape([1, k]);
                subtract_product(grad, left, basis.v().clone().transpose())
            }
            (ProjectionMode::RowSpace, None) => {
                subtract_product(grad, side, basis.v().clone().transpose())
            }
            (ProjectionMode::ColumnSpace, None) => subtract_product(grad, basis.u().clone(), side),
            // A rank-k mode with a zero basis energy (Pcgrad with D = 0) removes nothing.
            (_, None) => grad,
        }
    }
}

/// `r`, the coefficients of `U diag(r) Vᵀ` that the rank-`k` modes subtract, from `c`, on the
/// device; `None` for the subspace modes and for `Pcgrad` against `D = 0`.
fn removal_coefficients<B: Backend>(
    mode: ProjectionMode,
    c: &Tensor<B, 1>,
    basis: &LowRankBasis<B>,
) -> Option<Tensor<B, 1>> {
    match mode {
        // r_i = c_i where direction i conflicts (c_i < 0), else 0.
        ProjectionMode::ConflictOnly => Some(c.clone().clamp_max(0.0)),
        ProjectionMode::Orthogonal => Some(c.clone()),
        ProjectionMode::Pcgrad => {
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
        ProjectionMode::ColumnSpace | ProjectionMode::RowSpace => None,
    }
}

/// Where the numbers of a readout sit: `[c, r, ‖G‖², per-direction energies]`.
#[derive(Clone, Copy)]
struct Layout {
    mode: ProjectionMode,
    k: usize,
    has_removal: bool,
}

/// A readout read back to the host, in parts.
struct Read<'a> {
    c: &'a [f64],
    r: &'a [f64],
    grad_energy: f64,
    side_energy: &'a [f64],
}

impl Layout {
    fn subspace(self) -> bool {
        self.k > 0
            && matches!(
                self.mode,
                ProjectionMode::ColumnSpace | ProjectionMode::RowSpace
            )
    }

    fn len(self) -> usize {
        let r = if self.has_removal { self.k } else { 0 };
        let side = if self.subspace() { self.k } else { 0 };
        self.k + r + 1 + side
    }

    fn split(self, readout: &[f64]) -> Read<'_> {
        let (c, rest) = readout.split_at(self.k);
        let (r, rest) = rest.split_at(if self.has_removal { self.k } else { 0 });
        Read {
            c,
            r,
            grad_energy: rest[0],
            side_energy: &rest[1..],
        }
    }
}

/// Whether `‖G‖²`, summed in `f32`, can be trusted: finite, and not so small that underflow may
/// have lost entries.
fn plausible<B: Backend>(energy: f64, grad: &Tensor<B, 2>) -> bool {
    energy.is_finite() && energy >= grad.shape().num_elements() as f64 * 1e-30
}

/// A finished projection whose statistics wait for the host's read of its readout.
pub(crate) struct Measured<B: Backend> {
    layout: Layout,
    readout: Tensor<B, 1>,
    /// `UᵀG` or `G V`, for the subspace modes' energies at extreme magnitudes.
    side: Option<Tensor<B, 2>>,
    sigma: Vec<f64>,
    /// `G̃`, for `‖G‖²` at extreme magnitudes.
    projected: Option<Tensor<B, 2>>,
}

/// A projection whose statistics come from a readout, read back to the host (for many
/// projections at once, by the optimizer).
pub(crate) trait Readout<B: Backend> {
    /// The numbers the statistics need, as one device vector.
    fn readout(&self) -> Tensor<B, 1>;
    /// The length of [`Self::readout`].
    fn readout_len(&self) -> usize;
    /// The statistics, from the readout read back to the host.
    fn stats(&self, readout: &[f64]) -> ProjectionStats;
}

impl<B: Backend> Readout<B> for Pending<B> {
    /// The numbers the statistics need, as one device vector: `[c, r, ‖G‖², per-direction
    /// energies]`, where `r` is there for the rank-`k` modes and the energies `‖u_iᵀG‖²` (or
    /// `‖G v_i‖²`) for the subspace modes.
    fn readout(&self) -> Tensor<B, 1> {
        let mut parts: Vec<_> = self
            .coefficients
            .iter()
            .chain(&self.removal)
            .cloned()
            .collect();
        parts.push(energies(&self.grad, self.subspace_side(), self.mode, None));
        Tensor::cat(parts, 0)
    }

    /// The length of [`Self::readout`].
    fn readout_len(&self) -> usize {
        self.layout().len()
    }

    /// The statistics, from this projection's [`readout`](Self::readout) read back to the host.
    ///
    /// `‖G‖²` is summed on the device in the gradient's precision; when that overflowed, or is
    /// small enough for underflow to have lost entries (below `1e-30` per element), it is redone
    /// on `G / max|G|` with one more read, so gradients of size `1e-30` or `1e30` keep exact
    /// statistics and the common case pays one pass, not three.
    fn stats(&self, readout: &[f64]) -> ProjectionStats {
        let read = self.layout().split(readout);
        let (mut grad_energy, mut side_energy) = (read.grad_energy, read.side_energy.to_vec());
        if !plausible(grad_energy, &self.grad) {
            let scale = self.grad.clone().abs().max().clamp_min(f32::MIN_POSITIVE);
            let scaled = energies(
                &self.grad,
                self.subspace_side(),
                self.mode,
                Some(scale.clone()),
            );
            let host = host::read(vec![scale, scaled]);
            let s2 = host[0] * host[0];
            grad_energy = s2 * host[1];
            side_energy = host[2..].iter().map(|e| s2 * e).collect();
        }
        let plan = Plan::from_readout(self.mode, read.c, read.r, &side_energy);
        plan.stats(read.c, self.basis.singular_values(), grad_energy)
    }
}

impl<B: Backend> Readout<B> for Measured<B> {
    /// The numbers to read, computed from `G` before the removal.
    fn readout(&self) -> Tensor<B, 1> {
        self.readout.clone()
    }

    /// The length of [`Self::readout`].
    fn readout_len(&self) -> usize {
        self.layout.len()
    }

    /// The statistics, from the readout read back to the host.
    ///
    /// `G` itself is gone (the removal ran in its buffer), so when `‖G‖²` overflowed or
    /// underflowed in `f32` it is rebuilt, with one more read, as `‖G̃‖² + removed energy`, both
    /// computed on scaled copies: exact, since what is removed is orthogonal to what is kept (for
    /// `ConflictOnly` and `Orthogonal` each `r_i` is `0` or `c_i`; `Pcgrad` removes the
    /// component along `D`; the subspace modes an orthogonal projection).
    fn stats(&self, readout: &[f64]) -> ProjectionStats {
        let read = self.layout.split(readout);
        let mode = self.layout.mode;
        let projected = self.projected.as_ref().expect("kept for the statistics");
        let mut side_energy = read.side_energy.to_vec();
        let mut grad_energy = read.grad_energy;
        let unreliable = |e: f64| !e.is_finite();
        if !plausible(grad_energy, projected) || side_energy.iter().copied().any(unreliable) {
            let scale = |t: &Tensor<B, 2>| t.clone().abs().max().clamp_min(f32::MIN_POSITIVE);
            let s = scale(projected);
            let mut parts = vec![s.clone(), energies(projected, None, mode, Some(s))];
            if let Some(side) = &self.side {
                let s = scale(side);
                parts.push(s.clone());
                // The per-direction energies of the side product alone (its first entry is the
                // side's total energy, not needed).
                parts.push(energies(side, Some(side), mode, Some(s)).slice([1..]));
            }
            let host = host::read(parts);
            if self.side.is_some() {
                let s2 = host[2] * host[2];
                side_energy = host[3..].iter().map(|e| s2 * e).collect();
            }
            let plan = Plan::from_readout(mode, read.c, read.r, &side_energy);
            grad_energy = host[0] * host[0] * host[1] + plan.removed_energy;
        }
        let plan = Plan::from_readout(mode, read.c, read.r, &side_energy);
        plan.stats(read.c, &self.sigma, grad_energy)
    }
}

/// `[‖G/s‖², ‖side_i/s‖²…]` as one device vector, where `side` is `UᵀG` (`[k, d_out]`,
/// energies by row) for `ColumnSpace` and `G V` (`[d_in, k]`, by column) for `RowSpace`, and `s`
/// is `scale` or 1.
fn energies<B: Backend>(
    grad: &Tensor<B, 2>,
    side: Option<&Tensor<B, 2>>,
    mode: ProjectionMode,
    scale: Option<Tensor<B, 1>>,
) -> Tensor<B, 1> {
    let scaled = |t: &Tensor<B, 2>| match &scale {
        Some(s) => t.clone().div(s.clone().unsqueeze()),
        None => t.clone(),
    };
    let total = match &scale {
        Some(_) => scaled(grad).square().sum(),
        None => squared_norm(grad),
    };
    let Some(side) = side else {
        return total;
    };
    let k = side.dims()[usize::from(mode == ProjectionMode::RowSpace)];
    let by_direction = if mode == ProjectionMode::RowSpace {
        scaled(side).square().sum_dim(0)
    } else {
        scaled(side).square().sum_dim(1)
    };
    Tensor::cat(vec![total, by_direction.reshape([k])], 0)
}

/// What a projection removed, read off its readout: the closed-form quantities the statistics
/// need.
struct Plan {
    /// Coefficients after projection, `c̃_i`.
    after: Vec<f64>,
    removed: usize,
    removed_energy: f64,
}

impl Plan {
    /// What the device's removal `r` (rank-`k` modes) or the per-direction energies (subspace
    /// modes) amount to.
    fn from_readout(mode: ProjectionMode, c: &[f64], r: &[f64], side_energy: &[f64]) -> Self {
        match mode {
            ProjectionMode::ColumnSpace | ProjectionMode::RowSpace => Self {
                after: vec![0.0; c.len()],
                removed: side_energy.iter().filter(|e| **e > 0.0).count(),
                removed_energy: side_energy.iter().sum(),
            },
            _ => {
                let nonzero = r.iter().filter(|x| **x != 0.0).count();
                Self {
                    after: c.iter().zip(r).map(|(c, r)| c - r).collect(),
                    // Pcgrad removes the one direction D, whatever its rank.
                    removed: if mode == ProjectionMode::Pcgrad {
                        nonzero.min(1)
                    } else {
                        nonzero
                    },
                    removed_energy: r.iter().map(|x| x * x).sum(),
                }
            }
        }
    }

    fn stats(&self, c: &[f64], sigma: &[f64], grad_energy: f64) -> ProjectionStats {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        Gaussian, HostBasis, TestBackend, download, max_abs_diff, reference_projection, round_f32,
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

    fn project_host(
        g: &Mat<f64>,
        basis: &HostBasis,
        mode: ProjectionMode,
    ) -> Projected<TestBackend> {
        let device = Default::default();
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
        let device = Default::default();
        let g = upload::<TestBackend>(&g, &device);
        for mode in [ProjectionMode::ConflictOnly, ProjectionMode::Pcgrad] {
            let out = project(g.clone(), &basis.to_device(&device), mode).unwrap();
            assert_eq!(out.stats.removed, 0);
            assert_eq!(out.grad.into_data(), g.clone().into_data(), "{mode:?}");
        }
    }

    #[test]
    fn empty_basis_changes_nothing() {
        let device = Default::default();
        let g = upload::<TestBackend>(&Gaussian::new(3).matrix(4, 6), &device);
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
    fn f64_backends_project_at_f64_precision() {
        // Host-side coefficients reach the device as f64, so an f64 backend is not held to f32.
        type F64 = burn::backend::NdArray<f64>;
        let device = Default::default();
        let mut rng = Gaussian::new(21);
        let basis = rng.basis(12, 9, 4);
        let g = rng.matrix(12, 9);
        let expected = reference_projection(&g, &basis, ProjectionMode::ConflictOnly);
        let out = project(
            upload::<F64>(&g, &device),
            &basis.to_device(&device),
            ProjectionMode::ConflictOnly,
        )
        .unwrap();
        let err = max_abs_diff(&download(out.grad), &expected);
        let tol = 4.0 * (12 + 9 + 4) as f64 * f64::EPSILON * g.norm_l2();
        assert!(err <= tol, "{err:e} > {tol:e}");
    }

    #[test]
    fn wrong_shape_is_an_error() {
        let device = Default::default();
        let g = Tensor::<TestBackend, 2>::zeros([3, 4], &device);
        let err = project(
            g,
            &LowRankBasis::empty(4, 3, &device),
            ProjectionMode::default(),
        );
        assert!(matches!(err, Err(SpfError::ShapeMismatch { .. })));
    }
}
