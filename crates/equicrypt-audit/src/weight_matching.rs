//! A1: sorted-row matching of embedding rows against the public base model.
//!
//! Each row of the token embedding is one token's vector. A coordinate permutation (perm mode,
//! exact or full) reorders the values inside every row but keeps the multiset; the vocabulary
//! permutation moves whole rows. So the sorted values of an encrypted row equal the sorted values
//! of exactly one public row (unless two public rows are equal as multisets), which names the
//! plaintext token of that ciphertext id.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::Device;
use equicrypt_model::GgufFile;
use serde::Serialize;

use crate::AuditError;

/// The attack's output: a guess of the plaintext id of every ciphertext id.
#[derive(Clone, Debug, Serialize)]
pub struct WeightMatch {
    /// `guess[c]` = the plaintext id believed to sit at ciphertext id `c`; `None` when no public
    /// row (or more than one) has the same sorted values.
    pub guess: Vec<Option<u32>>,
    /// Ciphertext ids with exactly one candidate.
    pub unique: usize,
    /// Ciphertext ids whose sorted row matched several public rows.
    pub ambiguous: usize,
    /// Attacker wall time in seconds (loading excluded).
    pub seconds: f64,
}

/// Dequantized rows of `token_embd.weight`.
pub fn embedding_rows(path: &Path) -> Result<(usize, usize, Vec<f32>), AuditError> {
    let mut f = GgufFile::open(path)?;
    let entry = f.tensor("token_embd.weight")?.clone();
    let bytes = f.read_tensor(&entry)?;
    let (rows, cols) = entry.rows_cols();
    let deq = |e: candle_core::Error| AuditError::Dequantize {
        name: entry.name.clone(),
        reason: e.to_string().lines().next().unwrap_or("").to_string(),
    };
    let t = qtensor_from_ggml(entry.dtype, &bytes, vec![rows, cols], &Device::Cpu).map_err(deq)?;
    let v: Vec<f32> = t
        .dequantize(&Device::Cpu)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(deq)?;
    Ok((rows, cols, v))
}

/// The sorted bit patterns of one row: a key equal for rows that are permutations of each other.
fn sorted_key(row: &[f32]) -> Vec<u32> {
    let mut k: Vec<u32> = row
        .iter()
        .map(|v| if *v == 0.0 { 0 } else { v.to_bits() })
        .collect();
    k.sort_unstable();
    k
}

/// Runs A1 on dequantized embedding matrices (`rows × cols`, row-major).
pub fn match_rows(
    public: &[f32],
    encrypted: &[f32],
    cols: usize,
) -> Result<WeightMatch, AuditError> {
    if cols == 0 || public.len() != encrypted.len() || !public.len().is_multiple_of(cols) {
        return Err(AuditError::Mismatch(format!(
            "embedding sizes differ ({} vs {} values, {cols} columns)",
            public.len(),
            encrypted.len()
        )));
    }
    let start = Instant::now();
    let mut index: HashMap<Vec<u32>, Vec<u32>> = HashMap::with_capacity(public.len() / cols);
    for (id, row) in public.chunks_exact(cols).enumerate() {
        index.entry(sorted_key(row)).or_default().push(id as u32);
    }
    let (mut unique, mut ambiguous) = (0, 0);
    let guess = encrypted
        .chunks_exact(cols)
        .map(|row| match index.get(&sorted_key(row)).map(Vec::as_slice) {
            Some([one]) => {
                unique += 1;
                Some(*one)
            }
            Some(_) => {
                ambiguous += 1;
                None
            }
            None => None,
        })
        .collect();
    Ok(WeightMatch {
        guess,
        unique,
        ambiguous,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Runs A1 on two GGUF files.
pub fn attack(public: &Path, encrypted: &Path) -> Result<WeightMatch, AuditError> {
    let (_, cols_p, p) = embedding_rows(public)?;
    let (_, cols_e, e) = embedding_rows(encrypted)?;
    if cols_p != cols_e {
        return Err(AuditError::Mismatch(format!(
            "embedding widths differ ({cols_p} vs {cols_e})"
        )));
    }
    match_rows(&p, &e, cols_p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_permutation_of_distinct_rows() {
        // 4 tokens × 3 dims; encrypted = rows moved by [2,0,3,1] and columns reversed.
        let public = [
            1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, -1.0, -2.0, -3.0f32,
        ];
        let row_to = [2usize, 0, 3, 1];
        let mut enc = [0f32; 12];
        for (r, &to) in row_to.iter().enumerate() {
            for c in 0..3 {
                enc[to * 3 + (2 - c)] = public[r * 3 + c];
            }
        }
        let m = match_rows(&public, &enc, 3).unwrap();
        let truth = crate::score::Truth::new(vec![2, 0, 3, 1]).unwrap();
        assert_eq!(truth.plain_ids(), &[1, 3, 0, 2]);
        assert_eq!(m.unique, 4);
        let s = crate::score::score(&m.guess, &truth, &[0, 0, 1], &[], &[]).unwrap();
        assert_eq!((s.vocab_recovered, s.tokens_recovered), (1.0, 1.0));
    }

    #[test]
    fn duplicate_rows_are_ambiguous_not_guessed() {
        let public = [1.0, 2.0, 2.0, 1.0f32];
        let m = match_rows(&public, &public, 2).unwrap();
        assert_eq!((m.unique, m.ambiguous), (0, 2));
        assert!(m.guess.iter().all(Option::is_none));
    }

    #[test]
    fn size_mismatch_is_an_error() {
        assert!(match_rows(&[1.0, 2.0], &[1.0], 1).is_err());
    }
}
