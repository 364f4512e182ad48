//! [`SpfRecord`]: the wrapper's saved state, versioned, and the conversion of the wrapper's
//! state to it and back (checked before anything changes). Its file format, burnpack, is in
//! `record/pack.rs`.

use std::collections::HashMap;
use std::sync::Arc;

use burn::module::ParamId;
use burn::optim::OptimizerRecord;
use burn::tensor::{Device, Tensor, TensorData};
use spf_subspace::SubspaceError;
use spf_subspace::{LowRankBasis, Targets};

use crate::bases::{Admitted, ProtectedBases, admit};
use crate::error::SpfError;
use crate::refresh::{RefreshState, RefreshStats};
use crate::state::State;
use crate::stats::NonFiniteStats;

pub(crate) mod pack;

/// The record format this build writes and reads.
///
/// Version 4 is the first on burn 0.22: a burnpack file (burn 0.22's own format) holding the
/// inner optimizer's burnpack record. Files of versions up to 3 (burn 0.21's MessagePack) are
/// refused with [`SpfError::Checkpoint`](crate::SpfError::Checkpoint), since they are not
/// burnpack.
pub const RECORD_VERSION: u32 = 4;

/// The saved state of a [`SafetyProjectedOptimizer`](crate::SafetyProjectedOptimizer): the inner
/// optimizer's record, every basis keyed by parameter id, the step counter and the refresh state.
///
/// Parameter ids are those of the module the wrapper was built for, so save the module's record
/// together with this one. The record also maps every parameter id to its module path, so a
/// wrapper built for a fresh copy of the same architecture (new ids) can load it and adopt the
/// saved ids, which the module takes on when its own record is loaded: this is what resuming
/// from burn-train's checkpoints does.
///
/// Like burn 0.22's own records it holds host data ([`TensorData`]), not tensors on a device:
/// the bases move to the parameters' device at the first step after loading.
#[derive(Debug)]
pub struct SpfRecord {
    /// [`RECORD_VERSION`] at the time of saving.
    pub version: u32,
    /// The inner optimizer's record.
    pub inner: OptimizerRecord,
    /// Every float parameter of the module: its id and module path, sorted by id.
    pub params: Vec<ParamPath>,
    /// Optimizer steps taken.
    pub steps: usize,
    /// One entry per basis, sorted by parameter id.
    pub bases: Vec<BasisRecord>,
    /// Successful refreshes so far: the random state of the refresh sketches.
    pub refreshes: usize,
    /// Failed refreshes so far.
    pub refresh_failures: usize,
    /// The step at which the current bases were estimated.
    pub refresh_since: Option<usize>,
    /// The refresh period when saved (`None` when refresh was off). A wrapper that loads the
    /// record follows its own policy; under `Adaptive` it resumes this period within its bounds.
    pub refresh_period: Option<usize>,
    /// The mean overlap of the last refresh's bases with the ones they replaced.
    pub refresh_last_overlap: Option<f64>,
    /// The error of the last failed refresh.
    pub refresh_last_error: Option<String>,
    /// Non-finite gradients met over every step so far.
    pub non_finite_total: usize,
    /// Steps skipped under `NonFinitePolicy::SkipStep`.
    pub skipped_steps: usize,
}

/// The saved factors of one [`LowRankBasis`](spf_subspace::LowRankBasis).
#[derive(Debug, Clone)]
pub struct BasisRecord {
    /// The parameter's id, [`ParamId::val`](burn::module::ParamId::val).
    pub param: u64,
    /// `U: [d_in, k]`.
    pub u: TensorData,
    /// `σ: [k]`.
    pub sigma: TensorData,
    /// `V: [d_out, k]`.
    pub v: TensorData,
}

/// A parameter id and the module path it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamPath {
    /// [`ParamId::val`](burn::module::ParamId::val).
    pub param: u64,
    /// The `.`-joined module path, as in [`Targets`](spf_subspace::Targets).
    pub path: String,
}

