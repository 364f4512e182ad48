//! A reader for GGUF files (llama.cpp's model format, versions 2 and 3).
//!
//! A file is a header, `kv_count` key/value pairs of metadata, `tensor_count` tensor infos, and
//! then, at the next multiple of `general.alignment` (32 unless the metadata says otherwise), the
//! tensor data. Integers are little-endian; a string is a `u64` byte length and UTF-8 bytes.
//! A tensor info is its name, its dimensions **fastest-first** (so a ggml matrix `[in, out]` is a
//! row-major `[out, in]` array), its ggml type and its offset into the data section.
//!
//! [`Gguf::tensor_f32`] dequantizes into `f32` (row-major, slowest dimension first):
//!
//! | type | bytes per block of 32 | value |
//! |---|---|---|
//! | F32  | 128 (no blocks) | as stored |
//! | F16  | 64 (no blocks)  | as stored |
//! | Q8_0 | 34: f16 `d`, 32 × i8 `q` | `d·q[j]` |
//! | Q4_1 | 20: f16 `d`, f16 `m`, 16 bytes of nibbles | `v[j] = d·(q[j] & 0xF) + m`, `v[j+16] = d·(q[j] >> 4) + m` |
//!
//! Every other tensor type, and every truncated or inconsistent file, is a typed
//! [`GgufError`]; no input makes the reader panic or allocate more than the file's own size
//! (counts are checked against the bytes left before anything is reserved).

use std::collections::BTreeMap;
use std::path::Path;

use half::f16;

/// Why a GGUF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be read from disk.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file (magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A GGUF version this reader does not know.
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    UnsupportedVersion(u32),
    /// The file ends before a field it declares.
    #[error("truncated file: {what} needs {needed} bytes at offset {offset}, {left} left")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Where it starts.
        offset: usize,
        /// Its size.
        needed: usize,
        /// The bytes left in the file.
        left: usize,
    },
    /// A field holds a value no valid file has.
    #[error("corrupt file: {0}")]
    Corrupt(String),
    /// A tensor's type has no dequantizer here.
    #[error(
        "tensor {name}: ggml type {ggml_type} ({type_name}) is not supported (F32, F16, Q8_0 and Q4_1 are)"
    )]
    UnsupportedType {
        /// The tensor.
        name: String,
        /// Its ggml type id.
        ggml_type: u32,
        /// The type's name, where known.
        type_name: &'static str,
    },
    /// No tensor has this name.
    #[error("no tensor named {0}")]
    MissingTensor(String),
    /// No metadata key has this name.
    #[error("no metadata key {0}")]
    MissingKey(String),
    /// A metadata value has another type than the one asked for.
    #[error("metadata key {key}: expected {expected}, found {found}")]
    WrongType {
        /// The key.
        key: String,
        /// What the caller asked for.
        expected: &'static str,
        /// What the file holds.
        found: &'static str,
    },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `u8`
    U8(u8),
    /// `i8`
    I8(i8),
    /// `u16`
    U16(u16),
    /// `i16`
    I16(i16),
    /// `u32`
    U32(u32),
    /// `i32`
    I32(i32),
    /// `f32`
    F32(f32),
    /// `bool`
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array of values of one type.
    Array(Vec<Value>),
    /// `u64`
    U64(u64),
    /// `i64`
    I64(i64),
    /// `f64`
    F64(f64),
}

impl Value {
    /// The type's name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// The value as a non-negative integer, from any integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, from either float type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// The ggml tensor types, as numbered in the file.
pub mod ggml_type {
    /// 32-bit floats.
    pub const F32: u32 = 0;
    /// 16-bit floats.
    pub const F16: u32 = 1;
    /// 4-bit blocks with a scale and a minimum.
    pub const Q4_1: u32 = 3;
    /// 8-bit blocks with a scale.
    pub const Q8_0: u32 = 8;

    /// A ggml type's name, for error messages.
    pub fn name(id: u32) -> &'static str {
        const NAMES: [&str; 31] = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
            "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
            "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
            "BF16",
        ];
        NAMES.get(id as usize).copied().unwrap_or("unknown")
    }
}

/// One tensor's description.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Its name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Its dimensions, fastest-varying first (ggml's order).
    pub dims: Vec<usize>,
    /// Its ggml type (see [`ggml_type`]).
    pub ggml_type: u32,
    /// Its offset into the data section.
    pub offset: usize,
}

impl TensorInfo {
    /// The number of elements.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape in row-major order, slowest dimension first (ggml's dims reversed): a matrix
    /// is `[rows, cols]` = `[out, in]`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A parsed GGUF file: its metadata and tensor infos, and its bytes.
#[derive(Debug, Clone)]
pub struct Gguf {
    /// The format version (2 or 3).
    pub version: u32,
    /// The metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// The tensors, in file order.
    pub tensors: Vec<TensorInfo>,
    bytes: Vec<u8>,
    data_start: usize,
}

/// Arrays of arrays may nest; a file that nests deeper than this is refused.
const MAX_DEPTH: usize = 8;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: usize = 4;
const BLOCK: usize = 32;

impl Gguf {
    /// Reads and parses the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(bytes)
    }

