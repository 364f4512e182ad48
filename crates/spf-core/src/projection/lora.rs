//! The projection for a weight trained through a LoRA adapter: remove from the adapter
//! factors' gradients (or updates) what would move the *effective* weight against the safety
//! basis.
//!
//! burn's LoRA keeps the base `W₀` frozen and trains `A: [d_in, r]` and `B: [r, d_out]`; the
//! effective weight is `W = W₀ + s·A B` (`s = α / r > 0`). A step `(δA, δB)` changes it by
//!
//! ```text
//! δW = s (δA B + A δB) + s δA δB
//! ```
//!
//! whose first-order part is linear in `(δA, δB)`. The coefficient of that part along the safety
//! direction `B_i = u_i v_iᵀ` is `u_iᵀ δW v_i = s ⟨E_i, (δA, δB)⟩`, with the pulled-back
//! direction
//!
//! ```text
//! E_i = (u_i p_iᵀ, q_i v_iᵀ),   p_i = B v_i,   q_i = Aᵀ u_i   (P = B V, Q = Aᵀ U: [r, k])
//! ```
//!
//! in the space of adapter pairs (Frobenius inner product summed over both factors). Because `U`
//! and `V` are orthonormal, the `E_i` are orthogonal to one another:
//! `⟨E_i, E_j⟩ = (u_iᵀu_j)(p_iᵀp_j) + (q_iᵀq_j)(v_iᵀv_j) = δ_ij (‖p_i‖² + ‖q_i‖²)`. So, for
//! adapter gradients `g = (g_A, g_B)` (descent `−ηg`), with `a_i = ⟨E_i, g⟩` (which has the sign
//! of the effective coefficient `c_i`) and `e_i = ‖E_i‖²`, the projections are one rank-`k`
//! update per factor, as for a full weight:
//!
//! ```text
//! g̃_A = g_A − U diag(λ) Pᵀ,   g̃_B = g_B − Q diag(λ) Vᵀ
//! ```
//!
//! | mode | `λ_i` | after |
//! |---|---|---|
//! | [`ConflictOnly`](ProjectionMode::ConflictOnly) | `min(a_i, 0) / e_i` | every `ã_i = max(a_i, 0) ≥ 0` |
//! | [`Orthogonal`](ProjectionMode::Orthogonal) | `a_i / e_i` | every `ã_i = 0` |
//! | [`Pcgrad`](ProjectionMode::Pcgrad) | `σ_i min(Σσ_j a_j, 0) / Σσ_j² e_j` | `Σσ_i ã_i ≥ 0` |
//!
//! (`λ_i = 0` where `e_i = 0`, as `a_i = 0` there.) Each is the orthogonal projection in adapter
//! space that the full-weight mode is in weight space, so the same properties hold: `g̃ − g` lies
//! in `span{E_i}`, `⟨g̃, g⟩ = ‖g̃‖² ≤ ‖g‖²`, projecting twice changes nothing, and no conflict
//! means no change. The effective first-order direction `D̃ = s(g̃_A B + A g̃_B)` then has
//! `u_iᵀ D̃ v_i = s ã_i`: the step gives the full-weight SPF guarantee, `⟨U Σ Vᵀ, D̃⟩ ≥ 0`
//! (no first-order rise of the rank-`k` safety loss), for ConflictOnly and Orthogonal per
//! direction and for Pcgrad in sum. The same holds for an update `(δA, δB)` projected as the
//! descent `−(δA, δB)` it stands for (the `Update` target), with `E_i` taken at the factors
//! before the step. The second-order term `s δA δB` is not controlled, as the full-weight
//! guarantee is first-order too.
//!
//! At burn's initialization `B = 0`, so `p_i = 0`, `g_A = s G Bᵀ = 0`, and `E_i` has only its
//! `B` part: the first steps need no special case. `s` cancels from every `λ_i` and is not
//! needed; it must be positive (burn's `alpha / rank` with `alpha > 0`).
//!
//! [`ColumnSpace`](ProjectionMode::ColumnSpace) and [`RowSpace`](ProjectionMode::RowSpace) pull
//! back to constraints `Uᵀ(δA B + A δB) = 0` (`(δA B + A δB) V = 0`) that are not orthogonal to
//! one another: their least-change projection solves a Sylvester equation through two small
//! SVDs on the host (`projection/lora/subspace.rs` has the derivation). That needs the factors'
//! `B` (or `A`) and `g_B` (or `g_A`) on the host, so a step in these modes makes one more read,
//! for all its adapters together (`solve`).

mod subspace;

use burn::tensor::{Tensor, TensorCreationOptions, TensorData};
use faer::MatRef;
use spf_subspace::{LowRankBasis, SubspaceError};