impl State {
    /// The record of this state, holding the inner optimizer's record `inner`.
    pub(crate) fn to_record(&self, inner: OptimizerRecord) -> SpfRecord {
        SpfRecord {
            bases: basis_records(&self.bases),
            ..self.to_record_without_bases(inner)
        }
    }

    /// [`Self::to_record`] with no bases: the counters and the parameter paths, read from the
    /// host alone (the bases' factors would each be read from the device).
    pub(crate) fn to_record_without_bases(&self, inner: OptimizerRecord) -> SpfRecord {
        SpfRecord {
            version: RECORD_VERSION,
            inner,
            params: param_paths(&self.targets),
            steps: self.steps,
            bases: Vec::new(),
            refreshes: self.refresh.counts.count,
            refresh_failures: self.refresh.counts.failures,
            refresh_since: self.refresh.since,
            refresh_period: self.refresh.counts.period,
            refresh_last_overlap: self.refresh.counts.last_overlap,
            refresh_last_error: self.refresh.counts.last_error.clone(),
            non_finite_total: self.non_finite.total,
            skipped_steps: self.non_finite.skipped_steps,
        }
    }

    /// Restores `record` into this state and returns the inner optimizer's record. The refresh
    /// period follows this state's own policy (see
    /// [`RefreshPolicy::resumed_period`](crate::RefreshPolicy)).
    ///
    /// # Errors
    ///
    /// As [`SafetyProjectedOptimizer::try_load_record`](crate::SafetyProjectedOptimizer::try_load_record);
    /// everything is checked before anything changes, so on error the state is as it was.
    pub(crate) fn restore(&mut self, record: SpfRecord) -> Result<OptimizerRecord, SpfError> {
        let (targets, bases) = self.checked(&record)?;
        self.targets = targets;
        self.bases.replace(bases);
        self.steps = record.steps;
        self.refresh = RefreshState {
            counts: RefreshStats {
                count: record.refreshes,
                failures: record.refresh_failures,
                last_overlap: record.refresh_last_overlap,
                last_error: record.refresh_last_error,
                period: self.config.refresh.resumed_period(record.refresh_period),
                ..RefreshStats::default()
            },
            since: record.refresh_since,
        };
        self.non_finite = NonFiniteStats {
            this_step: 0,
            total: record.non_finite_total,
            skipped_steps: record.skipped_steps,
        };
        Ok(record.inner)
    }

    /// The targets (re-keyed to the record's ids where they differ) and the admitted bases of
    /// `record`, checked against this state; nothing is changed.
    fn checked(&self, record: &SpfRecord) -> Result<(Arc<Targets>, Admitted), SpfError> {
        if record.version != RECORD_VERSION {
            return Err(SpfError::UnsupportedRecordVersion {
                found: record.version,
                supported: RECORD_VERSION,
            });
        }
        let targets = match rekeyed(&self.targets, &record.params)? {
            Some(targets) => Arc::new(targets),
            None => self.targets.clone(),
        };
        let max_rank = self.config.estimator.rank.max_rank();
        let bases = saved_bases(&record.bases, &targets, max_rank, &Device::default())?;
        Ok((targets, bases))
    }
}

/// Every basis as a record, sorted by parameter id.
fn basis_records(bases: &ProtectedBases) -> Vec<BasisRecord> {
    let mut records: Vec<_> = bases
        .iter()
        .map(|(id, basis)| {
            let (u, sigma, v) = basis.clone().into_parts();
            BasisRecord {
                param: id.val(),
                u: u.into_data(),
                sigma: sigma.into_data(),
                v: v.into_data(),
            }
        })
        .collect();
    records.sort_by_key(|basis| basis.param);
    records
}

/// Every parameter of `targets` with its path, sorted by id.
fn param_paths(targets: &Targets) -> Vec<ParamPath> {
    let mut params: Vec<_> = targets
        .iter()
        .map(|(id, target)| ParamPath {
            param: id.val(),
            path: target.path.to_string(),
        })
        .collect();
    params.sort_by_key(|p| p.param);
    params
}

