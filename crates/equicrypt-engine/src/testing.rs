//! Tiny random LLaMA GGUF models for tests (in this crate and downstream).
//!
//! Weights come from a ChaCha20 stream (deterministic per seed) as `f32` tensors keyed by GGUF name, in
//! candle order (`[out, in]`), so a test can transform them (e.g. permute inside 32-blocks) before
//! [`to_gguf`] quantizes them. Quantizing a block-internally permuted row gives exactly the permuted
//! blocks, since block quantization only uses the block's min/max and per-element rounding.

use std::collections::BTreeMap;
use std::io::Cursor;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::error::Result;

/// Shape and storage types of a tiny model.
#[derive(Debug, Clone)]
pub struct TinyLlamaSpec {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Residual width (multiple of 32 for quantized types).
    pub d_model: usize,
    /// SwiGLU width (multiple of 32).
    pub d_ff: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// `llama.context_length`.
    pub context_length: usize,
    /// RoPE base.
    pub rope_base: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Whether to omit `output.weight` (head tied to `token_embd.weight`).
    pub tied: bool,
    /// Storage type of `token_embd.weight` and `output.weight`.
    pub embd_dtype: GgmlDType,
    /// Storage type of `attn_q` / `attn_k`.
    pub qk_dtype: GgmlDType,
    /// Storage type of the other matrices.
    pub matrix_dtype: GgmlDType,
    /// Seed of the weight stream.
    pub seed: u64,
}

impl Default for TinyLlamaSpec {
    /// d_model 64, d_ff 128, 4 heads, 2 kv heads (head_dim 16), 2 layers, vocab 50, tied Q8_0 embedding,
    /// Q4_1 matrices.
    fn default() -> Self {
        Self {
            n_layer: 2,
            d_model: 64,
            d_ff: 128,
            n_head: 4,
            n_kv_head: 2,
            vocab_size: 50,
            context_length: 64,
            rope_base: 10000.0,
            rms_eps: 1e-5,
            tied: true,
            embd_dtype: GgmlDType::Q8_0,
            qk_dtype: GgmlDType::Q4_1,
            matrix_dtype: GgmlDType::Q4_1,
            seed: 7,
        }
    }
}

/// `f32` weights keyed by GGUF tensor name: `(shape [out, in] or [len], row-major data)`.
pub type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn uniform(rng: &mut ChaCha20Rng) -> f32 {
    // 24 random bits -> [-1, 1)
    (rng.next_u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0
}

/// Random weights for `spec` (deterministic in `spec.seed`).
pub fn random_weights(spec: &TinyLlamaSpec) -> Weights {
    let mut rng = ChaCha20Rng::seed_from_u64(spec.seed);
    let (d, ff, v) = (spec.d_model, spec.d_ff, spec.vocab_size);
    let kv = spec.n_kv_head * (d / spec.n_head);
    let mut w = Weights::new();
    let mut mat = |w: &mut Weights, name: String, rows: usize, cols: usize, scale: f32| {
        let data = (0..rows * cols)
            .map(|_| uniform(&mut rng) * scale)
            .collect();
        w.insert(name, (vec![rows, cols], data));
    };
    let s_in = |n: usize| 1.7 / (n as f32).sqrt();
    mat(&mut w, "token_embd.weight".into(), v, d, 1.0);
    for l in 0..spec.n_layer {
        mat(&mut w, format!("blk.{l}.attn_q.weight"), d, d, s_in(d));
        mat(&mut w, format!("blk.{l}.attn_k.weight"), kv, d, s_in(d));
        mat(&mut w, format!("blk.{l}.attn_v.weight"), kv, d, s_in(d));
        mat(&mut w, format!("blk.{l}.attn_output.weight"), d, d, s_in(d));
        mat(&mut w, format!("blk.{l}.ffn_gate.weight"), ff, d, s_in(d));
        mat(&mut w, format!("blk.{l}.ffn_up.weight"), ff, d, s_in(d));
        mat(&mut w, format!("blk.{l}.ffn_down.weight"), d, ff, s_in(ff));
    }
    if !spec.tied {
        mat(&mut w, "output.weight".into(), v, d, s_in(d) * 3.0);
    }
    let mut norms = vec![format!("output_norm.weight")];
    for l in 0..spec.n_layer {
        norms.push(format!("blk.{l}.attn_norm.weight"));
        norms.push(format!("blk.{l}.ffn_norm.weight"));
    }
    for name in norms {
        let data = (0..d).map(|_| 1.0 + 0.3 * uniform(&mut rng)).collect();
        w.insert(name, (vec![d], data));
    }
    w
}

fn dtype_for(spec: &TinyLlamaSpec, name: &str) -> GgmlDType {
    if name.ends_with("_norm.weight") {
        GgmlDType::F32
    } else if name == "token_embd.weight" || name == "output.weight" {
        spec.embd_dtype
    } else if name.contains("attn_q.") || name.contains("attn_k.") {
        spec.qk_dtype
    } else {
        spec.matrix_dtype
    }
}

/// GGUF metadata for `spec` (`general.architecture = llama` and the `llama.*` keys).
pub fn metadata(spec: &TinyLlamaSpec) -> Vec<(String, Value)> {
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), Value::U32(spec.n_layer as u32)),
        (
            "llama.embedding_length".into(),
            Value::U32(spec.d_model as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Value::U32(spec.d_ff as u32),
        ),
        (
            "llama.attention.head_count".into(),
            Value::U32(spec.n_head as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(spec.n_kv_head as u32),
        ),
        ("llama.rope.freq_base".into(), Value::F32(spec.rope_base)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(spec.rms_eps),
        ),
        (
            "llama.context_length".into(),
            Value::U32(spec.context_length as u32),
        ),
    ]
}

/// Writes a GGUF image from `metadata` and `weights`, quantizing each tensor to the type `spec` assigns.
pub fn write_gguf(
    spec: &TinyLlamaSpec,
    metadata: &[(String, Value)],
    weights: &Weights,
) -> Result<Vec<u8>> {
    let mut qts = Vec::with_capacity(weights.len());
    for (name, (shape, data)) in weights {
        let t = Tensor::from_slice(data, shape.as_slice(), &Device::Cpu)?;
        qts.push((name.as_str(), QTensor::quantize(&t, dtype_for(spec, name))?));
    }
    let tensors: Vec<(&str, &QTensor)> = qts.iter().map(|(n, q)| (*n, q)).collect();
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta, &tensors)?;
    Ok(out.into_inner())
}

/// [`write_gguf`] with the standard [`metadata`].
pub fn to_gguf(spec: &TinyLlamaSpec, weights: &Weights) -> Result<Vec<u8>> {
    write_gguf(spec, &metadata(spec), weights)
}

/// A complete random tiny model as GGUF bytes.
pub fn tiny_llama_gguf(spec: &TinyLlamaSpec) -> Result<Vec<u8>> {
    to_gguf(spec, &random_weights(spec))
}
