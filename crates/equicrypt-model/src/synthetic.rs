//! Tiny random decoder GGUF models (LLaMA, Llama 3 / Mistral, Qwen2 and Gemma 3 layouts), for
//! property tests and benchmarks where the real model would be too slow or the answer must be
//! known.

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
            rope_scale: 1.0,
        }
    }
}

/// Which family's tensors and metadata a synthetic model has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SyntheticLayout {
    /// GGUF `llama` (SmolLM2, Llama 2, Mistral): adjacent RoPE pairs.
    #[default]
    Llama,
    /// GGUF `llama` as Llama 3.1 writes it: `rope_freqs.weight` factors, plus linear RoPE scaling
    /// (factor 2) so both scaling paths run.
    Llama3,
    /// GGUF `qwen2`: Q/K/V biases, NeoX RoPE pairs.
    Qwen2,
    /// GGUF `gemma3`: Q/K norms, post-attention/FFN norms, GeGLU, embedding scale, NeoX RoPE,
    /// sliding window of 4 positions on local layers.
    Gemma3,
}

impl SyntheticLayout {
    /// Every layout.
    pub const ALL: [SyntheticLayout; 4] = [
        SyntheticLayout::Llama,
        SyntheticLayout::Llama3,
        SyntheticLayout::Qwen2,
        SyntheticLayout::Gemma3,
    ];

    /// The GGUF architecture name.
    pub fn arch(self) -> &'static str {
        match self {
            SyntheticLayout::Llama | SyntheticLayout::Llama3 => "llama",
            SyntheticLayout::Qwen2 => "qwen2",
            SyntheticLayout::Gemma3 => "gemma3",
        }
    }
}

