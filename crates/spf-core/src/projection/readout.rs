//! Reading a projection's statistics back: where each number sits in a readout ([`Layout`]),
//! the [`Readout`] of a projection whose read is deferred, a finished projection awaiting its
//! read ([`Measured`]), and the energies that rebuild `‖G‖²` at extreme magnitudes.

use burn::tensor::Tensor;

use super::mode::ProjectionMode;
use super::stats::ProjectionStats;
use crate::host;
use crate::kernels::squared_norm;

/// Where the numbers of a readout sit: `[c, r, ‖G‖², per-direction energies]`.
#[derive(Clone, Copy)]
pub(crate) struct Layout {
    pub(crate) mode: ProjectionMode,
    pub(crate) k: usize,
    pub(crate) has_removal: bool,
}

/// A readout read back to the host, in parts.
pub(crate) struct Read<'a> {
    pub(crate) c: &'a [f64],
    pub(crate) r: &'a [f64],
    pub(crate) grad_energy: f64,
    pub(crate) side_energy: &'a [f64],
}

impl Layout {
    pub(crate) fn subspace(self) -> bool {
        self.k > 0 && self.mode.removes_subspace()
    }

    pub(crate) fn len(self) -> usize {
        let r = if self.has_removal { self.k } else { 0 };
        let side = if self.subspace() { self.k } else { 0 };
        self.k + r + 1 + side
    }

    pub(crate) fn split(self, readout: &[f64]) -> Read<'_> {
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
pub(crate) fn plausible(energy: f64, grad: &Tensor<2>) -> bool {
    energy.is_finite() && energy >= grad.shape().num_elements() as f64 * 1e-30
}

/// A finished projection whose statistics wait for the host's read of its readout.
pub(crate) struct Measured {
    pub(crate) layout: Layout,
    pub(crate) readout: Tensor<1>,
    /// `UᵀG` or `G V`, for the subspace modes' energies at extreme magnitudes.
    pub(crate) side: Option<Tensor<2>>,
    pub(crate) sigma: Vec<f64>,
    /// `G̃`, for `‖G‖²` at extreme magnitudes.
    pub(crate) projected: Option<Tensor<2>>,
}

/// A projection whose statistics come from a readout, read back to the host (for many
/// projections at once, by the optimizer).
pub(crate) trait Readout {
    /// The numbers the statistics need, as one device vector.
    fn readout(&self) -> Tensor<1>;
    /// The length of [`Self::readout`].
    fn readout_len(&self) -> usize;
    /// The statistics, from the readout read back to the host.
    fn stats(&self, readout: &[f64]) -> ProjectionStats;
}

impl Readout for Measured {
    /// The numbers to read, computed from `G` before the removal.
    fn readout(&self) -> Tensor<1> {
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
            let scale = |t: &Tensor<2>| t.clone().abs().max().clamp_min(f32::MIN_POSITIVE);
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
            let plan = mode.plan(read.c, read.r, &side_energy);
            grad_energy = host[0] * host[0] * host[1] + plan.removed_energy;
        }
        let plan = mode.plan(read.c, read.r, &side_energy);
        plan.stats(read.c, &self.sigma, grad_energy)
    }
}

/// `[‖G/s‖², ‖side_i/s‖²…]` as one device vector, where `side` is `UᵀG` (`[k, d_out]`,
/// energies by row) for `ColumnSpace` and `G V` (`[d_in, k]`, by column) for `RowSpace`, and `s`
/// is `scale` or 1.
pub(crate) fn energies(
    grad: &Tensor<2>,
    side: Option<&Tensor<2>>,
    mode: ProjectionMode,
    scale: Option<Tensor<1>>,
) -> Tensor<1> {
    let scaled = |t: &Tensor<2>| match &scale {
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
    let axis = mode.direction_axis();
    let k = side.dims()[axis];
    let by_direction = scaled(side).square().sum_dim(1 - axis);
    Tensor::cat(vec![total, by_direction.reshape([k])], 0)
}
