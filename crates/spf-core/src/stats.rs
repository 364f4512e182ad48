//! [`StepStats`]: what the projection did in one optimizer step, per tensor and in aggregate.

use std::sync::{Arc, Mutex, PoisonError};

use burn::module::ParamId;
use serde::Serialize;

use crate::projection::ProjectionStats;
use crate::refresh::RefreshStats;

/// The projection statistics of one parameter in one step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorStats {
    /// The parameter.
    #[serde(serialize_with = "serialize_param_id")]
    pub param: ParamId,
    /// Its module path.
    pub path: Arc<str>,
    /// What the projection did to its gradient (or update).
    pub stats: ProjectionStats,
}

fn serialize_param_id<S: serde::Serializer>(id: &ParamId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(id.val())
}

/// The statistics of one optimizer step: one projection entry per parameter that had both a
/// basis and a gradient, and the state of the refreshes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StepStats {
    /// The per-tensor statistics, in module order.
    pub tensors: Vec<TensorStats>,
    /// Refresh counts, time, and the overlap between successive bases.
    pub refresh: RefreshStats,
    /// Non-finite gradients seen, this step and in total.
    pub non_finite: NonFiniteStats,
    /// Reads from the device to the host that the step made outside a refresh (each one a
    /// synchronisation on a GPU): the non-finite probe and the statistics share one, and a step
    /// under [`StatsPolicy::Off`](crate::StatsPolicy::Off) and
    /// [`NonFinitePolicy::Unchecked`](crate::NonFinitePolicy::Unchecked) makes none. Extra reads
    /// come only with non-finite gradients, gradients of extreme size (see
    /// [`project`](crate::project)), the `Update` target with both checks on (the probe
    /// precedes the inner step, the statistics follow it), or `ColumnSpace` and `RowSpace` on
    /// LoRA adapters (one, for their solve; see [`projection::lora`](crate::projection::lora)).
    pub host_reads: usize,
}

/// Non-finite gradients met by [`NonFinitePolicy`](crate::NonFinitePolicy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NonFiniteStats {
    /// Parameters whose gradient held NaN or ±Inf in this step.
    pub this_step: usize,
    /// The same, summed over every step since the wrapper was built.
    pub total: usize,
    /// Steps skipped under `SkipStep`.
    pub skipped_steps: usize,
}

impl StepStats {
    fn sum(&self, field: impl Fn(&ProjectionStats) -> usize) -> usize {
        self.tensors.iter().map(|t| field(&t.stats)).sum()
    }

    /// Safety directions over all projected tensors.
    pub fn directions(&self) -> usize {
        self.sum(|s| s.directions)
    }

    /// Directions that conflicted (`c_i < 0`) before projection.
    pub fn conflicting(&self) -> usize {
        self.sum(|s| s.conflicting)
    }

    /// Directions removed.
    pub fn removed(&self) -> usize {
        self.sum(|s| s.removed)
    }

    /// `conflicting / directions`, or 0 when there are no directions.
    pub fn conflict_share(&self) -> f64 {
        match self.directions() {
            0 => 0.0,
            n => self.conflicting() as f64 / n as f64,
        }
    }

    /// `Σ (‖G‖² − ‖G̃‖²) / Σ ‖G‖²` over the projected tensors, or 0 when they carry no energy.
    pub fn removed_energy_share(&self) -> f64 {
        let total: f64 = self.tensors.iter().map(|t| t.stats.grad_energy).sum();
        let removed: f64 = self.tensors.iter().map(|t| t.stats.removed_energy).sum();
        if total > 0.0 { removed / total } else { 0.0 }
    }

    /// The most negative cosine `⟨G, D⟩/(‖G‖‖D‖)` before projection, if any tensor was projected.
    pub fn worst_cosine_before(&self) -> Option<f64> {
        self.tensors
            .iter()
            .map(|t| t.stats.cosine_before)
            .reduce(f64::min)
    }

    /// The most negative cosine `⟨G̃, D⟩/(‖G̃‖‖D‖)` after projection, if any tensor was projected.
    pub fn worst_cosine_after(&self) -> Option<f64> {
        self.tensors
            .iter()
            .map(|t| t.stats.cosine_after)
            .reduce(f64::min)
    }
}

/// A shared view of a wrapper's latest [`StepStats`], for readers that cannot hold the wrapper
/// itself: burn-train's metrics, which only see the model's output, or a logging thread.
///
/// Get one with [`SafetyProjectedOptimizer::stats_feed`](crate::SafetyProjectedOptimizer::stats_feed);
/// every step (and every refused step) publishes to it. Clones of a wrapper share its feed, so a
/// feed taken before the wrapper is handed to burn-train's `Learner` keeps reporting the copy
/// that trains.
#[derive(Debug, Clone, Default)]
pub struct StatsFeed(Arc<Mutex<StepStats>>);

impl StatsFeed {
    /// The statistics of the latest step, or the default (empty) ones before the first.
    pub fn latest(&self) -> StepStats {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn publish(&self, stats: &StepStats) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        slot.clone_from(stats);
    }
}
