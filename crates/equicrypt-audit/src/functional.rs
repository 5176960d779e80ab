//! A2: functional fingerprinting — a black-box attack that only *runs* the models.
//!
//! **Invariant.** The encrypted model computes the public model's function up to a permutation of
//! the vocabulary: fed ciphertext id `c = π(p)` as the only token of a sequence, it outputs the
//! public model's next-token distribution after `p`, with its entries moved by `π`. Sorting a
//! distribution forgets which id carries which probability, so the *sorted* next-token distribution
//! of ciphertext id `c` on the encrypted model equals (up to rounding) the sorted distribution of
//! plaintext id `p` on the public model. Hidden-coordinate permutations do not matter at all: they
//! are invisible in the outputs.
//!
//! **Attack.** The server runs the encrypted model on single ciphertext tokens (ids seen in traffic,
//! or all of them) and the public model on single plaintext tokens (e.g. the most frequent ones in
//! public text). The signature of an id is its top-`K` next-token log-probabilities
//! (`logit − logsumexp`), sorted descending. Each ciphertext id is matched to the plaintext id with
//! the nearest signature in L2 distance.
//!
//! **Decision rule.** With `d₁ ≤ d₂` the distances to the nearest and second-nearest candidate, a
//! match is accepted iff
//! - `d₁ / √K ≤` [`MAX_RMS_DISTANCE`] (the signatures agree to within that many nats per entry, on
//!   root-mean-square), and
//! - `d₁ ≤` [`RATIO`]` · d₂` (the best candidate is clearly better than the runner-up; with a single
//!   candidate `d₂ = ∞`).
//!
//! Otherwise the ciphertext id is left unguessed (`None`). Two plaintext ids with the same signature
//! (e.g. identical embedding rows) are therefore rejected rather than guessed, and a target whose true
//! plaintext id is not among the candidates is mostly rejected rather than confidently mismatched.
//!
//! **Short contexts.** A target rejected by the ratio test alone (its signature is close to
//! several candidates) gets a second look: the attacker takes the most confident match `(a_c, a_p)`
//! as an anchor and compares the encrypted model after the two-token context `[a_c, target]` with
//! the public model after `[a_p, candidate]` for the [`CONTEXT_CANDIDATES`] nearest candidates,
//! under the same decision rule. Ids whose embedding rows are identical stay ambiguous (the model
//! cannot tell them apart in any context); ids that only look alike after one token are separated.
//!
//! **Search.** Candidates are sorted by their top-1 log-probability; the squared distance is at least
//! the squared difference of first entries, so the nearest-two search scans outward from the target's
//! place in that order and stops as soon as that bound settles the decision: it exceeds the current
//! second-best distance, or `d₁ / RATIO`, or the absolute bound while `d₁` is above it. Every accepted
//! match and every accept/reject decision is the same as brute force; an accepted target visits only
//! the few candidates within `2 d₁` of its top-1 log-probability (SmolLM2: 2048 targets against
//! 49152 candidates match in about 10 ms, against 1.3 s when the truth is absent).

use std::collections::HashSet;
use std::time::Instant;

use serde::Serialize;

use crate::dense::DenseLlama;
use crate::AuditError;

/// Largest accepted root-mean-square difference between matched signatures, in nats per entry.
///
/// Dense `f32` evaluation of an exactly equivalent model differs by about `1e-5`; distinct tokens of
/// a real model differ by far more than this bound.
pub const MAX_RMS_DISTANCE: f32 = 0.02;

/// The nearest candidate must be at most this fraction of the runner-up's distance.
pub const RATIO: f32 = 0.5;

/// Candidates compared in two-token contexts for a target the single-token pass found ambiguous.
pub const CONTEXT_CANDIDATES: usize = 4;

