//! The tensor source/sink seam: what the encrypt pipeline needs from a model file format.
//!
//! A [`TensorSource`] lists its tensors (name, dtype, shape, byte size) in storage order, reads a
//! tensor's raw bytes (whole, or any byte range of it into a caller's buffer), and exposes the
//! file's metadata through the one metadata reader ([`MetadataSource`]). A [`TensorSink`] writes
//! tensors in a declared order, each whole or in consecutive parts, and makes the output appear
//! atomically: everything goes to a temporary file next to the destination, renamed into place
//! by [`TensorSink::finish`]; a sink dropped before that leaves nothing behind.
//!
//! Ranged reads and piecewise writes are what let the encrypter stream a tensor through a
//! bounded buffer ([`crate::encrypt::transform_into`]): neither side ever needs a whole tensor in
//! memory.
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

    /// Fills `buf` with the raw bytes `byte_offset .. byte_offset + buf.len()` of tensor `name`
    /// (offsets from the start of the tensor's data), read straight from the file into `buf`:
    /// nothing else is allocated or mapped, so memory does not grow with the tensor. Errors
    /// naming the tensor if the file has no such tensor or the range reaches past its end.
    fn read_tensor_range(
        &mut self,
        name: &str,
        byte_offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ModelError>;

    /// The file's metadata, for the family's config reader.
    fn metadata(&self) -> &dyn MetadataSource;
}

/// A writable model file: tensors in the order they were declared when it was created.
///
/// A tensor is written either whole ([`Self::write_tensor`]) or in parts: [`Self::begin_tensor`]
/// with the next declared name, any number of [`Self::write_part`] calls whose lengths add up to
/// its declared size, then [`Self::end_tensor`]. Invariant: after any error the sink is spoiled
/// (every later call and [`Self::finish`] error), so a half-written tensor never reaches the
/// destination; dropping the sink removes its temporary file.
pub trait TensorSink {
    /// Starts the next declared tensor; errors if `name` is not the next one or a tensor is still
    /// open.
    fn begin_tensor(&mut self, name: &str) -> Result<(), ModelError>;

    /// Appends `data` to the open tensor; errors (writing nothing) if no tensor is open or the
    /// tensor would exceed its declared size.
    fn write_part(&mut self, data: &[u8]) -> Result<(), ModelError>;

    /// Closes the open tensor; errors if fewer bytes than its declared size were written.
    fn end_tensor(&mut self) -> Result<(), ModelError>;

    /// Writes the bytes of the next declared tensor in one piece (begin, one part, end).
    fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<(), ModelError> {
        self.begin_tensor(name)?;
        self.write_part(data)?;
        self.end_tensor()
    }

    /// Flushes, syncs and renames the file into place. Errors if a declared tensor is missing or
    /// unfinished, or an earlier call failed.
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

    fn read_tensor_range(
        &mut self,
        name: &str,
        byte_offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ModelError> {
        GgufFile::read_tensor_range(self, name, byte_offset, buf)
    }

    fn metadata(&self) -> &dyn MetadataSource {
        self
    }
}

impl TensorSink for GgufWriter {
    fn begin_tensor(&mut self, name: &str) -> Result<(), ModelError> {
        GgufWriter::begin_tensor(self, name)
    }

    fn write_part(&mut self, data: &[u8]) -> Result<(), ModelError> {
        GgufWriter::write_part(self, data)
    }

    fn end_tensor(&mut self) -> Result<(), ModelError> {
        GgufWriter::end_tensor(self)
    }

    fn finish(self) -> Result<(), ModelError> {
        GgufWriter::finish(self)
    }
}

/// Index of tensor `name` in `items` (named by `name_of`), trying `*last` first and remembering
/// the answer there: a streaming reader asks for the same tensor many times in a row, so the
/// lookup is one comparison instead of a scan of the directory. Errors naming a missing tensor.
pub(crate) fn find_tensor<T>(
    items: &[T],
    name_of: impl Fn(&T) -> &str,
    last: &mut usize,
    name: &str,
) -> Result<usize, ModelError> {
    if items.get(*last).is_some_and(|t| name_of(t) == name) {
        return Ok(*last);
    }
    let i = items
        .iter()
        .position(|t| name_of(t) == name)
        .ok_or_else(|| ModelError::Metadata(format!("missing tensor '{name}'")))?;
    *last = i;
    Ok(i)
}

/// Checks that `len` bytes from `offset` lie inside tensor `name` of `size` bytes.
pub(crate) fn check_range(
    name: &str,
    size: u64,
    offset: u64,
    len: usize,
) -> Result<(), ModelError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ModelError::Internal(format!(
            "read of {len} bytes at offset {offset} reaches past the end of tensor '{name}' \
             ({size} bytes)"
        ))),
    }
}

