//! An attacker-side dense LLaMA: every matrix of a GGUF llama model (plain or encrypted) is
//! dequantized to `f32` once, and forward passes run as batched `f32` matmuls (candle's gemm),
//! which is far faster than quantized vector dot products when many inputs are evaluated at once.
//!
//! The architecture follows llama.cpp's GGUF llama layout (and our engine): RMSNorm with
//! `llama.attention.layer_norm_rms_epsilon`, RoPE on adjacent pairs `(2i, 2i+1)` with angle
//! `pos · base^(-2i/head_dim)` (`llama.rope.freq_base`, default 10000), grouped-query attention
//! (query head `h` reads kv head `h / (n_head / n_kv_head)`), SwiGLU feed-forward, and an output head
//! tied to `token_embd.weight` when `output.weight` is absent.
//!
//! The results are not bit-exact with the engine (different summation orders, no activation
//! re-quantization): they are the model's function evaluated in `f32` on dequantized weights, which
//! is what an attacker holding the file can compute.
//!
//! Memory: the weights take `4 × parameters` bytes (SmolLM2-135M: about 540 MB). A batch of `n`
//! sequences needs `n × vocab` floats of logits (SmolLM2: 192 KiB per sequence), plus small
//! activations and, for [`DenseLlama::sample`], KV caches of `2 × n_layer × n × (len + 1) × kv_dim`
//! floats.

use std::path::Path;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::{Device, Tensor};
use equicrypt_engine::LlamaConfig;
use equicrypt_model::GgufFile;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::AuditError;

/// A batch size for [`DenseLlama::first_token_logits`] that keeps gemm efficient while bounding
/// memory: 256 ids give `256 × vocab` logits (48 MiB for a 49152-token vocabulary).
pub const RECOMMENDED_BATCH: usize = 256;

/// One transformer block, every matrix dequantized and stored `[out, in]`.
struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V stacked: `[d_model + 2 kv_dim, d_model]`.
    wqkv: Tensor,
    wo: Tensor,
    ffn_norm: Vec<f32>,
    /// Gate and up stacked: `[2 d_ff, d_model]`.
    w_gate_up: Tensor,
    w_down: Tensor,
}

/// A LLaMA model with every weight dequantized to `f32`, evaluated in batches.
pub struct DenseLlama {
    cfg: LlamaConfig,
    /// `[vocab, d_model]`.
    embedding: Tensor,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `[vocab, d_model]`; the same tensor as `embedding` when the head is tied.
    head: Tensor,
}

impl std::fmt::Debug for DenseLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DenseLlama")
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Maps a candle error of a forward pass.
fn compute(e: candle_core::Error) -> AuditError {
    AuditError::Compute(e.to_string().lines().next().unwrap_or("").to_string())
}

