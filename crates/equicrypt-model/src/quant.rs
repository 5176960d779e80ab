//! Lossless, quantization-block-aware row/column permutations and row negation of raw GGUF
//! tensor bytes.
//!
//! GGUF block types quantize consecutive values along `ne0` (a row): the legacy types
//! (Q4_0 … Q8_0) 32 values with one scale (and min); the K-quants 256-value *super-blocks* with
//! one `d` (and `dmin`) and 16 sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 8 sub-blocks of 32 (Q4_K,
//! Q5_K), each with its own packed scale (and min). Moving rows is a byte copy. Moving columns is
//! lossless only when every new block holds exactly the values of one old block and every new
//! sub-block those of one old sub-block, so column permutations must be *group preserving* at
//! both levels: values move inside their sub-block, sub-blocks move inside their super-block
//! carrying their scale and min (bits moved as stored), codes are repacked, never re-quantized.
//! Negating a row flips the sign bit of every block's `d` (and `dmin`/`m`): exact in every format.
//! See `docs/ee-math.md`, "Quantized weights" and "K-quant layouts".

use candle_core::quantized::GgmlDType;
use equicrypt_core::{Permutation, TensorTransform};

use crate::ModelError;

/// Values per legacy quantization block.
const QK: usize = 32;
/// Values per K-quant super-block.
pub const QK_K: usize = 256;

/// The storage layout of one supported tensor type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockFormat {
    /// Plain little-endian floats of `bytes` each (F32 = 4, F16/BF16 = 2).
    Float {
        /// Bytes per value.
        bytes: usize,
    },
    /// `d: f16`, 16 bytes of nibbles (low = j, high = j + 16).
    Q4_0,
    /// `d: f16`, `m: f16`, 16 bytes of nibbles.
    Q4_1,
    /// `d: f16`, `qh: u32` (bit j = fifth bit of element j), 16 bytes of nibbles.
    Q5_0,
    /// `d: f16`, `m: f16`, `qh: u32`, 16 bytes of nibbles.
    Q5_1,
    /// `d: f16`, 32 signed bytes.
    Q8_0,
    /// `scales[16]` (4-bit scale ‖ 4-bit min per 16-value sub-block), `qs[64]` (2-bit codes),
    /// `d: f16`, `dmin: f16`: 84 bytes per 256 values.
    Q2K,
    /// `hmask[32]` (third bits), `qs[64]` (low 2 bits), `scales[12]` (16 packed 6-bit scales),
    /// `d: f16`: 110 bytes.
    Q3K,
    /// `d`, `dmin` (f16), `scales[12]` (8 packed 6-bit scales and 8 mins), `qs[128]` (nibbles; per
    /// 64-value chunk low nibbles = first 32, high = next 32): 144 bytes.
    Q4K,
    /// As Q4_K plus `qh[32]` (fifth bits) before `qs`: 176 bytes.
    Q5K,
    /// `ql[128]` (low nibbles), `qh[64]` (high 2 bits), `scales[16]` (int8), `d: f16`: 210 bytes.
    Q6K,
}

/// Where element `e` of a K-quant super-block keeps its bits: `(byte, shift, width)` pieces.
type BitPiece = (usize, u32, u32);

impl BlockFormat {
    /// The format of a GGML type, or an error naming an unsupported one (IQ types, Q8_K, …).
    pub fn of(dtype: GgmlDType) -> Result<Self, ModelError> {
        Ok(match dtype {
            GgmlDType::F32 => BlockFormat::Float { bytes: 4 },
            GgmlDType::F16 | GgmlDType::BF16 => BlockFormat::Float { bytes: 2 },
            GgmlDType::Q4_0 => BlockFormat::Q4_0,
            GgmlDType::Q4_1 => BlockFormat::Q4_1,
            GgmlDType::Q5_0 => BlockFormat::Q5_0,
            GgmlDType::Q5_1 => BlockFormat::Q5_1,
            GgmlDType::Q8_0 => BlockFormat::Q8_0,
            GgmlDType::Q2K => BlockFormat::Q2K,
            GgmlDType::Q3K => BlockFormat::Q3K,
            GgmlDType::Q4K => BlockFormat::Q4K,
            GgmlDType::Q5K => BlockFormat::Q5K,
            GgmlDType::Q6K => BlockFormat::Q6K,
            other => return Err(ModelError::UnsupportedTensorType(format!("{other:?}"))),
        })
    }

