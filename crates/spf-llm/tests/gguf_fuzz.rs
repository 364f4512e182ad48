//! Any bytes handed to the GGUF loaders give an error or a valid result, never a panic or an
//! abort: random byte strings (some behind a valid magic and version, so that they reach the
//! count and value readers), and mutations (flips, truncations, insertions, splices) of a
//! small valid Llama GGUF with a tokenizer. A file that parses has every tensor dequantized and
//! the model config, tokenizer and model built from it; a model that loads runs a forward pass.
//! What each input must give is asserted: random bytes without the GGUF magic are refused, and a
//! file cut short is refused or, cut only in its trailing padding, parses to the same tensors.
//! The counts are printed, and refused and parsed inputs must both occur. 1 000 cases by
//! default, 10 000 under `--ignored`.

use burn::tensor::Device;
use burn::tensor::{Int, Tensor};
use spf_llm::chat::ChatTokenizer;
use spf_llm::gguf::Gguf;
use spf_llm::llama::{Llama, LlamaConfig, tiny_gguf};

// The mutation strategy and runner, shared with the root package's record fuzzer.
#[path = "../../../tests/common/mutate.rs"]
mod mutate;

use mutate::{Case, fuzz};

fn tiny() -> Vec<u8> {
    let config = LlamaConfig {
        vocab: 261,
        d_model: 16,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        d_ff: 32,
        rope_base: 10000.0,
        norm_eps: 1e-5,
    };
    tiny_gguf(&config, 7)
}

/// What became of one input.
#[derive(Debug, Default)]
struct Tally {
    refused: usize,
    parsed: usize,
    tokenizer: usize,
    model: usize,
}

/// A tensor's name and its shape and values, or why they could not be read.
type Dequantized = (String, Result<(Vec<usize>, Vec<f32>), String>);

/// Every tensor of a parsed file, dequantized.
fn tensors(gguf: &Gguf) -> Vec<Dequantized> {
    gguf.tensors
        .iter()
        .map(|t| {
            let values = gguf.tensor_f32(&t.name).map_err(|e| e.to_string());
            (t.name.clone(), values)
        })
        .collect()
}

/// Runs every loader on `case`, asserting what it must give; any panic fails the test.
fn check(case: Case, valid: &[u8], tally: &mut Tally) {
    let random_without_magic = matches!(&case, Case::Random(b) if !b.starts_with(b"GGUF"));
    let truncated = case.truncated(valid);
    let parsed = Gguf::parse(case.bytes().to_vec());
    assert!(
        !(random_without_magic && parsed.is_ok()),
        "random bytes without the magic parsed"
    );
    if truncated && let Ok(gguf) = &parsed {
        let original = Gguf::parse(valid.to_vec()).expect("the valid file parses");
        assert_eq!(
            tensors(gguf),
            tensors(&original),
            "a truncated file that parses holds the same tensors"
        );
    }
    load(parsed, tally);
}

/// Runs every loader on a parse's outcome; any panic fails the test.
fn load(parsed: Result<Gguf, spf_llm::gguf::GgufError>, tally: &mut Tally) {
    let Ok(gguf) = parsed else {
        tally.refused += 1;
        return;
    };
    tally.parsed += 1;
    for t in &gguf.tensors {
        if let Ok((shape, values)) = gguf.tensor_f32(&t.name) {
            assert_eq!(shape.iter().product::<usize>(), values.len());
        }
    }
    let _ = LlamaConfig::from_gguf(&gguf);
    if let Ok(tok) = ChatTokenizer::from_gguf(&gguf) {
        tally.tokenizer += 1;
        if let Ok(ids) = tok.encode("<|im_start|>the") {
            let _ = tok.decode(&ids);
        }
    }
    if let Ok(model) = Llama::from_gguf(&gguf, &Device::default()) {
        tally.model += 1;
        let tokens = Tensor::<2, Int>::from_ints([[1, 2]], &Device::default());
        let [_, _, vocab] = model.forward(tokens).dims();
        assert_eq!(vocab, gguf.info("token_embd.weight").unwrap().shape()[0]);
    }
}

fn run(cases: u32) {
    let valid = tiny();
    let mut tally = Tally::default();
    load(Gguf::parse(valid.clone()), &mut tally);
    assert_eq!(
        (tally.tokenizer, tally.model),
        (1, 1),
        "the unmutated file loads"
    );
    let tally = std::cell::RefCell::new(Tally::default());
    fuzz(cases, &valid, &[b"", b"GGUF\x03\0\0\0"], |case| {
        check(case, &valid, &mut tally.borrow_mut())
    });
    let t = tally.into_inner();
    println!(
        "GGUF fuzz: {} cases: {} refused, {} parsed ({} built a tokenizer, {} a model that ran)",
        t.refused + t.parsed,
        t.refused,
        t.parsed,
        t.tokenizer,
        t.model
    );
    assert!(t.refused > 0 && t.parsed > 0, "{t:?}");
}

#[test]
fn any_bytes_give_an_error_or_a_valid_model() {
    run(1_000);
}

#[test]
#[ignore = "long: cargo test --release --test gguf_fuzz -- --ignored"]
fn any_bytes_give_an_error_or_a_valid_model_long() {
    run(10_000);
}
