//! safetensors as a [`TensorSource`] and [`TensorSink`] (F32, F16 and BF16 tensors).
//!
//! The header is parsed and validated by the `safetensors` crate (contiguous, non-overlapping
//! offsets whose lengths match dtype × shape); this module adds what that crate can only check
//! with the whole file in memory: that the data section ends exactly where the file ends. Tensor
//! data is read one tensor at a time, never the whole file. Every refusal is one line naming the
//! file and the problem.
//!
//! Format: <https://github.com/huggingface/safetensors#format>. The `__metadata__` string map is
//! exposed through [`MetadataSource`] (all values are strings).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use equicrypt_core::{MetaValue, MetadataSource};
use safetensors::tensor::{Metadata, TensorInfo as StInfo};
use safetensors::Dtype;

use crate::source::{TensorInfo, TensorSink, TensorSource};
use crate::ModelError;

/// Largest header accepted (the `safetensors` crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

fn to_ggml(d: Dtype) -> Option<GgmlDType> {
    match d {
        Dtype::F32 => Some(GgmlDType::F32),
        Dtype::F16 => Some(GgmlDType::F16),
        Dtype::BF16 => Some(GgmlDType::BF16),
        _ => None,
    }
}

fn to_st(d: GgmlDType) -> Option<Dtype> {
    match d {
        GgmlDType::F32 => Some(Dtype::F32),
        GgmlDType::F16 => Some(Dtype::F16),
        GgmlDType::BF16 => Some(Dtype::BF16),
        _ => None,
    }
}

/// Whether a tensor is an integer position-index buffer (`…position_ids`, `0..n` that
/// transformers rebuilds at load time; older BERT checkpoints carry it): not a model weight.
fn is_position_index_buffer(name: &str, dtype: Dtype) -> bool {
    (name == "position_ids" || name.ends_with(".position_ids"))
        && matches!(dtype, Dtype::I64 | Dtype::I32)
}

/// An opened, validated safetensors file.
///
/// Integer position-index buffers ([`SafetensorsSource::dropped_buffers`]) are left out of its
/// tensors: encryption does not carry them, and transformers rebuilds them. Any other tensor of
/// a type without a permutation rule (integers, F64, …) is an error naming it.
#[derive(Debug)]
pub struct SafetensorsSource {
    path: PathBuf,
    file: File,
    data_start: u64,
    /// Tensors in the order of their data, with their offsets into the data section.
    tensors: Vec<(TensorInfo, u64)>,
    metadata: HashMap<String, String>,
    /// Index into `tensors` of the last tensor a ranged read named (a lookup hint).
    last: usize,
    /// Position-index buffers left out of `tensors`.
    dropped: Vec<String>,
}

