//! The experiment: align SmolLM2 to refuse, attack the alignment by fine-tuning on a benign task
//! with a share `p` of harmful pairs mixed in (the field's protocol, [`super::protocol`]), with
//! and without defences, and score every model on held-out prompts.
//!
//! 1. **Align** (once per seed, cached). SFT on AdvBench prompts paired with refusals, mixed
//!    with benign prompts paired with the base model's own greedy answers (self-distillation
//!    keeps benign behaviour).
//! 2. **Attack.** From the aligned model, fine-tune on arithmetic problems with exactly
//!    `round(p · n)` of pyrit's harmful Q→A pairs mixed in, for every share `p` and method
//!    ([`SmolMethod`](super::SmolMethod)): the same examples, batches, steps and learning rate for all.
//! 3. **Score** ([`SmolRow`](super::SmolRow)): the harmful score (HS, the share of held-out harmful prompts not
//!    refused, by the keyword judge [`is_refusal`](super::data::is_refusal) over greedy tokens) on HarmBench and on
//!    held-out AdvBench; the fine-tune accuracy (FA, exact answers to held-out problems); the
//!    refusal margin (the second judge: mean per-token log-likelihood of a refusal opening minus
//!    that of a compliant one, teacher-forced, no generation); benign agreement with the aligned
//!    model's greedy answers on held-out benign prompts.
//!
//! Each cell (model, `p`, method, seed) is cached under a hash of the data and of everything in
//! the configuration that determines it, and each seed's aligned blocks under a hash of the data
//! and the alignment's settings, so an interrupted grid resumes where it stopped (`cache.rs`).
//!
//! Only the last `train_layers` blocks are trained; the frozen ones run once per sequence
//! (`blocks.rs`). With [`SmolConfig::lora`] the attack instead trains LoRA adapters on every
//! matrix of every block (`lora.rs`), over the whole model. One stage a file: the settings in
//! [`super::config`], the prompts in `splits.rs`, stage 1 in `align.rs`, what a seed's cells
//! share in `seed.rs`, stage 2 in `attack.rs`, stage 3 in `score.rs`, the rows in
//! [`super::results`].

use burn::tensor::Device;
use std::time::Instant;

use spf_harness::progress::Progress;

use super::attack::attack;
use super::blocks::Lab;
use super::cache::{Cache, Cells, Provenance};
use super::config::SmolConfig;
use super::data::Assets;
use super::pairs::Encoder;
use super::results::{SmolModel, SmolResults, summarize};
use super::score::Held;
use super::seed::SeedContext;
use super::splits::Splits;
use crate::LlmError;
use crate::chat::ChatTokenizer;
use crate::gguf::Gguf;
use crate::llama::Llama;