/// The saved bases, on `device`, checked as bases and admitted against `targets`.
///
/// # Errors
///
/// [`SpfError::InvalidBasis`] for factors that do not form a basis, and the errors of
/// [`admit`](crate::bases::admit).
fn saved_bases(
    saved: &[BasisRecord],
    targets: &Targets,
    max_rank: usize,
    device: &Device,
) -> Result<Admitted, SpfError> {
    let mut bases = Vec::with_capacity(saved.len());
    for saved in saved {
        let id = ParamId::from(saved.param);
        let path = targets.get(&id).map(|t| t.path.to_string());
        let invalid = |source| SpfError::InvalidBasis {
            path: path.clone(),
            source,
        };
        let (u, sigma, v) = factors(saved, device).map_err(invalid)?;
        let basis = LowRankBasis::new(u, sigma, v).map_err(invalid)?;
        bases.push((id, basis));
    }
    admit(targets, max_rank, bases)
}

/// `targets` keyed by the ids of a record's `saved` parameters, matched by module path, or `None`
/// when the ids already agree. A module built afresh has new parameter ids; once its own record is
/// loaded it takes on the saved ones, so the wrapper adopts them too.
///
/// # Errors
///
/// [`SpfError::RecordMismatch`] when the paths are not the same on both sides.
fn rekeyed(targets: &Targets, saved: &[ParamPath]) -> Result<Option<Targets>, SpfError> {
    let agree = saved.iter().all(|p| {
        targets
            .get(&ParamId::from(p.param))
            .is_some_and(|t| *t.path == *p.path)
    });
    if agree && saved.len() == targets.iter().count() {
        return Ok(None);
    }
    let by_path: HashMap<&str, u64> = saved.iter().map(|p| (p.path.as_str(), p.param)).collect();
    let mismatch = |reason: String| SpfError::RecordMismatch { reason };
    if by_path.len() != saved.len() {
        return Err(mismatch("two saved parameters share a path".into()));
    }
    let saved_id = |path: &str| {
        by_path
            .get(path)
            .map(|&id| ParamId::from(id))
            .ok_or_else(|| {
                mismatch(format!(
                    "the module's parameter `{path}` is not in the record"
                ))
            })
    };
    // A LoRA-adapted weight names its factors by id: they take the saved ids of their paths too.
    let factor = |id: ParamId| match targets.get(&id) {
        Some(factor) => saved_id(&factor.path),
        None => Err(mismatch(
            "a LoRA factor that is not a parameter of the module".into(),
        )),
    };
    let rekeyed: Targets = targets
        .iter()
        .map(|(_, target)| {
            let mut target = target.clone();
            if let Some(adapter) = &mut target.adapter {
                adapter.a = factor(adapter.a)?;
                adapter.b = factor(adapter.b)?;
            }
            Ok((saved_id(&target.path)?, target))
        })
        .collect::<Result<_, SpfError>>()?;
    if let Some(extra) = saved.iter().find(|p| {
        rekeyed
            .get(&ParamId::from(p.param))
            .is_none_or(|t| *t.path != *p.path)
    }) {
        return Err(mismatch(format!(
            "the record's parameter `{}` is not in the module",
            extra.path
        )));
    }
    Ok(Some(rekeyed))
}

/// The saved factors `(U, σ, V)` on `device`, refused unless they are a matrix, a vector and a
/// matrix (what else is wrong with them, [`LowRankBasis::new`] finds).
fn factors(
    saved: &BasisRecord,
    device: &Device,
) -> Result<(Tensor<2>, Tensor<1>, Tensor<2>), SubspaceError> {
    let shapes = [&saved.u, &saved.sigma, &saved.v].map(|data| data.shape().to_vec());
    if [shapes[0].len(), shapes[1].len(), shapes[2].len()] != [2, 1, 2] {
        let [u, sigma, v] = shapes;
        return Err(SubspaceError::ShapeMismatch { u, sigma, v });
    }
    Ok((
        Tensor::from_data(saved.u.clone(), device),
        Tensor::from_data(saved.sigma.clone(), device),
        Tensor::from_data(saved.v.clone(), device),
    ))
}