/// The declared tensors of a sink and how far writing has got: enforces declaration order, each
/// tensor's declared size, and that an error spoils the sink for good.
#[derive(Debug)]
pub(crate) struct SinkOrder {
    headers: Vec<TensorInfo>,
    /// Index of the open tensor, or of the next one to begin.
    next: usize,
    /// Bytes written so far of the open tensor (`None`: no tensor is open).
    open: Option<u64>,
    /// Set by the first error: nothing more is accepted and the file is never persisted.
    spoiled: bool,
}

impl SinkOrder {
    pub(crate) fn new(headers: Vec<TensorInfo>) -> Self {
        Self {
            headers,
            next: 0,
            open: None,
            spoiled: false,
        }
    }

    /// The declared tensors.
    pub(crate) fn headers(&self) -> &[TensorInfo] {
        &self.headers
    }

    /// Records the outcome of a sink operation: an error spoils the sink.
    pub(crate) fn guard<T>(&mut self, r: Result<T, ModelError>) -> Result<T, ModelError> {
        if r.is_err() {
            self.spoiled = true;
        }
        r
    }

    fn check_usable(&self) -> Result<(), ModelError> {
        if self.spoiled {
            return Err(ModelError::Internal(
                "the output was abandoned after an earlier error".into(),
            ));
        }
        Ok(())
    }

    /// Opens `name`, which must be the next declared tensor.
    pub(crate) fn begin(&mut self, name: &str) -> Result<(), ModelError> {
        let r = self.check_usable().and_then(|()| {
            if let Some(open) = self.open {
                return Err(ModelError::Internal(format!(
                    "tensor '{name}' begun while '{}' is open ({open} bytes written)",
                    self.headers[self.next].name
                )));
            }
            match self.headers.get(self.next) {
                Some(h) if h.name == name => Ok(()),
                Some(h) => Err(ModelError::Internal(format!(
                    "tensor '{name}' written out of order (expected '{}')",
                    h.name
                ))),
                None => Err(ModelError::Internal(format!("unexpected tensor '{name}'"))),
            }
        });
        self.guard(r)?;
        self.open = Some(0);
        Ok(())
    }

    /// Accounts for `len` more bytes of the open tensor; call before writing them.
    pub(crate) fn part(&mut self, len: usize) -> Result<(), ModelError> {
        let r = self.check_usable().and_then(|()| {
            let Some(done) = self.open else {
                return Err(ModelError::Internal(format!(
                    "{len} bytes written with no tensor begun"
                )));
            };
            let h = &self.headers[self.next];
            match done.checked_add(len as u64) {
                Some(now) if now <= h.size => Ok(now),
                _ => Err(ModelError::Internal(format!(
                    "tensor '{}' ({} bytes) written with the wrong size: {len} more bytes after \
                     {done}",
                    h.name, h.size
                ))),
            }
        });
        self.open = Some(self.guard(r)?);
        Ok(())
    }

    /// Closes the open tensor, which must have exactly its declared size.
    pub(crate) fn end(&mut self) -> Result<(), ModelError> {
        let r = self.check_usable().and_then(|()| {
            let Some(done) = self.open else {
                return Err(ModelError::Internal("no tensor is open".into()));
            };
            let h = &self.headers[self.next];
            if done != h.size {
                return Err(ModelError::Internal(format!(
                    "tensor '{}' ({} bytes) written with the wrong size: {done} bytes",
                    h.name, h.size
                )));
            }
            Ok(())
        });
        self.guard(r)?;
        self.open = None;
        self.next += 1;
        Ok(())
    }

    /// Errors unless every declared tensor was written completely and nothing failed.
    pub(crate) fn check_complete(&self) -> Result<(), ModelError> {
        self.check_usable()?;
        if self.open.is_some() || self.next != self.headers.len() {
            return Err(ModelError::Internal(format!(
                "only {} of {} tensors were written",
                self.next,
                self.headers.len()
            )));
        }
        Ok(())
    }
}

