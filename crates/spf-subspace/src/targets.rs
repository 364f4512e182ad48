//! Which parameters of a module SPF protects: [`ParamFilter`], [`VectorPolicy`] and [`Targets`],
//! shared by the estimator and the optimizer wrapper so that both always agree.

use std::collections::HashMap;
use std::sync::Arc;

use burn::module::{LoraAdapter, Module, ModuleVisitor, Param, ParamId, Reparameterization};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::SubspaceError;
use crate::view::{into_2d, view_2d};

/// Which parameters SPF protects, chosen by module path.
///
/// A path is the chain of field names (and container indices) from the root module to the
/// parameter, joined with `.`, for example `blocks.0.attn.query.weight`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ParamFilter {
    /// Every parameter.
    #[default]
    All,
    /// Parameters whose whole path matches the regular expression (it is anchored at both ends).
    PathRegex(String),
}

impl ParamFilter {
    /// A filter on the module path, for example `.*(attn|mlp).*`.
    pub fn path_regex(pattern: impl Into<String>) -> Self {
        Self::PathRegex(pattern.into())
    }

    fn compile(&self) -> Result<Option<Regex>, SubspaceError> {
        match self {
            Self::All => Ok(None),
            Self::PathRegex(pattern) => {
                Regex::new(&format!("^(?:{pattern})$"))
                    .map(Some)
                    .map_err(|err| SubspaceError::InvalidFilter {
                        pattern: pattern.clone(),
                        message: err.to_string(),
                    })
            }
        }
    }
}

/// What to do with targeted parameters of rank 1 (biases, norm scales).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum VectorPolicy {
    /// Leave them alone.
    #[default]
    Skip,
    /// View them as `n × 1` and apply the `Pcgrad` rule against their raw safety gradient, whose
    /// exact basis is [`LowRankBasis::from_vector`](crate::LowRankBasis::from_vector).
    Pcgrad,
}

/// One float parameter of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Module path, `.`-joined.
    pub path: Arc<str>,
    /// The 2-D view `[dim0, rest]` (`[n, 1]` for a vector), see [`view_2d`](crate::view::view_2d).
    pub view: [usize; 2],
    /// Its rank as a tensor.
    pub rank: usize,
    /// Whether it is protected: its path matches the filter, and it has rank 2 or more, or rank 1
    /// with [`VectorPolicy::Pcgrad`]. The factors of a LoRA adapter never are: SPF protects the
    /// effective weight they adapt, through [`Self::adapter`].
    pub targeted: bool,
    /// The factors of the LoRA adapter attached to this weight (burn's `apply_lora`), if any: the
    /// weight is then frozen, and SPF projects the factors' gradients against the basis of the
    /// effective weight `W₀ + s·A B`.
    pub adapter: Option<Adapter>,
}

/// The parameter ids of a LoRA adapter's factors `A: [d_in, r]` and `B: [r, d_out]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adapter {
    /// `A`.
    pub a: ParamId,
    /// `B`.
    pub b: ParamId,
}

/// Every float parameter of a module, by id, with its path and whether it is protected.
#[derive(Debug, Clone, Default)]
pub struct Targets(HashMap<ParamId, Target>);

impl Targets {
    /// Walks `module` once.
    ///
    /// # Errors
    ///
    /// [`SubspaceError::InvalidFilter`] when the filter's regex does not compile.
    pub fn of<M: Module>(
        module: &M,
        filter: &ParamFilter,
        vectors: VectorPolicy,
    ) -> Result<Self, SubspaceError> {
        let mut visitor = TargetVisitor {
            regex: filter.compile()?,
            vectors,
            path: Vec::new(),
            params: HashMap::new(),
            adapted: None,
            lora_depth: None,
        };
        module.visit(&mut visitor);
        Ok(Self(visitor.params))
    }

    /// Whether some protected weight is trained through a LoRA adapter.
    pub fn has_adapters(&self) -> bool {
        self.0.values().any(|t| t.targeted && t.adapter.is_some())
    }

    /// The parameter `id`, if the module has it.
    pub fn get(&self, id: &ParamId) -> Option<&Target> {
        self.0.get(id)
    }

