//! The tensor source/sink seam: what the encrypt pipeline needs from a model file format.
//!
//! A [`TensorSource`] lists its tensors (name, dtype, shape, byte size) in storage order, reads a
//! tensor's raw bytes, and exposes the file's metadata through the one metadata reader
//! ([`MetadataSource`]). A [`TensorSink`] writes tensors in a declared order and makes the output
//! appear atomically: everything goes to a temporary file next to the destination, renamed into
//! place by [`TensorSink::finish`]; a sink dropped before that leaves nothing behind.
//!
//! Implementations: GGUF ([`GgufFile`] / [`GgufWriter`]) and safetensors
//! ([`crate::SafetensorsSource`] / [`crate::SafetensorsSink`]).

use equicrypt_core::MetadataSource;

use crate::gguf::{GgufFile, GgufWriter, TensorHeader};
use crate::ModelError;

/// Name, storage type, shape (outermost first) and byte size of one tensor.
pub type TensorInfo = TensorHeader;

/// A readable model file.
pub trait TensorSource {
    /// Every tensor, in the order of its data in the file.
    fn tensor_infos(&self) -> Vec<TensorInfo>;

    /// The raw bytes of tensor `name` (exactly its declared size). Errors naming the tensor if the
    /// file has no such tensor.
    fn read_tensor_bytes(&mut self, name: &str) -> Result<Vec<u8>, ModelError>;

    /// The file's metadata, for the family's config reader.
    fn metadata(&self) -> &dyn MetadataSource;
}

/// A writable model file: tensors in the order they were declared when it was created.
pub trait TensorSink {
    /// Writes the bytes of the next declared tensor.
    fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<(), ModelError>;

    /// Flushes, syncs and renames the file into place. Errors if a declared tensor is missing.
    fn finish(self) -> Result<(), ModelError>
    where
        Self: Sized;
}

/// GGUF as a tensor source: wraps [`GgufFile`] (validated directory, range-checked reads).
pub type GgufSource = GgufFile;

/// GGUF as a tensor sink: the streaming atomic [`GgufWriter`].
pub type GgufSink = GgufWriter;

impl TensorSource for GgufFile {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.tensors
            .iter()
            .map(|t| TensorHeader {
                name: t.name.clone(),
                dtype: t.dtype,
                dims: t.dims.clone(),
                size: t.size,
            })
            .collect()
    }

    fn read_tensor_bytes(&mut self, name: &str) -> Result<Vec<u8>, ModelError> {
        let entry = self.tensor(name)?.clone();
        self.read_tensor(&entry)
    }

    fn metadata(&self) -> &dyn MetadataSource {
        self
    }
}

impl TensorSink for GgufWriter {
    fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<(), ModelError> {
        GgufWriter::write_tensor(self, name, data)
    }

    fn finish(self) -> Result<(), ModelError> {
        GgufWriter::finish(self)
    }
}

/// Checks that `name` with `len` bytes is the next tensor a sink declared (`headers[*next]`) and
/// advances `next`: sinks take tensors in header order with their declared sizes.
pub(crate) fn check_next_tensor(
    headers: &[TensorInfo],
    next: &mut usize,
    name: &str,
    len: usize,
) -> Result<(), ModelError> {
    let h = headers
        .get(*next)
        .ok_or_else(|| ModelError::Internal(format!("unexpected tensor '{name}'")))?;
    if h.name != name || h.size != len as u64 {
        return Err(ModelError::Internal(format!(
            "tensor '{name}' ({len} bytes) written out of order or with the wrong size"
        )));
    }
    *next += 1;
    Ok(())
}

/// Finishes a sink's temporary file: checks that all `expected` tensors were written, flushes,
/// syncs and atomically renames it to `dest` (nothing appears at `dest` on any error).
pub(crate) fn persist_atomically(
    out: std::io::BufWriter<tempfile::NamedTempFile>,
    dest: &std::path::Path,
    written: usize,
    expected: usize,
) -> Result<(), ModelError> {
    if written != expected {
        return Err(ModelError::Internal(format!(
            "only {written} of {expected} tensors were written"
        )));
    }
    let tmp = out
        .into_inner()
        .map_err(|e| ModelError::io(dest, e.into_error()))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| ModelError::io(dest, e))?;
    tmp.persist(dest)
        .map_err(|e| ModelError::io(dest, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encrypt::{plan_jobs, transform_into};
    use crate::synthetic::SyntheticLlama;
    use crate::{SafetensorsSink, SafetensorsSource};
    use equicrypt_core::{ArchFamily, LlamaFamily, LlamaPlan, PermMode, SecretKey};

    /// The same pipeline from a GGUF source into a safetensors sink: every tensor arrives with the
    /// bytes the GGUF path would have written, and the config reads the same through both sources.
    #[test]
    fn gguf_source_streams_into_a_safetensors_sink() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.gguf");
        SyntheticLlama::tiny_f32(5).write(&p).unwrap();
        let mut src = GgufFile::open(&p).unwrap();
        let cfg = LlamaFamily.read_config(src.metadata()).unwrap();
        assert_eq!((cfg.n_layer, cfg.d_model, cfg.vocab_size), (2, 64, 96));
        let key = SecretKey::from_bytes([9; 32]);
        let plan = LlamaPlan::derive(&key, cfg, PermMode::Full).unwrap();
        let jobs = plan_jobs(&LlamaFamily, &plan, &src).unwrap();
        let headers = jobs.iter().map(|(t, _)| t.clone()).collect();
        let out = dir.path().join("e.safetensors");
        let sink = SafetensorsSink::create(&out, &Default::default(), headers).unwrap();
        transform_into(&mut src, sink, &jobs, &indicatif::ProgressBar::hidden()).unwrap();
        let mut st = SafetensorsSource::open(&out).unwrap();
        for (t, tr) in &jobs {
            let plain = src.read_tensor_bytes(&t.name).unwrap();
            let (rows, cols) = src.tensor(&t.name).unwrap().rows_cols();
            let want = if tr.is_identity() {
                plain
            } else {
                crate::quant::transform_tensor(&plain, t.dtype, rows, cols, tr).unwrap()
            };
            assert_eq!(st.read_tensor_bytes(&t.name).unwrap(), want, "{}", t.name);
        }
        assert_eq!(
            st.metadata().tensor_dims("token_embd.weight"),
            Some(vec![96, 64])
        );
    }
}