/// Reads and dequantizes tensor `name`, checking its shape (outermost first).
fn read_f32(f: &mut GgufFile, name: &str, dims: &[usize]) -> Result<Vec<f32>, AuditError> {
    let entry = f.tensor(name)?.clone();
    if entry.dims != dims {
        return Err(AuditError::Mismatch(format!(
            "tensor '{name}' has shape {:?}, expected {dims:?}",
            entry.dims
        )));
    }
    let bytes = f.read_tensor(&entry)?;
    let deq = |e: candle_core::Error| AuditError::Dequantize {
        name: name.to_string(),
        reason: e.to_string().lines().next().unwrap_or("").to_string(),
    };
    qtensor_from_ggml(entry.dtype, &bytes, dims.to_vec(), &Device::Cpu)
        .and_then(|t| t.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(deq)
}

/// Reads several `[rows_i, cols]` matrices and stacks them into one `[Σ rows_i, cols]` tensor.
fn read_stacked(
    f: &mut GgufFile,
    parts: &[(&str, usize)],
    cols: usize,
) -> Result<Tensor, AuditError> {
    let mut all = Vec::with_capacity(parts.iter().map(|p| p.1).sum::<usize>() * cols);
    for &(name, rows) in parts {
        all.extend(read_f32(f, name, &[rows, cols])?);
    }
    let rows = all.len() / cols;
    Tensor::from_vec(all, (rows, cols), &Device::Cpu).map_err(compute)
}

/// `x · Wᵀ` for row-major `x: [rows, in]` and `w: [out, in]`; returns row-major `[rows, out]`.
fn linear(x: Vec<f32>, rows: usize, w: &Tensor) -> Result<Vec<f32>, AuditError> {
    let in_dim = x.len() / rows.max(1);
    let xt = Tensor::from_vec(x, (rows, in_dim), &Device::Cpu).map_err(compute)?;
    xt.matmul(&w.t().map_err(compute)?)
        .and_then(|y| y.flatten_all())
        .and_then(|y| y.to_vec1::<f32>())
        .map_err(compute)
}

/// RMSNorm of every `gain.len()`-wide row of `h` (sum of squares in `f64`).
fn rms_norm(h: &[f32], gain: &[f32], eps: f32) -> Vec<f32> {
    let d = gain.len();
    let mut out = Vec::with_capacity(h.len());
    for row in h.chunks_exact(d) {
        let ss: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = (1.0 / (ss / d as f64 + eps as f64).sqrt()) as f32;
        out.extend(row.iter().zip(gain).map(|(&v, &g)| v * scale * g));
    }
    out
}

/// `silu(gate) ⊙ up` from the stacked `[rows, 2 d_ff]` output of the gate/up matmul.
fn swiglu(gu: &[f32], d_ff: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(gu.len() / 2);
    for row in gu.chunks_exact(2 * d_ff) {
        let (gate, up) = row.split_at(d_ff);
        out.extend(
            gate.iter()
                .zip(up)
                .map(|(&g, &u)| u * (g / (1.0 + (-g).exp()))),
        );
    }
    out
}

/// Per-sequence KV caches of a batch, `[layer][seq][position][kv_dim]` flattened per layer.
struct BatchCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Sequences in the batch.
    n: usize,
    /// Positions reserved per sequence.
    cap: usize,
    /// Positions filled.
    pos: usize,
}

impl DenseLlama {
    /// Loads and dequantizes a GGUF llama model (plain or encrypted).
    ///
    /// Errors: unreadable or corrupt file, architecture other than `llama`, missing metadata or
    /// tensors, inconsistent sizes, tensor types candle cannot dequantize.
    pub fn load(path: &Path) -> Result<Self, AuditError> {
        let mut f = GgufFile::open(path)?;
        let cfg = equicrypt_engine::config::read_llama_config(&f.content)
            .map_err(|e| AuditError::Mismatch(e.to_string()))?;
        let (vocab, n_layer) = (cfg.vocab_size, cfg.n_layer);
        let (d, ff, kv) = (cfg.d_model, cfg.d_ff, cfg.kv_dim());
        let embedding = read_stacked(&mut f, &[("token_embd.weight", vocab)], d)?;
        let mut layers = Vec::with_capacity(n_layer);
        for l in 0..n_layer {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            layers.push(Layer {
                attn_norm: read_f32(&mut f, &n("attn_norm"), &[d])?,
                wqkv: read_stacked(
                    &mut f,
                    &[(&n("attn_q"), d), (&n("attn_k"), kv), (&n("attn_v"), kv)],
                    d,
                )?,
                wo: read_stacked(&mut f, &[(&n("attn_output"), d)], d)?,
                ffn_norm: read_f32(&mut f, &n("ffn_norm"), &[d])?,
                w_gate_up: read_stacked(&mut f, &[(&n("ffn_gate"), ff), (&n("ffn_up"), ff)], d)?,
                w_down: read_stacked(&mut f, &[(&n("ffn_down"), d)], ff)?,
            });
        }
        let output_norm = read_f32(&mut f, "output_norm.weight", &[d])?;
        let head = if f.tensors.iter().any(|t| t.name == "output.weight") {
            read_stacked(&mut f, &[("output.weight", vocab)], d)?
        } else {
            embedding.clone()
        };
        Ok(Self {
            cfg,
            embedding,
            layers,
            output_norm,
            head,
        })
    }

