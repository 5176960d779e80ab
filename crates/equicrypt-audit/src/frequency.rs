//! A3, ciphertext only: frequency analysis and n-gram hill-climbing on the token stream.
//!
//! To the network and to the server, an EE conversation is a stream of token ids under one fixed
//! secret substitution: a substitution cipher whose alphabet is the whole vocabulary (49152 ids
//! for SmolLM2). This module runs the classical attack on it, the frequency / hill-climbing
//! baseline published alongside Equivariant Encryption:
//!
//! 1. **Frequency ranking.** Sort ciphertext ids by how often they occur in the intercepted
//!    traffic, sort plaintext ids by how often they occur in public text tokenized with the
//!    (public) tokenizer, and pair them rank for rank.
//! 2. **Hill-climbing.** Score a guess by the log-likelihood of the deciphered traffic under a
//!    bigram model of public text: `Σ n(a,b) · ln P(m(b) | m(a))` over ciphertext bigrams `(a,b)`
//!    seen `n` times. The model is interpolated absolute discounting (the discount estimated from
//!    the public counts as `n1 / (n1 + 2 n2)`) backing off to an add-α unigram, so unseen
//!    bigrams and unseen tokens keep a finite cost. A move picks a ciphertext id `a` (half the
//!    time in proportion to its count, half the time uniformly among the ids seen), draws a
//!    plaintext `p` whose public rank is near the public rank of `a`'s current guess (within a
//!    random factor of it), and either swaps `a` with the ciphertext id holding `p` or, when no
//!    one holds `p`, moves `a` onto it. The move is kept when the score strictly improves
//!    (greedy). The mapping stays injective throughout; known pairs (anchors) are never moved.
//!
//! A move changes only the bigrams touching the one or two ciphertext ids involved, so its score
//! change is computed from adjacency lists of the ciphertext bigram graph, with the current
//! log-probability of each ciphertext bigram cached; public bigram log-probabilities sit in one
//! open-addressing table keyed `x << 32 | y`. That makes a proposal cost proportional to the
//! number of distinct neighbours of the ids involved, so millions of proposals fit in a minute.
//!
//! The attacks never read the key; [`recovery`] scores a guess against it for the caller.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::Serialize;

use crate::AuditError;

/// Marks "no id" in the dense id arrays.
const NONE: u32 = u32::MAX;
/// Additive smoothing of the unigram backoff distribution.
const UNIGRAM_ALPHA: f64 = 0.1;
/// Half the proposals look for a plaintext within a factor `e^±0.15` of the current public rank,
/// half within `e^±1` (wider windows and annealing measured worse on Brown / SmolLM2).
const NARROW_WINDOW: f64 = 0.15;
/// See [`NARROW_WINDOW`].
const WIDE_WINDOW: f64 = 1.0;
/// Smallest score gain that counts as an improvement (guards against rounding noise).
const MIN_GAIN: f64 = 1e-9;

/// A small multiplicative hasher for `u64` keys (std's SipHash is several times slower here).
#[derive(Default, Clone, Copy)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        let h = (self.0.rotate_left(5) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 32);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FastMap = HashMap<u64, u32, BuildHasherDefault<MixHasher>>;

