//! Inference engine for plaintext and equivariantly encrypted LLaMA GGUF models.
//!
//! An encrypted model is the plain model with its token ids and hidden coordinates secretly permuted
//! (permutations only *inside* aligned 32-value groups, so quantization blocks keep their contents) and
//! RoPE pairs of Q/K rows sign-flipped. This engine is written so that such a model produces logits that
//! are **bit-identical** to the plain model's after un-permuting the vocabulary: every floating-point
//! reduction over a permuted axis is order-independent (see [`norm`] for RMSNorm and [`model`] for
//! the rest). Token ids are opaque everywhere, so [`Sampler`] and [`generate()`] run on ciphertext ids.
//!
//! Entry points: [`LlamaModel::load`], the [`Engine`] trait, [`Sampler`], [`generate()`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod model;
pub mod norm;
pub mod qmatmul;
pub mod sampler;
pub mod testing;

pub use config::LlamaConfig;
pub use engine::Engine;
pub use error::{EngineError, Result};
pub use generate::{generate, Generation, StopReason};
pub use model::LlamaModel;
pub use sampler::{apply_repeat_penalty, argmax, Sampler, SamplingParams};
