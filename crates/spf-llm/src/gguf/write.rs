//! Writes GGUF bytes: what the tests build files with (the `testing` feature). Tensor data is
//! given raw, already in its ggml type's encoding.

use super::Value;

/// A GGUF v3 file holding `metadata` and `tensors` (name, dims fastest-first, ggml type,
/// raw bytes), with the data section aligned to 32 bytes.
pub fn encode(metadata: &[(&str, Value)], tensors: &[(&str, &[usize], u32, &[u8])]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        string(&mut out, key);
        out.extend(type_id(value).to_le_bytes());
        encode_value(&mut out, value);
    }
    let mut offset = 0usize;
    let mut offsets = Vec::new();
    for (name, dims, ggml_type, data) in tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for &d in dims.iter() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(ggml_type.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + data.len()).div_ceil(32) * 32;
    }
    let data_start = out.len().div_ceil(32) * 32;
    out.resize(data_start, 0);
    for ((_, _, _, data), at) in tensors.iter().zip(offsets) {
        out.resize(data_start + at, 0);
        out.extend_from_slice(data);
    }
    out
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn type_id(value: &Value) -> u32 {
    match value {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn encode_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend(v.to_le_bytes()),
        Value::U16(v) => out.extend(v.to_le_bytes()),
        Value::I16(v) => out.extend(v.to_le_bytes()),
        Value::U32(v) => out.extend(v.to_le_bytes()),
        Value::I32(v) => out.extend(v.to_le_bytes()),
        Value::F32(v) => out.extend(v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => string(out, s),
        Value::Array(items) => {
            // An empty array is written as an array of u8.
            out.extend(items.first().map_or(0, type_id).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                encode_value(out, item);
            }
        }
        Value::U64(v) => out.extend(v.to_le_bytes()),
        Value::I64(v) => out.extend(v.to_le_bytes()),
        Value::F64(v) => out.extend(v.to_le_bytes()),
    }
}
