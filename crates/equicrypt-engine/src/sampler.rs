//! Token sampling on opaque ids.
//!
//! The sampler never needs to know which id is which, so it runs unchanged on ciphertext ids: for logits
//! permuted by a vocabulary permutation `π`, it returns `π(id)` where it would have returned `id`, with
//! the same seed — as long as no two candidate logits are *exactly* equal. Candidates are ordered by
//! logit (descending) and exact ties are broken by the lower id, which is the only step that sees ids;
//! with permuted ids a tie may break the other way. Exact `f32` ties among the top candidates are
//! practically never hit with real models, but they are possible (e.g. duplicated head rows).
//!
//! Pipeline (llama.cpp-like): repetition penalty → (greedy if `temperature <= 0`) → top-k →
//! temperature → softmax → top-p → one draw from a ChaCha20 stream seeded by `seed`.

use std::collections::VecDeque;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Sampling parameters; defaults follow llama.cpp (`temperature 0.8, top_k 40, top_p 0.95`,
/// repetition penalty off, window 64) with a fixed seed 0 so runs are reproducible.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; `<= 0` selects greedy decoding.
    pub temperature: f32,
    /// Keep only the `top_k` highest logits; 0 disables.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest prefix whose probability reaches `top_p`; `1.0` disables.
    pub top_p: f32,
    /// Repetition penalty (llama.cpp semantics); `1.0` disables.
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the penalty looks at; 0 disables.
    pub repeat_last_n: usize,
    /// Seed of the ChaCha20 stream used for the draws.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0, no penalty).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks that every parameter is in its domain.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidSamplingParams(m));
        if self.temperature.is_nan() {
            return bad("temperature is NaN".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad(format!(
                "repeat_penalty {} must be finite and > 0",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

/// Index of the largest logit; exact ties go to the first occurrence. NaNs are never selected.
///
/// Returns `None` if `logits` is empty or all NaN.
pub fn argmax(logits: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if l <= b => {}
            _ => best = Some((i, l)),
        }
    }
    best.map(|(i, _)| i)
}

/// Applies llama.cpp's repetition penalty in place: for every distinct id in `recent`, a positive
/// logit is divided by `penalty`, a non-positive one multiplied by it. Out-of-range ids are ignored.
pub fn apply_repeat_penalty(logits: &mut [f32], recent: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = std::collections::HashSet::with_capacity(recent.len());
    for &id in recent {
        if !seen.insert(id) {
            continue;
        }
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// Stateful sampler: parameters, the ChaCha20 stream and the recent-token window for the penalty.
///
/// Invariant: `recent.len() <= params.repeat_last_n`.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
    recent: VecDeque<u32>,
}

impl Sampler {
    /// A sampler with an empty history; errors on invalid parameters.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = ChaCha20Rng::seed_from_u64(params.seed);
        Ok(Self {
            params,
            rng,
            recent: VecDeque::new(),
        })
    }

    /// The parameters in use.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records a token (prompt or generated) in the repetition window.
    pub fn accept(&mut self, id: u32) {
        if self.params.repeat_last_n == 0 {
            return;
        }
        if self.recent.len() == self.params.repeat_last_n {
            self.recent.pop_front();
        }
        self.recent.push_back(id);
    }

    /// Clears the repetition window and restarts the random stream from `seed`.
    pub fn reset(&mut self) {
        self.recent.clear();
        self.rng = ChaCha20Rng::seed_from_u64(self.params.seed);
    }

    /// A uniform draw in `[0, 1)` from the top 53 bits of one `next_u64`.
    fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Picks the next id from `logits` (does not [`accept`](Self::accept) it).
    ///
    /// Errors if `logits` is empty or contains no non-NaN value.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(EngineError::InvalidLogits("empty logit vector".into()));
        }
        if u32::try_from(logits.len() - 1).is_err() {
            return Err(EngineError::InvalidLogits("more than 2^32 ids".into()));
        }
        let p = &self.params;
        let mut work;
        let logits = if p.repeat_penalty != 1.0 && !self.recent.is_empty() {
            work = logits.to_vec();
            let recent: Vec<u32> = self.recent.iter().copied().collect();
            apply_repeat_penalty(&mut work, &recent, p.repeat_penalty);
            &work[..]
        } else {
            logits
        };
        let no_value = || EngineError::InvalidLogits("all logits are NaN".into());
        if p.temperature <= 0.0 {
            return argmax(logits).map(|i| i as u32).ok_or_else(no_value);
        }
        // Candidates by descending logit, exact ties by ascending id (deterministic total order).
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if cand.is_empty() {
            return Err(no_value());
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_logit); // total order: the result does not depend on stability
        let max = cand[0].1 as f64;
        if max == f64::INFINITY {
            return Ok(cand[0].0);
        }
        let t = p.temperature as f64;
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|&(_, l)| ((l as f64 - max) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        for q in &mut probs {
            *q /= total;
        }
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, &q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept_total: f64 = probs[..keep].iter().sum();
        let target = self.uniform() * kept_total;
        let mut cum = 0.0;
        for (i, &q) in probs[..keep].iter().enumerate() {
            cum += q;
            if target < cum {
                return Ok(cand[i].0);
            }
        }
        Ok(cand[keep - 1].0)
    }
}

#[cfg(test)]
mod tests {
    use super::{apply_repeat_penalty, argmax, EngineError, Sampler, SamplingParams};
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::{RngCore, SeedableRng};

    fn permutation(n: usize, seed: u64) -> Vec<usize> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            p.swap(i, j);
        }
        p
    }

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9]).unwrap(), 1);
        assert_eq!(s.sample(&[1.0, 5.0, 5.0]).unwrap(), 1);
        assert_eq!(s.sample(&[f32::NAN, -1.0]).unwrap(), 1);
        assert!(s.sample(&[]).is_err());
        assert!(s.sample(&[f32::NAN]).is_err());
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), Some(0));
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 101) as f32 * 0.1).collect();
        let want = argmax(&logits).unwrap() as u32;
        for seed in 0..20 {
            let mut s = Sampler::new(SamplingParams {
                top_k: 1,
                temperature: 1.5,
                seed,
                ..SamplingParams::default()
            })
            .unwrap();
            assert_eq!(s.sample(&logits).unwrap(), want);
        }
    }

    #[test]
    fn same_seed_same_stream() {
        let logits: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 1234,
            ..SamplingParams::default()
        };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone()).unwrap();
            (0..50)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        let a = run(&params);
        assert_eq!(a, run(&params));
        let b = run(&SamplingParams {
            seed: 1235,
            ..params.clone()
        });
        assert_ne!(a, b);
        // It really samples: more than one distinct id over 50 draws.
        let mut d = a.clone();
        d.sort();
        d.dedup();
        assert!(d.len() > 3);
        // reset restarts the stream
        let mut s = Sampler::new(params).unwrap();
        let first: Vec<u32> = (0..10).map(|_| s.sample(&logits).unwrap()).collect();
        s.reset();
        let again: Vec<u32> = (0..10).map(|_| s.sample(&logits).unwrap()).collect();
        assert_eq!(first, again);
    }

    #[test]
    fn repeat_penalty_math() {
        let mut l = vec![2.0f32, -2.0, 0.0, 4.0];
        apply_repeat_penalty(&mut l, &[0, 1, 2, 0, 0, 99], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 0.0, 4.0]);

        // Penalty flips a greedy choice: id 0 is repeated, so 3.0/2 < 2.0.
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: 2.0,
            repeat_last_n: 2,
            ..SamplingParams::default()
        })
        .unwrap();
        let logits = [3.0f32, 2.0, 1.0];
        assert_eq!(s.sample(&logits).unwrap(), 0);
        s.accept(0);
        assert_eq!(s.sample(&logits).unwrap(), 1);
        // window of 2: after two other tokens, id 0 is forgotten
        s.accept(2);
        s.accept(2);
        assert_eq!(s.sample(&logits).unwrap(), 0);
    }

    #[test]
    fn top_p_keeps_nucleus() {
        // p ≈ [0.84, 0.11, 0.04, ...]: top_p 0.5 keeps only the first.
        let logits = [5.0f32, 3.0, 2.0, 0.0, -1.0];
        for seed in 0..30 {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.5,
                seed,
                ..SamplingParams::default()
            })
            .unwrap();
            assert_eq!(s.sample(&logits).unwrap(), 0);
        }
    }

    #[test]
    fn invalid_params_rejected() {
        for p in [
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                repeat_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
        ] {
            assert!(matches!(
                Sampler::new(p),
                Err(EngineError::InvalidSamplingParams(_))
            ));
        }
    }

    #[test]
    fn params_serde_roundtrip_and_defaults() {
        let p = SamplingParams {
            seed: 7,
            ..Default::default()
        };
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<SamplingParams>(&s).unwrap(), p);
        let partial: SamplingParams = serde_json::from_str(r#"{"temperature":0.0}"#).unwrap();
        assert_eq!(partial, SamplingParams::greedy());
    }

    proptest! {
        #[test]
        fn sampling_is_permutation_equivariant(
            raw in prop::collection::vec(-1000i32..1000, 2..200),
            perm_seed in any::<u64>(),
            seed in any::<u64>(),
            top_k in 0usize..20,
            top_p in 0.05f32..1.0,
            temperature in prop_oneof![Just(0.0f32), 0.1f32..2.0],
            penalty in prop_oneof![Just(1.0f32), 0.5f32..2.0],
        ) {
            // distinct logits (ties are the documented exception)
            let mut seen = std::collections::HashSet::new();
            let logits: Vec<f32> = raw.iter().enumerate()
                .map(|(i, &r)| r as f32 * 0.01 + i as f32 * 1e-5)
                .filter(|l| seen.insert(l.to_bits()))
                .collect();
            prop_assume!(logits.len() >= 2);
            let n = logits.len();
            let perm = permutation(n, perm_seed); // plain id i -> cipher id perm[i]
            let mut enc = vec![0f32; n];
            for i in 0..n { enc[perm[i]] = logits[i]; }
            let params = SamplingParams { temperature, top_k, top_p, repeat_penalty: penalty, repeat_last_n: 8, seed };
            let mut plain = Sampler::new(params.clone()).unwrap();
            let mut cipher = Sampler::new(params).unwrap();
            let history: Vec<u32> = (0..5).map(|j| ((j * 7) % n) as u32).collect();
            for &h in &history {
                plain.accept(h);
                cipher.accept(perm[h as usize] as u32);
            }
            for _ in 0..5 {
                let a = plain.sample(&logits).unwrap();
                let b = cipher.sample(&enc).unwrap();
                prop_assert_eq!(perm[a as usize] as u32, b);
            }
        }
    }
}
