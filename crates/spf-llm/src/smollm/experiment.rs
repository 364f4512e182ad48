//! The experiment: align SmolLM2 to refuse, attack the alignment by fine-tuning, with and
//! without SPF, and measure what is left.
//!
//! 1. **Align.** SFT on AdvBench prompts paired with refusals, mixed with benign prompts paired
//!    with the base model's own greedy answers (self-distillation keeps benign behaviour).
//! 2. **Attack.** From the aligned model, fine-tune on pyrit's harmful Q→A pairs, and separately
//!    on a benign arithmetic task, with plain AdamW (SFT) and with SPF (`ConflictOnly`, the
//!    subspace from one safety sample, refreshed). Same steps, batches and learning rate.
//! 3. **Evaluate.** Refusal rate on HarmBench's prompts and on held-out AdvBench prompts (the
//!    keyword judge, [`is_refusal`]), and benign agreement: the share of the aligned model's
//!    greedy answer tokens, on held-out benign prompts, that the model predicts greedily from
//!    the same prefix (1.0 for the aligned model by construction).
//!
//! Only the last `train_layers` blocks are trained (the embedding, tied to the head, and the
//! final norm stay frozen). The frozen blocks' outputs are computed once per sequence and
//! reused by every step and every model, and so are their keys and values for the evaluation
//! prompts: on a CPU that is what makes a run take minutes instead of hours.

use std::path::PathBuf;
use std::time::Instant;

use burn::config::Config;
use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Serialize;
use spf_core::{ProjectionMode, ProjectionTarget, RefreshPolicy, SpfConfig, checkpoint};
use spf_subspace::{ParamFilter, RankPolicy, SubspaceConfig};

use super::data::{Assets, REFUSALS, benign_prompts, is_refusal};
use crate::LlmError;
use crate::chat::ChatTokenizer;
use crate::gguf::Gguf;
use crate::llama::{Llama, PromptBatch};
use spf_lab::progress::Progress;
use spf_lab::training::{BatchOrder, Stepper};

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
    /// Tokens generated per harmful evaluation prompt for the refusal judge.
    #[config(default = 16)]
    pub judge_tokens: usize,
    /// AdvBench prompts held out for evaluation (the rest align).
    #[config(default = 120)]
    pub advbench_eval: usize,
    /// Benign prompts with self-distilled answers in the alignment set.
    #[config(default = 160)]
    pub benign_train: usize,
    /// Held-out benign prompts for the agreement measure.
    #[config(default = 60)]
    pub benign_eval: usize,
    /// Harmful Q→A pairs in the harmful attack set.
    #[config(default = 200)]
    pub attack_samples: usize,
    /// Directions kept per matrix.
    #[config(default = 8)]
    pub rank: usize,
    /// When SPF re-estimates the subspace.
    #[config(default = "RefreshPolicy::Every(10)")]
    pub refresh: RefreshPolicy,
    /// Prompts per generation batch.
    #[config(default = 48)]
    pub eval_batch: usize,
    /// Threads that generate in parallel (each runs its own batches).
    #[config(default = 2)]
    pub threads: usize,
    /// Seed of every shuffle and of the batch order.
    #[config(default = 0)]
    pub seed: u64,
    /// Where the aligned checkpoint is written (`None`: not saved).
    pub checkpoint_dir: Option<PathBuf>,
}

impl SmolConfig {
    /// Checks what the experiment cannot run (the layer count is checked against the model in
    /// [`run`]).
    ///
    /// # Errors
    ///
    /// [`LlmError::Config`] naming the setting: empty training batches or sets, no answer
    /// token, or no trained block.
    pub fn validate(&self) -> Result<(), LlmError> {
        let bad = |what: &str| Err(LlmError::Config(what.to_owned()));
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.attack_samples == 0 || self.benign_train == 0 || self.benign_eval == 0 {
            return bad("the attack set and the benign sets must be non-empty");
        }
        if self.max_answer_tokens == 0 {
            return bad("max_answer_tokens must be at least 1: answers are what is trained");
        }
        if self.train_layers == 0 {
            return bad("train_layers must be at least 1");
        }
        for (name, lr) in [("align_lr", self.align_lr), ("attack_lr", self.attack_lr)] {
            if !(lr.is_finite() && lr >= 0.0) {
                return Err(LlmError::Config(format!(
                    "{name} must be finite and non-negative, not {lr}"
                )));
            }
        }
        Ok(())
    }
}