    /// Parses a whole file held in memory.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, GgufError> {
        let mut r = Reader {
            bytes: &bytes,
            pos: 0,
        };
        let magic: [u8; 4] = r.take(4, "magic")?.try_into().expect("four bytes");
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let tensor_count = r.u64("tensor count")?;
        let kv_count = r.u64("metadata count")?;
        // A key/value pair takes at least 12 bytes, a tensor info at least 24.
        let kv_count = r.count(kv_count, 12, "metadata count")?;
        let tensor_count = r.count(tensor_count, 24, "tensor count")?;

        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string("metadata key")?;
            let value_type = r.u32("metadata value type")?;
            let value = r.value(value_type, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::Corrupt(format!(
                    "metadata key {key} appears twice"
                )));
            }
        }

        let mut tensors = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Corrupt(format!(
                    "tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = r.u64("tensor dimension")?;
                dims.push(usize::try_from(d).map_err(|_| too_big(&name))?);
            }
            let ggml_type = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            let offset = usize::try_from(offset).map_err(|_| too_big(&name))?;
            dims.iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .ok_or_else(|| too_big(&name))?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let mut names = std::collections::HashSet::new();
        if let Some(t) = tensors.iter().find(|t| !names.insert(t.name.as_str())) {
            return Err(GgufError::Corrupt(format!(
                "tensor {} appears twice",
                t.name
            )));
        }

        let alignment = match metadata.get("general.alignment") {
            None => BLOCK,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(GgufError::Corrupt(format!(
                        "general.alignment is {v:?}, not a power of two"
                    )));
                }
            },
        };
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let gguf = Gguf {
            version,
            metadata,
            tensors,
            data_start,
            bytes: Vec::new(),
        };
        // Every tensor's bytes must lie inside the file; a type without a known size is checked
        // when it is read.
        for t in &gguf.tensors {
            if let Some(size) = byte_size(t.ggml_type, t.len()) {
                let size =
                    size.map_err(|e| GgufError::Corrupt(format!("tensor {}: {e}", t.name)))?;
                let end = data_start
                    .checked_add(t.offset)
                    .and_then(|s| s.checked_add(size))
                    .ok_or_else(|| too_big(&t.name))?;
                if end > bytes.len() {
                    return Err(GgufError::Truncated {
                        what: "tensor data",
                        offset: data_start.saturating_add(t.offset),
                        needed: size,
                        left: bytes
                            .len()
                            .saturating_sub(data_start.saturating_add(t.offset)),
                    });
                }
            }
        }
        Ok(Gguf { bytes, ..gguf })
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    /// The integer under `key`, as a `usize`.
    pub fn get_usize(&self, key: &str) -> Result<usize, GgufError> {
        let v = self.get(key)?;
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| wrong_type(key, "unsigned integer", v))
    }

    /// The float under `key`.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.get(key)?;
        v.as_f64().ok_or_else(|| wrong_type(key, "float", v))
    }

    /// The string under `key`.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            v => Err(wrong_type(key, "string", v)),
        }
    }

    /// The array of strings under `key`.
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let Value::Array(items) = self.get(key)? else {
            return Err(wrong_type(key, "array of strings", self.get(key)?));
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(wrong_type(key, "array of strings", v)),
            })
            .collect()
    }

    /// The array of integers under `key`.
    pub fn get_ints(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        let Value::Array(items) = self.get(key)? else {
            return Err(wrong_type(key, "array of integers", self.get(key)?));
        };
        items
            .iter()
            .map(|v| match *v {
                Value::I32(n) => Ok(n.into()),
                Value::I64(n) => Ok(n),
                ref v => v
                    .as_u64()
                    .and_then(|n| i64::try_from(n).ok())
                    .ok_or_else(|| wrong_type(key, "array of integers", v)),
            })
            .collect()
    }

    /// The tensor info named `name`.
    pub fn info(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))
    }

    /// The tensor named `name`, dequantized: its row-major shape (slowest dimension first, see
    /// [`TensorInfo::shape`]) and its values.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), GgufError> {
        let info = self.info(name)?;
        let n = info.len();
        let unsupported = || GgufError::UnsupportedType {
            name: name.to_string(),
            ggml_type: info.ggml_type,
            type_name: ggml_type::name(info.ggml_type),
        };
        let size = byte_size(info.ggml_type, n)
            .ok_or_else(unsupported)?
            .map_err(|e| GgufError::Corrupt(format!("tensor {name}: {e}")))?;
        // `parse` checked that the range lies inside the file.
        let start = self.data_start + info.offset;
        let raw = &self.bytes[start..start + size];
        let values = match info.ggml_type {
            ggml_type::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            ggml_type::F16 => raw.chunks_exact(2).map(|b| half_at(b, 0)).collect(),
            ggml_type::Q8_0 => {
                let mut out = Vec::with_capacity(n);
                for block in raw.chunks_exact(34) {
                    let d = half_at(block, 0);
                    out.extend(block[2..].iter().map(|&q| d * f32::from(q as i8)));
                }
                out
            }
            ggml_type::Q4_1 => {
                let mut out = vec![0.0; n];
                for (block, values) in raw.chunks_exact(20).zip(out.chunks_exact_mut(BLOCK)) {
                    let (d, m) = (half_at(block, 0), half_at(block, 2));
                    let (low, high) = values.split_at_mut(BLOCK / 2);
                    for ((&q, lo), hi) in block[4..].iter().zip(low).zip(high) {
                        *lo = d * f32::from(q & 0xF) + m;
                        *hi = d * f32::from(q >> 4) + m;
                    }
                }
                out
            }
            _ => return Err(unsupported()),
        };
        Ok((info.shape(), values))
    }
}