/// Runs the experiment on the fetched `assets`.
///
/// # Errors
///
/// [`LlmError`] when the configuration is invalid, the model or data cannot be read, a
/// training stage fails or diverges, or the cache cannot be written.
pub fn run(
    config: &SmolConfig,
    assets: &Assets,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<SmolResults, LlmError> {
    config.validate()?;
    let started = Instant::now();
    let Loaded { tok, lab, base_top } = load(config, assets, device)?;
    let splits = Splits::new(config, assets)?;
    let encoder = Encoder { tok: &tok };
    let held = Held::new(&lab, encoder, &splits, config, progress)?;
    // LoRA fine-tunes every block: its cells train and score the whole model, with only the
    // embedding cached (the base and aligned models are scored as without LoRA).
    let whole = config.lora.is_some().then(|| lab.whole());
    let whole_held = match &whole {
        Some(whole) => Some(Held::new(whole, encoder, &splits, config, progress)?),
        None => None,
    };
    let (attack_lab, attack_held) = match (&whole, &whole_held) {
        (Some(lab), Some(held)) => (lab, held),
        _ => (&lab, &held),
    };
    // Cells and aligned checkpoints are keyed by the data and the engine as well as the
    // configuration.
    let cache = match config.cache_dir.as_deref() {
        Some(dir) => Some(Cache::new(
            dir,
            Provenance::new(assets.fingerprint()?, device),
        )?),
        None => None,
    };
    let mut cells = Cells::new(config, cache.as_ref());

    // The base model, once.
    let mut rows = vec![cells.row((SmolModel::Base, None), progress, |progress| {
        let scores = lab.score(&base_top, &held, None, &tok, progress, "base")?;
        Ok(scores.row(SmolModel::Base, None, None, None, 0.0))
    })?];
    for &seed in &config.seeds {
        // Everything a seed's cells share, made for the first cell that is not cached.
        let mut context: Option<SeedContext> = None;
        let make = |progress: &mut dyn Progress| {
            let cache = cache.as_ref();
            let whole = whole.as_ref();
            SeedContext::new(
                &lab, whole, cache, encoder, &splits, &base_top, seed, progress,
            )
        };
        let aligned = (SmolModel::Aligned, Some(seed));
        rows.push(cells.row(aligned, progress, |progress| {
            let ctx = made(&mut context, make, progress)?;
            let (top, reference) = (&ctx.aligned_top, Some(&ctx.reference[..]));
            let scores = lab.score(top, &held, reference, &tok, progress, "aligned")?;
            Ok(scores.row(SmolModel::Aligned, Some(seed), None, None, 0.0))
        })?);
        for &p in &config.harmful_shares {
            for &method in &config.methods {
                let attacked = (SmolModel::Attacked { method, p }, Some(seed));
                rows.push(cells.row(attacked, progress, |progress| {
                    let ctx = made(&mut context, make, progress)?;
                    attack(
                        attack_lab,
                        ctx,
                        attack_held,
                        &tok,
                        (method, p),
                        seed,
                        progress,
                    )
                })?);
            }
        }
    }

    Ok(SmolResults {
        summary: summarize(&rows),
        rows,
        split: config.split,
        harmbench_prompts: held.harmbench,
        advbench_prompts: held.harmful_texts.len() - held.harmbench,
        advbench_unique: splits.advbench_unique,
        harmful_pairs_dropped: splits.harmful_pairs_dropped,
        eval_overlap_dropped: splits.eval_overlap_dropped,
        arithmetic_prompts: held.problems.len(),
        benign_prompts: config.benign_eval,
        train_layers: config.train_layers,
        layers: lab.layers,
        cached_cells: cells.cached,
        config: config.clone(),
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}

/// The value in `slot`, made by `make` if there is none yet.
fn made<'s, T>(
    slot: &'s mut Option<T>,
    make: impl FnOnce(&mut dyn Progress) -> Result<T, LlmError>,
    progress: &mut dyn Progress,
) -> Result<&'s T, LlmError> {
    if slot.is_none() {
        *slot = Some(make(progress)?);
    }
    Ok(slot.as_ref().expect("made above"))
}

/// The model read from its file: its tokenizer, its frozen bottom (in the [`Lab`]), and its top
/// blocks as released.
struct Loaded<'c> {
    tok: ChatTokenizer,
    lab: Lab<'c>,
    base_top: Llama,
}

/// The model and its tokenizer from the GGUF file, split into the frozen bottom (in the
/// returned [`Lab`]) and the untrained top blocks.
///
/// # Errors
///
/// [`LlmError::Gguf`] or [`LlmError::Chat`] for a file that cannot be read,
/// [`LlmError::Config`] when `train_layers` exceeds the model's blocks.
fn load<'c>(
    config: &'c SmolConfig,
    assets: &Assets,
    device: &Device,
) -> Result<Loaded<'c>, LlmError> {
    let gguf = Gguf::open(&assets.model)?;
    let tok = ChatTokenizer::from_gguf(&gguf)?;
    let model = Llama::from_gguf(&gguf, device)?;
    drop(gguf);
    let layers = model.blocks.len();
    if config.train_layers > layers {
        return Err(LlmError::Config(format!(
            "train_layers must be 1 to {layers}, not {}",
            config.train_layers
        )));
    }
    let frozen = layers - config.train_layers;
    let (prefix, base_top) = model.split(frozen);
    let lab = Lab {
        prefix,
        frozen,
        layers,
        eos: tok.eos,
        device: device.clone(),
        config,
    };
    Ok(Loaded { tok, lab, base_top })
}
