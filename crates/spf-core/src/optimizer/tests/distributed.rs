//! Under burn-train's DDP, each parameter carries a mark that makes the backward pass all-reduce
//! its gradient; burn's optimizers renew it at every step. Every path through the wrapper must
//! hand back marked parameters, or the next backward stops synchronizing: both targets, every
//! `NonFinitePolicy`, refused and refreshing steps. burn 0.22 marks parameters on its CubeCL
//! backends only (WGPU, CUDA, ROCm, CubeCL's CPU); the CPU's `flex` panics on the mark, so this
//! runs with `--features test-wgpu`, without a communication server: marking and stepping do
//! not communicate, the backward pass of a marked parameter only registers it.

use burn::module::ModuleMapper;

use super::*;
use crate::{NonFinitePolicy, ProjectionTarget, RefreshPolicy};

/// Marks every parameter as burn-train's DDP worker does.
struct Mark;

impl ModuleMapper for Mark {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let id = param.id;
        param.map(|t| t.set_distributed(id))
    }
}

/// The paths of the parameters that lost their mark.
fn unmarked(model: &Net) -> Vec<String> {
    struct Visit(Vec<String>, Vec<String>);
    impl burn::module::ModuleVisitor for Visit {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.1.push(name.to_owned());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.1.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.val().is_distributed() {
                self.0.push(format!("{}#{}", self.1.join("."), param.id));
            }
        }
    }
    let mut visit = Visit(Vec::new(), Vec::new());
    model.visit(&mut visit);
    visit.0
}

fn poisoned(model: &Net, seed: u64) -> GradientsParams {
    let mut g = grads(model, seed);
    let w: Tensor<2> = g.remove(model.attn.weight.id).unwrap();
    let nan = Tensor::full([1, 1], f32::NAN, &test_device());
    g.register(model.attn.weight.id, w.slice_assign([0..1, 0..1], nan));
    g
}

#[test]
fn every_step_keeps_the_distributed_mark() {
    if !on_gpu("every_step_keeps_the_distributed_mark") {
        return;
    }
    let device = test_device();
    let policies = [
        NonFinitePolicy::Error,
        NonFinitePolicy::SkipStep,
        NonFinitePolicy::ZeroNonFinite,
        NonFinitePolicy::Unchecked,
    ];
    for target in [ProjectionTarget::Gradient, ProjectionTarget::Update] {
        for policy in policies {
            let context = format!("{target:?}, {policy:?}");
            let mut model = Net::new(&device).map(&mut Mark);
            assert!(unmarked(&model).is_empty(), "{context}: the fixture marks");
            // A refresh every 2 steps: its backward pass runs on the marked parameters too.
            let config = config(ProjectionMode::ConflictOnly)
                .with_target(target)
                .with_non_finite(policy)
                .with_refresh(RefreshPolicy::Every(2));
            let mut optim = adamw(config, &model).with_safety_source(|m: &Net| {
                let x = Tensor::<2>::ones([2, 4], &test_device());
                m.forward(x).square().mean()
            });
            for step in 0..5 {
                model = optim.step(1e-2, model.clone(), grads(&model, step));
                assert_eq!(
                    unmarked(&model),
                    Vec::<String>::new(),
                    "{context}, step {step}"
                );
            }
            assert!(
                optim.last_stats().refresh.count >= 2,
                "{context}: refreshed"
            );
            if policy != NonFinitePolicy::Unchecked {
                model = match optim.try_step(1e-2, model.clone(), poisoned(&model, 9)) {
                    Ok(model) => model,
                    Err(refused) => refused.module,
                };
                let lost = unmarked(&model);
                assert_eq!(lost, Vec::<String>::new(), "{context}, non-finite step");
            }
        }
    }
}
