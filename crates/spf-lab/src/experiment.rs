//! The whole experiment: align a model per seed (or reuse its checkpoint), measure the
//! insights, fine-tune it with every method at every harmful share, and summarise over seeds.

use std::path::Path;
use std::time::Instant;

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Device;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use spf_core::checkpoint;
use spf_core::screen::ScreenThreshold;

use crate::align::{AlignConfig, align};
use crate::batch::Batch;
use crate::error::LabError;
use crate::eval::{EvalSets, Scores, score};
use crate::finetune::{
    CosineProbe, DefenceConfig, FinetuneConfig, Method, Run, Stage, safety_batch,
};
use crate::insights::{Insights, measure};
use crate::model::{Transformer, TransformerConfig};
use crate::replicas::replica_devices;
use crate::world::{HarmTopics, Response, Split, World, WorldConfig};
use spf_harness::progress::Progress;
use spf_harness::seed::{fnv, salt};
use spf_harness::settings;

/// Every setting of an experiment; saved with its results.
#[derive(Config, Debug, PartialEq)]
pub struct ExperimentConfig {
    /// The synthetic world.
    #[config(default = "WorldConfig::new()")]
    pub world: WorldConfig,
    /// The transformer's sizes.
    #[config(default = "TransformerConfig::new()")]
    pub model: TransformerConfig,
    /// Stage 1.
    #[config(default = "AlignConfig::new()")]
    pub align: AlignConfig,
    /// Stage 2's data and schedule.
    #[config(default = "FinetuneConfig::new()")]
    pub finetune: FinetuneConfig,
    /// The SPF methods' shared settings.
    #[config(default = "DefenceConfig::new()")]
    pub defence: DefenceConfig,
    /// The methods compared.
    #[config(default = "Method::ALL.to_vec()")]
    pub methods: Vec<Method>,
    /// The harmful shares `p` of the fine-tuning set.
    #[config(default = "vec![0.0, 0.05, 0.1, 0.2]")]
    pub shares: Vec<f64>,
    /// One aligned model and one fine-tuning set per seed.
    #[config(default = "vec![0, 1, 2]")]
    pub seeds: Vec<u64>,
    /// Prompts in each held-out set.
    #[config(default = 200)]
    pub eval_prompts: usize,
    /// Safety samples in the batch the insights compare one sample against.
    #[config(default = 32)]
    pub insight_batch: usize,
    /// The ranks at which the insights are measured.
    #[config(default = "vec![1, 2, 4, 8, 16]")]
    pub insight_ranks: Vec<usize>,
    /// Data-parallel replicas of each fine-tuning run (burn-train's multi-device step; see
    /// [`crate::replicas`]); 1 is the single-device run.
    #[config(default = 1)]
    pub replicas: usize,
}

impl ExperimentConfig {
    /// The smaller configuration the CI smoke test runs: one seed, shares 0 and 0.1, shorter
    /// stages and smaller held-out sets.
    pub fn quick() -> Self {
        Self::new()
            .with_align(AlignConfig::new().with_steps(800))
            .with_finetune(FinetuneConfig::new().with_steps(100).with_eval_every(50))
            .with_shares(vec![0.0, 0.1])
            .with_seeds(vec![0])
            .with_eval_prompts(100)
    }

