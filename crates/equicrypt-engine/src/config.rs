//! LLaMA hyper-parameters read from GGUF metadata.
//!
//! The config type is the LLaMA family's one [`LlamaConfig`] (in `equicrypt-core`, shared with
//! the transform plan), read by the family's reader over the one GGUF metadata source
//! ([`equicrypt_model::GgufMeta`]); this module only adapts its errors to [`EngineError`].

use candle_core::quantized::gguf_file::Content;
use equicrypt_core::{ArchFamily, LlamaFamily};
use equicrypt_model::GgufMeta;

pub use equicrypt_core::LlamaConfig;

use crate::error::Result;

/// Reads the configuration from GGUF metadata and tensor infos.
///
/// Errors: wrong `general.architecture`, missing keys, missing `token_embd.weight`, inconsistent
/// sizes, partial RoPE.
pub fn read_llama_config(content: &Content) -> Result<LlamaConfig> {
    Ok(LlamaFamily.read_config(&GgufMeta(content))?)
}
