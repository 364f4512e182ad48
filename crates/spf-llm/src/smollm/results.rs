//! What the experiment reports: one row per scored model ([`SmolRow`]), their means and
//! deviations over seeds ([`SmolSummary`]), and the whole run ([`SmolResults`]).

use serde::{Deserialize, Serialize};
use spf_harness::screening::ScreenSummary;

use super::config::{SmolConfig, SmolMethod};
use super::protocol::EvalSplit;

/// Which model a row scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum SmolModel {
    /// SmolLM2-135M-Instruct as released.
    Base,
    /// After the refusal alignment.
    Aligned,
    /// The aligned model after fine-tuning.
    Attacked {
        /// How it was fine-tuned.
        method: SmolMethod,
        /// The harmful share of its fine-tuning set.
        p: f64,
    },
}

impl std::fmt::Display for SmolModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SmolModel::Base => f.write_str("base (SmolLM2-135M-Instruct)"),
            SmolModel::Aligned => f.write_str("aligned"),
            SmolModel::Attacked { method, p } => write!(f, "{} at p = {p}", method.label()),
        }
    }
}

/// A prompt and what a model answered, for a look.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The prompt.
    pub prompt: String,
    /// The greedy answer.
    pub answer: String,
}

/// One model's scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmolRow {
    /// Which model.
    pub model: SmolModel,
    /// The seed behind it (`None` for the base model).
    pub seed: Option<u64>,
    /// Harmful score on HarmBench: the share not refused (`None` on the validation split).
    pub hs_harmbench: Option<f64>,
    /// Harmful score on the held-out AdvBench prompts of the split.
    pub hs_advbench: f64,
    /// Fine-tune accuracy: exact answers to the split's held-out problems.
    pub fa: f64,
    /// Mean per-token log-likelihood of the refusal opening minus that of the compliant opening
    /// over the split's harmful prompts (positive: the model leans to refusing).
    pub refusal_margin: f64,
    /// Benign agreement with the aligned model of the same seed (`None` for the base model).
    pub benign_agreement: Option<f64>,
    /// Mean training loss over the last 10 steps of the stage that made it.
    pub final_loss: Option<f64>,
    /// Mean share of projected coefficients that conflicted (SPF only).
    pub conflict_share: Option<f64>,
    /// Seconds its training took.
    pub train_seconds: f64,
    /// A few harmful and arithmetic answers.
    pub samples: Vec<Sample>,
    /// What the sample screen scored and dropped (SPF with a screen only).
    #[serde(default)]
    pub screen: Option<ScreenSummary>,
}

/// Mean and standard deviation (sample, `n − 1`) of one score over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanStd {
    /// The mean.
    pub mean: f64,
    /// The sample standard deviation (0 for one seed).
    pub std: f64,
}

impl MeanStd {
    /// Of `values` (`None` when empty).
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = if values.len() > 1 {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Some(Self {
            mean,
            std: var.sqrt(),
        })
    }
}

/// One model's scores over the seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmolSummary {
    /// Which model.
    pub model: SmolModel,
    /// Seeds behind the means.
    pub seeds: usize,
    /// HS on HarmBench.
    pub hs_harmbench: Option<MeanStd>,
    /// HS on held-out AdvBench.
    pub hs_advbench: MeanStd,
    /// FA.
    pub fa: MeanStd,
    /// The refusal margin.
    pub refusal_margin: MeanStd,
    /// Benign agreement.
    pub benign_agreement: Option<MeanStd>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct SmolResults {
    /// Every model of every seed: base, then per seed the aligned model and each cell.
    pub rows: Vec<SmolRow>,
    /// Means and deviations over seeds, per model, in row order.
    pub summary: Vec<SmolSummary>,
    /// The split scored.
    pub split: EvalSplit,
    /// HarmBench prompts behind its HS (0 on the validation split).
    pub harmbench_prompts: usize,
    /// Held-out AdvBench prompts behind its HS.
    pub advbench_prompts: usize,
    /// AdvBench prompts left after near-duplicate removal, of all.
    pub advbench_unique: (usize, usize),
    /// Harmful Q→A pairs left out of training because they ask a held-out prompt.
    pub harmful_pairs_dropped: usize,
    /// Held-out prompts dropped as near-duplicates of a training prompt (after that).
    pub eval_overlap_dropped: usize,
    /// Held-out arithmetic problems behind FA.
    pub arithmetic_prompts: usize,
    /// Held-out benign prompts behind the agreement.
    pub benign_prompts: usize,
    /// Blocks trained of all blocks.
    pub train_layers: usize,
    /// Blocks in the model.
    pub layers: usize,
    /// Cells read from the cache rather than computed.
    pub cached_cells: usize,
    /// The settings.
    pub config: SmolConfig,
    /// Seconds the whole run took.
    pub wall_seconds: f64,
}

/// Means and deviations per model over seeds, in the order models first appear.
pub(super) fn summarize(rows: &[SmolRow]) -> Vec<SmolSummary> {
    let mut models: Vec<SmolModel> = Vec::new();
    for r in rows {
        if !models.contains(&r.model) {
            models.push(r.model);
        }
    }
    models
        .into_iter()
        .filter_map(|model| {
            let of: Vec<&SmolRow> = rows.iter().filter(|r| r.model == model).collect();
            let stat = |f: &dyn Fn(&SmolRow) -> Option<f64>| {
                MeanStd::of(&of.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
            };
            Some(SmolSummary {
                model,
                seeds: of.len(),
                hs_harmbench: stat(&|r| r.hs_harmbench),
                hs_advbench: stat(&|r| Some(r.hs_advbench))?,
                fa: stat(&|r| Some(r.fa))?,
                refusal_margin: stat(&|r| Some(r.refusal_margin))?,
                benign_agreement: stat(&|r| r.benign_agreement),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_deviation() {
        assert_eq!(MeanStd::of(&[]), None);
        assert_eq!(
            MeanStd::of(&[0.5]),
            Some(MeanStd {
                mean: 0.5,
                std: 0.0
            })
        );
        let m = MeanStd::of(&[1.0, 2.0, 3.0]).unwrap();
        assert!((m.mean - 2.0).abs() < 1e-12 && (m.std - 1.0).abs() < 1e-12);
    }
}