fn pair(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

fn check_ids(seqs: &[Vec<u32>], vocab: usize, what: &str) -> Result<(), AuditError> {
    for s in seqs {
        if let Some(&id) = s.iter().find(|&&id| id as usize >= vocab) {
            return Err(AuditError::IdOutOfRange {
                what: what.to_string(),
                id,
                vocab,
            });
        }
    }
    Ok(())
}

/// Unigram and bigram counts of token id sequences over a vocabulary.
///
/// Bigrams are counted inside each sequence only (no bigram spans two sequences).
#[derive(Clone, Debug)]
pub struct NgramStats {
    vocab: usize,
    unigrams: Vec<u64>,
    bigrams: FastMap,
    tokens: u64,
}

impl NgramStats {
    /// Counts `seqs`; every id must be below `vocab`.
    pub fn from_sequences(seqs: &[Vec<u32>], vocab: usize) -> Result<Self, AuditError> {
        if vocab == 0 || vocab >= NONE as usize {
            return Err(AuditError::InvalidInput(format!(
                "vocabulary size {vocab} is not in 1..{NONE}"
            )));
        }
        check_ids(seqs, vocab, "public text")?;
        let mut unigrams = vec![0u64; vocab];
        let mut bigrams = FastMap::default();
        let mut tokens = 0u64;
        for s in seqs {
            for &id in s {
                unigrams[id as usize] += 1;
            }
            tokens += s.len() as u64;
            for w in s.windows(2) {
                let c = bigrams.entry(pair(w[0], w[1])).or_insert(0);
                *c = c.saturating_add(1);
            }
        }
        Ok(Self {
            vocab,
            unigrams,
            bigrams,
            tokens,
        })
    }

    /// The vocabulary size the ids live in.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Total number of tokens counted.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// How often `id` occurs (0 for ids outside the vocabulary).
    pub fn unigram(&self, id: u32) -> u64 {
        self.unigrams.get(id as usize).copied().unwrap_or(0)
    }

    /// How often `b` directly follows `a`.
    pub fn bigram(&self, a: u32, b: u32) -> u64 {
        self.bigrams.get(&pair(a, b)).copied().map_or(0, u64::from)
    }

    /// Number of distinct bigrams seen.
    pub fn distinct_bigrams(&self) -> usize {
        self.bigrams.len()
    }

    /// All ids of the vocabulary ordered by descending count (ties by id).
    pub fn rank_order(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..self.vocab as u32).collect();
        ids.sort_by_key(|&id| (std::cmp::Reverse(self.unigrams[id as usize]), id));
        ids
    }
}

/// Open-addressing table `x << 32 | y` → `ln P(y | x)` for the public bigrams seen.
struct LogProbTable {
    slots: Vec<(u64, f64)>,
    shift: u32,
}

impl LogProbTable {
    const EMPTY: u64 = u64::MAX;

    fn new(entries: usize) -> Self {
        let cap = (entries * 2).next_power_of_two().max(16);
        Self {
            slots: vec![(Self::EMPTY, 0.0); cap],
            shift: 64 - cap.trailing_zeros(),
        }
    }

    fn index(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    fn insert(&mut self, key: u64, v: f64) {
        let mask = self.slots.len() - 1;
        let mut i = self.index(key);
        while self.slots[i].0 != Self::EMPTY && self.slots[i].0 != key {
            i = (i + 1) & mask;
        }
        self.slots[i] = (key, v);
    }

    fn get(&self, key: u64) -> Option<f64> {
        let mask = self.slots.len() - 1;
        let mut i = self.index(key);
        loop {
            let (k, v) = self.slots[i];
            if k == key {
                return Some(v);
            }
            if k == Self::EMPTY {
                return None;
            }
            i = (i + 1) & mask;
        }
    }
}

/// The smoothed bigram model of public text.
struct BigramModel {
    /// `ln P_uni(y)`, add-α smoothed.
    log_uni: Vec<f64>,
    /// `ln λ(x)`: the backoff weight of context `x` (0 when `x` was never a context).
    log_backoff: Vec<f64>,
    seen: LogProbTable,
}

impl BigramModel {
    fn new(stats: &NgramStats) -> Self {
        let v = stats.vocab;
        let denom = stats.tokens as f64 + UNIGRAM_ALPHA * v as f64;
        let log_uni: Vec<f64> = stats
            .unigrams
            .iter()
            .map(|&c| ((c as f64 + UNIGRAM_ALPHA) / denom).ln())
            .collect();
        let mut context = vec![0u64; v];
        let mut distinct = vec![0u64; v];
        let (mut n1, mut n2) = (0u64, 0u64);
        for (&k, &c) in &stats.bigrams {
            let x = (k >> 32) as usize;
            context[x] += u64::from(c);
            distinct[x] += 1;
            match c {
                1 => n1 += 1,
                2 => n2 += 1,
                _ => {}
            }
        }
        let d = if n1 + n2 > 0 {
            (n1 as f64 / (n1 as f64 + 2.0 * n2 as f64)).clamp(0.1, 0.95)
        } else {
            0.75
        };
        let log_backoff: Vec<f64> = (0..v)
            .map(|x| {
                if context[x] == 0 {
                    0.0
                } else {
                    (d * distinct[x] as f64 / context[x] as f64).ln()
                }
            })
            .collect();
        let mut seen = LogProbTable::new(stats.bigrams.len());
        for (&k, &c) in &stats.bigrams {
            let (x, y) = ((k >> 32) as usize, (k & 0xFFFF_FFFF) as usize);
            let p = (f64::from(c) - d) / context[x] as f64 + (log_backoff[x] + log_uni[y]).exp();
            seen.insert(k, p.ln());
        }
        Self {
            log_uni,
            log_backoff,
            seen,
        }
    }

