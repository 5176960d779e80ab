//! The LLaMA family in GGUF (`general.architecture = "llama"`): SmolLM2, TinyLlama, Llama 2/3,
//! Mistral. Tensor names follow llama.cpp (`token_embd.weight`, `blk.N.attn_q.weight`, …).

use super::{ArchFamily, TensorRole};
use crate::config::{
    embedding_rows, meta_f32, meta_str, meta_usize, opt_meta_f32, opt_meta_usize,
    read_linear_rope_scale, ConfigError, LlamaConfig, MetadataSource, RopeLayout,
};

/// The LLaMA family (GGUF names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LlamaFamily;

use super::LayerRole;

/// Per-layer tensor suffixes (after `blk.N.`) and their roles.
const LAYER_TENSORS: &[(&str, LayerRole)] = &[
    ("attn_norm.weight", TensorRole::AttnNorm),
    ("ffn_norm.weight", TensorRole::FfnNorm),
    ("attn_q.weight", TensorRole::AttnQ),
    ("attn_k.weight", TensorRole::AttnK),
    ("attn_v.weight", TensorRole::AttnV),
    ("attn_output.weight", TensorRole::AttnOutput),
    ("attn_q.bias", TensorRole::AttnQBias),
    ("attn_k.bias", TensorRole::AttnKBias),
    ("attn_v.bias", TensorRole::AttnVBias),
    ("attn_q_norm.weight", TensorRole::AttnQNorm),
    ("attn_k_norm.weight", TensorRole::AttnKNorm),
    ("ffn_gate.weight", TensorRole::FfnGate),
    ("ffn_up.weight", TensorRole::FfnUp),
    ("ffn_down.weight", TensorRole::FfnDown),
];

const TOKEN_EMBD: &str = "token_embd.weight";

impl ArchFamily for LlamaFamily {
    type Config = LlamaConfig;

    fn arch(&self) -> &'static str {
        "llama"
    }

    fn role_of(&self, name: &str) -> Option<TensorRole> {
        match name {
            TOKEN_EMBD => return Some(TensorRole::TokenEmbedding),
            "output.weight" => return Some(TensorRole::Output),
            "output_norm.weight" => return Some(TensorRole::OutputNorm),
            "rope_freqs.weight" => return Some(TensorRole::RopeFreqs),
            _ => {}
        }
        super::gguf_layer_role(name, LAYER_TENSORS)
    }

    fn name_of(&self, role: TensorRole) -> String {
        match role {
            TensorRole::TokenEmbedding => TOKEN_EMBD.into(),
            TensorRole::Output => "output.weight".into(),
            TensorRole::OutputNorm => "output_norm.weight".into(),
            TensorRole::RopeFreqs => "rope_freqs.weight".into(),
            r => super::gguf_layer_name(r, LAYER_TENSORS),
        }
    }

    fn read_config(&self, meta: &dyn MetadataSource) -> Result<LlamaConfig, ConfigError> {
        read_llama_like(meta, self.arch(), RopeLayout::Interleaved)
    }
}

