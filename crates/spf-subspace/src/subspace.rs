//! [`SafetySubspace`]: one [`LowRankBasis`] per targeted parameter, estimated from the gradients
//! of a safety loss.

use std::collections::HashMap;

use burn::config::Config;
use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::{
    LowRankBasis, ParamFilter, RandomizedSvd, RandomizedSvdConfig, SketchConfig, SubspaceError,
    Targets, VectorPolicy, rank_for_energy,
};

/// How many directions each parameter keeps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum RankPolicy {
    /// Exactly `k` (fewer when the gradient's numerical rank is lower).
    Fixed(usize),
    /// The smallest `k` whose captured energy `CER(k)` reaches `threshold`, at most `max_rank`.
    Energy {
        /// `τ`, for example 0.85.
        threshold: f64,
        /// `k_max`.
        max_rank: usize,
    },
}

impl RankPolicy {
    /// The most directions this policy ever keeps.
    pub fn max_rank(&self) -> usize {
        match *self {
            Self::Fixed(k) => k,
            Self::Energy { max_rank, .. } => max_rank,
        }
    }
}

/// Configuration of [`SafetySubspace::estimate`].
#[derive(Config, Debug)]
pub struct SubspaceConfig {
    /// Which parameters get a basis.
    #[config(default = "ParamFilter::All")]
    pub filter: ParamFilter,
    /// Whether vectors get one.
    #[config(default = "VectorPolicy::Skip")]
    pub vector_policy: VectorPolicy,
    /// How many directions each keeps.
    #[config(default = "RankPolicy::Fixed(8)")]
    pub rank: RankPolicy,
    /// The randomized SVD's oversampling, power iterations and seed.
    #[config(default = "SketchConfig::new()")]
    pub sketch: SketchConfig,
}

/// One safety basis per targeted parameter.
///
/// For each targeted parameter with a safety gradient `G_s`:
///
/// - a matrix (or a tensor viewed as `[dim0, rest]`) gets the randomized SVD of `G_s`, truncated
///   by the [`RankPolicy`]: a fixed `k`, or the smallest `k` with `CER(k) ≥ τ`, capped at `k_max`;
/// - a vector (only under [`VectorPolicy::Pcgrad`]) gets its exact rank-1 basis
///   ([`LowRankBasis::from_vector`]).
///
/// Each parameter's sketch is seeded with the configured seed mixed with a hash of its module
/// path, so estimates are reproducible across runs, whatever burn's random parameter ids.
#[derive(Debug, Clone, Default)]
pub struct SafetySubspace {
    bases: HashMap<ParamId, LowRankBasis>,
    total_energy: HashMap<ParamId, f64>,
}

impl SafetySubspace {
    /// Estimates a basis for every targeted parameter of `module` that has a gradient in
    /// `safety_grads` (the gradients of the safety loss at `module`).
    ///
    /// # Errors
    ///
    /// [`SubspaceError::InvalidFilter`], or [`SubspaceError::Parameter`] naming the parameter
    /// whose gradient is not finite or whose SVD failed.
    pub fn estimate<M>(
        module: &M,
        safety_grads: &GradientsParams,
        config: &SubspaceConfig,
    ) -> Result<Self, SubspaceError>
    where
        M: Module,
    {
        let targets = Targets::of(module, &config.filter, config.vector_policy)?;
        let mut subspace = Self::default();
        for (id, grad) in targets.gradients(module, safety_grads) {
            let target = targets.get(&id).expect("collected from these targets");
            let in_param = |source| SubspaceError::Parameter {
                path: target.path.to_string(),
                source: Box::new(source),
            };
            let (basis, energy) = if target.rank == 1 {
                let [n, _] = grad.dims();
                let basis = LowRankBasis::from_vector(grad.reshape([n])).map_err(in_param)?;
                let energy = basis.energy();
                (basis, energy)
            } else {
                let seed = mix(config.sketch.seed, path_hash(&target.path));
                estimate_matrix(&grad, config, seed).map_err(in_param)?
            };
            subspace.total_energy.insert(id, energy);
            subspace.bases.insert(id, basis);
        }
        Ok(subspace)
    }

    /// The basis of parameter `id`.
    pub fn get(&self, id: &ParamId) -> Option<&LowRankBasis> {
        self.bases.get(id)
    }

