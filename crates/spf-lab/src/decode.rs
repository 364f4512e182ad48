//! Greedy decoding, and exact-match accuracy on it. The harmful score, which reads the same
//! answers, is in [`eval`](crate::eval).

use burn::tensor::Device;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::Transformer;
use crate::world::{EOS, Example, Vocab};

/// Greedy answers to `prompts` (all of the world's prompt length), each cut before its first
/// `<eos>` or at the longest answer.
pub fn greedy(
    model: &Transformer,
    vocab: &Vocab,
    prompts: &[Example],
    device: &Device,
) -> Vec<Vec<u32>> {
    let n = prompts.len();
    if n == 0 {
        return Vec::new();
    }
    let tokens: Vec<i64> = prompts
        .iter()
        .flat_map(|e| vocab.prompt(e))
        .map(i64::from)
        .collect();
    let mut sequence: Tensor<2, Int> =
        Tensor::from_data(TensorData::new(tokens, [n, vocab.prompt_len()]), device);
    let steps = vocab.max_answer_len();
    for _ in 0..steps {
        let [_, len] = sequence.dims();
        let last = model.forward(sequence.clone()).slice([0..n, len - 1..len]);
        let next = last.argmax(2).reshape([n, 1]);
        sequence = Tensor::cat(vec![sequence, next], 1);
    }
    let start = vocab.prompt_len();
    let data = sequence.into_data().convert::<i64>();
    let flat = data.as_slice::<i64>().unwrap_or_default();
    let width = start + steps;
    (0..n)
        .map(|row| {
            flat[row * width + start..(row + 1) * width]
                .iter()
                .map(|&t| t as u32)
                .take_while(|&t| t != EOS)
                .collect()
        })
        .collect()
}

/// The share of `examples` whose greedy answer is exactly the target answer, in `[0, 1]`.
pub fn accuracy(model: &Transformer, vocab: &Vocab, examples: &[Example], device: &Device) -> f64 {
    let answers = greedy(model, vocab, examples, device);
    let hits = answers
        .iter()
        .zip(examples)
        .filter(|(answer, example)| {
            let target = vocab.answer(example);
            answer.as_slice() == &target[..target.len() - 1]
        })
        .count();
    hits as f64 / examples.len().max(1) as f64
}
