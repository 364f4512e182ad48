//! Crash-safe, validated checkpoint files, in burn's named MessagePack format at full precision
//! (`NamedMpkFileRecorder<FullPrecisionSettings>`, the `.mpk` files burn-train writes too).
//!
//! - **Saving.** burn's file recorders delete an existing file before writing its replacement,
//!   so a crash in between loses the previous checkpoint. [`save_atomic`] writes to a temporary
//!   file in the same directory, flushes it to disk, and renames it over the target: a reader sees
//!   the old file or the new one, never a torn one.
//! - **Loading.** burn 0.21's ndarray backend builds tensors with `from_shape_vec_unchecked`, so a
//!   file whose tensor claims more elements than its bytes hold corrupts the heap (found by this
//!   crate's record fuzzer: `corrupted size vs. prev_size`, SIGABRT). [`load`] therefore decodes
//!   the file as plain MessagePack first and checks every tensor — `bytes`, `shape` and `dtype` —
//!   before burn sees it. Every failure (a missing, empty, truncated or corrupt file, a tensor
//!   that does not add up, a panic while decoding) is an [`SpfError::Checkpoint`].
//!
//! Paths follow burn's rule: the `.mpk` extension replaces any extension of `path`.

use std::fs::{self, File};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use burn::record::{FileRecorder, FullPrecisionSettings, NamedMpkFileRecorder, Record, Recorder};
use burn::tensor::backend::Backend;
use rmpv::Value;

use crate::error::{SpfError, panic_message};

/// The recorder behind every checkpoint file.
pub type CheckpointRecorder = NamedMpkFileRecorder<FullPrecisionSettings>;

/// Writes `record` to `path` (with the `.mpk` extension) atomically; returns the file written.
///
/// # Errors
///
/// [`SpfError::Checkpoint`] when the temporary file cannot be written, flushed or renamed. The
/// previous checkpoint at `path` is then untouched.
pub fn save_atomic<B: Backend, R: Record<B>>(
    record: R,
    path: impl AsRef<Path>,
) -> Result<PathBuf, SpfError> {
    let target = file_of::<B>(path.as_ref());
    let partial = write_partial(record, path.as_ref())?;
    fs::rename(&partial, &target).map_err(|err| failure(&target, err))?;
    if let Some(dir) = target.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        // Persist the rename itself; not every platform can open a directory: best effort.
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(target)
}

/// The first half of [`save_atomic`]: the record written and flushed to the temporary file that
/// the rename will move into place. A crash after this leaves the previous checkpoint intact.
pub(crate) fn write_partial<B: Backend, R: Record<B>>(
    record: R,
    path: &Path,
) -> Result<PathBuf, SpfError> {
    let stem = path
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    // A leading dot and no extension: burn's recorder appends its own extension to this name.
    let partial = path.with_file_name(format!(".{stem}-partial"));
    CheckpointRecorder::new()
        .record(record, partial.clone())
        .map_err(|err| failure(&partial, err))?;
    let written = file_of::<B>(&partial);
    File::open(&written)
        .and_then(|file| file.sync_all())
        .map_err(|err| failure(&written, err))?;
    Ok(written)
}

/// Reads a record written by [`save_atomic`] onto `device`, after checking every tensor in it.
///
/// # Errors
///
/// [`SpfError::Checkpoint`] for a missing, empty, truncated or corrupt file, a tensor whose bytes
/// do not match its shape and dtype, or a panic while burn decodes it.
pub fn load<B: Backend, R: Record<B>>(
    path: impl AsRef<Path>,
    device: &B::Device,
) -> Result<R, SpfError> {
    let target = file_of::<B>(path.as_ref());
    let bytes = fs::read(&target).map_err(|err| failure(&target, err))?;
    let value = rmpv::decode::read_value(&mut bytes.as_slice())
        .map_err(|err| failure(&target, format!("not MessagePack: {err}")))?;
    check_tensors(&value).map_err(|err| failure(&target, err))?;
    let recorder = CheckpointRecorder::new();
    match catch_unwind(AssertUnwindSafe(|| recorder.load(target.clone(), device))) {
        Ok(Ok(record)) => Ok(record),
        Ok(Err(err)) => Err(failure(&target, err)),
        Err(panic) => Err(failure(
            &target,
            format!("decoding panicked: {}", panic_message(&*panic)),
        )),
    }
}

fn file_of<B: Backend>(path: &Path) -> PathBuf {
    path.with_extension(<CheckpointRecorder as FileRecorder<B>>::file_extension())
}

/// Every map with `bytes`, `shape` and `dtype` keys is a tensor: its byte count must be the
/// product of its shape times its element size.
fn check_tensors(value: &Value) -> Result<(), String> {
    match value {
        Value::Map(entries) => {
            let field = |name: &str| {
                entries
                    .iter()
                    .find(|(key, _)| key.as_str() == Some(name))
                    .map(|(_, v)| v)
            };
            if let (Some(bytes), Some(shape), Some(dtype)) =
                (field("bytes"), field("shape"), field("dtype"))
            {
                return check_tensor(bytes, shape, dtype);
            }
            entries.iter().try_for_each(|(_, v)| check_tensors(v))
        }
        Value::Array(items) => items.iter().try_for_each(check_tensors),
        _ => Ok(()),
    }
}

