//! Quantized `x · Wᵀ` whose reductions are exactly order-independent inside 32-value blocks.
//!
//! candle 0.11.1's CPU `vec_dot` for **Q8_0×Q8_0 and Q4_0×Q8_0** uses AVX2 kernels that convert
//! 4-element integer partial sums to `f32` per SIMD lane and accumulate the lanes across blocks with
//! FMA before a final horizontal add: the rounding then depends on which positions of a block land in
//! which lane, so permuting values inside a block changes the last bits. (On AVX512-VNNI machines a
//! Q8_0 weight with `in % 256 == 0` even takes a repacked path that quantizes activations over 256
//! values.) This module therefore runs Q8_0 and Q4_0 weights itself: activations are quantized to
//! Q8_0/Q8_1 per 32-block exactly like ggml (`d = amax/127` stored as f16, `q = round(x/d)`,
//! `s = f16(Σq)·f16(d)` rounded to f16, as candle does), each block's dot product is an exact `i32` sum, and the blocks are added in their
//! fixed order as `f32`: `sum += (sumi as f32 * w_d) * x_d (+ w_min * x_s)`, like candle's generic
//! kernels. The `min` term (`w_min * x_s`, Q4_1-style) is supported by the kernel but Q4_1 is left to
//! candle, whose scalar generic kernel measured faster than this one (which LLVM does not vectorize).
//!
//! candle's Q4_1, Q5_0 and Q5_1 kernels are already generic (integer sum per block, fixed block
//! order) and are used as they are. K-quants and dense F32/F16/BF16 weights also go through candle and
//! are **not** guaranteed to be order-independent.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::error::{EngineError, Result};

/// Values per quantization block.
const QK: usize = 32;
/// Output rows per parallel work item.
const ROWS_PER_TASK: usize = 64;

/// Block-quantized weights unpacked to one `i8` code per value and `f32` scale (and min) per block.
///
/// A value is `code * scale` (Q8_0, Q4_0 with codes `nibble - 8`) or `code * scale + min` (Q4_1).
/// Invariants: `quants.len() == rows * cols`, `scales.len() == rows * cols / 32`, `mins` is empty or as
/// long as `scales`, `cols % 32 == 0`.
pub(crate) struct BlockWeights {
    rows: usize,
    cols: usize,
    scales: Vec<f32>,
    mins: Vec<f32>,
    quants: Vec<i8>,
}

/// A weight matrix `[out, in]` ready for `x · Wᵀ`.
pub(crate) enum Linear {
    /// Q8_0 / Q4_0, run by this module's order-independent kernel.
    Blocks(BlockWeights),
    /// Anything else, run by candle.
    Candle(QMatMul),
}

/// Expands one packed block into 32 codes.
type Unpack = fn(&[u8], &mut [i8]);

fn f16_at(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// ggml 4-bit packing: low nibble = element j, high nibble = element j + 16.
fn unpack_nibbles(qs: &[u8], offset: i8, out: &mut [i8]) {
    for j in 0..16 {
        out[j] = (qs[j] & 0x0f) as i8 - offset;
        out[j + 16] = (qs[j] >> 4) as i8 - offset;
    }
}

impl Linear {
    /// Wraps a `[out, in]` tensor. Quantized types never get dequantized (candle's
    /// `CANDLE_DEQUANTIZE_ALL*` switches would make reductions order-dependent).
    pub(crate) fn new(t: Arc<QTensor>) -> Result<Self> {
        let dims = t.shape().dims().to_vec();
        let (rows, cols) = match dims.as_slice() {
            [r, c] => (*r, *c),
            _ => {
                return Err(EngineError::InvalidConfig(format!(
                    "matrix expected, got shape {dims:?}"
                )))
            }
        };
        // (bytes per block, has a min, unpack)
        let (block_bytes, has_min, unpack): (usize, bool, Unpack) = match t.dtype() {
            GgmlDType::Q8_0 => (34, false, |b, out| {
                for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                    *o = q as i8;
                }
            }),
            GgmlDType::Q4_0 => (18, false, |b, out| unpack_nibbles(&b[2..18], 8, out)),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                return Ok(Self::Candle(QMatMul::from_arc(t)?))
            }
            _ => return Ok(Self::Candle(QMatMul::QTensor(t))),
        };
        if cols % QK != 0 {
            return Err(EngineError::InvalidConfig(format!(
                "input width {cols} is not a multiple of {QK}"
            )));
        }
        let data = t.data()?;
        let n_blocks = rows * cols / QK;
        if data.len() != n_blocks * block_bytes {
            return Err(EngineError::InvalidConfig(format!(
                "{:?} tensor holds {} bytes, expected {}",
                t.dtype(),
                data.len(),
                n_blocks * block_bytes
            )));
        }
        let mut scales = Vec::with_capacity(n_blocks);
        let mut mins = Vec::with_capacity(if has_min { n_blocks } else { 0 });
        let mut quants = vec![0i8; rows * cols];
        for (b, out) in data
            .chunks_exact(block_bytes)
            .zip(quants.chunks_exact_mut(QK))
        {
            scales.push(f16_at(b));
            if has_min {
                mins.push(f16_at(&b[2..]));
            }
            unpack(b, out);
        }
        Ok(Self::Blocks(BlockWeights {
            rows,
            cols,
            scales,
            mins,
            quants,
        }))
    }

    /// `x · Wᵀ` for row-major `x: [m, in]`, returning row-major `[m, out]`.
    pub(crate) fn forward(&self, x: &[f32], m: usize, in_dim: usize) -> Result<Vec<f32>> {
        match self {
            Self::Candle(w) => {
                let t = Tensor::from_slice(x, (m, in_dim), &Device::Cpu)?;
                Ok(w.forward(&t)?.flatten_all()?.to_vec1::<f32>()?)
            }
            Self::Blocks(w) => {
                if in_dim != w.cols || x.len() != m * in_dim {
                    return Err(EngineError::InvalidConfig(format!(
                        "matmul input [{m}, {in_dim}] does not match weight [{}, {}]",
                        w.rows, w.cols
                    )));
                }
                Ok(w.matmul(x, m))
            }
        }
    }
}

