use burn::tensor::Device;

use super::*;
use crate::chat::ChatTokenizer;

fn config() -> LlamaConfig {
    LlamaConfig::tiny(2)
}

fn model() -> Llama {
    let gguf = Gguf::parse(tiny_gguf(&config(), 3)).unwrap();
    assert_eq!(LlamaConfig::from_gguf(&gguf).unwrap(), config());
    Llama::from_gguf(&gguf, &Device::default()).unwrap()
}

fn ids(v: &[u32]) -> Tensor<2, Int> {
    let data: Vec<i64> = v.iter().map(|&t| t.into()).collect();
    Tensor::from_data(TensorData::new(data, [1, v.len()]), &Device::default())
}

fn last_logits(h: Tensor<3>, m: &Llama) -> Vec<f32> {
    let [b, t, d] = h.dims();
    m.logits(h.slice([0..b, t - 1..t]).reshape([b, d]))
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "{what}: max difference {worst}");
}

#[test]
fn cached_decoding_matches_the_whole_sequence() {
    let m = model();
    let seq = [1u32, 40, 70, 90, 120, 150];
    let full = m.forward(ids(&seq));
    let [_, t, v] = full.dims();
    let expect: Vec<f32> = full
        .slice([0..1, t - 1..t])
        .reshape([1, v])
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();

    let mut cache = KvCache::new(m.blocks.len());
    m.forward_layers(m.embed(ids(&seq[..4])), 0..2, 0, None, Some(&mut cache));
    assert_eq!(cache.len(), 4);
    m.forward_layers(m.embed(ids(&seq[4..5])), 0..2, 4, None, Some(&mut cache));
    let h = m.forward_layers(m.embed(ids(&seq[5..])), 0..2, 5, None, Some(&mut cache));
    assert_close(&last_logits(h, &m), &expect, "cached vs whole");
}

#[test]
fn left_padding_changes_nothing_for_the_real_tokens() {
    let m = model();
    let prompt = vec![1u32, 40, 70, 90];
    let longer = vec![1u32, 5, 6, 7, 8, 9, 10];
    let alone = last_logits(
        m.forward_layers(m.embed(ids(&prompt)), 0..2, 0, None, None),
        &m,
    );
    let mut batch = PromptBatch::new(&[longer, prompt], 0, 2, &Device::default()).unwrap();
    assert_eq!(
        batch.valid[1],
        [false, false, false, true, true, true, true]
    );
    let h = m.forward_layers(
        m.embed(batch.tokens.clone()),
        0..2,
        0,
        Some(&batch.valid),
        Some(&mut batch.cache),
    );
    let padded = last_logits(h, &m);
    assert_close(&padded[config().vocab..], &alone, "padded vs alone");
}

#[test]
fn split_then_join_is_the_same_model() {
    let m = model();
    let expect = m.forward(ids(&[1, 2, 3])).into_data();
    let (bottom, top) = m.split(1);
    assert_eq!((bottom.blocks.len(), top.blocks.len()), (1, 1));
    bottom
        .join(top)
        .forward(ids(&[1, 2, 3]))
        .into_data()
        .assert_eq(&expect, true);
}

#[test]
fn generation_stops_at_eos_or_the_limit() {
    let m = model();
    let out = m.generate(&[vec![1, 40], vec![1, 50, 60]], 5, 2, &Device::default());
    for o in &out {
        assert!(!o.is_empty() && o.len() <= 5);
        assert!(
            o[..o.len() - 1].iter().all(|&t| t != 2),
            "nothing after eos: {o:?}"
        );
    }
    assert_eq!(
        m.generate(&[vec![1]], 0, 2, &Device::default()),
        [Vec::<u32>::new()]
    );
    assert!(m.generate(&[], 3, 2, &Device::default()).is_empty());
}

#[test]
fn a_wrong_shape_or_architecture_is_a_typed_error() {
    let mut c = config();
    c.kv_heads = 3; // 4 heads do not share 3 key/value heads
    let gguf = Gguf::parse(tiny_gguf(&c, 3)).unwrap();
    assert!(matches!(
        LlamaConfig::from_gguf(&gguf),
        Err(GgufError::Corrupt(_))
    ));
    // Zero widths would make the loader's row splitting meaningless.
    for c in [
        LlamaConfig {
            d_model: 0,
            ..config()
        },
        LlamaConfig {
            d_ff: 0,
            ..config()
        },
    ] {
        let gguf = Gguf::parse(tiny_gguf(&c, 3)).unwrap();
        let loaded = Llama::from_gguf(&gguf, &Device::default());
        assert!(matches!(loaded, Err(GgufError::Corrupt(_))), "{c:?}");
    }
}

#[test]
fn the_tiny_tokenizer_round_trips() {
    let gguf = Gguf::parse(tiny_gguf(&config(), 3)).unwrap();
    let tok = ChatTokenizer::from_gguf(&gguf).unwrap();
    let ids = tok.prompt("the cat").unwrap();
    assert_eq!(ids[0], tok.bos);
    assert!(ids.contains(&tok.eos));
    assert_eq!(
        tok.decode(&tok.encode("the cat").unwrap()).unwrap(),
        "the cat"
    );
}
