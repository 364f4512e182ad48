use super::write::encode;
use super::*;

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

/// A Q8_0 block with scale `d` and quants `0, 1, …, 31` shifted to `-16 … 15`.
fn q8_block(d: f32) -> Vec<u8> {
    let mut b = f16_bytes(d).to_vec();
    b.extend((0..32).map(|j| (j as i8 - 16) as u8));
    b
}

/// A Q4_1 block with scale `d`, minimum `m`, low nibbles `j % 16` and high nibbles `15 - j % 16`.
fn q4_block(d: f32, m: f32) -> Vec<u8> {
    let mut b = f16_bytes(d).to_vec();
    b.extend(f16_bytes(m));
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    b
}

fn sample() -> Vec<u8> {
    let f32_data: Vec<u8> = [1.5f32, -2.0, 0.25, 8.0, 3.0, -1.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let f16_data: Vec<u8> = [0.5f32, -4.0].iter().flat_map(|&v| f16_bytes(v)).collect();
    let q8 = [q8_block(0.5), q8_block(-0.25)].concat();
    let q4 = q4_block(0.5, -1.0);
    encode(
        &[
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", Value::U32(2)),
            ("llama.rope.freq_base", Value::F32(100000.0)),
            (
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::String("a".into()), Value::String("ab".into())]),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(vec![Value::I32(1), Value::I32(3)]),
            ),
        ],
        &[
            ("m32", &[3, 2], ggml_type::F32, &f32_data),
            ("v16", &[2], ggml_type::F16, &f16_data),
            ("q8", &[32, 2], ggml_type::Q8_0, &q8),
            ("q4", &[32], ggml_type::Q4_1, &q4),
        ],
    )
}