    /// Number of token ids (rows of `token_embd.weight`).
    pub fn vocab(&self) -> usize {
        self.cfg.vocab_size
    }

    /// Width of the residual stream.
    pub fn d_model(&self) -> usize {
        self.cfg.d_model
    }

    /// Maximum sequence length declared by the file (`llama.context_length`).
    pub fn context_length(&self) -> usize {
        self.cfg.context_length
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), AuditError> {
        match ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            Some(t) => Err(AuditError::InvalidInput(format!(
                "token id {t} is outside the vocabulary of {}",
                self.cfg.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// Embedding rows of `ids`, row-major `[ids.len(), d_model]`.
    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, AuditError> {
        let idx = Tensor::from_vec(ids.to_vec(), ids.len(), &Device::Cpu).map_err(compute)?;
        self.embedding
            .index_select(&idx, 0)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(compute)
    }

    /// Feed-forward half of a block, added into `h`.
    fn ffn(&self, layer: &Layer, h: &mut [f32], rows: usize) -> Result<(), AuditError> {
        let x = rms_norm(h, &layer.ffn_norm, self.cfg.rms_eps);
        let gu = linear(x, rows, &layer.w_gate_up)?;
        let down = linear(swiglu(&gu, self.cfg.d_ff), rows, &layer.w_down)?;
        for (hi, di) in h.iter_mut().zip(&down) {
            *hi += di;
        }
        Ok(())
    }

    /// Final norm and head: logits `[rows, vocab]`.
    fn logits(&self, h: &[f32], rows: usize) -> Result<Vec<f32>, AuditError> {
        let x = rms_norm(h, &self.output_norm, self.cfg.rms_eps);
        linear(x, rows, &self.head)
    }

    /// Next-token logits of each id run as the only token of its own sequence (position 0),
    /// row-major `[ids.len(), vocab]`.
    ///
    /// At position 0 attention over a single key is the identity on V (and RoPE is the identity),
    /// so Q and K are never computed: each block is `h += Wo·expand(Wv·norm(h))` then the FFN,
    /// batched as matmuls over all ids at once.
    ///
    /// The whole of `ids` is one batch: the caller chunks. The output holds
    /// `ids.len() × vocab` floats; [`RECOMMENDED_BATCH`] (256) is a good size (48 MiB of logits
    /// for SmolLM2, near-peak gemm throughput). Errors on ids outside the vocabulary.
    pub fn first_token_logits(&self, ids: &[u32]) -> Result<Vec<f32>, AuditError> {
        self.check_ids(ids)?;
        let rows = ids.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let cfg = &self.cfg;
        let (d, kv, hd, group) = (
            cfg.d_model,
            cfg.kv_dim(),
            cfg.head_dim,
            cfg.n_head / cfg.n_kv_head,
        );
        let mut h = self.embed(ids)?;
        for layer in &self.layers {
            let x = rms_norm(&h, &layer.attn_norm, cfg.rms_eps);
            let wv = layer.wqkv.narrow(0, d + kv, kv).map_err(compute)?;
            let v = linear(x, rows, &wv)?;
            // Query head `hh` reads kv head `hh / group`: repeat each kv head `group` times.
            let mut attn = Vec::with_capacity(rows * d);
            for vr in v.chunks_exact(kv) {
                for head in vr.chunks_exact(hd) {
                    for _ in 0..group {
                        attn.extend_from_slice(head);
                    }
                }
            }
            let o = linear(attn, rows, &layer.wo)?;
            for (hi, oi) in h.iter_mut().zip(&o) {
                *hi += oi;
            }
            self.ffn(layer, &mut h, rows)?;
        }
        self.logits(&h, rows)
    }

    fn new_cache(&self, n: usize, cap: usize) -> BatchCache {
        let size = n * cap * self.cfg.kv_dim();
        BatchCache {
            k: (0..self.cfg.n_layer).map(|_| vec![0.0; size]).collect(),
            v: (0..self.cfg.n_layer).map(|_| vec![0.0; size]).collect(),
            n,
            cap,
            pos: 0,
        }
    }

    /// One decode step: token `tokens[b]` at position `cache.pos` of sequence `b`, for every
    /// sequence of the batch; appends to the caches and returns logits `[n, vocab]`.
    fn step(&self, cache: &mut BatchCache, tokens: &[u32]) -> Result<Vec<f32>, AuditError> {
        let cfg = &self.cfg;
        let (n, pos) = (cache.n, cache.pos);
        if tokens.len() != n || pos >= cache.cap {
            return Err(AuditError::InvalidInput(format!(
                "decode step with {} tokens for {n} sequences at position {pos} of {}",
                tokens.len(),
                cache.cap
            )));
        }
        self.check_ids(tokens)?;
        let (d, kv, hd) = (cfg.d_model, cfg.kv_dim(), cfg.head_dim);
        let group = cfg.n_head / cfg.n_kv_head;
        let half = hd / 2;
        let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
        for i in 0..half {
            let inv = (cfg.rope_base as f64).powf(-2.0 * i as f64 / hd as f64);
            let (s, c) = (pos as f64 * inv).sin_cos();
            cos[i] = c as f32;
            sin[i] = s as f32;
        }
        let rope = |v: &mut [f32]| {
            for head in v.chunks_exact_mut(hd) {
                for (pair, (&c, &s)) in head.chunks_exact_mut(2).zip(cos.iter().zip(&sin)) {
                    let (x0, x1) = (pair[0], pair[1]);
                    pair[0] = x0 * c - x1 * s;
                    pair[1] = x0 * s + x1 * c;
                }
            }
        };
        let scale = 1.0 / (hd as f32).sqrt();
        let mut scores = vec![0f32; pos + 1];
        let mut h = self.embed(tokens)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let x = rms_norm(&h, &layer.attn_norm, cfg.rms_eps);
            let mut qkv = linear(x, n, &layer.wqkv)?;
            let (kc, vc) = (&mut cache.k[l], &mut cache.v[l]);
            for (b, row) in qkv.chunks_exact_mut(d + 2 * kv).enumerate() {
                let (q, kvr) = row.split_at_mut(d);
                let (k, v) = kvr.split_at_mut(kv);
                rope(q);
                rope(k);
                let at = (b * cache.cap + pos) * kv;
                kc[at..at + kv].copy_from_slice(k);
                vc[at..at + kv].copy_from_slice(v);
            }
            let mut attn = vec![0f32; n * d];
            for (b, (row, out)) in qkv
                .chunks_exact(d + 2 * kv)
                .zip(attn.chunks_exact_mut(d))
                .enumerate()
            {
                let base = b * cache.cap * kv;
                for hh in 0..cfg.n_head {
                    let g = hh / group;
                    let q = &row[hh * hd..][..hd];
                    let mut max = f32::NEG_INFINITY;
                    for (s, sc) in scores.iter_mut().enumerate() {
                        let k = &kc[base + s * kv + g * hd..][..hd];
                        *sc = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                        max = max.max(*sc);
                    }
                    let mut sum = 0f32;
                    for sc in scores.iter_mut() {
                        *sc = (*sc - max).exp();
                        sum += *sc;
                    }
                    let o = &mut out[hh * hd..][..hd];
                    for (s, &w) in scores.iter().enumerate() {
                        let w = w / sum;
                        let v = &vc[base + s * kv + g * hd..][..hd];
                        for (oi, &vi) in o.iter_mut().zip(v) {
                            *oi += w * vi;
                        }
                    }
                }
            }
            let o = linear(attn, n, &layer.wo)?;
            for (hi, oi) in h.iter_mut().zip(&o) {
                *hi += oi;
            }
            self.ffn(layer, &mut h, n)?;
        }
        cache.pos += 1;
        self.logits(&h, n)
    }

    /// Next-token logits after the last token of each of `seqs` (all of the same, non-zero length),
    /// run together as one batch: row-major `[seqs.len(), vocab]`.
    pub fn last_logits(&self, seqs: &[Vec<u32>]) -> Result<Vec<f32>, AuditError> {
        let len = seqs.first().map_or(0, Vec::len);
        if len == 0 || seqs.iter().any(|s| s.len() != len) {
            return Err(AuditError::InvalidInput(
                "last_logits needs sequences of one non-zero length".into(),
            ));
        }
        let mut cache = self.new_cache(seqs.len(), len);
        let mut logits = Vec::new();
        for t in 0..len {
            let toks: Vec<u32> = seqs.iter().map(|s| s[t]).collect();
            logits = self.step(&mut cache, &toks)?;
        }
        Ok(logits)
    }

    /// Runs `seqs` (all of the same length) token by token as one batch and returns the logits
    /// after every step, `[step][seq × vocab]`. Test support for the decode path.
    #[cfg(test)]
    fn teacher_forced(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, AuditError> {
        let len = seqs.first().map_or(0, Vec::len);
        let mut cache = self.new_cache(seqs.len(), len);
        (0..len)
            .map(|t| {
                let toks: Vec<u32> = seqs.iter().map(|s| s[t]).collect();
                self.step(&mut cache, &toks)
            })
            .collect()
    }

    /// Samples one continuation per entry of `starts` (each sequence begins with that id), all
    /// sequences decoded together as one batch with their own KV caches, `len` new tokens each, at
    /// `temperature` (> 0) with a ChaCha20 stream seeded by `seed`. Calls `on_step(step)` after
    /// every step (`step` = 1..=len). Returns the sequences (start id included, `len + 1` ids).
    ///
    /// Sampling draws from `softmax(logits / temperature)` (no top-k/top-p); one 24-bit uniform
    /// per sequence per step, sequences in order. A tiny temperature gives greedy decoding.
    /// Memory: KV caches of `2 × n_layer × starts.len() × (len + 1) × kv_dim` floats plus
    /// `starts.len() × vocab` floats of logits per step.
    ///
    /// Errors: ids outside the vocabulary, `temperature` not finite and positive,
    /// `len + 1` above the context length.
    pub fn sample(
        &self,
        starts: &[u32],
        len: usize,
        temperature: f32,
        seed: u64,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<u32>>, AuditError> {
        self.check_ids(starts)?;
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(AuditError::InvalidInput(format!(
                "temperature {temperature} must be finite and > 0"
            )));
        }
        if len >= self.cfg.context_length {
            return Err(AuditError::InvalidInput(format!(
                "{} tokens exceed the context length {}",
                len + 1,
                self.cfg.context_length
            )));
        }
        let mut seqs: Vec<Vec<u32>> = starts
            .iter()
            .map(|&s| {
                let mut v = Vec::with_capacity(len + 1);
                v.push(s);
                v
            })
            .collect();
        if starts.is_empty() || len == 0 {
            return Ok(seqs);
        }
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut cache = self.new_cache(starts.len(), len);
        let mut current = starts.to_vec();
        let mut probs = vec![0f32; self.cfg.vocab_size];
        for step in 1..=len {
            let logits = self.step(&mut cache, &current)?;
            for ((row, seq), cur) in logits
                .chunks_exact(self.cfg.vocab_size)
                .zip(&mut seqs)
                .zip(&mut current)
            {
                let u = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
                let next = sample_row(row, temperature, u, &mut probs);
                seq.push(next);
                *cur = next;
            }
            on_step(step);
        }
        Ok(seqs)
    }
}

/// Draws from `softmax(row / temperature)` with the uniform `u ∈ [0, 1)`; `probs` is scratch.
fn sample_row(row: &[f32], temperature: f32, u: f32, probs: &mut [f32]) -> u32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for (p, &l) in probs.iter_mut().zip(row) {
        *p = ((l - max) / temperature).exp();
        sum += *p as f64;
    }
    let target = u as f64 * sum;
    let mut acc = 0f64;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            last = i;
            acc += p as f64;
            if acc > target {
                return i as u32;
            }
        }
    }
    last as u32
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use equicrypt_model::synthetic::SyntheticLlama;
    use std::collections::HashMap;

    /// Straightforward per-sequence full-attention forward in plain `f32` loops.
    struct Reference {
        t: HashMap<String, Vec<f32>>,
        c: LlamaConfig,
    }

    impl Reference {
        fn load(path: &Path, m: &DenseLlama) -> Self {
            let mut f = GgufFile::open(path).unwrap();
            let mut t = HashMap::new();
            for e in f.tensors.clone() {
                let dims = e.dims.clone();
                t.insert(e.name.clone(), read_f32(&mut f, &e.name, &dims).unwrap());
            }
            Self {
                t,
                c: m.cfg.clone(),
            }
        }

        fn mv(&self, name: &str, x: &[f32]) -> Vec<f32> {
            let w = &self.t[name];
            w.chunks_exact(x.len())
                .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
                .collect()
        }

        fn norm(&self, name: &str, x: &[f32]) -> Vec<f32> {
            let g = &self.t[name];
            let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
            let s = 1.0 / (ms + self.c.rms_eps).sqrt();
            x.iter().zip(g).map(|(v, g)| v * s * g).collect()
        }

        fn rope(&self, v: &mut [f32], pos: usize) {
            let hd = self.c.head_dim;
            for head in v.chunks_exact_mut(hd) {
                for i in 0..hd / 2 {
                    let th = pos as f32 * self.c.rope_base.powf(-2.0 * i as f32 / hd as f32);
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * th.cos() - b * th.sin();
                    head[2 * i + 1] = a * th.sin() + b * th.cos();
                }
            }
        }

        /// Logits after the last token of `toks`.
        fn forward(&self, toks: &[u32]) -> Vec<f32> {
            let c = &self.c;
            let (d, hd) = (c.d_model, c.head_dim);
            let emb = &self.t["token_embd.weight"];
            let mut hs: Vec<Vec<f32>> = toks
                .iter()
                .map(|&t| emb[t as usize * d..][..d].to_vec())
                .collect();
            for l in 0..c.n_layer {
                let n = |s: &str| format!("blk.{l}.{s}.weight");
                let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
                for (p, h) in hs.iter().enumerate() {
                    let x = self.norm(&n("attn_norm"), h);
                    let mut q = self.mv(&n("attn_q"), &x);
                    let mut k = self.mv(&n("attn_k"), &x);
                    self.rope(&mut q, p);
                    self.rope(&mut k, p);
                    qs.push(q);
                    ks.push(k);
                    vs.push(self.mv(&n("attn_v"), &x));
                }
                for p in 0..hs.len() {
                    let mut att = vec![0f32; d];
                    for hh in 0..c.n_head {
                        let g = hh * c.n_kv_head / c.n_head;
                        let sc: Vec<f32> = (0..=p)
                            .map(|s| {
                                (0..hd)
                                    .map(|i| qs[p][hh * hd + i] * ks[s][g * hd + i])
                                    .sum::<f32>()
                                    / (hd as f32).sqrt()
                            })
                            .collect();
                        let m = sc.iter().copied().fold(f32::MIN, f32::max);
                        let z: f32 = sc.iter().map(|s| (s - m).exp()).sum();
                        for (s, v) in sc.iter().enumerate() {
                            for i in 0..hd {
                                att[hh * hd + i] += (v - m).exp() / z * vs[s][g * hd + i];
                            }
                        }
                    }
                    let o = self.mv(&n("attn_output"), &att);
                    let h = &mut hs[p];
                    for (a, b) in h.iter_mut().zip(o) {
                        *a += b;
                    }
                    let x = self.norm(&n("ffn_norm"), h);
                    let g = self.mv(&n("ffn_gate"), &x);
                    let u = self.mv(&n("ffn_up"), &x);
                    let a: Vec<f32> = g
                        .iter()
                        .zip(&u)
                        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                        .collect();
                    for (a, b) in h.iter_mut().zip(self.mv(&n("ffn_down"), &a)) {
                        *a += b;
                    }
                }
            }
            let x = self.norm("output_norm.weight", hs.last().unwrap());
            let head = if self.t.contains_key("output.weight") {
                "output.weight"
            } else {
                "token_embd.weight"
            };
            self.mv(head, &x)
        }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn argmax(v: &[f32]) -> usize {
        (0..v.len()).fold(0, |m, i| if v[i] > v[m] { i } else { m })
    }

    fn tiny(seed: u64, untied: bool) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut s = SyntheticLlama::tiny_f32(seed);
        s.untied_head = untied;
        s.write(&path).unwrap();
        (dir, path)
    }

    #[test]
    fn first_token_logits_match_the_reference() {
        for untied in [false, true] {
            let (_d, path) = tiny(7, untied);
            let m = DenseLlama::load(&path).unwrap();
            let r = Reference::load(&path, &m);
            let ids = [0u32, 5, 17, 95, 5];
            let got = m.first_token_logits(&ids).unwrap();
            assert_eq!(got.len(), ids.len() * m.vocab());
            for (i, &id) in ids.iter().enumerate() {
                let want = r.forward(&[id]);
                let row = &got[i * m.vocab()..][..m.vocab()];
                assert!(
                    max_diff(row, &want) < 1e-4,
                    "id {id}: {}",
                    max_diff(row, &want)
                );
            }
            // The batched decode path agrees at position 0 too.
            let step = m.teacher_forced(&[vec![17], vec![95]]).unwrap();
            assert!(max_diff(&step[0], &got[2 * m.vocab()..4 * m.vocab()]) < 1e-4);
        }
    }

    #[test]
    fn batched_decode_matches_full_attention() {
        let (_d, path) = tiny(11, false);
        let m = DenseLlama::load(&path).unwrap();
        let r = Reference::load(&path, &m);
        let seqs = vec![vec![3u32, 40, 7, 90], vec![60, 2, 2, 33], vec![1, 1, 1, 1]];
        let steps = m.teacher_forced(&seqs).unwrap();
        let v = m.vocab();
        for (t, logits) in steps.iter().enumerate() {
            for (b, s) in seqs.iter().enumerate() {
                let want = r.forward(&s[..=t]);
                let got = &logits[b * v..][..v];
                assert!(max_diff(got, &want) < 1e-4, "seq {b} step {t}");
            }
        }
        // Greedy sampling (tiny temperature) follows the reference argmax.
        let out = m.sample(&[3, 60], 3, 1e-6, 1, &mut |_| {}).unwrap();
        for s in &out {
            assert_eq!(s.len(), 4);
            for t in 1..s.len() {
                assert_eq!(s[t] as usize, argmax(&r.forward(&s[..t])), "{s:?}");
            }
        }
    }

    #[test]
    fn sampling_is_seeded_and_reports_steps() {
        // Untied head: with a tied one the tiny random model just repeats its input.
        let (_d, path) = tiny(3, true);
        let m = DenseLlama::load(&path).unwrap();
        let mut steps = vec![];
        let a = m
            .sample(&[1, 2, 3], 5, 1.0, 9, &mut |s| steps.push(s))
            .unwrap();
        assert_eq!(steps, vec![1, 2, 3, 4, 5]);
        let b = m.sample(&[1, 2, 3], 5, 1.0, 9, &mut |_| {}).unwrap();
        let c = m.sample(&[1, 2, 3], 5, 1.0, 10, &mut |_| {}).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.iter().map(|s| s[0]).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(a.iter().flatten().all(|&t| (t as usize) < m.vocab()));
        // A high temperature spreads the draws over many ids.
        let hot = m.sample(&[1; 8], 8, 50.0, 1, &mut |_| {}).unwrap();
        let distinct: std::collections::HashSet<_> = hot.iter().flat_map(|s| &s[1..]).collect();
        assert!(distinct.len() > 20, "{}", distinct.len());
    }

    #[test]
    fn bad_input_is_an_error() {
        let (_d, path) = tiny(3, false);
        let m = DenseLlama::load(&path).unwrap();
        assert!(m.first_token_logits(&[96]).is_err());
        assert!(m.first_token_logits(&[]).unwrap().is_empty());
        assert!(m.sample(&[1], 2, 0.0, 0, &mut |_| {}).is_err());
        assert!(m.sample(&[1], 2, f32::NAN, 0, &mut |_| {}).is_err());
        assert!(m.sample(&[1], 256, 1.0, 0, &mut |_| {}).is_err());
        assert!(m.sample(&[200], 2, 1.0, 0, &mut |_| {}).is_err());
        assert_eq!(
            m.sample(&[4], 0, 1.0, 0, &mut |_| {}).unwrap(),
            vec![vec![4]]
        );
        let junk = _d.path().join("junk.gguf");
        std::fs::write(&junk, b"not a gguf").unwrap();
        assert!(DenseLlama::load(&junk).is_err());
        assert!(DenseLlama::load(&_d.path().join("missing.gguf")).is_err());
    }

    const SMOLLM2: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    );

