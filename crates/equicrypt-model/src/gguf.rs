//! Reading GGUF files: metadata, tensor directory in file order, and raw tensor bytes, with every
//! range checked against the file so a truncated or corrupt file is an error, never a panic.
//! Writing: a streaming GGUF v3 writer that emits one tensor at a time into a temporary file and
//! renames it into place only when every tensor has been written.
//!
//! Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use equicrypt_core::config::{self as meta, MetaValue, MetadataSource};

use crate::ModelError;

/// The GGUF implementation of [`MetadataSource`] over candle's parsed header: the one place a
/// GGUF metadata value is turned into a [`MetaValue`]. The encrypter, re-keying, the engine and
/// the attack lab all read metadata through it.
#[derive(Clone, Copy)]
pub struct GgufMeta<'a>(pub &'a Content);

impl MetadataSource for GgufMeta<'_> {
    fn meta_value(&self, key: &str) -> Option<MetaValue<'_>> {
        self.0.metadata.get(key).map(meta_value)
    }

    fn tensor_dims(&self, name: &str) -> Option<Vec<usize>> {
        self.0
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims().to_vec())
    }
}

/// A GGUF value as a [`MetaValue`].
pub fn meta_value(v: &Value) -> MetaValue<'_> {
    match v {
        Value::U8(x) => MetaValue::Int((*x).into()),
        Value::I8(x) => MetaValue::Int((*x).into()),
        Value::U16(x) => MetaValue::Int((*x).into()),
        Value::I16(x) => MetaValue::Int((*x).into()),
        Value::U32(x) => MetaValue::Int((*x).into()),
        Value::I32(x) => MetaValue::Int((*x).into()),
        Value::U64(x) => MetaValue::Int((*x).into()),
        Value::I64(x) => MetaValue::Int((*x).into()),
        Value::F32(x) => MetaValue::Float((*x).into()),
        Value::F64(x) => MetaValue::Float(*x),
        Value::Bool(x) => MetaValue::Bool(*x),
        Value::String(s) => MetaValue::Str(s),
        Value::Array(a) => MetaValue::Array(a.len()),
    }
}

impl MetadataSource for GgufFile {
    fn meta_value(&self, key: &str) -> Option<MetaValue<'_>> {
        self.content.metadata.get(key).map(meta_value)
    }

    fn tensor_dims(&self, name: &str) -> Option<Vec<usize>> {
        GgufMeta(&self.content).tensor_dims(name)
    }
}

/// Default data alignment of GGUF files.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// One tensor of a GGUF file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// Storage type.
    pub dtype: GgmlDType,
    /// Shape, outermost first (`[rows, cols]` for a matrix; `cols` is GGUF's `ne0`).
    pub dims: Vec<usize>,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorEntry {
    /// `(rows, cols)` treating every leading dimension as rows.
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = *self.dims.last().unwrap_or(&1);
        let rows = self.dims.iter().rev().skip(1).product::<usize>();
        (rows, cols)
    }
}

/// An opened GGUF file: metadata and a validated tensor directory.
pub struct GgufFile {
    path: PathBuf,
    file: File,
    /// The parsed header.
    pub content: Content,
    /// Tensors in the order of their data in the file.
    pub tensors: Vec<TensorEntry>,
    /// Index into `tensors` of the last tensor a ranged read named (a lookup hint).
    last: usize,
}