    /// Whether this is a K-quant (256-value super-blocks with sub-block scales).
    pub fn is_k_quant(self) -> bool {
        matches!(
            self,
            BlockFormat::Q2K
                | BlockFormat::Q3K
                | BlockFormat::Q4K
                | BlockFormat::Q5K
                | BlockFormat::Q6K
        )
    }

    /// Values per block (1 for float types, 32 for legacy types, 256 for K-quants).
    pub fn block_elems(self) -> usize {
        match self {
            BlockFormat::Float { .. } => 1,
            f if f.is_k_quant() => QK_K,
            _ => QK,
        }
    }

    /// Values per sub-block, the finest group a column permutation may not leave (1 for float
    /// types, 32 for legacy types, 16 for Q2_K/Q3_K/Q6_K, 32 for Q4_K/Q5_K).
    pub fn sub_block(self) -> usize {
        match self {
            BlockFormat::Float { .. } => 1,
            BlockFormat::Q2K | BlockFormat::Q3K | BlockFormat::Q6K => 16,
            _ => QK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Float { bytes } => bytes,
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q5_0 => 22,
            BlockFormat::Q5_1 => 24,
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q2K => 84,
            BlockFormat::Q3K => 110,
            BlockFormat::Q4K => 144,
            BlockFormat::Q5K => 176,
            BlockFormat::Q6K => 210,
        }
    }

