//! Decoder forward pass (LLaMA and Gemma 3 GGUF layouts) over candle quantized matmuls with
//! order-independent reductions.
//!
//! Gemma 3 adds, on the same skeleton: the embedding scaled by `sqrt(d_model)`, per-head RMSNorm
//! of Q and K before RoPE (NeoX pairs `(i, i + d/2)`), RMSNorms after attention and after the FFN,
//! GeGLU (tanh GELU), a query scale of `1/sqrt(head_dim)`, and sliding-window attention (RoPE base
//! 10000) on five of every six layers. All of these are elementwise, per head (over axes only
//! sign-flipped in RoPE pairs) or order-independent RMSNorms, so the exactness argument below holds
//! unchanged.
//!
//! Matmuls run in [`crate::qmatmul`] (own kernels for Q8_0/Q4_0, candle's for the rest). Everything else (embedding lookup, RMSNorm, RoPE,
//! attention, SwiGLU, residual adds) is plain `f32` Rust whose reductions either run over axes that
//! the encryption never permutes (positions, head dimensions that are only sign-flipped in RoPE pairs)
//! or are made exactly order-independent ([`crate::norm`]). The quantized dot products used for
//! Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 sum integers inside a 32-value block and add blocks in a fixed
//! order, and the activation quantization per block only uses the block's max and per-element
//! rounding, so a permutation *inside* blocks leaves every matmul output bit-identical (up to the same
//! permutation of output rows). K-quants and dense `F32`/`F16` weights go through candle and are
//! **not** order-independent.

use std::io::{Read, Seek};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::QTensor;
use candle_core::Device;

use crate::config::{LlamaConfig, ModelConfig};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::norm::rms_norm_rows;
use crate::qmatmul::Linear;
use equicrypt_core::RopeLayout;

/// One transformer block's weights.
struct Block {
    attn_norm: Vec<f32>,
    /// Per-head RMSNorm gains of Q and K (Gemma 3).
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    /// RMSNorm gains applied to the attention and FFN outputs before the residual adds (Gemma 3).
    post_attn_norm: Option<Vec<f32>>,
    post_ffn_norm: Option<Vec<f32>>,
    /// Q/K/V projection biases (Qwen2), added elementwise.
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

/// Cached keys (after RoPE) and values of one block, row-major `[position, kv_dim]`.
#[derive(Default, Clone)]
struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// A decoder model (llama.cpp GGUF layout: `llama` or `gemma3`) with its KV cache.
///
/// Invariants: `cache[l].k.len() == cache[l].v.len() == position * kv_dim` for every block;
/// `position <= config.context_length`.
pub struct LlamaModel {
    cfg: LlamaConfig,
    /// The family's full configuration (`cfg` is its shape).
    family: ModelConfig,
    /// RoPE frequency divisors per pair (`rope_freqs.weight`), when the file has them.
    rope_freqs: Option<Vec<f32>>,
    /// Dequantized `token_embd.weight`, row-major `[vocab, d_model]`.
    embedding: Vec<f32>,
    blocks: Vec<Block>,
    output_norm: Vec<f32>,
    head: Linear,
    tied_head: bool,
    cache: Vec<KvCache>,
    position: usize,
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaModel")
            .field("config", &self.cfg)
            .field("tied_head", &self.tied_head)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

fn read_tensor<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    name: &str,
    shape: &[usize],
) -> Result<QTensor> {
    if !content.tensor_infos.contains_key(name) {
        return Err(EngineError::MissingTensor { name: name.into() });
    }
    let t = content.tensor(reader, name, &Device::Cpu)?;
    if t.shape().dims() != shape {
        return Err(EngineError::TensorShape {
            name: name.into(),
            expected: shape.to_vec(),
            actual: t.shape().dims().to_vec(),
        });
    }
    Ok(t)
}

fn read_matmul<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    name: &str,
    shape: &[usize],
) -> Result<Linear> {
    Linear::new(Arc::new(read_tensor(content, reader, name, shape)?))
}

fn read_vec<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    name: &str,
    len: usize,
) -> Result<Vec<f32>> {
    let t = read_tensor(content, reader, name, &[len])?;
    Ok(t.dequantize(&Device::Cpu)?.to_vec1::<f32>()?)
}

/// `x · Wᵀ` for row-major `x: [rows, in_dim]`.
fn linear(w: &Linear, x: &[f32], rows: usize, in_dim: usize) -> Result<Vec<f32>> {
    w.forward(x, rows, in_dim)
}

