//! What the overhead benchmarks share: a criterion timing loop that keeps its own samples, so each
//! benchmark can print its figures as ratios against a baseline timed in the same run, and the
//! parameter sets they time.

// Each bench target compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use faer::Mat;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution as _, StandardNormal};
use spf::{LowRankBasis, Targets, VectorPolicy};

/// The device the step and projection benches run on (without autodiff): the GPU of feature
/// `cuda` (first) or `wgpu`, for bench/gpu.sh; otherwise the CPU backend named by
/// `SPF_BENCH_CPU` (`flex`, the default, or `ndarray` when built with `--features ndarray`), so
/// that one build times both.
pub fn device() -> Device {
    if cfg!(feature = "cuda") || cfg!(feature = "wgpu") {
        return Device::default();
    }
    match std::env::var("SPF_BENCH_CPU").as_deref() {
        #[cfg(feature = "ndarray")]
        Ok("ndarray") => Device::ndarray(),
        Ok("flex") | Err(_) => Device::flex(),
        Ok(other) => panic!("SPF_BENCH_CPU={other}: flex or ndarray (with --features ndarray)"),
    }
}

/// [`device`] with autodiff, where the models live.
pub fn autodiff_device() -> Device {
    device().autodiff()
}

/// The name of [`device`]'s backend, for the tables.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "wgpu") {
        "wgpu"
    } else if std::env::var("SPF_BENCH_CPU").as_deref() == Ok("ndarray") {
        "ndarray"
    } else {
        "flex"
    }
}

/// Waits until the device has run everything queued: GPU backends return before their kernels
/// finish, so each timed iteration ends here.
pub fn sync() {
    device().sync().expect("the device runs");
}

/// A criterion group whose benchmarks also keep their per-iteration times, so that it can print
/// them as ratios against one of them, all timed in the same run.
pub struct Group<'c> {
    group: BenchmarkGroup<'c, WallTime>,
    name: String,
    samples: usize,
    times: BTreeMap<String, Rc<RefCell<Vec<Duration>>>>,
    order: Vec<String>,
}

impl<'c> Group<'c> {
    /// A group of `samples` samples per benchmark, each measured for about `measurement` in all.
    pub fn new(c: &'c mut Criterion, name: &str, samples: usize, measurement: Duration) -> Self {
        let mut group = c.benchmark_group(name);
        group
            .sample_size(samples)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(measurement);
        Self {
            group,
            name: name.to_string(),
            samples,
            times: BTreeMap::new(),
            order: Vec::new(),
        }
    }

    /// Times `routine` on inputs made by `setup`, which runs outside the timer.
    pub fn bench<I>(
        &mut self,
        name: &str,
        mut setup: impl FnMut() -> I,
        mut routine: impl FnMut(I),
    ) {
        let times = Rc::new(RefCell::new(Vec::new()));
        let record = times.clone();
        self.group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let input = setup();
                    sync();
                    let start = Instant::now();
                    routine(input);
                    sync();
                    total += start.elapsed();
                }
                let per_iter = total.as_secs_f64() / iters.max(1) as f64;
                record.borrow_mut().push(Duration::from_secs_f64(per_iter));
                total
            })
        });
        self.times.insert(name.to_string(), times);
        self.order.push(name.to_string());
    }

    /// The median per-iteration time of a benchmark's measured samples (criterion's warm-up
    /// calls come first and are left out), or `None` when it did not run (filtered out).
    fn median(&self, name: &str) -> Option<Duration> {
        let all = self.times.get(name)?.borrow();
        let mut last = all[all.len().saturating_sub(self.samples)..].to_vec();
        last.sort();
        last.get(last.len() / 2).copied()
    }

    /// Ends the group and prints its benchmarks as a Markdown table of medians and ratios to
    /// `baseline`.
    pub fn finish(self, baseline: &str) {
        self.finish_per(1, baseline);
    }

    /// As [`Self::finish`], for iterations of `units` units each (training steps, say): the table
    /// shows the median time per unit.
    pub fn finish_per(self, units: usize, baseline: &str) {
        let Some(base) = self.median(baseline) else {
            self.group.finish();
            return;
        };
        let per = if units == 1 { "iteration" } else { "step" };
        println!(
            "\n{} on {}: median time per {per} over {} samples, ratio to `{baseline}`\n",
            self.name,
            backend_name(),
            self.samples
        );
        println!("| benchmark | median | ratio |");
        println!("|---|---|---|");
        for name in &self.order {
            if let Some(median) = self.median(name) {
                println!(
                    "| {name} | {:.3} ms | {:.3}× |",
                    median.as_secs_f64() * 1e3 / units as f64,
                    median.as_secs_f64() / base.as_secs_f64()
                );
            }
        }
        self.group.finish();
    }
}