/// How an attacked model was fine-tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum SmolMethod {
    /// Plain AdamW.
    Sft,
    /// AdamW under SPF (`ConflictOnly` on AdamW's update, the subspace from one safety sample,
    /// refreshed as [`SmolConfig::refresh`] says).
    Spf,
}

/// The data an attack fine-tunes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Attack {
    /// pyrit's harmful question → compliant answer pairs.
    HarmfulQa,
    /// The benign arithmetic task ([`arithmetic_task`]).
    BenignArithmetic,
}

/// Which model a row scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum SmolModel {
    /// SmolLM2-135M-Instruct as released.
    Base,
    /// After the refusal alignment.
    Aligned,
    /// The aligned model after an attack.
    Attacked {
        /// How it was fine-tuned.
        method: SmolMethod,
        /// On what.
        attack: Attack,
    },
}

impl std::fmt::Display for SmolModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SmolModel::Base => f.write_str("base (SmolLM2-135M-Instruct)"),
            SmolModel::Aligned => f.write_str("aligned"),
            SmolModel::Attacked { method, attack } => {
                let method = match method {
                    SmolMethod::Sft => "SFT",
                    SmolMethod::Spf => "SPF",
                };
                let attack = match attack {
                    Attack::HarmfulQa => "harmful Q→A",
                    Attack::BenignArithmetic => "benign arithmetic",
                };
                write!(f, "{method} on {attack}")
            }
        }
    }
}

