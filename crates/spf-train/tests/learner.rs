//! SPF in burn-train's `Learner`, through `examples/learner.rs` itself: the projection statistics
//! reach burn-train's metric logs, and resuming from burn-train's checkpoint restores SPF's state
//! (carried in the model's record) and AdamW's, so an interrupted run ends bit for bit where an
//! uninterrupted one does.

#[path = "../examples/learner.rs"]
#[allow(dead_code)]
mod learner;

use std::path::Path;

use burn::module::Module;

fn parameters(model: &learner::Regressor) -> Vec<burn::tensor::TensorData> {
    let mut all = Vec::new();
    model.visit(&mut Collect(&mut all));
    all
}

struct Collect<'a>(&'a mut Vec<burn::tensor::TensorData>);

impl burn::module::ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(
        &mut self,
        param: &burn::module::Param<burn::tensor::Tensor<D>>,
    ) {
        self.0.push(param.val().into_data());
    }
}

/// burn's seeded random state is one per process, and each run seeds it to draw its data and
/// model: the tests take turns, or their draws interleave.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Two epochs on `devices` devices (LoRA of rank `lora`, if any) into `<name>-whole`, and the
/// same interrupted after epoch 1 and resumed from its checkpoint in `<name>-split`: both
/// outcomes, and the whole run's directory. The two must end with the same parameters.
fn whole_and_resumed(
    name: &str,
    devices: usize,
    lora: Option<usize>,
) -> (learner::Outcome, learner::Outcome, std::path::PathBuf) {
    let options = |epochs, resume| learner::Options {
        epochs,
        resume,
        devices,
        lora,
    };
    let whole = fresh_dir(&format!("{name}-whole"));
    let a = learner::run(&whole, options(2, None)).unwrap();
    let split = fresh_dir(&format!("{name}-split"));
    learner::run(&split, options(1, None)).unwrap();
    assert!(split.join("checkpoint/optim-1.bpk").exists());
    let b = learner::run(&split, options(2, Some(1))).unwrap();
    assert_eq!(parameters(&a.model), parameters(&b.model));
    (a, b, whole)
}

#[test]
fn metrics_are_logged_and_a_resumed_run_matches_an_uninterrupted_one() {
    let _turn = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b, whole) = whole_and_resumed("learner", 1, None);
    // Each run draws its own parameter ids; compare by path.
    let by_path = |o: &learner::Outcome| -> Vec<_> {
        o.stats
            .tensors
            .iter()
            .map(|t| (t.path.clone(), t.stats))
            .collect()
    };
    assert_eq!(by_path(&a), by_path(&b));
    assert_eq!(a.stats.refresh.count, b.stats.refresh.count);
    assert!(a.stats.refresh.count >= 6, "refreshes every 5 of 32 steps");
    assert!(a.stats.removed() > 0, "the objectives conflict");

    // burn-train names each log after its metric, spaces as underscores.
    for metric in [
        "SPF_conflicting_directions",
        "SPF_removed_energy",
        "SPF_refreshes",
    ] {
        let log = whole.join(format!("train/epoch-2/{metric}.log"));
        let text =
            std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        // burn-train 0.22 ends each epoch's log with the epoch's value, marked `final`.
        let steps = text.lines().filter(|l| !l.ends_with(",final")).count();
        assert_eq!(steps, 16, "one entry per step of epoch 2 in {metric}");
        assert!(
            text.lines().last().is_some_and(|l| l.ends_with(",final")),
            "{metric}: the epoch's final value"
        );
    }
}

/// burn-train's multi-device strategy (two replicas, optimization sharded: burn sums the devices'
/// gradients before SPF projects them) trains, refreshes and resumes bit for bit too.
#[test]
fn the_multi_device_strategy_trains_refreshes_and_resumes_exactly() {
    let _turn = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b, _) = whole_and_resumed("learner-multi", 2, None);
    assert_eq!(a.stats.refresh.count, b.stats.refresh.count);
    // Each device takes half of the data: 16 steps of 2 × 32 samples in 2 epochs (a single
    // device takes 32), so the bases are estimated at steps 0, 5, 10 and 15.
    assert_eq!(a.stats.refresh.count, 4, "refreshes every 5 of 16 steps");
    assert!(a.stats.removed() > 0, "the objectives conflict");
}

/// A LoRA run (rank 2 on every weight of the MLP): SPF projects the factors' gradients, keys its
/// statistics by the adapted weights, and the run resumes from burn-train's checkpoint bit for
/// bit, the factors and their AdamW state included. (The resumed model has the record's
/// parameter ids, its factors' among them, which the protection adopts.)
#[test]
fn a_lora_run_is_protected_and_resumes_exactly() {
    let _turn = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b, _) = whole_and_resumed("learner-lora", 1, Some(2));
    assert_eq!(a.stats.refresh.count, b.stats.refresh.count);
    assert!(a.stats.refresh.count >= 6, "refreshes every 5 of 32 steps");
    assert!(
        a.stats.removed() > 0,
        "the objectives conflict through the adapters"
    );
    assert_eq!(b.stats.removed(), a.stats.removed());
    let paths: Vec<_> = a.stats.tensors.iter().map(|t| t.path.to_string()).collect();
    assert_eq!(paths.len(), 3, "one entry per adapted weight: {paths:?}");
    assert!(paths.iter().all(|p| p.ends_with("weight")), "{paths:?}");
    assert_eq!(
        parameters(&a.model).len(),
        3 * 4,
        "each layer: weight, its two factors, bias"
    );
}
