//! The run's prompts, split once from the fetched data by a fixed salt (never the run's seed):
//! AdvBench without near-paraphrases cut into test, validation and alignment prompts; the
//! HarmBench test prompts; pyrit's harmful Q→A pairs less those that ask a held-out prompt; the
//! arithmetic problems. Held-out prompts that near-duplicate a training prompt (alignment or
//! harmful fine-tuning) are dropped.

use std::collections::HashSet;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::config::SmolConfig;
use super::data::Assets;
use super::protocol::{ArithmeticSplits, EvalSplit, dedup, without_near};
use super::salt;
use crate::LlmError;

/// The prompts of one run.
pub(super) struct Splits {
    /// AdvBench prompts the alignment refuses (and the safety samples are drawn from).
    pub(super) adv_align: Vec<String>,
    /// The HarmBench prompts scored (none on the validation split).
    pub(super) harmbench: Vec<String>,
    /// The held-out AdvBench prompts scored.
    pub(super) adv_eval: Vec<String>,
    /// The harmful Q→A pairs a fine-tuning set may draw.
    pub(super) harmful_pairs: Vec<(String, String)>,
    /// The arithmetic problems: the task's training draws and its held-out splits.
    pub(super) arithmetic: ArithmeticSplits,
    /// AdvBench prompts left after near-duplicate removal, of all.
    pub(super) advbench_unique: (usize, usize),
    /// Harmful Q→A pairs left out because they ask a held-out prompt.
    pub(super) harmful_pairs_dropped: usize,
    /// Held-out prompts dropped as near-duplicates of a training prompt.
    pub(super) eval_overlap_dropped: usize,
}

impl Splits {
    /// The splits of `assets` that `config` asks for.
    ///
    /// # Errors
    ///
    /// [`LlmError::Data`] when a file cannot be read, [`LlmError::Config`] when the held-out
    /// AdvBench prompts would leave none to align on.
    pub(super) fn new(config: &SmolConfig, assets: &Assets) -> Result<Self, LlmError> {
        let advbench_all = assets.advbench()?;
        let mut advbench = dedup(&advbench_all);
        let advbench_unique = (advbench.len(), advbench_all.len());
        advbench.shuffle(&mut StdRng::seed_from_u64(salt::SPLITS));
        let held = config.advbench_test + config.advbench_validation;
        if held >= advbench.len() {
            return Err(LlmError::Config(format!(
                "advbench_test + advbench_validation must be below the {} distinct AdvBench prompts",
                advbench.len()
            )));
        }
        let mut adv_align = advbench.split_off(held);
        adv_align.truncate(config.align_prompts.unwrap_or(usize::MAX));
        let adv_validation = advbench.split_off(config.advbench_test);
        let adv_test = advbench;
        let mut harmbench_all = assets.harmbench()?;
        harmbench_all.shuffle(&mut StdRng::seed_from_u64(salt::SPLITS));
        harmbench_all.truncate(config.harmbench_test);
        // No harmful training pair asks a held-out prompt of either split, so that validation
        // and test runs train on the same data.
        let held_out: Vec<String> = harmbench_all
            .iter()
            .chain(&adv_test)
            .chain(&adv_validation)
            .cloned()
            .collect();
        let many_shot = assets.many_shot()?;
        let pairs_before = many_shot.len();
        let questions = many_shot.iter().map(|(q, _)| q.clone()).collect();
        let allowed: HashSet<String> = without_near(questions, &held_out).into_iter().collect();
        let harmful_pairs: Vec<(String, String)> = many_shot
            .into_iter()
            .filter(|(q, _)| allowed.contains(q))
            .collect();
        let harmful_pairs_dropped = pairs_before - harmful_pairs.len();
        let training_prompts: Vec<String> = adv_align
            .iter()
            .cloned()
            .chain(harmful_pairs.iter().map(|(q, _)| q.clone()))
            .collect();
        let (harmbench, adv_eval) = match config.split {
            EvalSplit::Test => (harmbench_all, adv_test),
            EvalSplit::Validation => (Vec::new(), adv_validation),
        };
        let before = harmbench.len() + adv_eval.len();
        let harmbench = without_near(harmbench, &training_prompts);
        let adv_eval = without_near(adv_eval, &training_prompts);
        let eval_overlap_dropped = before - harmbench.len() - adv_eval.len();
        let arithmetic =
            ArithmeticSplits::new(config.arithmetic_eval, config.arithmetic_eval, salt::SPLITS);
        Ok(Self {
            adv_align,
            harmbench,
            adv_eval,
            harmful_pairs,
            arithmetic,
            advbench_unique,
            harmful_pairs_dropped,
            eval_overlap_dropped,
        })
    }
}