impl GgufFile {
    /// Opens and validates `path`.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let content = Content::read(&mut file).map_err(|e| {
            let reason = e.to_string();
            let reason = reason.lines().next().unwrap_or("").trim().to_string();
            if let Some(name) = reason
                .strip_prefix("unknown dtype for tensor ")
                .and_then(|id| id.trim().parse::<u32>().ok())
                .map(ggml_type_name)
            {
                return ModelError::UnsupportedTensorType(format!("{name} in {}", path.display()));
            }
            ModelError::Corrupt(format!(
                "{}: not a valid GGUF file ({reason})",
                path.display()
            ))
        })?;
        let mut tensors = Vec::with_capacity(content.tensor_infos.len());
        for (name, info) in &content.tensor_infos {
            let dims = info.shape.dims().to_vec();
            let elems = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let bs = info.ggml_dtype.block_size();
            let size = match elems {
                Some(e) if e % bs == 0 => (e / bs * info.ggml_dtype.type_size()) as u64,
                _ => {
                    return Err(ModelError::Corrupt(format!(
                        "{}: tensor '{name}' has an invalid shape {dims:?} for {:?}",
                        path.display(),
                        info.ggml_dtype
                    )))
                }
            };
            let end = content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|s| s.checked_add(size));
            if end.is_none_or(|e| e > len) {
                return Err(ModelError::Corrupt(format!(
                    "{}: truncated file: tensor '{name}' extends past the end ({len} bytes)",
                    path.display()
                )));
            }
            tensors.push(TensorEntry {
                name: name.clone(),
                dtype: info.ggml_dtype,
                dims,
                offset: info.offset,
                size,
            });
        }
        tensors.sort_by_key(|t| t.offset);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
            tensors,
            last: 0,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value, if present.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A required string metadata value.
    pub fn meta_str(&self, key: &str) -> Result<&str, ModelError> {
        match self.meta(key) {
            Some(Value::String(s)) => Ok(s),
            // Not a string: the reader names the problem.
            _ => Err(meta::meta_str(self, key)
                .err()
                .map_or_else(|| ModelError::Internal(format!("'{key}'")), Into::into)),
        }
    }

    /// A required unsigned integer metadata value (any integer width).
    pub fn meta_u64(&self, key: &str) -> Result<u64, ModelError> {
        Ok(meta::meta_u64(self, key)?)
    }

    /// The entry of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorEntry, ModelError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| ModelError::Metadata(format!("missing tensor '{name}'")))
    }

    /// Reads the raw bytes of one tensor.
    pub fn read_tensor(&mut self, entry: &TensorEntry) -> Result<Vec<u8>, ModelError> {
        let mut buf = vec![0u8; entry.size as usize];
        let at = self.content.tensor_data_offset + entry.offset;
        self.file
            .seek(SeekFrom::Start(at))
            .and_then(|_| self.file.read_exact(&mut buf))
            .map_err(|e| ModelError::io(&self.path, e))?;
        Ok(buf)
    }

    /// Fills `buf` with bytes `byte_offset ..` of tensor `name` (one seek and one read into
    /// `buf`; see [`crate::TensorSource::read_tensor_range`]). Errors naming the tensor if it is
    /// missing or the range reaches past its end.
    pub fn read_tensor_range(
        &mut self,
        name: &str,
        byte_offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ModelError> {
        let i = crate::source::find_tensor(&self.tensors, |t| &t.name, &mut self.last, name)?;
        let entry = &self.tensors[i];
        crate::source::check_range(name, entry.size, byte_offset, buf.len())?;
        let at = self.content.tensor_data_offset + entry.offset + byte_offset;
        self.file
            .seek(SeekFrom::Start(at))
            .and_then(|_| self.file.read_exact(buf))
            .map_err(|e| ModelError::Io {
                path: format!("{} (tensor '{name}')", self.path.display()),
                source: e,
            })
    }
}

/// Header of one tensor to be written.
#[derive(Clone, Debug)]
pub struct TensorHeader {
    /// Tensor name.
    pub name: String,
    /// Storage type.
    pub dtype: GgmlDType,
    /// Shape, outermost first.
    pub dims: Vec<usize>,
    /// Size of the data in bytes.
    pub size: u64,
}

/// Streams a GGUF v3 file: header first, then each tensor's bytes in header order, whole
/// ([`GgufWriter::write_tensor`]) or in parts ([`GgufWriter::begin_tensor`],
/// [`GgufWriter::write_part`], [`GgufWriter::end_tensor`]).
///
/// Invariant: the destination path only ever holds a complete file. Data goes to a temporary
/// file in the same directory, which [`GgufWriter::finish`] syncs and renames into place; if the
/// writer is dropped before that (error, panic, interrupt) the temporary file is removed, and
/// after any error [`GgufWriter::finish`] refuses.
pub struct GgufWriter {
    out: BufWriter<tempfile::NamedTempFile>,
    dest: PathBuf,
    order: crate::source::SinkOrder,
    alignment: u64,
    written: u64,
}

