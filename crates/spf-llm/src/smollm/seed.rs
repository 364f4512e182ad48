//! What every cell of one seed shares ([`SeedContext`]): the aligned top blocks (stage 1,
//! [`super::align`]), the aligned model's greedy answers to held-out benign prompts (the
//! reference for benign agreement), and the fine-tuning data: arithmetic problems, harmful
//! pairs and the safety samples, all after the frozen blocks of the fine-tuning stage's lab
//! (for LoRA, which trains every block, after the embedding alone).

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use spf_harness::progress::Progress;

use super::align::aligned_top;
use super::blocks::{Lab, Prepared};
use super::cache::Cache;
use super::data::{REFUSALS, benign_prompts};
use super::pairs::{Encoder, Pair};
use super::protocol::Problem;
use super::salt;
use super::splits::Splits;
use crate::LlmError;
use crate::llama::Llama;

/// What every cell of one seed shares.
pub(super) struct SeedContext {
    /// The fine-tuning task's problems.
    pub(super) tasks: Vec<Problem>,
    /// Those problems with their answers, after the fine-tuning lab's frozen blocks.
    pub(super) task_set: Vec<Prepared>,
    /// The harmful Q→A pairs a fine-tuning set draws from.
    pub(super) harmful_set: Vec<Prepared>,
    /// Harmful prompts with refusals: SPF's safety batch and SafeInstr's refusals.
    pub(super) safety_set: Vec<Prepared>,
    /// Clean problems with their answers, apart from `tasks`, that set a calibrated screen's
    /// threshold (empty unless the screen is calibrated).
    pub(super) calibration_set: Vec<Prepared>,
    /// The aligned model's greedy answers to held-out benign prompts.
    pub(super) reference: Vec<Prepared>,
    /// The same, after the fine-tuning lab's frozen blocks.
    pub(super) attack_reference: Vec<Prepared>,
    /// The aligned top blocks.
    pub(super) aligned_top: Llama,
    /// What fine-tuning starts from: the aligned top blocks, or for LoRA the whole aligned
    /// model.
    pub(super) attack_start: Llama,
}

impl SeedContext {
    /// The context of `seed`: its alignment (from `cache` when there), then its data, after
    /// the frozen blocks of `whole` when fine-tuning trains every block (LoRA), else of `lab`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        lab: &Lab<'_>,
        whole: Option<&Lab<'_>>,
        cache: Option<&Cache>,
        encoder: Encoder<'_>,
        splits: &Splits,
        base_top: &Llama,
        seed: u64,
        progress: &mut dyn Progress,
    ) -> Result<Self, LlmError> {
        let config = lab.config;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut benign = benign_prompts(config.benign_train + config.benign_eval, seed);
        let benign_eval = benign.split_off(config.benign_train);
        let benign_train_ids = encoder.prompts(&benign)?;
        let benign_eval_ids = encoder.prompts(&benign_eval)?;
        let mut align_prompts = splits.adv_align.clone();
        align_prompts.shuffle(&mut rng);
        let aligned_top = aligned_top(
            lab,
            cache,
            encoder,
            base_top,
            seed,
            &align_prompts,
            &benign_train_ids,
            progress,
        )?;
        let aligned = lab.prefix.clone().join(aligned_top.clone());
        let (attack_lab, attack_start) = match whole {
            Some(whole) => (whole, aligned.clone()),
            None => (lab, aligned_top.clone()),
        };
        let reference = lab.generate(&aligned, &benign_eval_ids, config.max_answer_tokens);
        let reference: Vec<Pair> = benign_eval_ids
            .into_iter()
            .zip(reference)
            .map(|(prompt, answer)| Pair { prompt, answer })
            .collect();
        // The fine-tuning data: problems, harmful pairs and the safety samples (the alignment's
        // own refusal prompts, which SPF and SafeInstr share).
        let cut = config.max_answer_tokens;
        let tasks = splits
            .arithmetic
            .draw(config.finetune_samples, seed ^ salt::PROBLEMS);
        // Drawn from the same training pool on a stream of its own, less the set's problems.
        let calibration: Vec<Problem> = config
            .screen_calibration
            .map(|n| {
                let pool = splits
                    .arithmetic
                    .draw(n + tasks.len(), seed ^ salt::CALIBRATION);
                pool.into_iter()
                    .filter(|p| !tasks.contains(p))
                    .take(n)
                    .collect()
            })
            .unwrap_or_default();
        let mut harmful = splits.harmful_pairs.clone();
        harmful.shuffle(&mut StdRng::seed_from_u64(seed ^ salt::HARMFUL));
        harmful.truncate(config.finetune_samples);
        let mut safety_prompts = align_prompts;
        safety_prompts.shuffle(&mut StdRng::seed_from_u64(seed ^ salt::SAFETY));
        safety_prompts.truncate(config.safety_samples);
        let problem_pairs = |problems: &[Problem]| {
            problems
                .iter()
                .map(|t| encoder.pair(&t.prompt(), &t.answer(), cut))
                .collect::<Result<Vec<_>, _>>()
        };
        let task_pairs = problem_pairs(&tasks)?;
        let calibration_pairs = problem_pairs(&calibration)?;
        let harmful_pairs = harmful
            .iter()
            .map(|(q, a)| encoder.pair(q, a, cut))
            .collect::<Result<Vec<_>, _>>()?;
        let safety_pairs = safety_prompts
            .iter()
            .enumerate()
            .map(|(i, p)| encoder.pair(p, REFUSALS[i % REFUSALS.len()], cut))
            .collect::<Result<Vec<_>, _>>()?;
        let reference_set = lab.prepare(&reference);
        Ok(Self {
            tasks,
            task_set: attack_lab.prepare(&task_pairs),
            harmful_set: attack_lab.prepare(&harmful_pairs),
            safety_set: attack_lab.prepare(&safety_pairs),
            calibration_set: attack_lab.prepare(&calibration_pairs),
            attack_reference: match whole {
                Some(whole) => whole.prepare(&reference),
                None => reference_set.clone(),
            },
            reference: reference_set,
            aligned_top,
            attack_start,
        })
    }
}
