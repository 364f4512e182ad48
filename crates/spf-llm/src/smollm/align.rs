//! Stage 1, alignment: SFT of the top blocks on AdvBench prompts paired with refusals, mixed
//! with benign prompts paired with the base model's own greedy answers (self-distillation keeps
//! benign behaviour); once per seed, cached.

use spf_harness::progress::Progress;

use super::blocks::{Lab, Schedule, TrainWith, Trained, Tuning};
use super::cache::Cache;
use super::data::REFUSALS;
use super::pairs::{Encoder, Pair};
use super::salt;
use crate::LlmError;
use crate::llama::Llama;

/// The seed's aligned top blocks: read from `cache` if it holds them, else trained from
/// `base_top` (the whole base model, frozen bottom and `base_top`, distils the benign answers)
/// and stored there.
///
/// `align_prompts` are the harmful prompts to refuse, in the seed's order, and
/// `benign_train_ids` the benign prompts to distil.
#[allow(clippy::too_many_arguments)]
pub(super) fn aligned_top(
    lab: &Lab<'_>,
    cache: Option<&Cache>,
    encoder: Encoder<'_>,
    base_top: &Llama,
    seed: u64,
    align_prompts: &[String],
    benign_train_ids: &[Vec<u32>],
    progress: &mut dyn Progress,
) -> Result<Llama, LlmError> {
    let config = lab.config;
    if let Some(top) = cache.and_then(|c| c.aligned(config, seed, base_top)) {
        return Ok(top);
    }
    progress.start("base model: benign answers to distil", 1);
    let base = lab.prefix.clone().join(base_top.clone());
    let distilled = lab.generate(&base, benign_train_ids, config.max_answer_tokens);
    progress.finish("done");
    let mut align_pairs = align_prompts
        .iter()
        .enumerate()
        .map(|(i, p)| encoder.pair(p, REFUSALS[i % REFUSALS.len()], config.max_answer_tokens))
        .collect::<Result<Vec<_>, _>>()?;
    align_pairs.extend(
        benign_train_ids
            .iter()
            .zip(&distilled)
            .map(|(prompt, answer)| Pair {
                prompt: prompt.clone(),
                answer: answer.clone(),
            }),
    );
    let align_set = lab.prepare(&align_pairs);
    let Trained { top, .. } = lab.train(
        base_top.clone(),
        &align_set,
        TrainWith::Plain,
        Schedule {
            steps: config.align_steps,
            lr: config.align_lr,
            order_seed: seed ^ salt::BATCH_ORDER,
            tuning: Tuning::Full,
        },
        &format!("align (seed {seed})"),
        progress,
    )?;
    if let Some(c) = cache {
        c.store_aligned(config, seed, &top)?;
    }
    Ok(top)
}
