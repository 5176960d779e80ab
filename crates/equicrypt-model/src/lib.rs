//! equicrypt-model: model files. GGUF reading and streaming, atomic writing; lossless
//! quantization-block-aware tensor transforms; the encrypt pipeline; synthetic models for tests.
//!
//! The equivariance rules are in `docs/ee-math.md`; the plans that say which transform each
//! tensor gets, the model families and their config types live in `equicrypt-core`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod encrypt;
pub mod gguf;
pub mod hf;
pub mod inspect;
pub mod quant;
pub mod rekey;
pub mod safetensors;
pub mod source;
pub mod synthetic;

pub use encrypt::{
    encrypt_gguf, finest_sub_block, is_encrypted, llama_shape, model_config, placeholder_token,
    EncryptOptions, EncryptReport, EncryptedModelInfo,
};
pub use gguf::{GgufFile, GgufMeta, GgufWriter, TensorEntry, TensorHeader};
pub use rekey::{rekey_gguf, session_tables, BaseVocabTables, RekeyReport, SessionTables};
pub use safetensors::{SafetensorsSink, SafetensorsSource};
pub use source::{GgufSink, GgufSource, TensorInfo, TensorSink, TensorSource};

use std::path::Path;

use equicrypt_core::ConfigError;

impl From<ConfigError> for ModelError {
    fn from(e: ConfigError) -> Self {
        ModelError::from_config(e)
    }
}

/// Errors of the model layer. Every message names the problem in one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a well-formed GGUF, or is truncated.
    #[error("corrupt model file: {0}")]
    Corrupt(String),
    /// Required metadata is missing or has the wrong type.
    #[error("model metadata: {0}")]
    Metadata(String),
    /// The model's architecture has no transform plan.
    #[error("unsupported architecture '{0}' (supported: llama — SmolLM2, TinyLlama, Llama 2/3, Mistral — and gemma3)")]
    UnsupportedArchitecture(String),
    /// A tensor type that cannot be transformed losslessly.
    #[error(
        "unsupported tensor type {0}: supported are F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (IQ and ternary types are not repacked: several encode groups of 8 values jointly)"
    )]
    UnsupportedTensorType(String),
    /// A column permutation would split quantization blocks (or K-quant sub-blocks).
    #[error("column permutation of a {0}")]
    NotBlockAligned(String),
    /// A transform does not match the tensor's shape.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// The output file exists already.
    #[error("output file {0} already exists (refusing to overwrite)")]
    OutputExists(String),
    /// The input is already an encrypted model.
    #[error("{0} is already an encrypted model")]
    AlreadyEncrypted(String),
    /// The input is a session model already (re-keying does not compose across sessions).
    #[error("{path} is already the session model of '{session}': re-key the base encrypted model instead (a second re-key would give a permutation no session label derives)")]
    AlreadyRekeyed {
        /// The file.
        path: String,
        /// Its session label.
        session: String,
    },
    /// The file is not an encrypted model.
    #[error("{0} is not an equicrypt-encrypted model (no key fingerprint in its metadata)")]
    NotEncrypted(String),
    /// The key does not match the model.
    #[error("wrong key: the model was encrypted with key {model}, this key is {key}")]
    WrongKey {
        /// Fingerprint stored in the model.
        model: String,
        /// Fingerprint of the key given.
        key: String,
    },
    /// An error from the core layer (plan derivation).
    #[error(transparent)]
    Core(#[from] equicrypt_core::CoreError),
    /// A violated internal invariant.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// Maps a config-reader error onto the model layer's variants (and their messages).
    pub fn from_config(e: ConfigError) -> Self {
        match e {
            ConfigError::UnsupportedArchitecture { arch } => {
                ModelError::UnsupportedArchitecture(arch)
            }
            ConfigError::MissingMetadata { key } => {
                ModelError::Metadata(format!("missing '{key}'"))
            }
            ConfigError::InvalidMetadata { key, reason } => {
                ModelError::Metadata(format!("'{key}': {reason}"))
            }
            ConfigError::MissingTensor { name } => {
                ModelError::Metadata(format!("missing tensor '{name}'"))
            }
            e @ ConfigError::TensorShape { .. } => ModelError::Corrupt(e.to_string()),
            ConfigError::InvalidConfig(m) => {
                ModelError::Core(equicrypt_core::CoreError::UnsupportedShape(m))
            }
            other => ModelError::Metadata(other.to_string()),
        }
    }

    pub(crate) fn in_tensor(self, name: &str) -> Self {
        match self {
            ModelError::ShapeMismatch(m) => ModelError::ShapeMismatch(format!("{name}: {m}")),
            ModelError::Corrupt(m) => ModelError::Corrupt(format!("{name}: {m}")),
            ModelError::NotBlockAligned(m) => {
                ModelError::NotBlockAligned(format!("{m} (tensor '{name}')"))
            }
            other => other,
        }
    }
}
