//! Fine-tuning through LoRA adapters ([`SmolLora`]): the whole model, with burn's `apply_lora`
//! on every attention and MLP matrix of every block, only the adapters' factors trained.

use std::collections::HashSet;

use burn::module::{Lora, Module, ModuleMapper, Param, ParamGroup, ParamId};
use burn::tensor::{Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

use super::config::{PROTECTED, SmolLora};
use crate::LlmError;
use crate::llama::Llama;

/// `model` with adapters of `lora` on every matrix [`PROTECTED`] names and every other
/// parameter frozen. burn draws the factors `A` from its own generator, one per process, so
/// they are redrawn here from `seed` on the host, from the same `N(0, 1/rank)`: a cell's model
/// depends on its seed alone.
///
/// # Errors
///
/// [`LlmError::Config`] when the model has no matrix to adapt.
pub(super) fn adapt(model: Llama, lora: SmolLora, seed: u64) -> Result<Llama, LlmError> {
    let group = ParamGroup::from_regex(PROTECTED)
        .map_err(|e| LlmError::Config(format!("the adapted matrices' pattern: {e:?}")))?;
    let model = model.apply_lora(Lora::new(lora.rank, lora.alpha).set_param_group(group));
    let a: HashSet<ParamId> = model
        .blocks
        .iter()
        .flat_map(|b| b.matrices())
        .filter_map(|linear| linear.weight.adapter())
        .map(|adapter| adapter.a.id)
        .collect();
    if a.is_empty() {
        return Err(LlmError::Config("LoRA found no matrix to adapt".into()));
    }
    let std = 1.0 / lora.rank as f64;
    let normal = Normal::new(0.0, std)
        .map_err(|e| LlmError::Config(format!("LoRA's initial spread {std}: {e}")))?;
    Ok(model.map(&mut SeededFactors {
        a,
        rng: StdRng::seed_from_u64(seed),
        normal,
    }))
}

/// Redraws each listed factor from `normal`, in the module's own (fixed) visiting order,
/// keeping its id and making it require a gradient.
struct SeededFactors {
    a: HashSet<ParamId>,
    rng: StdRng,
    normal: Normal<f64>,
}

impl ModuleMapper for SeededFactors {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !self.a.contains(&param.id) {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let values: Vec<f32> = (0..shape.num_elements())
            .map(|_| self.normal.sample(&mut self.rng) as f32)
            .collect();
        let value = Tensor::<D>::from_data(TensorData::new(values, shape), &tensor.device())
            .cast(tensor.dtype())
            .require_grad();
        Param::from_mapped_value(id, value, mapper)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Int};

    use super::*;
    use crate::gguf::Gguf;
    use crate::llama::{LlamaConfig, tiny_gguf};

    fn model() -> Llama {
        let gguf = Gguf::parse(tiny_gguf(&LlamaConfig::tiny(3), 3)).unwrap();
        Llama::from_gguf(&gguf, &Device::default()).unwrap().train()
    }

    /// Every matrix of every block is adapted and nothing else trains; the same seed draws the
    /// same factors, another seed others, and `B = 0` leaves the model's output as it was.
    #[test]
    fn every_block_matrix_is_adapted_from_the_seed() {
        let model = model();
        let lora = SmolLora::new(2);
        let factors = |m: &Llama| -> Vec<Vec<f32>> {
            m.blocks
                .iter()
                .flat_map(|b| b.matrices())
                .map(|l| {
                    let adapter = l.weight.adapter().expect("every matrix adapted");
                    assert!(adapter.a.is_require_grad() && adapter.b.is_require_grad());
                    adapter.a.val().into_data().try_to_vec::<f32>().unwrap()
                })
                .collect()
        };
        let one = adapt(model.clone(), lora, 7).unwrap();
        assert_eq!(factors(&one).len(), 7 * model.blocks.len());
        assert_eq!(
            factors(&one),
            factors(&adapt(model.clone(), lora, 7).unwrap())
        );
        assert_ne!(
            factors(&one),
            factors(&adapt(model.clone(), lora, 8).unwrap())
        );
        assert!(!one.embed.is_require_grad());
        let tokens = Tensor::<2, Int>::from_data(
            TensorData::new(vec![1i64, 5, 9, 2], [1, 4]),
            &model.embed.val().device(),
        );
        let out = |m: &Llama| {
            let h = m.forward_layers(m.embed(tokens.clone()), 0..m.blocks.len(), 0, None, None);
            h.into_data().try_to_vec::<f32>().unwrap()
        };
        assert_eq!(out(&one), out(&model));
    }
}