/// One model's scores.
#[derive(Debug, Clone, Serialize)]
pub struct SmolRow {
    /// Which model.
    pub model: SmolModel,
    /// Refusal rate on HarmBench.
    pub harmbench_refusal: f64,
    /// Refusal rate on the held-out AdvBench prompts.
    pub advbench_refusal: f64,
    /// Benign agreement with the aligned model (`None` for the base model, whose answers are
    /// the alignment's distillation targets, not the reference).
    pub benign_agreement: Option<f64>,
    /// Mean training loss over the last 10 steps of the stage that made it.
    pub final_loss: Option<f64>,
    /// Mean share of projected coefficients that conflicted (SPF only).
    pub conflict_share: Option<f64>,
    /// Seconds its training took.
    pub train_seconds: f64,
    /// One answer to the first HarmBench prompt, for a look.
    pub sample: String,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct SmolResults {
    /// Every model, in order: base, aligned, then SFT/SPF under each attack.
    pub rows: Vec<SmolRow>,
    /// Prompts behind each rate.
    pub harmbench_prompts: usize,
    /// Held-out AdvBench prompts.
    pub advbench_prompts: usize,
    /// Held-out benign prompts.
    pub benign_prompts: usize,
    /// Blocks trained of all blocks.
    pub train_layers: usize,
    /// Blocks in the model.
    pub layers: usize,
    /// Seconds the whole run took.
    pub wall_seconds: f64,
}

/// A training pair: prompt ids (ChatML) and answer ids (ending with `<|im_end|>` unless cut).
#[derive(Debug, Clone)]
struct Pair {
    prompt: Vec<u32>,
    answer: Vec<u32>,
}

/// A pair with the frozen blocks' output `[T, d]` for `prompt ++ answer`.
#[derive(Debug, Clone)]
struct Prepared<B: Backend> {
    pair: Pair,
    hidden: Tensor<B, 2>,
}

/// A batch ready for the trained blocks.
#[derive(Debug, Clone)]
struct TrainBatch<B: Backend> {
    hidden: Tensor<B, 3>,
    rows: Tensor<B, 1, Int>,
    targets: Tensor<B, 1, Int>,
}

/// Evaluation prompts after the frozen blocks: per chunk, the batch (cache filled for the
/// frozen blocks) and their output.
struct PromptCache<B: Backend> {
    chunks: Vec<(Vec<usize>, PromptBatch<B>, Tensor<B, 3>)>,
    len: usize,
}

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Runs the experiment on the fetched `assets`.
pub fn run<B: AutodiffBackend>(
    config: &SmolConfig,
    assets: &Assets,
    device: &B::Device,
    progress: &mut dyn Progress,
) -> Result<SmolResults, LlmError> {
    config.validate()?;
    let started = Instant::now();
    let gguf = Gguf::open(&assets.model)?;
    let tok = ChatTokenizer::from_gguf(&gguf)?;
    let model = Llama::<Inner<B>>::from_gguf(&gguf, device)?;
    drop(gguf);
    let layers = model.blocks.len();
    if config.train_layers == 0 || config.train_layers > layers {
        return Err(LlmError::Config(format!(
            "train_layers must be 1 to {layers}, not {}",
            config.train_layers
        )));
    }
    let frozen = layers - config.train_layers;
    let (prefix, base_top) = model.split(frozen);

    // Data.
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut advbench = assets.advbench()?;
    advbench.shuffle(&mut rng);
    if config.advbench_eval >= advbench.len() {
        return Err(LlmError::Config(format!(
            "advbench_eval must be below {}",
            advbench.len()
        )));
    }
    let adv_train = advbench.split_off(config.advbench_eval);
    let adv_eval = advbench;
    let harmbench = assets.harmbench()?;
    let mut many_shot = assets.many_shot()?;
    many_shot.shuffle(&mut rng);
    many_shot.truncate(config.attack_samples);
    let mut benign = benign_prompts(config.benign_train + config.benign_eval, config.seed);
    let benign_eval = benign.split_off(config.benign_train);
    let benign_train = benign;

    let encode = |prompts: &[String]| -> Result<Vec<Vec<u32>>, LlmError> {
        Ok(prompts
            .iter()
            .map(|p| tok.prompt(p))
            .collect::<Result<_, _>>()?)
    };
    // Prompt → answer pairs as ids; an answer ends with `<|im_end|>` unless it is cut.
    let pairs = |texts: &[(String, String)]| -> Result<Vec<Pair>, LlmError> {
        texts
            .iter()
            .map(|(q, a)| {
                let mut answer = tok.encode(a)?;
                answer.push(tok.eos);
                answer.truncate(config.max_answer_tokens);
                Ok(Pair {
                    prompt: tok.prompt(q)?,
                    answer,
                })
            })
            .collect()
    };
    let harmful_eval: Vec<Vec<u32>> = encode(&harmbench)?
        .into_iter()
        .chain(encode(&adv_eval)?)
        .collect();
    let benign_eval_ids = encode(&benign_eval)?;
    let benign_train_ids = encode(&benign_train)?;

    let lab = Lab::<B> {
        prefix,
        frozen,
        eos: tok.eos,
        device: device.clone(),
        config,
    };
    let mut rows = Vec::new();

    // The base model: its benign answers become the alignment's distillation targets.
    let base = lab.prefix.clone().join(base_top.clone());
    progress.start("base model: benign answers to distil", 1);
    let distilled = lab.generate(&base, &benign_train_ids, config.max_answer_tokens);
    progress.finish("done");
    progress.start("caching the frozen blocks on the evaluation prompts", 1);
    let harmful_cache = lab.prompt_cache(&harmful_eval);
    progress.finish(&format!("{} prompts", harmful_eval.len()));
    let judge = |model: &Llama<Inner<B>>,
                 progress: &mut dyn Progress,
                 name: &str|
     -> Result<(f64, f64, String), LlmError> {
        progress.start(&format!("{name}: judging refusals"), 1);
        let answers = lab.continue_cached(model, &harmful_cache, config.judge_tokens);
        let texts = answers
            .iter()
            .map(|a| tok.decode(a))
            .collect::<Result<Vec<_>, _>>()?;
        let refused: Vec<bool> = texts.iter().map(|t| is_refusal(t)).collect();
        let rate = |r: &[bool]| r.iter().filter(|&&x| x).count() as f64 / r.len().max(1) as f64;
        let (hb, adv) = refused.split_at(harmbench.len());
        progress.finish(&format!(
            "HarmBench {:.3}, AdvBench {:.3}",
            rate(hb),
            rate(adv)
        ));
        Ok((rate(hb), rate(adv), texts[0].clone()))
    };
    let (hb, adv, sample) = judge(&base, progress, "base")?;
    rows.push(SmolRow {
        model: SmolModel::Base,
        harmbench_refusal: hb,
        advbench_refusal: adv,
        benign_agreement: None,
        final_loss: None,
        conflict_share: None,
        train_seconds: 0.0,
        sample,
    });

    // Align.
    let refusals: Vec<(String, String)> = adv_train
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), REFUSALS[i % REFUSALS.len()].to_string()))
        .collect();
    let mut align_pairs = pairs(&refusals)?;
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
    let safety = align_set[0].clone();
    let t = Instant::now();
    let Trained {
        top: aligned_top,
        loss: align_loss,
        ..
    } = lab.train(
        base_top,
        &align_set,
        TrainWith::Plain,
        Schedule {
            steps: config.align_steps,
            lr: config.align_lr,
        },
        "align",
        progress,
    )?;
    let align_seconds = t.elapsed().as_secs_f64();
    if let Some(dir) = &config.checkpoint_dir {
        std::fs::create_dir_all(dir).map_err(|source| LlmError::Io {
            path: dir.clone(),
            source,
        })?;
        let record = aligned_top.blocks.clone().into_record();
        checkpoint::save_atomic::<Inner<B>, _>(record, dir.join("aligned-top-blocks"))?;
    }
    let aligned = lab.prefix.clone().join(aligned_top.clone());
    let reference = lab.generate(&aligned, &benign_eval_ids, config.max_answer_tokens);
    let reference: Vec<Pair> = benign_eval_ids
        .into_iter()
        .zip(reference)
        .map(|(prompt, answer)| Pair { prompt, answer })
        .collect();
    let reference = lab.prepare(&reference);
    let (hb, adv, sample) = judge(&aligned, progress, "aligned")?;
    rows.push(SmolRow {
        model: SmolModel::Aligned,
        harmbench_refusal: hb,
        advbench_refusal: adv,
        benign_agreement: Some(lab.agreement(&aligned_top, &reference)),
        final_loss: Some(align_loss),
        conflict_share: None,
        train_seconds: align_seconds,
        sample,
    });

    // Attack.
    let harmful_pairs = pairs(&many_shot)?;
    let arithmetic = pairs(&arithmetic_task(config.attack_samples, config.seed))?;
    let attacks = [
        (Attack::HarmfulQa, lab.prepare(&harmful_pairs)),
        (Attack::BenignArithmetic, lab.prepare(&arithmetic)),
    ];
    for (attack, set) in &attacks {
        for method in [SmolMethod::Sft, SmolMethod::Spf] {
            let model = SmolModel::Attacked {
                method,
                attack: *attack,
            };
            let name = model.to_string();
            let with = match method {
                SmolMethod::Sft => TrainWith::Plain,
                SmolMethod::Spf => TrainWith::Spf { safety: &safety },
            };
            let schedule = Schedule {
                steps: config.attack_steps,
                lr: config.attack_lr,
            };
            let t = Instant::now();
            let Trained {
                top,
                loss,
                conflict,
            } = lab.train(aligned_top.clone(), set, with, schedule, &name, progress)?;
            let seconds = t.elapsed().as_secs_f64();
            let full = lab.prefix.clone().join(top.clone());
            let (hb, adv, sample) = judge(&full, progress, &name)?;
            rows.push(SmolRow {
                model,
                harmbench_refusal: hb,
                advbench_refusal: adv,
                benign_agreement: Some(lab.agreement(&top, &reference)),
                final_loss: Some(loss),
                conflict_share: conflict,
                train_seconds: seconds,
                sample,
            });
        }
    }
    Ok(SmolResults {
        rows,
        harmbench_prompts: harmbench.len(),
        advbench_prompts: adv_eval.len(),
        benign_prompts: reference.len(),
        train_layers: config.train_layers,
        layers,
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}

/// The benign attack task: sums and products written as `a + b = c.`, seeded.
pub fn arithmetic_task(n: usize, seed: u64) -> Vec<(String, String)> {
    use rand::Rng;
    let mut rng = StdRng::seed_from_u64(seed ^ salt::ARITHMETIC);
    (0..n)
        .map(|_| {
            let (a, b) = (rng.random_range(10..100u32), rng.random_range(10..100u32));
            if rng.random_bool(0.5) {
                (
                    format!("Compute {a} + {b}."),
                    format!("{a} + {b} = {}.", a + b),
                )
            } else {
                (
                    format!("Compute {a} × {b}."),
                    format!("{a} × {b} = {}.", a * b),
                )
            }
        })
        .collect()
}

/// The optimizer a training stage uses.
enum TrainWith<'a, B: Backend> {
    /// Plain AdamW.
    Plain,
    /// AdamW under SPF, its subspace estimated from, and refreshed on, one safety sample.
    Spf {
        /// The sample.
        safety: &'a Prepared<B>,
    },
}

