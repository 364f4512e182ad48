//! The frozen base of a LoRA-adapted weight made to require a gradient, so that a backward pass
//! gives the safety gradient of the effective weight, `∂L_s/∂W`: what a refresh estimates an
//! adapted weight's basis from. A QLoRA base (burn's `apply_qlora`) is stored quantized, and
//! burn's autodiff does not differentiate a quantized leaf (its gradient is silently absent), so
//! the copy holds it dequantized: the same `W`, since the forward pass composes
//! `dequantize(W₀) + s·A B` either way.

use std::collections::HashSet;

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::{DType, Tensor};
use spf_subspace::Targets;

/// Makes the base of every listed weight require a gradient, so that a backward pass gives the
/// gradient of the effective weight (`W = W₀ + s·A B`, so `∂L/∂W₀ = ∂L/∂W`), dequantizing a
/// quantized base first.
struct BaseGradients<'a> {
    weights: &'a HashSet<ParamId>,
}

impl ModuleMapper for BaseGradients<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.weights.contains(&param.id) {
            param
                .map(|base| match base.dtype() {
                    DType::QFloat(_) => base.dequantize(),
                    _ => base,
                })
                .set_require_grad(true)
        } else {
            param
        }
    }
}

/// `module` with the frozen base of every protected adapted weight in `targets` requiring a
/// gradient: the module a refresh hands to the safety source, whose backward pass then gives
/// each adapted weight's safety gradient `∂L_s/∂W` (the factors' gradients are projections of
/// it, not it). The copy shares the parameters' storage, except that of a quantized base, which it
/// holds dequantized: one dense weight each while the refresh runs.
pub(crate) fn with_base_gradients<M: Module>(module: &M, targets: &Targets) -> M {
    let weights: HashSet<ParamId> = targets
        .iter()
        .filter(|(_, t)| t.targeted && t.adapter.is_some())
        .map(|(id, _)| *id)
        .collect();
    module.clone().map(&mut BaseGradients { weights: &weights })
}

/// `module` with the frozen base of every LoRA-adapted weight requiring a gradient (dequantized,
/// for a QLoRA base), so that the gradients of a loss at the returned module include each adapted
/// weight's own, `∂L/∂W` of the effective weight `W₀ + s·A B`: for estimating bases before
/// training with [`SafetySubspace::estimate`](spf_subspace::SafetySubspace::estimate). (The
/// wrapper's refresh does this itself.) The copy shares the parameters' storage but for quantized
/// bases; train the original.
pub fn require_lora_base_gradients<M: Module>(module: &M) -> M {
    let all = spf_subspace::ParamFilter::All;
    match Targets::of(module, &all, spf_subspace::VectorPolicy::Skip) {
        Ok(targets) => with_base_gradients(module, &targets),
        // `All` has no regex to fail to compile.
        Err(_) => module.clone(),
    }
}
