//! Stage 2, fine-tuning: the attack data, the methods compared, and one fine-tuning run.
//!
//! The fine-tuning set holds `n` prompts of the new task C on benign topics, of which a share
//! `p` is replaced by harmful prompts (task C's format, seen harm topics) paired with compliant
//! answers. Every method sees the same set, the same batches in the same order, the same
//! learning rate and the same number of steps; only the optimizer (or, for the data baseline,
//! 10% of the set) differs.

use std::time::Instant;

use burn::config::Config;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use spf_core::screen::{SampleScreen, ScreenThreshold};
use spf_core::{
    ProjectionMode, ProjectionTarget, RefreshPolicy, SafetyGradientSource, SourceError, SpfConfig,
};
use spf_subspace::{RankPolicy, SubspaceConfig};

use crate::batch::{Batch, answer_loss};
use crate::error::LabError;
use crate::eval::{EvalSets, Scores, score};
use crate::insights::gradient_cosine;
use crate::model::Transformer;
use crate::world::{Example, HarmTopics, Response, Split, Task, World};
use spf_harness::progress::Progress;
use spf_harness::screening::{RunScreen, SampleKind, ScreenSummary};
use spf_harness::seed::salt;
use spf_harness::training::{BatchOrder, ProjectionSummary, Stepper};

/// Stage 2's data and schedule, shared by every method.
#[derive(Config, Debug, PartialEq)]
pub struct FinetuneConfig {
    /// The new task C.
    #[config(default = "Task::Sort")]
    pub task: Task,
    /// Prompts in the fine-tuning set, `n`.
    #[config(default = 1000)]
    pub samples: usize,
    /// Optimizer steps.
    #[config(default = 200)]
    pub steps: usize,
    /// Sequences per step.
    #[config(default = 32)]
    pub batch_size: usize,
    /// AdamW's learning rate, constant.
    #[config(default = 1e-3)]
    pub lr: f64,
    /// The share of the set the SafeInstr baseline replaces by harmful prompts with refusals.
    #[config(default = 0.1)]
    pub safe_instr_share: f64,
    /// Steps between evaluations along the run (the curves).
    #[config(default = 40)]
    pub eval_every: usize,
}

/// Where the defence's safety batch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SafetyFormat {
    /// Harmful prompts in the alignment tasks' formats only.
    AlignmentTasks,
    /// Harmful prompts in the fine-tuning task's format.
    FinetuneTask,
}

/// The SPF settings every SPF method shares.
#[derive(Config, Debug, PartialEq)]
pub struct DefenceConfig {
    /// Directions per weight matrix, `k`.
    #[config(default = 8)]
    pub rank: usize,
    /// When the subspace is re-estimated at the current weights.
    #[config(default = "RefreshPolicy::Every(10)")]
    pub refresh: RefreshPolicy,
    /// Harmful prompts with refusals in the safety batch. The paper estimates from one; the
    /// lab's ablations (docs/results.md) found 8 far better under harmful fine-tuning at the
    /// same accuracy, so 8 is the default.
    #[config(default = 8)]
    pub safety_samples: usize,
    /// Their prompt format.
    #[config(default = "SafetyFormat::AlignmentTasks")]
    pub safety_format: SafetyFormat,
    /// SPF's sample screen ([`spf_harness::screening`]): each SPF method drops the fine-tuning
    /// samples whose own gradient would lose more than the threshold's share of its energy to
    /// the projection (a fixed share, or the self-set rule; the lab draws no calibration set
    /// for the calibrated rule); `None` keeps every sample.
    #[config(default = "None")]
    pub screen: Option<ScreenThreshold>,
}

impl DefenceConfig {
    /// The sample screen SPF methods run with, if any.
    ///
    /// # Errors
    ///
    /// [`LabError::Spf`] for a threshold out of its range ([`ScreenThreshold::validate`]).
    pub fn sample_screen(&self) -> Result<Option<SampleScreen>, LabError> {
        Ok(self.screen.map(SampleScreen::with_threshold).transpose()?)
    }
}

/// A fine-tuning method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Method {
    /// Plain AdamW.
    Sft,
    /// SPF, removing only conflicting directions from the gradient.
    SpfConflictOnly,
    /// SPF, removing every safety direction from the gradient.
    SpfOrthogonal,
    /// SPF `ConflictOnly` applied to AdamW's update instead of the gradient.
    SpfUpdate,
    /// One-direction gradient surgery against `UΣVᵀ`, close to SafeGrad.
    SpfPcgrad,
    /// Plain AdamW with a share of the set replaced by harmful prompts with refusals.
    SafeInstr,
}

