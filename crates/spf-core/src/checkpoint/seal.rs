//! A checkpoint's checksum: a CRC-32 of every entry of its burnpack container (metadata,
//! scalars, and each tensor's name, dtype, shape, parameter id and bytes), kept in the
//! container's metadata under [`CHECKSUM_KEY`].
//!
//! The format checks of [`load`](super::load) catch a file that is cut short or whose structure
//! is broken, but not a flipped bit inside a number: that gives a valid file with another value,
//! such as an Adam second moment turned negative, whose next step writes NaN into the weights
//! (found by the record fuzzer). CRC-32 detects every error of up to 32 consecutive bits and
//! misses a random corruption with probability 2⁻³². The padding between burnpack's aligned
//! sections is not an entry, so a flip there changes nothing read and is not refused.

use std::collections::BTreeMap;

use burn_pack::{Bytes, Reader, Scalar, Tensor, Writer};
use crc32fast::Hasher;

use crate::record::pack::{Parts, checked};

/// The metadata entry that holds the checksum, in hexadecimal.
pub(crate) const CHECKSUM_KEY: &str = "spf.crc32";

/// The burnpack container `bytes` with its checksum added (replacing any it had).
///
/// # Errors
///
/// When `bytes` are not a burnpack container whose tensors fit their shapes.
pub(crate) fn seal(bytes: Bytes) -> Result<Bytes, String> {
    let (mut metadata, scalars, tensors) = entries(bytes)?;
    metadata.remove(CHECKSUM_KEY);
    let checksum = digest(&metadata, &scalars, &tensors);
    let tensors = tensors
        .into_iter()
        .map(|(name, dtype, shape, param, bytes)| Tensor::new(name, dtype, shape, param, bytes))
        .collect();
    let mut writer = Writer::new(tensors);
    for (key, value) in &metadata {
        writer = writer.with_metadata(key, value);
    }
    writer = writer.with_metadata(CHECKSUM_KEY, &format!("{checksum:08x}"));
    for (key, value) in scalars {
        writer = writer.with_scalar(&key, value);
    }
    writer.into_bytes().map_err(|e| e.to_string())
}

/// Checks that `bytes` are a sealed burnpack container whose entries match its checksum and whose
/// every tensor's bytes are its shape's element count times its dtype's size.
///
/// # Errors
///
/// Why they are not: not burnpack, a tensor that does not fit its shape, no checksum, or a
/// checksum that does not match the contents.
pub(crate) fn verify(bytes: Bytes) -> Result<(), String> {
    let (mut metadata, scalars, tensors) = entries(bytes)?;
    let Some(saved) = metadata.remove(CHECKSUM_KEY) else {
        return Err("the file has no checksum: it was not written by spf's `save_atomic`".into());
    };
    let checksum = digest(&metadata, &scalars, &tensors);
    if format!("{checksum:08x}") != saved {
        return Err(format!(
            "the file is corrupt: its contents give checksum {checksum:08x}, not the {saved} \
             it was saved with"
        ));
    }
    Ok(())
}

/// A container's metadata, scalars and tensors, each tensor checked against its shape.
type Entries = (
    BTreeMap<String, String>,
    BTreeMap<String, Scalar>,
    Vec<Parts>,
);

fn entries(bytes: Bytes) -> Result<Entries, String> {
    let reader = Reader::from_bytes(bytes).map_err(|e| format!("not burnpack: {e}"))?;
    let metadata = reader.metadata().clone();
    let scalars = reader.scalars().clone();
    let tensors = reader
        .into_tensors()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(checked)
        .collect::<Result<_, _>>()?;
    Ok((metadata, scalars, tensors))
}

/// The CRC-32 of the entries (`metadata` without [`CHECKSUM_KEY`]), each field length-prefixed
/// so that no two containers share an encoding.
fn digest(
    metadata: &BTreeMap<String, String>,
    scalars: &BTreeMap<String, Scalar>,
    tensors: &[Parts],
) -> u32 {
    let mut hasher = Hasher::new();
    let mut field = |bytes: &[u8]| {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    for (key, value) in metadata {
        field(key.as_bytes());
        field(value.as_bytes());
    }
    for (key, value) in scalars {
        field(key.as_bytes());
        let (tag, value) = match *value {
            Scalar::Int(v) => (0u8, v.to_le_bytes()),
            Scalar::UInt(v) => (1, v.to_le_bytes()),
            Scalar::Float(v) => (2, v.to_le_bytes()),
            Scalar::Bool(v) => (3, u64::from(v).to_le_bytes()),
        };
        field(&[tag]);
        field(&value);
    }
    for (name, dtype, shape, param, bytes) in tensors {
        field(name.as_bytes());
        field(format!("{dtype:?}").as_bytes());
        let dims: Vec<u8> = shape
            .iter()
            .flat_map(|d| (*d as u64).to_le_bytes())
            .collect();
        field(&dims);
        field(&param.map_or_else(Vec::new, |p| p.to_le_bytes().to_vec()));
        field(bytes);
    }
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    /// A container of one tensor `w` holding `values`, a metadata entry and a `steps` scalar,
    /// with `checksum` written in as it is.
    fn container(values: [f32; 2], steps: u64, checksum: Option<&str>) -> Bytes {
        let (bytes, shape, dtype) = TensorData::new(values.to_vec(), [2]).into_parts();
        let tensor = Tensor::new("w".into(), dtype, shape, Some(3), bytes);
        let mut writer = Writer::new(vec![tensor])
            .with_metadata("kind", "test")
            .with_scalar("steps", Scalar::UInt(steps));
        if let Some(checksum) = checksum {
            writer = writer.with_metadata(CHECKSUM_KEY, checksum);
        }
        writer.into_bytes().unwrap()
    }

    fn checksum_of(sealed: Bytes) -> String {
        Reader::from_bytes(sealed).unwrap().metadata()[CHECKSUM_KEY].clone()
    }

    #[test]
    fn a_sealed_container_verifies_and_reads_as_before() {
        let sealed = seal(container([1.0, -2.0], 5, None)).unwrap();
        verify(sealed.clone()).unwrap();
        let reader = Reader::from_bytes(sealed).unwrap();
        assert_eq!(reader.metadata()["kind"], "test");
        assert_eq!(reader.scalars()["steps"], Scalar::UInt(5));
        let tensor = reader.into_tensors().unwrap().remove(0);
        let (_, _, _, param, bytes) = tensor.into_parts().unwrap();
        assert_eq!(param, Some(3));
        let expected = TensorData::new(vec![1.0f32, -2.0], [2]).into_parts().0;
        assert_eq!(&bytes[..], &expected[..]);
    }

    #[test]
    fn a_changed_value_or_scalar_and_an_unsealed_file_are_refused() {
        let checksum = checksum_of(seal(container([1.0, -2.0], 5, None)).unwrap());
        verify(container([1.0, -2.0], 5, Some(&checksum))).unwrap();
        // The sign bit of one value flipped, then a counter changed, under the saved checksum.
        let error = verify(container([1.0, 2.0], 5, Some(&checksum))).unwrap_err();
        assert!(error.contains("corrupt"), "{error}");
        assert!(verify(container([1.0, -2.0], 6, Some(&checksum))).is_err());
        let error = verify(container([1.0, -2.0], 5, None)).unwrap_err();
        assert!(error.contains("no checksum"), "{error}");
        // Sealing again replaces the saved checksum.
        let resealed = seal(container([1.0, 2.0], 5, Some(&checksum))).unwrap();
        verify(resealed).unwrap();
    }
}
