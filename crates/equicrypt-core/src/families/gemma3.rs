//! Gemma 3 in GGUF (`general.architecture = "gemma3"`), as llama.cpp's converter writes it.
//!
//! Tensor names follow llama.cpp (`token_embd.weight`, `blk.N.post_attention_norm.weight`, …);
//! the head is tied to the embedding unless `output.weight` is present. RoPE pairing is NeoX
//! (`(i, i + head_dim/2)`, llama.cpp `LLAMA_ROPE_TYPE_NEOX`): the converter does not reorder Q/K
//! rows for Gemma. Norm gains are stored with Gemma's `1 + w` already applied. Hyper-parameters
//! llama.cpp hard-codes for Gemma 3 rather than reading from the file (local RoPE base 10000,
//! every 6th layer global, query scale `1/sqrt(head_dim)`) are fixed here the same way.

use super::{ArchFamily, LayerRole, TensorRole};
use crate::config::{
    embedding_rows, meta_f32, meta_str, meta_usize, opt_meta_f32, opt_meta_usize,
    read_linear_rope_scale, ConfigError, Gemma3Config, LlamaConfig, MetadataSource, RopeLayout,
};

/// The Gemma 3 family (GGUF names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gemma3Family;

const LAYER_TENSORS: &[(&str, LayerRole)] = &[
    ("attn_norm.weight", TensorRole::AttnNorm),
    ("attn_q.weight", TensorRole::AttnQ),
    ("attn_k.weight", TensorRole::AttnK),
    ("attn_v.weight", TensorRole::AttnV),
    ("attn_output.weight", TensorRole::AttnOutput),
    ("attn_q_norm.weight", TensorRole::AttnQNorm),
    ("attn_k_norm.weight", TensorRole::AttnKNorm),
    ("post_attention_norm.weight", TensorRole::PostAttnNorm),
    ("ffn_norm.weight", TensorRole::FfnNorm),
    ("ffn_gate.weight", TensorRole::FfnGate),
    ("ffn_up.weight", TensorRole::FfnUp),
    ("ffn_down.weight", TensorRole::FfnDown),
    ("post_ffw_norm.weight", TensorRole::PostFfnNorm),
];

const TOKEN_EMBD: &str = "token_embd.weight";

/// llama.cpp's Gemma 3 constants (`llama-model.cpp`, `LLM_ARCH_GEMMA3`).
const SWA_PATTERN: usize = 6;
const ROPE_BASE_LOCAL: f32 = 10_000.0;

impl ArchFamily for Gemma3Family {
    type Config = Gemma3Config;