/// Budget and parameters of [`attack`].
#[derive(Clone, Debug)]
pub struct FunctionalOptions {
    /// Ciphertext ids to fingerprint (the attacker's budget; e.g. ids seen in traffic). None = all.
    pub targets: Option<Vec<u32>>,
    /// Plaintext ids to fingerprint on the public model (e.g. most frequent in public text). None = all.
    pub candidates: Option<Vec<u32>>,
    /// Length `K` of a signature: the top-`K` log-probabilities (1 ..= vocab).
    pub top_k: usize,
    /// Ids per forward batch (see [`crate::dense::RECOMMENDED_BATCH`]).
    pub batch: usize,
}

impl Default for FunctionalOptions {
    /// All targets against all candidates, `top_k = 32`, `batch = 256`.
    fn default() -> Self {
        Self {
            targets: None,
            candidates: None,
            top_k: 32,
            batch: crate::dense::RECOMMENDED_BATCH,
        }
    }
}

/// The attack's output.
#[derive(Clone, Debug, Serialize)]
pub struct FunctionalMatch {
    /// guess[c] = plaintext id believed to be at ciphertext id c (len = vocab; None where not attempted or rejected).
    pub guess: Vec<Option<u32>>,
    /// Ciphertext ids fingerprinted (distinct targets).
    pub attempted: usize,
    /// Ciphertext ids that received a guess (passed the decision rule).
    pub matched: usize,
    /// model queries made (single-token forward passes, both models)
    pub queries: usize,
    /// Attacker wall time in seconds: forward passes and matching (loading excluded).
    pub seconds: f64,
}

/// Signature of one logits row: the top-`k` log-probabilities, sorted descending.
///
/// `scratch` must be as long as `row`. `k` must be `1 ..= row.len()`.
fn signature(row: &[f32], k: usize, scratch: &mut [f32], out: &mut Vec<f32>) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    scratch.copy_from_slice(row);
    let desc = |a: &f32, b: &f32| b.total_cmp(a);
    if k < scratch.len() {
        scratch.select_nth_unstable_by(k - 1, desc);
    }
    let top = &mut scratch[..k];
    top.sort_unstable_by(desc);
    out.extend(top.iter().map(|&l| (l as f64 - lse) as f32));
}

/// Signatures of `ids` on `model`, row-major `[ids.len(), k]`; advances `bar` per id.
pub fn signatures(
    model: &DenseLlama,
    ids: &[u32],
    k: usize,
    batch: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<f32>, AuditError> {
    let v = model.vocab();
    if k == 0 || k > v || batch == 0 {
        return Err(AuditError::InvalidInput(format!(
            "top_k {k} must be in 1..={v} and batch {batch} non-zero"
        )));
    }
    let mut out = Vec::with_capacity(ids.len() * k);
    let mut scratch = vec![0f32; v];
    for chunk in ids.chunks(batch) {
        let logits = model.first_token_logits(chunk)?;
        for row in logits.chunks_exact(v) {
            signature(row, k, &mut scratch, &mut out);
        }
        bar.inc(chunk.len() as u64);
    }
    Ok(out)
}

/// Squared L2 distance, abandoning (returning something `>= bound`) once the partial sum reaches
/// `bound`.
fn dist2(a: &[f32], b: &[f32], bound: f32) -> f32 {
    let mut s = 0f32;
    for (ca, cb) in a.chunks(8).zip(b.chunks(8)) {
        s += ca
            .iter()
            .zip(cb)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>();
        if s >= bound {
            break;
        }
    }
    s
}

/// Nearest-two search over candidate signatures sorted by their first entry.
struct Index<'a> {
    sigs: &'a [f32],
    k: usize,
    /// Candidate rows ordered by first entry.
    order: Vec<usize>,
    /// First entry of each row of `order`.
    firsts: Vec<f32>,
}

impl<'a> Index<'a> {
    fn new(sigs: &'a [f32], k: usize) -> Self {
        let mut order: Vec<usize> = (0..sigs.len() / k).collect();
        order.sort_by(|&a, &b| sigs[a * k].total_cmp(&sigs[b * k]));
        let firsts = order.iter().map(|&r| sigs[r * k]).collect();
        Self {
            sigs,
            k,
            order,
            firsts,
        }
    }

