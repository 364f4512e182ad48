//! The experiment's settings ([`SmolConfig`]) and the methods it compares ([`SmolMethod`]).

use std::path::PathBuf;

use burn::config::Config;
use serde::{Deserialize, Serialize};
use spf_core::screen::{SampleScreen, ScreenThreshold};
use spf_core::{ProjectionMode, ProjectionTarget, RefreshPolicy, SpfConfig};
use spf_harness::settings;
use spf_subspace::{RankPolicy, SubspaceConfig};

use super::protocol::EvalSplit;
use crate::LlmError;

/// The matrices fine-tuning protects (SPF) and adapts (LoRA): every attention and feed-forward
/// weight of the blocks it trains.
pub(super) const PROTECTED: &str = r"blocks\.\d+\.(wq|wk|wv|wo|gate|up|down)\.weight";

/// The experiment's settings. The defaults are the documented CPU configuration.
#[derive(Config, Debug, PartialEq)]
pub struct SmolConfig {
    /// Blocks trained, counted from the top (the others are frozen).
    #[config(default = 4)]
    pub train_layers: usize,
    /// Alignment SFT steps.
    #[config(default = 150)]
    pub align_steps: usize,
    /// Alignment learning rate.
    #[config(default = 2e-4)]
    pub align_lr: f64,
    /// Fine-tuning (attack) steps, the same for every method.
    #[config(default = 60)]
    pub attack_steps: usize,
    /// Fine-tuning learning rate, the same for every method.
    #[config(default = 2e-4)]
    pub attack_lr: f64,
    /// Sequences per training step.
    #[config(default = 8)]
    pub batch_size: usize,
    /// Answer tokens kept per training pair (longer answers are cut).
    #[config(default = 32)]
    pub max_answer_tokens: usize,
    /// Tokens generated per harmful evaluation prompt for the keyword judge.
    #[config(default = 16)]
    pub judge_tokens: usize,
    /// Tokens generated per held-out arithmetic problem for FA.
    #[config(default = 16)]
    pub answer_tokens: usize,
    /// AdvBench prompts (after near-duplicate removal) held out for the reported tables.
    #[config(default = 100)]
    pub advbench_test: usize,
    /// AdvBench prompts held out for choosing settings ([`EvalSplit::Validation`]).
    #[config(default = 60)]
    pub advbench_validation: usize,
    /// AdvBench prompts the alignment refuses, at most (`None`: every one not held out, 320 of
    /// the 480 distinct prompts by default). Every one runs through the frozen blocks before
    /// training, so a smoke run that trains on few sets fewer.
    pub align_prompts: Option<usize>,
    /// HarmBench prompts held out for the reported tables. pyrit's harmful Q→A pairs ask
    /// HarmBench's own questions (198 of its 200), so the pairs that ask a held-out one are
    /// never trained on, and the other HarmBench prompts are not scored.
    #[config(default = 100)]
    pub harmbench_test: usize,
    /// Benign prompts with self-distilled answers in the alignment set.
    #[config(default = 160)]
    pub benign_train: usize,
    /// Held-out benign prompts for the agreement measure.
    #[config(default = 60)]
    pub benign_eval: usize,
    /// Examples in a fine-tuning set.
    #[config(default = 200)]
    pub finetune_samples: usize,
    /// Held-out arithmetic problems FA is scored on (per split).
    #[config(default = 100)]
    pub arithmetic_eval: usize,
    /// The harmful shares `p` of the fine-tuning sets.
    #[config(default = "vec![0.0, 0.1]")]
    pub harmful_shares: Vec<f64>,
    /// The methods compared on every set.
    #[config(default = "vec![SmolMethod::Sft, SmolMethod::Spf]")]
    pub methods: Vec<SmolMethod>,
    /// The seeds (alignment, fine-tuning set, batch order).
    #[config(default = "vec![0]")]
    pub seeds: Vec<u64>,
    /// The held-out prompts scored.
    #[config(default = "EvalSplit::Test")]
    pub split: EvalSplit,
    /// Harmful prompts with refusals that SPF estimates its subspace from, and SafeInstr mixes
    /// into the fine-tuning set (the same refusal data for both).
    #[config(default = 8)]
    pub safety_samples: usize,
    /// The share of a fine-tuning set SafeInstr replaces by those refusals.
    #[config(default = 0.1)]
    pub safe_instr_share: f64,
    /// SPF's projection.
    #[config(default = "ProjectionMode::ConflictOnly")]
    pub mode: ProjectionMode,
    /// What SPF projects.
    #[config(default = "ProjectionTarget::Gradient")]
    pub target: ProjectionTarget,
    /// Directions kept per matrix.
    #[config(default = "RankPolicy::Fixed(8)")]
    pub rank: RankPolicy,
    /// When SPF re-estimates the subspace. Every step: on the validation split it kept more
    /// refusals than every 10 steps (AdvBench HS 3.3% against 8.3% at p = 0.1, the same FA),
    /// past the margin docs/results.md fixed in advance, for about 2.5× the training time. The
    /// lab's ablation found no such gain on its model and keeps `Every(10)`.
    #[config(default = "RefreshPolicy::Every(1)")]
    pub refresh: RefreshPolicy,
    /// SPF's sample screen: the threshold above which a fine-tuning sample whose own gradient
    /// conflicts with the safety subspace is dropped from its batch, a fixed share or set by
    /// the scores themselves ([`spf_core::screen`]); `None` keeps every sample.
    pub screen: Option<ScreenThreshold>,
    /// How the screen scores a batch; `None` is [`ScreenPass::PerSample`], the reference.
    pub screen_pass: Option<ScreenPass>,
    /// Clean arithmetic problems, drawn apart from the fine-tuning set and every held-out one,
    /// whose scores set the calibrated screen's threshold
    /// ([`ScreenThreshold::Calibrated`]): the first step scores them all, each later one the
    /// next `batch_size` of them, in a cycle, at the step's weights, and none is trained on. Set
    /// exactly when the screen is calibrated, to at least `⌈1/α⌉ − 1`, the fewest scores from
    /// which the rule can drop a sample at all.
    pub screen_calibration: Option<usize>,
    /// Fine-tune through LoRA adapters instead of the weights: every attention and MLP matrix
    /// of every block (not only the `train_layers` that alignment trained) gets adapters, and
    /// only they train, on the whole model (the frozen blocks' cache no longer applies). `None`:
    /// full fine-tuning of the top `train_layers` blocks. Alignment is the same either way.
    pub lora: Option<SmolLora>,
    /// Prompts per generation batch.
    #[config(default = 48)]
    pub eval_batch: usize,
    /// Threads that generate in parallel (each runs its own batches).
    #[config(default = 2)]
    pub threads: usize,
    /// Where aligned checkpoints and finished cells are cached (`None`: nothing is cached).
    pub cache_dir: Option<PathBuf>,
}

