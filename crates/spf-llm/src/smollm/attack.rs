//! Stage 2, the attack: from the seed's aligned blocks, fine-tune on arithmetic problems with
//! exactly `round(p · n)` harmful pairs mixed in, with the cell's method, then score the result
//! (stage 3, [`super::score`]). `lab` and `held` are the fine-tuning stage's own: for LoRA, the
//! whole model's ([`Lab::whole`]).

use std::time::Instant;

use spf_core::screen::SampleScreen;
use spf_harness::progress::Progress;
use spf_harness::screening::ScreenSummary;

use super::blocks::{Lab, Prepared, Schedule, TrainWith, Trained, Tuning};
use super::config::SmolMethod;
use super::protocol::{Example, mix, with_refusals};
use super::results::{SmolModel, SmolRow};
use super::salt;
use super::score::Held;
use super::seed::SeedContext;
use crate::LlmError;
use crate::chat::ChatTokenizer;

/// One attacked cell: `method` at harmful share `p` on `seed`, fine-tuned and scored.
#[allow(clippy::too_many_arguments)]
pub(super) fn attack(
    lab: &Lab<'_>,
    ctx: &SeedContext,
    held: &Held,
    tok: &ChatTokenizer,
    (method, p): (SmolMethod, f64),
    seed: u64,
    progress: &mut dyn Progress,
) -> Result<SmolRow, LlmError> {
    let config = lab.config;
    let model = SmolModel::Attacked { method, p };
    let mut set = mix(&ctx.tasks, ctx.harmful_set.len(), p, seed ^ salt::SHUFFLE);
    if method.adds_refusals() {
        set = with_refusals(&set, config.safe_instr_share, ctx.safety_set.len());
    }
    let examples: Vec<Prepared> = set
        .iter()
        .map(|e| match *e {
            Example::Task(problem) => {
                let i = ctx.tasks.iter().position(|t| *t == problem).expect("drawn");
                ctx.task_set[i].clone()
            }
            Example::Harmful(i) => ctx.harmful_set[i].clone(),
            Example::Refusal(i) => ctx.safety_set[i].clone(),
        })
        .collect();
    let sample_screen = config.sample_screen()?;
    // The screen's threshold before any verdict, for the summary of a run with none.
    let initial_threshold = sample_screen.as_ref().map(SampleScreen::threshold);
    let with = if method.projects() {
        TrainWith::Spf {
            safety: ctx.safety_set.iter().collect(),
            config: config.spf(),
            screen: sample_screen.map(Box::new),
            calibration: ctx.calibration_set.iter().collect(),
            own: set
                .iter()
                .map(|e| matches!(e, Example::Refusal(_)))
                .collect(),
        }
    } else {
        TrainWith::Plain
    };
    let name = format!("{model} (seed {seed})");
    let t = Instant::now();
    let Trained {
        top,
        loss,
        conflict,
        screened,
    } = lab.train(
        ctx.attack_start.clone(),
        &examples,
        with,
        Schedule {
            steps: config.attack_steps,
            lr: config.attack_lr,
            order_seed: seed ^ salt::BATCH_ORDER,
            tuning: config.lora.map_or(Tuning::Full, |lora| Tuning::Lora {
                lora,
                seed: seed ^ salt::LORA,
            }),
        },
        &name,
        progress,
    )?;
    let seconds = t.elapsed().as_secs_f64();
    let scores = lab.score(
        &top,
        held,
        Some(&ctx.attack_reference),
        tok,
        progress,
        &name,
    )?;
    let mut row = scores.row(model, Some(seed), Some(loss), conflict, seconds);
    if let (Some(initial), true) = (initial_threshold, method.projects()) {
        let kind = |i: usize| set[i].kind();
        // The last verdict's threshold; with no verdict, the screen's threshold at the start.
        let threshold = screened.last().map_or(initial, |s| s.threshold);
        row.screen = Some(ScreenSummary::of(threshold, &screened, kind));
    }
    Ok(row)
}
