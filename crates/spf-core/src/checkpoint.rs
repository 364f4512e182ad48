//! Crash-safe, validated checkpoint files in burnpack, burn 0.22's record format: the wrapper's
//! [`SpfRecord`], and burn's own module and optimizer records, which burn-train writes too.
//!
//! - **Saving.** [`save_atomic`] writes to a temporary file of its own in the same directory,
//!   flushes it to disk, and renames it over the target: a reader sees the old file or the new
//!   one, never a torn one.
//! - **Loading.** burn 0.21's ndarray backend built tensors from a record without checking that
//!   their bytes matched their shape, so a corrupt file corrupted the heap (found by this crate's
//!   record fuzzer). [`load`] therefore reads the burnpack container first and checks every
//!   tensor's byte count against its shape and dtype before burn builds anything from it.
//! - **Checksum.** A flipped bit inside a number passes those checks, so every file is saved
//!   with a CRC-32 of its entries, which [`load`] checks (`seal.rs`).
//!
//! Every failure (a missing, empty, truncated or corrupt file, a tensor that does not add up, a
//! checksum that does not match, a panic while decoding) is an [`SpfError::Checkpoint`].
//!
//! Paths follow burn's rule: the `.bpk` extension replaces any extension of `path`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use burn::optim::OptimizerRecord;
use burn::store::ModuleRecord;
use burn_pack::{Bytes, Reader};

use crate::error::{SpfError, panic_message};
use crate::record::SpfRecord;

pub(crate) mod seal;

/// A record that is saved as burnpack bytes: burn's [`ModuleRecord`] and [`OptimizerRecord`],
/// and the wrapper's [`SpfRecord`].
pub trait PackedRecord: Sized {
    /// The record as burnpack bytes.
    ///
    /// # Errors
    ///
    /// Why burn could not write it.
    fn into_pack(self) -> Result<Bytes, String>;

    /// The record that burnpack bytes hold; the bytes have passed [`load`]'s checks.
    ///
    /// # Errors
    ///
    /// Why they are not such a record.
    fn from_pack(bytes: Bytes) -> Result<Self, String>;
}

impl PackedRecord for ModuleRecord {
    fn into_pack(self) -> Result<Bytes, String> {
        self.into_bytes().map_err(|e| e.to_string())
    }

    fn from_pack(bytes: Bytes) -> Result<Self, String> {
        ModuleRecord::from_bytes(bytes).map_err(|e| e.to_string())
    }
}

impl PackedRecord for OptimizerRecord {
    fn into_pack(self) -> Result<Bytes, String> {
        self.into_bytes().map_err(|e| e.to_string())
    }

    fn from_pack(bytes: Bytes) -> Result<Self, String> {
        OptimizerRecord::from_bytes(bytes).map_err(|e| e.to_string())
    }
}

impl PackedRecord for SpfRecord {
    fn into_pack(self) -> Result<Bytes, String> {
        self.into_bytes()
    }

    fn from_pack(bytes: Bytes) -> Result<Self, String> {
        SpfRecord::from_reader(Reader::from_bytes(bytes).map_err(|e| e.to_string())?)
    }
}

/// Writes `record` to `path` (with the `.bpk` extension) atomically and durably; returns the
/// file written.
///
/// The record goes to a temporary file of its own in the same directory (named after `path`,
/// this process and a counter, so concurrent saves never share one), which is flushed to disk,
/// renamed over the target, and the directory is flushed so that the rename itself survives a
/// power loss. Concurrent saves to one path each land whole: the last rename wins.
///
/// # Errors
///
/// [`SpfError::Checkpoint`] when the record cannot be encoded, or the temporary file cannot be
/// written, flushed or renamed, or the directory cannot be flushed. The previous checkpoint at
/// `path` is then untouched, and the temporary file is removed.
pub fn save_atomic<R: PackedRecord>(
    record: R,
    path: impl AsRef<Path>,
) -> Result<PathBuf, SpfError> {
    let target = file_of(path.as_ref());
    let partial = write_partial(record, path.as_ref())?;
    if let Err(err) = fs::rename(&partial, &target) {
        let _ = fs::remove_file(&partial);
        return Err(failure(&target, err));
    }
    sync_parent(&target)
        .map_err(|err| failure(&target, format!("flushing its directory: {err}")))?;
    Ok(target)
}

