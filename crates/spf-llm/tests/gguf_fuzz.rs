//! Any bytes handed to the GGUF loaders give an error or a valid result, never a panic or an
//! abort: random byte strings (some behind a valid magic and version, so that they reach the
//! count and value readers), and mutations (flips, truncations, insertions, splices) of a
//! small valid Llama GGUF with a tokenizer. A file that parses has every tensor dequantized and
//! the model config, tokenizer and model built from it; a model that loads runs a forward pass.
//! 1 000 cases by default, 10 000 under `--ignored`.

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor};
use spf_llm::chat::ChatTokenizer;
use spf_llm::gguf::Gguf;
use spf_llm::llama::{Llama, LlamaConfig, tiny_gguf};

// The mutation strategy and runner, shared with the root package's record fuzzer.
#[path = "../../../tests/common/mutate.rs"]
mod mutate;

use mutate::fuzz;

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

/// Runs every loader on `bytes`; any panic fails the test.
fn load(bytes: Vec<u8>, tally: &mut Tally) {
    let Ok(gguf) = Gguf::parse(bytes) else {
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
    if let Ok(model) = Llama::<NdArray>::from_gguf(&gguf, &Default::default()) {
        tally.model += 1;
        let tokens = Tensor::<NdArray, 2, Int>::from_ints([[1, 2]], &Default::default());
        let [_, _, vocab] = model.forward(tokens).dims();
        assert_eq!(vocab, gguf.info("token_embd.weight").unwrap().shape()[0]);
    }
}

fn run(cases: u32) {
    let valid = tiny();
    let mut tally = Tally::default();
    load(valid.clone(), &mut tally);
    assert_eq!(
        (tally.tokenizer, tally.model),
        (1, 1),
        "the unmutated file loads"
    );
    let tally = std::cell::RefCell::new(Tally::default());
    fuzz(cases, &valid, &[b"", b"GGUF\x03\0\0\0"], |bytes| {
        load(bytes, &mut tally.borrow_mut())
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