    #[inline]
    fn logp(&self, x: u32, y: u32) -> f64 {
        match self.seen.get(pair(x, y)) {
            Some(v) => v,
            None => self.log_backoff[x as usize] + self.log_uni[y as usize],
        }
    }
}

/// Options of [`attack`].
#[derive(Clone, Debug, Default)]
pub struct FrequencyOptions {
    /// Wall-clock budget for hill-climbing, seconds (0 = frequency ranking only).
    pub seconds: f64,
    /// Stop hill-climbing after this many proposals even if time is left (`None`: time only).
    /// Setting it (with a generous `seconds`) makes a run reproducible on any machine.
    pub max_proposals: Option<u64>,
    /// Seed of the move generator.
    pub seed: u64,
    /// Pairs (ciphertext id, plaintext id) the attacker already knows (e.g. special ids read
    /// from the file); kept fixed.
    pub anchors: Vec<(u32, u32)>,
}

/// What [`attack`] found.
#[derive(Clone, Debug, Serialize)]
pub struct FrequencyResult {
    /// `guess[c]` for every ciphertext id (len = vocab); `None` for ids never seen in the
    /// ciphertext (anchors included: an anchor not in the traffic is reported as `None`).
    pub guess: Vec<Option<u32>>,
    /// The frequency-ranking guess before hill-climbing (same shape).
    pub initial: Vec<Option<u32>>,
    /// Moves proposed.
    pub swaps_tried: u64,
    /// Moves kept.
    pub swaps_accepted: u64,
    /// Bigram log-likelihood (nats) of the ciphertext deciphered by `initial`.
    pub initial_score: f64,
    /// Bigram log-likelihood (nats) of the ciphertext deciphered by `guess`.
    pub final_score: f64,
    /// Number of bigrams in the ciphertext (divide scores by it for nats per bigram).
    pub bigrams: u64,
    /// Attacker wall time in seconds (model building, ranking and hill-climbing).
    pub seconds: f64,
}

/// Ciphertext bigram graph: edges sorted by (source, target) with CSR adjacency both ways.
struct Graph {
    src: Vec<u32>,
    dst: Vec<u32>,
    weight: Vec<f64>,
    out_start: Vec<u32>,
    in_start: Vec<u32>,
    in_edges: Vec<u32>,
}

impl Graph {
    fn new(ciphertext: &[Vec<u32>], vocab: usize) -> Self {
        let mut keys: Vec<u64> = ciphertext
            .iter()
            .flat_map(|s| s.windows(2).map(|w| pair(w[0], w[1])))
            .collect();
        keys.sort_unstable();
        let (mut src, mut dst, mut weight) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &k) in keys.iter().enumerate() {
            if i > 0 && keys[i - 1] == k {
                if let Some(w) = weight.last_mut() {
                    *w += 1.0;
                }
            } else {
                src.push((k >> 32) as u32);
                dst.push((k & 0xFFFF_FFFF) as u32);
                weight.push(1.0);
            }
        }
        let mut out_start = vec![0u32; vocab + 1];
        let mut in_start = vec![0u32; vocab + 1];
        for (&s, &d) in src.iter().zip(&dst) {
            out_start[s as usize + 1] += 1;
            in_start[d as usize + 1] += 1;
        }
        for i in 0..vocab {
            out_start[i + 1] += out_start[i];
            in_start[i + 1] += in_start[i];
        }
        let mut fill = in_start.clone();
        let mut in_edges = vec![0u32; dst.len()];
        for (e, &d) in dst.iter().enumerate() {
            in_edges[fill[d as usize] as usize] = e as u32;
            fill[d as usize] += 1;
        }
        Self {
            src,
            dst,
            weight,
            out_start,
            in_start,
            in_edges,
        }
    }

