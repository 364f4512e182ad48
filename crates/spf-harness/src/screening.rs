//! SPF's sample screen inside a fine-tuning loop, shared by the lab (`spf-lab`) and the real
//! model (`spf-llm`): which samples of each batch stay ([`RunScreen`]), and what the screen did
//! over a run, by kind of sample ([`ScreenSummary`]).
//!
//! The score of a sample is the share of its own gradient's energy that the projection would
//! remove ([`spf_core::screen`] has the mathematics); a sample scoring above the threshold leaves
//! the batch, and the step is taken on the rest.

use burn::module::Module;
use burn::optim::GradientsParams;
use serde::{Deserialize, Serialize};
use spf_core::screen::SampleScreen;
use spf_core::{SafetyGradientSource, SpfError};

use crate::training::Stepper;

/// One sample the screen scored at one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Screened {
    /// Its index in the training set.
    pub index: usize,
    /// Its [`SampleScreen`] score.
    pub score: f64,
    /// The threshold it was judged against (under the self-set rule, the one its batch set).
    pub threshold: f64,
    /// Whether it stayed in the batch.
    pub kept: bool,
}

/// SPF's sample screen over one fine-tuning run: its threshold, which samples are the defence's
/// own, and every verdict so far.
///
/// The defence's own samples, those for which `own(index)` holds (SafeInstr's harmful prompts
/// with refusals, which the defender adds to the user's data), are neither scored nor dropped:
/// the screen judges the data it is handed, not the data the defence brings, and a refusal
/// sample that the screen dropped would only weaken the defence it belongs to. What is screened
/// never depends on a user sample's label.
pub struct RunScreen<F> {
    screen: SampleScreen,
    own: F,
    log: Vec<Screened>,
}

impl<F: Fn(usize) -> bool> RunScreen<F> {
    /// A run screened by `screen`, the samples for which `own` holds exempt.
    pub fn new(screen: SampleScreen, own: F) -> Self {
        Self {
            screen,
            own,
            log: Vec::new(),
        }
    }

    /// Keeps the samples of the batch `picked` (indices into the training set) that the screen
    /// keeps, scoring each from its own gradient at `model`, `gradient_of(index)` (one backward
    /// pass per sample), and logs each verdict. Plain AdamW has no subspace to screen against:
    /// the batch is left as it is and nothing is logged.
    ///
    /// # Errors
    ///
    /// The [`SpfError`] of a sample's gradient that does not fit the model (see
    /// [`SafetyProjectedOptimizer::measure`](spf_core::SafetyProjectedOptimizer::measure)); the
    /// batch is left as it was.
    pub fn batch<M, S>(
        &mut self,
        stepper: &Stepper<S>,
        model: &M,
        picked: &mut Vec<usize>,
        mut gradient_of: impl FnMut(usize) -> GradientsParams,
    ) -> Result<(), SpfError>
    where
        M: Module,
        S: SafetyGradientSource<M>,
    {
        let Stepper::Spf { optim, .. } = stepper else {
            return Ok(());
        };
        let mut scores = Vec::with_capacity(picked.len());
        for &index in picked.iter() {
            // The defence's own samples are not scored (and not judged below).
            let own = (self.own)(index);
            scores.push(if own {
                0.0
            } else {
                SampleScreen::score(&**optim, model, gradient_of(index))?
            });
        }
        self.batch_scored(picked, &scores)
    }

    /// [`Self::batch`] with the scores computed already, `scores[j]` for `picked[j]`, from one
    /// backward pass of the whole batch ([`spf_core::screen::traced_scores`]). The defence's own
    /// samples are kept and not logged, whatever their score.
    ///
    /// # Errors
    ///
    /// [`SpfError::ShapeMismatch`] when `scores` does not hold one score per picked sample, and
    /// [`SpfError::ScreenNotCalibrated`] under the calibrated rule before any
    /// [`calibrate`](Self::calibrate); the batch is left as it was.
    pub fn batch_scored(
        &mut self,
        picked: &mut Vec<usize>,
        scores: &[f64],
    ) -> Result<(), SpfError> {
        if picked.len() != scores.len() {
            return Err(SpfError::ShapeMismatch {
                path: None,
                expected: vec![picked.len()],
                found: vec![scores.len()],
            });
        }
        let judged: Vec<(usize, f64)> = picked
            .iter()
            .zip(scores)
            .filter(|(index, _)| !(self.own)(**index))
            .map(|(&index, &score)| (index, score))
            .collect();
        let batch: Vec<f64> = judged.iter().map(|&(_, score)| score).collect();
        let threshold = self.screen.judge(&batch)?;
        let verdicts: Vec<Screened> = judged
            .into_iter()
            .map(|(index, score)| Screened {
                index,
                score,
                threshold,
                kept: self.screen.keeps(score),
            })
            .collect();
        picked.retain(|index| verdicts.iter().all(|v| v.index != *index || v.kept));
        self.log.extend(verdicts);
        Ok(())
    }