use super::mode::ProjectionMode;
use super::readout::Readout;
use super::stats::ProjectionStats;
use crate::error::SpfError;
use crate::host;

/// The factors of a LoRA adapter, `W = W₀ + s·A B`: `a: [d_in, r]`, `b: [r, d_out]`.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    /// `A`, `[d_in, r]`.
    pub a: Tensor<2>,
    /// `B`, `[r, d_out]`.
    pub b: Tensor<2>,
}

/// The gradients (or descents) of a LoRA adapter's factors, in the factors' shapes.
#[derive(Debug, Clone)]
pub struct LoraGrads {
    /// `g_A`, `[d_in, r]`.
    pub a: Tensor<2>,
    /// `g_B`, `[r, d_out]`.
    pub b: Tensor<2>,
}

/// Projected adapter gradients and what the projection did.
#[derive(Debug, Clone)]
pub struct LoraProjected {
    /// `(g̃_A, g̃_B)`.
    pub grads: LoraGrads,
    /// Statistics in adapter space: `G` is the pair `(g_A, g_B)`, `D` the pulled-back safety
    /// direction `(U Σ Pᵀ, Q Σ Vᵀ)`, `c_i` is `a_i`.
    pub stats: ProjectionStats,
}

/// A started LoRA projection: the pulled-back directions and what to remove along them, on the
/// device; nothing read back, except for a subspace mode's [`solve`].
pub(crate) struct LoraPending {
    mode: ProjectionMode,
    grads: LoraGrads,
    u: Tensor<2>,
    v: Tensor<2>,
    /// `σ` on the host, for the statistics.
    sigma: Vec<f64>,
    /// `P = B V`, `Q = Aᵀ U`: `[r, k]`.
    p: Tensor<2>,
    q: Tensor<2>,
    /// `a_i = ⟨E_i, g⟩` and `e_i = ‖E_i‖²`, as `[1, k]`.
    coefficients: Tensor<2>,
    energies: Tensor<2>,
    removal: Removal,
}

/// What a projection removes.
enum Removal {
    /// `λ` of a direction mode, as `[1, k]`.
    Directions(Tensor<2>),
    /// A subspace mode: the factor its solve needs (`B`, or `Aᵀ` for RowSpace), then, once
    /// [`solve`]d, the projected gradients and the host's part of the statistics.
    Subspace {
        factor: Tensor<2>,
        solved: Option<Box<(LoraGrads, Solved)>>,
    },
}

/// A subspace mode's statistics from its solve: the coefficients `a`, the energies `e`, `‖g‖²`,
/// the energy removed and the directions along which the effective direction had any energy.
#[derive(Clone)]
struct Solved {
    a: Vec<f64>,
    e: Vec<f64>,
    grad_energy: f64,
    removed_energy: f64,
    removed: usize,
}

impl LoraPending {
    /// Starts the projection of `grads` for the adapter `factors` of a weight whose basis is
    /// `basis`. A subspace mode's projection is complete only after [`solve`].
    ///
    /// # Errors
    ///
    /// [`SpfError::ShapeMismatch`] when `A` is not `[d_in, r]` and `B` not `[r, d_out]` for the
    /// basis' `d_in × d_out`, or a gradient is not its factor's shape.
    pub(crate) fn new(
        grads: LoraGrads,
        factors: &LoraFactors,
        basis: &LowRankBasis,
        mode: ProjectionMode,
    ) -> Result<Self, SpfError> {
        check_shapes(&grads, factors, basis)?;
        let (u, v) = (basis.u().clone(), basis.v().clone());
        let p = factors.b.clone().matmul(v.clone());
        let q = factors.a.clone().transpose().matmul(u.clone());
        let energies = (p.clone() * p.clone()).sum_dim(0) + (q.clone() * q.clone()).sum_dim(0);
        let coefficients = coefficients(&grads, &u, &v, &p, &q);
        // Without directions there is nothing to solve: the empty `λ` of a direction mode.
        let removal = match mode {
            ProjectionMode::ColumnSpace | ProjectionMode::RowSpace if basis.rank() > 0 => {
                Removal::Subspace {
                    factor: match mode {
                        ProjectionMode::RowSpace => factors.a.clone().transpose(),
                        _ => factors.b.clone(),
                    },
                    solved: None,
                }
            }
            _ => Removal::Directions(removal(mode, &coefficients, &energies, basis.sigma())),
        };
        Ok(Self {
            mode,
            grads,
            u,
            v,
            sigma: basis.singular_values().to_vec(),
            p,
            q,
            coefficients,
            energies,
            removal,
        })
    }

