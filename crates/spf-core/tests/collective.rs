//! Data parallelism on burn's collective engine: two replicas, each on a shard of `b` samples,
//! stepping through `spf_core::collective::step`, take the steps one replica takes on the
//! merged batches of `2b`, through refreshes of the bases; the replicas agree bit for bit; and a
//! run resumed from one replica's checkpoint ends where an uninterrupted one does, bit for bit.
//!
//! The replicas are two peers on burn-ndarray's one CPU device (burn-collective keys peers by id,
//! not device, as its own tests do): the all-reduce and everything the wrapper does are the same
//! on two devices, only slower here.

// Written for burn-ndarray, which burn's `distributed` feature excludes; the WGPU runs would
// repeat them on ndarray.
#![cfg(not(any(feature = "test-wgpu", feature = "distributed")))]

mod common;

use std::path::Path;

use burn::collective::{CollectiveConfig, PeerId, finish_collective, register, reset_collective};
use burn::module::Module;
use burn::optim::{GradientsParams, Optimizer};
use spf_core::checkpoint;
use spf_core::collective;

use common::*;

/// `REPLICAS` replicas on their shards of steps `steps`, each through burn-collective; the
/// snapshots of each replica, and, with `save`, replica 0 checkpoints its model and wrapper
/// there after its last step.
fn replicas(
    first: &Mlp<B>,
    safety: &Safety,
    resume: Option<&Path>,
    steps: std::ops::Range<usize>,
    save: Option<&Path>,
) -> Vec<Vec<Snapshot>> {
    let all = batches();
    let config = CollectiveConfig::default().with_num_devices(REPLICAS);
    let traces = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..REPLICAS)
            .map(|peer| {
                let (steps, all, config) = (steps.clone(), &all, config.clone());
                scope.spawn(move || {
                    let device = Default::default();
                    let id = PeerId::from(peer);
                    register::<Inner>(id, device, config).unwrap();
                    let (mut model, mut optim) = (first.clone(), optimizer(first, safety));
                    if let Some(dir) = resume {
                        let record = checkpoint::load::<B, _>(dir.join("model"), &device).unwrap();
                        model = model.load_record(record);
                        let record = checkpoint::load::<B, _>(dir.join("optim"), &device).unwrap();
                        optim = optim.load_record(record);
                    }
                    let mut trace = Vec::new();
                    for step in steps {
                        let shard = rows(&all[step], peer * SHARD, (peer + 1) * SHARD);
                        let loss = loss(&model, &shard, &device);
                        let grads = GradientsParams::from_grads(loss.backward(), &model);
                        model = collective::step(&mut optim, id, LR, model, grads).unwrap();
                        trace.push(snapshot(&model, &optim));
                    }
                    if let (Some(dir), 0) = (save, peer) {
                        let model = model.clone().into_record();
                        checkpoint::save_atomic::<B, _>(model, dir.join("model")).unwrap();
                        checkpoint::save_atomic::<B, _>(optim.to_record(), dir.join("optim"))
                            .unwrap();
                    }
                    finish_collective::<Inner>(id).unwrap();
                    trace
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    reset_collective::<Inner>();
    traces
}

/// burn-collective's state is one per backend in the process: the tests take turns.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn two_replicas_step_as_one_on_the_merged_batch_and_resume_exactly() {
    let _turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let first = first_model();
    // Drawn once: burn's seeded random state is one per process, so replicas drawing their own
    // copy at the same time would interleave their draws and get different batches.
    let safety = Safety(samples(4, 99));
    let one = single(&first, &safety);
    let two = replicas(&first, &safety, None, 0..STEPS, None);

    // The replicas agree bit for bit: the same average, the same bases, the same step.
    assert!(two[0] == two[1], "the replicas differ");
    assert_eq!(
        two[0].last().unwrap().refreshes,
        3,
        "bases estimated at steps 0, 3 and 6"
    );
    // And they take the merged batch's steps.
    assert_same_steps(&one, &two[0], "two replicas");

    // Interrupted after step 4 (past the second refresh) and resumed from replica 0's
    // checkpoint, every replica ends where the uninterrupted run ends, bit for bit.
    let dir = fresh_dir("collective-resume");
    let before = replicas(&first, &safety, None, 0..4, Some(&dir));
    assert!(
        before[0] == two[0][..4],
        "a rerun differs from the first run"
    );
    let after = replicas(&first, &safety, Some(&dir), 4..STEPS, None);
    for (peer, trace) in after.iter().enumerate() {
        assert!(trace[..] == two[0][4..], "replica {peer} resumed elsewhere");
    }
}

/// Uneven gradients across replicas: a parameter a replica has no gradient for counts as zero in
/// the mean, no other parameter takes its place, and a replica with no gradient at all still
/// takes part (it used to return before the all-reduce, leaving the other waiting for ever; two
/// replicas missing different gradients of one size averaged the wrong parameters; one missing a
/// gradient the other had made burn-collective fail).
#[test]
fn uneven_gradients_average_by_parameter_and_never_hang() {
    let _turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let model = square_model();
    for (name, has) in UNEVEN {
        let config = CollectiveConfig::default().with_num_devices(REPLICAS);
        let (sender, results) = std::sync::mpsc::channel();
        for (peer, has) in has.into_iter().enumerate() {
            let (model, config, sender) = (model.clone(), config.clone(), sender.clone());
            // Detached, so that a replica waiting for ever fails the test instead of hanging it.
            std::thread::spawn(move || {
                let id = PeerId::from(peer);
                register::<Inner>(id, Default::default(), config).unwrap();
                let grads = uneven_grads(&model, has, peer);
                let mean = collective::all_reduce_mean(id, &model, grads).unwrap();
                finish_collective::<Inner>(id).unwrap();
                sender.send((peer, uneven_values(&model, &mean))).unwrap();
            });
        }
        let expected = uneven_expected(has);
        for _ in 0..REPLICAS {
            let (peer, values) = results
                .recv_timeout(std::time::Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("{name}: a replica never returned"));
            assert_eq!(values, expected, "{name}: replica {peer}");
        }
        reset_collective::<Inner>();
    }
}

/// Gradients that cannot travel as one tensor, or that belong to no parameter of the module,
/// are typed errors before any communication (mixed float types used to panic in `cat`;
/// gradients of other parameters were silently never averaged).
#[test]
fn mixed_float_types_and_foreign_gradients_are_refused() {
    use spf_core::collective::AllReduceError;
    let _turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let model = square_model();
    let id = PeerId::from(0);
    let config = CollectiveConfig::default().with_num_devices(1);
    register::<Inner>(id, Default::default(), config).unwrap();
    let mut mixed = uneven_grads(&model, [true; 4], 0);
    let bias = model.layers[1].bias.as_ref().unwrap().id;
    let wide: burn::tensor::Tensor<Inner, 1> = mixed.remove(bias).unwrap();
    mixed.register(bias, wide.cast(burn::tensor::DType::F64));
    assert!(matches!(
        collective::all_reduce_mean(id, &model, mixed),
        Err(AllReduceError::MixedDtypes { .. })
    ));
    let mut foreign = uneven_grads(&model, [true; 4], 0);
    let other = square_model();
    foreign.register(
        other.layers[0].weight.id,
        burn::tensor::Tensor::<Inner, 2>::ones([4, 4], &Default::default()),
    );
    assert_eq!(
        collective::all_reduce_mean(id, &model, foreign).err(),
        Some(AllReduceError::ForeignGradients { count: 1 })
    );
    // A replica alone still averages (over itself) what it has.
    let alone = collective::all_reduce_mean(id, &model, uneven_grads(&model, [true; 4], 0));
    let values = uneven_values(&model, &alone.unwrap());
    let ones = |v: &Option<Vec<f32>>| v.as_ref().is_some_and(|v| v.iter().all(|x| *x == 1.0));
    assert!(values.iter().all(ones), "{values:?}");
    finish_collective::<Inner>(id).unwrap();
    reset_collective::<Inner>();
}
