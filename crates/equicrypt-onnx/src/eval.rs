//! Fidelity of an encrypted ONNX model against its plaintext original, on real inputs: both run
//! the same inputs (the encrypted one through the client's stem, the server model and the
//! client's decryption), and the outputs are compared (max |Δ|, argmax agreement, accuracy,
//! cosine). The server model runs in tract here or in stock ONNX Runtime ([`crate::ort`]).

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use tract_onnx::prelude::*;

use equicrypt_core::SecretKey;

use crate::client::{OnnxClient, Stem};
use crate::OnnxError;

/// Reads `DIR/<name>.npy` for each input name.
pub fn read_inputs(dir: &Path, names: &[String]) -> Result<Vec<Tensor>, OnnxError> {
    let tensors: Vec<Tensor> = names
        .iter()
        .map(|n| crate::npy::read(&dir.join(format!("{}.npy", file_stem(n)))))
        .collect::<Result<_, _>>()?;
    let n = tensors
        .first()
        .map(|t| t.shape().first().copied().unwrap_or(0));
    if tensors.iter().any(|t| t.shape().first().copied() != n) {
        return Err(OnnxError::Mismatch(
            "the inputs have different batch sizes".into(),
        ));
    }
    Ok(tensors)
}

/// A file-name-safe stem for a value name (`/` and other separators become `_`).
pub fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Rows `start..end` of every tensor (axis 0).
pub fn rows(tensors: &[Tensor], start: usize, end: usize) -> Result<Vec<Tensor>, OnnxError> {
    tensors
        .iter()
        .map(|t| {
            t.slice(0, start, end)
                .map_err(|e| OnnxError::Mismatch(e.to_string()))
        })
        .collect()
}

/// Concatenates batches along axis 0.
pub fn concat(parts: &[Tensor]) -> Result<Tensor, OnnxError> {
    Tensor::stack_tensors(0, parts).map_err(|e| OnnxError::Mismatch(e.to_string()))
}

/// Outputs of the plaintext and the encrypted pipeline on the same inputs, with timings.
pub struct PipelineRun {
    /// The plaintext model's first output.
    pub plain: Tensor,
    /// The encrypted pipeline's first output, decrypted.
    pub decrypted: Tensor,
    /// The stem's outputs (what the server received), in the manifest's cut order.
    pub cut: Vec<Tensor>,
    /// The stem's values kept for the head, in the manifest's `kept` order.
    pub kept: Vec<Tensor>,
    /// Seconds in the client's stem (tract).
    pub stem_seconds: f64,
    /// Seconds in the plaintext model (tract).
    pub plain_seconds: f64,
    /// Seconds in the server model (tract).
    pub server_seconds: f64,
}

/// Runs plaintext and encrypted pipelines in tract, `batch` inputs at a time.
pub fn run_tract(
    key: &SecretKey,
    plain: &Path,
    encrypted: &Path,
    inputs: &[Tensor],
    batch: usize,
) -> Result<PipelineRun, OnnxError> {
    let mut client = OnnxClient::open(encrypted, key)?;
    let mut plain_model = Stem::load(plain)?;
    let mut server = Stem::load(&OnnxClient::server_model(encrypted))?;
    let first = client
        .manifest
        .outputs
        .first()
        .cloned()
        .ok_or_else(|| OnnxError::Mismatch("the model has no output".into()))?;
    let n = inputs.first().map_or(0, |t| t.shape()[0]);
    let (mut p_out, mut d_out) = (Vec::new(), Vec::new());
    let mut cut_parts: Vec<Vec<Tensor>> = vec![Vec::new(); client.manifest.cut.len()];
    let mut kept_parts: Vec<Vec<Tensor>> = vec![Vec::new(); client.manifest.kept.len()];
    let (mut stem_s, mut plain_s, mut server_s) = (0.0, 0.0, 0.0);
    let mut start = 0;
    while start < n {
        let end = (start + batch).min(n);
        let x = rows(inputs, start, end)?;
        let t = Instant::now();
        let p = plain_model.run(x.clone())?;
        plain_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (cut, pending) = client.encrypt_inputs(x)?;
        stem_s += t.elapsed().as_secs_f64();
        for (parts, k) in kept_parts.iter_mut().zip(&pending.kept) {
            parts.push(k.clone());
        }
        let t = Instant::now();
        let s = server.run(cut.clone())?;
        server_s += t.elapsed().as_secs_f64();
        let mut out = client.finish(pending, s)?;
        let out = out
            .remove(&first.name)
            .ok_or_else(|| OnnxError::Mismatch(format!("no output `{}`", first.name)))?;
        d_out.push(out);
        p_out.push(
            p.into_iter().next().ok_or_else(|| {
                OnnxError::Mismatch("the plaintext model returned nothing".into())
            })?,
        );
        for (parts, c) in cut_parts.iter_mut().zip(cut) {
            parts.push(c);
        }
        start = end;
    }
    Ok(PipelineRun {
        plain: concat(&p_out)?,
        decrypted: concat(&d_out)?,
        cut: cut_parts
            .iter()
            .map(|p| concat(p))
            .collect::<Result<_, _>>()?,
        kept: kept_parts
            .iter()
            .map(|p| concat(p))
            .collect::<Result<_, _>>()?,
        stem_seconds: stem_s,
        plain_seconds: plain_s,
        server_seconds: server_s,
    })
}