    /// What a subspace mode's solve reads, oriented as ColumnSpace: `Q`, `X = Uᵀ g_A`, `B`,
    /// `g_B` (for RowSpace `P`, `Vᵀ g_Bᵀ`, `Aᵀ`, `g_Aᵀ`), then `a`, `e` and `‖g‖²`; `None` for a
    /// direction mode or a solved one.
    fn solve_inputs(&self) -> Option<Vec<Tensor<1>>> {
        let Removal::Subspace {
            factor,
            solved: None,
        } = &self.removal
        else {
            return None;
        };
        let (q, x, g) = match self.mode {
            ProjectionMode::RowSpace => (
                self.p.clone(),
                self.grads.b.clone().matmul(self.v.clone()).transpose(),
                self.grads.a.clone().transpose(),
            ),
            _ => (
                self.q.clone(),
                self.u.clone().transpose().matmul(self.grads.a.clone()),
                self.grads.b.clone(),
            ),
        };
        let flat = |t: Tensor<2>| t.reshape([-1]);
        Some(vec![
            flat(q),
            flat(x),
            flat(factor.clone()),
            flat(g),
            flat(self.coefficients.clone()),
            flat(self.energies.clone()),
            flat(grad_energy(&self.grads)),
        ])
    }

    /// Solves a subspace mode from its [`Self::solve_inputs`] read back, and applies the change on
    /// the device. Non-finite inputs leave the gradients as they are (the non-finite probe sees
    /// them).
    fn solve_from(&mut self, host: &[f64]) -> Result<(), SpfError> {
        let Removal::Subspace { factor, solved } = &mut self.removal else {
            return Ok(());
        };
        let [r, k] = match self.mode {
            ProjectionMode::RowSpace => self.p.dims(),
            _ => self.q.dims(),
        };
        let n = factor.dims()[1];
        let (q, rest) = host.split_at(r * k);
        let (x, rest) = rest.split_at(k * r);
        let (b, rest) = rest.split_at(r * n);
        let (g_b, rest) = rest.split_at(r * n);
        let (a, rest) = rest.split_at(k);
        let (e, rest) = rest.split_at(k);
        let grad_energy = rest[0];
        let mut stats = Solved {
            a: a.to_vec(),
            e: e.to_vec(),
            grad_energy,
            removed_energy: 0.0,
            removed: 0,
        };
        if !host.iter().all(|x| x.is_finite()) {
            *solved = Some(Box::new((self.grads.clone(), stats)));
            return Ok(());
        }
        let solution = subspace::solve(&subspace::Inputs {
            q: MatRef::from_row_major_slice(q, r, k),
            x: MatRef::from_row_major_slice(x, k, r),
            b: MatRef::from_row_major_slice(b, r, n),
            g_b: MatRef::from_row_major_slice(g_b, r, n),
        })
        .map_err(|message| SpfError::Subspace(SubspaceError::SvdFailed { message }))?;
        stats.removed_energy = solution.removed_energy;
        stats.removed = solution
            .direction_energy
            .iter()
            .filter(|x| **x > 0.0)
            .count();
        let like = &self.grads.a;
        let a_change = upload(solution.a_change.as_ref(), like);
        let b_change = upload(solution.b_change.as_ref(), like);
        let grads = match self.mode {
            ProjectionMode::RowSpace => LoraGrads {
                a: self.grads.a.clone() - b_change.transpose(),
                b: self.grads.b.clone() - self.v.clone().matmul(a_change).transpose(),
            },
            _ => LoraGrads {
                a: self.grads.a.clone() - self.u.clone().matmul(a_change),
                b: self.grads.b.clone() - b_change,
            },
        };
        *solved = Some(Box::new((grads, stats)));
        Ok(())
    }

    /// The numbers the statistics need, as one device vector: `[a, e, λ, ‖g‖²]`, or for a
    /// solved subspace mode `[ã, ‖g̃‖²]` (the rest came with the solve).
    pub(crate) fn readout(&self) -> Tensor<1> {
        let parts = match &self.removal {
            Removal::Directions(lambda) => vec![
                self.coefficients.clone(),
                self.energies.clone(),
                lambda.clone(),
                grad_energy(&self.grads),
            ],
            Removal::Subspace { solved, .. } => {
                let (grads, _) = &**solved.as_ref().expect("solved before it is read");
                let after = coefficients(grads, &self.u, &self.v, &self.p, &self.q);
                vec![after, grad_energy(grads)]
            }
        };
        Tensor::cat(parts, 1).reshape([-1])
    }

    /// The length of [`Self::readout`].
    pub(crate) fn readout_len(&self) -> usize {
        readout_len(&self.sigma, self.solved())
    }