/// One activation row quantized to Q8_1-style blocks: codes, scale `d` (f16) and
/// `s = f16(Σcodes) · f16(d)` in f16 arithmetic (candle's `BlockQ8_1`; ggml's reference rounds
/// `f16(d · Σcodes)` instead; candle's variant agreed longer with llama.cpp's greedy output on SmolLM2).
struct QuantRow {
    quants: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
}

/// Quantizes one row exactly like ggml's reference `quantize_row_q8_0` / `quantize_row_q8_1`.
///
/// Block-local and order-independent: a permutation inside a block permutes its codes and leaves
/// `d` and `s` unchanged (`amax` and the integer code sum do not depend on the order).
fn quantize_row(x: &[f32]) -> QuantRow {
    let nb = x.len() / QK;
    let mut r = QuantRow {
        quants: vec![0i8; x.len()],
        scales: Vec::with_capacity(nb),
        sums: Vec::with_capacity(nb),
    };
    for (xb, qb) in x.chunks_exact(QK).zip(r.quants.chunks_exact_mut(QK)) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        r.scales.push(f16::from_f32(d).to_f32());
        r.sums
            .push((f16::from_f32(sum as f32) * f16::from_f32(d)).to_f32());
    }
    r
}

/// Exact integer dot product of two 32-value blocks.
///
/// Fixed-size arrays let LLVM vectorize it (integer addition is associative, so it may reorder).
#[inline(always)]
fn block_dot(a: &[i8], b: &[i8]) -> i32 {
    let a: &[i8; QK] = a.try_into().expect("block of 32");
    let b: &[i8; QK] = b.try_into().expect("block of 32");
    let mut acc = [0i32; 16];
    for j in 0..QK / 16 {
        for l in 0..16 {
            acc[l] += a[j * 16 + l] as i32 * b[j * 16 + l] as i32;
        }
    }
    acc.iter().sum()
}

impl BlockWeights {
    /// Dot product of weight row `r` with a quantized activation row; blocks added in index order.
    #[inline]
    fn row_dot(&self, r: usize, x: &QuantRow) -> f32 {
        let (k, nb) = (self.cols, self.cols / QK);
        let wq = &self.quants[r * k..(r + 1) * k];
        let ws = &self.scales[r * nb..(r + 1) * nb];
        let mut sum = 0f32;
        if self.mins.is_empty() {
            for (b, (wb, xb)) in wq
                .chunks_exact(QK)
                .zip(x.quants.chunks_exact(QK))
                .enumerate()
            {
                sum += (block_dot(wb, xb) as f32 * ws[b]) * x.scales[b];
            }
        } else {
            let wm = &self.mins[r * nb..(r + 1) * nb];
            for (b, (wb, xb)) in wq
                .chunks_exact(QK)
                .zip(x.quants.chunks_exact(QK))
                .enumerate()
            {
                sum += (block_dot(wb, xb) as f32 * ws[b]) * x.scales[b] + wm[b] * x.sums[b];
            }
        }
        sum
    }

    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let n = self.rows;
        let mut out = vec![0f32; m * n];
        for (orow, xr) in out.chunks_exact_mut(n).zip(x.chunks_exact(self.cols)) {
            let xq = quantize_row(xr);
            orow.par_chunks_mut(ROWS_PER_TASK)
                .enumerate()
                .for_each(|(c, chunk)| {
                    for (i, o) in chunk.iter_mut().enumerate() {
                        *o = self.row_dot(c * ROWS_PER_TASK + i, &xq);
                    }
                });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 8388608.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_candle_and_reference() {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let (n, k, m) = (70, 128, 3);
            let w = Tensor::from_vec(data(n * k, 1), (n, k), &Device::Cpu).unwrap();
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let ours = Linear::new(q.clone()).unwrap();
            assert!(matches!(ours, Linear::Blocks(_)));
            let x = data(m * k, 9);
            let got = ours.forward(&x, m, k).unwrap();
            let want = Linear::Candle(QMatMul::QTensor(q.clone()))
                .forward(&x, m, k)
                .unwrap();
            // dequantized f32 reference
            let wd = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for r in 0..m {
                for c in 0..n {
                    let exact: f32 = wd[c]
                        .iter()
                        .zip(&x[r * k..(r + 1) * k])
                        .map(|(a, b)| a * b)
                        .sum();
                    let (g, w2) = (got[r * n + c], want[r * n + c]);
                    // Q4_1: candle's generic kernel rounds intermediate products differently
                    let tol = if dtype == GgmlDType::Q4_1 { 5e-3 } else { 1e-4 };
                    assert!((g - w2).abs() <= tol, "{dtype:?} candle {w2} ours {g}");
                    assert!((g - exact).abs() < 0.05, "{dtype:?} f32 {exact} ours {g}");
                }
            }
        }
    }
}
