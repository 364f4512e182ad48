//! The trained top of the model over its frozen bottom: the frozen blocks run once per
//! sequence, their outputs are cached, and every training step, generation and score runs only
//! the top blocks on them. On a CPU that is what makes a run take minutes instead of hours.

use burn::module::{Module, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::Device;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use spf_core::screen::{LinearTap, SampleScreen, traced_scores};
use spf_core::{SafetyGradientSource, SpfConfig};
use spf_harness::progress::Progress;
use spf_harness::screening::{RunScreen, Screened};
use spf_harness::training::{BatchOrder, Stepper};
use spf_subspace::ParamFilter;

use super::config::{PROTECTED, ScreenPass, SmolConfig, SmolLora};
use super::lora::adapt;
use super::pairs::Pair;
use crate::LlmError;
use crate::llama::{Llama, PromptBatch};

/// A pair with the frozen blocks' output `[T, d]` for `prompt ++ answer`.
#[derive(Debug, Clone)]
pub(super) struct Prepared {
    pub(super) pair: Pair,
    pub(super) hidden: Tensor<2>,
}

/// A batch ready for the trained blocks.
#[derive(Debug, Clone)]
pub(super) struct TrainBatch {
    pub(super) hidden: Tensor<3>,
    pub(super) rows: Tensor<1, Int>,
    pub(super) targets: Tensor<1, Int>,
}

/// Evaluation prompts after the frozen blocks: per chunk, the batch (cache filled for the
/// frozen blocks) and their output.
pub(super) struct PromptCache {
    pub(super) chunks: Vec<(Vec<usize>, PromptBatch, Tensor<3>)>,
    pub(super) len: usize,
}

/// The optimizer a training stage uses.
pub(super) enum TrainWith<'a> {
    /// Plain AdamW.
    Plain,
    /// AdamW under SPF, its subspace estimated from, and refreshed on, a safety batch.
    Spf {
        /// The safety batch: harmful prompts with refusals.
        safety: Vec<&'a Prepared>,
        /// SPF's settings (the estimator's target filter is set here).
        config: SpfConfig,
        /// Drops each batch's samples that conflict with the subspace (`None`: keeps all).
        screen: Option<Box<SampleScreen>>,
        /// Clean task examples whose scores set a calibrated screen's threshold: the first step
        /// scores them all, each later one the next `batch_size` of them, in a cycle, at the
        /// step's weights (empty for the other thresholds).
        calibration: Vec<&'a Prepared>,
        /// Per training example, whether it is the defence's own (a SafeInstr refusal), which
        /// the screen leaves in ([`RunScreen`]).
        own: Vec<bool>,
    },
}

/// A training stage's length, learning rate, batch order, and what it trains.
#[derive(Debug, Clone, Copy)]
pub(super) struct Schedule {
    pub(super) steps: usize,
    pub(super) lr: f64,
    /// Seeds the order in which batches are drawn.
    pub(super) order_seed: u64,
    pub(super) tuning: Tuning,
}

/// What a training stage trains.
#[derive(Debug, Clone, Copy)]
pub(super) enum Tuning {
    /// Every weight of the blocks it is given (the top blocks).
    Full,
    /// LoRA adapters on every matrix of every block it is given (the whole model), their
    /// factors drawn from `seed` (`lora.rs`); nothing else trains.
    Lora { lora: SmolLora, seed: u64 },
}

/// A training stage's outcome.
pub(super) struct Trained {
    /// The trained blocks (with the frozen embedding and norm; with their adapters for LoRA).
    pub(super) top: Llama,
    /// The mean loss of the last 10 steps.
    pub(super) loss: f64,
    /// SPF's mean conflict share, for an SPF stage.
    pub(super) conflict: Option<f64>,
    /// Every sample the screen scored, step by step (empty without a screen).
    pub(super) screened: Vec<Screened>,
}

/// What every stage shares: the frozen blocks and the settings.
pub(super) struct Lab<'a> {
    pub(super) prefix: Llama,
    pub(super) frozen: usize,
    /// The model's blocks, frozen and trained.
    pub(super) layers: usize,
    pub(super) eos: u32,
    pub(super) device: Device,
    pub(super) config: &'a SmolConfig,
}

