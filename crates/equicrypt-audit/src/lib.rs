//! equicrypt-audit: attacks a curious server can run, measured so that every security statement
//! is backed by a number.
//!
//! Each attack is a module with tests on tiny models where the answer is known:
//! - **A1 weight matching** ([`weight_matching`]): with the *public* base weights, sort each
//!   embedding row of the encrypted model and match it to the public row with the same sorted
//!   values. Permutations of the hidden coordinates (inside 32-blocks or of whole blocks) keep every
//!   row's multiset of values, so this recovers the vocabulary permutation. [`procrustes`] is the
//!   same attacker against a (simulated) rotation of the hidden space.
//! - **A2 functional fingerprint** ([`functional`], on the batched f32 model [`dense`]): match
//!   sorted next-token distributions of single tokens, black box.
//! - **A3 ciphertext only** ([`frequency`], public text from [`corpus`]): frequency ranking plus
//!   bigram hill-climbing over intercepted id streams.
//! - **A4 model as oracle** ([`oracle`]): sample ciphertext text from the encrypted model, then A3.
//!
//! - **A1 for CNNs** ([`filter_matching`]): the same sorted matching on the filters, input
//!   channels and class columns of an encrypted ONNX graph.
//!
//! [`score`] measures a guess against the truth.
//!
//! The attacks never read the key; scoring against the key happens in the caller.
//!
//! [`run`] is that caller: [`run_audit`] runs every attack the given knowledge allows (the
//! attacker's public text and the victim's traffic come from [`scenario`]), scores each with the
//! key, measures the defences (per-session re-keying, whose cost [`cost`] measures, and hidden
//! special ids) and writes the [`report`] (`report.json`, `report.md`, `recovery_by_rank.svg`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod corpus;
pub mod cost;
pub mod dense;
pub mod filter_matching;
pub mod frequency;
pub mod functional;
pub mod oracle;
pub mod procrustes;
pub mod report;
pub mod run;
pub mod scenario;
pub mod score;
pub mod weight_matching;

pub use report::AuditReport;
pub use run::{run_audit, AuditConfig, Budget, Stage};

/// Errors of the attack lab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// Reading a model failed (or the key does not belong to it).
    #[error(transparent)]
    Model(#[from] equicrypt_model::ModelError),
    /// Deriving a (session) permutation from the key failed.
    #[error(transparent)]
    Core(#[from] equicrypt_core::CoreError),
    /// Tokenizing or chat-formatting public text failed.
    #[error(transparent)]
    Client(#[from] equicrypt_client::ClientError),
    /// The file meant to provide the public tokenizer is itself encrypted.
    #[error("{} is encrypted; the public tokenizer comes from a plaintext model", path.display())]
    EncryptedTokenizer {
        /// The file.
        path: std::path::PathBuf,
    },
    /// The public tokenizer cannot be built from a plaintext model.
    #[error("{}: cannot build the tokenizer", path.display())]
    Tokenizer {
        /// The plaintext model.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: equicrypt_client::ClientError,
    },
    /// The public tokenizer's vocabulary differs from the encrypted model's.
    #[error("the tokenizer of {} has {tokenizer} ids but the encrypted model has {model}", path.display())]
    TokenizerVocab {
        /// The plaintext model holding the tokenizer.
        path: std::path::PathBuf,
        /// Ids of the tokenizer.
        tokenizer: usize,
        /// Ids of the encrypted model.
        model: usize,
    },
    /// A line of a traffic log is not the expected JSON object.
    #[error("{} line {line}: expected {{\"prompt\": [ids]}} or {{\"completion\": [ids]}}", path.display())]
    TrafficFormat {
        /// The traffic log.
        path: std::path::PathBuf,
        /// 1-based line number.
        line: usize,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A traffic log holds an id outside the encrypted model's vocabulary.
    #[error("{} line {line}: id {id} is outside the model's vocabulary of {vocab}", path.display())]
    TrafficId {
        /// The traffic log.
        path: std::path::PathBuf,
        /// 1-based line number.
        line: usize,
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A traffic log holds no ids at all.
    #[error("traffic log {} holds no ids", path.display())]
    TrafficEmpty {
        /// The traffic log.
        path: std::path::PathBuf,
    },
    /// Reading or writing a file (traffic log, report) failed.
    #[error("{message}")]
    Io {
        /// What was being done, with the path.
        message: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Serializing the report or a traffic line failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Drawing the plot failed.
    #[error("plot: {0}")]
    Plot(String),
    /// Building one session's re-keyed tables failed.
    #[error("session {label}")]
    Rekey {
        /// The session label.
        label: String,
        /// Why.
        #[source]
        source: equicrypt_model::ModelError,
    },
    /// The given knowledge allows no attack at all.
    #[error("no attack could run with the given knowledge ({})", skipped.join("; "))]
    NothingToRun {
        /// Every attack skipped, and why.
        skipped: Vec<String>,
    },
    /// Dequantizing a tensor failed.
    #[error("cannot dequantize '{name}': {reason}")]
    Dequantize {
        /// Tensor name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The two models cannot be compared.
    #[error("models do not match: {0}")]
    Mismatch(String),
    /// The Procrustes (rotation) attack cannot run: bad options, or no anchor pairs found.
    #[error("procrustes attack: {0}")]
    Procrustes(String),
    /// A tensor computation failed.
    #[error("computation failed: {0}")]
    Compute(String),
    /// A corpus file is missing or malformed.
    #[error("corpus file {}: {reason}", path.display())]
    Corpus {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A token id does not fit the vocabulary.
    #[error("{what}: id {id} is outside the vocabulary of {vocab}")]
    IdOutOfRange {
        /// Where the id came from.
        what: String,
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// An argument is out of range or unusable (token id, temperature, option, budget).
    #[error("invalid input: {0}")]
    InvalidInput(String),
}
