//! [`Pending`]: one projection on the device before anything is read back, its removal applied
//! in place, and its readout for the statistics.

use burn::tensor::Tensor;
use spf_subspace::LowRankBasis;

use super::mode::ProjectionMode;
use super::readout::{Layout, Measured, Readout, energies, plausible};
use super::stats::ProjectionStats;
use crate::error::SpfError;
use crate::host;
use crate::kernels::subtract_product;

/// One projection before anything is read back: everything so far is computed on the device.
/// [`project`](super::project) reads its [`readout`](Self::readout), then [`finish`](Self::finish)es it (leaving
/// `G` untouched when nothing is removed); the optimizer's step
/// [`finish_measured`](Self::finish_measured)es each gradient at once, while it is still in the
/// caches, and reads all their readouts in one transfer after the last (or none).
pub(crate) struct Pending {
    grad: Tensor<2>,
    basis: LowRankBasis,
    mode: ProjectionMode,
    /// `c`, when `k > 0`.
    coefficients: Option<Tensor<1>>,
    /// `UᵀG` (`[k, d_out]`), or `G V` (`[d_in, k]`) for `RowSpace`, when `k > 0`.
    side: Option<Tensor<2>>,
    /// `r` of the rank-`k` modes, the rule of the [module docs](super) applied on the device.
    removal: Option<Tensor<1>>,
}

impl Pending {
    /// The device half of projecting `grad` against `basis`: the coefficients, and the removal
    /// coefficients that `mode`'s rule takes from them, with no read back to the host.
    ///
    /// # Errors
    ///
    /// [`SpfError::ShapeMismatch`] when `grad` is not `basis.d_in() × basis.d_out()`.
    pub(crate) fn new(
        grad: Tensor<2>,
        basis: &LowRankBasis,
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
        let (coefficients, side) = match basis.rank() {
            0 => (None, None),
            _ => {
                let (c, side) = mode.coefficients(&grad, basis);
                (Some(c), Some(side))
            }
        };
        let removal = coefficients.as_ref().and_then(|c| mode.removal(c, basis));
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
    fn subspace_side(&self) -> Option<&Tensor<2>> {
        self.side.as_ref().filter(|_| self.mode.removes_subspace())
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
    pub(crate) fn finish_measured(self, measure: bool) -> (Tensor<2>, Option<Measured>) {
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
    pub(crate) fn finish(self, unchanged: bool) -> Tensor<2> {
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
        match removal {
            Some(r) => {
                let k = r.dims()[0];
                let left = basis.u().clone() * r.reshape([1, k]);
                subtract_product(grad, left, basis.v().clone().transpose())
            }
            None => mode.remove_without_rule(grad, &basis, side),
        }
    }
}

impl Readout for Pending {
    /// The numbers the statistics need, as one device vector: `[c, r, ‖G‖², per-direction
    /// energies]`, where `r` is there for the rank-`k` modes and the energies `‖u_iᵀG‖²` (or
    /// `‖G v_i‖²`) for the subspace modes.
    fn readout(&self) -> Tensor<1> {
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
        let plan = self.mode.plan(read.c, read.r, &side_energy);
        plan.stats(read.c, self.basis.singular_values(), grad_energy)
    }
}
