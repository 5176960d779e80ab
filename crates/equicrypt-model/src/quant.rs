//! Lossless, quantization-block-aware row/column permutations and row negation of raw GGUF
//! tensor bytes.
//!
//! GGUF block types quantize 32 consecutive values along `ne0` (a row) with a per-block scale
//! (and min). Moving rows is a byte copy. Moving columns is lossless only when every new block
//! holds exactly the values of one old block, so column permutations must be *group preserving*
//! (whole 32-blocks move, and positions move inside a block); the codes are then repacked, never
//! re-quantized. Negating a row flips the sign bit of its scale (and min): exact in every format.
//! See `docs/ee-math.md`, "Quantized weights".

use candle_core::quantized::GgmlDType;
use equicrypt_core::{Permutation, TensorTransform};

use crate::ModelError;

/// Values per quantization block.
const QK: usize = 32;

/// The storage layout of one supported tensor type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

impl BlockFormat {
    /// The format of a GGML type, or an error naming an unsupported one (K-quants and others).
    pub fn of(dtype: GgmlDType) -> Result<Self, ModelError> {
        Ok(match dtype {
            GgmlDType::F32 => BlockFormat::Float { bytes: 4 },
            GgmlDType::F16 | GgmlDType::BF16 => BlockFormat::Float { bytes: 2 },
            GgmlDType::Q4_0 => BlockFormat::Q4_0,
            GgmlDType::Q4_1 => BlockFormat::Q4_1,
            GgmlDType::Q5_0 => BlockFormat::Q5_0,
            GgmlDType::Q5_1 => BlockFormat::Q5_1,
            GgmlDType::Q8_0 => BlockFormat::Q8_0,
            other => return Err(ModelError::UnsupportedTensorType(format!("{other:?}"))),
        })
    }

    /// Values per block (1 for float types).
    pub fn block_elems(self) -> usize {
        match self {
            BlockFormat::Float { .. } => 1,
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
        }
    }