/// Finishes a sink's temporary file: checks that all declared tensors were written
/// ([`SinkOrder::check_complete`]), flushes, syncs and atomically renames it to `dest` (nothing
/// appears at `dest` on any error).
pub(crate) fn persist_atomically(
    out: std::io::BufWriter<tempfile::NamedTempFile>,
    dest: &std::path::Path,
    order: &SinkOrder,
) -> Result<(), ModelError> {
    order.check_complete()?;
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
        // Ranged reads of both sources: pieces add up to the whole; ranges past the end and
        // missing tensors are errors naming the tensor.
        for (t, _) in &jobs {
            let whole = st.read_tensor_bytes(&t.name).unwrap();
            let mut pieces = vec![0u8; whole.len()];
            for (i, piece) in pieces.chunks_mut(37).enumerate() {
                st.read_tensor_range(&t.name, i as u64 * 37, piece).unwrap();
            }
            assert_eq!(pieces, whole, "{}", t.name);
            let plain = src.read_tensor_bytes(&t.name).unwrap();
            let mut tail = vec![0u8; 5.min(plain.len())];
            let at = (plain.len() - tail.len()) as u64;
            src.read_tensor_range(&t.name, at, &mut tail).unwrap();
            assert_eq!(tail, plain[at as usize..], "{}", t.name);
            for s in [
                &mut src as &mut dyn TensorSource,
                &mut st as &mut dyn TensorSource,
            ] {
                let e = s.read_tensor_range(&t.name, at + 1, &mut tail).unwrap_err();
                assert!(e.to_string().contains(&t.name), "{e}");
                let e = s
                    .read_tensor_range(&t.name, u64::MAX, &mut tail)
                    .unwrap_err();
                assert!(e.to_string().contains(&t.name), "{e}");
                let e = s.read_tensor_range("nope", 0, &mut tail).unwrap_err();
                assert!(e.to_string().contains("nope"), "{e}");
            }
        }
    }

    fn two_headers() -> Vec<TensorInfo> {
        ["a", "b"]
            .iter()
            .map(|n| TensorInfo {
                name: (*n).into(),
                dtype: candle_core::quantized::GgmlDType::F32,
                dims: vec![4],
                size: 16,
            })
            .collect()
    }

    /// Piecewise writing through `make`'s sink: parts add up to what `write_tensor` writes, and
    /// every misuse is an error that spoils the sink (no file appears).
    fn piecewise_contract<K: TensorSink>(
        make: impl Fn(&std::path::Path) -> K,
        read: impl Fn(&std::path::Path) -> Vec<Vec<u8>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok");
        let mut sink = make(&ok);
        sink.begin_tensor("a").unwrap();
        for part in [&[1u8; 3][..], &[], &[2; 13]] {
            sink.write_part(part).unwrap();
        }
        sink.end_tensor().unwrap();
        sink.write_tensor("b", &[3; 16]).unwrap();
        sink.finish().unwrap();
        let want_a: Vec<u8> = [[1u8; 3].to_vec(), [2; 13].to_vec()].concat();
        assert_eq!(read(&ok), [want_a, vec![3; 16]]);

        type Misuse<K> = fn(&mut K) -> Result<(), ModelError>;
        let misuses: [(&str, Misuse<K>); 7] = [
            ("part before begin", |k| k.write_part(&[0; 4])),
            ("out of order", |k| k.begin_tensor("b")),
            ("unknown", |k| k.begin_tensor("zzz")),
            ("too long", |k| {
                k.begin_tensor("a")?;
                k.write_part(&[0; 10])?;
                k.write_part(&[0; 7])
            }),
            ("too short", |k| {
                k.begin_tensor("a")?;
                k.write_part(&[0; 15])?;
                k.end_tensor()
            }),
            ("begin while open", |k| {
                k.begin_tensor("a")?;
                k.begin_tensor("b")
            }),
            ("end before begin", |k| k.end_tensor()),
        ];
        for (what, misuse) in misuses {
            let p = dir.path().join("bad");
            let mut sink = make(&p);
            assert!(misuse(&mut sink).is_err(), "{what}: accepted");
            // Spoiled: even a correct continuation is refused, and nothing is persisted.
            let _ = sink.write_tensor("b", &[0; 16]);
            assert!(sink.finish().is_err(), "{what}: finished");
            assert!(!p.exists(), "{what}: file left behind");
        }
        // An unfinished tensor is not finished by `finish`.
        let p = dir.path().join("open");
        let mut sink = make(&p);
        sink.write_tensor("a", &[0; 16]).unwrap();
        sink.begin_tensor("b").unwrap();
        sink.write_part(&[0; 16]).unwrap();
        assert!(sink.finish().is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ok"], "no temporary file left behind");
    }

    #[test]
    fn gguf_sink_writes_tensors_in_parts() {
        piecewise_contract(
            |p| GgufWriter::create(p, &[], two_headers()).unwrap(),
            |p| {
                let mut f = GgufFile::open(p).unwrap();
                ["a", "b"].map(|n| f.read_tensor_bytes(n).unwrap()).to_vec()
            },
        );
    }

    #[test]
    fn safetensors_sink_writes_tensors_in_parts() {
        piecewise_contract(
            |p| SafetensorsSink::create(p, &Default::default(), two_headers()).unwrap(),
            |p| {
                let mut f = SafetensorsSource::open(p).unwrap();
                ["a", "b"].map(|n| f.read_tensor_bytes(n).unwrap()).to_vec()
            },
        );
    }
}
