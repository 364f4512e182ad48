//! An [`SpfRecord`] as a burnpack container, burn 0.22's record format: the bases as tensors
//! tagged with their parameter id, the counters as scalars, the module paths and the last
//! refresh error as metadata, and the inner optimizer's own burnpack record, whole, as a byte
//! tensor. Reading checks every entry, so a truncated or foreign file is a typed error.

use std::collections::BTreeMap;

use burn::optim::OptimizerRecord;
use burn::tensor::{DType, TensorData};
use burn_pack::{Bytes, Reader, Scalar, Tensor, Writer};

use super::{BasisRecord, ParamPath, SpfRecord};

/// The metadata entry that marks a container as an SPF record.
const FORMAT_KEY: &str = "spf.format";
const FORMAT: &str = "spf-record";
/// The tensor holding the inner optimizer's record.
const INNER: &str = "inner";
/// Prefixes of the per-parameter entries.
const PARAM_PREFIX: &str = "param.";
const BASIS_PREFIX: &str = "basis.";
const LAST_ERROR_KEY: &str = "refresh.last_error";

/// Why bytes are not an SPF record; the caller names the file.
pub(crate) type PackError = String;

impl SpfRecord {
    /// The record as a burnpack container in memory.
    ///
    /// # Errors
    ///
    /// When burn cannot write the inner optimizer's record or the container.
    pub(crate) fn into_writer(self) -> Result<Writer, PackError> {
        let scalars = self.scalars();
        let inner = self.inner.into_bytes().map_err(|e| e.to_string())?;
        let inner_len = inner.len();
        let mut tensors = vec![Tensor::new(
            INNER.into(),
            DType::U8,
            vec![inner_len],
            None,
            inner,
        )];
        for basis in &self.bases {
            for (factor, data) in [("u", &basis.u), ("sigma", &basis.sigma), ("v", &basis.v)] {
                let (bytes, shape, dtype) = data.clone().into_parts();
                let name = format!("{BASIS_PREFIX}{}.{factor}", basis.param);
                tensors.push(Tensor::new(name, dtype, shape, Some(basis.param), bytes));
            }
        }
        let mut writer = Writer::new(tensors).with_metadata(FORMAT_KEY, FORMAT);
        for param in &self.params {
            writer = writer.with_metadata(&format!("{PARAM_PREFIX}{}", param.param), &param.path);
        }
        if let Some(error) = &self.refresh_last_error {
            writer = writer.with_metadata(LAST_ERROR_KEY, error);
        }
        for (key, value) in scalars {
            writer = writer.with_scalar(key, value);
        }
        Ok(writer)
    }

    /// The record in burnpack bytes.
    ///
    /// # Errors
    ///
    /// As [`Self::into_writer`].
    pub(crate) fn into_bytes(self) -> Result<Bytes, PackError> {
        self.into_writer()?.into_bytes().map_err(|e| e.to_string())
    }

    /// The record a burnpack container holds.
    ///
    /// # Errors
    ///
    /// When the container is not an SPF record, or an entry is missing, of the wrong type, or
    /// its bytes do not match its shape and type.
    pub(crate) fn from_reader(reader: Reader) -> Result<Self, PackError> {
        let metadata = reader.metadata().clone();
        if metadata.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
            return Err("not an SPF record (no SPF format mark)".into());
        }
        let scalars = reader.scalars().clone();
        let mut inner = None;
        let mut factors: BTreeMap<u64, [Option<TensorData>; 3]> = BTreeMap::new();
        for tensor in reader.into_tensors().map_err(|e| e.to_string())? {
            let (name, dtype, shape, param, bytes) = checked(tensor)?;
            if name == INNER {
                let record = inner_record(bytes)
                    .map_err(|e| format!("the inner optimizer's record: {e}"))?;
                inner = Some(record);
                continue;
            }
            let factor = name
                .strip_prefix(BASIS_PREFIX)
                .and_then(|rest| rest.rsplit_once('.'))
                .and_then(|(id, factor)| {
                    let index = ["u", "sigma", "v"].iter().position(|f| *f == factor)?;
                    Some((id.parse::<u64>().ok()?, index))
                });
            let Some((id, index)) = factor.filter(|(id, _)| param == Some(*id)) else {
                return Err(format!("unexpected tensor `{name}`"));
            };
            let slot = &mut factors.entry(id).or_default()[index];
            if slot
                .replace(TensorData::from_bytes(bytes, shape, dtype))
                .is_some()
            {
                return Err(format!("tensor `{name}` appears twice"));
            }
        }
        let bases = factors
            .into_iter()
            .map(|(param, [u, sigma, v])| match (u, sigma, v) {
                (Some(u), Some(sigma), Some(v)) => Ok(BasisRecord { param, u, sigma, v }),
                _ => Err(format!("the basis of parameter {param} lacks a factor")),
            })
            .collect::<Result<Vec<_>, PackError>>()?;
        let mut params = Vec::new();
        for (key, path) in &metadata {
            if let Some(id) = key.strip_prefix(PARAM_PREFIX) {
                let param = id
                    .parse()
                    .map_err(|_| format!("bad parameter entry `{key}`"))?;
                params.push(ParamPath {
                    param,
                    path: path.clone(),
                });
            }
        }
        params.sort_by_key(|p| p.param);
        let counts = Counts(&scalars);
        Ok(SpfRecord {
            version: counts.required("version")?,
            inner: inner.ok_or("the inner optimizer's record is missing")?,
            params,
            steps: counts.required("steps")?,
            bases,
            refreshes: counts.required("refresh.count")?,
            refresh_failures: counts.required("refresh.failures")?,
            refresh_since: counts.optional("refresh.since")?,
            refresh_period: counts.optional("refresh.period")?,
            refresh_last_overlap: match scalars.get("refresh.last_overlap") {
                None => None,
                Some(Scalar::Float(value)) => Some(*value),
                Some(_) => return Err("`refresh.last_overlap` is not a float".into()),
            },
            refresh_last_error: metadata.get(LAST_ERROR_KEY).cloned(),
            non_finite_total: counts.required("non_finite.total")?,
            skipped_steps: counts.required("non_finite.skipped_steps")?,
        })
    }

    /// The counters, by key; an absent optional counter has no entry.
    fn scalars(&self) -> Vec<(&'static str, Scalar)> {
        let mut scalars = vec![
            ("version", Scalar::from(self.version)),
            ("steps", Scalar::from(self.steps)),
            ("refresh.count", Scalar::from(self.refreshes)),
            ("refresh.failures", Scalar::from(self.refresh_failures)),
            ("non_finite.total", Scalar::from(self.non_finite_total)),
            ("non_finite.skipped_steps", Scalar::from(self.skipped_steps)),
        ];
        let optional = [
            ("refresh.since", self.refresh_since.map(Scalar::from)),
            ("refresh.period", self.refresh_period.map(Scalar::from)),
            (
                "refresh.last_overlap",
                self.refresh_last_overlap.map(Scalar::from),
            ),
        ];
        scalars.extend(
            optional
                .into_iter()
                .filter_map(|(key, value)| Some((key, value?))),
        );
        scalars
    }
}