    /// Bytes of one row of `cols` values.
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }

    /// Byte offsets of the sign-carrying scale fields inside a block (`d`, and `m` when present).
    fn sign_fields(self) -> &'static [usize] {
        match self {
            BlockFormat::Float { .. } => &[0],
            BlockFormat::Q4_0 | BlockFormat::Q5_0 | BlockFormat::Q8_0 => &[0],
            BlockFormat::Q4_1 | BlockFormat::Q5_1 => &[0, 2],
        }
    }

    /// Unpacks the 32 codes of a quantized block into `codes` (element order).
    fn unpack(self, block: &[u8], codes: &mut [u8; QK]) {
        match self {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q5_0 | BlockFormat::Q5_1 => {
                let (qh, qs) = self.nibble_fields(block);
                for j in 0..QK / 2 {
                    codes[j] = qs[j] & 0x0F;
                    codes[j + QK / 2] = qs[j] >> 4;
                }
                if let Some(qh) = qh {
                    for (j, c) in codes.iter_mut().enumerate() {
                        *c |= (((qh >> j) & 1) as u8) << 4;
                    }
                }
            }
            BlockFormat::Q8_0 => codes.copy_from_slice(&block[2..2 + QK]),
            BlockFormat::Float { .. } => unreachable!("float types have no codes"),
        }
    }

    /// Packs 32 codes (element order) into the code fields of `block`; scales are untouched.
    fn pack(self, codes: &[u8; QK], block: &mut [u8]) {
        match self {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q5_0 | BlockFormat::Q5_1 => {
                let qs_at = self.qs_offset();
                for j in 0..QK / 2 {
                    block[qs_at + j] = (codes[j] & 0x0F) | ((codes[j + QK / 2] & 0x0F) << 4);
                }
                if let Some(qh_at) = self.qh_offset() {
                    let qh = codes
                        .iter()
                        .enumerate()
                        .fold(0u32, |acc, (j, &c)| acc | (u32::from(c >> 4 & 1) << j));
                    block[qh_at..qh_at + 4].copy_from_slice(&qh.to_le_bytes());
                }
            }
            BlockFormat::Q8_0 => block[2..2 + QK].copy_from_slice(codes),
            BlockFormat::Float { .. } => unreachable!("float types have no codes"),
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

/// Applies `t` to a 2-D tensor of `rows × cols` values (or a 1-D tensor with `rows == 1`) stored
/// as raw GGUF bytes. Returns the transformed bytes; `data` is untouched.
///
/// Order of operations: negate rows, permute columns inside every row, then move rows.
pub fn transform_tensor(
    data: &[u8],
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    t: &TensorTransform,
) -> Result<Vec<u8>, ModelError> {
    let fmt = BlockFormat::of(dtype)?;
    if !cols.is_multiple_of(fmt.block_elems()) {
        return Err(ModelError::Corrupt(format!(
            "row of {cols} values is not a whole number of {dtype:?} blocks"
        )));
    }
    let row_bytes = fmt.row_bytes(cols);
    if data.len() != rows * row_bytes {
        return Err(ModelError::Corrupt(format!(
            "tensor has {} bytes, expected {} for {rows}×{cols} {dtype:?}",
            data.len(),
            rows * row_bytes
        )));
    }
    if let Some(p) = &t.rows {
        check_len("row permutation", p.len(), rows)?;
    }
    if let Some(p) = &t.cols {
        check_len("column permutation", p.len(), cols)?;
        if fmt.block_elems() > 1 && !p.is_group_preserving(QK) {
            return Err(ModelError::NotBlockAligned(format!("{dtype:?}")));
        }
    }
    if let Some(n) = &t.negate_rows {
        check_len("row negation mask", n.len(), rows)?;
    }

    let mut out = vec![0u8; data.len()];
    let mut scratch = vec![0u8; row_bytes];
    for r in 0..rows {
        let src = &data[r * row_bytes..(r + 1) * row_bytes];
        let dst_row = t.rows.as_ref().map_or(r, |p| p.apply(r as u32) as usize);
        scratch.copy_from_slice(src);
        if t.negate_rows.as_ref().is_some_and(|n| n[r]) {
            negate_row(&mut scratch, fmt);
        }
        let dst = &mut out[dst_row * row_bytes..(dst_row + 1) * row_bytes];
        match &t.cols {
            None => dst.copy_from_slice(&scratch),
            Some(p) => permute_row(&scratch, dst, fmt, p),
        }
    }
    Ok(out)
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
            let bb = fmt.block_bytes();
            let mut codes = [0u8; QK];
            let mut moved = [0u8; QK];
            for (b, block) in src.chunks_exact(bb).enumerate() {
                let first = p.apply((b * QK) as u32) as usize;
                let nb = first / QK;
                let out = &mut dst[nb * bb..(nb + 1) * bb];
                out.copy_from_slice(block);
                fmt.unpack(block, &mut codes);
                for (j, &c) in codes.iter().enumerate() {
                    moved[p.apply((b * QK + j) as u32) as usize % QK] = c;
                }
                fmt.pack(&moved, out);
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

    const TYPES: [GgmlDType; 8] = [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ];

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

    fn plan_perms(seed: u8, rows: usize, cols: usize) -> TensorTransform {
        let key = SecretKey::from_bytes([seed; 32]);
        let mut rng = key.stream("test");
        let col_groups = cols / QK;
        let outer = Permutation::random(col_groups, &mut rng);
        let inner: Vec<_> = (0..col_groups)
            .map(|_| Permutation::random(QK, &mut rng))
            .collect();
        let negate = (0..rows)
            .map(|r| (r * 7 + seed as usize).is_multiple_of(3))
            .collect();
        TensorTransform {
            rows: Some(Permutation::random(rows, &mut rng)),
            cols: Some(Permutation::blocked(&outer, &inner)),
            negate_rows: Some(negate),
        }
    }

    /// `dequantize(transform(W)) == transform(dequantize(W))`, bit for bit, for every type.
    #[test]
    fn transform_commutes_with_dequantization_exactly() {
        let (rows, cols) = (7, 128);
        for (k, dtype) in TYPES.into_iter().enumerate() {
            let w = random_matrix(rows, cols, k as u64);
            let bytes = quantized_bytes(&w, rows, cols, dtype);
            let t = plan_perms(k as u8 + 1, rows, cols);
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
                    assert_eq!(
                        got[at].to_bits(),
                        want.to_bits(),
                        "{dtype:?} r={r} c={c}: {} vs {want}",
                        got[at]
                    );
                }
            }
        }
    }

    #[test]
    fn inverse_transform_restores_bytes() {
        let (rows, cols) = (5, 96);
        for (k, dtype) in TYPES.into_iter().enumerate() {
            let w = random_matrix(rows, cols, 100 + k as u64);
            let bytes = quantized_bytes(&w, rows, cols, dtype);
            let mut t = plan_perms(k as u8 + 9, rows, cols);
            t.negate_rows = None;
            let enc = transform_tensor(&bytes, dtype, rows, cols, &t).unwrap();
            let inv = TensorTransform {
                rows: t.rows.as_ref().map(Permutation::inverse),
                cols: t.cols.as_ref().map(Permutation::inverse),
                negate_rows: None,
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
        assert!(e.to_string().contains("32-block"), "{e}");
    }

    #[test]
    fn k_quants_are_named_in_the_error() {
        let e = BlockFormat::of(GgmlDType::Q4K).unwrap_err().to_string();
        assert!(e.contains("Q4K"), "{e}");
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
