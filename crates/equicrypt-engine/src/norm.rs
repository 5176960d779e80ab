//! Order-independent RMSNorm.
//!
//! The encrypted models permute hidden coordinates, so the sum of squares inside RMSNorm runs over a
//! permuted axis. A floating-point sum depends on the order of its terms; one changed last bit is then
//! amplified by the 8-bit re-quantization of activations before every quantized matmul, and the
//! encrypted model's logits would drift from the plain model's. This module computes the sum of
//! squares *exactly up to a deterministic per-element truncation*, with integer additions, so the
//! result depends only on the multiset of inputs, never on their order:
//!
//! 1. `x²` is computed in `f64`, which is exact for every finite `f32` `x` (48 significant bits).
//! 2. All squares are multiplied by the same power of two `2^e`, chosen so that the largest square lies
//!    in `[2^99, 2^100)`. Scaling by a power of two is exact.
//! 3. Each scaled square is truncated to an `i128` (`as i128`). This depends only on the element and on
//!    the maximum, and drops at most one unit, i.e. `2^-99` of the largest square.
//! 4. The `i128`s are added. Integer addition is associative and cannot overflow for fewer than `2^27`
//!    terms, so the total is the same in every order.
//! 5. The total is converted back to `f64` (one rounding), unscaled, divided by `n`; then `eps` is added
//!    and `1/sqrt` taken in `f64`, rounded once to `f32`. The output is `(x * scale) * gain` in `f32`,
//!    elementwise, like llama.cpp (`ggml_rms_norm` followed by `ggml_mul`).

/// Largest exponent of a scaled square: scaled squares are `< 2^100`.
const TARGET_EXP: i32 = 100;

/// `2^e` as an `f64`, exact for `-1022 <= e <= 1023`.
fn pow2(e: i32) -> f64 {
    debug_assert!((-1022..=1023).contains(&e));
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// Sum of squares of `xs` in `f64`, independent of the order of `xs` (bit-identical for any permutation).
///
/// Non-finite inputs give a non-finite result (`inf` or `NaN`), as a naive sum would.
pub fn sum_squares_order_independent(xs: &[f32]) -> f64 {
    let mut max = 0f64;
    for &x in xs {
        let x = x as f64;
        let sq = x * x;
        if !sq.is_finite() {
            // inf or NaN: the norm is meaningless anyway; keep the naive semantics.
            return if xs.iter().any(|v| v.is_nan()) {
                f64::NAN
            } else {
                f64::INFINITY
            };
        }
        if sq > max {
            max = sq;
        }
    }
    if max == 0.0 {
        return 0.0;
    }
    // max is a normal f64 (squares of f32 lie in [2^-298, 2^256]).
    let max_exp = ((max.to_bits() >> 52) & 0x7ff) as i32 - 1023;
    // max * 2^e in [2^(TARGET_EXP-1), 2^TARGET_EXP)
    let e = TARGET_EXP - 1 - max_exp;
    let scale = pow2(e);
    let mut acc: i128 = 0;
    for &x in xs {
        let x = x as f64;
        acc += (x * x * scale) as i128;
    }
    (acc as f64) * pow2(-e)
}

/// RMSNorm of one row: `out[i] = (x[i] * s) * gain[i]` with `s = 1/sqrt(mean(x²) + eps)`.
///
/// The mean of squares is computed with [`sum_squares_order_independent`], so permuting `x` and `gain`
/// together permutes the output exactly (bit-identical values).
///
/// # Panics
/// If `x`, `gain` and `out` differ in length (internal invariant of the callers).
pub fn rms_norm_row(x: &[f32], gain: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), gain.len());
    assert_eq!(x.len(), out.len());
    if x.is_empty() {
        return;
    }
    let mean = sum_squares_order_independent(x) / x.len() as f64;
    let scale = (1.0 / (mean + eps as f64).sqrt()) as f32;
    for ((o, &xi), &g) in out.iter_mut().zip(x).zip(gain) {
        *o = (xi * scale) * g;
    }
}