    /// Every parameter, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&ParamId, &Target)> {
        self.0.iter()
    }

    /// The 2-D views of the gradients in `grads` of the targeted parameters of `module`, in the
    /// module's visiting order. Parameters without a gradient are left out.
    pub fn gradients<M>(&self, module: &M, grads: &GradientsParams) -> Vec<(ParamId, Tensor<2>)>
    where
        M: Module,
    {
        let mut collect = TargetedGradients {
            targets: self,
            grads,
            found: Vec::new(),
        };
        module.visit(&mut collect);
        collect.found
    }
}

impl FromIterator<(ParamId, Target)> for Targets {
    fn from_iter<I: IntoIterator<Item = (ParamId, Target)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

struct TargetVisitor {
    regex: Option<Regex>,
    vectors: VectorPolicy,
    path: Vec<String>,
    params: HashMap<ParamId, Target>,
    /// The last parameter visited outside an adapter: the weight an adapter that follows adapts
    /// (burn visits a parameter's base, then its reparameterization).
    adapted: Option<ParamId>,
    /// The path depth of the LoRA adapter being visited, if any.
    lora_depth: Option<usize>,
}

impl ModuleVisitor for TargetVisitor {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_owned());
        if container_type == "Reparameterization" && name == LoraAdapter::NAME {
            self.lora_depth = Some(self.path.len());
        }
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        if self.lora_depth == Some(self.path.len()) {
            self.lora_depth = None;
        }
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path.join(".");
        let factor = self.lora_depth.is_some();
        if factor && let Some(base) = self.adapted.and_then(|id| self.params.get_mut(&id)) {
            let adapter = base.adapter.get_or_insert(Adapter {
                a: param.id,
                b: param.id,
            });
            match self.path.last().map(String::as_str) {
                Some("a") => adapter.a = param.id,
                _ => adapter.b = param.id,
            }
        } else {
            self.adapted = Some(param.id);
        }
        let rank_ok = D >= 2 || self.vectors == VectorPolicy::Pcgrad;
        let matches = self
            .regex
            .as_ref()
            .is_none_or(|regex| regex.is_match(&path));
        let target = Target {
            targeted: rank_ok && matches && !factor,
            view: view_2d(&param.lazy_shape()),
            rank: D,
            path: path.into(),
            adapter: None,
        };
        self.params.insert(param.id, target);
    }
}

/// The 2-D views of the safety gradients of the targeted parameters, read at their true rank.
struct TargetedGradients<'a> {
    targets: &'a Targets,
    grads: &'a GradientsParams,
    found: Vec<(ParamId, Tensor<2>)>,
}

