//! Crash-safe checkpoints around burn's file recorders.
//!
//! burn's file recorders delete an existing file before writing its replacement, so a crash in
//! between loses the previous checkpoint. [`save_atomic`] writes to a temporary file in the same
//! directory, flushes it to disk, and renames it over the target: a reader sees the old file or
//! the new one, never a torn one. [`load`] turns every failure of reading a record back — a
//! missing, empty, truncated or corrupt file — into [`SpfError::Checkpoint`], including panics
//! raised while decoding it.
//!
//! Paths follow burn's rule: the recorder's extension replaces any extension of `path`.

use std::fs::{self, File};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use burn::record::{FileRecorder, Record};
use burn::tensor::backend::Backend;

use crate::SpfError;
use crate::error::panic_message;

/// Writes `record` to `path` (with the recorder's extension) atomically; returns the file written.
///
/// # Errors
///
/// [`SpfError::Checkpoint`] when the temporary file cannot be written, flushed or renamed. The
/// previous checkpoint at `path` is then untouched.
pub fn save_atomic<B, R, FR>(
    recorder: &FR,
    record: R,
    path: impl AsRef<Path>,
) -> Result<PathBuf, SpfError>
where
    B: Backend,
    R: Record<B>,
    FR: FileRecorder<B>,
{
    let target = path.as_ref().with_extension(FR::file_extension());
    let partial = write_partial(recorder, record, path.as_ref())?;
    fs::rename(&partial, &target).map_err(|err| failure(&target, err))?;
    if let Some(dir) = target.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        // Persist the rename itself; not every platform can open a directory, so this is best effort.
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(target)
}

/// The first half of [`save_atomic`]: the record written and flushed to the temporary file that
/// the rename will move into place. A crash after this leaves the previous checkpoint intact.
pub(crate) fn write_partial<B, R, FR>(
    recorder: &FR,
    record: R,
    path: &Path,
) -> Result<PathBuf, SpfError>
where
    B: Backend,
    R: Record<B>,
    FR: FileRecorder<B>,
{
    let stem = path
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    // A leading dot and no extension: burn's recorder appends its own extension to this name.
    let partial = path.with_file_name(format!(".{stem}-partial"));
    recorder
        .record(record, partial.clone())
        .map_err(|err| failure(&partial, err))?;
    let written = partial.with_extension(FR::file_extension());
    File::open(&written)
        .and_then(|file| file.sync_all())
        .map_err(|err| failure(&written, err))?;
    Ok(written)
}

/// Reads a record written by [`save_atomic`] (or by the recorder itself) onto `device`.
///
/// # Errors
///
/// [`SpfError::Checkpoint`] for a missing, empty, truncated or corrupt file, whether the recorder
/// reports it or panics on it.
pub fn load<B, R, FR>(
    recorder: &FR,
    path: impl AsRef<Path>,
    device: &B::Device,
) -> Result<R, SpfError>
where
    B: Backend,
    R: Record<B>,
    FR: FileRecorder<B>,
{
    let target = path.as_ref().with_extension(FR::file_extension());
    match catch_unwind(AssertUnwindSafe(|| recorder.load(target.clone(), device))) {
        Ok(Ok(record)) => Ok(record),
        Ok(Err(err)) => Err(failure(&target, err)),
        Err(panic) => Err(failure(
            &target,
            format!("decoding panicked: {}", panic_message(&*panic)),
        )),
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
    use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};

    type Recorder = NamedMpkFileRecorder<FullPrecisionSettings>;

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
        load(&Recorder::new(), path, &Default::default())
    }

    fn weight_of(record: LinearRecord<TestBackend>) -> Vec<f32> {
        record.weight.val().into_data().to_vec().unwrap()
    }

    #[test]
    fn round_trip() {
        let dir = Scratch::new("round-trip");
        let path = dir.0.join("ckpt");
        let written = save_atomic(&Recorder::new(), layer(2.0).into_record(), &path).unwrap();
        assert_eq!(written, dir.0.join("ckpt.mpk"));
        assert_eq!(weight_of(load_layer(&path).unwrap()), vec![2.0; 6]);
    }

    #[test]
    fn a_crash_before_the_rename_keeps_the_previous_checkpoint() {
        let dir = Scratch::new("crash");
        let path = dir.0.join("ckpt");
        save_atomic(&Recorder::new(), layer(1.0).into_record(), &path).unwrap();

        // The crash: the new checkpoint is written but never renamed, then its file is torn.
        let partial = write_partial(&Recorder::new(), layer(9.0).into_record(), &path).unwrap();
        let bytes = fs::read(&partial).unwrap();
        fs::write(&partial, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(
            weight_of(load_layer(&path).unwrap()),
            vec![1.0; 6],
            "previous checkpoint intact"
        );

        // The next save replaces the leftover partial file and lands.
        save_atomic(&Recorder::new(), layer(3.0).into_record(), &path).unwrap();
        assert_eq!(weight_of(load_layer(&path).unwrap()), vec![3.0; 6]);
    }

    #[test]
    fn unreadable_files_are_typed_errors() {
        let dir = Scratch::new("unreadable");
        let path = dir.0.join("ckpt");
        assert!(
            matches!(load_layer(&path), Err(SpfError::Checkpoint { .. })),
            "missing"
        );

        save_atomic(&Recorder::new(), layer(1.0).into_record(), &path).unwrap();
        let file = path.with_extension("mpk");
        let bytes = fs::read(&file).unwrap();
        let corrupt: Vec<u8> = bytes.iter().map(|b| b ^ 0x5a).collect();
        for (what, content) in [
            ("empty", Vec::new()),
            ("truncated", bytes[..bytes.len() / 3].to_vec()),
            ("corrupt", corrupt),
        ] {
            fs::write(&file, content).unwrap();
            assert!(
                matches!(load_layer(&path), Err(SpfError::Checkpoint { .. })),
                "{what}"
            );
        }
    }
}