fn check_tensor(bytes: &Value, shape: &Value, dtype: &Value) -> Result<(), String> {
    let bytes = match bytes {
        Value::Binary(bytes) => bytes.len(),
        _ => return Err("tensor bytes are not a byte string".into()),
    };
    let Value::Array(dims) = shape else {
        return Err("tensor shape is not an array".into());
    };
    let elements = dims.iter().try_fold(1u64, |n, dim| {
        dim.as_u64()
            .and_then(|d| n.checked_mul(d))
            .ok_or_else(|| "tensor shape is not a list of sizes".to_string())
    })?;
    let size = element_size(dtype).ok_or_else(|| format!("unsupported tensor dtype {dtype}"))?;
    let expected = elements
        .checked_mul(size)
        .ok_or_else(|| "tensor shape overflows".to_string())?;
    if expected != bytes as u64 {
        return Err(format!(
            "tensor of {elements} {dtype} elements holds {bytes} bytes, not {expected}"
        ));
    }
    Ok(())
}

/// Bytes per element of the dtypes a record holds; quantized tensors are not supported.
fn element_size(dtype: &Value) -> Option<u64> {
    match dtype {
        Value::String(name) => match name.as_str()? {
            "F64" | "I64" | "U64" => Some(8),
            "F32" | "Flex32" | "I32" | "U32" => Some(4),
            "F16" | "BF16" | "I16" | "U16" => Some(2),
            "I8" | "U8" => Some(1),
            _ => None,
        },
        // `Bool(BoolStore)` is a one-entry map; every store of 0.21 uses one byte per element.
        Value::Map(entries) if entries.len() == 1 && entries[0].0.as_str() == Some("Bool") => {
            Some(1)
        }
        _ => None,
    }
}

fn failure(path: &Path, err: impl ToString) -> SpfError {
    SpfError::Checkpoint {
        path: path.display().to_string(),
        message: err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestBackend;
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig, LinearRecord};

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("spf-{name}-{}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn layer(value: f32) -> Linear<TestBackend> {
        let device = Default::default();
        let layer = LinearConfig::new(3, 2).init::<TestBackend>(&device);
        let weight = layer.weight.val().ones_like().mul_scalar(value);
        Linear {
            weight: burn::module::Param::from_tensor(weight),
            bias: None,
        }
    }

    fn load_layer(path: &Path) -> Result<LinearRecord<TestBackend>, SpfError> {
        load(path, &Default::default())
    }

    fn weight_of(record: LinearRecord<TestBackend>) -> Vec<f32> {
        record.weight.val().into_data().to_vec().unwrap()
    }

    #[test]
    fn round_trip() {
        let dir = Scratch::new("round-trip");
        let path = dir.0.join("ckpt");
        let written = save_atomic(layer(2.0).into_record(), &path).unwrap();
        assert_eq!(written, dir.0.join("ckpt.mpk"));
        assert_eq!(weight_of(load_layer(&path).unwrap()), vec![2.0; 6]);
    }

    #[test]
    fn a_crash_before_the_rename_keeps_the_previous_checkpoint() {
        let dir = Scratch::new("crash");
        let path = dir.0.join("ckpt");
        save_atomic(layer(1.0).into_record(), &path).unwrap();

        // The crash: the new checkpoint is written but never renamed, then its file is torn.
        let partial = write_partial(layer(9.0).into_record(), &path).unwrap();
        let bytes = fs::read(&partial).unwrap();
        fs::write(&partial, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(
            weight_of(load_layer(&path).unwrap()),
            vec![1.0; 6],
            "previous checkpoint intact"
        );

        // The next save replaces the leftover partial file and lands.
        save_atomic(layer(3.0).into_record(), &path).unwrap();
        assert_eq!(weight_of(load_layer(&path).unwrap()), vec![3.0; 6]);
    }

    /// The checkpoint with the first tensor's shape `[3, 2]` turned into `[9, 2]`: still
    /// well-formed MessagePack, but its 24 bytes cannot hold 18 `f32`s.
    fn inflated(bytes: &[u8]) -> Vec<u8> {
        let mut value = rmpv::decode::read_value(&mut &bytes[..]).unwrap();
        fn grow(value: &mut Value) -> bool {
            match value {
                Value::Map(entries) => entries.iter_mut().any(|(key, v)| {
                    if key.as_str() == Some("shape")
                        && let Value::Array(dims) = v
                    {
                        dims[0] = Value::from(9u64);
                        return true;
                    }
                    grow(v)
                }),
                Value::Array(items) => items.iter_mut().any(grow),
                _ => false,
            }
        }
        assert!(grow(&mut value));
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &value).unwrap();
        out
    }

    #[test]
    fn unreadable_files_are_typed_errors() {
        let dir = Scratch::new("unreadable");
        let path = dir.0.join("ckpt");
        assert!(
            matches!(load_layer(&path), Err(SpfError::Checkpoint { .. })),
            "missing"
        );

        save_atomic(layer(1.0).into_record(), &path).unwrap();
        let file = path.with_extension("mpk");
        let bytes = fs::read(&file).unwrap();
        let corrupt: Vec<u8> = bytes.iter().map(|b| b ^ 0x5a).collect();
        for (what, content) in [
            ("empty", Vec::new()),
            ("truncated", bytes[..bytes.len() / 3].to_vec()),
            ("corrupt", corrupt),
            (
                "a tensor that claims more elements than it holds",
                inflated(&bytes),
            ),
        ] {
            fs::write(&file, content).unwrap();
            assert!(
                matches!(load_layer(&path), Err(SpfError::Checkpoint { .. })),
                "{what}"
            );
        }
    }
}