impl Method {
    /// Every method, SFT first.
    pub const ALL: [Method; 6] = [
        Method::Sft,
        Method::SpfConflictOnly,
        Method::SpfOrthogonal,
        Method::SpfUpdate,
        Method::SpfPcgrad,
        Method::SafeInstr,
    ];

    /// A short name for tables and plots.
    pub fn label(self) -> &'static str {
        match self {
            Method::Sft => "SFT",
            Method::SpfConflictOnly => "SPF ConflictOnly",
            Method::SpfOrthogonal => "SPF Orthogonal",
            Method::SpfUpdate => "SPF Update",
            Method::SpfPcgrad => "SPF Pcgrad",
            Method::SafeInstr => "SafeInstr",
        }
    }

    /// The projection mode and target, for the SPF methods.
    pub fn projection(self) -> Option<(ProjectionMode, ProjectionTarget)> {
        use {ProjectionMode as M, ProjectionTarget as T};
        match self {
            Method::SpfConflictOnly => Some((M::ConflictOnly, T::Gradient)),
            Method::SpfOrthogonal => Some((M::Orthogonal, T::Gradient)),
            Method::SpfUpdate => Some((M::ConflictOnly, T::Update)),
            Method::SpfPcgrad => Some((M::Pcgrad, T::Gradient)),
            Method::Sft | Method::SafeInstr => None,
        }
    }
}

/// The fine-tuning set for harmful share `p`: the same prompts and order for every method but
/// SafeInstr, which replaces a further share of benign prompts by harmful ones with refusals.
///
/// # Errors
///
/// [`WorldError::EmptySplit`](crate::world::WorldError::EmptySplit) when the world's training split has no prompt of a kind asked for.
pub fn finetune_set(
    world: &World,
    config: &FinetuneConfig,
    p: f64,
    method: Method,
    seed: u64,
) -> Result<Vec<Example>, LabError> {
    let n = config.samples;
    let harmful = ((p * n as f64).round() as usize).min(n);
    let refusals = if method == Method::SafeInstr {
        ((config.safe_instr_share * n as f64).round() as usize).min(n - harmful)
    } else {
        0
    };
    let task = [config.task];
    let mut benign = StdRng::seed_from_u64(seed ^ salt::BENIGN);
    let mut attack = StdRng::seed_from_u64(seed ^ salt::ATTACK);
    let mut safe = StdRng::seed_from_u64(seed ^ salt::SAFE_INSTR);
    let mut set = (0..n)
        .map(|i| {
            if i < harmful {
                world.harmful(
                    &mut attack,
                    &task,
                    HarmTopics::Seen,
                    Split::Train,
                    Response::Task,
                )
            } else if i < harmful + refusals {
                world.harmful(
                    &mut safe,
                    &Task::ALL,
                    HarmTopics::Seen,
                    Split::Train,
                    Response::Refusal,
                )
            } else {
                world.benign(&mut benign, config.task, Split::Train)
            }
        })
        .collect::<Result<Vec<Example>, _>>()?;
    set.shuffle(&mut StdRng::seed_from_u64(seed ^ salt::SHUFFLE));
    Ok(set)
}

/// The defence's safety batch: harmful training prompts with refusals on seen topics.
///
/// # Errors
///
/// As [`World::harmful`] (no alignment task, say).
pub fn safety_batch(
    world: &World,
    defence: &DefenceConfig,
    finetune: &FinetuneConfig,
    alignment_tasks: &[Task],
    seed: u64,
) -> Result<Vec<Example>, LabError> {
    let tasks = match defence.safety_format {
        SafetyFormat::AlignmentTasks => alignment_tasks.to_vec(),
        SafetyFormat::FinetuneTask => vec![finetune.task],
    };
    let mut rng = StdRng::seed_from_u64(seed ^ salt::SAFETY_BATCH);
    let batch = (0..defence.safety_samples).map(|_| {
        world.harmful(
            &mut rng,
            &tasks,
            HarmTopics::Seen,
            Split::Train,
            Response::Refusal,
        )
    });
    Ok(batch.collect::<Result<_, _>>()?)
}

/// Whether a run measures the cosine between the safety and the utility gradient (an extra
/// backward pass of the safety batch per step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CosineProbe {
    /// Not measured.
    Off,
    /// Measured before every step, into [`Run::cosines`].
    EveryStep,
}

