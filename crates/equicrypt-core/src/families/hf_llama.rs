//! LLaMA-shaped decoders in Hugging Face transformers format (`config.json` + safetensors):
//! `model_type` `llama` (SmolLM2, Llama 2/3, TinyLlama), `mistral` and `qwen2` (Q/K/V biases).
//!
//! Tensor names follow transformers (`model.embed_tokens.weight`,
//! `model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`, …). RoPE pairing is NeoX
//! (`(i, i + head_dim/2)`, `rotate_half`): llama.cpp's converter reorders Q/K rows for GGUF
//! `llama`, transformers does not. The head is tied (`tie_word_embeddings`) when the checkpoint has
//! no `lm_head.weight`. RoPE scaling of any kind (`rope_scaling`) acts per frequency pair and pairs
//! never move, so the plan does not depend on it; only a linear factor is recorded.

use super::{ArchFamily, LayerRole, TensorRole};
use crate::config::{
    embedding_rows, meta_f32, meta_str, meta_usize, opt_meta_f32, opt_meta_str, opt_meta_usize,
    ConfigError, LlamaConfig, MetadataSource, RopeLayout,
};

/// The LLaMA family in transformers format (also `mistral`, `qwen2`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HfLlamaFamily;

/// `model_type` values this family reads.
pub const HF_MODEL_TYPES: [&str; 3] = ["llama", "mistral", "qwen2"];

const EMBED: &str = "model.embed_tokens.weight";

const LAYER_TENSORS: &[(&str, LayerRole)] = &[
    ("input_layernorm.weight", TensorRole::AttnNorm),
    ("post_attention_layernorm.weight", TensorRole::FfnNorm),
    ("self_attn.q_proj.weight", TensorRole::AttnQ),
    ("self_attn.k_proj.weight", TensorRole::AttnK),
    ("self_attn.v_proj.weight", TensorRole::AttnV),
    ("self_attn.o_proj.weight", TensorRole::AttnOutput),
    ("self_attn.q_proj.bias", TensorRole::AttnQBias),
    ("self_attn.k_proj.bias", TensorRole::AttnKBias),
    ("self_attn.v_proj.bias", TensorRole::AttnVBias),
    ("mlp.gate_proj.weight", TensorRole::FfnGate),
    ("mlp.up_proj.weight", TensorRole::FfnUp),
    ("mlp.down_proj.weight", TensorRole::FfnDown),
];

impl ArchFamily for HfLlamaFamily {
    type Config = LlamaConfig;

    fn arch(&self) -> &'static str {
        "llama"
    }

    fn role_of(&self, name: &str) -> Option<TensorRole> {
        match name {
            EMBED => return Some(TensorRole::TokenEmbedding),
            "lm_head.weight" => return Some(TensorRole::Output),
            "model.norm.weight" => return Some(TensorRole::OutputNorm),
            _ => {}
        }
        super::layer_role(name, "model.layers.", LAYER_TENSORS)
    }

    fn name_of(&self, role: TensorRole) -> String {
        match role {
            TensorRole::TokenEmbedding => EMBED.into(),
            TensorRole::Output => "lm_head.weight".into(),
            TensorRole::OutputNorm => "model.norm.weight".into(),
            r => super::layer_name(r, "model.layers.", LAYER_TENSORS),
        }
    }

    /// Reads `config.json` keys (flattened: `rope_scaling.factor`) and the embedding's shape.
    fn read_config(&self, meta: &dyn MetadataSource) -> Result<LlamaConfig, ConfigError> {
        let model_type = meta_str(meta, "model_type")?;
        if !HF_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(ConfigError::UnsupportedArchitecture { arch: model_type });
        }
        let n_layer = meta_usize(meta, "num_hidden_layers")?;
        let d_model = meta_usize(meta, "hidden_size")?;
        let d_ff = meta_usize(meta, "intermediate_size")?;
        let n_head = meta_usize(meta, "num_attention_heads")?;
        let n_kv_head = opt_meta_usize(meta, "num_key_value_heads")?.unwrap_or(n_head);
        let head_dim = opt_meta_usize(meta, "head_dim")?
            .unwrap_or_else(|| d_model.checked_div(n_head).unwrap_or(0));
        let context_length = opt_meta_usize(meta, "max_position_embeddings")?.unwrap_or(2048);
        // transformers 4.x: `rope_theta`, `rope_scaling`; 5.x: `rope_parameters`.
        let rope_base = match opt_meta_f32(meta, "rope_theta")? {
            Some(b) => b,
            None => opt_meta_f32(meta, "rope_parameters.rope_theta")?.unwrap_or(10000.0),
        };
        let rms_eps = meta_f32(meta, "rms_norm_eps")?;
        let mut rope_scale = 1.0;
        for obj in ["rope_scaling", "rope_parameters"] {
            let ty = opt_meta_str(meta, &format!("{obj}.rope_type"))?
                .or(opt_meta_str(meta, &format!("{obj}.type"))?);
            if ty.as_deref() == Some("linear") {
                rope_scale = meta_f32(meta, &format!("{obj}.factor"))?;
            }
        }
        let vocab_size = embedding_rows(meta, EMBED, d_model)?;
        if let Some(v) = opt_meta_usize(meta, "vocab_size")? {
            if v != vocab_size {
                return Err(ConfigError::InvalidConfig(format!(
                    "vocab_size {v} but {EMBED} has {} rows",
                    vocab_size
                )));
            }
        }
        let cfg = LlamaConfig {
            n_layer,
            d_model,
            d_ff,
            n_head,
            n_kv_head,
            head_dim,
            vocab_size,
            context_length,
            rope_base,
            rms_eps,
            rope_layout: RopeLayout::HalfSplit,
            rope_scale,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_roles_roundtrip() {
        let f = HfLlamaFamily;
        for name in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.29.mlp.down_proj.weight",
            "model.layers.3.self_attn.k_proj.bias",
            "model.layers.1.post_attention_layernorm.weight",
        ] {
            let role = f.role_of(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(f.name_of(role), name);
        }
        for bad in [
            "model.layers.01.mlp.up_proj.weight",
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.0.mlp.fc1.weight",
            "model.rotary_emb.inv_freq",
        ] {
            assert_eq!(f.role_of(bad), None, "{bad}");
        }
    }
}
