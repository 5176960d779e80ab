//! equicrypt-core: the secret key, domain-separated derivation of every transform, permutations,
//! and per-architecture transform plans for Equivariant Encryption.
//!
//! Paper: Nesa, *Encrypted Large Model Inference: The Equivariant Encryption Paradigm* (2025).
//! The equivariance rules implemented here are in `docs/ee-math.md`; how to add a model family is
//! in `docs/new-family.md`.
//! This crate performs no file I/O.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bert;
pub mod config;
mod exactness;
pub mod families;
mod key;
mod llama;
mod permutation;

pub use bert::{BertConfig, BertPlan, BERT_MODEL_TYPES};
pub use config::{
    ConfigError, Gemma3Config, LlamaConfig, MetaValue, MetadataSource, ModelConfig, RopeLayout,
};
pub use exactness::{EngineKind, Exactness};
pub use families::{
    ArchFamily, Gemma3Family, HfLlamaFamily, KnownFamily, LlamaFamily, Qwen2Family, TensorRole,
    SUPPORTED_ARCHITECTURES,
};
pub use key::{KeyFingerprint, SecretKey, KEY_FILE_HEADER};
pub use llama::{
    validate_session_label, LayerTransforms, LlamaPlan, PermMode, ResidualPermutation,
    TensorTransform, VocabPermutation, EXACT_GROUPS, LANE_GROUP, MAX_SESSION_LABEL, QUANT_BLOCK,
};
pub use permutation::Permutation;

/// Errors of the core layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// A map that was supposed to be a bijection on `0..len` is not.
    #[error("not a permutation of 0..{len}")]
    NotAPermutation {
        /// Length of the offending map.
        len: usize,
    },
    /// The key file could not be parsed.
    #[error("invalid key file: {0}")]
    KeyFormat(String),
    /// The operating system's RNG failed.
    #[error("OS random number generator failed: {0}")]
    Rng(#[from] getrandom::Error),
    /// The model's shape violates a constraint of the plan.
    #[error("unsupported model shape: {0}")]
    UnsupportedShape(String),
    /// A tensor the plan does not know how to transform.
    #[error("unsupported tensor '{0}' (no equivariance rule for it)")]
    UnsupportedTensor(String),
    /// A model configuration could not be read from metadata.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An unknown encryption mode name.
    #[error("unknown encryption mode '{0}' (expected stock, exact or full)")]
    UnknownMode(String),
    /// A session label that is empty, too long, or holds characters other than printable ASCII.
    #[error("invalid session label: {0}")]
    InvalidSessionLabel(String),
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
}