/// One fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The method.
    pub method: Method,
    /// The harmful share `p`.
    pub p: f64,
    /// The seed.
    pub seed: u64,
    /// Scores every `eval_every` steps, the first at step 0 and the last after the final step.
    pub curve: Vec<Scores>,
    /// For SPF methods, what the projection did.
    pub projection: Option<ProjectionSummary>,
    /// When probed, the cosine between the safety and the utility gradient (over every weight
    /// matrix together) at each step, before the step.
    pub cosines: Vec<f64>,
    /// For SPF methods with a sample screen, what it scored and dropped.
    #[serde(default)]
    pub screen: Option<ScreenSummary>,
    /// Wall time of the steps, in seconds, without the scoring of the curve and the cosine
    /// probe (0 in results written before it was measured).
    #[serde(default)]
    pub seconds: f64,
}

impl Run {
    /// The scores after the last step.
    pub fn last(&self) -> Scores {
        self.curve.last().copied().unwrap_or_default()
    }
}

/// Everything a run needs besides the method and the share.
#[derive(Debug)]
pub struct Stage<'a> {
    /// The world.
    pub world: &'a World,
    /// The aligned model every run starts from.
    pub aligned: &'a Transformer,
    /// The fine-tuning data and schedule.
    pub finetune: &'a FinetuneConfig,
    /// The SPF settings.
    pub defence: &'a DefenceConfig,
    /// The held-out sets.
    pub sets: &'a EvalSets,
    /// The defence's safety batch.
    pub safety: &'a [Example],
    /// The device.
    pub device: &'a Device,
}

impl Stage<'_> {
    /// Fine-tunes a copy of the aligned model with `method` on the set of share `p` and seed
    /// `seed`, recording the safety–utility gradient cosine as `probe` says. `progress` counts
    /// steps.
    ///
    /// # Errors
    ///
    /// [`LabError::Subspace`] or [`LabError::Spf`] when the defence cannot be set up or a
    /// step is refused (a non-finite gradient, say).
    pub fn run(
        &self,
        method: Method,
        p: f64,
        seed: u64,
        probe: CosineProbe,
        progress: &mut dyn Progress,
    ) -> Result<Run, LabError> {
        let vocab = self.world.vocab();
        let set = finetune_set(self.world, self.finetune, p, method, seed)?;
        let safety = Batch::new(vocab, self.safety, self.device);
        let mut order = StdRng::seed_from_u64(seed ^ salt::BATCH_ORDER);
        let mut batches = BatchOrder::new(set.len(), self.finetune.batch_size);

        let mut model = self.aligned.clone();
        let mut stepper = stepper(method, self.defence, &model, &safety)?;
        // The defence's own refusals are never screened (the lab's SPF sets hold none).
        let mut screen = self
            .defence
            .sample_screen()?
            .map(|screen| RunScreen::new(screen, |i: usize| set[i].kind() == SampleKind::Refusal));
        let mut curve = vec![self.score(&model, 0)];
        let mut cosines = Vec::new();
        let steps = self.finetune.steps;
        // The steps' wall time leaves out what only measures: the scoring and the probe.
        let (started, mut measuring) = (Instant::now(), 0.0);
        let gradient = |model: &Transformer, examples: &[Example]| {
            let batch = Batch::new(vocab, examples, self.device);
            GradientsParams::from_grads(answer_loss(model, &batch).backward(), model)
        };
        for step in 1..=steps {
            let mut picked = batches.next(&mut order);
            if let Some(screen) = &mut screen {
                let one = |i: usize| gradient(&model, std::slice::from_ref(&set[i]));
                screen.batch(&stepper, &model, &mut picked, one)?;
            }
            // A batch the screen emptied takes no step: the model keeps its weights.
            if !picked.is_empty() {
                let examples: Vec<Example> = picked.iter().map(|&i| set[i].clone()).collect();
                let grads = gradient(&model, &examples);
                if probe == CosineProbe::EveryStep {
                    let at = Instant::now();
                    let safety_grads = GradientsParams::from_grads(
                        answer_loss(&model, &safety).backward(),
                        &model,
                    );
                    cosines.push(gradient_cosine(&model, &safety_grads, &grads)?);
                    measuring += at.elapsed().as_secs_f64();
                }
                model = stepper.step(self.finetune.lr, model, grads)?;
            }
            measuring += self.score_if_due(&model, step, &mut curve);
            progress.advance(1);
        }
        let seconds = started.elapsed().as_secs_f64() - measuring;
        Ok(Run {
            method,
            p,
            seed,
            curve,
            projection: stepper.summary(),
            cosines,
            screen: screen
                .filter(|_| method.projection().is_some())
                .map(|screen| {
                    ScreenSummary::of(screen.threshold(), screen.log(), |i| set[i].kind())
                }),
            seconds,
        })
    }

    /// Scores `model` into `curve` when the schedule says so (every `eval_every` steps, and
    /// after the last); returns the seconds that took.
    pub(crate) fn score_if_due(
        &self,
        model: &Transformer,
        step: usize,
        curve: &mut Vec<Scores>,
    ) -> f64 {
        if !step.is_multiple_of(self.finetune.eval_every.max(1)) && step != self.finetune.steps {
            return 0.0;
        }
        let at = Instant::now();
        curve.push(self.score(model, step));
        at.elapsed().as_secs_f64()
    }

    pub(crate) fn score(&self, model: &Transformer, step: usize) -> Scores {
        score(model, self.world, self.sets, self.safety, step, self.device)
    }
}

