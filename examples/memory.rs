//! A training run whose peak memory `bench/memory.sh` measures with and without SPF.
//!
//! The network is one Llama-shaped block of width 512 and MLP width 1376, without attention's
//! softmax: `h = x W_q W_k W_v W_o`, then the SwiGLU MLP `(silu(h W_gate) ⊙ h W_up) W_down`,
//! trained by AdamW to regress random targets. With `--spf` the optimizer is wrapped
//! (`ConflictOnly`, rank `--rank`), its bases estimated from a safety batch before the first
//! step and, with `--refresh n`, re-estimated every `n` steps.
//!
//! Run: `cargo run --release --example memory -- --spf --refresh 10`. Besides what GNU time sees
//! from outside (`bench/memory.sh`), it counts heap bytes itself, through a counting global
//! allocator: the peak of live bytes over the run, and the bytes still live after the last step
//! while the model and the optimizer are held. It prints the bytes the bases hold,
//! `Σ (d_in + d_out + 1)·k·4` over the protected matrices.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::module::{Module, Param};
use burn::nn::loss::{MseLoss, Reduction};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Distribution, Tensor};
use clap::Parser;
use spf::{RankPolicy, RefreshPolicy, SafetySubspace, SpfConfig, StatsPolicy, SubspaceConfig};

/// The system allocator, counting live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The peak of live bytes since it was last reset: what one optimizer step adds on top of what
/// was live when it began is its transient.
static WATERMARK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
            WATERMARK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above; `ptr` came from `alloc` with this `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Prints the heap counters while `model` and the optimizer are still alive.
fn report(label: &str) {
    println!(
        "{label}: heap peak {:.2} MiB, live after the last step {:.2} MiB",
        mib(PEAK.load(Ordering::Relaxed)),
        mib(LIVE.load(Ordering::Relaxed))
    );
}

#[derive(Parser)]
struct Args {
    /// Wrap AdamW with SPF.
    #[arg(long)]
    spf: bool,
    /// Re-estimate the bases every this many steps (0: never).
    #[arg(long, default_value_t = 0)]
    refresh: usize,
    /// Read no statistics (`StatsPolicy::Off`): the projection's transient without `‖G‖²`.
    #[arg(long)]
    no_stats: bool,
    /// Rank of each basis.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Training steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Rows per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
}

/// One Llama-shaped block without attention's softmax.
#[derive(Module, Debug)]
struct Block {
    attn: Vec<Param<Tensor<2>>>,
    gate: Param<Tensor<2>>,
    up: Param<Tensor<2>>,
    down: Param<Tensor<2>>,
}

impl Block {
    fn new(d: usize, f: usize, device: &Device) -> Self {
        let weight = |rows, cols| {
            let std = (1.0 / rows as f64).sqrt();
            Param::from_tensor(Tensor::random(
                [rows, cols],
                Distribution::Normal(0.0, std),
                device,
            ))
        };
        Self {
            attn: (0..4).map(|_| weight(d, d)).collect(),
            gate: weight(d, f),
            up: weight(d, f),
            down: weight(f, d),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = self.attn.iter().fold(x, |h, w| h.matmul(w.val()));
        let gated = silu(h.clone().matmul(self.gate.val())) * h.matmul(self.up.val());
        gated.matmul(self.down.val())
    }
}

fn loss(model: &Block, (x, y): &(Tensor<2>, Tensor<2>)) -> Tensor<1> {
    MseLoss::new().forward(model.forward(x.clone()), y.clone(), Reduction::Mean)
}

fn batch(rows: usize, d: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let normal = Distribution::Normal(0.0, 1.0);
    (
        Tensor::random([rows, d], normal, device),
        Tensor::random([rows, d], normal, device),
    )
}

/// Trains for `args.steps` steps; prints the transient heap of the optimizer steps (the peak of
/// live bytes inside `step` above those live when it began): the median step's, which a refresh
/// every few steps does not move, and the largest.
fn train(
    mut model: Block,
    mut step: impl FnMut(Block, GradientsParams) -> Block,
    args: &Args,
    device: &Device,
) -> Block {
    let mut transients = Vec::new();
    for _ in 0..args.steps {
        let grads = GradientsParams::from_grads(
            loss(&model, &batch(args.batch, 512, device)).backward(),
            &model,
        );
        let before = LIVE.load(Ordering::Relaxed);
        WATERMARK.store(before, Ordering::Relaxed);
        model = step(model, grads);
        transients.push(WATERMARK.load(Ordering::Relaxed) - before);
    }
    transients.sort_unstable();
    println!(
        "step transient: median {:.2} MiB, largest {:.2} MiB",
        mib(transients[transients.len() / 2]),
        mib(transients.last().copied().unwrap_or(0))
    );
    model
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let device = Device::default().autodiff();
    device.seed(0);
    let model = Block::new(512, 1376, &device);
    let adamw = AdamWConfig::new().init();
    if !args.spf {
        let mut optim = adamw;
        let model = train(model, |m, g| optim.step(1e-4, m, g), &args, &device);
        report(&format!("plain AdamW, {} steps", args.steps));
        drop((model, optim));
        return Ok(());
    }
    let safety = batch(8, 512, &device);
    let estimator = SubspaceConfig::new().with_rank(RankPolicy::Fixed(args.rank));
    let subspace = {
        let grads = GradientsParams::from_grads(loss(&model, &safety).backward(), &model);
        SafetySubspace::estimate(&model, &grads, &estimator)?
    };
    let refresh = match args.refresh {
        0 => RefreshPolicy::Never,
        n => RefreshPolicy::Every(n),
    };
    let stats = if args.no_stats {
        StatsPolicy::Off
    } else {
        StatsPolicy::EveryStep
    };
    let mut optim = SpfConfig::new()
        .with_refresh(refresh)
        .with_stats(stats)
        .with_estimator(estimator)
        .init(adamw, &model, subspace)?
        .with_safety_source(move |m: &Block| loss(m, &safety));
    let basis_bytes: usize = optim
        .bases()
        .values()
        .map(|b| (b.d_in() + b.d_out() + 1) * b.rank() * 4)
        .sum();
    let model = train(model, |m, g| optim.step(1e-4, m, g), &args, &device);
    report(&format!(
        "SPF(AdamW), {} steps, refresh {refresh:?}",
        args.steps
    ));
    println!(
        "{} bases hold {basis_bytes} bytes ({:.1} KiB)",
        optim.bases().len(),
        basis_bytes as f64 / 1024.0
    );
    drop((model, optim));
    Ok(())
}
