//! [`ProtectedBases`]: the safety basis of each protected parameter, and the rule that admits a
//! basis (it must belong to a targeted parameter, in that parameter's 2-D view).

use std::collections::HashMap;

use burn::module::ParamId;
use spf_subspace::{LowRankBasis, Targets, direction_overlap};

use crate::error::SpfError;

/// The bases of the protected parameters, keyed by parameter id, on the devices the gradients
/// live on. Every basis in it was admitted by [`admit`].
#[derive(Debug, Clone, Default)]
pub(crate) struct ProtectedBases(HashMap<ParamId, LowRankBasis>);

impl ProtectedBases {
    /// The bases as a map, as the wrapper publishes them.
    pub fn as_map(&self) -> &HashMap<ParamId, LowRankBasis> {
        &self.0
    }

    /// The basis of `id`, if it is protected.
    pub fn get(&self, id: &ParamId) -> Option<&LowRankBasis> {
        self.0.get(id)
    }

    /// The basis of `id`, to move it between devices.
    pub fn get_mut(&mut self, id: &ParamId) -> Option<&mut LowRankBasis> {
        self.0.get_mut(id)
    }

    /// Whether `id` is protected.
    pub fn contains(&self, id: &ParamId) -> bool {
        self.0.contains_key(id)
    }

    /// Whether no parameter is protected.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every basis with its parameter, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&ParamId, &LowRankBasis)> {
        self.0.iter()
    }

    /// Adds or replaces the bases of admitted parameters, keeping the others.
    pub fn extend(&mut self, admitted: Admitted) {
        self.0.extend(admitted.0);
    }

    /// Replaces every basis by the admitted ones.
    pub fn replace(&mut self, admitted: Admitted) {
        self.0 = admitted.0.into_iter().collect();
    }

    /// The mean [direction overlap](direction_overlap) between the current bases and `new`, over
    /// the parameters that have a non-empty basis in both; `None` when there is none.
    pub fn mean_overlap(&self, new: &Admitted) -> Option<f64> {
        let overlaps: Vec<f64> = new
            .0
            .iter()
            .filter_map(|(id, new)| {
                let old = self.0.get(id)?;
                (old.rank() > 0 && new.rank() > 0).then(|| direction_overlap(old, new))
            })
            .collect();
        (!overlaps.is_empty()).then(|| overlaps.iter().sum::<f64>() / overlaps.len() as f64)
    }
}

/// Bases that passed [`admit`]: the only kind [`ProtectedBases`] takes.
pub(crate) struct Admitted(Vec<(ParamId, LowRankBasis)>);

impl Admitted {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Checks that each basis belongs to a targeted parameter of `targets` whose 2-D view it
/// matches, and truncates it to `max_rank` directions. All or nothing: one misfit fails the lot.
///
/// # Errors
///
/// [`SpfError::UnknownParam`], [`SpfError::UntargetedParam`] or [`SpfError::ShapeMismatch`].
pub(crate) fn admit(
    targets: &Targets,
    max_rank: usize,
    bases: impl IntoIterator<Item = (ParamId, LowRankBasis)>,
) -> Result<Admitted, SpfError> {
    bases
        .into_iter()
        .map(|(id, basis)| {
            let target = targets.get(&id).ok_or(SpfError::UnknownParam { id })?;
            if !target.targeted {
                return Err(SpfError::UntargetedParam {
                    path: target.path.to_string(),
                });
            }
            let found = [basis.d_in(), basis.d_out()];
            if found != target.view {
                return Err(SpfError::ShapeMismatch {
                    path: Some(target.path.to_string()),
                    expected: target.view.to_vec(),
                    found: found.to_vec(),
                });
            }
            Ok((id, basis.truncate(max_rank)))
        })
        .collect::<Result<_, _>>()
        .map(Admitted)
}