    #[test]
    fn smollm2_matches_the_reference() {
        let path = Path::new(SMOLLM2);
        if !path.exists() {
            eprintln!("note: {SMOLLM2} absent, skipping");
            return;
        }
        let m = DenseLlama::load(path).unwrap();
        let r = Reference::load(path, &m);
        let ids = [1u32, 504, 2543, 30000];
        let got = m.first_token_logits(&ids).unwrap();
        let v = m.vocab();
        for (i, &id) in ids.iter().enumerate() {
            let want = r.forward(&[id]);
            let row = &got[i * v..][..v];
            assert_eq!(argmax(row), argmax(&want), "id {id}");
            assert!(
                max_diff(row, &want) < 2e-2,
                "id {id}: {}",
                max_diff(row, &want)
            );
        }
        // Three decode steps of the batch agree with full attention.
        let seqs = vec![vec![1u32, 504, 2543], vec![30000, 12, 9]];
        let steps = m.teacher_forced(&seqs).unwrap();
        for (b, s) in seqs.iter().enumerate() {
            let want = r.forward(s);
            let got = &steps[2][b * v..][..v];
            assert_eq!(argmax(got), argmax(&want));
            assert!(
                max_diff(got, &want) < 2e-2,
                "seq {b}: {}",
                max_diff(got, &want)
            );
        }
    }

