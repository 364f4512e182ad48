//! Every sample's screen score from one backward pass of the batch, for weights used as linear
//! maps.
//!
//! For a weight used as `y = x W` (`W: [d_in, d_out]`, burn's layout) on the `T` positions of
//! each sample, sample `i`'s gradient is `G_i = Σ_t x_{i,t}ᵀ δ_{i,t}`, with `x_{i,t}` the
//! weight's input and `δ_{i,t} = ∂L_i/∂y_{i,t}` the gradient at its output. When the batch's loss
//! is the sum of the samples' (or their mean: the score is a share, so a common factor cancels)
//! and no layer mixes samples, the batch's backward pass holds every `δ_{i,t}`, and what the
//! score needs follows without forming any `G_i`, as in the per-example gradient norms of
//! differentially private training:
//!
//! ```text
//! ‖G_i‖²     = Σ_{t,t'} (x_t·x_t')(δ_t·δ_t')              = ⟨X Xᵀ, Δ Δᵀ⟩      ([T, T] Gram matrices)
//! c_{i,j}    = u_jᵀ G_i v_j = Σ_t (x_t·u_j)(δ_t·v_j)       = colsum((X U) ⊙ (Δ V))
//! ‖UᵀG_i‖²   = ⟨(X U)(X U)ᵀ, Δ Δᵀ⟩,    ‖G_i V‖² = ⟨X Xᵀ, (Δ V)(Δ V)ᵀ⟩
//! ```
//!
//! and the energy each mode removes is, as in the optimizer's statistics:
//! `Σ_j min(c_j, 0)²` (ConflictOnly), `Σ_j c_j²` (Orthogonal), `‖UᵀG‖²` (ColumnSpace), `‖G V‖²`
//! (RowSpace), `min(Σ σ_j c_j, 0)² / Σ σ_j²` (Pcgrad). The cost is `O(N T² (d_in + d_out) +
//! N T k (d_in + d_out))` on the device and one read of `2N` numbers, against one backward pass
//! per sample for [`SampleScreen::score`](super::SampleScreen::score), which stays the reference.
//!
//! burn's autodiff keeps the gradients of leaves only, so a [`LinearTap`] adds a zero leaf to the
//! layer's output: its gradient is `δ`. The forward pass must route each protected weight
//! through a tap; a weight with a basis but without a trace is an error, since its share would be
//! missing from every score.

use std::collections::HashMap;

use burn::module::{Param, ParamId};
use burn::nn::Linear;
use burn::tensor::{Gradients, Tensor};
use spf_subspace::LowRankBasis;

use crate::error::SpfError;
use crate::host;
use crate::projection::ProjectionMode;

/// A weight's use as a linear map in a forward pass, recorded so that its per-sample gradients
/// can be scored after the batch's backward pass.
#[derive(Debug, Clone)]
pub struct LinearTap {
    weight: ParamId,
    /// `x`, `[N, T, d_in]`, without autodiff.
    input: Tensor<3>,
    /// The zero leaf added to the output, whose gradient is `δ`.
    probe: Tensor<3>,
}

/// A tapped weight after the backward pass: its inputs and output gradients, `[N, T, d_in]` and
/// `[N, T, d_out]`.
#[derive(Debug, Clone)]
pub struct LinearTrace {
    /// The weight's id.
    pub weight: ParamId,
    /// `x`.
    pub input: Tensor<3>,
    /// `δ = ∂L/∂y`.
    pub output_grad: Tensor<3>,
}

impl LinearTap {
    /// Taps `output`, computed from `input: [N, T, d_in]` as `input · weight (+ bias)`: returns the
    /// output to continue the forward pass with (the same values) and the tap.
    pub fn new(
        weight: &Param<Tensor<2>>,
        input: &Tensor<3>,
        output: Tensor<3>,
    ) -> (Tensor<3>, Self) {
        let probe = output.zeros_like().require_grad();
        let tap = Self {
            weight: weight.id,
            input: input.clone().inner(),
            probe: probe.clone(),
        };
        (output + probe, tap)
    }

    /// `linear.forward(input)`, tapped.
    pub fn linear(linear: &Linear, input: Tensor<3>) -> (Tensor<3>, Self) {
        let output = linear.forward(input.clone());
        Self::new(&linear.weight, &input, output)
    }

    /// The trace, from the gradients of the batch's backward pass; `None` when the output took
    /// no part in the loss.
    pub fn trace(&self, grads: &Gradients) -> Option<LinearTrace> {
        Some(LinearTrace {
            weight: self.weight,
            input: self.input.clone(),
            output_grad: self.probe.grad(grads)?,
        })
    }
}