    /// `CER(k)` of parameter `id`'s basis: the share of its safety gradient's energy it holds.
    pub fn captured_energy(&self, id: &ParamId) -> Option<f64> {
        let basis = self.bases.get(id)?;
        Some(crate::captured_energy(
            basis.singular_values(),
            self.total_energy[id],
        ))
    }

    /// Number of bases.
    pub fn len(&self) -> usize {
        self.bases.len()
    }

    /// Whether there is no basis.
    pub fn is_empty(&self) -> bool {
        self.bases.is_empty()
    }

    /// Every basis, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&ParamId, &LowRankBasis)> {
        self.bases.iter()
    }
}

impl IntoIterator for SafetySubspace {
    type Item = (ParamId, LowRankBasis);
    type IntoIter = std::collections::hash_map::IntoIter<ParamId, LowRankBasis>;

    fn into_iter(self) -> Self::IntoIter {
        self.bases.into_iter()
    }
}

/// The basis of one matrix under the rank policy, and `‖G_s‖_F²`.
fn estimate_matrix(
    grad: &Tensor<2>,
    config: &SubspaceConfig,
    seed: u64,
) -> Result<(LowRankBasis, f64), SubspaceError> {
    let svd = RandomizedSvd::new(
        RandomizedSvdConfig::new(config.rank.max_rank())
            .with_sketch(config.sketch.clone().with_seed(seed)),
    );
    let basis = svd.compute(grad)?;
    let energy = frobenius_energy(grad);
    let k = match config.rank {
        RankPolicy::Fixed(k) => k,
        RankPolicy::Energy {
            threshold,
            max_rank,
        } => rank_for_energy(basis.singular_values(), energy, threshold, max_rank),
    };
    Ok((basis.truncate(k), energy))
}

/// `‖A‖_F²` in `f64`, accumulated on the device after scaling by `max|A|` so that it neither
/// overflows nor underflows in `f32`.
fn frobenius_energy(a: &Tensor<2>) -> f64 {
    let scale: f64 = a.clone().abs().max().into_scalar::<f64>();
    if scale == 0.0 {
        return 0.0;
    }
    let scaled: f64 = a
        .clone()
        .div_scalar(scale)
        .square()
        .sum()
        .into_scalar::<f64>();
    scaled * scale * scale
}