/// Reads a LLaMA-shaped config whose keys live under `arch.` (`llama`, `qwen2`, …), after
/// checking `general.architecture == arch`; `layout` is the format's RoPE pairing.
pub(crate) fn read_llama_like(
    meta: &dyn MetadataSource,
    arch_name: &str,
    layout: RopeLayout,
) -> Result<LlamaConfig, ConfigError> {
    let arch = meta_str(meta, "general.architecture")?;
    if arch != arch_name {
        return Err(ConfigError::UnsupportedArchitecture { arch });
    }
    let k = |s: &str| format!("{arch_name}.{s}");
    let n_layer = meta_usize(meta, &k("block_count"))?;
    let d_model = meta_usize(meta, &k("embedding_length"))?;
    let d_ff = meta_usize(meta, &k("feed_forward_length"))?;
    let n_head = meta_usize(meta, &k("attention.head_count"))?;
    let n_kv_head = opt_meta_usize(meta, &k("attention.head_count_kv"))?.unwrap_or(n_head);
    let context_length = meta_usize(meta, &k("context_length"))?;
    let rope_base = opt_meta_f32(meta, &k("rope.freq_base"))?.unwrap_or(10000.0);
    let rms_eps = meta_f32(meta, &k("attention.layer_norm_rms_epsilon"))?;
    let rope_scale = read_linear_rope_scale(meta, arch_name)?;
    let vocab_size = embedding_rows(meta, TOKEN_EMBD, d_model)?;
    let head_dim = d_model.checked_div(n_head).unwrap_or(0);
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
        rope_layout: layout,
        rope_scale,
    };
    if cfg.q_dim() != d_model {
        return Err(ConfigError::InvalidConfig(format!(
            "n_head {n_head} does not divide d_model {d_model}"
        )));
    }
    cfg.validate()?;
    if let Some(rd) = opt_meta_usize(meta, &k("rope.dimension_count"))? {
        if rd != head_dim {
            return Err(ConfigError::InvalidConfig(format!(
                "partial RoPE (dimension_count {rd} != head_dim {head_dim}) is not supported"
            )));
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MetaValue;
    use std::collections::HashMap;

    #[test]
    fn names_and_roles_roundtrip() {
        let f = LlamaFamily;
        for name in [
            "token_embd.weight",
            "output.weight",
            "output_norm.weight",
            "rope_freqs.weight",
            "blk.0.attn_q.weight",
            "blk.12.ffn_down.weight",
            "blk.3.attn_k.bias",
            "blk.1.attn_q_norm.weight",
        ] {
            let role = f.role_of(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(f.name_of(role), name);
        }
        assert_eq!(f.role_of("blk.7.attn_v.weight"), Some(TensorRole::AttnV(7)));
        for bad in [
            "whatever",
            "blk.x.attn_q.weight",
            "blk.01.attn_q.weight",
            "blk.+1.attn_q.weight",
            "blk..attn_q.weight",
            "blk.0.attn_z.weight",
            "blk.0",
        ] {
            assert_eq!(f.role_of(bad), None, "{bad}");
        }
    }

    struct Meta(
        HashMap<&'static str, MetaValue<'static>>,
        Option<Vec<usize>>,
    );

    impl MetadataSource for Meta {
        fn meta_value(&self, key: &str) -> Option<MetaValue<'_>> {
            self.0.get(key).copied()
        }
        fn tensor_dims(&self, name: &str) -> Option<Vec<usize>> {
            (name == TOKEN_EMBD).then(|| self.1.clone()).flatten()
        }
    }

    fn meta() -> Meta {
        Meta(
            HashMap::from([
                ("general.architecture", MetaValue::Str("llama")),
                ("llama.block_count", MetaValue::Int(2)),
                ("llama.embedding_length", MetaValue::Int(64)),
                ("llama.feed_forward_length", MetaValue::Int(128)),
                ("llama.attention.head_count", MetaValue::Int(2)),
                ("llama.context_length", MetaValue::Int(256)),
                (
                    "llama.attention.layer_norm_rms_epsilon",
                    MetaValue::Float(1e-5),
                ),
            ]),
            Some(vec![96, 64]),
        )
    }

    #[test]
    fn config_reader_defaults_and_errors() {
        let c = LlamaFamily.read_config(&meta()).unwrap();
        assert_eq!((c.n_kv_head, c.head_dim, c.vocab_size), (2, 32, 96));
        assert_eq!(c.rope_base, 10000.0);
        let mut m = meta();
        m.0.insert("general.architecture", MetaValue::Str("qwen2"));
        assert_eq!(
            LlamaFamily.read_config(&m).unwrap_err(),
            ConfigError::UnsupportedArchitecture {
                arch: "qwen2".into()
            }
        );
        let mut m = meta();
        m.0.remove("llama.block_count");
        assert!(matches!(
            LlamaFamily.read_config(&m),
            Err(ConfigError::MissingMetadata { key }) if key == "llama.block_count"
        ));
        let mut m = meta();
        m.0.insert("llama.block_count", MetaValue::Int(-1));
        assert!(matches!(
            LlamaFamily.read_config(&m),
            Err(ConfigError::InvalidMetadata { .. })
        ));
        let mut m = meta();
        m.0.insert("llama.block_count", MetaValue::Str("2"));
        assert!(matches!(
            LlamaFamily.read_config(&m),
            Err(ConfigError::InvalidMetadata { .. })
        ));
        let mut m = meta();
        m.1 = Some(vec![96, 32]);
        assert!(matches!(
            LlamaFamily.read_config(&m),
            Err(ConfigError::TensorShape { .. })
        ));
        let mut m = meta();
        m.1 = None;
        assert!(matches!(
            LlamaFamily.read_config(&m),
            Err(ConfigError::MissingTensor { .. })
        ));
        let mut m = meta();
        m.0.insert("llama.attention.head_count", MetaValue::Int(5));
        assert!(matches!(
            LlamaFamily.read_config(&m),
            Err(ConfigError::InvalidConfig(_))
        ));
    }
}
