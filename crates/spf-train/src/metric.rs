//! [`SpfMetric`]: one projection statistic as a burn-train numeric metric.

use std::sync::Arc;

use burn::tensor::TensorReadError;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes, NumericEntry,
    SerializedEntry,
};
use spf_core::{StatsFeed, StepStats};

/// A statistic of the wrapper's latest step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpfStatistic {
    /// The share of safety directions with `c_i < 0` before projection,
    /// [`StepStats::conflict_share`], in percent.
    ConflictShare,
    /// `1 − ‖G̃‖²/‖G‖²` over all protected tensors, [`StepStats::removed_energy_share`], in
    /// percent.
    RemovedEnergyShare,
    /// Successful refreshes of the bases since the wrapper was built.
    Refreshes,
}

impl SpfStatistic {
    fn name(self) -> &'static str {
        match self {
            Self::ConflictShare => "SPF conflicting directions",
            Self::RemovedEnergyShare => "SPF removed energy",
            Self::Refreshes => "SPF refreshes",
        }
    }

    fn unit(self) -> Option<&'static str> {
        match self {
            Self::ConflictShare | Self::RemovedEnergyShare => Some("%"),
            Self::Refreshes => None,
        }
    }

    /// Its value in `stats`.
    pub fn of(self, stats: &StepStats) -> f64 {
        match self {
            Self::ConflictShare => 100.0 * stats.conflict_share(),
            Self::RemovedEnergyShare => 100.0 * stats.removed_energy_share(),
            Self::Refreshes => stats.refresh.count as f64,
        }
    }
}

/// One [`SpfStatistic`] of the wrapper that publishes to `feed`, as a numeric burn-train metric.
///
/// Its input is `()`, which burn-train adapts from every model output, so it registers with
/// `metric_train_numeric` whatever the model returns. burn-train updates training metrics after
/// the optimizer step of the same batch, so each value is that step's.
#[derive(Clone)]
pub struct SpfMetric {
    statistic: SpfStatistic,
    feed: StatsFeed,
    name: MetricName,
    state: NumericMetricState,
}

impl SpfMetric {
    /// The metric of `statistic`, read from `feed` ([`Protected::stats_feed`](crate::Protected::stats_feed),
    /// or [`SafetyProjectedOptimizer::stats_feed`](spf_core::SafetyProjectedOptimizer::stats_feed)).
    pub fn new(statistic: SpfStatistic, feed: StatsFeed) -> Self {
        Self {
            statistic,
            feed,
            name: Arc::new(statistic.name().to_string()),
            state: NumericMetricState::new(),
        }
    }
}

impl Metric for SpfMetric {
    type Input = ();

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: self.statistic.unit().map(str::to_string),
            higher_is_better: false,
        }
        .into()
    }

    fn update(
        &mut self,
        _item: &(),
        _metadata: &MetricMetadata,
    ) -> Result<SerializedEntry, TensorReadError> {
        self.state.update(self.statistic.of(&self.feed.latest()), 1);
        Ok(self.state.compute_update(self.format()))
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        Ok(self.state.compute_final(self.format()))
    }

    fn clear(&mut self) {
        self.state.reset();
    }
}

impl SpfMetric {
    /// How its entries are written: two decimals, and the statistic's unit.
    fn format(&self) -> FormatOptions {
        let format = FormatOptions::new(self.name()).precision(2);
        match self.statistic.unit() {
            Some(unit) => format.unit(unit),
            None => format,
        }
    }
}

impl Numeric for SpfMetric {
    fn value(&self) -> Option<NumericEntry> {
        Some(self.state.current_value())
    }

    fn running_value(&self) -> Option<NumericEntry> {
        Some(self.state.running_value())
    }

    fn final_value(&self) -> NumericEntry {
        self.state.final_value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::ParamId;
    use spf_core::{ProjectionStats, TensorStats};

    fn tensor(directions: usize, conflicting: usize, energy: f64, removed: f64) -> TensorStats {
        TensorStats {
            param: ParamId::new(),
            path: "w".into(),
            stats: ProjectionStats {
                directions,
                conflicting,
                removed: conflicting,
                grad_energy: energy,
                removed_energy: removed,
                ..ProjectionStats::default()
            },
        }
    }

    #[test]
    fn statistics_are_read_from_the_latest_step_in_percent() {
        let mut stats = StepStats {
            tensors: vec![tensor(8, 2, 3.0, 0.5), tensor(4, 4, 1.0, 0.5)],
            ..StepStats::default()
        };
        stats.refresh.count = 7;
        assert_eq!(SpfStatistic::ConflictShare.of(&stats), 50.0);
        assert_eq!(SpfStatistic::RemovedEnergyShare.of(&stats), 25.0);
        assert_eq!(SpfStatistic::Refreshes.of(&stats), 7.0);
        assert_eq!(SpfStatistic::ConflictShare.of(&StepStats::default()), 0.0);
    }
}
