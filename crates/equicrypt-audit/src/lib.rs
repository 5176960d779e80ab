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
//! [`score`] measures a guess against the truth.
//!
//! The attacks never read the key; scoring against the key happens in the caller.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod corpus;
pub mod dense;
pub mod frequency;
pub mod functional;
pub mod oracle;
pub mod procrustes;
pub mod score;
pub mod weight_matching;

/// Errors of the attack lab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// Reading a model failed.
    #[error(transparent)]
    Model(#[from] equicrypt_model::ModelError),
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