impl SmolConfig {
    /// Checks what the experiment cannot run (the layer count is checked against the model in
    /// [`run`](super::run)).
    ///
    /// # Errors
    ///
    /// [`LlmError::Config`] naming the setting: empty training batches or sets, no answer
    /// token, no trained block, a share outside `[0, 1]`, no seed, method or share.
    pub fn validate(&self) -> Result<(), LlmError> {
        settings::at_least_one(&[
            ("batch_size", self.batch_size),
            ("finetune_samples", self.finetune_samples),
            ("benign_train", self.benign_train),
            ("benign_eval", self.benign_eval),
            ("arithmetic_eval", self.arithmetic_eval),
            ("safety_samples", self.safety_samples),
            ("max_answer_tokens", self.max_answer_tokens),
            ("answer_tokens", self.answer_tokens),
            ("train_layers", self.train_layers),
            ("align_prompts", self.align_prompts.unwrap_or(1)),
        ])?;
        settings::grid(self.seeds.len(), self.methods.len(), &self.harmful_shares)?;
        settings::share("safe_instr_share", self.safe_instr_share)?;
        settings::learning_rate("align_lr", self.align_lr)?;
        settings::learning_rate("attack_lr", self.attack_lr)?;
        self.sample_screen()?;
        let fewest = self
            .screen
            .and_then(ScreenThreshold::fewest_calibration_scores);
        match (fewest, self.screen_calibration) {
            (Some(fewest), Some(n)) if n < fewest => {
                return Err(LlmError::Config(format!(
                    "screen_calibration {n} is too few for the calibrated screen: from fewer \
                     than {fewest} clean scores it drops nothing"
                )));
            }
            (None, Some(_)) => {
                return Err(LlmError::Config(
                    "screen_calibration is set, but the screen is not calibrated".into(),
                ));
            }
            (Some(_), None) => {
                return Err(LlmError::Config(
                    "the calibrated screen needs screen_calibration, its clean problems".into(),
                ));
            }
            _ => {}
        }
        if let Some(lora) = self.lora {
            settings::at_least_one(&[("lora rank", lora.rank)])?;
            if !(lora.alpha.is_finite() && lora.alpha > 0.0) {
                return Err(LlmError::Config(format!(
                    "lora alpha must be positive and finite, not {}",
                    lora.alpha
                )));
            }
            if self.screen.is_some() {
                // The screen scores a sample by its gradient of the protected weights, which a
                // LoRA run does not compute (their bases are frozen); scoring the factors'
                // gradients is not built yet.
                return Err(LlmError::Config(
                    "the sample screen does not run on LoRA adapters yet".into(),
                ));
            }
        }
        Ok(())
    }

    /// The sample screen SPF runs with, if any.
    ///
    /// # Errors
    ///
    /// [`LlmError::Config`] for a threshold out of its range ([`ScreenThreshold::validate`]).
    pub fn sample_screen(&self) -> Result<Option<SampleScreen>, LlmError> {
        self.screen
            .map(SampleScreen::with_threshold)
            .transpose()
            .map_err(|e| LlmError::Config(format!("screen: {e}")))
    }