    fn out(&self, c: u32) -> std::ops::Range<usize> {
        self.out_start[c as usize] as usize..self.out_start[c as usize + 1] as usize
    }

    fn inc(&self, c: u32) -> &[u32] {
        &self.in_edges[self.in_start[c as usize] as usize..self.in_start[c as usize + 1] as usize]
    }
}

/// Uniform float in [0, 1).
fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Uniform integer in `0..n` (`n > 0`).
fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    ((u128::from(rng.next_u64()) * n as u128) >> 64) as usize
}

/// Runs A3: frequency ranking, then hill-climbing for `opts.seconds` (see the module doc).
///
/// `public` holds counts of plaintext ids in public text; `ciphertext` is the intercepted
/// traffic, one id sequence per message (bigrams do not span messages). Every ciphertext and
/// anchor id must be below `public.vocab()`. The bar's length is set to the budget in seconds
/// and advanced once per second.
pub fn attack(
    public: &NgramStats,
    ciphertext: &[Vec<u32>],
    opts: &FrequencyOptions,
    bar: &indicatif::ProgressBar,
) -> Result<FrequencyResult, AuditError> {
    let start = Instant::now();
    let vocab = public.vocab;
    if !opts.seconds.is_finite() || opts.seconds < 0.0 {
        return Err(AuditError::InvalidInput(format!(
            "time budget {} s is not a finite non-negative number",
            opts.seconds
        )));
    }
    check_ids(ciphertext, vocab, "ciphertext")?;
    let mut plain_of = vec![NONE; vocab];
    let mut cipher_of = vec![NONE; vocab];
    let mut fixed = vec![false; vocab];
    for &(c, p) in &opts.anchors {
        for (id, side) in [(c, "anchor ciphertext"), (p, "anchor plaintext")] {
            if id as usize >= vocab {
                return Err(AuditError::IdOutOfRange {
                    what: side.to_string(),
                    id,
                    vocab,
                });
            }
        }
        if plain_of[c as usize] != NONE || cipher_of[p as usize] != NONE {
            return Err(AuditError::InvalidInput(format!(
                "anchor ({c}, {p}) repeats a ciphertext or plaintext id of another anchor"
            )));
        }
        plain_of[c as usize] = p;
        cipher_of[p as usize] = c;
        fixed[c as usize] = true;
    }

    // 1. Frequency ranking over the ids not pinned by anchors.
    let mut count = vec![0u64; vocab];
    for s in ciphertext {
        for &c in s {
            count[c as usize] += 1;
        }
    }
    let mut seen: Vec<u32> = (0..vocab as u32)
        .filter(|&c| count[c as usize] > 0 && !fixed[c as usize])
        .collect();
    seen.sort_by_key(|&c| (std::cmp::Reverse(count[c as usize]), c));
    let order: Vec<u32> = public
        .rank_order()
        .into_iter()
        .filter(|&p| cipher_of[p as usize] == NONE)
        .collect();
    let mut rank_of = vec![0u32; vocab];
    for (r, &p) in order.iter().enumerate() {
        rank_of[p as usize] = r as u32;
    }
    for (&c, &p) in seen.iter().zip(&order) {
        plain_of[c as usize] = p;
        cipher_of[p as usize] = c;
    }
    let report = |plain_of: &[u32]| -> Vec<Option<u32>> {
        (0..vocab)
            .map(|c| (count[c] > 0).then_some(plain_of[c]))
            .collect()
    };
    let initial = report(&plain_of);

    // 2. Hill-climbing under the bigram model.
    let model = BigramModel::new(public);
    let graph = Graph::new(ciphertext, vocab);
    let mut cur: Vec<f64> = (0..graph.src.len())
        .map(|e| {
            model.logp(
                plain_of[graph.src[e] as usize],
                plain_of[graph.dst[e] as usize],
            )
        })
        .collect();
    let initial_score: f64 = cur.iter().zip(&graph.weight).map(|(l, w)| l * w).sum();
    let bigrams: u64 = graph.weight.iter().map(|&w| w as u64).sum();

    let tokens: Vec<u32> = ciphertext
        .iter()
        .flatten()
        .copied()
        .filter(|&c| !fixed[c as usize])
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let (mut tried, mut accepted) = (0u64, 0u64);
    let budget_secs = opts.seconds.ceil() as u64;
    bar.set_length(budget_secs.max(1));
    bar.set_position(0);
    let mut scratch: Vec<(u32, f64)> = Vec::new();
    let mut climb = opts.seconds > 0.0 && !seen.is_empty() && order.len() > 1;
    let climb_start = Instant::now();
    let mut shown = 0u64;
    let mut step = 0u64;
    while climb {
        if step.is_multiple_of(256) {
            let t = climb_start.elapsed().as_secs_f64();
            if t >= opts.seconds {
                climb = false;
                continue;
            }
            if t as u64 > shown {
                shown = t as u64;
                bar.set_position(shown.min(budget_secs));
            }
        }
        step += 1;
        if opts.max_proposals.is_some_and(|m| tried >= m) {
            climb = false;
            continue;
        }
        let a = if rng.next_u64() & 1 == 0 {
            tokens[below(&mut rng, tokens.len())]
        } else {
            seen[below(&mut rng, seen.len())]
        };
        let pa = plain_of[a as usize];
        // A plaintext of nearby public rank: within a random factor e^±w, plus a few places.
        let w = if rng.next_u64() & 1 == 0 {
            NARROW_WINDOW
        } else {
            WIDE_WINDOW
        };
        let r = f64::from(rank_of[pa as usize]) * (w * (2.0 * unit(&mut rng) - 1.0)).exp();
        let r = r as i64 + below(&mut rng, 7) as i64 - 3;
        let p = order[r.clamp(0, order.len() as i64 - 1) as usize];
        if p == pa {
            continue;
        }
        tried += 1;
        let b = cipher_of[p as usize];
        let new_of = |c: u32| -> u32 {
            if c == a {
                p
            } else if c == b {
                pa
            } else {
                plain_of[c as usize]
            }
        };
        scratch.clear();
        let mut delta = 0.0;
        let mut visit = |e: usize, scratch: &mut Vec<(u32, f64)>| {
            let l = model.logp(new_of(graph.src[e]), new_of(graph.dst[e]));
            delta += graph.weight[e] * (l - cur[e]);
            scratch.push((e as u32, l));
        };
        for e in graph.out(a) {
            visit(e, &mut scratch);
        }
        for &e in graph.inc(a) {
            if graph.src[e as usize] != a {
                visit(e as usize, &mut scratch);
            }
        }
        if b != NONE {
            for e in graph.out(b) {
                if graph.dst[e] != a {
                    visit(e, &mut scratch);
                }
            }
            for &e in graph.inc(b) {
                let s = graph.src[e as usize];
                if s != a && s != b {
                    visit(e as usize, &mut scratch);
                }
            }
        }
        if delta > MIN_GAIN {
            accepted += 1;
            for &(e, l) in &scratch {
                cur[e as usize] = l;
            }
            plain_of[a as usize] = p;
            cipher_of[p as usize] = a;
            if b != NONE {
                plain_of[b as usize] = pa;
                cipher_of[pa as usize] = b;
            } else {
                cipher_of[pa as usize] = NONE;
            }
        }
    }
    bar.set_position(budget_secs.max(1));

    let final_score: f64 = (0..graph.src.len())
        .map(|e| {
            graph.weight[e]
                * model.logp(
                    plain_of[graph.src[e] as usize],
                    plain_of[graph.dst[e] as usize],
                )
        })
        .sum();
    Ok(FrequencyResult {
        guess: report(&plain_of),
        initial,
        swaps_tried: tried,
        swaps_accepted: accepted,
        initial_score,
        final_score,
        bigrams,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// How much of a substitution a guess recovers, measured against the key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Recovery {
    /// Distinct ciphertext ids in the traffic.
    pub ids_seen: usize,
    /// Of those, how many the guess maps to their true plaintext.
    pub ids_correct: usize,
    /// Tokens in the traffic.
    pub tokens: u64,
    /// Of those, how many the guess deciphers correctly.
    pub tokens_correct: u64,
}

impl Recovery {
    /// Fraction of the distinct ciphertext ids seen that are recovered.
    pub fn id_fraction(&self) -> f64 {
        self.ids_correct as f64 / self.ids_seen.max(1) as f64
    }

    /// Fraction of the traffic's tokens deciphered correctly (frequent ids weigh more).
    pub fn token_fraction(&self) -> f64 {
        self.tokens_correct as f64 / self.tokens.max(1) as f64
    }
}

/// Scores `guess` against the truth `plain_of[c]` (the plaintext id at ciphertext id `c`) on the
/// traffic `ciphertext`. Ids outside `guess` or `plain_of` count as wrong.
pub fn recovery(guess: &[Option<u32>], plain_of: &[u32], ciphertext: &[Vec<u32>]) -> Recovery {
    let ok = |c: u32| {
        let g = guess.get(c as usize).copied().flatten();
        g.is_some() && g == plain_of.get(c as usize).copied()
    };
    let mut seen = vec![false; guess.len().max(plain_of.len())];
    let mut r = Recovery::default();
    for &c in ciphertext.iter().flatten() {
        r.tokens += 1;
        let hit = ok(c);
        r.tokens_correct += u64::from(hit);
        if let Some(s) = seen.get_mut(c as usize) {
            if !*s {
                *s = true;
                r.ids_seen += 1;
                r.ids_correct += usize::from(hit);
            }
        } else {
            r.ids_seen += 1;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Zipf-like sparse Markov chain over `n` symbols: each symbol has a few favourite
    /// successors; with probability 0.25 the next symbol is drawn from the global Zipf law.
    struct Chain {
        succ: Vec<Vec<(u32, f64)>>,
        zipf: Vec<f64>,
    }

    fn draw(rng: &mut ChaCha8Rng, cdf: &[f64]) -> usize {
        let u = unit(rng) * cdf.last().copied().unwrap_or(1.0);
        cdf.partition_point(|&c| c <= u).min(cdf.len() - 1)
    }

    fn cdf(w: impl Iterator<Item = f64>) -> Vec<f64> {
        let mut acc = 0.0;
        w.map(|x| {
            acc += x;
            acc
        })
        .collect()
    }

    impl Chain {
        fn new(n: usize, seed: u64) -> Self {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let zipf = cdf((0..n).map(|i| 1.0 / (i as f64 + 1.0)));
            let succ = (0..n)
                .map(|_| {
                    let k = 2 + below(&mut rng, 7);
                    let ids: Vec<u32> = (0..k).map(|_| draw(&mut rng, &zipf) as u32).collect();
                    let w = cdf((0..k).map(|i| 0.6f64.powi(i as i32)));
                    ids.into_iter().zip(w).collect()
                })
                .collect();
            Self { succ, zipf }
        }

        fn text(&self, len: usize, seed: u64) -> Vec<Vec<u32>> {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut seqs = Vec::new();
            let mut s = Vec::new();
            let mut x = draw(&mut rng, &self.zipf) as u32;
            for _ in 0..len {
                s.push(x);
                if s.len() == 200 {
                    seqs.push(std::mem::take(&mut s));
                }
                x = if unit(&mut rng) < 0.25 {
                    draw(&mut rng, &self.zipf) as u32
                } else {
                    let succ = &self.succ[x as usize];
                    let cdf: Vec<f64> = succ.iter().map(|s| s.1).collect();
                    succ[draw(&mut rng, &cdf)].0
                };
            }
            seqs.push(s);
            seqs
        }
    }

    /// A random permutation: `key[p]` is the ciphertext id of plaintext `p`.
    fn permutation(n: usize, seed: u64) -> Vec<u32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut key: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            key.swap(i, below(&mut rng, i + 1));
        }
        key
    }

    fn inverse(key: &[u32]) -> Vec<u32> {
        let mut inv = vec![0u32; key.len()];
        for (p, &c) in key.iter().enumerate() {
            inv[c as usize] = p as u32;
        }
        inv
    }

    fn encrypt(seqs: &[Vec<u32>], key: &[u32]) -> Vec<Vec<u32>> {
        seqs.iter()
            .map(|s| s.iter().map(|&p| key[p as usize]).collect())
            .collect()
    }

    const VOCAB: usize = 400;
    const SYMBOLS: usize = 300;

    fn setup() -> (NgramStats, Vec<Vec<u32>>, Vec<u32>) {
        let chain = Chain::new(SYMBOLS, 1);
        let public = NgramStats::from_sequences(&chain.text(200_000, 2), VOCAB).unwrap();
        let key = permutation(VOCAB, 3);
        let cipher = encrypt(&chain.text(20_000, 4), &key);
        (public, cipher, inverse(&key))
    }

    fn opts(proposals: u64) -> FrequencyOptions {
        FrequencyOptions {
            seconds: 60.0,
            max_proposals: Some(proposals),
            seed: 7,
            anchors: Vec::new(),
        }
    }

    #[test]
    fn counts_and_ranks() {
        let s = NgramStats::from_sequences(&[vec![2, 1, 2], vec![2, 0]], 4).unwrap();
        assert_eq!(s.tokens(), 5);
        assert_eq!(
            (s.unigram(2), s.unigram(1), s.unigram(3), s.unigram(9)),
            (3, 1, 0, 0)
        );
        assert_eq!(
            (
                s.bigram(2, 1),
                s.bigram(1, 2),
                s.bigram(2, 0),
                s.bigram(0, 2)
            ),
            (1, 1, 1, 0)
        );
        assert_eq!(s.distinct_bigrams(), 3);
        assert_eq!(s.rank_order(), vec![2, 0, 1, 3]);
        let err = NgramStats::from_sequences(&[vec![1, 4]], 4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("public text") && err.contains('4'), "{err}");
    }

    #[test]
    fn model_is_a_distribution() {
        let (public, _, _) = setup();
        let model = BigramModel::new(&public);
        for x in [0u32, 5, 50, 299, 350] {
            let total: f64 = (0..VOCAB as u32).map(|y| model.logp(x, y).exp()).sum();
            assert!((total - 1.0).abs() < 1e-9, "context {x}: {total}");
        }
    }

    /// How many of the `k` most frequent ciphertext ids a guess gets right.
    fn top_correct(guess: &[Option<u32>], truth: &[u32], cipher: &[Vec<u32>], k: usize) -> usize {
        let mut count = vec![0u64; truth.len()];
        for &c in cipher.iter().flatten() {
            count[c as usize] += 1;
        }
        let mut ids: Vec<usize> = (0..truth.len()).collect();
        ids.sort_by_key(|&c| (std::cmp::Reverse(count[c]), c));
        ids[..k]
            .iter()
            .filter(|&&c| guess[c] == Some(truth[c]))
            .count()
    }

    fn assert_injective(guess: &[Option<u32>]) {
        let mut used = std::collections::HashSet::new();
        for g in guess.iter().flatten() {
            assert!(used.insert(*g), "plaintext {g} guessed twice");
        }
    }

    #[test]
    fn ranking_then_hill_climbing_recovers_the_substitution() {
        let (public, cipher, truth) = setup();
        let bar = indicatif::ProgressBar::hidden();
        let r0 = attack(&public, &cipher, &opts(0), &bar).unwrap();
        let rank = recovery(&r0.initial, &truth, &cipher);
        assert_eq!(r0.guess, r0.initial);
        assert_eq!(r0.initial_score, r0.final_score);
        let r = attack(&public, &cipher, &opts(300_000), &bar).unwrap();
        let climbed = recovery(&r.guess, &truth, &cipher);
        eprintln!(
            "ranking {:.3}/{:.3} top10 {}, climbed {:.3}/{:.3} top10 {}, {} of {} kept, {:.3} -> {:.3}",
            rank.id_fraction(),
            rank.token_fraction(),
            top_correct(&r0.initial, &truth, &cipher, 10),
            climbed.id_fraction(),
            climbed.token_fraction(),
            top_correct(&r.guess, &truth, &cipher, 10),
            r.swaps_accepted,
            r.swaps_tried,
            r.initial_score / r.bigrams as f64,
            r.final_score / r.bigrams as f64
        );
        // Same ranking whatever the budget; the guess covers exactly the ids seen.
        assert_eq!(r.initial, r0.initial);
        assert_eq!(r.swaps_tried, 300_000);
        assert_eq!(r.guess.len(), VOCAB);
        assert_eq!(r.guess.iter().flatten().count(), rank.ids_seen);
        assert_injective(&r.guess);
        // Ranking alone gets the head right (in this same-source toy), little of the tail.
        let top = top_correct(&r0.initial, &truth, &cipher, 10);
        assert!(top >= 8, "ranking got {top} of the top 10");
        assert!(
            rank.token_fraction() > 0.6 && rank.token_fraction() < 0.8,
            "{rank:?}"
        );
        assert!(rank.id_fraction() < 0.2, "{rank:?}");
        // Hill-climbing improves the score strictly and recovers clearly more.
        assert!(r.final_score > r.initial_score + 0.5 * r.bigrams as f64);
        assert!(r.swaps_accepted > 500);
        assert!(
            climbed.token_fraction() > rank.token_fraction() + 0.08,
            "{climbed:?}"
        );
        assert!(
            climbed.id_fraction() > 3.0 * rank.id_fraction(),
            "{climbed:?}"
        );
        assert!(top_correct(&r.guess, &truth, &cipher, 10) >= 9);
    }

    #[test]
    fn anchors_stay_fixed() {
        let (public, cipher, truth) = setup();
        let c_top = cipher[0][0];
        let c_other = cipher[0][1];
        // One true pair and one deliberately wrong pair: both must survive hill-climbing.
        let wrong = (truth[c_other as usize] + 1) % VOCAB as u32;
        let mut o = opts(100_000);
        o.anchors = vec![(c_top, truth[c_top as usize]), (c_other, wrong)];
        if c_top == c_other || truth[c_top as usize] == wrong {
            return;
        }
        let r = attack(&public, &cipher, &o, &indicatif::ProgressBar::hidden()).unwrap();
        for g in [&r.initial, &r.guess] {
            assert_eq!(g[c_top as usize], Some(truth[c_top as usize]));
            assert_eq!(g[c_other as usize], Some(wrong));
            assert_injective(g);
        }
        assert!(r.swaps_accepted > 0);
    }

    #[test]
    fn empty_ciphertext_and_bad_inputs() {
        let (public, _, _) = setup();
        let bar = indicatif::ProgressBar::hidden();
        for cipher in [vec![], vec![vec![]], vec![vec![5]]] {
            let r = attack(&public, &cipher, &opts(1000), &bar).unwrap();
            let expect = cipher.iter().flatten().count();
            assert_eq!(r.guess.len(), VOCAB);
            assert_eq!(r.guess.iter().flatten().count(), expect);
            assert_eq!(r.swaps_accepted, 0);
            assert_eq!(r.final_score, 0.0);
        }
        let err = attack(&public, &[vec![1, 2], vec![3, 400]], &opts(10), &bar)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ciphertext") && err.contains("id 400"),
            "{err}"
        );
        let mut o = opts(10);
        o.anchors = vec![(1, 7777)];
        let err = attack(&public, &[vec![1]], &o, &bar)
            .unwrap_err()
            .to_string();
        assert!(err.contains("7777"), "{err}");
        o.anchors = vec![(1, 2), (3, 2)];
        assert!(attack(&public, &[vec![1]], &o, &bar).is_err());
        o.anchors.clear();
        o.seconds = f64::NAN;
        assert!(attack(&public, &[vec![1]], &o, &bar).is_err());
    }

    #[test]
    fn time_budget_stops_the_climb_and_drives_the_bar() {
        let (public, cipher, _) = setup();
        let bar = indicatif::ProgressBar::hidden();
        let o = FrequencyOptions {
            seconds: 0.3,
            ..opts(0)
        };
        let o = FrequencyOptions {
            max_proposals: None,
            ..o
        };
        let r = attack(&public, &cipher, &o, &bar).unwrap();
        assert!(r.seconds < 5.0 && r.swaps_tried > 1000, "{r:?}");
        assert_eq!(bar.length(), Some(1));
        assert_eq!(bar.position(), 1);
    }
}