/// FNV-1a of a module path: a seed component that is the same in every run.
fn path_hash(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64 of `a ^ b`: decorrelates nearby seeds.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = (a ^ b).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::{Module, Param};
    use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
    use burn::tensor::activation::tanh;

    /// Attention-like and MLP-like layers, a norm with vector parameters, and a head.
    #[derive(Module, Debug)]
    struct Tiny {
        attn: Vec<Linear>,
        norm: LayerNorm,
        mlp: Linear,
        head: Linear,
    }

    fn tiny() -> Tiny {
        let device = crate::testing::autodiff_device();
        Tiny {
            attn: vec![
                LinearConfig::new(6, 6).init(&device),
                LinearConfig::new(6, 6).init(&device),
            ],
            norm: LayerNormConfig::new(6).init(&device),
            mlp: LinearConfig::new(6, 12).init(&device),
            head: LinearConfig::new(12, 3).init(&device),
        }
    }

    /// The gradients of a loss on `samples` inputs.
    fn safety_grads(model: &Tiny, samples: usize) -> GradientsParams {
        let device = crate::testing::autodiff_device();
        let values: Vec<f32> = (0..samples * 6)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0)
            .collect();
        let x =
            Tensor::<2>::from_data(burn::tensor::TensorData::new(values, [samples, 6]), &device);
        let h = model.attn[1].forward(model.attn[0].forward(x));
        // tanh, not relu: with randomly initialised weights and one sample, every relu unit can
        // be dead, leaving a zero gradient (rank 0), which made a rank-1 test fail now and then.
        let h = tanh(model.mlp.forward(model.norm.forward(h)));
        GradientsParams::from_grads(model.head.forward(h).sum().backward(), model)
    }

    fn paths(model: &Tiny, subspace: &SafetySubspace) -> Vec<String> {
        let targets = Targets::of(model, &ParamFilter::All, VectorPolicy::Pcgrad).unwrap();
        let mut paths: Vec<String> = subspace
            .iter()
            .map(|(id, _)| targets.get(id).unwrap().path.to_string())
            .collect();
        paths.sort();
        paths
    }

    #[test]
    fn exactly_the_targeted_parameters_get_bases() {
        let model = tiny();
        let grads = safety_grads(&model, 2);
        let config =
            SubspaceConfig::new().with_filter(ParamFilter::path_regex(".*(attn|mlp|norm).*"));
        let matrices = SafetySubspace::estimate(&model, &grads, &config).unwrap();
        assert_eq!(
            paths(&model, &matrices),
            ["attn.0.weight", "attn.1.weight", "mlp.weight"]
        );

        let config = config.with_vector_policy(VectorPolicy::Pcgrad);
        let all = SafetySubspace::estimate(&model, &grads, &config).unwrap();
        assert_eq!(
            paths(&model, &all),
            [
                "attn.0.bias",
                "attn.0.weight",
                "attn.1.bias",
                "attn.1.weight",
                "mlp.bias",
                "mlp.weight",
                "norm.beta",
                "norm.gamma",
            ]
        );
    }

    #[test]
    fn one_sample_gives_a_rank_one_weight_gradient() {
        // For one input row x, dL/dW = xᵀδ: rank 1, captured entirely by one direction.
        let model = tiny();
        let config = SubspaceConfig::new().with_filter(ParamFilter::path_regex(r"attn\.0\.weight"));
        let subspace = SafetySubspace::estimate(&model, &safety_grads(&model, 1), &config).unwrap();
        let (id, basis) = subspace.iter().next().unwrap();
        assert_eq!(basis.rank(), 1);
        assert!(subspace.captured_energy(id).unwrap() > 1.0 - 1e-5);
    }

    #[test]
    fn energy_policy_picks_the_smallest_rank_reaching_the_threshold() {
        let model = tiny();
        let grads = safety_grads(&model, 4);
        let rank = RankPolicy::Energy {
            threshold: 0.9,
            max_rank: 3,
        };
        let config = SubspaceConfig::new().with_rank(rank);
        let subspace = SafetySubspace::estimate(&model, &grads, &config).unwrap();
        assert!(!subspace.is_empty());
        for (id, basis) in subspace.iter() {
            let cer = subspace.captured_energy(id).unwrap();
            assert!(basis.rank() <= 3);
            assert!(
                cer >= 0.9 || basis.rank() == 3,
                "rank {} CER {cer}",
                basis.rank()
            );
            if basis.rank() > 0 {
                // One direction fewer would not have been enough.
                let fewer = crate::captured_energy(
                    &basis.singular_values()[..basis.rank() - 1],
                    basis.energy() / cer,
                );
                assert!(fewer < 0.9, "rank {} was not the smallest", basis.rank());
            }
        }
    }

    #[test]
    fn non_finite_gradient_names_its_parameter() {
        let model = tiny();
        let mut grads = safety_grads(&model, 2);
        let bad = Tensor::<2>::full([6, 12], f32::NAN, &Default::default());
        grads.register(model.mlp.weight.id, bad);
        let err = SafetySubspace::estimate(&model, &grads, &SubspaceConfig::new()).unwrap_err();
        assert!(
            matches!(&err, SubspaceError::Parameter { path, .. } if path == "mlp.weight"),
            "{err}"
        );
    }

    #[test]
    fn estimates_are_reproducible_across_module_instances() {
        // Same weights, fresh parameter ids: the path-derived seeds give the same bases.
        let a = tiny();
        let b = Tiny::new_from(&a);
        let config = SubspaceConfig::new().with_sketch(SketchConfig::new().with_seed(5));
        let sa = SafetySubspace::estimate(&a, &safety_grads(&a, 3), &config).unwrap();
        let sb = SafetySubspace::estimate(&b, &safety_grads(&b, 3), &config).unwrap();
        let u = |m: &Tiny, s: &SafetySubspace| s.get(&m.mlp.weight.id).unwrap().u().to_data();
        assert_eq!(u(&a, &sa), u(&b, &sb));
    }

    impl Tiny {
        /// A copy with the same values and new parameter ids (the norm's initial values are
        /// deterministic, ones and zeros).
        fn new_from(other: &Self) -> Self {
            Self {
                attn: other.attn.iter().map(relinked).collect(),
                norm: tiny().norm,
                mlp: relinked(&other.mlp),
                head: relinked(&other.head),
            }
        }
    }

    fn relinked(layer: &Linear) -> Linear {
        Linear {
            weight: Param::from_tensor(layer.weight.val().detach().require_grad()),
            bias: layer
                .bias
                .as_ref()
                .map(|b| Param::from_tensor(b.val().detach().require_grad())),
        }
    }
}