/// How close two outputs are.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Fidelity {
    /// Inputs compared (rows of axis 0).
    pub inputs: usize,
    /// Largest |plain − decrypted|.
    pub max_abs_diff: f64,
    /// Largest |plain| (scale of the output).
    pub max_abs_plain: f64,
    /// Fraction of inputs whose argmax (over the last axis, for rank-2 outputs) agrees.
    pub top1_agreement: Option<f64>,
    /// Accuracy of the plaintext model against the labels.
    pub accuracy_plain: Option<f64>,
    /// Accuracy of the encrypted pipeline against the labels.
    pub accuracy_encrypted: Option<f64>,
    /// Smallest cosine similarity between a plaintext and a decrypted output row.
    pub min_cosine: f64,
}

/// Compares two outputs of the same shape (rows along axis 0).
pub fn compare(
    plain: &Tensor,
    decrypted: &Tensor,
    labels: Option<&[i64]>,
) -> Result<Fidelity, OnnxError> {
    if plain.shape() != decrypted.shape() {
        return Err(OnnxError::Mismatch(format!(
            "outputs have shapes {:?} and {:?}",
            plain.shape(),
            decrypted.shape()
        )));
    }
    let p = plain
        .cast_to::<f32>()
        .map_err(|e| OnnxError::Mismatch(e.to_string()))?;
    let d = decrypted
        .cast_to::<f32>()
        .map_err(|e| OnnxError::Mismatch(e.to_string()))?;
    let (p, d) = (crate::values::<f32>(&p)?, crate::values::<f32>(&d)?);
    let n = plain.shape().first().copied().unwrap_or(1).max(1);
    let row = p.len() / n;
    if let Some(l) = labels {
        if l.len() != n {
            return Err(OnnxError::Mismatch(format!(
                "{} labels for {n} inputs",
                l.len()
            )));
        }
    }
    let mut f = Fidelity {
        inputs: n,
        min_cosine: 1.0,
        ..Default::default()
    };
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .fold(0, |b, (i, v)| if *v > r[b] { i } else { b })
    };
    let (mut same, mut right_p, mut right_d) = (0, 0, 0);
    for i in 0..n {
        let (pr, dr) = (&p[i * row..(i + 1) * row], &d[i * row..(i + 1) * row]);
        let (mut dot, mut np, mut nd) = (0f64, 0f64, 0f64);
        for (a, b) in pr.iter().zip(dr) {
            f.max_abs_diff = f.max_abs_diff.max((a - b).abs() as f64);
            f.max_abs_plain = f.max_abs_plain.max(a.abs() as f64);
            dot += *a as f64 * *b as f64;
            np += *a as f64 * *a as f64;
            nd += *b as f64 * *b as f64;
        }
        if np > 0.0 && nd > 0.0 {
            f.min_cosine = f.min_cosine.min(dot / (np.sqrt() * nd.sqrt()));
        }
        let (ap, ad) = (argmax(pr), argmax(dr));
        same += usize::from(ap == ad);
        if let Some(l) = labels {
            right_p += usize::from(ap as i64 == l[i]);
            right_d += usize::from(ad as i64 == l[i]);
        }
    }
    if plain.rank() == 2 {
        f.top1_agreement = Some(same as f64 / n as f64);
        if labels.is_some() {
            f.accuracy_plain = Some(right_p as f64 / n as f64);
            f.accuracy_encrypted = Some(right_d as f64 / n as f64);
        }
    }
    Ok(f)
}