impl GgufWriter {
    /// Creates the temporary file next to `dest` and writes the header.
    pub fn create(
        dest: &Path,
        metadata: &[(String, Value)],
        headers: Vec<TensorHeader>,
    ) -> Result<Self, ModelError> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".equicrypt-")
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(|e| ModelError::io(dest, e))?;
        let alignment = metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.to_u32().ok())
            .map_or(DEFAULT_ALIGNMENT, u64::from);
        let mut w = Self {
            out: BufWriter::with_capacity(1 << 20, tmp),
            dest: dest.to_path_buf(),
            order: crate::source::SinkOrder::new(headers),
            alignment,
            written: 0,
        };
        w.write_header(metadata)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), ModelError> {
        self.out
            .write_all(bytes)
            .map_err(|e| ModelError::io(&self.dest, e))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn put_str(&mut self, s: &str) -> Result<(), ModelError> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s.as_bytes())
    }

    fn pad(&mut self) -> Result<(), ModelError> {
        let rem = self.written % self.alignment;
        if rem != 0 {
            let zeros = vec![0u8; (self.alignment - rem) as usize];
            self.put(&zeros)?;
        }
        Ok(())
    }

    fn write_header(&mut self, metadata: &[(String, Value)]) -> Result<(), ModelError> {
        self.put(b"GGUF")?;
        self.put(&3u32.to_le_bytes())?;
        self.put(&(self.order.headers().len() as u64).to_le_bytes())?;
        self.put(&(metadata.len() as u64).to_le_bytes())?;
        for (k, v) in metadata {
            self.put_str(k)?;
            self.put(&value_type(v).to_le_bytes())?;
            self.put_value(v)?;
        }
        let mut offset = 0u64;
        for h in self.order.headers().to_vec() {
            self.put_str(&h.name)?;
            self.put(&(h.dims.len() as u32).to_le_bytes())?;
            for &d in h.dims.iter().rev() {
                self.put(&(d as u64).to_le_bytes())?;
            }
            self.put(&ggml_type_id(h.dtype).to_le_bytes())?;
            self.put(&offset.to_le_bytes())?;
            offset += h.size.div_ceil(self.alignment) * self.alignment;
        }
        self.pad()
    }

    fn put_value(&mut self, v: &Value) -> Result<(), ModelError> {
        match v {
            Value::U8(x) => self.put(&x.to_le_bytes()),
            Value::I8(x) => self.put(&x.to_le_bytes()),
            Value::U16(x) => self.put(&x.to_le_bytes()),
            Value::I16(x) => self.put(&x.to_le_bytes()),
            Value::U32(x) => self.put(&x.to_le_bytes()),
            Value::I32(x) => self.put(&x.to_le_bytes()),
            Value::U64(x) => self.put(&x.to_le_bytes()),
            Value::I64(x) => self.put(&x.to_le_bytes()),
            Value::F32(x) => self.put(&x.to_le_bytes()),
            Value::F64(x) => self.put(&x.to_le_bytes()),
            Value::Bool(x) => self.put(&[u8::from(*x)]),
            Value::String(s) => self.put_str(s),
            Value::Array(items) => {
                let elem = items.first().map_or(8, value_type);
                if items.iter().any(|i| value_type(i) != elem) {
                    return Err(ModelError::Metadata("mixed-type metadata array".into()));
                }
                self.put(&elem.to_le_bytes())?;
                self.put(&(items.len() as u64).to_le_bytes())?;
                items.iter().try_for_each(|i| self.put_value(i))
            }
        }
    }

    /// Writes the bytes of the next tensor (in header order) in one piece.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<(), ModelError> {
        crate::source::TensorSink::write_tensor(self, name, data)
    }

    /// Starts the next tensor (in header order); its bytes follow with [`Self::write_part`].
    pub fn begin_tensor(&mut self, name: &str) -> Result<(), ModelError> {
        self.order.begin(name)
    }

    /// Appends `data` to the tensor begun last (errors, writing nothing, past its size).
    pub fn write_part(&mut self, data: &[u8]) -> Result<(), ModelError> {
        self.order.part(data.len())?;
        let r = self.put(data);
        self.order.guard(r)
    }

    /// Ends the tensor begun last (errors unless it got exactly its size) and pads to the
    /// alignment.
    pub fn end_tensor(&mut self) -> Result<(), ModelError> {
        self.order.end()?;
        let r = self.pad();
        self.order.guard(r)
    }

    /// Flushes, syncs and atomically renames the file into place (errors, leaving nothing, if a
    /// tensor is missing or unfinished or an earlier call failed).
    pub fn finish(self) -> Result<(), ModelError> {
        crate::source::persist_atomically(self.out, &self.dest, &self.order)
    }
}

fn value_type(v: &Value) -> u32 {
    match v {
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

/// The on-disk id of a GGML tensor type.
fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// The ggml name of a tensor type id that candle cannot read (IQ, ternary, integer types, …).
pub fn ggml_type_name(id: u32) -> String {
    let name = match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        other => return format!("ggml type {other}"),
    };
    format!("{name} (ggml type {id})")
}
