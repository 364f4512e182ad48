//! The main job: align a small transformer, attack it by fine-tuning, and compare plain
//! fine-tuning (SFT) with SPF and the baselines.
//!
//! 1. **Align** a fresh decoder-only transformer on two benign tasks plus harmful prompts
//!    answered with a refusal (the checkpoint is cached under `target/spf-runs/cache/`).
//! 2. **Fine-tune** it on a new task with `n` samples, a share `p` of which are harmful prompts
//!    answered compliantly, with each method: SFT, SPF (`ConflictOnly`, `Orthogonal`, the
//!    `Update` target, `Pcgrad`) and the SafeInstr data baseline.
//! 3. **Evaluate** the harmful score on held-out harmful prompts (seen and unseen harm topics)
//!    and the fine-tune accuracy, over several seeds.
//!
//! Run: `cargo run --release --example finetune` (add `-- --quick` for the CI smoke test,
//! `-- --ablate` for the ablations instead, `--screen τ` or `--screen auto` for SPF's sample
//! screen (no threshold works on this model: docs/results.md, "The sample screen in the lab"),
//! `--features wgpu -- --backend wgpu` for another backend, `--devices N` to fine-tune
//! data-parallel on N replicas as well and compare).
//! Outputs go to `target/spf-runs/<run-id>/`: `results.json`, `table.md`, and one SVG of the
//! curves per harmful share.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use burn::tensor::Device;
use clap::Parser;
use spf_core::screen::ScreenThreshold;
use spf_lab::experiment::{self, ExperimentConfig};
use spf_lab::finetune::Method;
use spf_lab::{plot, report};

#[path = "common/backend.rs"]
mod backend;
#[path = "common/progress.rs"]
mod progress;
#[path = "common/screen.rs"]
mod screen;

use backend::Backend;

/// Align a small transformer, attack it with fine-tuning, and compare SFT against SPF.
#[derive(Debug, Parser)]
struct Args {
    /// Which burn backend runs the experiment.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// The smaller CI configuration: one seed, p ∈ {0, 0.1}, shorter stages.
    #[arg(long)]
    quick: bool,
    /// Run the ablations instead (one knob at a time around the default defence), on the
    /// first seed at p ∈ {0, 0.1}.
    #[arg(long)]
    ablate: bool,
    /// Seeds to run instead of the configuration's, comma-separated.
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// Methods to run instead of all, comma-separated: sft, conflict-only, orthogonal, update,
    /// pcgrad, safe-instr.
    #[arg(long, value_delimiter = ',', value_parser = method)]
    methods: Option<Vec<Method>>,
    /// SPF's sample screen: every SPF method drops the fine-tuning samples whose own gradient
    /// would lose more than a share of its energy to the projection: a fixed share (0 to 1), or
    /// `auto` (`auto:K`) for the threshold the scores set themselves.
    #[arg(long, value_parser = screen::parse)]
    screen: Option<ScreenThreshold>,
    /// Where runs are written.
    #[arg(long, default_value = "target/spf-runs")]
    out: PathBuf,
    /// Retrain the aligned models instead of loading cached checkpoints.
    #[arg(long)]
    no_cache: bool,
    /// Fine-tune data-parallel on this many replicas (burn-train's multi-device step: each
    /// replica computes the gradient of its shard of every batch, and one optimizer steps on
    /// their mean), after the same runs on one, and print both tables and the speed-up. The
    /// replicas share the one device (the CPU's cores).
    #[arg(long, default_value_t = 1)]
    devices: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (device, backend) = args.backend.device()?;
    run(&args, &device, backend)
}

fn run(args: &Args, device: &Device, backend: &str) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let mut config = if args.quick {
        ExperimentConfig::quick()
    } else {
        ExperimentConfig::new()
    };
    if let Some(seeds) = &args.seeds {
        config.seeds = seeds.clone();
    }
    if let Some(methods) = &args.methods {
        config.methods = methods.clone();
    }
    config.defence.screen = args.screen;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let name = match (args.quick, args.ablate, args.devices > 1) {
        (_, true, _) => "ablate",
        (true, false, false) => "quick",
        (false, false, false) => "default",
        (true, false, true) => "quick-replicas",
        (false, false, true) => "replicas",
    };
    let backend_name = format!("{:?}", args.backend).to_lowercase();
    let dir = args.out.join(format!("{name}-{backend_name}-{stamp}"));
    std::fs::create_dir_all(&dir)?;
    let cache = args.out.join("cache");
    let cache = (!args.no_cache).then_some(cache.as_path());

    println!(
        "spf finetune: {name} configuration on {backend}; writing {}",
        dir.display()
    );
    let mut progress = progress::reporter();
    if args.ablate {
        let ablations = spf_lab::ablation::ablate(&config, device, cache, progress.as_mut())?;
        let text = report::ablations(&ablations);
        println!("\nablations (seed {}):\n{text}", config.seeds[0]);
        write(
            &dir.join("ablations.json"),
            &serde_json::to_string_pretty(&ablations)?,
        )?;
        write(&dir.join("ablations.md"), &text)?;
    } else if args.devices > 1 {
        let devices = spf_lab::replicas::replica_devices(args.devices, device);
        println!("replicas on {devices:?}");
        let mut tables = String::new();
        let mut all = Vec::new();
        for replicas in [1, args.devices] {
            config.replicas = replicas;
            let results = experiment::run(&config, backend, device, cache, progress.as_mut())?;
            let _ = writeln!(
                tables,
                "\n{replicas} replica(s):\n\n{}",
                report::table(&results)
            );
            write(
                &dir.join(format!("results-{replicas}.json")),
                &serde_json::to_string_pretty(&results)?,
            )?;
            all.push(results);
        }
        let speedup = report::speedup(&all[0], &all[1]);
        println!("{tables}\n{speedup}");
        write(&dir.join("table.md"), &format!("{tables}\n{speedup}"))?;
    } else {
        let results = experiment::run(&config, backend, device, cache, progress.as_mut())?;
        let table = report::table(&results);
        let insights = report::insights(&results);
        let leaks = report::leaks(&results);
        let screen = report::screen(&results);
        println!("\n{table}\n{screen}\n{insights}\n{leaks}");
        write(
            &dir.join("results.json"),
            &serde_json::to_string_pretty(&results)?,
        )?;
        write(
            &dir.join("table.md"),
            &format!("{table}\n{screen}\n{insights}\n{leaks}"),
        )?;
        for &p in &config.shares {
            plot::curves(&results, p, &dir.join(format!("curves-p{p:.2}.svg")))?;
        }
    }
    println!(
        "wrote {} ({:.0} s in all)",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A method by its command-line name.
fn method(name: &str) -> Result<Method, String> {
    Ok(match name {
        "sft" => Method::Sft,
        "conflict-only" => Method::SpfConflictOnly,
        "orthogonal" => Method::SpfOrthogonal,
        "update" => Method::SpfUpdate,
        "pcgrad" => Method::SpfPcgrad,
        "safe-instr" => Method::SafeInstr,
        _ => return Err(format!("unknown method {name:?}")),
    })
}

fn write(path: &Path, text: &str) -> Result<(), std::io::Error> {
    std::fs::write(path, text)
}
