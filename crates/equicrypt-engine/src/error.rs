//! Error type of the engine.

use thiserror::Error;

/// Everything that can go wrong while loading a model, running it or sampling from it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EngineError {
    /// Reading the model file failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// candle reported an error (GGUF parsing, tensor shapes, quantized matmul).
    #[error("candle error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A required GGUF metadata key is absent.
    #[error("missing GGUF metadata key `{key}`")]
    MissingMetadata {
        /// The key that was looked up.
        key: String,
    },
    /// A GGUF metadata key is present but has the wrong type or an unusable value.
    #[error("invalid GGUF metadata `{key}`: {reason}")]
    InvalidMetadata {
        /// The offending key.
        key: String,
        /// Why the value was rejected.
        reason: String,
    },
    /// `general.architecture` names an architecture this engine does not run.
    #[error("unsupported architecture `{arch}` (only `llama` is supported)")]
    UnsupportedArchitecture {
        /// The architecture found in the file.
        arch: String,
    },
    /// A tensor the architecture needs is absent from the file.
    #[error("missing tensor `{name}`")]
    MissingTensor {
        /// GGUF tensor name.
        name: String,
    },
    /// A tensor has a shape inconsistent with the configuration.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// GGUF tensor name.
        name: String,
        /// Shape implied by the configuration (candle order, outermost first).
        expected: Vec<usize>,
        /// Shape found in the file.
        actual: Vec<usize>,
    },
    /// The hyper-parameters are inconsistent (e.g. heads do not divide the width).
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    /// A token id is not below the vocabulary size.
    #[error("token id {token} out of range (vocabulary size {vocab_size})")]
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// Number of ids the model knows.
        vocab_size: usize,
    },
    /// Running the tokens would exceed the context window.
    #[error(
        "context overflow: {requested} positions requested, context length is {context_length}"
    )]
    ContextOverflow {
        /// Positions that would be occupied after the call.
        requested: usize,
        /// Maximum number of positions.
        context_length: usize,
    },
    /// A forward pass was asked for with no tokens.
    #[error("empty token sequence")]
    EmptyInput,
    /// A logit vector had the wrong length or contained no usable value.
    #[error("invalid logits: {0}")]
    InvalidLogits(String),
    /// Sampling parameters are out of their domain.
    #[error("invalid sampling parameters: {0}")]
    InvalidSamplingParams(String),
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, EngineError>;

impl From<equicrypt_core::ConfigError> for EngineError {
    fn from(e: equicrypt_core::ConfigError) -> Self {
        use equicrypt_core::ConfigError as C;
        match e {
            C::MissingMetadata { key } => EngineError::MissingMetadata { key },
            C::InvalidMetadata { key, reason } => EngineError::InvalidMetadata { key, reason },
            C::UnsupportedArchitecture { arch } => EngineError::UnsupportedArchitecture { arch },
            C::MissingTensor { name } => EngineError::MissingTensor { name },
            C::TensorShape {
                name,
                expected,
                actual,
            } => EngineError::TensorShape {
                name,
                expected,
                actual,
            },
            C::InvalidConfig(m) => EngineError::InvalidConfig(m),
            other => EngineError::InvalidConfig(other.to_string()),
        }
    }
}