/// Every sample's score (the share of its gradient's energy that `mode`'s projection against
/// `bases` removes, see [`SampleScreen`](super::SampleScreen)) from the `traces` of one batch;
/// traces of weights without a basis add nothing. One read.
///
/// # Errors
///
/// [`SpfError::UntracedWeights`] when a weight with a basis has no trace;
/// [`SpfError::ShapeMismatch`] when a trace does not fit its basis or the batch.
pub fn traced_scores(
    traces: &[LinearTrace],
    bases: &HashMap<ParamId, LowRankBasis>,
    mode: ProjectionMode,
) -> Result<Vec<f64>, SpfError> {
    let untraced = (bases.keys())
        .filter(|id| !traces.iter().any(|t| t.weight == **id))
        .count();
    if untraced > 0 {
        return Err(SpfError::UntracedWeights { count: untraced });
    }
    let Some(first) = traces.first() else {
        return Ok(Vec::new());
    };
    let n = first.input.dims()[0];
    let mut removed: Option<Tensor<1>> = None;
    let mut energy: Option<Tensor<1>> = None;
    for trace in traces {
        let Some(basis) = bases.get(&trace.weight) else {
            continue;
        };
        check(trace, basis, n)?;
        let device = trace.input.device();
        let basis = basis.clone().to_device(&device);
        let (r, e) = sample_energies(trace, &basis, mode);
        removed = Some(removed.map_or(r.clone(), |sum| sum + r));
        energy = Some(energy.map_or(e.clone(), |sum| sum + e));
    }
    let (Some(removed), Some(energy)) = (removed, energy) else {
        return Ok(vec![0.0; n]);
    };
    let host = host::read(vec![removed, energy]);
    let (removed, energy) = host.split_at(n);
    Ok(removed
        .iter()
        .zip(energy)
        .map(|(r, e)| {
            if *e > 0.0 {
                (r / e).clamp(0.0, 1.0)
            } else {
                0.0
            }
        })
        .collect())
}

fn check(trace: &LinearTrace, basis: &LowRankBasis, n: usize) -> Result<(), SpfError> {
    let [n_x, t_x, d_in] = trace.input.dims();
    let expected = [n, t_x, basis.d_out()];
    let found = trace.output_grad.dims();
    let mismatch = |expected: Vec<usize>, found: Vec<usize>| SpfError::ShapeMismatch {
        path: None,
        expected,
        found,
    };
    if n_x != n || d_in != basis.d_in() {
        return Err(mismatch(vec![n, t_x, basis.d_in()], vec![n_x, t_x, d_in]));
    }
    if found != expected {
        return Err(mismatch(expected.to_vec(), found.to_vec()));
    }
    Ok(())
}

/// The energy `mode` removes from each sample's gradient of one weight, and that gradient's
/// energy, both `[N]` (see the module docs).
fn sample_energies(
    trace: &LinearTrace,
    basis: &LowRankBasis,
    mode: ProjectionMode,
) -> (Tensor<1>, Tensor<1>) {
    let [n, t, d_in] = trace.input.dims();
    let d_out = basis.d_out();
    let k = basis.rank();
    let x = trace.input.clone();
    let delta = trace.output_grad.clone();
    let gram = |m: &Tensor<3>| m.clone().matmul(m.clone().swap_dims(1, 2));
    let pair_sum = |a: Tensor<3>, b: Tensor<3>| (a * b).sum_dim(2).sum_dim(1).reshape([n]);
    let (x_gram, delta_gram) = (gram(&x), gram(&delta));
    let energy = pair_sum(x_gram.clone(), delta_gram.clone());
    if k == 0 {
        return (energy.zeros_like(), energy);
    }
    let xu = x
        .reshape([n * t, d_in])
        .matmul(basis.u().clone())
        .reshape([n, t, k]);
    let dv = (delta.reshape([n * t, d_out]))
        .matmul(basis.v().clone())
        .reshape([n, t, k]);
    let c = || (xu.clone() * dv.clone()).sum_dim(1).reshape([n, k]);
    let removed = match mode {
        ProjectionMode::ConflictOnly => c().clamp_max(0.0).square().sum_dim(1).reshape([n]),
        ProjectionMode::Orthogonal => c().square().sum_dim(1).reshape([n]),
        ProjectionMode::ColumnSpace => pair_sum(gram(&xu), delta_gram),
        ProjectionMode::RowSpace => pair_sum(x_gram, gram(&dv)),
        ProjectionMode::Pcgrad => {
            let sigma = basis.sigma().clone();
            let d_energy = sigma.clone().square().sum();
            let dot = (c() * sigma.reshape([1, k])).sum_dim(1).reshape([n]);
            dot.clamp_max(0.0).square() / d_energy
        }
    };
    (removed, energy)
}