/// Dot product with a fixed 8-lane accumulation pattern (vectorizable, order fixed by index).
///
/// Used over head dimensions, which the encryption only sign-flips pairwise: `(-a)(-b) = ab` exactly,
/// so the result is bit-identical.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Rotates the RoPE pairs of one head: adjacent `(2i, 2i+1)` (llama.cpp "normal") or NeoX
/// `(i, i + d/2)`.
///
/// Elementwise per pair, so negating a whole pair negates the output pair exactly.
fn rope_head(v: &mut [f32], cos: &[f32], sin: &[f32], layout: RopeLayout) {
    let rot = |x0: f32, x1: f32, c: f32, s: f32| (x0 * c - x1 * s, x0 * s + x1 * c);
    match layout {
        RopeLayout::HalfSplit => {
            let half = v.len() / 2;
            let (a, b) = v.split_at_mut(half);
            for i in 0..half {
                (a[i], b[i]) = rot(a[i], b[i], cos[i], sin[i]);
            }
        }
        _ => {
            for (pair, (&c, &s)) in v.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
                (pair[0], pair[1]) = rot(pair[0], pair[1], c, s);
            }
        }
    }
}

/// GELU, tanh approximation (Gemma's `gelu_pytorch_tanh`, llama.cpp `ggml_gelu`).
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// RoPE tables (`cos`, `sin`, `[t_len, head_dim/2]`) for positions `p0..p0 + t_len`: angle =
/// `pos / scale * base^(-2i/hd) / factor_i` (`factors`: llama.cpp's `rope_freqs.weight`, Llama 3.1),
/// computed in f64.
fn rope_tables(
    p0: usize,
    t_len: usize,
    hd: usize,
    base: f32,
    scale: f32,
    factors: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let half = hd / 2;
    let mut cos = vec![0f32; t_len * half];
    let mut sin = vec![0f32; t_len * half];
    for t in 0..t_len {
        let pos = (p0 + t) as f64 / scale as f64;
        for i in 0..half {
            let f = factors.map_or(1.0, |f| f[i] as f64);
            let inv = (base as f64).powf(-2.0 * i as f64 / hd as f64) / f;
            let (s, c) = (pos * inv).sin_cos();
            cos[t * half + i] = c as f32;
            sin[t * half + i] = s as f32;
        }
    }
    (cos, sin)
}