    /// Checks what the lab cannot run.
    ///
    /// # Errors
    ///
    /// [`LabError::Config`] naming the setting.
    pub fn validate(&self) -> Result<(), LabError> {
        let bad = |what: &str| Err(LabError::Config(what.to_owned()));
        settings::grid(self.seeds.len(), self.methods.len(), &self.shares)?;
        settings::at_least_one(&[
            ("the fine-tuning set", self.finetune.samples),
            ("the fine-tuning batch", self.finetune.batch_size),
            ("the alignment tasks", self.align.tasks.len()),
            ("the alignment batch", self.align.batch_size),
            ("the defence's safety samples", self.defence.safety_samples),
            ("the defence's rank", self.defence.rank),
        ])?;
        if self.replicas == 0 || !self.finetune.batch_size.is_multiple_of(self.replicas) {
            return bad("the batch size must be a positive multiple of the replicas");
        }
        if self.replicas > 1 && self.defence.screen.is_some() {
            return bad("the sample screen cannot run on replicas");
        }
        if self
            .defence
            .screen
            .is_some_and(ScreenThreshold::is_calibrated)
        {
            // The lab draws no clean calibration set beside its fine-tuning sets.
            return bad(
                "the calibrated sample screen needs a calibration set, which the lab does not draw",
            );
        }
        self.defence.sample_screen()?;
        self.world.validate()?;
        if self.model.heads == 0 || !self.model.d_model.is_multiple_of(self.model.heads) {
            return bad("the model width must be a multiple of the number of heads");
        }
        Ok(())
    }
}

/// A mean and a (population) standard deviation over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct MeanStd {
    /// The mean.
    pub mean: f64,
    /// The standard deviation.
    pub std: f64,
}

impl MeanStd {
    /// Of `values` (zero for none).
    pub fn of(values: &[f64]) -> Self {
        let n = values.len().max(1) as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        Self {
            mean,
            std: var.sqrt(),
        }
    }
}

/// One method at one harmful share, over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The method.
    pub method: Method,
    /// The harmful share.
    pub p: f64,
    /// Harmful score on seen harm topics.
    pub harmful_seen: MeanStd,
    /// Harmful score on unseen harm topics.
    pub harmful_unseen: MeanStd,
    /// Fine-tune (task C) accuracy.
    pub accuracy: MeanStd,
    /// Accuracy on the alignment tasks.
    pub old_accuracy: MeanStd,
}

/// What one seed produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedResult {
    /// The seed.
    pub seed: u64,
    /// The aligned model's scores.
    pub aligned: Scores,
    /// The insights at the aligned model.
    pub insights: Insights,
    /// Every fine-tuning run.
    pub runs: Vec<Run>,
}

/// An experiment's results, as written to `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// The configuration.
    pub config: ExperimentConfig,
    /// The backend, in words.
    pub backend: String,
    /// Per seed.
    pub seeds: Vec<SeedResult>,
    /// Per method and share, over seeds.
    pub summary: Vec<Summary>,
    /// The aligned models' scores over seeds: harmful (seen, unseen) and accuracies.
    pub aligned: Summary,
    /// Per share, the share of SFT steps whose safety–utility gradient cosine was negative,
    /// over seeds.
    pub negative_cosine_share: Vec<(f64, MeanStd)>,
    /// Wall time of the whole experiment.
    pub wall_seconds: f64,
}

impl Results {
    /// The summary of `method` at share `p`.
    pub fn get(&self, method: Method, p: f64) -> Option<&Summary> {
        self.summary.iter().find(|s| s.method == method && s.p == p)
    }
}

