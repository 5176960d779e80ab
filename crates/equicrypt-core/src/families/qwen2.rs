//! Qwen2 / Qwen2.5 in GGUF (`general.architecture = "qwen2"`): the LLaMA layout and tensor
//! names plus Q/K/V projection biases (`blk.N.attn_{q,k,v}.bias`), RoPE pairing NeoX
//! (`(i, i + head_dim/2)`, llama.cpp `LLAMA_ROPE_TYPE_NEOX`; the converter does not reorder Q/K
//! rows for Qwen2), tied or untied head.

use super::{llama::read_llama_like, ArchFamily, LlamaFamily, TensorRole};
use crate::config::{ConfigError, LlamaConfig, MetadataSource, RopeLayout};

/// The Qwen2 family (GGUF names, as llama.cpp writes them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Qwen2Family;

impl ArchFamily for Qwen2Family {
    type Config = LlamaConfig;

    fn arch(&self) -> &'static str {
        "qwen2"
    }

    fn role_of(&self, name: &str) -> Option<TensorRole> {
        match LlamaFamily.role_of(name)? {
            // Qwen2 has no per-head Q/K norms and no RoPE factors.
            TensorRole::AttnQNorm(_) | TensorRole::AttnKNorm(_) | TensorRole::RopeFreqs => None,
            r => Some(r),
        }
    }

    fn name_of(&self, role: TensorRole) -> String {
        LlamaFamily.name_of(role)
    }

    fn read_config(&self, meta: &dyn MetadataSource) -> Result<LlamaConfig, ConfigError> {
        read_llama_like(meta, self.arch(), RopeLayout::HalfSplit)
    }
}