/// Recipe of a synthetic model.
#[derive(Clone, Debug)]
pub struct SyntheticLlama {
    /// Hyper-parameters.
    pub shape: SyntheticShape,
    /// Family layout.
    pub layout: SyntheticLayout,
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
            layout: SyntheticLayout::Llama,
            matrix_dtype: GgmlDType::F32,
            embed_dtype: GgmlDType::F32,
            untied_head: false,
            seed,
        }
    }

    /// The same recipe in another family layout.
    pub fn with_layout(mut self, layout: SyntheticLayout) -> Self {
        self.layout = layout;
        self
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
        let mut bias_rng = self.seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
        let mut next_bias = move || {
            bias_rng ^= bias_rng << 13;
            bias_rng ^= bias_rng >> 7;
            bias_rng ^= bias_rng << 17;
            (bias_rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
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
        let layout = self.layout;
        let mut vector = |n: usize, scale: f32| -> Result<QTensor, ModelError> {
            let v: Vec<f32> = (0..n).map(|_| next_bias() * scale).collect();
            let t = Tensor::from_vec(v, n, &Device::Cpu).map_err(err)?;
            QTensor::quantize(&t, GgmlDType::F32).map_err(err)
        };
        if layout == SyntheticLayout::Llama3 {
            // Llama 3.1-style per-pair frequency divisors (1 for high, up to 8 for low frequencies).
            let f: Vec<f32> = (0..hd / 2)
                .map(|i| 1.0 + 7.0 * (i as f32 / hd as f32))
                .collect();
            let t = Tensor::from_vec(f, hd / 2, &Device::Cpu).map_err(err)?;
            out.push((
                "rope_freqs.weight".into(),
                QTensor::quantize(&t, GgmlDType::F32).map_err(err)?,
            ));
        }
        for l in 0..s.n_layers {
            let m = self.matrix_dtype;
            let p = |n: &str| format!("blk.{l}.{n}.weight");
            out.push((p("attn_norm"), gain(s.d_model, 3 * l as u64)?));
            if layout == SyntheticLayout::Qwen2 {
                let b = |n: &str| format!("blk.{l}.{n}.bias");
                out.push((b("attn_q"), vector(s.n_head * hd, 0.5)?));
                out.push((b("attn_k"), vector(s.n_kv_head * hd, 0.5)?));
                out.push((b("attn_v"), vector(s.n_kv_head * hd, 0.5)?));
            }
            if layout == SyntheticLayout::Gemma3 {
                out.push((p("attn_q_norm"), gain(hd, 7 * l as u64 + 5)?));
                out.push((p("attn_k_norm"), gain(hd, 7 * l as u64 + 6)?));
                out.push((
                    p("post_attention_norm"),
                    gain(s.d_model, 11 * l as u64 + 2)?,
                ));
                out.push((p("post_ffw_norm"), gain(s.d_model, 13 * l as u64 + 4)?));
            }
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

    /// The config this recipe's file is read back into (the family's shape).
    pub fn config(&self) -> LlamaConfig {
        let mut c = self.shape.config();
        match self.layout {
            SyntheticLayout::Llama => {}
            SyntheticLayout::Llama3 => c.rope_scale = 2.0,
            SyntheticLayout::Qwen2 | SyntheticLayout::Gemma3 => {
                c.rope_layout = equicrypt_core::RopeLayout::HalfSplit;
                if self.layout == SyntheticLayout::Gemma3 {
                    c.rms_eps = 1e-6;
                    c.rope_base = 1e6;
                }
            }
        }
        c
    }

    fn metadata(&self) -> Vec<(String, Value)> {
        let s = &self.shape;
        let u = |v: usize| Value::U32(v as u32);
        let arch = self.layout.arch();
        let k = |key: &str| format!("{arch}.{key}");
        let c = self.config();
        let mut meta = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            ("general.name".into(), Value::String("synthetic".into())),
            (k("block_count"), u(s.n_layers)),
            (k("context_length"), u(256)),
            (k("embedding_length"), u(s.d_model)),
            (k("feed_forward_length"), u(s.d_ff)),
            (k("attention.head_count"), u(s.n_head)),
            (k("attention.head_count_kv"), u(s.n_kv_head)),
            (k("rope.freq_base"), Value::F32(c.rope_base)),
        ];
        // Key order is part of the golden plaintext digest of the `Llama` layout.
        if self.layout != SyntheticLayout::Gemma3 {
            meta.push((k("rope.dimension_count"), u(s.head_dim())));
        }
        meta.push((k("attention.layer_norm_rms_epsilon"), Value::F32(c.rms_eps)));
        match self.layout {
            SyntheticLayout::Gemma3 => {
                meta.push((k("attention.key_length"), u(s.head_dim())));
                meta.push((k("attention.value_length"), u(s.head_dim())));
                meta.push((k("attention.sliding_window"), u(4)));
            }
            SyntheticLayout::Llama3 => {
                meta.push((k("rope.scaling.type"), Value::String("linear".into())));
                meta.push((k("rope.scaling.factor"), Value::F32(2.0)));
            }
            _ => {}
        }
        meta.extend([
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
        ]);
        meta
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

/// The shape of a synthetic transformers checkpoint (LLaMA layout, BF16), for the encryption
/// scale benchmark: real sizes, pseudo-random weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HfShape {
    /// Blocks, widths, heads and vocabulary.
    pub shape: SyntheticShape,
    /// Untied `lm_head.weight`.
    pub untied_head: bool,
}

impl HfShape {
    /// Llama 3.2 1B: 16 blocks, hidden 2048, FFN 8192, 32/8 heads, vocabulary 128256, tied.
    pub const LLAMA_1B: HfShape = HfShape {
        shape: SyntheticShape {
            n_layers: 16,
            d_model: 2048,
            d_ff: 8192,
            n_head: 32,
            n_kv_head: 8,
            vocab: 128_256,
        },
        untied_head: false,
    };
    /// Llama 2 7B: 32 blocks, hidden 4096, FFN 11008, 32 heads, vocabulary 32000, untied.
    pub const LLAMA_7B: HfShape = HfShape {
        shape: SyntheticShape {
            n_layers: 32,
            d_model: 4096,
            d_ff: 11008,
            n_head: 32,
            n_kv_head: 32,
            vocab: 32_000,
        },
        untied_head: true,
    };

    /// Every tensor (transformers name, shape), in file order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let sh = &self.shape;
        let (d, kv) = (sh.d_model, sh.n_kv_head * sh.head_dim());
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![sh.vocab, d])];
        for l in 0..sh.n_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            t.push((p("input_layernorm.weight"), vec![d]));
            t.push((p("self_attn.q_proj.weight"), vec![d, d]));
            t.push((p("self_attn.k_proj.weight"), vec![kv, d]));
            t.push((p("self_attn.v_proj.weight"), vec![kv, d]));
            t.push((p("self_attn.o_proj.weight"), vec![d, d]));
            t.push((p("post_attention_layernorm.weight"), vec![d]));
            t.push((p("mlp.gate_proj.weight"), vec![sh.d_ff, d]));
            t.push((p("mlp.up_proj.weight"), vec![sh.d_ff, d]));
            t.push((p("mlp.down_proj.weight"), vec![d, sh.d_ff]));
        }
        t.push(("model.norm.weight".into(), vec![d]));
        if self.untied_head {
            t.push(("lm_head.weight".into(), vec![sh.vocab, d]));
        }
        t
    }

    /// Bytes of the largest tensor (BF16).
    pub fn largest_tensor_bytes(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, s)| 2 * s.iter().product::<usize>() as u64)
            .max()
            .unwrap_or(0)
    }

    /// Writes the checkpoint into the new directory `dir` (config.json, BF16 shards of at most
    /// `shard_bytes`, index), one tensor in memory at a time.
    pub fn write_checkpoint(&self, dir: &Path, shard_bytes: u64) -> Result<(), ModelError> {
        use crate::source::TensorSink;
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
        let mut size = 0u64;
        for (n, s) in self.tensors() {
            let b = 2 * s.iter().product::<usize>() as u64;
            if size + b > shard_bytes && !shards.last().is_some_and(Vec::is_empty) {
                shards.push(Vec::new());
                size = 0;
            }
            size += b;
            shards.last_mut().expect("one shard").push((n, s));
        }
        let count = shards.len();
        let mut weight_map = serde_json::Map::new();
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for (k, tensors) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{count:05}.safetensors", k + 1);
            let headers = tensors
                .iter()
                .map(|(n, s)| TensorHeader {
                    name: n.clone(),
                    dtype: GgmlDType::BF16,
                    dims: s.clone(),
                    size: 2 * s.iter().product::<usize>() as u64,
                })
                .collect();
            let meta = std::collections::HashMap::from([("format".into(), "pt".into())]);
            let mut sink = crate::SafetensorsSink::create(&dir.join(&file), &meta, headers)?;
            for (n, s) in tensors {
                let elems: usize = s.iter().product();
                let mut data = Vec::with_capacity(2 * elems);
                for _ in 0..elems {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let v = ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05;
                    data.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                }
                sink.write_tensor(n, &data)?;
                weight_map.insert(n.clone(), serde_json::json!(file));
            }
            sink.finish()?;
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        let sh = &self.shape;
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": sh.d_model, "intermediate_size": sh.d_ff,
            "num_attention_heads": sh.n_head, "num_key_value_heads": sh.n_kv_head,
            "num_hidden_layers": sh.n_layers, "vocab_size": sh.vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": !self.untied_head, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2,
        });
        for (name, v) in [
            ("model.safetensors.index.json", index),
            ("config.json", config),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, v.to_string()).map_err(|e| ModelError::io(&p, e))?;
        }
        Ok(())
    }
}