impl LlamaModel {
    /// Loads a GGUF file from disk.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let mut file = std::io::BufReader::new(std::fs::File::open(path.as_ref())?);
        let content = Content::read(&mut file)?;
        Self::from_content(&content, &mut file)
    }

    /// Loads a GGUF image held in memory.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut cursor = std::io::Cursor::new(bytes);
        let content = Content::read(&mut cursor)?;
        Self::from_content(&content, &mut cursor)
    }

    /// Loads the weights described by `content` from `reader` (the stream `content` was read from).
    pub fn from_content<R: Read + Seek>(content: &Content, reader: &mut R) -> Result<Self> {
        let family = crate::config::read_model_config(content)?;
        let cfg = family.base().clone();
        let gemma = matches!(family, ModelConfig::Gemma3(_));
        let (d, ff, kv, v) = (cfg.d_model, cfg.d_ff, cfg.kv_dim(), cfg.vocab_size);
        let (qd, hd) = (cfg.q_dim(), cfg.head_dim);
        let embd = Arc::new(read_tensor(content, reader, "token_embd.weight", &[v, d])?);
        let embedding = embd
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            let mut opt_vec = |name: String, len: usize| -> Result<Option<Vec<f32>>> {
                content
                    .tensor_infos
                    .contains_key(&name)
                    .then(|| read_vec(content, reader, &name, len))
                    .transpose()
            };
            let bias = |s: &str| format!("blk.{l}.{s}.bias");
            let bq = opt_vec(bias("attn_q"), qd)?;
            let bk = opt_vec(bias("attn_k"), kv)?;
            let bv = opt_vec(bias("attn_v"), kv)?;
            let mut gemma_vec = |s: &str, len: usize| -> Result<Option<Vec<f32>>> {
                gemma
                    .then(|| read_vec(content, reader, &n(s), len))
                    .transpose()
            };
            let q_norm = gemma_vec("attn_q_norm", hd)?;
            let k_norm = gemma_vec("attn_k_norm", hd)?;
            let post_attn_norm = gemma_vec("post_attention_norm", d)?;
            let post_ffn_norm = gemma_vec("post_ffw_norm", d)?;
            blocks.push(Block {
                attn_norm: read_vec(content, reader, &n("attn_norm"), d)?,
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                bq,
                bk,
                bv,
                wq: read_matmul(content, reader, &n("attn_q"), &[qd, d])?,
                wk: read_matmul(content, reader, &n("attn_k"), &[kv, d])?,
                wv: read_matmul(content, reader, &n("attn_v"), &[kv, d])?,
                wo: read_matmul(content, reader, &n("attn_output"), &[d, qd])?,
                ffn_norm: read_vec(content, reader, &n("ffn_norm"), d)?,
                w_gate: read_matmul(content, reader, &n("ffn_gate"), &[ff, d])?,
                w_up: read_matmul(content, reader, &n("ffn_up"), &[ff, d])?,
                w_down: read_matmul(content, reader, &n("ffn_down"), &[d, ff])?,
            });
        }
        let output_norm = read_vec(content, reader, "output_norm.weight", d)?;
        let rope_freqs = if content.tensor_infos.contains_key("rope_freqs.weight") {
            Some(read_vec(content, reader, "rope_freqs.weight", hd / 2)?)
        } else {
            None
        };
        let tied_head = !content.tensor_infos.contains_key("output.weight");
        let head = if tied_head {
            Linear::new(embd)?
        } else {
            read_matmul(content, reader, "output.weight", &[v, d])?
        };
        let cache = vec![KvCache::default(); cfg.n_layer];
        Ok(Self {
            cfg,
            family,
            rope_freqs,
            embedding,
            blocks,
            output_norm,
            head,
            tied_head,
            cache,
            position: 0,
        })
    }

    /// The model's shape (for every family).
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The family's full configuration.
    pub fn model_config(&self) -> &ModelConfig {
        &self.family
    }

    /// Whether the output head shares `token_embd.weight` (no `output.weight` tensor in the file).
    pub fn tied_head(&self) -> bool {
        self.tied_head
    }

    /// Changes the context window (e.g. to bound memory below the file's `llama.context_length`).
    ///
    /// Errors if `n` is 0 or smaller than the current position.
    pub fn set_context_length(&mut self, n: usize) -> Result<()> {
        if n == 0 || n < self.position {
            return Err(EngineError::InvalidConfig(format!(
                "context length {n} must be non-zero and >= current position {}",
                self.position
            )));
        }
        self.cfg.context_length = n;
        self.family.base_mut().context_length = n;
        Ok(())
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(EngineError::TokenOutOfRange {
                token,
                vocab_size: self.cfg.vocab_size,
            });
        }
        let requested = self.position + tokens.len();
        if requested > self.cfg.context_length {
            return Err(EngineError::ContextOverflow {
                requested,
                context_length: self.cfg.context_length,
            });
        }
        Ok(())
    }

    /// Runs `tokens` after the cached positions; returns logits for every position if `all`,
    /// otherwise for the last one only. On error the cache is rolled back to its previous length.
    fn run(&mut self, tokens: &[u32], all: bool) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        match self.run_inner(tokens, all) {
            Ok(logits) => {
                self.position += tokens.len();
                Ok(logits)
            }
            Err(e) => {
                let keep = self.position * self.cfg.kv_dim();
                for c in &mut self.cache {
                    c.k.truncate(keep);
                    c.v.truncate(keep);
                }
                Err(e)
            }
        }
    }

    /// The forward pass proper; appends to the cache but does not move `position`.
    fn run_inner(&mut self, tokens: &[u32], all: bool) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (t_len, d, hd, kvd) = (tokens.len(), cfg.d_model, cfg.head_dim, cfg.kv_dim());
        let qd = cfg.q_dim();
        let (n_head, group) = (cfg.n_head, cfg.n_head / cfg.n_kv_head);
        let p0 = self.position;
        let eps = cfg.rms_eps;
        let layout = cfg.rope_layout;
        let gemma = match &self.family {
            ModelConfig::Gemma3(g) => Some(g),
            _ => None,
        };

        // RoPE tables for the new positions (Gemma 3: one for local, one for global layers).
        let half = hd / 2;
        let factors = self.rope_freqs.as_deref();
        let (cos, sin) = rope_tables(p0, t_len, hd, cfg.rope_base, cfg.rope_scale, factors);
        let local_tables =
            gemma.map(|g| rope_tables(p0, t_len, hd, g.rope_base_local, 1.0, factors));

        let mut h = Vec::with_capacity(t_len * d);
        for &tok in tokens {
            let r = tok as usize * d;
            h.extend_from_slice(&self.embedding[r..r + d]);
        }
        if gemma.is_some() {
            let scale = (d as f32).sqrt();
            h.iter_mut().for_each(|x| *x *= scale);
        }

        let scale = gemma.map_or(1.0 / (hd as f32).sqrt(), |g| g.query_scale);
        let mut scores = vec![0f32; p0 + t_len];
        let mut attn = vec![0f32; t_len * qd];
        for (l, (block, cache)) in self.blocks.iter().zip(self.cache.iter_mut()).enumerate() {
            let window = gemma.and_then(|g| g.is_local(l).then_some(g.sliding_window));
            let (cos, sin) = match (&local_tables, window) {
                (Some((c, s)), Some(_)) => (c, s),
                _ => (&cos, &sin),
            };
            let x = rms_norm_rows(&h, &block.attn_norm, eps);
            let mut q = linear(&block.wq, &x, t_len, d)?;
            let mut k = linear(&block.wk, &x, t_len, d)?;
            let mut v = linear(&block.wv, &x, t_len, d)?;
            for (y, b) in [
                (&mut q, &block.bq),
                (&mut k, &block.bk),
                (&mut v, &block.bv),
            ] {
                if let Some(b) = b {
                    for row in y.chunks_exact_mut(b.len()) {
                        row.iter_mut().zip(b).for_each(|(a, bi)| *a += bi);
                    }
                }
            }
            if let Some(g) = &block.q_norm {
                q = rms_norm_rows(&q, g, eps);
            }
            if let Some(g) = &block.k_norm {
                k = rms_norm_rows(&k, g, eps);
            }
            for t in 0..t_len {
                let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
                for head in q[t * qd..][..qd].chunks_exact_mut(hd) {
                    rope_head(head, c, s, layout);
                }
                for head in k[t * kvd..][..kvd].chunks_exact_mut(hd) {
                    rope_head(head, c, s, layout);
                }
            }
            cache.k.extend_from_slice(&k);
            cache.v.extend_from_slice(&v);
            let (kc, vc) = (&cache.k, &cache.v);

            attn.fill(0.0);
            for t in 0..t_len {
                let n_ctx = p0 + t + 1; // causal: positions 0..=p0+t
                                        // Sliding window: position p sees p - window < s <= p.
                let first = window.map_or(0, |w| n_ctx.saturating_sub(w));
                for hh in 0..n_head {
                    let g = hh / group;
                    let qv = &q[t * qd + hh * hd..][..hd];
                    let sc = &mut scores[first..n_ctx];
                    let mut max = f32::NEG_INFINITY;
                    for (i, out) in sc.iter_mut().enumerate() {
                        let s = first + i;
                        *out = dot(qv, &kc[s * kvd + g * hd..][..hd]) * scale;
                        max = max.max(*out);
                    }
                    let mut sum = 0f32;
                    for out in sc.iter_mut() {
                        *out = (*out - max).exp();
                        sum += *out;
                    }
                    let inv = 1.0 / sum;
                    let o = &mut attn[t * qd + hh * hd..][..hd];
                    for (i, &w) in sc.iter().enumerate() {
                        let s = first + i;
                        let w = w * inv;
                        let vs = &vc[s * kvd + g * hd..][..hd];
                        for (oi, &vi) in o.iter_mut().zip(vs) {
                            *oi += w * vi;
                        }
                    }
                }
            }
            let mut o = linear(&block.wo, &attn, t_len, qd)?;
            if let Some(g) = &block.post_attn_norm {
                o = rms_norm_rows(&o, g, eps);
            }
            for (hi, oi) in h.iter_mut().zip(&o) {
                *hi += oi;
            }

            let x = rms_norm_rows(&h, &block.ffn_norm, eps);
            let gate = linear(&block.w_gate, &x, t_len, d)?;
            let mut up = linear(&block.w_up, &x, t_len, d)?;
            if gemma.is_some() {
                for (u, &g) in up.iter_mut().zip(&gate) {
                    *u *= gelu_tanh(g);
                }
            } else {
                for (u, &g) in up.iter_mut().zip(&gate) {
                    *u *= g / (1.0 + (-g).exp());
                }
            }
            let mut down = linear(&block.w_down, &up, t_len, cfg.d_ff)?;
            if let Some(g) = &block.post_ffn_norm {
                down = rms_norm_rows(&down, g, eps);
            }
            for (hi, di) in h.iter_mut().zip(&down) {
                *hi += di;
            }
        }

        let rows = if all { &h[..] } else { &h[(t_len - 1) * d..] };
        let n_rows = rows.len() / d;
        let x = rms_norm_rows(rows, &self.output_norm, eps);
        linear(&self.head, &x, n_rows, d)
    }
}

impl Engine for LlamaModel {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn context_length(&self) -> usize {
        self.cfg.context_length
    }

    fn position(&self) -> usize {
        self.position
    }

    fn reset(&mut self) {
        for c in &mut self.cache {
            c.k.clear();
            c.v.clear();
        }
        self.position = 0;
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.run(tokens, false)
    }

    fn forward_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.run(tokens, true)
    }
}
