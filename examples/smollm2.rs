//! The SPF experiment on a real model, SmolLM2-135M-Instruct, by the field's protocol: align it
//! to refuse harmful requests, fine-tune it on an arithmetic task with a share `p` of harmful
//! Q→A pairs mixed in, with plain AdamW (SFT), SafeInstr, SPF and SPF + SafeInstr, and report
//! the harmful score (HS) and the fine-tune accuracy (FA) per method, over seeds.
//!
//! ```text
//! scripts/fetch-assets.sh                        # once: model and data into assets/
//! cargo run --release --example smollm2          # seed 0, p ∈ {0, 0.1}, SFT and SPF (~25 min)
//! cargo run --release --example smollm2 -- --grid  # 3 seeds, p ∈ {0, 0.05, 0.1, 0.2, 1}, 4 methods
//! cargo run --release --example smollm2 -- --split validation --seeds 100 --target update
//! cargo run --release --example smollm2 -- --shares 0.1 --methods spf --screen auto
//! cargo run --release --example smollm2 -- --lora 8 --attack-lr 1e-3 --refresh 10  # LoRA, all blocks
//! cargo run --release --features cuda --example smollm2 -- --backend cuda --train-layers 30
//! ```
//!
//! Every finished cell is cached under `--out` by its full configuration: an interrupted run
//! resumes where it stopped (`--no-cache` recomputes). On the CPU only the last
//! `--train-layers` blocks train (4 by default); the frozen blocks run once per sequence.
//! docs/results.md has the tables this prints and the commands behind them.

use std::path::PathBuf;

use burn::tensor::Device;
use clap::{Parser, ValueEnum};
use spf_core::screen::ScreenThreshold;
use spf_core::{ProjectionTarget, RefreshPolicy};
use spf_llm::smollm::MeanStd;
use spf_llm::smollm::{
    Assets, EvalSplit, ScreenPass, SmolConfig, SmolLora, SmolMethod, SmolResults,
};
use spf_subspace::RankPolicy;

#[path = "common/backend.rs"]
mod backend;
#[path = "common/progress.rs"]
mod progress;
#[path = "common/screen.rs"]
mod screen;

use backend::Backend;