/// The aligned model of `seed`: loaded from `cache` when a checkpoint of the same configuration
/// is there, else trained (and saved there).
///
/// # Errors
///
/// [`LabError::Checkpoint`] when the checkpoint cannot be read or written.
pub fn aligned_model(
    config: &ExperimentConfig,
    world: &World,
    seed: u64,
    cache: Option<&Path>,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<Transformer, LabError> {
    let Some(dir) = cache else {
        return align(world, &config.model, &config.align, seed, device, progress);
    };
    // The engine too: a model aligned on another burn release or backend is another model.
    let engine = spf_harness::provenance::engine(device);
    let key = serde_json::to_string(&(&config.world, &config.model, &config.align, seed, engine))?;
    let path = dir.join(format!("aligned-{:016x}", fnv::of_str(&key)));
    let vocab = world.vocab();
    if path.with_extension("bpk").exists() {
        let fresh = config.model.init(vocab.size(), vocab.max_len(), device);
        let record = checkpoint::load(&path).map_err(LabError::Checkpoint)?;
        return Ok(fresh.load_record(record));
    }
    let model = align(world, &config.model, &config.align, seed, device, progress)?;
    std::fs::create_dir_all(dir).map_err(|source| LabError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    checkpoint::save_atomic(model.clone().into_record(), &path).map_err(LabError::Checkpoint)?;
    Ok(model)
}

/// Runs the experiment of `config` on `device`, caching aligned models under `cache`.
///
/// # Errors
///
/// [`LabError::Config`] for a configuration [`ExperimentConfig::validate`] rejects; otherwise
/// whatever a stage reports.
pub fn run(
    config: &ExperimentConfig,
    backend: &str,
    device: &Device,
    cache: Option<&Path>,
    progress: &mut dyn Progress,
) -> Result<Results, LabError> {
    let started = Instant::now();
    let (world, sets) = world_and_sets(config)?;
    let devices = replica_devices(config.replicas, device);
    let mut seeds = Vec::new();
    for &seed in &config.seeds {
        let aligned = aligned_model(config, &world, seed, cache, device, progress)?;
        let safety = safety_batch(
            &world,
            &config.defence,
            &config.finetune,
            &config.align.tasks,
            seed,
        )?;
        let aligned_scores = score(&aligned, &world, &sets, &safety, 0, device);
        let insights = seed_insights(config, &world, &aligned, &safety, seed, device)?;
        let stage = Stage {
            world: &world,
            aligned: &aligned,
            finetune: &config.finetune,
            defence: &config.defence,
            sets: &sets,
            safety: &safety,
            device,
        };
        let total = config.methods.len() * config.shares.len() * config.finetune.steps;
        progress.start(&format!("fine-tune (seed {seed})"), total as u64);
        let mut runs = Vec::new();
        for &p in &config.shares {
            for &method in &config.methods {
                runs.push(if config.replicas > 1 {
                    stage.run_replicated(method, p, seed, &devices, progress)?
                } else {
                    let probe = if method == Method::Sft {
                        CosineProbe::EveryStep
                    } else {
                        CosineProbe::Off
                    };
                    stage.run(method, p, seed, probe, progress)?
                });
            }
        }
        progress.finish(&format!("seed {seed} done"));
        seeds.push(SeedResult {
            seed,
            aligned: aligned_scores,
            insights,
            runs,
        });
    }
    Ok(summarise(
        config.clone(),
        backend,
        seeds,
        started.elapsed().as_secs_f64(),
    ))
}

/// The world of a valid `config`, and its held-out sets.
pub(crate) fn world_and_sets(config: &ExperimentConfig) -> Result<(World, EvalSets), LabError> {
    config.validate()?;
    let world = World::new(config.world.clone())?;
    let sets = EvalSets::new(
        &world,
        config.finetune.task,
        &config.align.tasks,
        config.eval_prompts,
        config.world.seed ^ salt::TEST_SETS,
    )?;
    Ok((world, sets))
}

fn seed_insights(
    config: &ExperimentConfig,
    world: &World,
    aligned: &Transformer,
    safety: &[crate::world::Example],
    seed: u64,
    device: &Device,
) -> Result<Insights, LabError> {
    let mut rng = StdRng::seed_from_u64(seed ^ salt::INSIGHTS);
    let tasks = &config.align.tasks;
    let many = (0..config.insight_batch)
        .map(|_| {
            world.harmful(
                &mut rng,
                tasks,
                HarmTopics::Seen,
                Split::Train,
                Response::Refusal,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let utility = (0..config.insight_batch)
        .map(|_| world.benign(&mut rng, config.finetune.task, Split::Train))
        .collect::<Result<Vec<_>, _>>()?;
    let vocab = world.vocab();
    measure(
        aligned,
        &Batch::new(vocab, &safety[..1], device),
        &Batch::new(vocab, &many, device),
        &Batch::new(vocab, &utility, device),
        &config.insight_ranks,
    )
}

/// Summaries over seeds of per-seed results.
pub fn summarise(
    config: ExperimentConfig,
    backend: &str,
    seeds: Vec<SeedResult>,
    wall_seconds: f64,
) -> Results {
    let over = |f: &dyn Fn(&Scores) -> f64, scores: &[Scores]| {
        MeanStd::of(&scores.iter().map(f).collect::<Vec<_>>())
    };
    let summary_of = |method, p, scores: &[Scores]| Summary {
        method,
        p,
        harmful_seen: over(&|s| s.harmful_seen, scores),
        harmful_unseen: over(&|s| s.harmful_unseen, scores),
        accuracy: over(&|s| s.accuracy, scores),
        old_accuracy: over(&|s| s.old_accuracy, scores),
    };
    let runs = |method: Method, p: f64| -> Vec<&Run> {
        seeds
            .iter()
            .flat_map(|s| &s.runs)
            .filter(|r| r.method == method && r.p == p)
            .collect()
    };
    let mut summary = Vec::new();
    for &p in &config.shares {
        for &method in &config.methods {
            let last: Vec<Scores> = runs(method, p).iter().map(|r| r.last()).collect();
            summary.push(summary_of(method, p, &last));
        }
    }
    let aligned: Vec<Scores> = seeds.iter().map(|s| s.aligned).collect();
    let negative_cosine_share = config
        .shares
        .iter()
        .map(|&p| {
            let shares: Vec<f64> = runs(Method::Sft, p)
                .iter()
                .filter(|r| !r.cosines.is_empty())
                .map(|r| {
                    r.cosines.iter().filter(|&&c| c < 0.0).count() as f64 / r.cosines.len() as f64
                })
                .collect();
            (p, MeanStd::of(&shares))
        })
        .collect();
    Results {
        aligned: summary_of(Method::Sft, 0.0, &aligned),
        config,
        backend: backend.to_owned(),
        seeds,
        summary,
        negative_cosine_share,
        wall_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use spf_core::SpfError;

    #[test]
    fn mean_and_std_over_seeds() {
        let m = MeanStd::of(&[0.2, 0.4]);
        assert!((m.mean - 0.3).abs() < 1e-12 && (m.std - 0.1).abs() < 1e-12);
        assert_eq!(MeanStd::of(&[]), MeanStd::default());
    }

    #[test]
    fn invalid_configurations_are_rejected() {
        assert!(ExperimentConfig::new().validate().is_ok());
        assert!(ExperimentConfig::quick().validate().is_ok());
        let bad = [
            ExperimentConfig::new().with_seeds(vec![]),
            ExperimentConfig::new().with_shares(vec![1.5]),
            ExperimentConfig::new().with_finetune(FinetuneConfig::new().with_samples(0)),
            ExperimentConfig::new().with_defence(DefenceConfig::new().with_rank(0)),
            ExperimentConfig::new().with_model(TransformerConfig::new().with_heads(3)),
            ExperimentConfig::new().with_defence(
                DefenceConfig::new().with_screen(Some(ScreenThreshold::calibrated())),
            ),
        ];
        for config in bad {
            assert!(matches!(config.validate(), Err(LabError::Config(_))));
        }
        for threshold in [-0.1, 1.5, f64::NAN] {
            let fixed = Some(ScreenThreshold::Fixed(threshold));
            let screen = DefenceConfig::new().with_screen(fixed);
            let config = ExperimentConfig::new().with_defence(screen);
            assert!(matches!(
                config.validate(),
                Err(LabError::Spf(SpfError::InvalidScreenThreshold { .. }))
            ));
        }
    }

    #[test]
    fn the_sample_screen_at_one_is_spf_and_at_zero_drops_conflicting_samples() {
        let config = ExperimentConfig::new()
            .with_align(AlignConfig::new().with_steps(20))
            .with_finetune(
                FinetuneConfig::new()
                    .with_samples(40)
                    .with_batch_size(8)
                    .with_steps(4)
                    .with_eval_every(4),
            )
            .with_eval_prompts(8);
        let (world, sets) = world_and_sets(&config).unwrap();
        let device = burn::tensor::Device::default().autodiff();
        let silent = &mut spf_harness::progress::Silent;
        // One aligned model for every run (alignment seeds burn's global generator, which
        // tests running in parallel share).
        let aligned = aligned_model(&config, &world, 0, None, &device, silent).unwrap();
        let run = |method, screen: Option<f64>| {
            let defence = DefenceConfig::new().with_screen(screen.map(ScreenThreshold::Fixed));
            let safety =
                safety_batch(&world, &defence, &config.finetune, &config.align.tasks, 0).unwrap();
            let stage = Stage {
                world: &world,
                aligned: &aligned,
                finetune: &config.finetune,
                defence: &defence,
                sets: &sets,
                safety: &safety,
                device: &device,
            };
            let silent = &mut spf_harness::progress::Silent;
            stage.run(method, 0.5, 0, CosineProbe::Off, silent).unwrap()
        };
        let sft = run(Method::Sft, Some(0.0));
        assert_eq!(sft.screen, None, "SFT has no subspace to screen with");
        assert_eq!(sft.curve, run(Method::Sft, None).curve);

        // A threshold of 1 keeps every sample: the run is SPF's, to the bit.
        let plain = run(Method::SpfConflictOnly, None);
        let all_kept = run(Method::SpfConflictOnly, Some(1.0));
        assert_eq!(plain.screen, None);
        assert_eq!(all_kept.curve, plain.curve);
        assert_eq!(all_kept.projection, plain.projection);
        let kept = all_kept.screen.expect("SPF with a screen");
        assert_eq!(kept.threshold, 1.0);
        assert_eq!(
            kept.harmful.scored + kept.task.scored + kept.refusal.scored,
            4 * 8
        );
        assert!(kept.harmful.scored > 0 && kept.task.scored > 0);
        assert_eq!(kept.harmful.dropped + kept.task.dropped, 0);

        // A threshold of 0 drops every sample the projection would change at all.
        let strict = run(Method::SpfConflictOnly, Some(0.0));
        let dropped = strict.screen.expect("SPF with a screen");
        assert!(dropped.harmful.dropped + dropped.task.dropped > 0);
        for counts in [&dropped.harmful, &dropped.task] {
            let positive = counts.quantiles.last().is_some_and(|&max| max > 0.0);
            assert_eq!(counts.dropped > 0, positive, "{counts:?}");
        }
        assert_ne!(strict.curve, plain.curve);
    }

    #[test]
    fn aligned_checkpoints_are_reused_exactly() {
        let dir = std::env::temp_dir().join(format!("spf-lab-cache-{}", std::process::id()));
        let config = ExperimentConfig::new().with_align(AlignConfig::new().with_steps(3));
        let world = World::new(config.world.clone()).unwrap();
        let device = burn::tensor::Device::default().autodiff();
        let silent = &mut spf_harness::progress::Silent;
        let trained = aligned_model(&config, &world, 4, Some(&dir), &device, silent).unwrap();
        let loaded = aligned_model(&config, &world, 4, Some(&dir), &device, silent).unwrap();
        let other = aligned_model(&config, &world, 5, Some(&dir), &device, silent).unwrap();
        let tokens = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(vec![1i64, 4, 30, 8, 9, 2], [1, 6]),
            &device,
        );
        let weights = |m: &Transformer| {
            m.forward(tokens.clone())
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
        };
        assert_eq!(weights(&trained), weights(&loaded));
        assert_ne!(
            weights(&trained),
            weights(&other),
            "each seed has its own checkpoint"
        );
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