/// Reads whole-number counters out of a container's scalars.
struct Counts<'a>(&'a BTreeMap<String, Scalar>);

impl Counts<'_> {
    fn optional<T: TryFrom<Scalar>>(&self, key: &str) -> Result<Option<T>, PackError> {
        self.0
            .get(key)
            .map(|value| T::try_from(*value).map_err(|_| format!("`{key}` is not a count")))
            .transpose()
    }

    fn required<T: TryFrom<Scalar>>(&self, key: &str) -> Result<T, PackError> {
        self.optional(key)?
            .ok_or_else(|| format!("`{key}` is missing"))
    }
}

/// The inner optimizer's record in `bytes`, each tensor checked against its shape and dtype,
/// refused when a tensor carries no parameter id: burn's `ModuleOptimizer::load_record` panics
/// on such a tensor, which a corrupt or foreign record can hold (the record fuzzer cleared one
/// with a bit flip).
fn inner_record(bytes: Bytes) -> Result<OptimizerRecord, String> {
    let reader = Reader::from_bytes(bytes.clone()).map_err(|e| format!("not burnpack: {e}"))?;
    for tensor in reader.into_tensors().map_err(|e| e.to_string())? {
        let (name, _, _, param, _) = checked(tensor)?;
        if param.is_none() {
            return Err(format!("tensor `{name}` carries no parameter id"));
        }
    }
    OptimizerRecord::from_bytes(bytes).map_err(|e| e.to_string())
}

/// A container's tensor: its name, dtype, shape, parameter id and bytes.
pub(crate) type Parts = (String, DType, Vec<usize>, Option<u64>, Bytes);

/// A container's tensor as its parts, refused unless its bytes fit its shape and dtype.
pub(crate) fn checked(tensor: Tensor) -> Result<Parts, String> {
    let (name, dtype, shape, param, bytes) = tensor.into_parts().map_err(|e| e.to_string())?;
    let shape = shape.to_vec();
    let expected = shape
        .iter()
        .try_fold(dtype.size(), |n, d| n.checked_mul(*d));
    if expected != Some(bytes.len()) {
        return Err(format!(
            "tensor `{name}` holds {} bytes, not a {dtype:?} tensor of shape {shape:?}",
            bytes.len()
        ));
    }
    Ok((name, dtype, shape, param, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An inner record as burn writes it: one tensor, tagged with parameter `param`.
    fn inner_bytes(param: Option<u64>) -> Bytes {
        let data = TensorData::new(vec![1.0f32, 2.0], [2]);
        let (bytes, shape, dtype) = data.into_parts();
        let tensor = Tensor::new("7.moment_1".into(), dtype, shape, param, bytes);
        Writer::new(vec![tensor]).into_bytes().unwrap()
    }

    #[test]
    fn an_inner_tensor_without_a_parameter_id_is_refused() {
        assert!(inner_record(inner_bytes(Some(7))).is_ok());
        let error = inner_record(inner_bytes(None)).unwrap_err();
        assert!(error.contains("carries no parameter id"), "{error}");
    }
}