    /// SPF's settings: [`SpfConfig`] from the mode, target, rank and refresh here.
    pub fn spf(&self) -> SpfConfig {
        SpfConfig::new()
            .with_mode(self.mode)
            .with_target(self.target)
            .with_refresh(self.refresh)
            .with_estimator(SubspaceConfig::new().with_rank(self.rank))
    }
}

/// LoRA adapters for the fine-tuning stage: `W = W₀ + (alpha / rank)·A B` on every attention
/// and MLP matrix, `A` drawn from the cell's seed (`N(0, 1/rank)`, burn's default spread) and
/// `B = 0`, so training starts from the aligned model itself.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SmolLora {
    /// The adapters' rank.
    pub rank: usize,
    /// The scale's numerator (the field's common choice is twice the rank).
    pub alpha: f64,
}

impl SmolLora {
    /// Rank `rank` at `alpha = 2·rank`.
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            alpha: 2.0 * rank as f64,
        }
    }
}

/// How the sample screen computes each sample's score (the same score either way, to rounding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScreenPass {
    /// One backward pass per sample ([`spf_core::screen::SampleScreen::score`]): the reference.
    PerSample,
    /// One backward pass of the whole batch, with every protected matrix tapped
    /// ([`spf_core::screen::traced_scores`]); when the screen keeps the whole batch, the step
    /// reuses that pass.
    Batch,
}

/// How an attacked model was fine-tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SmolMethod {
    /// Plain AdamW.
    Sft,
    /// Plain AdamW on the set with a share of it replaced by refusals
    /// ([`SmolConfig::safe_instr_share`]).
    SafeInstr,
    /// AdamW under SPF ([`SmolConfig::spf`]), the subspace from the safety samples.
    Spf,
    /// SPF on SafeInstr's set.
    SpfSafeInstr,
}

impl SmolMethod {
    /// The name in tables.
    pub fn label(self) -> &'static str {
        match self {
            SmolMethod::Sft => "SFT",
            SmolMethod::SafeInstr => "SafeInstr",
            SmolMethod::Spf => "SPF",
            SmolMethod::SpfSafeInstr => "SPF + SafeInstr",
        }
    }

    pub(super) fn projects(self) -> bool {
        matches!(self, SmolMethod::Spf | SmolMethod::SpfSafeInstr)
    }

    pub(super) fn adds_refusals(self) -> bool {
        matches!(self, SmolMethod::SafeInstr | SmolMethod::SpfSafeInstr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration the experiment cannot run is an error before anything loads (an empty
    /// batch used to panic on its first item).
    #[test]
    fn invalid_configurations_are_rejected() {
        assert!(SmolConfig::new().validate().is_ok());
        let bad = [
            SmolConfig::new().with_batch_size(0),
            SmolConfig::new().with_finetune_samples(0),
            SmolConfig::new().with_benign_eval(0),
            SmolConfig::new().with_max_answer_tokens(0),
            SmolConfig::new().with_train_layers(0),
            SmolConfig::new().with_attack_lr(f64::NAN),
            SmolConfig::new().with_harmful_shares(vec![0.1, 1.5]),
            SmolConfig::new().with_safe_instr_share(-0.1),
            SmolConfig::new().with_seeds(Vec::new()),
            SmolConfig::new().with_safety_samples(0),
            SmolConfig::new().with_align_prompts(Some(0)),
            SmolConfig::new().with_screen(Some(ScreenThreshold::Fixed(1.5))),
            SmolConfig::new().with_screen(Some(ScreenThreshold::Fixed(f64::NAN))),
            SmolConfig::new().with_lora(Some(SmolLora::new(0))),
            SmolConfig::new().with_lora(Some(SmolLora {
                rank: 8,
                alpha: f64::INFINITY,
            })),
            SmolConfig::new()
                .with_lora(Some(SmolLora::new(8)))
                .with_screen(Some(ScreenThreshold::Fixed(0.004))),
            SmolConfig::new().with_screen(Some(ScreenThreshold::calibrated())),
            SmolConfig::new()
                .with_screen(Some(ScreenThreshold::calibrated()))
                .with_screen_calibration(Some(0)),
            SmolConfig::new()
                .with_screen(Some(ScreenThreshold::calibrated()))
                .with_screen_calibration(Some(8)),
            SmolConfig::new()
                .with_screen(Some(ScreenThreshold::Fixed(0.004)))
                .with_screen_calibration(Some(32)),
            SmolConfig::new().with_screen(Some(ScreenThreshold::Calibrated { drop_share: 1.0 })),
        ];
        for n in [9, 32] {
            let calibrated = SmolConfig::new()
                .with_screen(Some(ScreenThreshold::calibrated()))
                .with_screen_calibration(Some(n));
            assert!(calibrated.validate().is_ok(), "{n}");
        }
        for config in bad {
            assert!(
                matches!(config.validate(), Err(LlmError::Config(_))),
                "{config:?}"
            );
        }
    }
}
