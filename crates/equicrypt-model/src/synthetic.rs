//! Tiny random LLaMA-family GGUF models, for property tests and benchmarks where the real model
//! would be too slow or the answer must be known.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use equicrypt_core::LlamaConfig;

use crate::gguf::{GgufWriter, TensorHeader};
use crate::ModelError;

/// The six sizes a test picks for a synthetic LLaMA model. [`SyntheticShape::config`] completes
/// them into the family's one config type with the synthetic models' context length (256), RoPE
/// base (10000) and RMSNorm epsilon (1e-5); files are always read into a [`LlamaConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticShape {
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Width of the FFN intermediate space.
    pub d_ff: usize,
    /// Number of query heads.
    pub n_head: usize,
    /// Number of key/value heads (grouped-query attention when smaller than `n_head`).
    pub n_kv_head: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

impl SyntheticShape {
    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model.checked_div(self.n_head).unwrap_or(0)
    }

    /// The config a file written from this shape is read back into.
    pub fn config(&self) -> LlamaConfig {
        LlamaConfig {
            n_layer: self.n_layers,
            d_model: self.d_model,
            d_ff: self.d_ff,
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim(),
            vocab_size: self.vocab,
            context_length: 256,
            rope_base: 10000.0,
            rms_eps: 1e-5,
            rope_layout: equicrypt_core::RopeLayout::Interleaved,
        }
    }
}

/// Recipe of a synthetic model.
#[derive(Clone, Debug)]
pub struct SyntheticLlama {
    /// Hyper-parameters.
    pub shape: SyntheticShape,
    /// Storage type of the attention and FFN matrices.
    pub matrix_dtype: GgmlDType,
    /// Storage type of the token embedding (and head).
    pub embed_dtype: GgmlDType,
    /// Whether to write a separate `output.weight` (untied head).
    pub untied_head: bool,
    /// Seed of the weights.
    pub seed: u64,
}

impl SyntheticLlama {
    /// A small F32 model with the given seed.
    pub fn tiny_f32(seed: u64) -> Self {
        Self {
            shape: SyntheticShape {
                n_layers: 2,
                d_model: 64,
                d_ff: 128,
                n_head: 2,
                n_kv_head: 1,
                vocab: 96,
            },
            matrix_dtype: GgmlDType::F32,
            embed_dtype: GgmlDType::F32,
            untied_head: false,
            seed,
        }
    }

    fn tensors(&self) -> Result<Vec<(String, QTensor)>, ModelError> {
        let s = &self.shape;
        let hd = s.head_dim();
        let mut rng = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut mat = |rows: usize, cols: usize, scale: f32, dtype: GgmlDType| {
            let v: Vec<f32> = (0..rows * cols).map(|_| next() * 2.0 * scale).collect();
            let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu)?;
            QTensor::quantize(&t, dtype)
        };
        let err = |e: candle_core::Error| ModelError::Internal(e.to_string());
        let w = 1.0 / (s.d_model as f32).sqrt();
        let mut out = vec![(
            "token_embd.weight".to_string(),
            mat(s.vocab, s.d_model, 1.0, self.embed_dtype).map_err(err)?,
        )];
        let gain = |n: usize, salt: u64| -> Result<QTensor, ModelError> {
            let v: Vec<f32> = (0..n)
                .map(|i| 0.75 + ((i as u64 * 2654435761 + salt) % 1000) as f32 / 2000.0)
                .collect();
            let t = Tensor::from_vec(v, n, &Device::Cpu).map_err(err)?;
            QTensor::quantize(&t, GgmlDType::F32).map_err(err)
        };
        for l in 0..s.n_layers {
            let m = self.matrix_dtype;
            let p = |n: &str| format!("blk.{l}.{n}.weight");
            out.push((p("attn_norm"), gain(s.d_model, 3 * l as u64)?));
            out.push((
                p("attn_q"),
                mat(s.n_head * hd, s.d_model, w, m).map_err(err)?,
            ));
            out.push((
                p("attn_k"),
                mat(s.n_kv_head * hd, s.d_model, w, m).map_err(err)?,
            ));
            out.push((
                p("attn_v"),
                mat(s.n_kv_head * hd, s.d_model, w, m).map_err(err)?,
            ));
            out.push((
                p("attn_output"),
                mat(s.d_model, s.n_head * hd, w, m).map_err(err)?,
            ));
            out.push((p("ffn_norm"), gain(s.d_model, 3 * l as u64 + 1)?));
            out.push((p("ffn_gate"), mat(s.d_ff, s.d_model, w, m).map_err(err)?));
            out.push((p("ffn_up"), mat(s.d_ff, s.d_model, w, m).map_err(err)?));
            let wd = 1.0 / (s.d_ff as f32).sqrt();
            out.push((p("ffn_down"), mat(s.d_model, s.d_ff, wd, m).map_err(err)?));
        }
        out.push(("output_norm.weight".into(), gain(s.d_model, 99)?));
        if self.untied_head {
            out.push((
                "output.weight".into(),
                mat(s.vocab, s.d_model, w, self.embed_dtype).map_err(err)?,
            ));
        }
        Ok(out)
    }

    fn metadata(&self) -> Vec<(String, Value)> {
        let s = &self.shape;
        let u = |v: usize| Value::U32(v as u32);
        vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("general.name".into(), Value::String("synthetic".into())),
            ("llama.block_count".into(), u(s.n_layers)),
            ("llama.context_length".into(), u(256)),
            ("llama.embedding_length".into(), u(s.d_model)),
            ("llama.feed_forward_length".into(), u(s.d_ff)),
            ("llama.attention.head_count".into(), u(s.n_head)),
            ("llama.attention.head_count_kv".into(), u(s.n_kv_head)),
            ("llama.rope.freq_base".into(), Value::F32(10000.0)),
            ("llama.rope.dimension_count".into(), u(s.head_dim())),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Value::F32(1e-5),
            ),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(
                    (0..s.vocab)
                        .map(|i| Value::String(format!("t{i}")))
                        .collect(),
                ),
            ),
            ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
            ("tokenizer.ggml.pre".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ]
    }

    /// Writes the model to `path`.
    pub fn write(&self, path: &Path) -> Result<(), ModelError> {
        let tensors = self.tensors()?;
        let headers = tensors
            .iter()
            .map(|(n, t)| TensorHeader {
                name: n.clone(),
                dtype: t.dtype(),
                dims: t.shape().dims().to_vec(),
                size: t.storage_size_in_bytes() as u64,
            })
            .collect();
        let mut w = GgufWriter::create(path, &self.metadata(), headers)?;
        for (n, t) in &tensors {
            let data = t.data().map_err(|e| ModelError::Internal(e.to_string()))?;
            w.write_tensor(n, &data)?;
        }
        w.finish()
    }
}