    /// `(row, d₁², d₂²)`: the nearest candidate row and the two smallest squared distances, with
    /// the scan cut short once the decision rule's outcome is fixed:
    /// - once every unvisited candidate is at least `d₁ / ratio` away (`ratio > 0`), `d₁` is final
    ///   and `d₂` is exact if it is below `d₁ / ratio` (else it only stays `≥ d₁ / ratio`);
    /// - once every unvisited candidate is farther than `max_d1` while `d₁ > max_d1`, the match is
    ///   rejected whatever remains (then `row` may not be the true nearest).
    ///
    /// With `ratio = 0` and `max_d1 = ∞` the result is the exact nearest two.
    fn nearest_two(&self, q: &[f32], max_d1: f32, ratio: f32) -> Option<(usize, f32, f32)> {
        let n = self.order.len();
        let start = self.firsts.partition_point(|&f| f < q[0]);
        let (mut lo, mut hi) = (start, start); // next to visit: lo-1 going left, hi going right
        let (mut best, mut d1, mut d2) = (None, f32::INFINITY, f32::INFINITY);
        loop {
            let left = (lo > 0).then(|| q[0] - self.firsts[lo - 1]);
            let right = (hi < n).then(|| self.firsts[hi] - q[0]);
            let (pos, gap) = match (left, right) {
                (None, None) => break,
                (Some(l), Some(r)) if l <= r => (lo - 1, l),
                (Some(l), None) => (lo - 1, l),
                (_, Some(r)) => (hi, r),
            };
            let fixed_ratio = ratio > 0.0 && gap * ratio >= d1.sqrt();
            let fixed_reject = gap > max_d1 && d1.sqrt() > max_d1;
            if gap * gap >= d2 || fixed_ratio || fixed_reject {
                break;
            }
            if pos < lo {
                lo -= 1;
            } else {
                hi += 1;
            }
            let row = self.order[pos];
            let d = dist2(q, &self.sigs[row * self.k..][..self.k], d2);
            if d < d1 {
                d2 = d1;
                d1 = d;
                best = Some(row);
            } else if d < d2 {
                d2 = d;
            }
        }
        best.map(|b| (b, d1, d2))
    }
}

/// For each target signature: the nearest candidate row and the distances (not squared) to the
/// nearest and second-nearest candidates; `None` when there are no candidates.
fn nearest(cand_sigs: &[f32], target_sigs: &[f32], k: usize) -> Vec<Option<(usize, f32, f32)>> {
    let index = Index::new(cand_sigs, k);
    target_sigs
        .chunks_exact(k)
        .map(|q| {
            index
                .nearest_two(q, MAX_RMS_DISTANCE * (k as f32).sqrt(), RATIO)
                .map(|(r, d1, d2)| (r, d1.sqrt(), d2.sqrt()))
        })
        .collect()
}

/// Whether a match at distances `d1 ≤ d2` (not squared) passes the decision rule for signatures of
/// length `k`.
pub fn accept(d1: f32, d2: f32, k: usize) -> bool {
    d1 <= MAX_RMS_DISTANCE * (k as f32).sqrt() && d1 <= RATIO * d2
}

/// Distinct ids of `list` (order kept), or all ids; errors on ids outside the vocabulary.
fn id_set(list: &Option<Vec<u32>>, vocab: usize, what: &str) -> Result<Vec<u32>, AuditError> {
    match list {
        None => Ok((0..vocab as u32).collect()),
        Some(ids) => {
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(AuditError::InvalidInput(format!(
                    "{what} id {bad} is outside the vocabulary of {vocab}"
                )));
            }
            let mut seen = HashSet::with_capacity(ids.len());
            Ok(ids.iter().copied().filter(|i| seen.insert(*i)).collect())
        }
    }
}

