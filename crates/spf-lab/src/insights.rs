//! The paper's three insights, measured on the lab's model:
//!
//! 1. **Low rank.** `CER(k) = Σ_{i≤k} σ_i² / ‖G‖_F²` of each weight matrix's safety gradient
//!    against its utility gradient: a low-rank gradient reaches a high `CER` at small `k`.
//! 2. **Conflict.** The cosine `⟨G_s, G_u⟩ / (‖G_s‖‖G_u‖)` between the safety and the utility
//!    gradient over all weight matrices together, along a plain fine-tuning run: a negative
//!    cosine means a descent step on the task raises the safety loss.
//! 3. **One sample suffices.** The overlap `‖U₁ᵀU_b‖_F² / k` between the rank-`k` left subspace
//!    of one safety sample's gradient and that of a batch's.
//!
//! Every quantity is averaged over the weight matrices (the parameters of rank 2).

use std::collections::HashMap;

use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use spf_subspace::{
    ParamFilter, RandomizedSvd, RandomizedSvdConfig, Targets, VectorPolicy, captured_energy,
    subspace_overlap,
};

use crate::batch::{Batch, answer_loss};
use crate::error::LabError;
use crate::model::Transformer;

/// Every weight matrix of `model` (every parameter of rank 2).
fn matrices(model: &Transformer) -> Result<Targets, LabError> {
    Ok(Targets::of(model, &ParamFilter::All, VectorPolicy::Skip)?)
}

/// The cosine between two gradients of `model` over all its weight matrices together (0 when
/// either is zero). A matrix missing from one of them counts as a zero gradient there.
///
/// # Errors
///
/// [`LabError::Subspace`] only if the module's parameters cannot be walked.
pub fn gradient_cosine(
    model: &Transformer,
    a: &GradientsParams,
    b: &GradientsParams,
) -> Result<f64, LabError> {
    let targets = matrices(model)?;
    let scalar = |t: Tensor<2>| -> f64 { t.sum().into_scalar::<f64>() };
    let gb: HashMap<_, _> = targets.gradients(model, b).into_iter().collect();
    let nb: f64 = gb.values().map(|y| scalar(y.clone().square())).sum();
    let (mut dot, mut na) = (0.0, 0.0);
    for (id, x) in targets.gradients(model, a) {
        if let Some(y) = gb.get(&id) {
            dot += scalar(x.clone() * y.clone());
        }
        na += scalar(x.square());
    }
    let norm = (na * nb).sqrt();
    Ok(if norm > 0.0 { dot / norm } else { 0.0 })
}

/// The insights measured at one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Insights {
    /// The ranks `k` of the `CER` columns.
    pub ranks: Vec<usize>,
    /// Mean `CER(k)` of one safety sample's gradient, per rank.
    pub safety_cer: Vec<f64>,
    /// Mean `CER(k)` of a safety batch's gradient, per rank.
    pub safety_batch_cer: Vec<f64>,
    /// Mean `CER(k)` of a utility batch's gradient, per rank.
    pub utility_cer: Vec<f64>,
    /// Mean left-subspace overlap between one sample's and the batch's rank-`k` bases, per rank.
    pub overlap_left: Vec<f64>,
    /// The same for the right subspaces.
    pub overlap_right: Vec<f64>,
}

/// Measures insights 1 and 3 at `model`: the `CER` of one safety sample's, a safety batch's and
/// a utility batch's gradient, and the overlap of the one-sample and batch subspaces, at each
/// rank of `ranks`.
///
/// # Errors
///
/// [`LabError::Subspace`] when a randomized SVD fails.
pub fn measure(
    model: &Transformer,
    safety_sample: &Batch,
    safety_batch: &Batch,
    utility_batch: &Batch,
    ranks: &[usize],
) -> Result<Insights, LabError> {
    let targets = matrices(model)?;
    let grads = |batch: &Batch| -> Vec<Tensor<2>> {
        let g = GradientsParams::from_grads(answer_loss(model, batch).backward(), model);
        let found = targets.gradients(model, &g);
        found.into_iter().map(|(_, g)| g).collect()
    };
    let (one, many, utility) = (
        grads(safety_sample),
        grads(safety_batch),
        grads(utility_batch),
    );
    let k_max = ranks.iter().copied().max().unwrap_or(0);
    let svd = RandomizedSvd::new(RandomizedSvdConfig::new(k_max));
    let mut insights = Insights {
        ranks: ranks.to_vec(),
        safety_cer: vec![0.0; ranks.len()],
        safety_batch_cer: vec![0.0; ranks.len()],
        utility_cer: vec![0.0; ranks.len()],
        overlap_left: vec![0.0; ranks.len()],
        overlap_right: vec![0.0; ranks.len()],
    };
    let count = one.len().max(1) as f64;
    for ((g1, gb), gu) in one.iter().zip(&many).zip(&utility) {
        let b1 = svd.compute(g1)?;
        let bb = svd.compute(gb)?;
        let bu = svd.compute(gu)?;
        let energy = |g: &Tensor<2>| -> f64 { g.clone().square().sum().into_scalar::<f64>() };
        let (e1, eb, eu) = (energy(g1), energy(gb), energy(gu));
        for (i, &k) in ranks.iter().enumerate() {
            let head = |s: &[f64]| s[..k.min(s.len())].to_vec();
            insights.safety_cer[i] += captured_energy(&head(b1.singular_values()), e1) / count;
            insights.safety_batch_cer[i] +=
                captured_energy(&head(bb.singular_values()), eb) / count;
            insights.utility_cer[i] += captured_energy(&head(bu.singular_values()), eu) / count;
            let (t1, tb) = (b1.clone().truncate(k), bb.clone().truncate(k));
            insights.overlap_left[i] += subspace_overlap(t1.u(), tb.u())? / count;
            insights.overlap_right[i] += subspace_overlap(t1.v(), tb.v())? / count;
        }
    }
    Ok(insights)
}
