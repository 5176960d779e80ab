//! equicrypt-client: everything the *user* side of Equivariant Encryption needs around token ids.
//!
//! The server computes over permuted ("ciphertext") token ids; the client owns the secret key and
//! the plaintext tokenizer. This crate provides:
//!
//! * [`GgufTokenizer`]: a tokenizer built from a plaintext GGUF file's `tokenizer.*` metadata whose
//!   output matches llama.cpp's `llama_tokenize` exactly (byte-level BPE with the
//!   `tokenizer.ggml.pre` pre-tokenizer, or SentencePiece with scores and byte fallback;
//!   special-token partitioning), or from a plaintext Hugging Face transformers checkpoint
//!   directory ([`GgufTokenizer::from_hf_dir`]: byte-level BPE from `tokenizer.json`, special
//!   ids from `config.json` / `generation_config.json` / `tokenizer_config.json`);
//! * [`ChatTemplate`]: renders `tokenizer.chat_template` (Jinja, HF-compatible settings), or a
//!   checkpoint directory's `chat_template.jinja` / `tokenizer_config.json` template
//!   ([`ChatTemplate::from_hf_dir`]);
//! * [`StreamDecoder`]: incremental detokenization that only ever emits complete UTF-8;
//! * [`CipherSession`]: tokenizer + [`equicrypt_core::VocabPermutation`] — encrypts prompts into
//!   ciphertext ids and decrypts/detokenizes a stream of ciphertext ids.
//!
//! * [`remote`] (feature `remote`, on by default): an HTTP client for a blind server — ours or
//!   llama.cpp's `llama-server` — and [`remote::BlindChat`], which tokenizes, encrypts, streams and
//!   decrypts a completion.
//!
//! Apart from [`remote`], this crate does no networking; the only file I/O is reading GGUF
//! metadata and a checkpoint directory's JSON / Jinja files.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod hf_dir;
#[cfg(feature = "remote")]
pub mod remote;
mod session;
mod spm;
mod stream;
mod template;
mod tokenizer;

pub use hf_dir::HF_ENCRYPTED_CONFIG_KEY;
pub use session::{CipherSession, CipherStreamDecoder};
pub use stream::StreamDecoder;
pub use template::{ChatMessage, ChatTemplate, CHAT_TEMPLATE_KEY};
pub use tokenizer::{GgufTokenizer, PreTokenizerKind, TokenAttr, TokenizerModel};

use equicrypt_core::CoreError;

/// Errors of the client layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Reading the GGUF file failed (I/O or malformed header/metadata).
    #[error("cannot read GGUF '{path}': {reason}")]
    GgufRead {
        /// The file that was being read.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A Hugging Face checkpoint directory lacks a required file (`config.json` or
    /// `tokenizer.json`).
    #[error("'{dir}' has no {file} (a transformers checkpoint directory needs config.json and tokenizer.json)")]
    HfFileMissing {
        /// The checkpoint directory.
        dir: String,
        /// The missing file's name.
        file: String,
    },
    /// A file of a Hugging Face checkpoint directory cannot be read or is not valid JSON (also:
    /// the path is not a directory).
    #[error("cannot read '{path}': {reason}")]
    HfFileRead {
        /// The file (or directory) that was being read.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A file of a Hugging Face checkpoint directory is valid JSON but unusable (a wrong type,
    /// a missing `vocab_size`, a vocabulary larger than `vocab_size`, ...).
    #[error("'{path}' is invalid: {reason}")]
    BadHfFile {
        /// The offending file.
        path: String,
        /// Why it was rejected.
        reason: String,
    },
    /// `tokenizer.json` holds a tokenizer this crate does not implement from a checkpoint
    /// directory (supported: byte-level BPE).
    #[error("'{path}' holds an unsupported tokenizer: {reason} (supported: byte-level BPE)")]
    UnsupportedHfTokenizer {
        /// The `tokenizer.json` file.
        path: String,
        /// What is not supported.
        reason: String,
    },
    /// The checkpoint directory is an *encrypted* one (its `config.json` has an
    /// [`HF_ENCRYPTED_CONFIG_KEY`] record, its tokenizer is a placeholder): the client needs the
    /// plaintext checkpoint, which holds the vocabulary.
    #[error("'{dir}' is an encrypted checkpoint (its config.json has an 'equicrypt' record): the tokenizer must come from the plaintext checkpoint, which holds the vocabulary")]
    EncryptedHfCheckpoint {
        /// The checkpoint directory.
        dir: String,
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
    /// (supported: byte-level BPE, `gpt2`, and SentencePiece, `llama`).
    #[error("unsupported tokenizer model '{0}' (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")]
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
    /// A server base URL that cannot be used.
    #[error("invalid server URL '{url}': {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The server could not be reached (connection refused, no route, connect timeout).
    #[error("cannot reach the server at {url}: {reason}")]
    Unreachable {
        /// The URL of the request.
        url: String,
        /// The transport's description.
        reason: String,
    },
    /// The HTTP exchange failed after connecting (connection reset, timeout, invalid HTTP).
    #[error("HTTP request to {url} failed: {reason}")]
    Transport {
        /// The URL of the request.
        url: String,
        /// The transport's description.
        reason: String,
    },
    /// The server answered with an error: a non-2xx status (message from its error body), or an
    /// error event inside a stream.
    #[error("server error {status}: {message}")]
    Server {
        /// HTTP status (for an error event inside a stream: its `code`, else 500).
        status: u16,
        /// The server's message.
        message: String,
    },
    /// A response body or server-sent event that does not have the protocol's shape.
    #[error("malformed server response: {0}")]
    MalformedResponse(String),
    /// The served model was encrypted with another key; no prompt was sent.
    #[error("the server's model is encrypted for key {server}, not for this key ({key}); no prompt was sent")]
    FingerprintMismatch {
        /// Fingerprint the server reports.
        server: String,
        /// Fingerprint of the local key.
        key: String,
    },
    /// The served model is re-keyed for another session than the client's (or one of the two
    /// has no session); no prompt was sent.
    #[error("the server's model is {}, but this client encrypts for {}; no prompt was sent (use --session to match the served model)", describe_session(.server), describe_session(.client))]
    SessionMismatch {
        /// Session label the server reports (`None`: a base, not re-keyed, model).
        server: Option<String>,
        /// Session label the client encrypts ids for (`None`: the base permutation).
        client: Option<String>,
    },
    /// The server reports no key fingerprint, so the key cannot be checked; no prompt was sent.
    #[error("the server at {url} reports no key fingerprint, so its model cannot be checked against this key; no prompt was sent (llama-server: start it with --alias <fingerprint>; vLLM: --served-model-name <fingerprint>)")]
    FingerprintUnavailable {
        /// The server's base URL.
        url: String,
    },
    /// The request asks for something the backend cannot do (e.g. log-probabilities from vLLM
    /// serving an encrypted checkpoint without a tokenizer); nothing was sent.
    #[error("unsupported by this server: {0}")]
    Unsupported(String),
}

fn describe_session(s: &Option<String>) -> String {
    match s {
        Some(label) => format!("session '{label}'"),
        None => "the base model (no session)".to_string(),
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ClientError>;
