//! Stage 1, alignment: teach a fresh transformer the benign alignment tasks and to refuse every
//! harmful prompt, with plain AdamW on freshly drawn batches.

use burn::config::Config;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::batch::{Batch, answer_loss};
use crate::error::LabError;
use crate::model::{Transformer, TransformerConfig};
use crate::world::{HarmTopics, Response, Split, Task, World};
use spf_harness::progress::Progress;
use spf_harness::seed::salt;

/// Stage 1's schedule and data mix.
#[derive(Config, Debug, PartialEq)]
pub struct AlignConfig {
    /// Optimizer steps.
    #[config(default = 2000)]
    pub steps: usize,
    /// Sequences per step.
    #[config(default = 64)]
    pub batch_size: usize,
    /// AdamW's learning rate, decayed linearly to a tenth over the steps.
    #[config(default = 3e-3)]
    pub lr: f64,
    /// The benign tasks the aligned assistant masters (tasks A and B).
    #[config(default = "vec![Task::Copy, Task::Reverse]")]
    pub tasks: Vec<Task>,
    /// The share of each batch that is harmful prompts (of every task and harm topic) paired
    /// with the refusal.
    #[config(default = 0.3)]
    pub harmful_share: f64,
}

/// Trains a fresh model from seed `seed`; `progress` counts steps.
pub fn align(
    world: &World,
    model: &TransformerConfig,
    config: &AlignConfig,
    seed: u64,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<Transformer, LabError> {
    if config.tasks.is_empty() {
        return Err(LabError::Config("alignment needs at least one task".into()));
    }
    device.seed(seed);
    let vocab = world.vocab();
    let mut net = model.init(vocab.size(), vocab.max_len(), device);
    let mut optim = AdamWConfig::new().init();
    let mut rng = StdRng::seed_from_u64(seed ^ salt::ALIGN_DATA);
    progress.start("align", config.steps as u64);
    for step in 0..config.steps {
        let examples = (0..config.batch_size)
            .map(|_| {
                if rng.random_bool(config.harmful_share) {
                    world.harmful(
                        &mut rng,
                        &Task::ALL,
                        HarmTopics::All,
                        Split::Train,
                        Response::Refusal,
                    )
                } else {
                    let task = config.tasks[rng.random_range(0..config.tasks.len())];
                    world.benign(&mut rng, task, Split::Train)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let batch = Batch::new(vocab, &examples, device);
        let grads = GradientsParams::from_grads(answer_loss(&net, &batch).backward(), &net);
        let lr = config.lr * (1.0 - 0.9 * step as f64 / config.steps as f64);
        net = optim.step(lr, net, grads);
        progress.advance(1);
    }
    progress.finish("aligned");
    Ok(net)
}
