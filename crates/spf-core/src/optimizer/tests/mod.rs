//! The wrapper inside real burn steps, one file per concern: stepping against manual SGD and
//! plain AdamW on projected gradients (`stepping`), records (`records`), refresh during training
//! (`refresh`), reads from the device (`host_reads`), bad input (`reliability`) and measuring without stepping, the sample screen's
//! score (`screen`). This file holds the model and fixtures they share.

use burn::module::{Module, Param, ParamId};
use burn::nn::Linear;
use burn::optim::{AdamWConfig, GradientsParams, MultiGradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData, activation::tanh};
use faer::Mat;

use super::*;
use crate::checkpoint::PackedRecord;
use crate::testing::{Gaussian, download, test_device, upload};
use crate::{
    ParamFilter, ProjectionMode, ProjectionTarget, RankPolicy, SubspaceConfig, VectorPolicy,
    project,
};

/// Three layers named so that a path filter can tell them apart, and a rank-3 parameter.
#[derive(Module, Debug)]
struct Net {
    attn: Linear,
    mlp: Linear,
    head: Linear,
    cube: Param<Tensor<3>>,
}

impl Net {
    /// Seeded and initialized eagerly (clones of a lazily initialized module would each draw
    /// their own random weights), on `device` with autodiff.
    fn new(device: &Device) -> Self {
        let device = &device.clone().autodiff();
        let mut rng = Gaussian::new(99);
        let mut param = |dims: &[usize]| {
            let n = dims.iter().product();
            let values: Vec<f32> = (0..n).map(|_| 0.5 * rng.sample() as f32).collect();
            TensorData::new(values, dims.to_vec())
        };
        let mut linear = |d_in: usize, d_out: usize| Linear {
            weight: Param::from_data(param(&[d_in, d_out]), device),
            bias: Some(Param::from_data(param(&[d_out]), device)),
        };
        Self {
            attn: linear(4, 6),
            mlp: linear(6, 5),
            head: linear(5, 3),
            cube: Param::from_data(param(&[3, 2, 2]), device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = tanh(self.attn.forward(x));
        let h = tanh(self.mlp.forward(h));
        // The cube mixes the first three outputs: out[:, j] += Σ_i h[:, i] · Σ cube[i, j, :].
        let mix = self.cube.val().sum_dim(2).reshape([3, 2]);
        let out = self.head.forward(h);
        let extra = out.clone().slice([0..out.dims()[0], 0..3]).matmul(mix);
        out.slice_assign([0..extra.dims()[0], 0..2], extra)
    }
}

/// The gradients of a seeded regression loss at `model`, its inputs on the model's device.
fn grads(model: &Net, seed: u64) -> GradientsParams {
    let device = model.attn.weight.val().device().inner();
    let mut rng = Gaussian::new(seed);
    let x = upload(&rng.matrix(8, 4), &device);
    let y = upload(&rng.matrix(8, 3), &device);
    let loss = (model.forward(x) - y).square().mean();
    GradientsParams::from_grads(loss.backward(), model)
}

/// Random bases for the two protected weights and the rank-3 cube (viewed as 3 × 4).
fn bases(model: &Net) -> Vec<(ParamId, LowRankBasis)> {
    let device = test_device();
    let mut rng = Gaussian::new(1234);
    vec![
        (model.attn.weight.id, rng.basis(4, 6, 3).to_device(&device)),
        (model.mlp.weight.id, rng.basis(6, 5, 2).to_device(&device)),
        (model.cube.id, rng.basis(3, 4, 2).to_device(&device)),
    ]
}

fn estimator() -> SubspaceConfig {
    SubspaceConfig::new().with_filter(ParamFilter::path_regex(r"(attn|mlp)\..*|cube"))
}

fn config(mode: ProjectionMode) -> SpfConfig {
    SpfConfig::new().with_mode(mode).with_estimator(estimator())
}

/// AdamW wrapped with `config` around the fixture bases.
fn adamw(config: SpfConfig, model: &Net) -> SafetyProjectedOptimizer {
    config
        .init(AdamWConfig::new().build(), model, bases(model))
        .unwrap()
}

/// Every float parameter of the model on the host, as 2-D views, by id.
fn params(model: &Net) -> Vec<(ParamId, Mat<f64>)> {
    let linear = |l: &Linear| {
        let mut out = vec![(l.weight.id, download(l.weight.val().inner()))];
        if let Some(bias) = &l.bias {
            out.push((bias.id, download(bias.val().inner().unsqueeze_dim(1))));
        }
        out
    };
    let mut all = linear(&model.attn);
    all.extend(linear(&model.mlp));
    all.extend(linear(&model.head));
    all.push((
        model.cube.id,
        download(model.cube.val().inner().reshape([3, 4])),
    ));
    all
}

/// The rank of a matrix-or-larger parameter, `None` for the vectors.
fn rank_of(model: &Net, id: ParamId) -> Option<usize> {
    if id == model.cube.id {
        Some(3)
    } else {
        [&model.attn, &model.mlp, &model.head]
            .iter()
            .any(|l| l.weight.id == id)
            .then_some(2)
    }
}

fn assert_close(a: &Net, b: &Net, tol: f64) {
    for ((id, x), (_, y)) in params(a).iter().zip(params(b)) {
        let err = crate::testing::max_abs_diff(x, &y);
        assert!(err <= tol, "parameter {id}: {err:e} > {tol:e}");
    }
}

/// Steps `optim` on the gradients of `grads(model, seed)` for each seed in `steps`.
fn train<S: SafetyGradientSource<Net>>(
    optim: &mut SafetyProjectedOptimizer<S>,
    mut model: Net,
    steps: std::ops::Range<u64>,
) -> Net {
    for seed in steps {
        let g = grads(&model, seed);
        model = optim.step(1e-2, model, g);
    }
    model
}

/// `record` as the burnpack bytes a checkpoint holds.
fn encode(record: SpfRecord) -> burn_pack::Bytes {
    PackedRecord::into_pack(record).unwrap()
}

/// The record burnpack bytes hold.
fn decode(bytes: &burn_pack::Bytes) -> SpfRecord {
    <SpfRecord as PackedRecord>::from_pack(bytes.clone()).unwrap()
}

/// `record` (the wrapper's, the module's or an optimizer's) through its burnpack bytes and
/// back, as a checkpoint takes it.
fn round_trip<R: PackedRecord>(record: R) -> R {
    R::from_pack(record.into_pack().unwrap()).unwrap()
}

/// Every parameter of `a` and `b` is bit-identical.
fn assert_same(a: &Net, b: &Net, context: &str) {
    for ((id, x), (_, y)) in params(a).into_iter().zip(params(b)) {
        assert_eq!(x, y, "{context}: parameter {id} differs");
    }
}

fn assert_bitwise<const D: usize>(a: &Param<Tensor<D>>, b: &Param<Tensor<D>>) {
    assert_eq!(
        a.val().into_data(),
        b.val().into_data(),
        "parameter {}",
        a.id
    );
}

/// The gradients with each protected one replaced by its projection.
fn projected_grads(model: &Net, seed: u64, mode: ProjectionMode) -> GradientsParams {
    let mut grads = grads(model, seed);
    for (id, basis) in bases(model) {
        // `remove` must be called with the parameter's true rank.
        let grad: Tensor<2> = if id == model.cube.id {
            grads.remove::<3>(id).unwrap().reshape([3, 4])
        } else {
            grads.remove::<2>(id).unwrap()
        };
        let projected = project(grad, &basis, mode).unwrap().grad;
        if id == model.cube.id {
            grads.register(id, projected.reshape([3, 2, 2]));
        } else {
            grads.register(id, projected);
        }
    }
    grads
}

/// Whether burn's default device is a GPU one, which the tests under `test-wgpu` need (a CubeCL
/// backend for the distributed mark, a second device for records). With WGPU compiled in,
/// `BURN_DEVICE=flex` keeps the default on the CPU (CI's CPU run, whose WGPU step runs them);
/// there they say so and return.
#[cfg(feature = "test-wgpu")]
fn on_gpu(test: &str) -> bool {
    let cpu = Device::default() == Device::flex();
    if cpu {
        eprintln!("SKIPPED {test}: burn's default device is the CPU (BURN_DEVICE=flex)");
    }
    !cpu
}

#[cfg(feature = "test-wgpu")]
mod distributed;
mod every_optimizer;
mod host_reads;
mod lora;
mod records;
mod refresh;
mod reliability;
mod screen;
mod stepping;