    /// Bytes of one row of `cols` values.
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }

    /// Byte offsets of the sign-carrying f16 scale fields inside a block (`d`, and `m`/`dmin`
    /// when present).
    fn sign_fields(self) -> &'static [usize] {
        match self {
            BlockFormat::Float { .. } => &[0],
            BlockFormat::Q4_0 | BlockFormat::Q5_0 | BlockFormat::Q8_0 => &[0],
            BlockFormat::Q4_1 | BlockFormat::Q5_1 | BlockFormat::Q4K | BlockFormat::Q5K => &[0, 2],
            BlockFormat::Q2K => &[80, 82],
            BlockFormat::Q3K => &[108],
            BlockFormat::Q6K => &[208],
        }
    }

    /// Unpacks the codes of a quantized block into `codes` (element order, one per value).
    fn unpack(self, block: &[u8], codes: &mut [u8]) {
        match self {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q5_0 | BlockFormat::Q5_1 => {
                let (qh, qs) = self.nibble_fields(block);
                for j in 0..QK / 2 {
                    codes[j] = qs[j] & 0x0F;
                    codes[j + QK / 2] = qs[j] >> 4;
                }
                if let Some(qh) = qh {
                    for (j, c) in codes.iter_mut().enumerate().take(QK) {
                        *c |= (((qh >> j) & 1) as u8) << 4;
                    }
                }
            }
            BlockFormat::Q8_0 => codes[..QK].copy_from_slice(&block[2..2 + QK]),
            f if f.is_k_quant() => {
                for (e, c) in codes.iter_mut().enumerate().take(QK_K) {
                    let mut v = 0u8;
                    let mut at = 0;
                    for (byte, shift, width) in f.k_pieces(e) {
                        let bits = (block[byte] >> shift) & ((1u8 << width) - 1);
                        v |= bits << at;
                        at += width;
                    }
                    *c = v;
                }
            }
            BlockFormat::Float { .. } | _ => unreachable!("float types have no codes"),
        }
    }

    /// Packs codes (element order) into the code fields of `block`; scales are untouched.
    fn pack(self, codes: &[u8], block: &mut [u8]) {
        match self {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q5_0 | BlockFormat::Q5_1 => {
                let qs_at = self.qs_offset();
                for j in 0..QK / 2 {
                    block[qs_at + j] = (codes[j] & 0x0F) | ((codes[j + QK / 2] & 0x0F) << 4);
                }
                if let Some(qh_at) = self.qh_offset() {
                    let qh = codes[..QK]
                        .iter()
                        .enumerate()
                        .fold(0u32, |acc, (j, &c)| acc | (u32::from(c >> 4 & 1) << j));
                    block[qh_at..qh_at + 4].copy_from_slice(&qh.to_le_bytes());
                }
            }
            BlockFormat::Q8_0 => block[2..2 + QK].copy_from_slice(&codes[..QK]),
            f if f.is_k_quant() => {
                for (e, &c) in codes.iter().enumerate().take(QK_K) {
                    let mut at = 0;
                    for (byte, shift, width) in f.k_pieces(e) {
                        let mask = ((1u8 << width) - 1) << shift;
                        let bits = ((c >> at) << shift) & mask;
                        block[byte] = (block[byte] & !mask) | bits;
                        at += width;
                    }
                }
            }
            BlockFormat::Float { .. } | _ => unreachable!("float types have no codes"),
        }
    }

    /// The bit pieces (low bits first) holding the code of element `e` of a K-quant block, as
    /// ggml's `dequantize_row_q*_K` reads them.
    fn k_pieces(self, e: usize) -> impl Iterator<Item = BitPiece> {
        let pieces: [Option<BitPiece>; 2] = match self {
            // 128-value halves; inside, 4 shifts × (2 × 16 values) over 32 bytes.
            BlockFormat::Q2K | BlockFormat::Q3K => {
                let (n, r) = (e / 128, e % 128);
                let (j, half, l) = (r / 32, (r % 32) / 16, r % 16);
                let q_at = if self == BlockFormat::Q2K { 16 } else { 32 };
                let low = (q_at + n * 32 + half * 16 + l, 2 * j as u32, 2);
                let high =
                    (self == BlockFormat::Q3K).then(|| (half * 16 + l, (n * 4 + j) as u32, 1));
                [Some(low), high]
            }
            // 64-value chunks: 32 bytes of nibbles, low = first 32 values, high = next 32.
            BlockFormat::Q4K | BlockFormat::Q5K => {
                let (c, r) = (e / 64, e % 64);
                let (hi, l) = (r / 32, r % 32);
                let qs_at = if self == BlockFormat::Q4K { 16 } else { 48 };
                let low = (qs_at + c * 32 + l, 4 * hi as u32, 4);
                let fifth = (self == BlockFormat::Q5K).then(|| (16 + l, (2 * c + hi) as u32, 1));
                [Some(low), fifth]
            }
            // 128-value halves; quarter k of 32 values: ql nibble k/2 of byte (k&1)*32+l, qh bits 2k.
            BlockFormat::Q6K => {
                let (n, r) = (e / 128, e % 128);
                let (k, l) = (r / 32, r % 32);
                let low = (n * 64 + (k & 1) * 32 + l, 4 * (k >> 1) as u32, 4);
                let high = (128 + n * 32 + l, 2 * k as u32, 2);
                [Some(low), Some(high)]
            }
            _ => [None, None],
        };
        pieces.into_iter().flatten()
    }

    /// Reads the per-sub-block scale (and min) codes of a K-quant block, sub-block order.
    fn k_scales(self, block: &[u8]) -> Vec<(u8, u8)> {
        match self {
            // One byte per sub-block: low nibble scale, high nibble min; moved as a byte.
            BlockFormat::Q2K => block[..16].iter().map(|&b| (b, 0)).collect(),
            BlockFormat::Q6K => block[192..208].iter().map(|&b| (b, 0)).collect(),
            BlockFormat::Q3K => {
                let raw = &block[96..108];
                (0..16)
                    .map(|k| {
                        let low = if k < 8 { raw[k] & 0xF } else { raw[k - 8] >> 4 };
                        let high = (raw[8 + k % 4] >> (2 * (k / 4))) & 3;
                        (low | (high << 4), 0)
                    })
                    .collect()
            }
            BlockFormat::Q4K | BlockFormat::Q5K => {
                let q = &block[4..16];
                (0..8)
                    .map(|j| {
                        if j < 4 {
                            (q[j] & 63, q[j + 4] & 63)
                        } else {
                            (
                                (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
                                (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
                            )
                        }
                    })
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// Writes sub-block scales (as read by [`Self::k_scales`]) back into a K-quant block.
    fn set_k_scales(self, block: &mut [u8], s: &[(u8, u8)]) {
        match self {
            BlockFormat::Q2K => block[..16].iter_mut().zip(s).for_each(|(b, v)| *b = v.0),
            BlockFormat::Q6K => block[192..208]
                .iter_mut()
                .zip(s)
                .for_each(|(b, v)| *b = v.0),
            BlockFormat::Q3K => {
                let mut raw = [0u8; 12];
                for (k, &(v, _)) in s.iter().enumerate() {
                    if k < 8 {
                        raw[k] |= v & 0xF;
                    } else {
                        raw[k - 8] |= (v & 0xF) << 4;
                    }
                    raw[8 + k % 4] |= ((v >> 4) & 3) << (2 * (k / 4));
                }
                block[96..108].copy_from_slice(&raw);
            }
            BlockFormat::Q4K | BlockFormat::Q5K => {
                let mut q = [0u8; 12];
                for (j, &(sc, m)) in s.iter().enumerate() {
                    if j < 4 {
                        q[j] |= sc & 63;
                        q[j + 4] |= m & 63;
                    } else {
                        q[j + 4] |= (sc & 0xF) | ((m & 0xF) << 4);
                        q[j - 4] |= (sc >> 4) << 6;
                        q[j] |= (m >> 4) << 6;
                    }
                }
                block[4..16].copy_from_slice(&q);
            }
            _ => {}
        }
    }

    fn qh_offset(self) -> Option<usize> {
        match self {
            BlockFormat::Q5_0 => Some(2),
            BlockFormat::Q5_1 => Some(4),
            _ => None,
        }
    }

    fn qs_offset(self) -> usize {
        match self {
            BlockFormat::Q4_0 => 2,
            BlockFormat::Q4_1 => 4,
            BlockFormat::Q5_0 => 6,
            BlockFormat::Q5_1 => 8,
            _ => 2,
        }
    }

    fn nibble_fields(self, block: &[u8]) -> (Option<u32>, &[u8]) {
        let qh = self
            .qh_offset()
            .map(|o| u32::from_le_bytes(block[o..o + 4].try_into().expect("4 bytes of qh")));
        let at = self.qs_offset();
        (qh, &block[at..at + QK / 2])
    }
}

/// Checks, without touching data, that `t` can be applied losslessly to a `rows × cols` tensor
/// of `dtype` (what [`transform_tensor`] would refuse, it refuses here first).
pub fn check_transform(
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    t: &TensorTransform,
) -> Result<(), ModelError> {
    let fmt = BlockFormat::of(dtype)?;
    if !cols.is_multiple_of(fmt.block_elems()) {
        return Err(ModelError::Corrupt(format!(
            "row of {cols} values is not a whole number of {dtype:?} blocks"
        )));
    }
    if let Some(p) = &t.rows {
        check_len("row permutation", p.len(), rows)?;
    }
    if let Some(p) = &t.cols {
        check_len("column permutation", p.len(), cols)?;
        if fmt.block_elems() > 1
            && !(p.is_group_preserving(fmt.block_elems()) && p.is_group_preserving(fmt.sub_block()))
        {
            let hint = if fmt.is_k_quant() {
                " (mode full moves 32-blocks across K-quant super-blocks; use stock or exact)"
            } else {
                ""
            };
            return Err(ModelError::NotBlockAligned(format!(
                "{dtype:?} tensor must keep values inside their {}-value sub-blocks and {}-value blocks{hint}",
                fmt.sub_block(),
                fmt.block_elems()
            )));
        }
    }
    if let Some(n) = &t.negate_rows {
        check_len("row negation mask", n.len(), rows)?;
    }
    if let Some(n) = &t.negate_cols {
        check_len("column negation mask", n.len(), cols)?;
        if fmt.block_elems() > 1 && n.iter().any(|&b| b) {
            return Err(ModelError::UnsupportedTensorType(format!(
                "{dtype:?} with per-value sign flips (only float tensors, e.g. biases, can take them)"
            )));
        }
    }
    Ok(())
}

/// Applies `t` to a 2-D tensor of `rows × cols` values (or a 1-D tensor with `rows == 1`) stored
/// as raw GGUF bytes. Returns the transformed bytes; `data` is untouched.
///
/// Order of operations: negate rows (and columns, float only), permute columns inside every row,
/// then move rows.
pub fn transform_tensor(
    data: &[u8],
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    t: &TensorTransform,
) -> Result<Vec<u8>, ModelError> {
    check_transform(dtype, rows, cols, t)?;
    let fmt = BlockFormat::of(dtype)?;
    let row_bytes = fmt.row_bytes(cols);
    if data.len() != rows * row_bytes {
        return Err(ModelError::Corrupt(format!(
            "tensor has {} bytes, expected {} for {rows}×{cols} {dtype:?}",
            data.len(),
            rows * row_bytes
        )));
    }
    let mut out = vec![0u8; data.len()];
    let mut scratch = vec![0u8; row_bytes];
    for r in 0..rows {
        let dst_row = t.rows.as_ref().map_or(r, |p| p.apply(r as u32) as usize);
        scratch.copy_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
        let dst = &mut out[dst_row * row_bytes..(dst_row + 1) * row_bytes];
        transform_row(&mut scratch, r, dst, fmt, t);
    }
    Ok(out)
}

/// The per-row step of a transform, shared by [`transform_tensor`] (the reference) and the
/// streaming encrypter ([`crate::encrypt::transform_into`]): `row` holds input row `r` on entry
/// and is clobbered (used as scratch); `dst` receives what [`transform_tensor`] writes at output
/// row `t.rows(r)`. Negates the row (and columns, float only), then permutes its columns.
///
/// Preconditions (checked by the callers): `t` passed [`check_transform`] for the tensor, and
/// `row.len() == dst.len() == fmt.row_bytes(cols)`.
pub(crate) fn transform_row(
    row: &mut [u8],
    r: usize,
    dst: &mut [u8],
    fmt: BlockFormat,
    t: &TensorTransform,
) {
    if t.negate_rows.as_ref().is_some_and(|n| n[r]) {
        negate_row(row, fmt);
    }
    if let (Some(n), BlockFormat::Float { bytes }) = (&t.negate_cols, fmt) {
        for (v, _) in row.chunks_exact_mut(bytes).zip(n).filter(|(_, &f)| f) {
            v[bytes - 1] ^= 0x80;
        }
    }
    match &t.cols {
        None => dst.copy_from_slice(row),
        Some(p) => permute_row(row, dst, fmt, p),
    }
}

fn check_len(what: &str, got: usize, want: usize) -> Result<(), ModelError> {
    if got == want {
        Ok(())
    } else {
        Err(ModelError::ShapeMismatch(format!(
            "{what} has length {got}, tensor axis has {want}"
        )))
    }
}

/// Flips the sign bit of every value (float) or of every block's scale and min (quantized).
fn negate_row(row: &mut [u8], fmt: BlockFormat) {
    let bb = fmt.block_bytes();
    for block in row.chunks_exact_mut(bb) {
        for &field in fmt.sign_fields() {
            // Sign bit of a little-endian float field of `w` bytes is the top bit of its last byte.
            let w = match fmt {
                BlockFormat::Float { bytes } => bytes,
                _ => 2,
            };
            block[field + w - 1] ^= 0x80;
        }
    }
}

/// Writes `src` with its values moved by `p` (`dst[p(i)] = src[i]`) into `dst`.
fn permute_row(src: &[u8], dst: &mut [u8], fmt: BlockFormat, p: &Permutation) {
    match fmt {
        BlockFormat::Float { bytes } => {
            for (i, v) in src.chunks_exact(bytes).enumerate() {
                let j = p.apply(i as u32) as usize;
                dst[j * bytes..(j + 1) * bytes].copy_from_slice(v);
            }
        }
        _ => {
            let (bb, be, sb) = (fmt.block_bytes(), fmt.block_elems(), fmt.sub_block());
            let mut codes = vec![0u8; be];
            let mut moved = vec![0u8; be];
            for (b, block) in src.chunks_exact(bb).enumerate() {
                let first = p.apply((b * be) as u32) as usize;
                let nb = first / be;
                let out = &mut dst[nb * bb..(nb + 1) * bb];
                out.copy_from_slice(block);
                fmt.unpack(block, &mut codes);
                for (j, &c) in codes.iter().enumerate() {
                    moved[p.apply((b * be + j) as u32) as usize % be] = c;
                }
                fmt.pack(&moved, out);
                if fmt.is_k_quant() {
                    // Sub-blocks carry their scale (and min) to where their values went.
                    let scales = fmt.k_scales(block);
                    let mut new_scales = scales.clone();
                    for (k, &s) in scales.iter().enumerate() {
                        new_scales[p.apply((b * be + k * sb) as u32) as usize % be / sb] = s;
                    }
                    fmt.set_k_scales(out, &new_scales);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{ggml_file::qtensor_from_ggml, QTensor};
    use candle_core::{Device, Tensor};
    use equicrypt_core::SecretKey;
    use proptest::prelude::*;

    const TYPES: [GgmlDType; 13] = [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// A column permutation that moves blocks, sub-blocks inside their block and values inside
    /// their sub-block: the most a lossless transform of `dtype` may do.
    fn structured_cols(dtype: GgmlDType, cols: usize, key: &SecretKey) -> Permutation {
        let rng = &mut key.stream("cols");
        let f = BlockFormat::of(dtype).unwrap();
        // Float types take any permutation; give them the legacy structure.
        let (be, sb) = match f.block_elems() {
            1 => (QK, QK),
            be => (be, f.sub_block()),
        };
        let per_block = be / sb;
        let blocks = cols / be;
        let inner: Vec<_> = (0..blocks)
            .map(|_| {
                let subs: Vec<_> = (0..per_block)
                    .map(|_| Permutation::random(sb, rng))
                    .collect();
                Permutation::blocked(&Permutation::random(per_block, rng), &subs)
            })
            .collect();
        Permutation::blocked(&Permutation::random(blocks, rng), &inner)
    }

    /// Random raw blocks of `dtype` (every code and scale bit pattern) with sane f16 `d`/`dmin`.
    fn random_raw(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let f = BlockFormat::of(dtype).unwrap();
        let mut bytes: Vec<u8> = random_matrix(rows, cols, seed)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .take(rows * f.row_bytes(cols))
            .collect();
        for (i, block) in bytes.chunks_exact_mut(f.block_bytes()).enumerate() {
            for (k, &at) in f.sign_fields().iter().enumerate() {
                let v = half::f16::from_f32(
                    0.03 * (1 + (i + k) % 7) as f32 * if i % 2 == 0 { 1.0 } else { -1.0 },
                );
                block[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        bytes
    }

    fn random_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        // A small LCG is enough to make varied test data.
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..rows * cols)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn quantized_bytes(values: &[f32], rows: usize, cols: usize, dtype: GgmlDType) -> Vec<u8> {
        let t = Tensor::from_vec(values.to_vec(), (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype)
            .unwrap()
            .data()
            .unwrap()
            .to_vec()
    }

    fn dequantize(bytes: &[u8], rows: usize, cols: usize, dtype: GgmlDType) -> Vec<f32> {
        qtensor_from_ggml(dtype, bytes, vec![rows, cols], &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn plan_perms(dtype: GgmlDType, seed: u8, rows: usize, cols: usize) -> TensorTransform {
        let key = SecretKey::from_bytes([seed; 32]);
        let mut rng = key.stream("test");
        let cols_perm = structured_cols(dtype, cols, &key);
        let negate = (0..rows)
            .map(|r| (r * 7 + seed as usize).is_multiple_of(3))
            .collect();
        TensorTransform {
            rows: Some(Permutation::random(rows, &mut rng)),
            cols: Some(cols_perm),
            negate_rows: Some(negate),
            negate_cols: None,
        }
    }

    /// `dequantize(transform(W)) == transform(dequantize(W))`, bit for bit (zeros compared by
    /// value: a negated K-quant row may turn −0 into +0), for every type, on
    /// quantized data and on random raw blocks (every code and scale bit pattern).
    #[test]
    fn transform_commutes_with_dequantization_exactly() {
        let (rows, cols) = (7, 512);
        for (k, dtype) in TYPES.into_iter().enumerate() {
            let w = random_matrix(rows, cols, k as u64);
            let quantized = quantized_bytes(&w, rows, cols, dtype);
            let raw = random_raw(dtype, rows, cols, 50 + k as u64);
            let inputs = if BlockFormat::of(dtype).unwrap().block_elems() > 1 {
                vec![quantized, raw]
            } else {
                vec![quantized]
            };
            for bytes in inputs {
                let t = plan_perms(dtype, k as u8 + 1, rows, cols);
                let enc = transform_tensor(&bytes, dtype, rows, cols, &t).unwrap();
                assert_eq!(enc.len(), bytes.len());
                let plain = dequantize(&bytes, rows, cols, dtype);
                let got = dequantize(&enc, rows, cols, dtype);
                let rp = t.rows.as_ref().unwrap();
                let cp = t.cols.as_ref().unwrap();
                let neg = t.negate_rows.as_ref().unwrap();
                for r in 0..rows {
                    for c in 0..cols {
                        let want = if neg[r] {
                            -plain[r * cols + c]
                        } else {
                            plain[r * cols + c]
                        };
                        let at = rp.apply(r as u32) as usize * cols + cp.apply(c as u32) as usize;
                        // Bit for bit, except that `d·q − dmin·m` of a negated row gives +0
                        // where −(+0) is wanted: the same value in every sum.
                        let canon = |x: f32| if x == 0.0 { 0 } else { x.to_bits() };
                        assert_eq!(
                            canon(got[at]),
                            canon(want),
                            "{dtype:?} r={r} c={c}: {} vs {want}",
                            got[at]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn inverse_transform_restores_bytes() {
        let (rows, cols) = (5, 768);
        for (k, dtype) in TYPES.into_iter().enumerate() {
            let w = random_matrix(rows, cols, 100 + k as u64);
            let bytes = quantized_bytes(&w, rows, cols, dtype);
            let mut t = plan_perms(dtype, k as u8 + 9, rows, cols);
            t.negate_rows = None;
            let enc = transform_tensor(&bytes, dtype, rows, cols, &t).unwrap();
            let inv = TensorTransform {
                rows: t.rows.as_ref().map(Permutation::inverse),
                cols: t.cols.as_ref().map(Permutation::inverse),
                negate_rows: None,
                negate_cols: None,
            };
            let back = transform_tensor(&enc, dtype, rows, cols, &inv).unwrap();
            assert_eq!(back, bytes, "{dtype:?}");
        }
    }

    #[test]
    fn rejects_column_permutations_that_split_blocks() {
        let bytes = quantized_bytes(&random_matrix(1, 64, 3), 1, 64, GgmlDType::Q4_1);
        let mut f: Vec<u32> = (0..64).collect();
        f.swap(0, 40);
        let t = TensorTransform {
            cols: Some(Permutation::from_forward(f).unwrap()),
            ..Default::default()
        };
        let e = transform_tensor(&bytes, GgmlDType::Q4_1, 1, 64, &t).unwrap_err();
        assert!(e.to_string().contains("32-value"), "{e}");
    }

    #[test]
    fn rejects_k_quant_permutations_that_leave_sub_blocks_or_super_blocks() {
        for (dtype, sub) in [(GgmlDType::Q6K, 16), (GgmlDType::Q4K, 32)] {
            let bytes = quantized_bytes(&random_matrix(1, 512, 3), 1, 512, dtype);
            let swap = |a: usize, b: usize| {
                let mut f: Vec<u32> = (0..512).collect();
                f.swap(a, b);
                TensorTransform {
                    cols: Some(Permutation::from_forward(f).unwrap()),
                    ..Default::default()
                }
            };
            // Inside a sub-block: fine. Across sub-blocks, or whole sub-blocks across super-blocks: refused.
            assert!(transform_tensor(&bytes, dtype, 1, 512, &swap(0, sub - 1)).is_ok());
            let e = transform_tensor(&bytes, dtype, 1, 512, &swap(0, sub)).unwrap_err();
            assert!(
                e.to_string().contains(&format!("{sub}-value sub-blocks")),
                "{e}"
            );
            let mut f: Vec<u32> = (0..512).collect();
            for j in 0..sub {
                f.swap(j, 256 + j);
            }
            let across = TensorTransform {
                cols: Some(Permutation::from_forward(f).unwrap()),
                ..Default::default()
            };
            // Whole sub-block 0 swaps with sub-block 0 of the next super-block: its `d` differs.
            assert!(transform_tensor(&bytes, dtype, 1, 512, &across).is_err());
        }
    }

    #[test]
    fn unsupported_types_are_named_in_the_error() {
        for (dtype, name) in [(GgmlDType::Q8K, "Q8K"), (GgmlDType::Q8_1, "Q8_1")] {
            let e = BlockFormat::of(dtype).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }

    #[test]
    fn wrong_sizes_are_errors_not_panics() {
        let t = TensorTransform::default();
        assert!(transform_tensor(&[0u8; 10], GgmlDType::Q4_1, 1, 32, &t).is_err());
        assert!(transform_tensor(&[0u8; 20], GgmlDType::Q4_1, 1, 31, &t).is_err());
        let t = TensorTransform {
            rows: Some(Permutation::identity(3)),
            ..Default::default()
        };
        assert!(transform_tensor(&[0u8; 20], GgmlDType::Q4_1, 1, 32, &t).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Float tensors accept any column permutation, and it is exact.
        #[test]
        fn float_columns_move_freely(seed in any::<u64>(), cols in 1usize..40) {
            let w = random_matrix(2, cols, seed);
            let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            let mut rng = SecretKey::from_bytes([seed as u8; 32]).stream("p");
            let p = Permutation::random(cols, &mut rng);
            let t = TensorTransform { cols: Some(p.clone()), ..Default::default() };
            let out = transform_tensor(&bytes, GgmlDType::F32, 2, cols, &t).unwrap();
            for r in 0..2 {
                for c in 0..cols {
                    let j = r * cols + p.apply(c as u32) as usize;
                    prop_assert_eq!(&out[j * 4..j * 4 + 4], &bytes[(r * cols + c) * 4..(r * cols + c) * 4 + 4]);
                }
            }
        }
    }
}
