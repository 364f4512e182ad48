//! Stage 2 data-parallel on several replicas, on burn's collective engine (`burn-collective`):
//! each replica holds a copy of the model and its own optimizer, computes the gradient of its
//! shard of every batch, and steps on the average of all replicas' gradients
//! ([`spf_core::collective::all_reduce_mean`]: one operation per step, parameters paired by
//! their place in the module, then the method's [`Stepper`](spf_harness::training::Stepper)).
//!
//! With equal shards, the average of the shards' mean losses is the batch's mean loss up to how
//! the answer tokens are weighted ([`answer_loss`] averages over a batch's answer tokens, and
//! shards hold different numbers of them), so a replicated run is the single-device run of the
//! same batches up to that weighting and the order of the sums. Every replica draws the same
//! batch order, estimates the same bases from the same safety batch, and refreshes at the same
//! step; replica 0 scores the curve while the others wait at the next all-reduce.

use std::time::Instant;

use burn::collective::{CollectiveConfig, PeerId, finish_collective, register, reset_collective};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::backend::Device as _;
use burn::tensor::backend::{AutodiffBackend, Backend, DeviceId, DeviceOps};
use rand::SeedableRng;
use rand::rngs::StdRng;
use spf_core::collective::all_reduce_mean;

use crate::batch::{Batch, answer_loss};
use crate::error::LabError;
use crate::eval::Scores;
use crate::finetune::{Method, Run, Stage, finetune_set, stepper};
use crate::world::Example;
use spf_harness::progress::Progress;
use spf_harness::seed::salt;
use spf_harness::training::{BatchOrder, ProjectionSummary};

/// `n` devices for `n` replicas: the backend's first `n` devices of `device`'s kind when it has
/// that many (CUDA, Vulkan), otherwise `device` itself `n` times (burn-ndarray has one device:
/// the replicas then share the CPU's cores).
pub fn replica_devices<B: Backend>(n: usize, device: &B::Device) -> Vec<B::Device> {
    let id = device.id();
    if B::device_count(id.type_id) >= n {
        (0..n)
            .map(|index_id| {
                B::Device::from_id(DeviceId {
                    type_id: id.type_id,
                    index_id: index_id as u16,
                })
            })
            .collect()
    } else {
        vec![device.clone(); n]
    }
}

impl<B: AutodiffBackend> Stage<'_, B> {
    /// Fine-tunes a copy of the aligned model with `method` on the set of share `p` and seed
    /// `seed`, as [`Stage::run`] does, data-parallel with one replica per entry of `devices`
    /// (one entry: [`Stage::run`] itself). `progress` counts steps.
    ///
    /// # Errors
    ///
    /// [`LabError::Config`] when the batch size is not a multiple of the number of replicas, or
    /// the defence has a sample screen (it would shard unequal batches); otherwise what
    /// [`Stage::run`] reports, and [`LabError::Collective`] when burn-collective fails.
    pub fn run_replicated(
        &self,
        method: Method,
        p: f64,
        seed: u64,
        devices: &[B::Device],
        progress: &mut dyn Progress,
    ) -> Result<Run, LabError> {
        let n = devices.len();
        if n <= 1 {
            return self.run(method, p, seed, crate::finetune::CosineProbe::Off, progress);
        }
        if !self.finetune.batch_size.is_multiple_of(n) {
            return Err(LabError::Config(format!(
                "the batch size {} is not a multiple of the {n} replicas",
                self.finetune.batch_size
            )));
        }
        if self.defence.screen.is_some() {
            return Err(LabError::Config(
                "the sample screen cannot run on replicas: it would shard unequal batches".into(),
            ));
        }
        let set = finetune_set(self.world, self.finetune, p, method, seed)?;
        let config = CollectiveConfig::default().with_num_devices(n);
        let outcome = std::thread::scope(|scope| {
            let others: Vec<_> = (1..n)
                .map(|peer| {
                    let (set, config, device) = (&set, config.clone(), devices[peer].clone());
                    scope.spawn(move || {
                        self.replica(peer, n, method, seed, set, &device, config, None)
                    })
                })
                .collect();
            let first = self.replica(
                0,
                n,
                method,
                seed,
                &set,
                &devices[0],
                config,
                Some(progress),
            );
            let others: Vec<_> = others
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(collective("a replica panicked")))
                })
                .collect();
            (first, others)
        });
        reset_collective::<B::InnerBackend>();
        let (first, others) = outcome;
        for other in others {
            other?;
        }
        let (curve, projection, seconds) = first?;
        Ok(Run {
            method,
            p,
            seed,
            curve,
            projection,
            cosines: Vec::new(),
            screen: None,
            seconds,
        })
    }

    /// Replica `peer` of `n`: registers with burn-collective, fine-tunes on its shard of each
    /// batch, and leaves. Replica 0 (the one given `progress`) scores the curve and times the
    /// steps (without the scoring); the others return an empty curve.
    #[allow(clippy::too_many_arguments)]
    fn replica(
        &self,
        peer: usize,
        n: usize,
        method: Method,
        seed: u64,
        set: &[Example],
        device: &B::Device,
        config: CollectiveConfig,
        mut progress: Option<&mut dyn Progress>,
    ) -> Result<(Vec<Scores>, Option<ProjectionSummary>, f64), LabError> {
        let id = PeerId::from(peer);
        register::<B::InnerBackend>(id, device.clone(), config).map_err(debug)?;
        let vocab = self.world.vocab();
        let safety = Batch::<B>::new(vocab, self.safety, device);
        let mut order = StdRng::seed_from_u64(seed ^ salt::BATCH_ORDER);
        let mut batches = BatchOrder::new(set.len(), self.finetune.batch_size);
        let mut model = self.aligned.clone().fork(device);
        let mut stepper = stepper(method, self.defence, &model, &safety)?;
        let scores = progress.is_some();
        let mut curve = Vec::new();
        if scores {
            curve.push(self.score(&model, 0));
        }
        let (started, mut scoring) = (Instant::now(), 0.0);
        let steps = self.finetune.steps;
        for step in 1..=steps {
            let picked = batches.next(&mut order);
            let shard = picked.len() / n;
            let examples: Vec<Example> = picked[peer * shard..(peer + 1) * shard]
                .iter()
                .map(|&i| set[i].clone())
                .collect();
            let batch = Batch::new(vocab, &examples, device);
            let grads = GradientsParams::from_grads(answer_loss(&model, &batch).backward(), &model);
            let grads = all_reduce_mean(id, &model, grads)
                .map_err(|e| LabError::Collective(e.to_string()))?;
            model = stepper.step(self.finetune.lr, model, grads)?;
            if let Some(progress) = progress.as_deref_mut() {
                scoring += self.score_if_due(&model, step, &mut curve);
                progress.advance(1);
            }
        }
        let seconds = started.elapsed().as_secs_f64() - scoring;
        finish_collective::<B::InnerBackend>(id).map_err(debug)?;
        Ok((curve, stepper.summary(), seconds))
    }
}

/// A burn-collective failure, which describes itself only through `Debug`.
fn debug(err: burn::collective::CollectiveError) -> LabError {
    collective(&format!("{err:?}"))
}

fn collective(message: &str) -> LabError {
    LabError::Collective(message.to_owned())
}