#[test]
fn reads_metadata_and_every_supported_type() {
    let g = Gguf::parse(sample()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.get_usize("llama.block_count").unwrap(), 2);
    assert_eq!(g.get_f64("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(g.get_strings("tokenizer.ggml.tokens").unwrap(), ["a", "ab"]);
    assert_eq!(g.get_ints("tokenizer.ggml.token_type").unwrap(), [1, 3]);

    // ggml dims [3, 2] are two rows of three.
    let (shape, v) = g.tensor_f32("m32").unwrap();
    assert_eq!(shape, [2, 3]);
    assert_eq!(v, [1.5, -2.0, 0.25, 8.0, 3.0, -1.0]);
    assert_eq!(g.tensor_f32("v16").unwrap().1, [0.5, -4.0]);

    let (shape, v) = g.tensor_f32("q8").unwrap();
    assert_eq!(shape, [2, 32]);
    for j in 0..32 {
        let q = j as f32 - 16.0;
        assert_eq!(v[j], 0.5 * q);
        assert_eq!(v[32 + j], -0.25 * q);
    }

    let (_, v) = g.tensor_f32("q4").unwrap();
    for j in 0..16 {
        assert_eq!(v[j], 0.5 * j as f32 - 1.0, "low nibble {j}");
        assert_eq!(v[j + 16], 0.5 * (15 - j) as f32 - 1.0, "high nibble {j}");
    }
}

#[test]
fn metadata_of_another_type_or_missing_is_a_typed_error() {
    let g = Gguf::parse(sample()).unwrap();
    assert!(matches!(
        g.get_usize("general.architecture"),
        Err(GgufError::WrongType {
            expected: "unsigned integer",
            found: "string",
            ..
        })
    ));
    assert!(matches!(
        g.get_str("llama.block_count"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(
        g.get_strings("tokenizer.ggml.token_type"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(g.get("nope"), Err(GgufError::MissingKey(k)) if k == "nope"));
    assert!(matches!(
        g.tensor_f32("nope"),
        Err(GgufError::MissingTensor(_))
    ));
}

#[test]
fn an_unsupported_tensor_type_is_refused_when_read() {
    let bytes = encode(
        &[],
        &[
            ("q40", &[32], 2, &[0; 18]),
            ("ok", &[1], ggml_type::F32, &[0; 4]),
        ],
    );
    let g = Gguf::parse(bytes).unwrap();
    assert!(g.tensor_f32("ok").is_ok());
    let err = g.tensor_f32("q40").unwrap_err();
    assert!(
        matches!(
            err,
            GgufError::UnsupportedType {
                ggml_type: 2,
                type_name: "Q4_0",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error() {
    let bytes = sample();
    for len in 0..bytes.len() {
        let err = Gguf::parse(bytes[..len].to_vec());
        assert!(
            err.is_err(),
            "a file cut to {len} of {} bytes parsed",
            bytes.len()
        );
    }
    assert!(matches!(
        Gguf::parse(Vec::new()),
        Err(GgufError::Truncated { what: "magic", .. })
    ));
}

#[test]
fn bad_headers_are_typed_errors() {
    let mut bytes = sample();
    bytes[0] = b'X';
    assert!(matches!(Gguf::parse(bytes), Err(GgufError::BadMagic(_))));

    let mut bytes = sample();
    bytes[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert!(matches!(
        Gguf::parse(bytes),
        Err(GgufError::UnsupportedVersion(7))
    ));

    // A tensor count of 2⁶³ must be refused before anything is reserved.
    let mut bytes = sample();
    bytes[8..16].copy_from_slice(&(1u64 << 63).to_le_bytes());
    assert!(matches!(
        Gguf::parse(bytes),
        Err(GgufError::Truncated {
            what: "tensor count",
            ..
        })
    ));
}

#[test]
fn corrupt_fields_are_typed_errors() {
    let corrupt =
        |metadata: &[(&str, Value)], tensors: &[(&str, &[usize], u32, &[u8])]| match Gguf::parse(
            encode(metadata, tensors),
        ) {
            Err(GgufError::Corrupt(why)) => why,
            other => panic!("expected Corrupt, got {other:?}"),
        };
    let why = corrupt(&[("a", Value::U8(1)), ("a", Value::U8(2))], &[]);
    assert!(why.contains("twice"), "{why}");
    let why = corrupt(&[], &[("t", &[1], 0, &[0; 4]), ("t", &[1], 0, &[0; 4])]);
    assert!(why.contains("twice"), "{why}");
    let why = corrupt(&[], &[("t", &[1, 1, 1, 1, 1], 0, &[0; 4])]);
    assert!(why.contains("dimensions"), "{why}");
    let why = corrupt(&[], &[("t", &[33], ggml_type::Q8_0, &[0; 68])]);
    assert!(why.contains("blocks"), "{why}");
    let why = corrupt(&[("general.alignment", Value::U32(24))], &[]);
    assert!(why.contains("power of two"), "{why}");
    let mut deep = Value::U8(0);
    for _ in 0..10 {
        deep = Value::Array(vec![deep]);
    }
    let why = corrupt(&[("deep", deep)], &[]);
    assert!(why.contains("nested"), "{why}");
    let why = corrupt(&[], &[("t", &[usize::MAX, 2], 0, &[])]);
    assert!(why.contains("overflows"), "{why}");

    // A string that is not UTF-8, and a bool that is neither 0 nor 1.
    let mut bytes = encode(&[("key", Value::String("é".into()))], &[]);
    let at = bytes.windows(2).position(|w| w == "é".as_bytes()).unwrap();
    bytes[at + 1] = 0xFF;
    assert!(matches!(Gguf::parse(bytes), Err(GgufError::Corrupt(w)) if w.contains("UTF-8")));
    let mut bytes = encode(&[("flag", Value::Bool(true))], &[]);
    let at = bytes.windows(5).position(|w| w == b"flag\x07").unwrap();
    bytes[at + 8] = 2;
    assert!(matches!(Gguf::parse(bytes), Err(GgufError::Corrupt(w)) if w.contains("bool")));
}

#[test]
fn tensor_data_past_the_end_is_refused_at_parse() {
    let mut bytes = encode(&[], &[("t", &[4], ggml_type::F32, &[0; 16])]);
    bytes.truncate(bytes.len() - 1);
    assert!(matches!(
        Gguf::parse(bytes),
        Err(GgufError::Truncated {
            what: "tensor data",
            ..
        })
    ));
}
