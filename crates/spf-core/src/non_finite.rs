//! The [`NonFinitePolicy`] applied to a step: which probed gradients are not finite, what the
//! policy does about them, and the outcome of a step it ends.

use burn::module::Module;
use burn::optim::GradientsParams;

use crate::config::NonFinitePolicy;
use crate::error::{SpfError, StepError};
use crate::state::State;
use crate::stats::{StepStats, TensorStats};
use crate::visitors::{Probes, non_finite_among, path_of, zero_non_finite};

impl State {
    /// Finds the non-finite gradients among the suspects of `probes` (read back as `values`),
    /// counts them and applies the [`NonFinitePolicy`]: `None` to go on stepping (on zeroed
    /// gradients under `ZeroNonFinite`), or the step's outcome: `Ok` for a skipped step, the
    /// error under `Error`.
    pub(crate) fn on_non_finite<M: Module>(
        &mut self,
        probes: &Probes,
        values: &[f64],
        module: &M,
        grads: &mut GradientsParams,
    ) -> Option<Result<(), SpfError>> {
        let bad = non_finite_among(module, grads, &probes.suspects(values));
        self.non_finite.this_step = bad.len();
        self.non_finite.total += bad.len();
        if bad.is_empty() {
            return None;
        }
        self.refresh.counts.refreshed = false;
        match self.config.non_finite {
            NonFinitePolicy::Error => {
                self.publish(Vec::new());
                let paths = bad
                    .iter()
                    .map(|id| path_of(&self.targets, *id).to_string())
                    .collect();
                Some(Err(SpfError::NonFiniteGradient { paths }))
            }
            NonFinitePolicy::SkipStep => {
                self.non_finite.skipped_steps += 1;
                self.publish(Vec::new());
                Some(Ok(()))
            }
            NonFinitePolicy::ZeroNonFinite => {
                zero_non_finite(module, grads, &bad);
                None
            }
            // Not probed, so never reached.
            NonFinitePolicy::Unchecked => None,
        }
    }

    /// Records the statistics of a step that projected `tensors` (none for a refused step);
    /// [`SafetyProjectedOptimizer::try_step`](crate::SafetyProjectedOptimizer::try_step) adds the count of host reads and publishes them to the feed.
    pub(crate) fn publish(&mut self, tensors: Vec<TensorStats>) {
        self.last_stats = StepStats {
            tensors,
            refresh: self.refresh.stats(),
            non_finite: self.non_finite,
            host_reads: 0,
        };
    }
}

/// The outcome of a step that the [`NonFinitePolicy`] ended before the inner step: the module
/// back as it was, with the policy's error or as a skipped step.
pub(crate) fn ended<M>(outcome: Result<(), SpfError>, module: M) -> Result<M, StepError<M>> {
    match outcome {
        Ok(()) => Ok(module),
        Err(error) => Err(StepError { module, error }),
    }
}
