//! [`State`]: everything a [`SafetyProjectedOptimizer`](crate::SafetyProjectedOptimizer) holds
//! besides the inner optimizer and the safety source, and how it starts. Its conversion to and
//! from [`SpfRecord`](crate::SpfRecord) is in `record.rs`, beside the record.

use std::sync::Arc;

use burn::module::{Module, ParamId};
use spf_subspace::{LowRankBasis, Targets};

use crate::bases::{ProtectedBases, admit};
use crate::config::SpfConfig;
use crate::error::SpfError;
use crate::refresh::RefreshState;
use crate::stats::{NonFiniteStats, StatsFeed, StepStats};

/// Everything the wrapper holds besides the inner optimizer and the safety source.
#[derive(Clone)]
pub(crate) struct State {
    pub(crate) config: SpfConfig,
    pub(crate) targets: Arc<Targets>,
    pub(crate) bases: ProtectedBases,
    pub(crate) steps: usize,
    pub(crate) refresh: RefreshState,
    pub(crate) non_finite: NonFiniteStats,
    pub(crate) last_stats: StepStats,
    pub(crate) feed: StatsFeed,
}

impl State {
    /// The state of a wrapper configured by `config` for `module`, protecting it with `bases`.
    ///
    /// # Errors
    ///
    /// As [`SpfConfig::init`].
    pub(crate) fn new<M: Module>(
        config: &SpfConfig,
        module: &M,
        bases: impl IntoIterator<Item = (ParamId, LowRankBasis)>,
    ) -> Result<Self, SpfError> {
        let estimator = &config.estimator;
        let targets = Targets::of(module, &estimator.filter, estimator.vector_policy)?;
        let bases = admit(&targets, estimator.rank.max_rank(), bases)?;
        let mut refresh = RefreshState::new(&config.refresh);
        if !bases.is_empty() {
            refresh = refresh.estimated_at(0);
        }
        let mut protected = ProtectedBases::default();
        protected.extend(bases);
        Ok(Self {
            config: config.clone(),
            targets: Arc::new(targets),
            bases: protected,
            steps: 0,
            refresh,
            non_finite: NonFiniteStats::default(),
            last_stats: StepStats::default(),
            feed: StatsFeed::default(),
        })
    }
}