    /// The statistics, from the [`Self::readout`] read back to the host.
    pub(crate) fn stats(&self, readout: &[f64]) -> ProjectionStats {
        stats(self.mode, &self.sigma, self.solved(), readout)
    }

    fn solved(&self) -> Option<&Solved> {
        match &self.removal {
            Removal::Subspace {
                solved: Some(solved),
                ..
            } => Some(&solved.1),
            _ => None,
        }
    }

    /// `(g̃_A, g̃_B)` at once, with what the statistics need when `measure`.
    pub(crate) fn finish_measured(self, measure: bool) -> (LoraGrads, Option<LoraMeasured>) {
        let measured = measure.then(|| LoraMeasured {
            mode: self.mode,
            sigma: self.sigma.clone(),
            solved: self.solved().cloned(),
            readout: self.readout(),
        });
        (self.finish(false), measured)
    }

    /// `(g̃_A, g̃_B)`; with `unchanged` (nothing removed, known from the statistics) the gradients
    /// as they came.
    pub(crate) fn finish(self, unchanged: bool) -> LoraGrads {
        if unchanged {
            return self.grads;
        }
        match self.removal {
            Removal::Directions(lambda) => {
                let a = self.grads.a - (self.u * lambda.clone()).matmul(self.p.transpose());
                let b = self.grads.b - (self.q * lambda).matmul(self.v.transpose());
                LoraGrads { a, b }
            }
            Removal::Subspace { solved, .. } => solved.expect("solved before it is finished").0,
        }
    }
}

/// Completes every subspace mode's projection among `pending` with one read for all of them; no
/// read when there is none.
///
/// # Errors
///
/// [`SpfError::Subspace`] when a host SVD does not converge (on finite input it does).
pub(crate) fn solve(pending: &mut [LoraPending]) -> Result<(), SpfError> {
    let inputs: Vec<Vec<Tensor<1>>> = pending.iter().flat_map(LoraPending::solve_inputs).collect();
    if inputs.is_empty() {
        return Ok(());
    }
    let lengths: Vec<usize> = (inputs.iter())
        .map(|parts| parts.iter().map(|t| t.dims()[0]).sum())
        .collect();
    let host = host::read(inputs.into_iter().flatten().collect());
    let mut rest = host.as_slice();
    let unsolved = pending
        .iter_mut()
        .filter(|p| matches!(p.removal, Removal::Subspace { solved: None, .. }));
    for (pending, length) in unsolved.zip(lengths) {
        let (own, tail) = rest.split_at(length);
        rest = tail;
        pending.solve_from(own)?;
    }
    Ok(())
}

/// `a_i = u_iᵀ g_A p_i + q_iᵀ g_B v_i`, as `[1, k]`.
fn coefficients(
    grads: &LoraGrads,
    u: &Tensor<2>,
    v: &Tensor<2>,
    p: &Tensor<2>,
    q: &Tensor<2>,
) -> Tensor<2> {
    let along_a = (u.clone().transpose().matmul(grads.a.clone()) * p.clone().transpose())
        .sum_dim(1)
        .transpose();
    let along_b = (grads.b.clone().matmul(v.clone()) * q.clone()).sum_dim(0);
    along_a + along_b
}

/// `‖g_A‖² + ‖g_B‖²`, as `[1, 1]`.
fn grad_energy(grads: &LoraGrads) -> Tensor<2> {
    (grads.a.clone().square().sum() + grads.b.clone().square().sum()).reshape([1, 1])
}

/// Uploads a host matrix with the device and float type of `like`.
fn upload(m: MatRef<'_, f64>, like: &Tensor<2>) -> Tensor<2> {
    let (rows, cols) = (m.nrows(), m.ncols());
    let values: Vec<f64> = (0..rows)
        .flat_map(|i| (0..cols).map(move |j| m[(i, j)]))
        .collect();
    let options: TensorCreationOptions = (&like.device(), like.dtype()).into();
    Tensor::from_data(TensorData::new(values, [rows, cols]), options)
}

/// A finished LoRA projection whose statistics wait for the host's read of its readout.
pub(crate) struct LoraMeasured {
    mode: ProjectionMode,
    sigma: Vec<f64>,
    solved: Option<Solved>,
    readout: Tensor<1>,
}

impl Readout for LoraMeasured {
    fn readout(&self) -> Tensor<1> {
        self.readout.clone()
    }

    fn readout_len(&self) -> usize {
        readout_len(&self.sigma, self.solved.as_ref())
    }

    fn stats(&self, readout: &[f64]) -> ProjectionStats {
        stats(self.mode, &self.sigma, self.solved.as_ref(), readout)
    }
}

fn readout_len(sigma: &[f64], solved: Option<&Solved>) -> usize {
    match solved {
        Some(_) => sigma.len() + 1,
        None => 3 * sigma.len() + 1,
    }
}