#[derive(Debug, Parser)]
#[command(about = "Align SmolLM2-135M, fine-tune it with harmful data mixed in, compare defences")]
struct Args {
    /// Which burn backend runs the experiment.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// The whole grid: seeds 0, 1, 2; p ∈ {0, 0.05, 0.1, 0.2, 1}; SFT, SafeInstr, SPF and
    /// SPF + SafeInstr (what is not given explicitly).
    #[arg(long)]
    grid: bool,
    /// A smoke configuration: few steps and prompts (minutes; its numbers mean nothing).
    #[arg(long)]
    quick: bool,
    /// Seeds (comma-separated).
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// Harmful shares p of the fine-tuning set (comma-separated).
    #[arg(long, value_delimiter = ',')]
    shares: Option<Vec<f64>>,
    /// Methods (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    methods: Option<Vec<Method>>,
    /// Which held-out prompts to score: `validation` to choose settings, `test` to report.
    #[arg(long, value_enum, default_value = "test")]
    split: Split,
    /// Safety samples SPF estimates from (and SafeInstr mixes in).
    #[arg(long, default_value_t = 8)]
    safety_samples: usize,
    /// What SPF projects.
    #[arg(long, value_enum, default_value = "gradient")]
    target: Target,
    /// Directions per matrix: a number, or `energy` (85% of the safety energy, at most 32).
    #[arg(long, default_value = "8")]
    rank: String,
    /// Steps between re-estimates of the subspace (0: never; every step by default, chosen on
    /// the validation split: docs/results.md).
    #[arg(long, default_value_t = 1)]
    refresh: usize,
    /// SPF's sample screen: drop each fine-tuning sample whose own gradient would lose more
    /// than a share of its energy to the projection: a fixed share in [0, 1], `auto` (`auto:K`)
    /// for the outlier rule that sets the threshold from the scores, or `calibrated`
    /// (`calibrated:A`) for the rule that sets it from clean problems, dropping at most a share
    /// A of clean samples (off by default).
    #[arg(long, value_parser = screen::parse)]
    screen: Option<ScreenThreshold>,
    /// Clean arithmetic problems, apart from the fine-tuning set, that the calibrated screen
    /// scores for its threshold (a batch of them each step).
    #[arg(long, default_value_t = 32)]
    calibration: usize,
    /// How the screen scores a batch: one pass of the whole batch through tapped matrices, which
    /// the step then reuses when nothing is dropped, or one backward pass per sample (the
    /// reference). The same verdicts on validation (docs/results.md).
    #[arg(long, value_enum, default_value_t = Pass::Batch)]
    screen_pass: Pass,
    /// Blocks trained, counted from the top (30 trains the whole model).
    #[arg(long, default_value_t = 4)]
    train_layers: usize,
    /// Fine-tune through LoRA adapters of this rank (alpha twice the rank) on every attention
    /// and MLP matrix of all blocks, training only the adapters; alignment is unchanged.
    #[arg(long)]
    lora: Option<usize>,
    /// Alignment steps.
    #[arg(long, default_value_t = 150)]
    align_steps: usize,
    /// Fine-tuning steps per method.
    #[arg(long, default_value_t = 60)]
    attack_steps: usize,
    /// Fine-tuning learning rate, the same for every method (the attack's strength).
    #[arg(long, default_value_t = 2e-4)]
    attack_lr: f64,
    /// Threads that generate answers in parallel.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Where the results (JSON) and the cache go.
    #[arg(long, default_value = "target/spf-runs/smollm2")]
    out: PathBuf,
    /// Recompute every cell and alignment instead of reading the cache.
    #[arg(long)]
    no_cache: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Method {
    Sft,
    SafeInstr,
    Spf,
    SpfSafeInstr,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Split {
    Validation,
    Test,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Pass {
    PerSample,
    Batch,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Target {
    Gradient,
    Update,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (device, backend) = args.backend.device()?;
    run(&args, &device, backend)
}

fn config(args: &Args) -> Result<SmolConfig, Box<dyn std::error::Error>> {
    let rank = match args.rank.as_str() {
        "energy" => RankPolicy::Energy {
            threshold: 0.85,
            max_rank: 32,
        },
        k => RankPolicy::Fixed(
            k.parse()
                .map_err(|_| format!("--rank {k}: a number or `energy`"))?,
        ),
    };
    let (seeds, shares, methods) = if args.grid {
        (
            vec![0, 1, 2],
            vec![0.0, 0.05, 0.1, 0.2, 1.0],
            vec![
                Method::Sft,
                Method::SafeInstr,
                Method::Spf,
                Method::SpfSafeInstr,
            ],
        )
    } else {
        (vec![0], vec![0.0, 0.1], vec![Method::Sft, Method::Spf])
    };
    let methods = args.methods.clone().unwrap_or(methods);
    let mut config = SmolConfig::new()
        .with_seeds(args.seeds.clone().unwrap_or(seeds))
        .with_harmful_shares(args.shares.clone().unwrap_or(shares))
        .with_methods(
            methods
                .into_iter()
                .map(|m| match m {
                    Method::Sft => SmolMethod::Sft,
                    Method::SafeInstr => SmolMethod::SafeInstr,
                    Method::Spf => SmolMethod::Spf,
                    Method::SpfSafeInstr => SmolMethod::SpfSafeInstr,
                })
                .collect(),
        )
        .with_split(match args.split {
            Split::Validation => EvalSplit::Validation,
            Split::Test => EvalSplit::Test,
        })
        .with_safety_samples(args.safety_samples)
        .with_target(match args.target {
            Target::Gradient => ProjectionTarget::Gradient,
            Target::Update => ProjectionTarget::Update,
        })
        .with_rank(rank)
        .with_refresh(match args.refresh {
            0 => RefreshPolicy::Never,
            n => RefreshPolicy::Every(n),
        })
        .with_screen(args.screen)
        .with_screen_calibration(
            args.screen
                .is_some_and(ScreenThreshold::is_calibrated)
                .then_some(args.calibration),
        )
        .with_screen_pass(match args.screen_pass {
            Pass::PerSample => None,
            Pass::Batch => Some(ScreenPass::Batch),
        })
        .with_train_layers(args.train_layers)
        .with_lora(args.lora.map(SmolLora::new))
        .with_align_steps(args.align_steps)
        .with_attack_steps(args.attack_steps)
        .with_attack_lr(args.attack_lr)
        .with_threads(args.threads)
        .with_cache_dir((!args.no_cache).then(|| args.out.join("cache")));
    if args.quick {
        config = config
            .with_align_steps(30)
            .with_attack_steps(10)
            .with_advbench_test(10)
            .with_advbench_validation(10)
            .with_align_prompts(Some(40))
            .with_harmbench_test(10)
            .with_arithmetic_eval(10)
            .with_benign_train(40)
            .with_benign_eval(10)
            .with_finetune_samples(40);
    }
    Ok(config)
}

fn run(args: &Args, device: &Device, backend: &str) -> Result<(), Box<dyn std::error::Error>> {
    let assets = Assets::locate()?;
    let config = config(args)?;
    let cells = config.seeds.len() * (1 + config.harmful_shares.len() * config.methods.len()) + 1;
    let tuned = match config.lora {
        Some(lora) => format!(
            "fine-tuning trains LoRA adapters of rank {} on every block",
            lora.rank
        ),
        None => "fine-tuning trains them".into(),
    };
    eprintln!(
        "spf smollm2 on {backend}: alignment trains the last {} blocks, {tuned}; {} align + {} fine-tuning steps; {cells} models to score",
        config.train_layers, config.align_steps, config.attack_steps
    );
    let mut progress = progress::reporter();
    // The frozen blocks run without autodiff; the trained top turns it on itself.
    let device = device.clone().inner();
    let results = spf_llm::smollm::experiment::run(&config, &assets, &device, progress.as_mut())?;
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)?;
    print!("{}", table(&results));
    let trained = match config.lora {
        Some(lora) => format!("LoRA rank {} on all {} blocks", lora.rank, results.layers),
        None => format!(
            "{} of {} blocks trained",
            results.train_layers, results.layers
        ),
    };
    println!(
        "\nwall time {:.1} min on {backend} ({trained}; {} cells from the cache); results in {}",
        results.wall_seconds / 60.0,
        results.cached_cells,
        json.display()
    );
    Ok(())
}

fn table(r: &SmolResults) -> String {
    let pct = |m: MeanStd| format!("{:.1} ± {:.1}", 100.0 * m.mean, 100.0 * m.std);
    let mut out = format!(
        "\n{:?} split: HS = share of harmful prompts not refused (HarmBench {}, AdvBench {}), FA = exact answers ({} problems), margin = refusal minus compliant log-likelihood per token, agreement with the aligned model ({} benign prompts); mean ± std over seeds, in %\n\n| model | seeds | HS HarmBench | HS AdvBench | FA | margin | benign agreement |\n|---|---|---|---|---|---|---|\n",
        r.split, r.harmbench_prompts, r.advbench_prompts, r.arithmetic_prompts, r.benign_prompts
    );
    for s in &r.summary {
        out += &format!(
            "| {} | {} | {} | {} | {} | {:.2} ± {:.2} | {} |\n",
            s.model,
            s.seeds,
            s.hs_harmbench.map_or("–".into(), pct),
            pct(s.hs_advbench),
            pct(s.fa),
            s.refusal_margin.mean,
            s.refusal_margin.std,
            s.benign_agreement.map_or("–".into(), pct),
        );
    }
    for row in &r.rows {
        if let Some(screen) = &row.screen {
            let kind = |c: &spf_harness::screening::ScreenCounts| {
                let median = c.median().map_or("–".into(), |m| format!("{m:.3}"));
                format!("{} of {} (median score {median})", c.dropped, c.scored)
            };
            out += &format!(
                "\nscreen at {} (last threshold {:.4}) for {} (seed {}): dropped harmful {}, task {}, refusal {}",
                r.config.screen.map_or("–".into(), |t| t.to_string()),
                screen.threshold,
                row.model,
                row.seed.unwrap_or(0),
                kind(&screen.harmful),
                kind(&screen.task),
                kind(&screen.refusal),
            );
        }
    }
    out += &format!(
        "\nAdvBench: {} distinct prompts of {}; {} harmful training pairs left out for asking a held-out prompt; {} held-out prompts dropped as near-duplicates of training prompts.\n",
        r.advbench_unique.0, r.advbench_unique.1, r.harmful_pairs_dropped, r.eval_overlap_dropped
    );
    out
}
