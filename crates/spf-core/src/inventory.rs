//! The parameters of a module as SPF sees them: path, shape and whether they are targeted.

use std::collections::HashMap;
use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Tensor, backend::Backend};
use spf_subspace::LowRankBasis;

use crate::config::PathMatcher;
use crate::{SpfConfig, SpfError, VectorPolicy};

/// One float parameter of the module.
#[derive(Debug, Clone)]
pub(crate) struct ParamInfo {
    /// Module path, `.`-joined.
    pub path: Arc<str>,
    /// The 2-D view `[dim0, rest]` (`[n, 1]` for a vector).
    pub view: [usize; 2],
    /// Whether the configuration protects it.
    pub targeted: bool,
}

/// Every float parameter of a module, by id, taken once when the wrapper is built.
#[derive(Debug, Clone, Default)]
pub(crate) struct Inventory(HashMap<ParamId, ParamInfo>);

impl Inventory {
    pub(crate) fn of<B: Backend, M: Module<B>>(
        module: &M,
        config: &SpfConfig,
    ) -> Result<Self, SpfError> {
        let mut visitor = InventoryVisitor {
            matcher: config.filter.compile()?,
            vectors: config.vector_policy,
            path: Vec::new(),
            params: HashMap::new(),
        };
        module.visit(&mut visitor);
        Ok(Self(visitor.params))
    }

    pub(crate) fn get(&self, id: &ParamId) -> Option<&ParamInfo> {
        self.0.get(id)
    }

    /// Checks that `basis` belongs to a targeted parameter of matching shape, and truncates it to
    /// `rank` directions.
    pub(crate) fn admit<B: Backend>(
        &self,
        id: ParamId,
        basis: LowRankBasis<B>,
        rank: usize,
    ) -> Result<LowRankBasis<B>, SpfError> {
        let info = self.get(&id).ok_or(SpfError::UnknownParam { id })?;
        if !info.targeted {
            return Err(SpfError::UntargetedParam {
                path: info.path.to_string(),
            });
        }
        let found = [basis.d_in(), basis.d_out()];
        if found != info.view {
            return Err(SpfError::ShapeMismatch {
                path: Some(info.path.to_string()),
                expected: info.view.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(basis.truncate(rank))
    }
}

/// The 2-D view of a parameter of shape `dims`: `[dim0, rest]`, or `[n, 1]` for a vector.
pub(crate) fn view_2d(dims: &[usize]) -> [usize; 2] {
    match dims {
        [] => [1, 1],
        [n] => [*n, 1],
        [first, rest @ ..] => [*first, rest.iter().product()],
    }
}

struct InventoryVisitor {
    matcher: PathMatcher,
    vectors: VectorPolicy,
    path: Vec<String>,
    params: HashMap<ParamId, ParamInfo>,
}

impl<B: Backend> ModuleVisitor<B> for InventoryVisitor {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let path = self.path.join(".");
        let rank_ok = D >= 2 || self.vectors == VectorPolicy::Pcgrad;
        let info = ParamInfo {
            targeted: rank_ok && self.matcher.matches(&path),
            view: view_2d(&param.lazy_shape()),
            path: path.into(),
        };
        self.params.insert(param.id, info);
    }
}