/// The first half of [`save_atomic`]: the record written to a temporary file of this save's own
/// and flushed to disk. A crash after this leaves the previous checkpoint intact.
pub(crate) fn write_partial<R: PackedRecord>(record: R, path: &Path) -> Result<PathBuf, SpfError> {
    static SAVES: AtomicU64 = AtomicU64::new(0);
    let stem = path
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let save = SAVES.fetch_add(1, Ordering::Relaxed);
    let partial = path.with_file_name(format!(".{stem}-{}-{save}-partial", std::process::id()));
    let written = file_of(&partial);
    let bytes = record
        .into_pack()
        .and_then(seal::seal)
        .map_err(|err| failure(&written, err))?;
    let flushed = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&written)
        .and_then(|mut file| {
            file.write_all(&bytes)?;
            file.sync_all()
        })
        .map_err(|err| failure(&written, err));
    if let Err(err) = flushed {
        let _ = fs::remove_file(&written);
        return Err(err);
    }
    Ok(written)
}

/// Flushes the directory that holds `file` (the current directory for a bare file name), so that
/// a rename into it is on disk. Only Unix can open a directory for this; elsewhere the rename is
/// as durable as the platform makes it.
fn sync_parent(file: &Path) -> std::io::Result<()> {
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if cfg!(unix) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads a record written by [`save_atomic`], after checking every tensor in it. The tensors stay
/// host data; a module or optimizer that loads the record places them on its own devices.
///
/// # Errors
///
/// [`SpfError::Checkpoint`] for a missing, empty, truncated or corrupt file, a tensor whose bytes
/// do not match its shape and dtype, a file without a checksum or whose checksum does not match
/// its contents, or a panic while burn decodes it.
pub fn load<R: PackedRecord>(path: impl AsRef<Path>) -> Result<R, SpfError> {
    let target = file_of(path.as_ref());
    let bytes = fs::read(&target).map_err(|err| failure(&target, err))?;
    let decoded = catch_unwind(AssertUnwindSafe(|| {
        seal::verify(Bytes::from_bytes_vec(bytes.clone()))?;
        R::from_pack(Bytes::from_bytes_vec(bytes))
    }));
    match decoded {
        Ok(Ok(record)) => Ok(record),
        Ok(Err(err)) => Err(failure(&target, err)),
        Err(panic) => Err(failure(
            &target,
            format!("decoding panicked: {}", panic_message(&*panic)),
        )),
    }
}

fn file_of(path: &Path) -> PathBuf {
    path.with_extension(burn_pack::EXTENSION)
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
    use crate::testing::test_device;
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};

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

    fn layer(value: f32) -> Linear {
        let device = test_device();
        let layer = LinearConfig::new(3, 2).init(&device);
        let weight = layer.weight.val().ones_like().mul_scalar(value);
        Linear {
            weight: burn::module::Param::from_tensor(weight),
            bias: None,
        }
    }

    fn load_layer(path: &Path) -> Result<ModuleRecord, SpfError> {
        load(path)
    }

    /// The weight a record holds, read by loading it into a layer of its shape.
    fn weight_of(record: ModuleRecord) -> Vec<f32> {
        let layer = layer(0.0).load_record(record);
        layer.weight.val().into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn round_trip() {
        let dir = Scratch::new("round-trip");
        let path = dir.0.join("ckpt");
        let written = save_atomic(layer(2.0).into_record(), &path).unwrap();
        assert_eq!(written, dir.0.join("ckpt.bpk"));
        assert_eq!(weight_of(load_layer(&path).unwrap()), vec![2.0; 6]);
    }

    /// Files in `dir` whose name marks them as a save's temporary file.
    fn partial_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains("-partial"))
            .collect()
    }

    #[test]
    fn a_save_to_a_bare_file_name_lands_in_the_current_directory() {
        // The directory flush must not be skipped for a path without a parent (it was).
        let name = format!("spf-bare-{}", std::process::id());
        let written = save_atomic(layer(4.0).into_record(), &name).unwrap();
        assert_eq!(written, PathBuf::from(format!("{name}.bpk")));
        let loaded = weight_of(load_layer(Path::new(&name)).unwrap());
        fs::remove_file(&written).unwrap();
        assert_eq!(loaded, vec![4.0; 6]);
    }

    #[test]
    fn concurrent_saves_to_one_path_each_land_whole() {
        let dir = Scratch::new("concurrent");
        let path = dir.0.join("ckpt");
        std::thread::scope(|s| {
            for writer in 0..4 {
                let path = &path;
                s.spawn(move || {
                    for i in 0..5 {
                        let value = (10 * writer + i) as f32;
                        save_atomic(layer(value).into_record(), path).unwrap();
                    }
                });
            }
        });
        let weights = weight_of(load_layer(&path).unwrap());
        let value = weights[0];
        assert_eq!(weights, vec![value; 6], "one writer's record, whole");
        assert!(
            value.fract() == 0.0 && (0.0..35.0).contains(&value),
            "{value}"
        );
        assert_eq!(
            partial_files(&dir.0),
            Vec::<String>::new(),
            "no temporary file left"
        );
    }

    #[test]
    fn a_failed_rename_leaves_no_temporary_file() {
        let dir = Scratch::new("failed-rename");
        // The target is a non-empty directory, which a file cannot be renamed over.
        let path = dir.0.join("ckpt");
        fs::create_dir_all(path.with_extension("bpk").join("inside")).unwrap();
        let err = save_atomic(layer(1.0).into_record(), &path).unwrap_err();
        assert!(matches!(err, SpfError::Checkpoint { .. }), "{err}");
        assert_eq!(partial_files(&dir.0), Vec::<String>::new());
    }

    const CRASH_DIR: &str = "SPF_CHECKPOINT_CRASH_DIR";

    /// A process killed (SIGKILL) after writing its new checkpoint but before the rename leaves
    /// the previous checkpoint loadable, and the next save lands. Run as the test, it starts a
    /// copy of this test binary that runs only this test with [`CRASH_DIR`] set; that child
    /// saves once, writes a new checkpoint's temporary file, says so, and waits to be killed.
    #[test]
    fn a_save_killed_between_write_and_rename_keeps_the_previous_checkpoint() {
        if let Some(dir) = std::env::var_os(CRASH_DIR) {
            let path = PathBuf::from(dir).join("ckpt");
            save_atomic(layer(1.0).into_record(), &path).unwrap();
            write_partial(layer(9.0).into_record(), &path).unwrap();
            fs::write(path.with_file_name("written"), b"").unwrap();
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        let dir = Scratch::new("killed");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "checkpoint::tests::a_save_killed_between_write_and_rename_keeps_the_previous_checkpoint",
                "--test-threads=1",
            ])
            .env(CRASH_DIR, &dir.0)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let marker = dir.0.join("written");
        let started = std::time::Instant::now();
        while !marker.exists() {
            assert!(
                started.elapsed().as_secs() < 120,
                "the child never wrote its checkpoint"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "the child exited early"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();

        let path = dir.0.join("ckpt");
        assert_eq!(
            partial_files(&dir.0).len(),
            1,
            "the killed save's temporary file"
        );
        assert_eq!(
            weight_of(load_layer(&path).unwrap()),
            vec![1.0; 6],
            "the previous checkpoint loads"
        );
        save_atomic(layer(3.0).into_record(), &path).unwrap();
        assert_eq!(weight_of(load_layer(&path).unwrap()), vec![3.0; 6]);
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

    /// `bytes`, a saved `[3, 2]` layer, with the shape in its metadata changed to `[9, 2]`:
    /// still a well-formed container, but its 24 bytes cannot hold 18 `f32`s. (burn-pack's
    /// writer refuses to write such a file, so it is made by hand: the CBOR array `[3, 2]` is the
    /// bytes `82 03 02`.)
    fn inflated(bytes: &[u8]) -> Vec<u8> {
        let at = bytes
            .windows(3)
            .position(|w| w == [0x82, 0x03, 0x02])
            .expect("the shape [3, 2] in the metadata");
        let mut out = bytes.to_vec();
        out[at + 1] = 0x09;
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
        let file = path.with_extension("bpk");
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