    /// Whether the screen's threshold comes from a calibration set, whose scores the loop must
    /// hand to [`calibrate`](Self::calibrate) before each batch it judges.
    pub fn is_calibrated(&self) -> bool {
        self.screen.rule().is_calibrated()
    }

    /// Takes the scores of clean calibration samples, taken at the current weights, into the
    /// calibrated rule's reference ([`SampleScreen::calibrate`]). They are not verdicts: nothing
    /// is logged.
    pub fn calibrate(&mut self, scores: &[f64]) {
        self.screen.calibrate(scores);
    }

    /// The threshold of the latest batch (see [`SampleScreen::threshold`]).
    pub fn threshold(&self) -> f64 {
        self.screen.threshold()
    }

    /// Every verdict so far, in order.
    pub fn log(&self) -> &[Screened] {
        &self.log
    }

    /// The verdicts, for the run's summary.
    pub fn into_log(self) -> Vec<Screened> {
        self.log
    }
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
    /// The threshold of the last verdict (the fixed one, for a fixed threshold).
    pub threshold: f64,
    /// The minimum, 10th, 50th and 90th percentile and maximum of the thresholds the verdicts
    /// were judged against (one value five times for a fixed threshold; empty when nothing was
    /// scored, and in summaries written before the self-set rule).
    #[serde(default)]
    pub thresholds: Vec<f64>,
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
            thresholds: quantiles(screened.iter().map(|s| s.threshold).collect()),
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
        Self {
            scored: scored.len(),
            dropped: scored.iter().filter(|s| !s.kept).count(),
            quantiles: quantiles(scored.iter().map(|s| s.score).collect()),
        }
    }

    /// The median score, if any sample was scored.
    pub fn median(&self) -> Option<f64> {
        self.quantiles.get(2).copied()
    }
}