/// A module made of bare weight matrices, shaped like one Llama-style transformer block.
#[derive(Module, Debug)]
pub struct Matrices {
    /// The weights.
    pub weights: Vec<Param<Tensor<2>>>,
}

impl Matrices {
    /// Normal(0, 0.02) matrices of the given shapes.
    pub fn new(shapes: &[[usize; 2]], device: &Device) -> Self {
        let weights = shapes
            .iter()
            .map(|&shape| {
                Param::from_tensor(Tensor::random(
                    shape,
                    Distribution::Normal(0.0, 0.02),
                    device,
                ))
            })
            .collect();
        Self { weights }
    }
}

/// Attention's four `[d, d]` projections, the gate and up `[d, f]` projections and the down
/// `[f, d]` projection of a Llama block of width `d` and MLP width `f`, as `[d_in, d_out]`.
pub fn llama_block(d: usize, f: usize) -> Vec<[usize; 2]> {
    vec![[d, d], [d, d], [d, d], [d, d], [d, f], [d, f], [f, d]]
}

/// Registers one fresh gradient.
type Maker = Box<dyn Fn(&mut GradientsParams)>;

/// Fresh standard-normal gradients for every float parameter of a module, rebuilt from host data
/// for each use so that no two steps share a buffer.
pub struct GradientSet {
    makers: Vec<Maker>,
}

impl GradientSet {
    /// Draws one gradient per float parameter of `module`.
    pub fn new<M: Module>(module: &M, device: &Device) -> Self {
        struct Draw<'a> {
            device: &'a Device,
            makers: Vec<Maker>,
        }
        impl ModuleVisitor for Draw<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let (id, device) = (param.id, self.device.clone());
                let data =
                    Tensor::<D>::random(param.shape(), Distribution::Normal(0.0, 1.0), &device)
                        .into_data();
                self.makers.push(Box::new(move |grads| {
                    let grad = Tensor::<D>::from_data(data.clone(), &device);
                    grads.register(id, grad);
                }));
            }
        }
        let mut draw = Draw {
            device,
            makers: Vec::new(),
        };
        module.visit(&mut draw);
        Self {
            makers: draw.makers,
        }
    }

    /// A fresh copy of the gradients.
    pub fn fresh(&self) -> GradientsParams {
        let mut grads = GradientsParams::new();
        for make in &self.makers {
            make(&mut grads);
        }
        grads
    }
}

/// A random rank-`k` basis (orthonormal factors from the QR of Gaussian matrices, decreasing
/// singular values) for every matrix of `module` that the default estimator targets, `k` capped
/// at the smaller side.
pub fn random_bases<M: Module>(
    module: &M,
    k: usize,
    seed: u64,
    device: &Device,
) -> Vec<(ParamId, LowRankBasis)> {
    let targets = Targets::of(module, &Default::default(), VectorPolicy::default())
        .expect("the default filter compiles");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids: Vec<_> = targets
        .iter()
        .filter(|(_, t)| t.targeted && t.rank >= 2)
        .map(|(id, t)| (*id, t.view))
        .collect();
    ids.sort_by_key(|(id, _)| id.val());
    ids.into_iter()
        .map(|(id, [d_in, d_out])| {
            let k = k.min(d_in).min(d_out);
            let basis = LowRankBasis::new(
                orthonormal(d_in, k, &mut rng, device),
                Tensor::from_data(
                    TensorData::new((1..=k).rev().map(|s| s as f32).collect(), [k]),
                    device,
                ),
                orthonormal(d_out, k, &mut rng, device),
            )
            .expect("QR factors are orthonormal");
            (id, basis)
        })
        .collect()
}

fn orthonormal(n: usize, k: usize, rng: &mut StdRng, device: &Device) -> Tensor<2> {
    let q = Mat::<f64>::from_fn(n, k, |_, _| StandardNormal.sample(rng))
        .qr()
        .compute_thin_Q();
    let q = &q;
    let values: Vec<f32> = (0..n)
        .flat_map(|i| (0..k).map(move |j| q[(i, j)] as f32))
        .collect();
    Tensor::from_data(TensorData::new(values, [n, k]), device)
}
