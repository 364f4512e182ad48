//! What every fine-tuning run shares, in the lab (`spf-lab`) and on the real model (`spf-llm`):
//! the optimizer of a method, plain AdamW or AdamW wrapped by SPF ([`Stepper`]), the order of
//! the batches ([`BatchOrder`]), and what the projection did over a run ([`ProjectionSummary`]).

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer, MultiGradientsParams};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use spf_core::{SafetyGradientSource, SafetyProjectedOptimizer, SpfConfig, SpfError};
use spf_subspace::{SafetySubspace, SubspaceError};

/// The optimizer of one run: plain AdamW (SFT, and the data baselines), or AdamW wrapped by SPF
/// with its bases estimated from, and refreshed by, a safety source `S`.
pub enum Stepper<S> {
    /// Plain AdamW (burn's defaults).
    Plain(ModuleOptimizer),
    /// AdamW under SPF, and the running sums of its projection statistics.
    Spf {
        /// The wrapper.
        optim: Box<SafetyProjectedOptimizer<S>>,
        /// Sums over the steps so far.
        sums: ProjectionSummary,
        /// Steps taken.
        steps: usize,
    },
}

impl<S> Stepper<S> {
    /// Plain AdamW.
    pub fn plain() -> Self {
        Self::Plain(AdamWConfig::new().init())
    }

    /// AdamW under SPF as `config` says, its bases estimated at `model` from `source`'s safety
    /// gradient with `config.estimator`, and refreshed from `source`. A weight trained through
    /// LoRA adapters is estimated from the gradient of the effective weight, as the wrapper's
    /// refresh does ([`spf_core::require_lora_base_gradients`]).
    ///
    /// # Errors
    ///
    /// The caller's error `E` made from the [`SpfError`] when the source fails or the wrapper
    /// rejects the bases, or from the [`SubspaceError`] when the estimate fails.
    pub fn spf<M, E>(config: &SpfConfig, model: &M, mut source: S) -> Result<Self, E>
    where
        M: Module,
        S: SafetyGradientSource<M>,
        E: From<SpfError> + From<SubspaceError>,
    {
        let probe = spf_core::require_lora_base_gradients(model);
        let grads = source
            .safety_gradients(&probe)
            .map_err(|err| SpfError::SafetySource(err.to_string()))?;
        let subspace = SafetySubspace::estimate(&probe, &grads, &config.estimator)?;
        let optim = config
            .init(AdamWConfig::new().build(), model, subspace)?
            .with_safety_source(source);
        Ok(Self::Spf {
            optim: Box::new(optim),
            sums: ProjectionSummary::default(),
            steps: 0,
        })
    }

    /// One step at learning rate `lr`.
    ///
    /// # Errors
    ///
    /// The [`SpfError`] with which the wrapper refuses the step (a non-finite gradient, say).
    pub fn step<M>(&mut self, lr: f64, model: M, grads: GradientsParams) -> Result<M, SpfError>
    where
        M: Module,
        S: SafetyGradientSource<M>,
    {
        match self {
            Self::Plain(optim) => Ok(optim.step(lr, model, grads)),
            Self::Spf { optim, sums, steps } => {
                let model = optim.try_step(lr, model, grads).map_err(|e| e.error)?;
                sums.add(optim.last_stats());
                *steps += 1;
                Ok(model)
            }
        }
    }

    /// One step at learning rate `lr` on gradients from several devices (burn-train's
    /// multi-device strategy): burn sums each parameter's gradients on one device, and the step
    /// is [`Self::step`] on the sum.
    ///
    /// # Errors
    ///
    /// As [`Self::step`].
    pub fn step_multi<M>(
        &mut self,
        lr: f64,
        model: M,
        grads: MultiGradientsParams,
    ) -> Result<M, SpfError>
    where
        M: Module,
        S: SafetyGradientSource<M>,
    {
        match self {
            Self::Plain(optim) => Ok(optim.step_multi(lr, model, grads)),
            Self::Spf { optim, sums, steps } => {
                let model = optim
                    .try_step_multi(lr, model, grads)
                    .map_err(|e| e.error)?;
                sums.add(optim.last_stats());
                *steps += 1;
                Ok(model)
            }
        }
    }

    /// What the projection did over the steps so far (means over steps), or `None` for plain
    /// AdamW.
    pub fn summary(&self) -> Option<ProjectionSummary> {
        match self {
            Self::Plain(_) => None,
            Self::Spf { sums, steps, .. } => {
                let n = (*steps).max(1) as f64;
                Some(ProjectionSummary {
                    conflict_share: sums.conflict_share / n,
                    removed_energy_share: sums.removed_energy_share / n,
                    ..*sums
                })
            }
        }
    }
}

/// What the SPF wrapper did over a run.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ProjectionSummary {
    /// The mean over steps of the share of safety directions with `c_i < 0`.
    pub conflict_share: f64,
    /// The mean over steps of the share of gradient energy removed.
    pub removed_energy_share: f64,
    /// Successful refreshes.
    pub refreshes: usize,
    /// Failed refreshes.
    pub refresh_failures: usize,
}

impl ProjectionSummary {
    /// Adds one step's statistics to the sums (the refresh counts are running totals already).
    fn add(&mut self, stats: &spf_core::StepStats) {
        self.conflict_share += stats.conflict_share();
        self.removed_energy_share += stats.removed_energy_share();
        self.refreshes = stats.refresh.count;
        self.refresh_failures = stats.refresh.failures;
    }
}

/// Epochs over a set of `len` examples in batches of `batch_size`, the order shuffled afresh
/// (from the previous epoch's order) at the start of each epoch; an epoch's last partial batch
/// is dropped, so every batch has the same size.
#[derive(Debug, Clone)]
pub struct BatchOrder {
    order: Vec<usize>,
    at: usize,
    batch_size: usize,
}

impl BatchOrder {
    /// The order over `len` examples; `batch_size` is clamped to `1..=len`.
    pub fn new(len: usize, batch_size: usize) -> Self {
        Self {
            order: (0..len).collect(),
            at: len,
            batch_size: batch_size.clamp(1, len.max(1)),
        }
    }

    /// The indices of the next batch (empty for an empty set).
    pub fn next(&mut self, rng: &mut StdRng) -> Vec<usize> {
        if self.at + self.batch_size > self.order.len() {
            self.order.shuffle(rng);
            self.at = 0;
        }
        let end = (self.at + self.batch_size).min(self.order.len());
        let batch = self.order[self.at..end].to_vec();
        self.at = end;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn batch_order_covers_each_epoch_once_and_drops_the_partial_batch() {
        let mut order = BatchOrder::new(10, 3);
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..4 {
            let epoch: Vec<usize> = (0..3).flat_map(|_| order.next(&mut rng)).collect();
            let mut seen = epoch.clone();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), 9, "nine distinct examples per epoch: {epoch:?}");
        }
        assert_eq!(order.next(&mut rng).len(), 3);
        assert!(BatchOrder::new(0, 4).next(&mut rng).is_empty());
        assert_eq!(BatchOrder::new(2, 5).next(&mut rng).len(), 2);
    }
}