    fn arch(&self) -> &'static str {
        "gemma3"
    }

    fn role_of(&self, name: &str) -> Option<TensorRole> {
        match name {
            TOKEN_EMBD => Some(TensorRole::TokenEmbedding),
            "output.weight" => Some(TensorRole::Output),
            "output_norm.weight" => Some(TensorRole::OutputNorm),
            _ => super::gguf_layer_role(name, LAYER_TENSORS),
        }
    }

    fn name_of(&self, role: TensorRole) -> String {
        match role {
            TensorRole::TokenEmbedding => TOKEN_EMBD.into(),
            TensorRole::Output => "output.weight".into(),
            TensorRole::OutputNorm => "output_norm.weight".into(),
            r => super::gguf_layer_name(r, LAYER_TENSORS),
        }
    }

    fn read_config(&self, meta: &dyn MetadataSource) -> Result<Gemma3Config, ConfigError> {
        let arch = meta_str(meta, "general.architecture")?;
        if arch != self.arch() {
            return Err(ConfigError::UnsupportedArchitecture { arch });
        }
        let k = |s: &str| format!("gemma3.{s}");
        let n_layer = meta_usize(meta, &k("block_count"))?;
        let d_model = meta_usize(meta, &k("embedding_length"))?;
        let d_ff = meta_usize(meta, &k("feed_forward_length"))?;
        let n_head = meta_usize(meta, &k("attention.head_count"))?;
        let n_kv_head = opt_meta_usize(meta, &k("attention.head_count_kv"))?.unwrap_or(n_head);
        let head_dim = opt_meta_usize(meta, &k("attention.key_length"))?
            .unwrap_or_else(|| d_model.checked_div(n_head).unwrap_or(0));
        if let Some(vd) = opt_meta_usize(meta, &k("attention.value_length"))? {
            if vd != head_dim {
                return Err(ConfigError::InvalidConfig(format!(
                    "value_length {vd} != key_length {head_dim} is not supported"
                )));
            }
        }
        let context_length = meta_usize(meta, &k("context_length"))?;
        let rope_base = opt_meta_f32(meta, &k("rope.freq_base"))?.unwrap_or(1_000_000.0);
        let rms_eps = meta_f32(meta, &k("attention.layer_norm_rms_epsilon"))?;
        let sliding_window = meta_usize(meta, &k("attention.sliding_window"))?;
        let rope_scale = read_linear_rope_scale(meta, "gemma3")?;
        let vocab_size = embedding_rows(meta, TOKEN_EMBD, d_model)?;
        let base = LlamaConfig {
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
        base.validate()?;
        if sliding_window == 0 {
            return Err(ConfigError::InvalidConfig(
                "sliding_window must be positive".into(),
            ));
        }
        Ok(Gemma3Config {
            query_scale: 1.0 / (head_dim as f32).sqrt(),
            base,
            sliding_window,
            swa_pattern: SWA_PATTERN,
            rope_base_local: ROPE_BASE_LOCAL,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MetaValue;
    use std::collections::HashMap;

    struct Meta(HashMap<&'static str, MetaValue<'static>>, Vec<usize>);

    impl MetadataSource for Meta {
        fn meta_value(&self, key: &str) -> Option<MetaValue<'_>> {
            self.0.get(key).copied()
        }
        fn tensor_dims(&self, name: &str) -> Option<Vec<usize>> {
            (name == TOKEN_EMBD).then(|| self.1.clone())
        }
    }

    /// The metadata of the real gemma-3-270m GGUF (vocabulary shortened).
    fn meta() -> Meta {
        Meta(
            HashMap::from([
                ("general.architecture", MetaValue::Str("gemma3")),
                ("gemma3.block_count", MetaValue::Int(18)),
                ("gemma3.embedding_length", MetaValue::Int(640)),
                ("gemma3.feed_forward_length", MetaValue::Int(2048)),
                ("gemma3.attention.head_count", MetaValue::Int(4)),
                ("gemma3.attention.head_count_kv", MetaValue::Int(1)),
                ("gemma3.attention.key_length", MetaValue::Int(256)),
                ("gemma3.attention.value_length", MetaValue::Int(256)),
                ("gemma3.attention.sliding_window", MetaValue::Int(512)),
                ("gemma3.context_length", MetaValue::Int(32768)),
                ("gemma3.rope.freq_base", MetaValue::Float(1e6)),
                (
                    "gemma3.attention.layer_norm_rms_epsilon",
                    MetaValue::Float(1e-6),
                ),
            ]),
            vec![1000, 640],
        )
    }

    #[test]
    fn reads_the_270m_config() {
        let c = Gemma3Family.read_config(&meta()).unwrap();
        assert_eq!(
            (c.base.q_dim(), c.base.kv_dim(), c.base.d_model),
            (1024, 256, 640)
        );
        assert_eq!(c.base.rope_layout, RopeLayout::HalfSplit);
        assert_eq!(c.query_scale, 1.0 / 16.0);
        let global: Vec<usize> = (0..18).filter(|&l| !c.is_local(l)).collect();
        assert_eq!(global, vec![5, 11, 17]);
        let mut m = meta();
        m.0.insert("gemma3.rope.scaling.type", MetaValue::Str("yarn"));
        assert!(matches!(
            Gemma3Family.read_config(&m),
            Err(ConfigError::InvalidMetadata { .. })
        ));
        let mut m = meta();
        m.0.insert("gemma3.attention.value_length", MetaValue::Int(128));
        assert!(Gemma3Family.read_config(&m).is_err());
        let mut m = meta();
        m.0.insert("general.architecture", MetaValue::Str("llama"));
        assert!(matches!(
            Gemma3Family.read_config(&m),
            Err(ConfigError::UnsupportedArchitecture { .. })
        ));
    }

    #[test]
    fn names_and_roles_roundtrip() {
        let f = Gemma3Family;
        for name in [
            "token_embd.weight",
            "output_norm.weight",
            "blk.0.attn_q_norm.weight",
            "blk.17.post_ffw_norm.weight",
            "blk.3.post_attention_norm.weight",
        ] {
            let role = f.role_of(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(f.name_of(role), name);
        }
        assert_eq!(f.role_of("blk.0.attn_q.bias"), None);
        assert_eq!(f.role_of("rope_freqs.weight"), None);
    }
}
