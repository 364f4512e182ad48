//! SPF's sample screen inside a fine-tuning loop, shared by the lab and the real model
//! (`spf-llm`): which samples of a batch stay ([`screen_batch`]), and what the screen did over a
//! run, by kind of sample ([`ScreenSummary`]).
//!
//! The score of a sample is the share of its own gradient's energy that the projection would
//! remove ([`spf_core::screen`] has the mathematics); a sample scoring above the threshold leaves
//! the batch, and the step is taken on the rest.

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use spf_core::SafetyGradientSource;
use spf_core::screen::SampleScreen;

use crate::training::Stepper;

/// One sample the screen scored at one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Screened {
    /// Its index in the training set.
    pub index: usize,
    /// Its [`SampleScreen`] score.
    pub score: f64,
    /// Whether it stayed in the batch.
    pub kept: bool,
}

/// Keeps the samples of the batch `picked` (indices into the training set) that `screen` keeps,
/// scoring each from its own gradient at `model`, `gradient_of(index)` (one backward pass per
/// sample), and appends each verdict to `log`. Plain AdamW has no subspace to screen against:
/// the batch is left as it is and nothing is logged.
pub fn screen_batch<M, B, S>(
    stepper: &Stepper<M, B, S>,
    screen: SampleScreen,
    model: &M,
    picked: &mut Vec<usize>,
    mut gradient_of: impl FnMut(usize) -> GradientsParams,
    log: &mut Vec<Screened>,
) where
    M: AutodiffModule<B>,
    B: AutodiffBackend,
    S: SafetyGradientSource<M, B>,
{
    let Stepper::Spf { optim, .. } = stepper else {
        return;
    };
    picked.retain(|&index| {
        let score = SampleScreen::score(&**optim, model, gradient_of(index));
        let kept = screen.keeps(score);
        log.push(Screened { index, score, kept });
        kept
    });
}

/// The kinds of fine-tuning sample the screen's summary tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleKind {
    /// A harmful prompt with a compliant answer (the attack).
    Harmful,
    /// A sample of the fine-tuning task.
    Task,
    /// A harmful prompt with a refusal (SafeInstr's data).
    Refusal,
}

/// What the sample screen did over one fine-tuning run, by kind of sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenSummary {
    /// The threshold.
    pub threshold: f64,
    /// The harmful Q→A pairs.
    pub harmful: ScreenCounts,
    /// The task samples.
    pub task: ScreenCounts,
    /// The refusals SafeInstr mixed in.
    pub refusal: ScreenCounts,
}

impl ScreenSummary {
    /// Sorts the verdicts `screened` by the kind of each sample, `kind_of(index)`.
    pub fn of(
        threshold: f64,
        screened: &[Screened],
        kind_of: impl Fn(usize) -> SampleKind,
    ) -> Self {
        let of_kind = |kind: SampleKind| {
            let picked: Vec<Screened> = screened
                .iter()
                .filter(|s| kind_of(s.index) == kind)
                .copied()
                .collect();
            ScreenCounts::of(&picked)
        };
        Self {
            threshold,
            harmful: of_kind(SampleKind::Harmful),
            task: of_kind(SampleKind::Task),
            refusal: of_kind(SampleKind::Refusal),
        }
    }
}

/// Samples of one kind the screen scored: how many, how many it dropped, and their scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenCounts {
    /// Samples scored (a sample drawn in two steps counts twice).
    pub scored: usize,
    /// Of those, dropped.
    pub dropped: usize,
    /// The scores' minimum, 10th, 50th and 90th percentile and maximum (empty when none).
    pub quantiles: Vec<f64>,
}

impl ScreenCounts {
    /// The counts and score quantiles (nearest rank) of `scored`.
    pub fn of(scored: &[Screened]) -> Self {
        let mut scores: Vec<f64> = scored.iter().map(|s| s.score).collect();
        scores.sort_by(f64::total_cmp);
        let quantiles = if scores.is_empty() {
            Vec::new()
        } else {
            let at = |q: f64| scores[((scores.len() - 1) as f64 * q).round() as usize];
            [0.0, 0.1, 0.5, 0.9, 1.0].into_iter().map(at).collect()
        };
        Self {
            scored: scored.len(),
            dropped: scored.iter().filter(|s| !s.kept).count(),
            quantiles,
        }
    }

    /// The median score, if any sample was scored.
    pub fn median(&self) -> Option<f64> {
        self.quantiles.get(2).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(index: usize, score: f64, kept: bool) -> Screened {
        Screened { index, score, kept }
    }

    #[test]
    fn the_summary_sorts_verdicts_by_kind_and_counts_the_dropped() {
        // Indices 0..3 are harmful, 3..10 task, 10.. refusals.
        let kind = |i: usize| match i {
            0..3 => SampleKind::Harmful,
            3..10 => SampleKind::Task,
            _ => SampleKind::Refusal,
        };
        let screened = [
            verdict(0, 0.9, false),
            verdict(1, 0.2, true),
            verdict(4, 0.01, true),
            verdict(0, 0.8, false),
            verdict(5, 0.5, false),
        ];
        let summary = ScreenSummary::of(0.3, &screened, kind);
        assert_eq!(summary.threshold, 0.3);
        assert_eq!((summary.harmful.scored, summary.harmful.dropped), (3, 2));
        assert_eq!((summary.task.scored, summary.task.dropped), (2, 1));
        assert_eq!(summary.refusal, ScreenCounts::of(&[]));
        assert!(summary.refusal.quantiles.is_empty() && summary.refusal.median().is_none());
        assert_eq!(summary.harmful.quantiles, vec![0.2, 0.2, 0.8, 0.9, 0.9]);
        assert_eq!(summary.harmful.median(), Some(0.8));
    }

    #[test]
    fn quantiles_are_nearest_rank_over_sorted_scores() {
        let scored: Vec<Screened> = (0..11)
            .rev()
            .map(|i| verdict(i, i as f64 / 10.0, true))
            .collect();
        let counts = ScreenCounts::of(&scored);
        assert_eq!(counts.quantiles, vec![0.0, 0.1, 0.5, 0.9, 1.0]);
        assert_eq!(counts.dropped, 0);
    }
}