impl SafetensorsSource {
    /// Opens and validates `path`.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let corrupt = |m: String| ModelError::Corrupt(format!("{}: {m}", path.display()));
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let mut n = [0u8; 8];
        if len < 8 {
            return Err(corrupt(format!(
                "truncated file: {len} bytes, shorter than the 8-byte header length"
            )));
        }
        file.read_exact(&mut n)
            .map_err(|e| ModelError::io(path, e))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER {
            return Err(corrupt(format!(
                "header length {n} is larger than {MAX_HEADER} bytes"
            )));
        }
        if 8 + n > len {
            return Err(corrupt(format!(
                "truncated file: the header needs {n} bytes, only {} follow",
                len - 8
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| ModelError::io(path, e))?;
        let meta: Metadata = serde_json::from_slice(&header).map_err(|e| {
            let reason = e.to_string();
            let reason = reason.lines().next().unwrap_or("").to_string();
            corrupt(format!("not a valid safetensors header ({reason})"))
        })?;
        let data_start = 8 + n;
        let data_len = meta.data_len() as u64;
        let have = len - data_start;
        if data_len > have {
            return Err(corrupt(format!(
                "truncated file: tensor data needs {data_len} bytes, only {have} follow the header"
            )));
        }
        if data_len < have {
            return Err(corrupt(format!(
                "{} bytes after the last tensor's data",
                have - data_len
            )));
        }
        let mut tensors = Vec::new();
        let mut dropped = Vec::new();
        for name in meta.offset_keys() {
            let info: &StInfo = meta
                .info(&name)
                .ok_or_else(|| ModelError::Internal(format!("tensor '{name}' vanished")))?;
            if is_position_index_buffer(&name, info.dtype) {
                dropped.push(name.clone());
                continue;
            }
            let dtype = to_ggml(info.dtype).ok_or_else(|| {
                ModelError::UnsupportedTensorType(format!("{:?} (tensor '{name}')", info.dtype))
            })?;
            let (s, e) = info.data_offsets;
            let elems = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let want = elems.and_then(|x| x.checked_mul(dtype.type_size()));
            if want != Some(e - s) {
                return Err(corrupt(format!(
                    "tensor '{name}': {} bytes do not match {:?} × {:?}",
                    e - s,
                    info.dtype,
                    info.shape
                )));
            }
            tensors.push((
                TensorInfo {
                    name: name.clone(),
                    dtype,
                    dims: info.shape.clone(),
                    size: (e - s) as u64,
                },
                s as u64,
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start,
            tensors,
            metadata: meta.metadata().clone().unwrap_or_default(),
            last: 0,
            dropped,
        })
    }

    /// Integer position-index buffers the file holds but [`TensorSource::tensor_infos`] leaves
    /// out (see [`SafetensorsSource`]).
    pub fn dropped_buffers(&self) -> &[String] {
        &self.dropped
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` string map.
    pub fn string_metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }
}

impl TensorSource for SafetensorsSource {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.tensors.iter().map(|(t, _)| t.clone()).collect()
    }

    fn read_tensor_bytes(&mut self, name: &str) -> Result<Vec<u8>, ModelError> {
        let i = crate::source::find_tensor(&self.tensors, |(t, _)| &t.name, &mut self.last, name)?;
        let mut buf = vec![0u8; self.tensors[i].0.size as usize];
        self.read_tensor_range(name, 0, &mut buf)?;
        Ok(buf)
    }

    /// One seek and one `read_exact` into `buf` (the file is read, never mapped).
    fn read_tensor_range(
        &mut self,
        name: &str,
        byte_offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ModelError> {
        let i = crate::source::find_tensor(&self.tensors, |(t, _)| &t.name, &mut self.last, name)?;
        let (info, off) = &self.tensors[i];
        crate::source::check_range(name, info.size, byte_offset, buf.len())?;
        self.file
            .seek(SeekFrom::Start(self.data_start + off + byte_offset))
            .and_then(|_| self.file.read_exact(buf))
            .map_err(|e| ModelError::Io {
                path: format!("{} (tensor '{name}')", self.path.display()),
                source: e,
            })
    }

    fn metadata(&self) -> &dyn MetadataSource {
        self
    }
}

impl MetadataSource for SafetensorsSource {
    fn meta_value(&self, key: &str) -> Option<MetaValue<'_>> {
        self.metadata.get(key).map(|s| MetaValue::Str(s))
    }

    fn tensor_dims(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors
            .iter()
            .find(|(t, _)| t.name == name)
            .map(|(t, _)| t.dims.clone())
    }
}

/// Streams a safetensors file: header first, then each tensor's bytes in declared order (whole or
/// in parts), into a temporary file next to the destination that [`TensorSink::finish`] renames
/// into place; after any error it refuses to finish, and dropping it removes the temporary file.
pub struct SafetensorsSink {
    out: BufWriter<tempfile::NamedTempFile>,
    dest: PathBuf,
    order: crate::source::SinkOrder,
}

impl SafetensorsSink {
    /// Creates the temporary file next to `dest` and writes the header for `headers` (F32, F16
    /// or BF16 tensors, data in this order) and the `__metadata__` map `metadata`.
    pub fn create(
        dest: &Path,
        metadata: &HashMap<String, String>,
        headers: Vec<TensorInfo>,
    ) -> Result<Self, ModelError> {
        let mut infos = Vec::with_capacity(headers.len());
        let mut offset = 0usize;
        for h in &headers {
            let dtype = to_st(h.dtype).ok_or_else(|| {
                ModelError::UnsupportedTensorType(format!(
                    "{:?} (tensor '{}'): safetensors holds F32, F16 and BF16 only",
                    h.dtype, h.name
                ))
            })?;
            let elems: usize = h.dims.iter().product();
            if (elems * h.dtype.type_size()) as u64 != h.size {
                return Err(ModelError::ShapeMismatch(format!(
                    "tensor '{}': {} bytes do not match {:?} × {:?}",
                    h.name, h.size, h.dtype, h.dims
                )));
            }
            let end = offset + h.size as usize;
            infos.push((
                h.name.clone(),
                StInfo {
                    dtype,
                    shape: h.dims.clone(),
                    data_offsets: (offset, end),
                },
            ));
            offset = end;
        }
        let meta = Metadata::new((!metadata.is_empty()).then(|| metadata.clone()), infos)
            .map_err(|e| ModelError::Internal(format!("safetensors header: {e}")))?;
        let mut header = serde_json::to_vec(&meta)
            .map_err(|e| ModelError::Internal(format!("safetensors header: {e}")))?;
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".equicrypt-")
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(|e| ModelError::io(dest, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, tmp);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(&header))
            .map_err(|e| ModelError::io(dest, e))?;
        Ok(Self {
            out,
            dest: dest.to_path_buf(),
            order: crate::source::SinkOrder::new(headers),
        })
    }
}

impl TensorSink for SafetensorsSink {
    fn begin_tensor(&mut self, name: &str) -> Result<(), ModelError> {
        self.order.begin(name)
    }

    fn write_part(&mut self, data: &[u8]) -> Result<(), ModelError> {
        self.order.part(data.len())?;
        let r = self
            .out
            .write_all(data)
            .map_err(|e| ModelError::io(&self.dest, e));
        self.order.guard(r)
    }

    fn end_tensor(&mut self) -> Result<(), ModelError> {
        self.order.end()
    }

    fn finish(self) -> Result<(), ModelError> {
        crate::source::persist_atomically(self.out, &self.dest, &self.order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers() -> Vec<TensorInfo> {
        vec![
            TensorInfo {
                name: "a.weight".into(),
                dtype: GgmlDType::F32,
                dims: vec![2, 3],
                size: 24,
            },
            TensorInfo {
                name: "b.weight".into(),
                dtype: GgmlDType::F16,
                dims: vec![4],
                size: 8,
            },
            TensorInfo {
                name: "c.weight".into(),
                dtype: GgmlDType::BF16,
                dims: vec![1, 2],
                size: 4,
            },
        ]
    }

    fn data(h: &TensorInfo) -> Vec<u8> {
        (0..h.size)
            .map(|i| (i as u8).wrapping_mul(37) ^ h.name.as_bytes()[0])
            .collect()
    }

    fn write(path: &Path) {
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let mut sink = SafetensorsSink::create(path, &meta, headers()).unwrap();
        for h in headers() {
            sink.write_tensor(&h.name, &data(&h)).unwrap();
        }
        sink.finish().unwrap();
    }

    #[test]
    fn roundtrip_through_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        write(&p);
        // The crate's own reader accepts what the sink wrote.
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 3);
        let mut src = SafetensorsSource::open(&p).unwrap();
        let infos = src.tensor_infos();
        assert_eq!(infos.len(), 3);
        for (got, want) in infos.iter().zip(headers()) {
            assert_eq!(
                (&got.name, got.dtype, &got.dims, got.size),
                (&want.name, want.dtype, &want.dims, want.size)
            );
            assert_eq!(src.read_tensor_bytes(&want.name).unwrap(), data(&want));
        }
        assert_eq!(
            src.metadata().meta_value("format"),
            Some(MetaValue::Str("pt"))
        );
        assert_eq!(src.metadata().tensor_dims("a.weight"), Some(vec![2, 3]));
        assert!(src
            .read_tensor_bytes("zzz")
            .unwrap_err()
            .to_string()
            .contains("zzz"));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["m.safetensors"], "no temporary file left behind");
    }

    #[test]
    fn unfinished_sink_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let mut sink = SafetensorsSink::create(&p, &HashMap::new(), headers()).unwrap();
        let h = &headers()[0];
        sink.write_tensor(&h.name, &data(h)).unwrap();
        assert!(
            sink.write_tensor("c.weight", &[0; 4]).is_err(),
            "out of order"
        );
        assert!(sink.finish().is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut bad = headers();
        bad[0].dtype = GgmlDType::Q4_0;
        assert!(SafetensorsSink::create(&p, &HashMap::new(), bad).is_err());
    }

    fn raw(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    #[test]
    fn truncated_and_inconsistent_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.safetensors");
        write(&good);
        let bytes = std::fs::read(&good).unwrap();
        let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "truncated"),
            ("short-len", vec![1, 2, 3], "truncated"),
            ("cut-data", bytes[..bytes.len() - 1].to_vec(), "truncated"),
            ("cut-header", bytes[..20].to_vec(), "truncated"),
            (
                "trailing",
                [bytes.clone(), vec![0]].concat(),
                "after the last tensor",
            ),
            (
                "huge-header",
                u64::MAX.to_le_bytes().to_vec(),
                "header length",
            ),
            (
                "not-json",
                raw("{nope", 0),
                "not a valid safetensors header",
            ),
            (
                "offset-out-of-range",
                raw(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                    4,
                ),
                "truncated",
            ),
            (
                "gap",
                raw(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                    12,
                ),
                "invalid offset",
            ),
            (
                "len-mismatch",
                raw(
                    r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                    8,
                ),
                "not a valid safetensors header",
            ),
            (
                "dtype",
                raw(
                    r#"{"a":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}"#,
                    8,
                ),
                "I32",
            ),
            (
                "overflow",
                raw(
                    r#"{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,8]}}"#,
                    8,
                ),
                "not a valid safetensors header",
            ),
            ("ok", raw(ok, 8), ""),
        ];
        for (what, b, want) in cases {
            let p = dir.path().join(format!("{what}.safetensors"));
            std::fs::write(&p, &b).unwrap();
            match SafetensorsSource::open(&p) {
                Ok(_) => assert_eq!(want, "", "{what}: accepted"),
                Err(e) => {
                    let m = e.to_string();
                    assert!(!want.is_empty() && m.contains(want), "{what}: {m}");
                    assert_eq!(m.lines().count(), 1, "{what}: {m}");
                }
            }
        }
    }
}