/// The minimum, 10th, 50th and 90th percentile and maximum of `values` (nearest rank); empty
/// for none.
fn quantiles(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return Vec::new();
    }
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    [0.0, 0.1, 0.5, 0.9, 1.0].into_iter().map(at).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::{Device, Tensor};
    use spf_core::SpfConfig;

    /// Samples whose input is the safety sample's gradient agree with the safety loss (score
    /// 0), samples with the negated input conflict with it (score 1): at threshold 0 the screen
    /// drops exactly the conflicting ones, and the defence's own sample (a conflicting one here,
    /// on purpose) is neither scored nor dropped.
    #[test]
    fn at_threshold_zero_exactly_the_positive_scores_leave_and_the_defences_own_stay() {
        let device = Device::default().autodiff();
        let model: Linear = LinearConfig::new(4, 3).init(&device);
        let x = Tensor::<2>::from_floats([[1.0, -2.0, 0.5, 3.0]], &device);
        let loss = move |m: &Linear, x: Tensor<2>| m.forward(x).sum();
        let safety_x = x.clone();
        let source = move |m: &Linear| loss(m, safety_x.clone());
        let stepper =
            Stepper::spf::<_, Box<dyn std::error::Error>>(&SpfConfig::new(), &model, source)
                .unwrap();
        let input = |i: usize| {
            if i.is_multiple_of(2) {
                x.clone()
            } else {
                -x.clone()
            }
        };
        let gradient_of =
            |i: usize| GradientsParams::from_grads(loss(&model, input(i)).backward(), &model);
        let mut picked: Vec<usize> = (0..8).collect();
        let mut screen = RunScreen::new(SampleScreen::new(0.0).unwrap(), |i| i == 7);
        screen
            .batch(&stepper, &model, &mut picked, gradient_of)
            .unwrap();
        let log = screen.into_log();

        assert_eq!(picked, [0, 2, 4, 6, 7]);
        let scored: Vec<usize> = log.iter().map(|s| s.index).collect();
        assert_eq!(
            scored,
            [0, 1, 2, 3, 4, 5, 6],
            "the defence's own sample is not scored"
        );
        for s in &log {
            assert_eq!(s.kept, s.score <= 0.0, "{s:?}");
            let expected = if s.index.is_multiple_of(2) { 0.0 } else { 1.0 };
            assert!((s.score - expected).abs() < 1e-5, "{s:?}");
        }
    }

    /// The self-set rule judges each batch against the scores seen so far, its own included:
    /// the outlier of a batch of typical scores leaves, the defence's own sample (scored
    /// highest of all, on purpose) neither enters the reference nor leaves, and which index a
    /// score belongs to changes nothing.
    #[test]
    fn the_self_set_rule_drops_a_batchs_outlier_from_scores_alone() {
        use spf_core::screen::ScreenThreshold;
        let own = |i: usize| i == 100;
        let self_set = || SampleScreen::with_threshold(ScreenThreshold::self_set()).unwrap();
        // Task-like scores spread over half a decade, one sample twenty times the median.
        let scores = [1e-3, 2e-3, 1.5e-3, 8e-4, 1.2e-3, 2e-2, 9e-4, 0.9];
        let mut picked = vec![0, 1, 2, 3, 4, 5, 6, 100];
        let mut screen = RunScreen::new(self_set(), own);
        screen.batch_scored(&mut picked, &scores).unwrap();
        assert_eq!(picked, [0, 1, 2, 3, 4, 6, 100]);
        let mut reference = self_set();
        let expected = reference.judge(&scores[..7]).unwrap();
        assert!(expected > 2e-3 && expected < 2e-2, "τ = {expected}");
        assert_eq!(
            screen.threshold(),
            expected,
            "the own sample's score is left out"
        );
        assert!(screen.log().iter().all(|s| s.threshold == expected));
        assert_eq!(screen.log().len(), 7);

        // The same scores under other indices, in another order: the same threshold, and the
        // same score leaves.
        let mut picked = vec![7, 6, 5, 4, 3, 2, 1];
        let mut shuffled = RunScreen::new(self_set(), own);
        let reversed: Vec<f64> = scores[..7].iter().rev().copied().collect();
        shuffled.batch_scored(&mut picked, &reversed).unwrap();
        assert_eq!(shuffled.threshold(), expected);
        assert_eq!(picked, [7, 5, 4, 3, 2, 1]);

        // A second batch joins the reference: the threshold moves to what all 14 scores set.
        let mut picked: Vec<usize> = (10..17).collect();
        screen.batch_scored(&mut picked, &scores[..7]).unwrap();
        let mut all = self_set();
        let both: Vec<f64> = scores[..7].iter().chain(&scores[..7]).copied().collect();
        assert_eq!(screen.threshold(), all.judge(&both).unwrap());
    }

    /// Under the calibrated rule a batch made only of conflicting samples (the purely harmful
    /// attack, where the self-set rule's median is a harmful score) leaves whole; a batch it is
    /// asked to judge before any calibration score is an error and stays as it was.
    #[test]
    fn the_calibrated_rule_drops_a_wholly_conflicting_batch_and_refuses_to_judge_uncalibrated() {
        use spf_core::screen::ScreenThreshold;
        let calibrated = || SampleScreen::with_threshold(ScreenThreshold::calibrated()).unwrap();
        let own = |i: usize| i == 100;
        let harmful = [8e-3, 1.2e-2, 9e-3, 2e-2, 7e-3, 1.1e-2, 1e-2];
        let mut screen = RunScreen::new(calibrated(), own);
        assert!(screen.is_calibrated());
        let mut picked = vec![0, 1, 2, 3, 4, 5, 6, 100];
        let mut with_own = harmful.to_vec();
        with_own.push(0.9);
        assert!(matches!(
            screen.batch_scored(&mut picked, &with_own),
            Err(SpfError::ScreenNotCalibrated)
        ));
        assert_eq!(picked.len(), 8, "the batch is left as it was");
        assert!(screen.log().is_empty());

        // Clean task scores, a decade below: every harmful sample leaves, the own one stays.
        let clean: Vec<f64> = (1..=19).map(|i| f64::from(i) * 1e-4).collect();
        screen.calibrate(&clean);
        screen.batch_scored(&mut picked, &with_own).unwrap();
        assert_eq!(picked, [100]);
        assert_eq!(screen.log().len(), 7, "calibration scores are not verdicts");
        assert!(screen.log().iter().all(|s| s.threshold == clean[17]));

        // The self-set rule on the same batch keeps most of it: its median is a harmful score.
        let self_set = SampleScreen::with_threshold(ScreenThreshold::self_set()).unwrap();
        let mut screen = RunScreen::new(self_set, own);
        assert!(!screen.is_calibrated());
        let mut picked = vec![0, 1, 2, 3, 4, 5, 6, 100];
        screen.batch_scored(&mut picked, &with_own).unwrap();
        assert!(picked.len() >= 6, "{picked:?}");
    }

    fn verdict(index: usize, score: f64, kept: bool) -> Screened {
        Screened {
            index,
            score,
            threshold: 0.3,
            kept,
        }
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
        assert_eq!(summary.thresholds, vec![0.3; 5]);
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