/// Runs A2: fingerprints the targets on `encrypted` and the candidates on `public` and matches them
/// (see the module documentation for the signature and the decision rule).
///
/// Sets `bar`'s length to `targets + candidates` and advances it per id run.
///
/// Errors: vocabularies of different sizes, ids outside the vocabulary, `top_k` not in
/// `1 ..= vocab`, `batch == 0`, or a failing forward pass.
pub fn attack(
    public: &DenseLlama,
    encrypted: &DenseLlama,
    opts: &FunctionalOptions,
    bar: &indicatif::ProgressBar,
) -> Result<FunctionalMatch, AuditError> {
    let vocab = encrypted.vocab();
    if public.vocab() != vocab {
        return Err(AuditError::Mismatch(format!(
            "vocabularies differ ({} vs {vocab})",
            public.vocab()
        )));
    }
    let (k, batch) = (opts.top_k, opts.batch);
    if k == 0 || k > vocab || batch == 0 {
        return Err(AuditError::InvalidInput(format!(
            "top_k {k} must be in 1..={vocab} and batch {batch} non-zero"
        )));
    }
    let targets = id_set(&opts.targets, vocab, "target")?;
    let candidates = id_set(&opts.candidates, vocab, "candidate")?;
    let start = Instant::now();
    bar.set_length((targets.len() + candidates.len()) as u64);
    let cand_sigs = signatures(public, &candidates, k, batch, bar)?;
    let target_sigs = signatures(encrypted, &targets, k, batch, bar)?;
    let mut guess = vec![None; vocab];
    let mut matched = 0;
    // Ambiguous targets (close enough, but not clearly closer than the runner-up) and the most
    // confident match, the anchor of the short contexts.
    let mut ambiguous = Vec::new();
    let mut anchor: Option<(u32, u32, f32)> = None;
    for (i, (&c, near)) in targets
        .iter()
        .zip(nearest(&cand_sigs, &target_sigs, k))
        .enumerate()
    {
        if let Some((row, d1, d2)) = near {
            if accept(d1, d2, k) {
                guess[c as usize] = Some(candidates[row]);
                matched += 1;
                if anchor.is_none_or(|(_, _, d)| d1 < d) {
                    anchor = Some((c, candidates[row], d1));
                }
            } else if d1 <= MAX_RMS_DISTANCE * (k as f32).sqrt() {
                ambiguous.push(i);
            }
        }
    }
    let mut queries = targets.len() + candidates.len();
    if let (Some((a_c, a_p, _)), false) = (anchor, ambiguous.is_empty()) {
        for i in ambiguous {
            let sig = &target_sigs[i * k..(i + 1) * k];
            let near = nearest_n(&cand_sigs, sig, k, CONTEXT_CANDIDATES);
            let pool: Vec<u32> = near.iter().map(|&r| candidates[r]).collect();
            if let Some(p) = in_context(public, encrypted, (a_c, a_p), targets[i], &pool, k)? {
                guess[targets[i] as usize] = Some(p);
                matched += 1;
            }
            queries += 1 + pool.len();
        }
    }
    Ok(FunctionalMatch {
        guess,
        attempted: targets.len(),
        matched,
        queries,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Rows of the `n` candidate signatures nearest to `sig` (brute force; used for few targets).
fn nearest_n(cand_sigs: &[f32], sig: &[f32], k: usize, n: usize) -> Vec<usize> {
    let mut d: Vec<(f32, usize)> = cand_sigs
        .chunks_exact(k)
        .enumerate()
        .map(|(r, c)| (dist2(c, sig, f32::INFINITY), r))
        .collect();
    let n = n.min(d.len());
    if n == 0 {
        return Vec::new();
    }
    d.select_nth_unstable_by(n - 1, |a, b| a.0.total_cmp(&b.0));
    d.truncate(n);
    d.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    d.into_iter().map(|(_, r)| r).collect()
}

/// Matches ciphertext `target` among plaintext `pool` by the next-token distribution after the
/// two-token contexts `[anchor.0, target]` (encrypted model) and `[anchor.1, candidate]` (public
/// model), under [`accept`]. `None` when the contexts do not decide either.
pub fn in_context(
    public: &DenseLlama,
    encrypted: &DenseLlama,
    anchor: (u32, u32),
    target: u32,
    pool: &[u32],
    k: usize,
) -> Result<Option<u32>, AuditError> {
    if pool.is_empty() {
        return Ok(None);
    }
    let v = encrypted.vocab();
    let mut scratch = vec![0f32; v];
    let mut t_sig = Vec::with_capacity(k);
    signature(
        &encrypted.last_logits(&[vec![anchor.0, target]])?,
        k,
        &mut scratch,
        &mut t_sig,
    );
    let seqs: Vec<Vec<u32>> = pool.iter().map(|&p| vec![anchor.1, p]).collect();
    let logits = public.last_logits(&seqs)?;
    let mut c_sigs = Vec::with_capacity(pool.len() * k);
    for row in logits.chunks_exact(v) {
        signature(row, k, &mut scratch, &mut c_sigs);
    }
    let mut d: Vec<(f32, usize)> = c_sigs
        .chunks_exact(k)
        .enumerate()
        .map(|(r, c)| (dist2(c, &t_sig, f32::INFINITY).sqrt(), r))
        .collect();
    d.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let d2 = d.get(1).map_or(f32::INFINITY, |x| x.0);
    Ok((accept(d[0].0, d2, k)).then(|| pool[d[0].1]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use equicrypt_core::{PermMode, SecretKey, VocabPermutation};
    use equicrypt_model::encrypt::{encrypt_gguf, EncryptOptions};
    use equicrypt_model::synthetic::SyntheticLlama;
    use indicatif::ProgressBar;
    use std::path::{Path, PathBuf};

    fn models(mode: PermMode) -> (tempfile::TempDir, PathBuf, PathBuf, VocabPermutation) {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.gguf");
        let enc = dir.path().join("enc.gguf");
        SyntheticLlama::tiny_f32(21).write(&plain).unwrap();
        let key = SecretKey::from_bytes([7; 32]);
        let opts = EncryptOptions {
            mode,
            ..Default::default()
        };
        encrypt_gguf(&key, &plain, &enc, &opts).unwrap();
        let vocab = DenseLlama::load(&plain).unwrap().vocab();
        (dir, plain, enc, VocabPermutation::derive(&key, vocab))
    }

    fn load(p: &Path) -> DenseLlama {
        DenseLlama::load(p).unwrap()
    }

    #[test]
    fn recovers_the_vocabulary_in_both_modes() {
        for mode in [PermMode::Exact, PermMode::Full] {
            let (_d, plain, enc, perm) = models(mode);
            let (p, e) = (load(&plain), load(&enc));
            let opts = FunctionalOptions {
                batch: 40,
                ..Default::default()
            };
            let bar = ProgressBar::hidden();
            let m = attack(&p, &e, &opts, &bar).unwrap();
            let v = p.vocab();
            assert_eq!(bar.length(), Some(2 * v as u64));
            assert_eq!(bar.position(), 2 * v as u64);
            assert_eq!((m.attempted, m.queries, m.guess.len()), (v, 2 * v, v));
            let correct = (0..v as u32)
                .filter(|&pl| m.guess[perm.encrypt_id(pl).unwrap() as usize] == Some(pl))
                .count();
            let wrong = m.matched - correct;
            assert!(correct >= v * 95 / 100, "{mode:?}: {correct}/{v}");
            assert_eq!(wrong, 0, "{mode:?}");
        }
    }

    #[test]
    fn short_contexts_pick_the_truth_and_reject_look_alikes() {
        for mode in [PermMode::Exact, PermMode::Full] {
            let (_d, plain, enc, perm) = models(mode);
            let (p, e) = (load(&plain), load(&enc));
            let anchor = (perm.encrypt_id(5).unwrap(), 5);
            let (mut right, mut wrong, mut confident_without_truth) = (0, 0, 0);
            for pl in 10..30u32 {
                let t = perm.encrypt_id(pl).unwrap();
                match in_context(&p, &e, anchor, t, &[pl + 40, pl, pl + 50], 16).unwrap() {
                    Some(x) if x == pl => right += 1,
                    Some(_) => wrong += 1,
                    None => {}
                }
                if in_context(&p, &e, anchor, t, &[pl + 40, pl + 50], 16)
                    .unwrap()
                    .is_some()
                {
                    confident_without_truth += 1;
                }
            }
            assert!(
                right >= 19 && wrong == 0,
                "{mode:?}: {right} right, {wrong} wrong"
            );
            assert!(confident_without_truth <= 1, "{confident_without_truth}");
            assert_eq!(in_context(&p, &e, anchor, 3, &[], 16).unwrap(), None);
        }
    }

    #[test]
    fn missing_truth_is_rejected_not_guessed() {
        let (_d, plain, enc, perm) = models(PermMode::Full);
        let (p, e) = (load(&plain), load(&enc));
        // Targets: the ciphertext ids of plaintext 0..48; candidates: plaintext 48..96 only.
        let targets: Vec<u32> = (0..48).map(|pl| perm.encrypt_id(pl).unwrap()).collect();
        let opts = FunctionalOptions {
            targets: Some(targets.clone()),
            candidates: Some((48..96).collect()),
            top_k: 32,
            batch: 16,
        };
        let m = attack(&p, &e, &opts, &ProgressBar::hidden()).unwrap();
        assert_eq!((m.attempted, m.queries), (48, 96));
        // Every guess is necessarily wrong; almost all must be rejections.
        assert!(m.matched <= 2, "{} confident wrong answers", m.matched);
        // With the truth included among the candidates, the same targets are recovered.
        let opts = FunctionalOptions {
            candidates: Some((0..96).rev().collect()),
            ..opts
        };
        let m = attack(&p, &e, &opts, &ProgressBar::hidden()).unwrap();
        let ok = (0..48u32)
            .filter(|&pl| m.guess[targets[pl as usize] as usize] == Some(pl))
            .count();
        assert!(ok >= 46, "{ok}/48");
        // Non-targets are never guessed.
        assert_eq!(m.guess.iter().flatten().count(), m.matched);
        assert!(m.matched <= 48);
    }

    #[test]
    fn nearest_two_is_exact() {
        // Pseudo-random signatures: the pruned search equals brute force.
        let k = 5;
        let mut x = 12345u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32
        };
        let sigs: Vec<f32> = (0..300 * k).map(|_| rnd()).collect();
        let index = Index::new(&sigs, k);
        for _ in 0..50 {
            let q: Vec<f32> = (0..k).map(|_| rnd()).collect();
            let mut all: Vec<(f32, usize)> = sigs
                .chunks_exact(k)
                .enumerate()
                .map(|(r, s)| (dist2(&q, s, f32::INFINITY), r))
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (row, d1, d2) = index.nearest_two(&q, f32::INFINITY, 0.0).unwrap();
            assert_eq!((row, d1, d2), (all[0].1, all[0].0, all[1].0));
            // The pruned scan takes the same decision as brute force.
            for (max, ratio) in [(0.05f32, 0.5f32), (0.2, 0.9), (1.0, 0.3), (0.01, 0.99)] {
                let (r, e1, e2) = index.nearest_two(&q, max, ratio).unwrap();
                let want = all[0].0.sqrt() <= max && all[0].0.sqrt() <= ratio * all[1].0.sqrt();
                let got = e1.sqrt() <= max && e1.sqrt() <= ratio * e2.sqrt();
                assert_eq!(got, want);
                if want {
                    assert_eq!(r, all[0].1);
                }
            }
        }
        // Near-duplicates of candidates: accepted by the pruned scan exactly when brute force does.
        for r in (0..300).step_by(7) {
            let q: Vec<f32> = sigs[r * k..][..k].iter().map(|v| v + 1e-4).collect();
            let (row, _, _) = index.nearest_two(&q, 0.05, 0.5).unwrap();
            assert_eq!(row, r);
        }
        assert!(Index::new(&[], k)
            .nearest_two(&[0.0; 5], f32::INFINITY, 0.0)
            .is_none());
    }

    #[test]
    fn signature_is_sorted_normalized_top_k() {
        let row = [0.0f32, 3.0, 1.0, 2.0];
        let (mut scratch, mut out) = ([0f32; 4], vec![]);
        signature(&row, 2, &mut scratch, &mut out);
        let lse = (1f64 + 3f64.exp() + 1f64.exp() + 2f64.exp()).ln();
        assert!((out[0] - (3.0 - lse) as f32).abs() < 1e-6);
        assert!((out[1] - (2.0 - lse) as f32).abs() < 1e-6);
        assert_eq!(out.len(), 2);
        // Invariant under a permutation of the row.
        let mut out2 = vec![];
        signature(&[2.0, 1.0, 3.0, 0.0], 2, &mut scratch, &mut out2);
        assert_eq!(out, out2);
        assert!(accept(0.0, 1.0, 4));
        assert!(!accept(0.5, 0.6, 4));
        assert!(!accept(1.0, f32::INFINITY, 4));
    }

    #[test]
    fn bad_options_are_errors() {
        let (_d, plain, enc, _) = models(PermMode::Exact);
        let (p, e) = (load(&plain), load(&enc));
        let bar = ProgressBar::hidden();
        let bad = [
            FunctionalOptions {
                top_k: 0,
                ..Default::default()
            },
            FunctionalOptions {
                top_k: 97,
                ..Default::default()
            },
            FunctionalOptions {
                batch: 0,
                ..Default::default()
            },
            FunctionalOptions {
                targets: Some(vec![96]),
                ..Default::default()
            },
            FunctionalOptions {
                candidates: Some(vec![1000]),
                ..Default::default()
            },
        ];
        for o in &bad {
            assert!(attack(&p, &e, o, &bar).is_err(), "{o:?}");
        }
        let empty = FunctionalOptions {
            targets: Some(vec![]),
            ..Default::default()
        };
        assert_eq!(attack(&p, &e, &empty, &bar).unwrap().matched, 0);
    }

    use crate::dense::tests::cpu_seconds;

    /// A2 on SmolLM2 (run with `--ignored --nocapture`): 2048 random ciphertext ids against all
    /// 49152 plaintext ids, exact and full mode. The public signatures are computed once.
    #[test]
    #[ignore]
    fn smollm2_a2_report() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let public = root.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        let key = root.join("demo.key");
        if !public.exists() || !key.exists() {
            eprintln!("note: SmolLM2 or demo.key absent, skipping");
            return;
        }
        let key = SecretKey::from_file_text(&std::fs::read_to_string(key).unwrap()).unwrap();
        let p = load(&public);
        let v = p.vocab();
        let perm = VocabPermutation::derive(&key, v);
        let (k, batch) = (32, 256);
        let bar = ProgressBar::hidden();
        let (t, c) = (Instant::now(), cpu_seconds());
        let cands: Vec<u32> = (0..v as u32).collect();
        let cand_sigs = signatures(&p, &cands, k, batch, &bar).unwrap();
        eprintln!(
            "public signatures: {v} ids in {:.1} s wall, {:.1} s cpu",
            t.elapsed().as_secs_f64(),
            cpu_seconds() - c
        );
        // 2048 distinct random ciphertext ids.
        let mut x = 0x2545F4914F6CDD1Du64;
        let mut seen = HashSet::new();
        let mut targets = Vec::new();
        while targets.len() < 2048 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = (x % v as u64) as u32;
            if seen.insert(id) {
                targets.push(id);
            }
        }
        for (name, file) in [
            ("exact", "smollm2-encrypted-20648ff2.gguf"),
            ("full", "smollm2-full.gguf"),
        ] {
            let path = root.join(file);
            if !path.exists() {
                eprintln!("note: {file} absent");
                continue;
            }
            let e = load(&path);
            let (t, c) = (Instant::now(), cpu_seconds());
            let sigs = signatures(&e, &targets, k, batch, &bar).unwrap();
            let fwd = t.elapsed().as_secs_f64();
            let near = nearest(&cand_sigs, &sigs, k);
            let total = t.elapsed().as_secs_f64();
            let cpu = cpu_seconds() - c;
            let (mut right, mut wrong, mut rejected_right, mut rejected_wrong) = (0, 0, 0, 0);
            for (&ct, n) in targets.iter().zip(&near) {
                let (row, d1, d2) = n.unwrap();
                let is_right = cands[row] == perm.decrypt_id(ct).unwrap();
                match (accept(d1, d2, k), is_right) {
                    (true, true) => right += 1,
                    (true, false) => wrong += 1,
                    (false, true) => rejected_right += 1,
                    (false, false) => rejected_wrong += 1,
                }
            }
            eprintln!(
                "{name}: 2048 targets vs {v} candidates: {right} right, {wrong} wrong, rejected \
                 {rejected_right} (nearest right) + {rejected_wrong} (nearest wrong); accuracy \
                 {:.2} %; target forward {fwd:.1} s wall, matching {:.3} s, cpu {cpu:.1} s",
                100.0 * right as f64 / 2048.0,
                total - fwd,
            );
            // Exact distances (no pruning) for the margins.
            let index = Index::new(&cand_sigs, k);
            let (mut d1s, mut ratios) = (vec![], vec![]);
            for q in sigs.chunks_exact(k) {
                let (_, d1, d2) = index.nearest_two(q, f32::INFINITY, 0.0).unwrap();
                d1s.push(d1.sqrt() / (k as f32).sqrt());
                ratios.push((d1 / d2).sqrt());
            }
            let q = |v: &mut Vec<f32>, f: f64| {
                v.sort_by(f32::total_cmp);
                v.get(((v.len() as f64 - 1.0) * f) as usize)
                    .copied()
                    .unwrap_or(f32::NAN)
            };
            eprintln!(
                "  nearest: rms d1 median {:.2e} p99 {:.2e} max {:.2e}; d1/d2 median {:.2e} \
                 p99 {:.2e} max {:.2e}",
                q(&mut d1s, 0.5),
                q(&mut d1s, 0.99),
                q(&mut d1s, 1.0),
                q(&mut ratios, 0.5),
                q(&mut ratios, 0.99),
                q(&mut ratios, 1.0)
            );
            // The same targets against every candidate except their true plaintext ids.
            let truths: HashSet<u32> = targets
                .iter()
                .map(|&ct| perm.decrypt_id(ct).unwrap())
                .collect();
            let keep: Vec<usize> = (0..v).filter(|&p| !truths.contains(&(p as u32))).collect();
            let sub: Vec<f32> = keep
                .iter()
                .flat_map(|&r| cand_sigs[r * k..][..k].iter().copied())
                .collect();
            let t = Instant::now();
            let confident = nearest(&sub, &sigs, k)
                .iter()
                .filter(|n| n.is_some_and(|(_, d1, d2)| accept(d1, d2, k)))
                .count();
            eprintln!(
                "  truths removed ({} candidates): {confident} of 2048 confidently (wrongly) \
                 matched, matching {:.3} s",
                keep.len(),
                t.elapsed().as_secs_f64()
            );
        }
    }
}
