//! Stage 2 data-parallel on several replicas, the way burn-train's multi-device strategy runs
//! it: every replica computes the gradient of its shard of each batch on its own device (a copy
//! of the model forked there, in a thread of its own), burn gathers the shards' gradients onto
//! each parameter's device and sums them (`MultiGradientsParams`), and one optimizer steps on
//! the sum ([`Stepper::step_multi`](spf_harness::training::Stepper::step_multi)).
//!
//! Each shard's loss is scaled by `1/n`, so the sum is the mean of the shards' mean losses: with
//! equal shards, the batch's mean loss up to how the answer tokens are weighted ([`answer_loss`]
//! averages over a batch's answer tokens, and shards hold different numbers of them). A
//! replicated run is therefore the single-device run of the same batches up to that weighting
//! and the order of the sums.
//!
//! burn 0.21 ran this on burn-collective, one optimizer per replica and an all-reduce per step;
//! burn 0.22 has no collective operation on the CPU or WGPU (its all-reduce runs on CUDA only),
//! and its multi-device strategy steps one optimizer on gathered gradients instead.

use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsParams, MultiGradientsParams};
use burn::tensor::Device;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::batch::{Batch, answer_loss};
use crate::error::LabError;
use crate::finetune::{Method, Run, Stage, finetune_set, stepper};
use crate::world::Example;
use spf_harness::progress::Progress;
use spf_harness::seed::salt;
use spf_harness::training::BatchOrder;

/// `n` devices for `n` replicas: `device` itself `n` times (the CPU and lavapipe have one
/// device; the replicas then share its cores). Pass distinct devices to
/// [`Stage::run_replicated`] to spread the replicas over several GPUs.
pub fn replica_devices(n: usize, device: &Device) -> Vec<Device> {
    vec![device.clone(); n]
}

impl Stage<'_> {
    /// Fine-tunes a copy of the aligned model with `method` on the set of share `p` and seed
    /// `seed`, as [`Stage::run`] does, data-parallel with one replica per entry of `devices`
    /// (one entry: [`Stage::run`] itself). `progress` counts steps.
    ///
    /// # Errors
    ///
    /// [`LabError::Config`] when the batch size is not a multiple of the number of replicas, the
    /// defence has a sample screen (it would shard unequal batches), or a replica panicked;
    /// otherwise what [`Stage::run`] reports.
    pub fn run_replicated(
        &self,
        method: Method,
        p: f64,
        seed: u64,
        devices: &[Device],
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
        let vocab = self.world.vocab();
        let main = &devices[0];
        let safety = Batch::new(vocab, self.safety, main);
        let mut order = StdRng::seed_from_u64(seed ^ salt::BATCH_ORDER);
        let mut batches = BatchOrder::new(set.len(), self.finetune.batch_size);
        let mut model = self.aligned.clone().fork(main);
        let mut stepper = stepper(method, self.defence, &model, &safety)?;
        let mut curve = vec![self.score(&model, 0)];
        let (started, mut scoring) = (Instant::now(), 0.0);
        for step in 1..=self.finetune.steps {
            let picked = batches.next(&mut order);
            let shard = picked.len() / n;
            let shards: Vec<Vec<Example>> = (0..n)
                .map(|r| {
                    picked[r * shard..(r + 1) * shard]
                        .iter()
                        .map(|&i| set[i].clone())
                        .collect()
                })
                .collect();
            let grads = std::thread::scope(|scope| {
                let handles: Vec<_> = shards
                    .iter()
                    .zip(devices)
                    .map(|(examples, device)| {
                        let replica = model.clone().fork(device);
                        scope.spawn(move || {
                            let batch = Batch::new(vocab, examples, device);
                            let loss = answer_loss(&replica, &batch).div_scalar(n as f64);
                            let grads = GradientsParams::from_grads(loss.backward(), &replica);
                            (grads, device.clone())
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .map_err(|_| LabError::Config("a replica panicked".into()))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })?;
            let multi = MultiGradientsParams { grads };
            model = stepper.step_multi(self.finetune.lr, model, multi)?;
            scoring += self.score_if_due(&model, step, &mut curve);
            progress.advance(1);
        }
        let seconds = started.elapsed().as_secs_f64() - scoring;
        Ok(Run {
            method,
            p,
            seed,
            curve,
            projection: stepper.summary(),
            cosines: Vec::new(),
            screen: None,
            seconds,
        })
    }
}