/// The statistics of a LoRA projection under `mode`, in closed form from its readout.
///
/// A direction mode's readout is `[a, e, λ, ‖g‖²]`: the `E_i` are orthogonal, so
/// `‖g̃‖² = ‖g‖² − Σ(2λ_i a_i − λ_i² e_i)`. A subspace mode's is `[ã, ‖g̃‖²]`, the rest `solved`.
/// `‖g‖²` is summed in `f32` on the device, so it overflows for gradients beyond about `1e19`
/// (the full-weight statistics rebuild it; these do not).
fn stats(
    mode: ProjectionMode,
    sigma: &[f64],
    solved: Option<&Solved>,
    readout: &[f64],
) -> ProjectionStats {
    let k = sigma.len();
    if let Some(solved) = solved {
        let (after, rest) = readout.split_at(k);
        return ProjectionStats {
            directions: k,
            conflicting: solved.a.iter().filter(|&&c| c < 0.0).count(),
            removed: solved.removed,
            grad_energy: solved.grad_energy,
            removed_energy: solved.removed_energy,
            cosine_before: cosine(sigma, &solved.e, &solved.a, solved.grad_energy),
            cosine_after: cosine(sigma, &solved.e, after, rest[0]),
        };
    }
    let (a, rest) = readout.split_at(k);
    let (e, rest) = rest.split_at(k);
    let (lambda, rest) = rest.split_at(k);
    let grad_energy = rest[0];
    let removed_energy: f64 = (0..k)
        .map(|i| 2.0 * lambda[i] * a[i] - lambda[i] * lambda[i] * e[i])
        .sum();
    let after: Vec<f64> = (0..k).map(|i| a[i] - lambda[i] * e[i]).collect();
    ProjectionStats {
        directions: k,
        conflicting: a.iter().filter(|&&c| c < 0.0).count(),
        // Pcgrad removes the one direction `D`, as on a full weight.
        removed: match mode {
            ProjectionMode::Pcgrad => usize::from(lambda.iter().any(|&l| l != 0.0)),
            _ => lambda.iter().filter(|&&l| l != 0.0).count(),
        },
        grad_energy,
        removed_energy,
        cosine_before: cosine(sigma, e, a, grad_energy),
        cosine_after: cosine(sigma, e, &after, grad_energy - removed_energy),
    }
}

/// `⟨g, D⟩ / (‖g‖‖D‖)` for the coefficients `a_i = ⟨E_i, g⟩` of a `g` of squared norm `energy`:
/// `D = Σ σ_i E_i` with orthogonal `E_i` of squared norms `e_i`.
fn cosine(sigma: &[f64], e: &[f64], coefficients: &[f64], energy: f64) -> f64 {
    let d_norm = (sigma.iter().zip(e))
        .map(|(s, e)| s * s * e)
        .sum::<f64>()
        .sqrt();
    let dot: f64 = sigma.iter().zip(coefficients).map(|(s, c)| s * c).sum();
    let norm = energy.max(0.0).sqrt() * d_norm;
    if norm > 0.0 { dot / norm } else { 0.0 }
}

/// `λ` of a direction mode (see the module docs), as `[1, k]`.
fn removal(
    mode: ProjectionMode,
    coefficients: &Tensor<2>,
    energies: &Tensor<2>,
    sigma: &Tensor<1>,
) -> Tensor<2> {
    // Where e_i = 0, a_i = 0 too, so any positive floor gives λ_i = 0.
    let floor = energies.clone().clamp_min(f32::MIN_POSITIVE);
    match mode {
        ProjectionMode::Orthogonal => coefficients.clone() / floor,
        ProjectionMode::Pcgrad => {
            let sigma = sigma.clone().reshape([1, -1]);
            let dot = (sigma.clone() * coefficients.clone()).sum().clamp_max(0.0);
            let norm = (sigma.clone() * sigma.clone() * energies.clone())
                .sum()
                .clamp_min(f32::MIN_POSITIVE);
            sigma * (dot / norm).reshape([1, 1])
        }
        // ConflictOnly; the subspace modes solve instead (here only without directions).
        _ => coefficients.clone().clamp_max(0.0) / floor,
    }
}

