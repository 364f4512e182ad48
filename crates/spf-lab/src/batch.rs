//! Examples as tensors, and the answer-only cross-entropy every stage trains on.
//!
//! A sequence `s = prompt ‖ answer` is fed as `s[..T-1]` with targets `s[1..]`; only targets
//! inside the answer count, so the loss is the mean negative log-likelihood of the answer
//! tokens given the prompt: `L = −(1/|A|) Σ_{(b,t)∈A} log p(s_{b,t+1} | s_{b,≤t})`.

use burn::tensor::Device;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::Transformer;
use crate::world::{Example, PAD, Vocab};

/// A padded batch of sequences.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Input tokens `[n, T]`.
    pub inputs: Tensor<2, Int>,
    /// Next-token targets `[n, T]`.
    pub targets: Tensor<2, Int>,
    /// 1 where the target is an answer token, else 0, `[n, T]`.
    pub mask: Tensor<2>,
}

impl Batch {
    /// The batch of `examples`, padded to the world's longest sequence.
    pub fn new(vocab: &Vocab, examples: &[Example], device: &Device) -> Self {
        let len = vocab.max_len() - 1;
        let n = examples.len();
        let mut inputs = vec![i64::from(PAD); n * len];
        let mut targets = vec![i64::from(PAD); n * len];
        let mut mask = vec![0.0f32; n * len];
        let answer_start = vocab.prompt_len() - 1;
        for (row, example) in examples.iter().enumerate() {
            let mut sequence = vocab.prompt(example);
            sequence.extend(vocab.answer(example));
            for t in 0..sequence.len() - 1 {
                inputs[row * len + t] = i64::from(sequence[t]);
                targets[row * len + t] = i64::from(sequence[t + 1]);
                if t >= answer_start {
                    mask[row * len + t] = 1.0;
                }
            }
        }
        let ints = |data: Vec<i64>| Tensor::from_data(TensorData::new(data, [n, len]), device);
        Self {
            inputs: ints(inputs),
            targets: ints(targets),
            mask: Tensor::from_data(TensorData::new(mask, [n, len]), device),
        }
    }

    /// The number of sequences.
    pub fn len(&self) -> usize {
        self.inputs.dims()[0]
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The mean answer-token negative log-likelihood of `batch` under `model`, `[1]`.
pub fn answer_loss(model: &Transformer, batch: &Batch) -> Tensor<1> {
    let logp = log_softmax(model.forward(batch.inputs.clone()), 2);
    let picked = logp
        .gather(2, batch.targets.clone().unsqueeze_dim(2))
        .squeeze_dim::<2>(2);
    let mask = batch.mask.clone();
    -(picked * mask.clone()).sum() / mask.sum()
}