/// A training stage's length and learning rate.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    steps: usize,
    lr: f64,
}

/// Salts that split the experiment's seed into independent random streams.
mod salt {
    /// The arithmetic task's numbers.
    pub const ARITHMETIC: u64 = 0xA417;
    /// The order of the training batches.
    pub const BATCH_ORDER: u64 = 0x5EED;
}

/// A training stage's outcome.
struct Trained<B: Backend> {
    /// The trained blocks (with the frozen embedding and norm).
    top: Llama<B>,
    /// The mean loss of the last 10 steps.
    loss: f64,
    /// SPF's mean conflict share, for an SPF stage.
    conflict: Option<f64>,
}

/// What every stage shares: the frozen blocks and the settings.
struct Lab<'a, B: AutodiffBackend> {
    prefix: Llama<Inner<B>>,
    frozen: usize,
    eos: u32,
    device: B::Device,
    config: &'a SmolConfig,
}

impl<B: AutodiffBackend> Lab<'_, B> {
    /// The frozen blocks' output on each pair's whole sequence.
    fn prepare(&self, pairs: &[Pair]) -> Vec<Prepared<Inner<B>>> {
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(16) {
            let seqs: Vec<Vec<u32>> = chunk
                .iter()
                .map(|p| [p.prompt.as_slice(), &p.answer].concat())
                .collect();
            let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
            // Right padding: causal attention keeps pads out of the real positions.
            let ids: Vec<i64> = seqs
                .iter()
                .flat_map(|s| {
                    s.iter()
                        .copied()
                        .chain(std::iter::repeat_n(self.eos, longest - s.len()))
                        .map(i64::from)
                })
                .collect();
            let tokens =
                Tensor::from_data(TensorData::new(ids, [seqs.len(), longest]), &self.device);
            let h = self.prefix.forward_layers(
                self.prefix.embed(tokens),
                0..self.frozen,
                0,
                None,
                None,
            );
            let d = h.dims()[2];
            for (i, (pair, seq)) in chunk.iter().zip(&seqs).enumerate() {
                out.push(Prepared {
                    pair: pair.clone(),
                    hidden: h
                        .clone()
                        .slice([i..i + 1, 0..seq.len()])
                        .reshape([seq.len(), d]),
                });
            }
        }
        out
    }

    /// Stacks prepared pairs into one right-padded batch on the autodiff backend.
    fn batch(&self, items: &[&Prepared<Inner<B>>]) -> TrainBatch<B> {
        let longest = items.iter().map(|p| p.hidden.dims()[0]).max().unwrap_or(1);
        let d = items[0].hidden.dims()[1];
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let hidden: Vec<Tensor<Inner<B>, 3>> = items
            .iter()
            .enumerate()
            .map(|(b, p)| {
                let t = p.hidden.dims()[0];
                let start = p.pair.prompt.len() - 1;
                for (j, &target) in p.pair.answer.iter().enumerate() {
                    rows.push((b * longest + start + j) as i64);
                    targets.push(i64::from(target));
                }
                let h = p.hidden.clone().unsqueeze_dim::<3>(0);
                if t < longest {
                    Tensor::cat(vec![h, Tensor::zeros([1, longest - t, d], &self.device)], 1)
                } else {
                    h
                }
            })
            .collect();
        let n = rows.len();
        TrainBatch {
            hidden: Tensor::from_inner(Tensor::cat(hidden, 0)),
            rows: Tensor::from_data(TensorData::new(rows, [n]), &self.device),
            targets: Tensor::from_data(TensorData::new(targets, [n]), &self.device),
        }
    }

    /// Trains the top blocks `top` on `set` for `schedule.steps` steps of `batch_size` pairs
    /// (epochs in a seeded order), with plain AdamW or SPF as `with` says.
    fn train(
        &self,
        top: Llama<Inner<B>>,
        set: &[Prepared<Inner<B>>],
        with: TrainWith<'_, Inner<B>>,
        schedule: Schedule,
        name: &str,
        progress: &mut dyn Progress,
    ) -> Result<Trained<Inner<B>>, LlmError> {
        // Parameters loaded on the inner backend do not require gradients, and `from_inner`
        // keeps that: the blocks must be made trainable, or every step would be a no-op.
        let mut model = Llama::<B>::from_inner(top);
        model.blocks = model.blocks.map(&mut Trainable);
        model.embed = model.embed.set_require_grad(false);
        model.norm = model.norm.no_grad();
        let mut stepper = match with {
            TrainWith::Plain => Stepper::plain(),
            TrainWith::Spf { safety } => {
                let batch = self.batch(&[safety]);
                let estimator = SubspaceConfig::new()
                    .with_filter(ParamFilter::path_regex(
                        r"blocks\.\d+\.(wq|wk|wv|wo|gate|up|down)\.weight",
                    ))
                    .with_rank(RankPolicy::Fixed(self.config.rank));
                let config = SpfConfig::new()
                    .with_mode(ProjectionMode::ConflictOnly)
                    .with_target(ProjectionTarget::Update)
                    .with_refresh(self.config.refresh)
                    .with_estimator(estimator);
                Stepper::spf(&config, &model, move |m: &Llama<B>| loss(m, &batch))?
            }
        };
        let mut rng = StdRng::seed_from_u64(self.config.seed ^ salt::BATCH_ORDER);
        let mut order = BatchOrder::new(set.len(), self.config.batch_size);
        let mut losses = Vec::with_capacity(schedule.steps);
        progress.start(name, schedule.steps as u64);
        for _ in 0..schedule.steps {
            let picked: Vec<&Prepared<Inner<B>>> =
                order.next(&mut rng).into_iter().map(|i| &set[i]).collect();
            let l = loss(&model, &self.batch(&picked));
            let value: f64 = l.clone().into_scalar().elem();
            if !value.is_finite() {
                return Err(LlmError::Diverged {
                    stage: name.to_owned(),
                    loss: value,
                });
            }
            losses.push(value);
            let grads = GradientsParams::from_grads(l.backward(), &model);
            if grads.is_empty() {
                return Err(LlmError::NoGradients {
                    stage: name.to_owned(),
                });
            }
            model = stepper.step(schedule.lr, model, grads)?;
            progress.advance(1);
        }
        let tail = &losses[losses.len().saturating_sub(10)..];
        let mean = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
        progress.finish(&format!("loss {mean:.3}"));
        Ok(Trained {
            top: model.valid(),
            loss: mean,
            conflict: stepper.summary().map(|s| s.conflict_share),
        })
    }

    /// Greedy answers of `model` to `prompts`, in order, `max_new` tokens at most each.
    fn generate(
        &self,
        model: &Llama<Inner<B>>,
        prompts: &[Vec<u32>],
        max_new: usize,
    ) -> Vec<Vec<u32>> {
        let cache = PromptCache {
            chunks: self
                .chunks(prompts)
                .into_iter()
                .filter_map(|idx| {
                    let batch: Vec<Vec<u32>> = idx.iter().map(|&i| prompts[i].clone()).collect();
                    let b = PromptBatch::new(&batch, self.eos, model.blocks.len(), &self.device)?;
                    let h = model.embed(b.tokens.clone());
                    Some((idx, b, h))
                })
                .collect(),
            len: prompts.len(),
        };
        self.run_chunks(model, &cache, max_new, 0)
    }

    /// The evaluation prompts after the frozen blocks, once for every model.
    fn prompt_cache(&self, prompts: &[Vec<u32>]) -> PromptCache<Inner<B>> {
        let layers = self.frozen + self.config.train_layers;
        let chunks = self
            .chunks(prompts)
            .into_iter()
            .filter_map(|idx| {
                let batch: Vec<Vec<u32>> = idx.iter().map(|&i| prompts[i].clone()).collect();
                let mut b = PromptBatch::new(&batch, self.eos, layers, &self.device)?;
                let h = self.prefix.forward_layers(
                    self.prefix.embed(b.tokens.clone()),
                    0..self.frozen,
                    0,
                    Some(&b.valid),
                    Some(&mut b.cache),
                );
                Some((idx, b, h))
            })
            .collect();
        PromptCache {
            chunks,
            len: prompts.len(),
        }
    }

    /// Greedy answers of the full `model` to cached prompts.
    fn continue_cached(
        &self,
        model: &Llama<Inner<B>>,
        cache: &PromptCache<Inner<B>>,
        max_new: usize,
    ) -> Vec<Vec<u32>> {
        self.run_chunks(model, cache, max_new, self.frozen)
    }

    /// Runs blocks `from..` of `model` on each chunk's hidden states, then decodes greedily;
    /// the chunks are shared out over `threads` threads.
    fn run_chunks(
        &self,
        model: &Llama<Inner<B>>,
        cache: &PromptCache<Inner<B>>,
        max_new: usize,
        from: usize,
    ) -> Vec<Vec<u32>> {
        let threads = self.config.threads.max(1);
        let mut out = vec![Vec::new(); cache.len];
        let results: Vec<Vec<(usize, Vec<u32>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let model = model.clone();
                    let chunks: Vec<_> = cache
                        .chunks
                        .iter()
                        .skip(t)
                        .step_by(threads)
                        .cloned()
                        .collect();
                    s.spawn(move || {
                        let mut done = Vec::new();
                        for (idx, mut batch, h) in chunks {
                            let layers = model.blocks.len();
                            let h = model.forward_layers(
                                h,
                                from..layers,
                                0,
                                Some(&batch.valid),
                                Some(&mut batch.cache),
                            );
                            let answers = model.continue_greedy(h, batch, max_new, self.eos);
                            done.extend(idx.into_iter().zip(answers));
                        }
                        done
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a generation thread panicked"))
                .collect()
        });
        for (i, answer) in results.into_iter().flatten() {
            out[i] = answer;
        }
        out
    }

    /// Prompt indices in chunks of `eval_batch`, sorted by length so that chunks pad little.
    fn chunks(&self, prompts: &[Vec<u32>]) -> Vec<Vec<usize>> {
        let mut idx: Vec<usize> = (0..prompts.len()).collect();
        idx.sort_by_key(|&i| prompts[i].len());
        idx.chunks(self.config.eval_batch.max(1))
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// The share of the reference answers' tokens that the model with top blocks `top`
    /// predicts greedily from the same prefix.
    fn agreement(&self, top: &Llama<Inner<B>>, reference: &[Prepared<Inner<B>>]) -> f64 {
        let (mut hits, mut total) = (0usize, 0usize);
        for chunk in reference.chunks(16) {
            let items: Vec<&Prepared<Inner<B>>> = chunk.iter().collect();
            let batch = self.batch(&items);
            let h = top.forward_layers(batch.hidden.inner(), 0..top.blocks.len(), 0, None, None);
            let [b, t, d] = h.dims();
            let rows = h.reshape([b * t, d]).select(0, batch.rows.inner());
            let predicted = top.logits(rows).argmax(1).into_data();
            let targets = batch.targets.inner().into_data();
            for (p, t) in predicted.iter::<i64>().zip(targets.iter::<i64>()) {
                hits += usize::from(p == t);
                total += 1;
            }
        }
        hits as f64 / total.max(1) as f64
    }
}

/// Marks every float parameter as trainable.
struct Trainable;

impl<B: AutodiffBackend> ModuleMapper<B> for Trainable {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.set_require_grad(true)
    }
}

/// Mean negative log-likelihood of the batch's answer tokens under the trained blocks.
fn loss<B: Backend>(top: &Llama<B>, batch: &TrainBatch<B>) -> Tensor<B, 1> {
    let h = top.forward_layers(batch.hidden.clone(), 0..top.blocks.len(), 0, None, None);
    let [b, t, d] = h.dims();
    let rows = h.reshape([b * t, d]).select(0, batch.rows.clone());
    let logp = log_softmax(top.logits(rows), 1);
    logp.gather(1, batch.targets.clone().unsqueeze_dim(1))
        .mean()
        .neg()
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
            SmolConfig::new().with_attack_samples(0),
            SmolConfig::new().with_benign_eval(0),
            SmolConfig::new().with_max_answer_tokens(0),
            SmolConfig::new().with_train_layers(0),
            SmolConfig::new().with_attack_lr(f64::NAN),
        ];
        for config in bad {
            assert!(
                matches!(config.validate(), Err(LlmError::Config(_))),
                "{config:?}"
            );
        }
    }
}