/// The bytes `n` elements of a ggml type take: `None` for a type without a dequantizer here,
/// an error text for a count the type cannot hold.
fn byte_size(ggml_type: u32, n: usize) -> Option<Result<usize, String>> {
    let blocked = |block_bytes: usize| {
        if !n.is_multiple_of(BLOCK) {
            Err(format!(
                "{n} elements is not a whole number of blocks of {BLOCK}"
            ))
        } else {
            Ok(n / BLOCK * block_bytes)
        }
    };
    let size = match ggml_type {
        ggml_type::F32 => n.checked_mul(4).ok_or("too large".to_string()),
        ggml_type::F16 => n.checked_mul(2).ok_or("too large".to_string()),
        ggml_type::Q8_0 => blocked(34),
        ggml_type::Q4_1 => blocked(20),
        _ => return None,
    };
    Some(size)
}

fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

fn too_big(name: &str) -> GgufError {
    GgufError::Corrupt(format!("tensor {name}: size or offset overflows"))
}

fn wrong_type(key: &str, expected: &'static str, found: &Value) -> GgufError {
    GgufError::WrongType {
        key: key.to_string(),
        expected,
        found: found.type_name(),
    }
}

/// A cursor over the file's bytes; every read checks the bytes left.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, needed: usize, what: &'static str) -> Result<&'a [u8], GgufError> {
        let left = self.bytes.len() - self.pos;
        if needed > left {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos,
                needed,
                left,
            });
        }
        let out = &self.bytes[self.pos..self.pos + needed];
        self.pos += needed;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A declared count of items of at least `min_bytes` each, refused when the file cannot
    /// hold that many (so a corrupt count never reserves memory).
    fn count(&self, n: u64, min_bytes: usize, what: &'static str) -> Result<usize, GgufError> {
        let left = self.bytes.len() - self.pos;
        match usize::try_from(n) {
            Ok(n) if n.checked_mul(min_bytes).is_some_and(|b| b <= left) => Ok(n),
            _ => Err(GgufError::Truncated {
                what,
                offset: self.pos,
                needed: usize::try_from(n)
                    .ok()
                    .and_then(|n| n.checked_mul(min_bytes))
                    .unwrap_or(usize::MAX),
                left,
            }),
        }
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let len = self.count(len, 1, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            GgufError::Corrupt(format!("{what} at offset {} is not UTF-8", self.pos - len))
        })
    }

    fn value(&mut self, value_type: u32, depth: usize) -> Result<Value, GgufError> {
        const WHAT: &str = "metadata value";
        Ok(match value_type {
            0 => Value::U8(self.array::<1>(WHAT)?[0]),
            1 => Value::I8(self.array::<1>(WHAT)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(WHAT)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(WHAT)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(WHAT)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(WHAT)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(WHAT)?)),
            7 => match self.array::<1>(WHAT)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(GgufError::Corrupt(format!("bool value {b}"))),
            },
            8 => Value::String(self.string(WHAT)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(GgufError::Corrupt(format!(
                        "arrays nested deeper than {MAX_DEPTH}"
                    )));
                }
                let item_type = self.u32("array item type")?;
                let n = self.u64("array length")?;
                let n = self.count(n, min_value_bytes(item_type)?, "array length")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_type, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(WHAT)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(WHAT)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(WHAT)?)),
            t => return Err(GgufError::Corrupt(format!("metadata value type {t}"))),
        })
    }
}

/// The fewest bytes a value of a type takes in the file.
fn min_value_bytes(value_type: u32) -> Result<usize, GgufError> {
    Ok(match value_type {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        t => return Err(GgufError::Corrupt(format!("metadata value type {t}"))),
    })
}

#[cfg(any(test, feature = "testing"))]
pub mod write;

#[cfg(test)]
mod tests;
