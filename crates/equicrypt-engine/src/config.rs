//! LLaMA hyper-parameters read from GGUF metadata.
//!
//! The config type is the LLaMA family's one [`LlamaConfig`] (in `equicrypt-core`, shared with
//! the transform plan), read by the family's reader over the one GGUF metadata source
//! ([`equicrypt_model::GgufMeta`]); this module only adapts its errors to [`EngineError`].

use candle_core::quantized::gguf_file::Content;
use equicrypt_core::{ArchFamily, KnownFamily, LlamaFamily};
use equicrypt_model::GgufMeta;

pub use equicrypt_core::{Gemma3Config, LlamaConfig, ModelConfig};

use crate::error::Result;

/// Reads the configuration from GGUF metadata and tensor infos.
///
/// Errors: wrong `general.architecture`, missing keys, missing `token_embd.weight`, inconsistent
/// sizes, partial RoPE.
pub fn read_llama_config(content: &Content) -> Result<LlamaConfig> {
    Ok(LlamaFamily.read_config(&GgufMeta(content))?)
}

/// Reads the configuration of any supported family (dispatched on `general.architecture`).
pub fn read_model_config(content: &Content) -> Result<ModelConfig> {
    Ok(KnownFamily::read(&GgufMeta(content))?.1)
}