/// The safety loss on the defence's safety batch, as the wrapper's refresh source.
#[derive(Clone)]
pub(crate) struct SafetySource(Batch);

impl SafetyGradientSource<Transformer> for SafetySource {
    fn safety_gradients(&mut self, module: &Transformer) -> Result<GradientsParams, SourceError> {
        let loss = answer_loss(module, &self.0);
        Ok(GradientsParams::from_grads(loss.backward(), module))
    }
}

/// The optimizer of `method`: plain AdamW, or AdamW under SPF with the defence's settings, its
/// bases estimated at `aligned` from the safety batch.
pub(crate) fn stepper(
    method: Method,
    defence: &DefenceConfig,
    aligned: &Transformer,
    safety: &Batch,
) -> Result<Stepper<SafetySource>, LabError> {
    let Some((mode, target)) = method.projection() else {
        return Ok(Stepper::plain());
    };
    let config = SpfConfig::new()
        .with_mode(mode)
        .with_target(target)
        .with_refresh(defence.refresh)
        .with_estimator(SubspaceConfig::new().with_rank(RankPolicy::Fixed(defence.rank)));
    Stepper::spf(&config, aligned, SafetySource(safety.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::{Topic, WorldConfig};

    fn setup() -> (World, FinetuneConfig) {
        (
            World::new(WorldConfig::new()).unwrap(),
            FinetuneConfig::new().with_samples(200),
        )
    }

    #[test]
    fn the_attack_set_has_the_asked_share_and_is_shared_by_methods() {
        let (world, config) = setup();
        let sft = finetune_set(&world, &config, 0.1, Method::Sft, 5).unwrap();
        assert_eq!(sft.len(), 200);
        let harmful: Vec<_> = sft.iter().filter(|e| e.is_harmful()).collect();
        assert_eq!(harmful.len(), 20);
        for e in &harmful {
            assert_eq!(e.task, Task::Sort);
            assert_eq!(e.response, Response::Task, "compliant answers");
            assert!(matches!(e.topic, Topic::Harm(i) if i < world.config().seen_harm_topics));
        }
        assert!(
            sft.iter()
                .filter(|e| !e.is_harmful())
                .all(|e| e.task == Task::Sort)
        );
        assert_eq!(
            sft,
            finetune_set(&world, &config, 0.1, Method::SpfUpdate, 5).unwrap()
        );
        assert_ne!(
            sft,
            finetune_set(&world, &config, 0.1, Method::Sft, 6).unwrap()
        );

        let safe = finetune_set(&world, &config, 0.1, Method::SafeInstr, 5).unwrap();
        let refusals = safe
            .iter()
            .filter(|e| e.response == Response::Refusal)
            .count();
        assert_eq!(refusals, 20);
        assert_eq!(safe.iter().filter(|e| e.is_harmful()).count(), 40);
        assert!(
            finetune_set(&world, &config, 0.0, Method::Sft, 5)
                .unwrap()
                .iter()
                .all(|e| !e.is_harmful())
        );
    }

    #[test]
    fn the_safety_batch_follows_its_format() {
        let (world, finetune) = setup();
        let align = [Task::Copy, Task::Reverse];
        let defence = DefenceConfig::new().with_safety_samples(16);
        let batch = safety_batch(&world, &defence, &finetune, &align, 1).unwrap();
        assert_eq!(batch.len(), 16);
        assert!(
            batch.iter().all(|e| align.contains(&e.task)
                && e.response == Response::Refusal
                && e.is_harmful())
        );
        let in_format = defence.with_safety_format(SafetyFormat::FinetuneTask);
        let batch = safety_batch(&world, &in_format, &finetune, &align, 1).unwrap();
        assert!(batch.iter().all(|e| e.task == Task::Sort));
    }

    #[test]
    fn methods_map_to_their_projection() {
        assert_eq!(Method::Sft.projection(), None);
        assert_eq!(Method::SafeInstr.projection(), None);
        assert_eq!(
            Method::SpfUpdate.projection(),
            Some((ProjectionMode::ConflictOnly, ProjectionTarget::Update))
        );
        let labels: std::collections::HashSet<_> = Method::ALL.iter().map(|m| m.label()).collect();
        assert_eq!(labels.len(), Method::ALL.len());
    }
}