    /// CPU seconds of this process (user + system), from `/proc/self/stat` (shared by the
    /// ignored measurement tests).
    pub(crate) fn cpu_seconds() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<f64> = after
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
    }

    /// Throughput on SmolLM2 (run with `--ignored --nocapture`, set `RAYON_NUM_THREADS`).
    #[test]
    #[ignore]
    fn bench_smollm2() {
        let path = Path::new(SMOLLM2);
        if !path.exists() {
            eprintln!("note: {SMOLLM2} absent, skipping");
            return;
        }
        let t = std::time::Instant::now();
        let m = DenseLlama::load(path).unwrap();
        eprintln!("load: {:.2} s", t.elapsed().as_secs_f64());
        for batch in [64usize, 128, 256, 512] {
            let ids: Vec<u32> = (0..batch as u32).map(|i| i * 97 % 49152).collect();
            m.first_token_logits(&ids[..8]).unwrap();
            let (t, c) = (std::time::Instant::now(), cpu_seconds());
            let reps = (1024 / batch).max(1);
            for _ in 0..reps {
                m.first_token_logits(&ids).unwrap();
            }
            let s = t.elapsed().as_secs_f64();
            let c = cpu_seconds() - c;
            let n = (reps * batch) as f64;
            eprintln!(
                "first_token_logits batch {batch}: {:.1} ids/s wall, {:.1} ids per cpu-s",
                n / s,
                n / c
            );
        }
        let starts: Vec<u32> = (0..64u32).map(|i| i * 311 % 49152).collect();
        let (t, c) = (std::time::Instant::now(), cpu_seconds());
        let out = m.sample(&starts, 64, 1.0, 1, &mut |_| {}).unwrap();
        let s = t.elapsed().as_secs_f64();
        assert_eq!(out.len(), 64);
        let c = cpu_seconds() - c;
        eprintln!(
            "sample 64 x 64: {s:.2} s wall, {c:.2} s cpu: {:.1} tokens/s wall, {:.1} per cpu-s",
            64.0 * 64.0 / s,
            64.0 * 64.0 / c
        );
    }
}
