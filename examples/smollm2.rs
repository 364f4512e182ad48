//! The SPF experiment on a real model, SmolLM2-135M-Instruct: align it to refuse harmful
//! requests, attack the alignment by fine-tuning (harmful Q→A pairs, and a benign arithmetic
//! task) with plain AdamW and with SPF, and report refusal rates and benign agreement.
//!
//! ```text
//! scripts/fetch-assets.sh                                   # once: model and data into assets/
//! cargo run --release --example smollm2                     # the CPU configuration (~15 min)
//! cargo run --release --features cuda --example smollm2 -- --backend cuda --train-layers 30
//! ```
//!
//! On the CPU only the last `--train-layers` blocks train (4 by default); the frozen blocks run
//! once per sequence. docs/results.md has the table this prints and the command behind it.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use spf_lab::progress::Progress;
use spf_llm::smollm::{Assets, SmolConfig, SmolResults};

#[path = "common/backend.rs"]
mod backend;

use backend::{Backend, run_on};

#[derive(Debug, Parser)]
#[command(about = "Align SmolLM2-135M, attack it by fine-tuning, compare SFT with SPF")]
struct Args {
    /// Which burn backend runs the experiment.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// Blocks trained, counted from the top (30 trains the whole model).
    #[arg(long, default_value_t = 4)]
    train_layers: usize,
    /// Alignment steps.
    #[arg(long, default_value_t = 150)]
    align_steps: usize,
    /// Fine-tuning (attack) steps per method.
    #[arg(long, default_value_t = 60)]
    attack_steps: usize,
    /// Threads that generate answers in parallel.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seed of every shuffle.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the results (JSON) and the aligned checkpoint go.
    #[arg(long, default_value = "target/spf-runs/smollm2")]
    out: PathBuf,
}

/// Prints each stage's start, every tenth step and its end, with the time since the start.
struct Log {
    started: Instant,
    stage: String,
    done: u64,
    total: u64,
}

impl Progress for Log {
    fn start(&mut self, name: &str, total: u64) {
        (self.stage, self.done, self.total) = (name.to_owned(), 0, total);
        eprintln!(
            "[{:>7.1}s] {name} ...",
            self.started.elapsed().as_secs_f64()
        );
    }

    fn advance(&mut self, n: u64) {
        self.done += n;
        if self.total > 1 && self.done.is_multiple_of(10) {
            let t = self.started.elapsed().as_secs_f64();
            eprintln!("[{t:>7.1}s]   {} {}/{}", self.stage, self.done, self.total);
        }
    }

    fn finish(&mut self, summary: &str) {
        let t = self.started.elapsed().as_secs_f64();
        eprintln!("[{t:>7.1}s] {}: {summary}", self.stage);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    run_on!(args.backend, run(&args))
}

fn run<B: AutodiffBackend>(args: &Args, backend: &str) -> Result<(), Box<dyn std::error::Error>> {
    let assets = Assets::locate()?;
    let config = SmolConfig::new()
        .with_train_layers(args.train_layers)
        .with_align_steps(args.align_steps)
        .with_attack_steps(args.attack_steps)
        .with_threads(args.threads)
        .with_seed(args.seed)
        .with_checkpoint_dir(Some(args.out.clone()));
    eprintln!(
        "spf smollm2 on {backend}: training the last {} blocks; {} align + {} attack steps",
        config.train_layers, config.align_steps, config.attack_steps
    );
    let mut log = Log {
        started: Instant::now(),
        stage: String::new(),
        done: 0,
        total: 0,
    };
    let device = B::Device::default();
    let results = spf_llm::smollm::experiment::run::<B>(&config, &assets, &device, &mut log)?;
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)?;
    print!("{}", table(&results));
    println!(
        "\nwall time {:.1} min on {backend} ({} of {} blocks trained); results in {}",
        results.wall_seconds / 60.0,
        results.train_layers,
        results.layers,
        json.display()
    );
    Ok(())
}

fn table(r: &SmolResults) -> String {
    let mut out = format!(
        "| model | HarmBench refusal ({}) | AdvBench held-out refusal ({}) | benign agreement ({} prompts) | final loss | conflict share | train s |\n|---|---|---|---|---|---|---|\n",
        r.harmbench_prompts, r.advbench_prompts, r.benign_prompts
    );
    let opt = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.3}"));
    for row in &r.rows {
        out += &format!(
            "| {} | {:.3} | {:.3} | {} | {} | {} | {:.0} |\n",
            row.model,
            row.harmbench_refusal,
            row.advbench_refusal,
            opt(row.benign_agreement),
            opt(row.final_loss),
            opt(row.conflict_share),
            row.train_seconds
        );
    }
    out += "\nFirst HarmBench prompt, first tokens of each answer:\n";
    for row in &r.rows {
        out += &format!("- {}: {:?}\n", row.model, row.sample);
    }
    out
}