impl ModuleVisitor for TargetedGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.targets.get(&param.id).is_some_and(|t| t.targeted) {
            return;
        }
        if let Some(grad) = self.grads.get::<D>(param.id) {
            self.found.push((param.id, into_2d(grad)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::from_2d;
    use burn::nn::{Linear, LinearConfig};

    #[derive(Module, Debug)]
    struct Block {
        attn: Linear,
        mlp: Vec<Linear>,
        head: Linear,
    }

    fn block() -> Block {
        let device = crate::testing::autodiff_device();
        Block {
            attn: LinearConfig::new(2, 3).init(&device),
            mlp: vec![LinearConfig::new(3, 3).init(&device)],
            head: LinearConfig::new(3, 1).init(&device),
        }
    }

    fn targeted(targets: &Targets) -> Vec<String> {
        let mut paths: Vec<String> = targets
            .iter()
            .filter(|(_, t)| t.targeted)
            .map(|(_, t)| t.path.to_string())
            .collect();
        paths.sort();
        paths
    }

    #[test]
    fn paths_follow_fields_and_container_indices() {
        let targets = Targets::of(&block(), &ParamFilter::All, VectorPolicy::Pcgrad).unwrap();
        let mut all: Vec<(String, [usize; 2])> = targets
            .iter()
            .map(|(_, t)| (t.path.to_string(), t.view))
            .collect();
        all.sort();
        assert_eq!(
            all,
            [
                ("attn.bias".to_string(), [3, 1]),
                ("attn.weight".to_string(), [2, 3]),
                ("head.bias".to_string(), [1, 1]),
                ("head.weight".to_string(), [3, 1]),
                ("mlp.0.bias".to_string(), [3, 1]),
                ("mlp.0.weight".to_string(), [3, 3]),
            ]
        );
    }

    #[test]
    fn filter_and_vector_policy_decide_what_is_targeted() {
        let filter = ParamFilter::path_regex(".*(attn|mlp).*");
        let skip = Targets::of(&block(), &filter, VectorPolicy::Skip).unwrap();
        assert_eq!(targeted(&skip), ["attn.weight", "mlp.0.weight"]);
        let pcgrad = Targets::of(&block(), &filter, VectorPolicy::Pcgrad).unwrap();
        assert_eq!(
            targeted(&pcgrad),
            ["attn.bias", "attn.weight", "mlp.0.bias", "mlp.0.weight"]
        );
    }

    #[test]
    fn a_lora_adapted_weight_is_targeted_with_its_factors_and_they_are_not() {
        use burn::module::Lora;
        let model = block().apply_lora(Lora::new(2, 4.0).set_param_group(
            burn::module::ParamGroup::from_paths(vec!["attn.weight", "mlp.0.weight"]),
        ));
        let filter = ParamFilter::path_regex(".*(attn|mlp).*");
        let targets = Targets::of(&model, &filter, VectorPolicy::Skip).unwrap();
        assert_eq!(targeted(&targets), ["attn.weight", "mlp.0.weight"]);
        assert!(targets.has_adapters());
        let lora = model.attn.weight.adapter().unwrap();
        let attn = targets.get(&model.attn.weight.id).unwrap();
        let expected = Adapter {
            a: lora.a.id,
            b: lora.b.id,
        };
        assert_eq!(attn.adapter, Some(expected));
        assert_eq!(
            &*targets.get(&lora.a.id).unwrap().path,
            "attn.weight.lora.a"
        );
        assert!(
            targets
                .get(&model.head.weight.id)
                .unwrap()
                .adapter
                .is_none()
        );
        let plain = Targets::of(&block(), &filter, VectorPolicy::Skip).unwrap();
        assert!(!plain.has_adapters());
    }

    #[test]
    fn path_regex_is_anchored_at_both_ends() {
        let only = |pattern: &str| {
            let filter = ParamFilter::path_regex(pattern);
            targeted(&Targets::of(&block(), &filter, VectorPolicy::Skip).unwrap())
        };
        assert_eq!(
            only("weight"),
            Vec::<String>::new(),
            "a bare name must not match a longer path"
        );
        assert_eq!(only(r"head\.weight"), ["head.weight"]);
    }

    #[test]
    fn invalid_regex_is_a_typed_error() {
        let err = Targets::of(
            &block(),
            &ParamFilter::path_regex("(attn"),
            VectorPolicy::Skip,
        );
        assert!(
            matches!(err, Err(SubspaceError::InvalidFilter { ref pattern, .. }) if pattern == "(attn")
        );
    }

    #[test]
    fn views_flatten_trailing_dimensions() {
        assert_eq!(view_2d(&[7]), [7, 1]);
        assert_eq!(view_2d(&[4, 5]), [4, 5]);
        assert_eq!(view_2d(&[2, 3, 4, 5]), [2, 60]);
    }

    #[test]
    fn into_2d_and_back_round_trip_every_rank() {
        let device = crate::testing::autodiff_device();
        let values: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let t3 = Tensor::<1>::from_floats(values.as_slice(), &device).reshape([2, 3, 4]);
        let flat = into_2d(t3.clone());
        assert_eq!(flat.dims(), [2, 12]);
        from_2d(flat.clone(), [2, 3, 4])
            .unwrap()
            .into_data()
            .assert_eq(&t3.into_data(), true);

        let t2 = Tensor::<1>::from_floats(values.as_slice(), &device).reshape([4, 6]);
        let same = into_2d(t2.clone());
        assert_eq!(same.dims(), [4, 6]);
        from_2d(same.clone(), [4, 6])
            .unwrap()
            .into_data()
            .assert_eq(&t2.into_data(), true);

        let t1 = Tensor::<1>::from_floats(values.as_slice(), &device);
        let column = into_2d(t1.clone());
        assert_eq!(column.dims(), [24, 1]);
        from_2d(column, [24])
            .unwrap()
            .into_data()
            .assert_eq(&t1.into_data(), true);

        // A matrix is returned only to the shape it is the view of: `[4, 6]` is not the view of
        // `[6, 4]` (it used to come back unchanged), nor `[2, 12]` the view of `[2, 3, 5]`.
        let mismatch =
            |r: Result<_, SubspaceError>| matches!(r, Err(SubspaceError::ViewMismatch { .. }));
        assert!(mismatch(from_2d(same, [6, 4]).map(drop)));
        assert!(mismatch(from_2d(flat, [2, 3, 5]).map(drop)));
    }
}
