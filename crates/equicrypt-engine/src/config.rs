//! LLaMA hyper-parameters read from GGUF metadata.

use candle_core::quantized::gguf_file::{Content, Value};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Hyper-parameters of a llama.cpp-layout LLaMA model.
///
/// Invariants (checked by [`LlamaConfig::validate`]): `n_head * head_dim == d_model`,
/// `n_head % n_kv_head == 0`, `head_dim` is even, every size is non-zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Number of transformer blocks (`llama.block_count`).
    pub n_layer: usize,
    /// Width of the residual stream (`llama.embedding_length`).
    pub d_model: usize,
    /// Width of the SwiGLU intermediate layer (`llama.feed_forward_length`).
    pub d_ff: usize,
    /// Query heads (`llama.attention.head_count`).
    pub n_head: usize,
    /// Key/value heads (`llama.attention.head_count_kv`, defaults to `n_head`).
    pub n_kv_head: usize,
    /// Dimension of one head, `d_model / n_head`.
    pub head_dim: usize,
    /// Number of token ids: rows of `token_embd.weight`.
    pub vocab_size: usize,
    /// Maximum number of positions (`llama.context_length`).
    pub context_length: usize,
    /// RoPE base frequency (`llama.rope.freq_base`, default 10000).
    pub rope_base: f32,
    /// RMSNorm epsilon (`llama.attention.layer_norm_rms_epsilon`).
    pub rms_eps: f32,
}

fn get<'a>(content: &'a Content, key: &str) -> Result<&'a Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| EngineError::MissingMetadata {
            key: key.to_string(),
        })
}

fn invalid(key: &str, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidMetadata {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// Reads an integer of any GGUF integer type as a `usize`.
fn as_usize(key: &str, v: &Value) -> Result<usize> {
    let n: i128 = match v {
        Value::U8(x) => *x as i128,
        Value::I8(x) => *x as i128,
        Value::U16(x) => *x as i128,
        Value::I16(x) => *x as i128,
        Value::U32(x) => *x as i128,
        Value::I32(x) => *x as i128,
        Value::U64(x) => *x as i128,
        Value::I64(x) => *x as i128,
        other => {
            return Err(invalid(
                key,
                format!("expected an integer, found {other:?}"),
            ))
        }
    };
    usize::try_from(n).map_err(|_| invalid(key, format!("{n} is not a valid size")))
}

fn as_f32(key: &str, v: &Value) -> Result<f32> {
    match v {
        Value::F32(x) => Ok(*x),
        Value::F64(x) => Ok(*x as f32),
        other => Err(invalid(key, format!("expected a float, found {other:?}"))),
    }
}

fn req_usize(content: &Content, key: &str) -> Result<usize> {
    as_usize(key, get(content, key)?)
}

impl LlamaConfig {
    /// Reads the configuration from GGUF metadata and tensor infos.
    ///
    /// Errors: wrong `general.architecture`, missing keys, missing `token_embd.weight`, inconsistent sizes.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let arch_key = "general.architecture";
        let arch = match get(content, arch_key)? {
            Value::String(s) => s.clone(),
            other => {
                return Err(invalid(
                    arch_key,
                    format!("expected a string, found {other:?}"),
                ))
            }
        };
        if arch != "llama" {
            return Err(EngineError::UnsupportedArchitecture { arch });
        }
        let n_layer = req_usize(content, "llama.block_count")?;
        let d_model = req_usize(content, "llama.embedding_length")?;
        let d_ff = req_usize(content, "llama.feed_forward_length")?;
        let n_head = req_usize(content, "llama.attention.head_count")?;
        let n_kv_head = match content.metadata.get("llama.attention.head_count_kv") {
            Some(v) => as_usize("llama.attention.head_count_kv", v)?,
            None => n_head,
        };
        let context_length = req_usize(content, "llama.context_length")?;
        let rope_base = match content.metadata.get("llama.rope.freq_base") {
            Some(v) => as_f32("llama.rope.freq_base", v)?,
            None => 10000.0,
        };
        let eps_key = "llama.attention.layer_norm_rms_epsilon";
        let rms_eps = as_f32(eps_key, get(content, eps_key)?)?;
        let embd = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| EngineError::MissingTensor {
                name: "token_embd.weight".into(),
            })?;
        let dims = embd.shape.dims();
        if dims.len() != 2 || dims[1] != d_model {
            return Err(EngineError::TensorShape {
                name: "token_embd.weight".into(),
                expected: vec![0, d_model],
                actual: dims.to_vec(),
            });
        }
        let vocab_size = dims[0];
        let head_dim = d_model.checked_div(n_head).unwrap_or(0);
        let cfg = Self {
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
        };
        cfg.validate()?;
        if let Some(v) = content.metadata.get("llama.rope.dimension_count") {
            let rd = as_usize("llama.rope.dimension_count", v)?;
            if rd != head_dim {
                return Err(EngineError::InvalidConfig(format!(
                    "partial RoPE (dimension_count {rd} != head_dim {head_dim}) is not supported"
                )));
            }
        }
        Ok(cfg)
    }

    /// Checks the invariants listed on the type.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidConfig(m));
        if self.n_layer == 0
            || self.d_model == 0
            || self.d_ff == 0
            || self.n_head == 0
            || self.n_kv_head == 0
            || self.vocab_size == 0
            || self.context_length == 0
        {
            return bad(format!("all sizes must be non-zero: {self:?}"));
        }
        if self.n_head * self.head_dim != self.d_model {
            return bad(format!(
                "n_head {} does not divide d_model {} into head_dim {}",
                self.n_head, self.d_model, self.head_dim
            ));
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad(format!(
                "n_head {} is not a multiple of n_kv_head {}",
                self.n_head, self.n_kv_head
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad(format!("rms_eps {} must be finite and >= 0", self.rms_eps));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            return bad(format!(
                "rope_base {} must be finite and > 0",
                self.rope_base
            ));
        }
        Ok(())
    }

    /// Width of the key/value projections, `n_kv_head * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}
