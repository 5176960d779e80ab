//! equicrypt-client: everything the *user* side of Equivariant Encryption needs around token ids.
//!
//! The server computes over permuted ("ciphertext") token ids; the client owns the secret key and
//! the plaintext tokenizer. This crate provides:
//!
//! * [`GgufTokenizer`]: a tokenizer built from a plaintext GGUF file's `tokenizer.*` metadata whose
//!   output matches llama.cpp's `llama_tokenize` exactly (byte-level BPE, `tokenizer.ggml.pre`
//!   pre-tokenizer, special-token partitioning);
//! * [`ChatTemplate`]: renders `tokenizer.chat_template` (Jinja, HF-compatible settings);
//! * [`StreamDecoder`]: incremental detokenization that only ever emits complete UTF-8;
//! * [`CipherSession`]: tokenizer + [`equicrypt_core::VocabPermutation`] — encrypts prompts into
//!   ciphertext ids and decrypts/detokenizes a stream of ciphertext ids.
//!
//! This crate does no networking; the only file I/O is reading GGUF metadata.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod session;
mod stream;
mod template;
mod tokenizer;

pub use session::{CipherSession, CipherStreamDecoder};
pub use stream::StreamDecoder;
pub use template::{ChatMessage, ChatTemplate, CHAT_TEMPLATE_KEY};
pub use tokenizer::{GgufTokenizer, PreTokenizerKind, TokenAttr};

use equicrypt_core::CoreError;

/// Errors of the client layer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Reading the GGUF file failed (I/O or malformed header/metadata).
    #[error("cannot read GGUF '{path}': {reason}")]
    GgufRead {
        /// The file that was being read.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A required metadata key is absent.
    #[error("GGUF metadata key '{0}' is missing")]
    MissingKey(String),
    /// A metadata key is present but has the wrong type or an invalid value.
    #[error("GGUF metadata key '{key}' is invalid: {reason}")]
    BadMetadata {
        /// The offending key.
        key: String,
        /// Why it was rejected.
        reason: String,
    },
    /// `tokenizer.ggml.model` names a tokenizer family this crate does not implement
    /// (only byte-level BPE, `gpt2`, is supported).
    #[error("unsupported tokenizer model '{0}' (only 'gpt2' byte-level BPE is supported)")]
    UnsupportedTokenizerModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not implement.
    #[error("unsupported pre-tokenizer '{0}' (supported: smollm, gpt-2, default)")]
    UnsupportedPreTokenizer(String),
    /// The underlying `tokenizers` library failed (construction or encoding).
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The chat template failed to compile or render.
    #[error("chat template error: {0}")]
    Template(String),
    /// The permutation's size differs from the tokenizer's vocabulary size.
    #[error("vocabulary permutation has {perm} entries but the tokenizer has {vocab} tokens")]
    VocabMismatch {
        /// Entries in the permutation.
        perm: usize,
        /// Tokens in the tokenizer.
        vocab: usize,
    },
    /// An error from the core layer (e.g. a ciphertext id outside the vocabulary).
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ClientError>;