fn check_shapes(
    grads: &LoraGrads,
    factors: &LoraFactors,
    basis: &LowRankBasis,
) -> Result<(), SpfError> {
    let (d_in, d_out) = (basis.d_in(), basis.d_out());
    let r = factors.a.dims()[1];
    let mismatch = |expected: [usize; 2], found: [usize; 2]| {
        (expected != found).then(|| SpfError::ShapeMismatch {
            path: None,
            expected: expected.to_vec(),
            found: found.to_vec(),
        })
    };
    let checks = [
        mismatch([d_in, r], factors.a.dims()),
        mismatch([r, d_out], factors.b.dims()),
        mismatch(factors.a.dims(), grads.a.dims()),
        mismatch(factors.b.dims(), grads.b.dims()),
    ];
    match checks.into_iter().flatten().next() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Projects the adapter gradients `grads` of a weight `W = W₀ + s·A B` against the safety basis
/// of `W` with `mode` (see the [module docs](self)), and measures what it did; one read of
/// `3k + 1` numbers (a subspace mode: one more, for its solve).
///
/// # Errors
///
/// [`SpfError::ShapeMismatch`] when the factors do not fit the basis' `d_in × d_out` or the
/// gradients their factors; [`SpfError::Subspace`] when a subspace mode's host SVD fails.
pub fn project_lora(
    grads: LoraGrads,
    factors: &LoraFactors,
    basis: &LowRankBasis,
    mode: ProjectionMode,
) -> Result<LoraProjected, SpfError> {
    let mut pending = [LoraPending::new(grads, factors, basis, mode)?];
    solve(&mut pending)?;
    let [pending] = pending;
    let stats = pending.stats(&host::read(vec![pending.readout()]));
    let grads = pending.finish(stats.removed == 0);
    Ok(LoraProjected { grads, stats })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Gaussian, HostBasis, download, round_f32, test_device, upload};
    use faer::Mat;

    /// An adapted weight's problem: the basis of `W`, the factors, and the adapter gradients of
    /// a full-weight gradient `G` (`g = s(G Bᵀ, Aᵀ G)`), all rounded to `f32`.
    struct Case {
        basis: HostBasis,
        a: Mat<f64>,
        b: Mat<f64>,
        g_a: Mat<f64>,
        g_b: Mat<f64>,
    }

    impl Case {
        fn new(seed: u64, zero_b: bool) -> Self {
            let mut rng = Gaussian::new(seed);
            let (d_in, d_out) = (1 + rng.below(10), 1 + rng.below(10));
            let r = 1 + rng.below(4);
            let k = rng.below(d_in.min(d_out) + 1);
            let basis = rng.basis(d_in, d_out, k).rounded();
            let a = round_f32(&rng.matrix(d_in, r));
            let b = if zero_b {
                Mat::zeros(r, d_out)
            } else {
                round_f32(&rng.matrix(r, d_out))
            };
            // A gradient that conflicts with some directions: G = noise − 2 Σ_i |z_i| B_i.
            let mut g = rng.matrix(d_in, d_out);
            for i in 0..k {
                g -= (2.0 * rng.sample()) * basis.direction(i);
            }
            let s = 0.5;
            let g_a = round_f32(&(s * (&g * b.transpose())));
            let g_b = round_f32(&(s * (a.transpose() * &g)));
            Self {
                basis,
                a,
                b,
                g_a,
                g_b,
            }
        }

        fn project(
            &self,
            mode: ProjectionMode,
        ) -> Result<(Mat<f64>, Mat<f64>, ProjectionStats), SpfError> {
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
            Ok((download(out.grads.a), download(out.grads.b), out.stats))
        }

        /// `u_iᵀ (g_A B + A g_B) v_i` for each direction: the effective first-order coefficients
        /// of a descent along `(g_A, g_B)` (up to `s > 0`).
        fn effective(&self, g_a: &Mat<f64>, g_b: &Mat<f64>) -> Vec<f64> {
            self.basis.coefficients(&(g_a * &self.b + &self.a * g_b))
        }

        /// The gradient of the linear map `(δA, δB) ↦ xᵀ (δA B + A δB) y` from its definition,
        /// one coordinate at a time: `[d_in·r + r·d_out]`, ordered as [`flat`].
        fn pulled_back(&self, x: &Mat<f64>, y: &Mat<f64>) -> Vec<f64> {
            let (d_in, r, d_out) = (self.a.nrows(), self.a.ncols(), self.b.ncols());
            let probe = |da: Mat<f64>, db: Mat<f64>| {
                (x.transpose() * (da * &self.b + &self.a * db) * y)[(0, 0)]
            };
            let unit =
                |rows, cols, at| Mat::from_fn(rows, cols, |i, j| f64::from(u8::from((i, j) == at)));
            let mut e = Vec::new();
            for at in (0..d_in).flat_map(|i| (0..r).map(move |j| (i, j))) {
                e.push(probe(unit(d_in, r, at), Mat::zeros(r, d_out)));
            }
            for at in (0..r).flat_map(|i| (0..d_out).map(move |j| (i, j))) {
                e.push(probe(Mat::zeros(d_in, r), unit(r, d_out, at)));
            }
            e
        }

        /// The constraints of `mode` on the effective direction, as functionals: `u_iᵀ D v_i`
        /// for each direction in `directions` (the direction modes), every entry of `UᵀD`
        /// (ColumnSpace) or of `D V` (RowSpace).
        fn constraints(&self, mode: ProjectionMode, directions: &[usize]) -> Vec<Vec<f64>> {
            let (u, v) = (&self.basis.u, &self.basis.v);
            let unit =
                |n: usize, at: usize| Mat::from_fn(n, 1, |i, _| f64::from(u8::from(i == at)));
            let col = |m: &Mat<f64>, i: usize| m.col(i).as_mat().to_owned();
            let k = self.basis.rank();
            match mode {
                ProjectionMode::ColumnSpace => (0..k)
                    .flat_map(|i| (0..v.nrows()).map(move |j| (i, j)))
                    .map(|(i, j)| self.pulled_back(&col(u, i), &unit(v.nrows(), j)))
                    .collect(),
                ProjectionMode::RowSpace => (0..k)
                    .flat_map(|i| (0..u.nrows()).map(move |j| (i, j)))
                    .map(|(i, j)| self.pulled_back(&unit(u.nrows(), j), &col(v, i)))
                    .collect(),
                _ => (directions.iter())
                    .map(|&i| self.pulled_back(&col(u, i), &col(v, i)))
                    .collect(),
            }
        }

        /// The reference: the Euclidean projection of `g` onto the null space of the
        /// `constraints`, by Gram–Schmidt on them as built from the definition (orthogonality
        /// not assumed).
        fn reference(&self, constraints: Vec<Vec<f64>>) -> Vec<f64> {
            let mut g = flat(&self.g_a, &self.g_b);
            let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
            let mut basis: Vec<Vec<f64>> = Vec::new();
            for mut e in constraints {
                for q in &basis {
                    let c = dot(&e, q);
                    e.iter_mut().zip(q).for_each(|(x, q)| *x -= c * q);
                }
                let norm = dot(&e, &e).sqrt();
                if norm > 1e-9 {
                    basis.push(e.iter().map(|x| x / norm).collect());
                }
            }
            for q in &basis {
                let c = dot(&g, q);
                g.iter_mut().zip(q).for_each(|(x, q)| *x -= c * q);
            }
            g
        }
    }

    fn flat(a: &Mat<f64>, b: &Mat<f64>) -> Vec<f64> {
        let rows = |m: &Mat<f64>| -> Vec<f64> {
            (0..m.nrows())
                .flat_map(|i| (0..m.ncols()).map(move |j| (i, j)))
                .map(|(i, j)| m[(i, j)])
                .collect()
        };
        let mut out = rows(a);
        out.extend(rows(b));
        out
    }

    fn tolerance(case: &Case) -> f64 {
        let n = (case.a.nrows() + case.b.ncols() + case.a.ncols() + case.basis.rank()) as f64;
        let scale = (case.g_a.squared_norm_l2() + case.g_b.squared_norm_l2()).sqrt()
            * (1.0 + case.a.norm_l2() + case.b.norm_l2()).powi(2);
        16.0 * n * f64::from(f32::EPSILON) * scale.max(1.0)
    }

    #[test]
    fn every_mode_but_pcgrad_matches_the_projection_onto_the_pulled_back_constraints() {
        for seed in 0..48 {
            let case = Case::new(seed, seed % 5 == 0);
            let a = case.effective(&case.g_a, &case.g_b);
            for mode in [
                ProjectionMode::ConflictOnly,
                ProjectionMode::Orthogonal,
                ProjectionMode::ColumnSpace,
                ProjectionMode::RowSpace,
            ] {
                let removed: Vec<usize> = (0..a.len())
                    .filter(|&i| mode != ProjectionMode::ConflictOnly || a[i] < 0.0)
                    .collect();
                let (g_a, g_b, _) = case.project(mode).unwrap();
                let got = flat(&g_a, &g_b);
                let expected = case.reference(case.constraints(mode, &removed));
                let err = got
                    .iter()
                    .zip(&expected)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max);
                assert!(
                    err <= tolerance(&case),
                    "seed {seed} {mode:?}: error {err:e}"
                );
            }
        }
    }

    #[test]
    fn the_effective_step_keeps_the_full_weight_guarantee() {
        for seed in 0..48 {
            let case = Case::new(seed, seed % 5 == 0);
            let tol = tolerance(&case);
            let sigma = &case.basis.sigma;
            for mode in ProjectionMode::ALL {
                let (g_a, g_b, stats) = case.project(mode).unwrap();
                let after = case.effective(&g_a, &g_b);
                let d = &g_a * &case.b + &case.a * &g_b;
                match mode {
                    ProjectionMode::ColumnSpace => {
                        let left = (case.basis.u.transpose() * &d).norm_max();
                        assert!(left <= tol, "seed {seed}: ‖UᵀD̃‖ = {left:e}");
                    }
                    ProjectionMode::RowSpace => {
                        let left = (&d * &case.basis.v).norm_max();
                        assert!(left <= tol, "seed {seed}: ‖D̃V‖ = {left:e}");
                    }
                    ProjectionMode::ConflictOnly => {
                        assert!(after.iter().all(|c| *c >= -tol), "seed {seed}: {after:?}")
                    }
                    ProjectionMode::Orthogonal => assert!(
                        after.iter().all(|c| c.abs() <= tol),
                        "seed {seed}: {after:?}"
                    ),
                    _ => {
                        let dot: f64 = after.iter().zip(sigma).map(|(c, s)| c * s).sum();
                        assert!(
                            dot >= -tol * sigma.iter().sum::<f64>().max(1.0),
                            "seed {seed}: {dot}"
                        );
                    }
                }
                // The energy removed, in closed form, is ‖g‖² − ‖g̃‖².
                let before = case.g_a.squared_norm_l2() + case.g_b.squared_norm_l2();
                let kept = g_a.squared_norm_l2() + g_b.squared_norm_l2();
                let energy_tol = tol * before.sqrt().max(1.0);
                assert!(
                    (stats.removed_energy - (before - kept)).abs() <= energy_tol,
                    "seed {seed} {mode:?}: {} vs {}",
                    stats.removed_energy,
                    before - kept
                );
                let conflicting = case
                    .effective(&case.g_a, &case.g_b)
                    .iter()
                    .filter(|c| **c < 0.0)
                    .count();
                assert_eq!(stats.conflicting, conflicting, "seed {seed} {mode:?}");
            }
        }
    }

    #[test]
    fn no_conflict_leaves_the_gradients_untouched_and_projecting_twice_changes_little() {
        // G = Σ z_i B_i with z_i > 0 gives a_i = s z_i e_i ≥ 0: nothing conflicts.
        let mut case = Case::new(11, false);
        let g = (0..case.basis.rank())
            .fold(Mat::zeros(case.a.nrows(), case.b.ncols()), |acc, i| {
                acc + (1.0 + i as f64) * case.basis.direction(i)
            });
        case.g_a = round_f32(&(&g * case.b.transpose()));
        case.g_b = round_f32(&(case.a.transpose() * &g));
        assert!(case.basis.rank() > 0);
        let (g_a, g_b, stats) = case.project(ProjectionMode::ConflictOnly).unwrap();
        assert_eq!(stats.removed, 0);
        assert_eq!(flat(&g_a, &g_b), flat(&case.g_a, &case.g_b));

        let case = (0..)
            .map(|seed| Case::new(seed, false))
            .find(|case| {
                case.project(ProjectionMode::ConflictOnly)
                    .unwrap()
                    .2
                    .removed
                    > 0
            })
            .unwrap();
        let (g_a, g_b, _) = case.project(ProjectionMode::ConflictOnly).unwrap();
        let tol = tolerance(&case);
        let again = Case {
            g_a: g_a.clone(),
            g_b: g_b.clone(),
            ..case
        };
        let (g_a2, g_b2, _) = again.project(ProjectionMode::ConflictOnly).unwrap();
        let err = flat(&g_a, &g_b)
            .iter()
            .zip(flat(&g_a2, &g_b2))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(err <= tol, "{err:e}");
    }

    #[test]
    fn a_non_finite_gradient_passes_the_subspace_solve_untouched() {
        let mut case = Case::new(4, false);
        case.g_b[(0, 0)] = f64::NAN;
        for mode in [ProjectionMode::ColumnSpace, ProjectionMode::RowSpace] {
            let (g_a, g_b, stats) = case.project(mode).unwrap();
            assert!(g_b[(0, 0)].is_nan(), "{mode:?}");
            assert_eq!(stats.removed, 0, "{mode:?}");
            assert_eq!(g_a, case.g_a, "{mode:?}: the gradients pass as they came");
        }
    }

    #[test]
    fn factors_of_the_wrong_shape_are_refused() {
        let case = Case::new(3, false);
        let wrong = Case {
            a: case.a.transpose().to_owned(),
            ..Case::new(3, false)
        };
        if wrong.a.nrows() != case.a.nrows() {
            for mode in ProjectionMode::ALL {
                assert!(matches!(
                    wrong.project(mode),
                    Err(SpfError::ShapeMismatch { .. })
                ));
            }
        }
    }
}
