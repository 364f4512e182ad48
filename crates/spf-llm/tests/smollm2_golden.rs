//! Golden tests of the GGUF reader, the tokenizer and the Llama forward pass against SmolLM2's
//! values computed by an independent numpy implementation (docs/smollm2.md). They need the
//! model file from `scripts/fetch-assets.sh` and skip, saying so, without it.

use burn::tensor::Device;
use burn::tensor::{Int, Tensor, TensorData};

#[path = "common/smollm2.rs"]
mod smollm2;

use smollm2::loaded;

const PROMPT: &str =
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
const PROMPT_IDS: [u32; 16] = [
    1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
];

#[test]
fn header_and_dequantized_values() {
    let Some(m) = loaded() else { return };
    assert_eq!(m.gguf.version, 3);
    assert_eq!(m.gguf.tensors.len(), 272);
    let close = |name: &str, row: usize, expect: [f32; 4]| {
        let (shape, v) = m.gguf.tensor_f32(name).unwrap();
        let got = &v[row * shape[1]..row * shape[1] + 4];
        for (g, e) in got.iter().zip(expect) {
            assert!(
                (g - e).abs() < 1e-6,
                "{name}[{row},:4] = {got:?}, expected {expect:?}"
            );
        }
    };
    close(
        "token_embd.weight",
        1,
        [-0.02380371, -0.01586914, -0.03967285, 0.01586914],
    );
    close(
        "blk.0.attn_q.weight",
        0,
        [-0.09631348, 0.15734863, -0.09631348, -0.73046875],
    );
}

#[test]
fn token_ids() {
    let Some(m) = loaded() else { return };
    assert_eq!(m.tokenizer.encode(PROMPT).unwrap(), PROMPT_IDS);
    assert_eq!(
        m.tokenizer
            .prompt("What is the capital of France?")
            .unwrap(),
        PROMPT_IDS
    );
    assert_eq!(
        m.tokenizer.encode("Hello world, 12345!").unwrap(),
        [19556, 905, 28, 216, 33, 34, 35, 36, 37, 17]
    );
    assert_eq!(
        m.tokenizer.decode(&[19556, 905, 28, 216, 33, 34]).unwrap(),
        "Hello world, 12"
    );
}

#[test]
fn top_three_next_token_logits() {
    let Some(m) = loaded() else { return };
    let ids: Vec<i64> = PROMPT_IDS.iter().map(|&t| t.into()).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, 16]), &Device::default());
    let logits: Vec<f32> = m
        .model
        .forward(tokens)
        .slice([0..1, 15..16])
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let expect = [(504, 27.859), (60, 26.13), (38634, 26.102)];
    for (&got, (id, value)) in order.iter().zip(expect) {
        assert_eq!(got, id, "top-3 ids {:?}", &order[..3]);
        assert!(
            (logits[got] - value).abs() < 0.05,
            "logit of {id}: {} vs {value}",
            logits[got]
        );
    }
}

#[test]
fn greedy_continuation() {
    let Some(m) = loaded() else { return };
    let out = m.model.generate(
        &[PROMPT_IDS.to_vec()],
        12,
        m.tokenizer.eos,
        &Device::default(),
    );
    assert_eq!(out[0], [504, 3575, 282, 4649, 314, 7042, 30, 2]);
    assert_eq!(
        m.tokenizer.decode(&out[0]).unwrap(),
        "The capital of France is Paris."
    );
}

#[test]
fn a_batch_of_prompts_of_different_lengths_generates_as_each_alone() {
    let Some(m) = loaded() else { return };
    let short = m.tokenizer.prompt("Say hi.").unwrap();
    let device = Device::default();
    let batch = m.model.generate(
        &[PROMPT_IDS.to_vec(), short.clone()],
        6,
        m.tokenizer.eos,
        &device,
    );
    let alone = m.model.generate(&[short], 6, m.tokenizer.eos, &device);
    assert_eq!(batch[0][..6], [504, 3575, 282, 4649, 314, 7042]);
    assert_eq!(batch[1], alone[0]);
}
