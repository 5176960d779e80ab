//! A1 for ONNX graphs (CNNs): with the *public* plaintext model, recover the secret channel
//! and class permutations of an encrypted one by sorted-filter matching.
//!
//! Encryption permutes a weight tensor along its axes (a Conv weight `[M, C, k, k]` by the
//! output permutation on axis 0 and the input permutation on axis 1) and keeps tensor names.
//! The multiset of values in one slice along an axis (one filter, one input channel, one class
//! column) is unchanged by the permutations of the *other* axes, so sorting each slice and
//! looking it up among the public tensor's slices names the slice's original index — unless two
//! slices have identical sorted values.
//!
//! The attack never reads the key; scoring against the truth happens in the caller.

use std::collections::HashMap;

use equicrypt_onnx::tensor::f32_values;
use equicrypt_onnx::OnnxGraph;

/// The attacker's guess for one axis of one tensor.
#[derive(Clone, Debug)]
pub struct AxisGuess {
    /// The tensor (same name in both models).
    pub tensor: String,
    /// The axis.
    pub axis: usize,
    /// Per encrypted index, the public index with the same sorted slice (`None`: no unique one).
    pub guess: Vec<Option<u32>>,
}

/// Sorted-slice signatures along `axis`, as bit patterns.
fn signatures(values: &[f32], dims: &[usize], axis: usize) -> Vec<Vec<u32>> {
    let outer: usize = dims[..axis].iter().product();
    let n = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let mut sig = vec![Vec::with_capacity(outer * inner); n];
    for o in 0..outer {
        for (i, s) in sig.iter_mut().enumerate() {
            let base = (o * n + i) * inner;
            s.extend(values[base..base + inner].iter().map(|v| v.to_bits()));
        }
    }
    for s in &mut sig {
        s.sort_unstable_by(|a, b| f32::from_bits(*a).total_cmp(&f32::from_bits(*b)));
    }
    sig
}

/// Runs the attack on every float initializer of rank ≥ 2 that both models hold with one
/// shape, along each of its axes of size > 1.
pub fn match_filters(public: &OnnxGraph, encrypted: &OnnxGraph) -> Vec<AxisGuess> {
    let mut out = Vec::new();
    for t in &encrypted.graph().initializer {
        let Some(p) = public.initializer(&t.name) else {
            continue;
        };
        if p.dims != t.dims || t.dims.len() < 2 {
            continue;
        }
        let (Some(pv), Some(ev)) = (f32_values(p), f32_values(t)) else {
            continue;
        };
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        for axis in 0..dims.len() {
            if dims[axis] < 2 {
                continue;
            }
            let mut index: HashMap<Vec<u32>, Vec<u32>> = HashMap::new();
            for (i, s) in signatures(&pv, &dims, axis).into_iter().enumerate() {
                index.entry(s).or_default().push(i as u32);
            }
            let guess = signatures(&ev, &dims, axis)
                .iter()
                .map(|s| match index.get(s).map(Vec::as_slice) {
                    Some([i]) => Some(*i),
                    _ => None,
                })
                .collect();
            out.push(AxisGuess {
                tensor: t.name.clone(),
                axis,
                guess,
            });
        }
    }
    out
}