impl<'a> Lab<'a> {
    /// The lab in which every block is above the cache, which then holds the embeddings alone:
    /// for training that reaches every block (LoRA on the whole model).
    pub(super) fn whole(&self) -> Lab<'a> {
        Lab {
            prefix: self.prefix.clone().split(0).0,
            frozen: 0,
            layers: self.layers,
            eos: self.eos,
            device: self.device.clone(),
            config: self.config,
        }
    }

    /// The frozen blocks' output on each pair's whole sequence.
    pub(super) fn prepare(&self, pairs: &[Pair]) -> Vec<Prepared> {
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
    pub(super) fn batch(&self, items: &[&Prepared]) -> TrainBatch {
        let longest = items.iter().map(|p| p.hidden.dims()[0]).max().unwrap_or(1);
        let d = items[0].hidden.dims()[1];
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let hidden: Vec<Tensor<3>> = items
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
    /// (epochs in the order `schedule.order_seed` draws), with plain AdamW or SPF as `with` says.
    pub(super) fn train(
        &self,
        top: Llama,
        set: &[Prepared],
        with: TrainWith<'_>,
        schedule: Schedule,
        name: &str,
        progress: &mut dyn Progress,
    ) -> Result<Trained, LlmError> {
        // Parameters loaded on a plain device do not require gradients, and `train` (which
        // turns autodiff on) keeps that: the blocks must be made trainable, or every step would
        // be a no-op.
        let mut model = top.train();
        match schedule.tuning {
            Tuning::Full => {
                model.blocks = model.blocks.map(&mut Trainable);
                model.embed = model.embed.set_require_grad(false);
                model.norm = model.norm.no_grad();
            }
            Tuning::Lora { lora, seed } => model = adapt(model, lora, seed)?,
        }
        let mut screen = None;
        let mut calibration = Vec::new();
        let mut stepper = match with {
            TrainWith::Plain => Stepper::plain(),
            TrainWith::Spf {
                safety,
                config,
                screen: sample_screen,
                calibration: clean,
                own,
            } => {
                calibration = clean;
                // SafeInstr's refusals are the defence's own: never screened.
                let own = move |index: usize| own.get(index).copied().unwrap_or(false);
                screen = sample_screen.map(|s| RunScreen::new(*s, own));
                let batch = self.batch(&safety);
                let estimator = config
                    .estimator
                    .clone()
                    .with_filter(ParamFilter::path_regex(PROTECTED));
                let config = config.with_estimator(estimator);
                Stepper::spf::<_, LlmError>(&config, &model, move |m: &Llama| loss(m, &batch))?
            }
        };
        let mut rng = StdRng::seed_from_u64(schedule.order_seed);
        let mut order = BatchOrder::new(set.len(), self.config.batch_size);
        let mut losses = Vec::with_capacity(schedule.steps);
        progress.start(name, schedule.steps as u64);
        for step in 0..schedule.steps {
            let mut picked = order.next(&mut rng);
            // The loss and gradients of the whole batch, when the screen's pass computed them and
            // kept every sample.
            let whole = match &mut screen {
                Some(screen) => {
                    if screen.is_calibrated() && !calibration.is_empty() {
                        // The first step scores the whole set, so that its batch is judged
                        // against a full reference too; each later one the next batch of it.
                        let b = self.config.batch_size;
                        let clean: Vec<&Prepared> = if step == 0 {
                            calibration.clone()
                        } else {
                            (step * b..(step + 1) * b)
                                .map(|i| calibration[i % calibration.len()])
                                .collect()
                        };
                        screen.calibrate(&self.scores(&stepper, &model, &clean)?);
                    }
                    self.screen_batch(screen, &stepper, &model, set, &mut picked)?
                }
                None => None,
            };
            if picked.is_empty() {
                // Every sample conflicted: no step (the model keeps its weights).
                progress.advance(1);
                continue;
            }
            let (value, grads) = match whole {
                Some(whole) => whole,
                None => {
                    let picked: Vec<&Prepared> = picked.into_iter().map(|i| &set[i]).collect();
                    let l = loss(&model, &self.batch(&picked));
                    let value: f64 = l.clone().into_scalar::<f64>();
                    (value, GradientsParams::from_grads(l.backward(), &model))
                }
            };
            if !value.is_finite() {
                return Err(LlmError::Diverged {
                    stage: name.to_owned(),
                    loss: value,
                });
            }
            losses.push(value);
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
            screened: screen.map(RunScreen::into_log).unwrap_or_default(),
        })
    }

    /// Screens the batch `picked` (indices into `set`) in place with the configured pass, and
    /// returns the whole batch's loss and gradients when that pass computed them and the screen
    /// kept every sample.
    fn screen_batch<F, S>(
        &self,
        screen: &mut RunScreen<F>,
        stepper: &Stepper<S>,
        model: &Llama,
        set: &[Prepared],
        picked: &mut Vec<usize>,
    ) -> Result<Option<(f64, GradientsParams)>, LlmError>
    where
        F: Fn(usize) -> bool,
        S: SafetyGradientSource<Llama>,
    {
        if !self.batch_pass() {
            let gradient_of = |index: usize| self.gradient(model, &set[index]);
            screen.batch(stepper, model, picked, gradient_of)?;
            return Ok(None);
        }
        let items: Vec<&Prepared> = picked.iter().map(|&i| &set[i]).collect();
        // Plain AdamW has no subspace to screen against.
        let Some((value, grads, scores)) = self.traced(stepper, model, &items)? else {
            return Ok(None);
        };
        let before = picked.len();
        screen.batch_scored(picked, &scores)?;
        Ok((picked.len() == before).then(|| (value, GradientsParams::from_grads(grads, model))))
    }

    /// Whether the screen scores a batch in one backward pass ([`ScreenPass::Batch`]).
    fn batch_pass(&self) -> bool {
        self.config.screen_pass.unwrap_or(ScreenPass::PerSample) == ScreenPass::Batch
    }

    /// The gradient of one example alone.
    fn gradient(&self, model: &Llama, item: &Prepared) -> GradientsParams {
        let grads = loss(model, &self.batch(&[item])).backward();
        GradientsParams::from_grads(grads, model)
    }

    /// The batch `items`' loss, gradients and every sample's screen score from one tapped
    /// backward pass ([`traced_scores`]); `None` under plain AdamW, which has no subspace.
    fn traced<S>(
        &self,
        stepper: &Stepper<S>,
        model: &Llama,
        items: &[&Prepared],
    ) -> Result<Option<(f64, burn::tensor::Gradients, Vec<f64>)>, LlmError>
    where
        S: SafetyGradientSource<Llama>,
    {
        let Stepper::Spf { optim, .. } = stepper else {
            return Ok(None);
        };
        let mut taps = Vec::new();
        let l = loss_with(model, &self.batch(items), Some(&mut taps));
        let value: f64 = l.clone().into_scalar::<f64>();
        let grads = l.backward();
        let traces: Vec<_> = taps.iter().filter_map(|t| t.trace(&grads)).collect();
        let scores = traced_scores(&traces, optim.bases(), optim.config().mode)?;
        Ok(Some((value, grads, scores)))
    }

    /// The screen scores of `items` at `model`, by the configured pass (empty under plain
    /// AdamW): a calibration batch's, which are scored and never trained on.
    fn scores<S>(
        &self,
        stepper: &Stepper<S>,
        model: &Llama,
        items: &[&Prepared],
    ) -> Result<Vec<f64>, LlmError>
    where
        S: SafetyGradientSource<Llama>,
    {
        if self.batch_pass() {
            return Ok(self
                .traced(stepper, model, items)?
                .map(|(_, _, scores)| scores)
                .unwrap_or_default());
        }
        let Stepper::Spf { optim, .. } = stepper else {
            return Ok(Vec::new());
        };
        items
            .iter()
            .map(|item| {
                Ok(SampleScreen::score(
                    &**optim,
                    model,
                    self.gradient(model, item),
                )?)
            })
            .collect()
    }

    /// Greedy answers of `model` to `prompts`, in order, `max_new` tokens at most each.
    pub(super) fn generate(
        &self,
        model: &Llama,
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
    pub(super) fn prompt_cache(&self, prompts: &[Vec<u32>]) -> PromptCache {
        let layers = self.layers;
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
    pub(super) fn continue_cached(
        &self,
        model: &Llama,
        cache: &PromptCache,
        max_new: usize,
    ) -> Vec<Vec<u32>> {
        self.run_chunks(model, cache, max_new, self.frozen)
    }

    /// Runs blocks `from..` of `model` on each chunk's hidden states, then decodes greedily;
    /// the chunks are shared out over `threads` threads.
    fn run_chunks(
        &self,
        model: &Llama,
        cache: &PromptCache,
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

    /// The logits of the model with top blocks `top` at every answer token of `items`
    /// (teacher-forced, in item order), with the answer tokens themselves.
    fn answer_logits(&self, top: &Llama, items: &[Prepared]) -> (Tensor<2>, Tensor<1, Int>) {
        let refs: Vec<&Prepared> = items.iter().collect();
        let batch = self.batch(&refs);
        let h = top.forward_layers(batch.hidden.inner(), 0..top.blocks.len(), 0, None, None);
        let [b, t, d] = h.dims();
        let rows = h.reshape([b * t, d]).select(0, batch.rows.inner());
        (top.logits(rows), batch.targets.inner())
    }

    /// The share of the reference answers' tokens that the model with top blocks `top`
    /// predicts greedily from the same prefix.
    pub(super) fn agreement(&self, top: &Llama, reference: &[Prepared]) -> f64 {
        let (mut hits, mut total) = (0usize, 0usize);
        for chunk in reference.chunks(16) {
            let (logits, targets) = self.answer_logits(top, chunk);
            let predicted = logits.argmax(1).into_data();
            for (p, t) in predicted
                .iter::<i64>()
                .zip(targets.into_data().iter::<i64>())
            {
                hits += usize::from(p == t);
                total += 1;
            }
        }
        hits as f64 / total.max(1) as f64
    }

    /// The mean log-probability per answer token of each pair in `items` under the model with
    /// top blocks `top`, teacher-forced (the margin judge's measure).
    pub(super) fn answer_logprobs(&self, top: &Llama, items: &[Prepared]) -> Vec<f64> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(16) {
            let (logits, targets) = self.answer_logits(top, chunk);
            let logp = log_softmax(logits, 1)
                .gather(1, targets.unsqueeze_dim(1))
                .into_data();
            let mut values = logp.iter::<f64>();
            for item in chunk {
                let n = item.pair.answer.len();
                let sum: f64 = values.by_ref().take(n).sum();
                out.push(sum / n.max(1) as f64);
            }
        }
        out
    }
}

/// Marks every float parameter as trainable.
pub(super) struct Trainable;

impl ModuleMapper for Trainable {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.set_require_grad(true)
    }
}

/// Mean negative log-likelihood of the batch's answer tokens under the trained blocks.
pub(super) fn loss(top: &Llama, batch: &TrainBatch) -> Tensor<1> {
    loss_with(top, batch, None)
}

/// [`loss`], with every matrix of the blocks tapped into `taps` when there are taps.
fn loss_with(top: &Llama, batch: &TrainBatch, taps: Option<&mut Vec<LinearTap>>) -> Tensor<1> {
    let layers = 0..top.blocks.len();
    let h = match taps {
        Some(taps) => top.forward_layers_tapped(batch.hidden.clone(), layers, taps),
        None => top.forward_layers(batch.hidden.clone(), layers, 0, None, None),
    };
    let [b, t, d] = h.dims();
    let rows = h.reshape([b * t, d]).select(0, batch.rows.clone());
    let logp = log_softmax(top.logits(rows), 1);
    logp.gather(1, batch.targets.clone().unsqueeze_dim(1))
        .mean()
        .neg()
}
