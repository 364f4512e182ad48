//! Data parallelism the way burn-train's multi-device strategy runs it: two replicas, each
//! computing the gradient of its shard of `b` samples (its loss scaled by 1/2) in a thread of its
//! own, burn summing the shards' gradients (`MultiGradientsParams`), and the wrapper stepping on
//! the sum ([`SafetyProjectedOptimizer::try_step_multi`]), take the steps one device takes on
//! the merged batches of `2b`, through refreshes of the bases; and a run resumed from a
//! checkpoint ends where an uninterrupted one does, bit for bit.
//!
//! The replicas share the CPU's one device, as burn-train's strategy does when given one device
//! twice: gathering and stepping are the same on two devices, only slower here.
//!
//! burn 0.21 ran these tests on burn-collective, one optimizer per replica and an all-reduce per
//! step, in threads and in two processes over loopback. burn 0.22 has no burn-collective, and
//! its collective operations (`burn::tensor::distributed`) run on CUDA only; docs/several-devices.md
//! says what that leaves.

mod common;

use std::path::Path;

use burn::module::Module;
use burn::optim::{GradientsParams, MultiGradientsParams};
use burn::store::ModuleRecord;
use spf_core::{SpfError, SpfRecord, checkpoint};

use common::*;

/// The replicas' summed gradients of steps `steps`, stepped by one wrapper; its snapshots, and,
/// with `save`, the model and wrapper checkpointed after the last step.
fn replicas(
    first: &Mlp,
    safety: &Safety,
    resume: Option<&Path>,
    steps: std::ops::Range<usize>,
    save: Option<&Path>,
) -> Vec<Snapshot> {
    let all = batches();
    let (mut model, mut optim) = (first.clone(), optimizer(first, safety));
    if let Some(dir) = resume {
        let record: ModuleRecord = checkpoint::load(dir.join("model")).unwrap();
        model = model.load_record(record);
        let record: SpfRecord = checkpoint::load(dir.join("optim")).unwrap();
        optim = optim.load_record(record);
    }
    let mut trace = Vec::new();
    for step in steps {
        let grads = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..REPLICAS)
                .map(|peer| {
                    let (model, batch) = (model.clone(), &all[step]);
                    scope.spawn(move || {
                        let shard = rows(batch, peer * SHARD, (peer + 1) * SHARD);
                        let loss = loss(&model, &shard, &device()).div_scalar(REPLICAS as f64);
                        (
                            GradientsParams::from_grads(loss.backward(), &model),
                            device(),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let multi = MultiGradientsParams { grads };
        model = optim.try_step_multi(LR, model, multi).unwrap();
        trace.push(snapshot(&model, &optim));
    }
    if let Some(dir) = save {
        checkpoint::save_atomic(model.clone().into_record(), dir.join("model")).unwrap();
        checkpoint::save_atomic(optim.to_record(), dir.join("optim")).unwrap();
    }
    trace
}

#[test]
fn two_replicas_step_as_one_on_the_merged_batch_and_resume_exactly() {
    let first = first_model();
    // Drawn once: burn's seeded random state is one per process.
    let safety = Safety(samples(4, 99));
    let one = single(&first, &safety);
    let two = replicas(&first, &safety, None, 0..STEPS, None);
    assert_eq!(
        two.last().unwrap().refreshes,
        3,
        "bases estimated at steps 0, 3 and 6"
    );
    assert_same_steps(&one, &two, "two replicas");

    // Interrupted after step 4 (past the second refresh) and resumed from its checkpoint, the
    // run ends where the uninterrupted run ends, bit for bit.
    let dir = fresh_dir("multi-device-resume");
    let before = replicas(&first, &safety, None, 0..4, Some(&dir));
    assert!(before == two[..4], "a rerun differs from the first run");
    let after = replicas(&first, &safety, Some(&dir), 4..STEPS, None);
    assert!(after[..] == two[4..], "the resumed run went elsewhere");
}

/// Uneven gradients across replicas: a parameter a replica has no gradient for gets the others'
/// sum, and no other parameter takes its place (two replicas missing different gradients of one
/// size must not be paired by position).
#[test]
fn uneven_gradients_sum_by_parameter() {
    let model = square_model();
    for (name, has) in UNEVEN {
        let grads = (0..REPLICAS)
            .map(|peer| (uneven_grads(&model, has[peer], peer), device()))
            .collect();
        // Plain SGD at learning rate 1 on a zero model steps to W' = −ΣG, exactly.
        let zero = model.clone().map(&mut Zero);
        let mut optim = spf_core::SpfConfig::new()
            .init(burn::optim::SgdConfig::new().build(), &zero, [])
            .unwrap();
        let stepped = optim
            .try_step_multi(1.0, zero, MultiGradientsParams { grads })
            .unwrap();
        let mut sums = GradientsParams::new();
        for layer in &stepped.layers {
            sums.register(layer.weight.id, -layer.weight.val().inner());
            let bias = layer.bias.as_ref().unwrap();
            sums.register(bias.id, -bias.val().inner());
        }
        let expected = uneven_expected(has);
        let found = uneven_values(&model, &sums);
        for (param, (found, expected)) in found.iter().zip(&expected).enumerate() {
            let expected = expected
                .clone()
                .unwrap_or(vec![0.0; found.as_ref().unwrap().len()]);
            assert_eq!(
                found.as_ref().unwrap(),
                &expected,
                "{name}: parameter {param}"
            );
        }
    }
}

/// Every parameter set to zero, its id and autodiff state kept.
struct Zero;

impl burn::module::ModuleMapper for Zero {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<burn::tensor::Tensor<D>>,
    ) -> burn::module::Param<burn::tensor::Tensor<D>> {
        param.map(|t| t.zeros_like())
    }
}

/// Gradients that cannot be summed, or that belong to no parameter of the module, are typed
/// errors before anything changes, with the module handed back.
#[test]
fn mixed_float_types_and_foreign_gradients_are_refused() {
    let model = square_model();
    let mut optim = spf_core::SpfConfig::new()
        .init(burn::optim::SgdConfig::new().build(), &model, [])
        .unwrap();
    let mut wide = uneven_grads(&model, [true; 4], 1);
    let bias = model.layers[1].bias.as_ref().unwrap().id;
    let b: burn::tensor::Tensor<1> = wide.remove(bias).unwrap();
    wide.register(bias, b.cast(burn::tensor::DType::F64));
    let mixed = vec![
        (uneven_grads(&model, [true; 4], 0), device()),
        (wide, device()),
    ];
    let refused = optim
        .try_step_multi(1.0, model.clone(), MultiGradientsParams { grads: mixed })
        .unwrap_err();
    assert!(
        matches!(&refused.error, SpfError::MixedGradientTypes { path, .. } if path == "layers.1.bias"),
        "{}",
        refused.error
    );

    let mut foreign = uneven_grads(&model, [true; 4], 0);
    let other = square_model();
    foreign.register(
        other.layers[0].weight.id,
        burn::tensor::Tensor::<2>::ones([4, 4], &device()),
    );
    let refused = optim
        .try_step_multi(
            1.0,
            model.clone(),
            MultiGradientsParams {
                grads: vec![(foreign, device())],
            },
        )
        .unwrap_err();
    assert_eq!(refused.error, SpfError::ForeignGradients { count: 1 });
    assert_eq!(optim.steps(), 0, "nothing stepped");
}