/// RMSNorm applied to each row of a row-major `[rows, gain.len()]` matrix.
pub fn rms_norm_rows(x: &[f32], gain: &[f32], eps: f32) -> Vec<f32> {
    let d = gain.len();
    let mut out = vec![0f32; x.len()];
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        rms_norm_row(xr, gain, eps, or);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(x: &[f32], gain: &[f32], eps: f32) -> Vec<f64> {
        let ms: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
        let s = 1.0 / (ms + eps as f64).sqrt();
        x.iter()
            .zip(gain)
            .map(|(&v, &g)| v as f64 * s * g as f64)
            .collect()
    }

    fn shuffle(n: usize, seed: u64) -> Vec<usize> {
        // Fisher-Yates with a tiny LCG: enough for a test permutation.
        let mut p: Vec<usize> = (0..n).collect();
        let mut s = seed | 1;
        for i in (1..n).rev() {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let j = ((s >> 33) as usize) % (i + 1);
            p.swap(i, j);
        }
        p
    }

    #[test]
    fn zeros_and_specials() {
        assert_eq!(sum_squares_order_independent(&[]), 0.0);
        assert_eq!(sum_squares_order_independent(&[0.0, -0.0]), 0.0);
        assert!(sum_squares_order_independent(&[1.0, f32::INFINITY]).is_infinite());
        assert!(sum_squares_order_independent(&[f32::NAN, 1.0]).is_nan());
        assert_eq!(sum_squares_order_independent(&[3.0, 4.0]), 25.0);
        let big = [f32::MAX, f32::MAX];
        let s = sum_squares_order_independent(&big);
        assert_eq!(s, 2.0 * (f32::MAX as f64).powi(2));
        let tiny = [f32::from_bits(1), f32::from_bits(1)];
        assert!(sum_squares_order_independent(&tiny) > 0.0);
    }

    #[test]
    fn naive_f32_sum_is_order_dependent() {
        // Documents why the custom reduction exists: a plain f32 sum changes with the order.
        let mut xs = vec![1.0f32];
        xs.extend([1.0e-4f32; 16]);
        let fwd: f32 = xs.iter().map(|v| v * v).sum();
        let rev: f32 = xs.iter().rev().map(|v| v * v).sum();
        assert_ne!(fwd.to_bits(), rev.to_bits());
        let a = sum_squares_order_independent(&xs);
        let mut r = xs.clone();
        r.reverse();
        assert_eq!(a.to_bits(), sum_squares_order_independent(&r).to_bits());
    }

    proptest! {
        #[test]
        fn permutation_gives_identical_bits(
            xs in prop::collection::vec(-1.0e3f32..1.0e3f32, 1..600),
            exps in prop::collection::vec(-20i32..20, 600),
            seed in any::<u64>(),
            eps in prop_oneof![Just(1e-5f32), Just(1e-6f32)],
        ) {
            // spread magnitudes over many binades
            let x: Vec<f32> = xs.iter().zip(&exps).map(|(&v, &e)| v * 2f32.powi(e)).collect();
            let n = x.len();
            let gain: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
            let perm = shuffle(n, seed);
            let xp: Vec<f32> = (0..n).map(|i| x[perm[i]]).collect();
            let gp: Vec<f32> = (0..n).map(|i| gain[perm[i]]).collect();
            let mut out = vec![0f32; n];
            let mut outp = vec![0f32; n];
            rms_norm_row(&x, &gain, eps, &mut out);
            rms_norm_row(&xp, &gp, eps, &mut outp);
            for i in 0..n {
                prop_assert_eq!(outp[i].to_bits(), out[perm[i]].to_bits());
            }
            let reference = naive(&x, &gain, eps);
            for i in 0..n {
                let r = reference[i];
                let tol = 1e-6 * r.abs().max(1e-30);
                prop_assert!((out[i] as f64 - r).abs() <= tol, "i={} got {} want {}", i, out[i], r);
            }
        }
    }
}
