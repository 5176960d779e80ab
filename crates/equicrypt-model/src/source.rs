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
