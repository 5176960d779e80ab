//! A1 against rotations: anchor matching by rotation invariants, orthogonal Procrustes, then
//! nearest-neighbour matching of every row.
//!
//! [`weight_matching`](crate::weight_matching) sorts each embedding row, which only works while
//! the hidden space is merely permuted (and sign-flipped). A hypothetical *rotation mode* would
//! publish `E' = P·E·Q` with a secret row (vocabulary) permutation `P` and a secret orthogonal
//! `Q`; sorting is then useless. **No equicrypt mode uses rotations today**: this module exists
//! to measure how much such a mode would buy, i.e. whether a curious server holding the public
//! base weights `E` could still undo it. It can, as follows.
//!
//! 1. **Rotation invariants.** `Q` keeps every row norm `‖e_i‖` and every inner product
//!    `⟨e_i, e_j⟩` (the Gram matrix `E·Eᵀ` is only permuted, by `P`). The `seed_rows` public
//!    rows of largest norm are the seeds; each gets the ciphertext rows of (nearly) the same norm
//!    as candidates. A candidate `c` for seed `r` is voted for by every other seed `s` that has a
//!    candidate `c'` with `⟨e'_c, e'_c'⟩ ≈ ⟨e_r, e_s⟩`; the best-voted unique candidate wins, and
//!    the winners are pruned until their mutual Gram matrices agree entry by entry. Then the
//!    anchors are **extended** down the public rows by decreasing norm: a public row `i` is paired
//!    with a ciphertext row `c` when `c` is the *only* unused candidate of the right norm whose
//!    inner products with the seed ciphertext rows equal those of `i` with the seed public rows.
//!    Ties (duplicated rows) are never guessed. Tolerances are relative
//!    ([`ProcrustesOptions::tolerance`] × the norms involved).
//! 2. **Orthogonal Procrustes.** With anchor pairs stacked as `A` (public) and `B` (ciphertext),
//!    `Q̂ = argmin_{QᵀQ=I} ‖A·Q − B‖_F = U·Vᵀ` where `U·Σ·Vᵀ` is the SVD of `Aᵀ·B` (f64,
//!    nalgebra). The anchors must span the hidden space, hence by default `2·cols` of them;
//!    [`ProcrustesMatch::conditioning`] (`σ_min/σ_max` of `Aᵀ·B`) says whether they did.
//! 3. **Undo and match.** `E'·Q̂ᵀ` (one f32 GEMM) should equal `P·E` up to noise. Each rotated
//!    row is matched to its exact nearest public row (Euclidean) with a **norm-sorted pruned
//!    search**: `‖x − e‖ ≥ |‖x‖ − ‖e‖|`, so scanning the public rows outward from `‖x‖` in norm
//!    order can stop as soon as the norm gap exceeds what could still change the answer. When
//!    `Q̂` is accurate the nearest distance is tiny and only a handful of rows are ever compared,
//!    instead of `n` per row for brute force ([`ProcrustesMatch::distance_evals`] reports the
//!    cost). A match is accepted only if the nearest row is closer than
//!    [`ProcrustesOptions::max_distance`]·‖x‖, the runner-up is farther than
//!    nearest / [`ProcrustesOptions::ratio`] (so exact duplicates are rejected, not guessed), and
//!    no other ciphertext row claims the same public row.
//!
//! The attack never reads the key; [`rotate_rows`] produces a simulated rotation-mode embedding
//! together with the truth for scoring with [`Truth::from_plain_of`](crate::score::Truth::from_plain_of).

use std::time::Instant;

use nalgebra::DMatrix;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use serde::Serialize;

use crate::AuditError;

/// Knobs of [`attack`].
#[derive(Clone, Debug)]
pub struct ProcrustesOptions {
    /// Public rows of largest norm matched among themselves by their Gram matrix (the seeds).
    pub seed_rows: usize,
    /// Anchor pairs to collect before solving Procrustes; `0` means `2·cols`.
    pub anchors: usize,
    /// Relative tolerance of the invariants: norms must agree within `tolerance·‖e‖`, inner
    /// products within `tolerance·‖e_i‖·‖e_j‖`. Must exceed the relative noise.
    pub tolerance: f64,
    /// At most this many ciphertext rows (nearest in norm) are candidates for one public row
    /// while collecting anchors.
    pub max_candidates: usize,
    /// Ratio test of the final matching, in `(0, 1]`: accepted only if nearest < `ratio`·runner-up.
    pub ratio: f64,
    /// Final matches farther than `max_distance`·‖row‖ are rejected; also bounds the search.
    pub max_distance: f64,
    /// Budget: match only these ciphertext rows in the final step (`None` = all rows).
    pub rows: Option<Vec<u32>>,
}

impl Default for ProcrustesOptions {
    fn default() -> Self {
        Self {
            seed_rows: 32,
            anchors: 0,
            tolerance: 1e-3,
            max_candidates: 32,
            ratio: 0.5,
            max_distance: 0.25,
            rows: None,
        }
    }
}

/// The attack's output.
#[derive(Clone, Debug, Serialize)]
pub struct ProcrustesMatch {
    /// `guess[c]` = the plaintext id believed at ciphertext row `c` (`None` when rejected or not
    /// attempted).
    pub guess: Vec<Option<u32>>,
    /// Anchor pairs used for Procrustes (seeds included).
    pub anchors: usize,
    /// Seed pairs that survived the Gram check.
    pub seeds: usize,
    /// Frobenius residual `‖E'Q̂ᵀ − P̂E‖/‖P̂E‖` over the accepted rows.
    pub residual: f64,
    /// `σ_min/σ_max` of `AᵀB` over the anchors: near 0 means they did not span the hidden space.
    pub conditioning: f64,
    /// Ciphertext rows the final step tried.
    pub attempted: usize,
    /// Attempted rows left as `None` (ambiguous, too far, or claimed twice).
    pub rejected: usize,
    /// Row-distance evaluations of the final matching (brute force: `attempted·rows`).
    pub distance_evals: u64,
    /// Attacker wall time in seconds.
    pub seconds: f64,
}

/// Ids of rows sorted by ascending norm (finite norms only), for window searches.
struct NormIndex {
    ids: Vec<u32>,
    norms: Vec<f64>,
}

impl NormIndex {
    fn new(norms: &[f64]) -> Self {
        let mut pairs: Vec<(f64, u32)> = norms
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (v, i as u32))
            .collect();
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        Self {
            ids: pairs.iter().map(|p| p.1).collect(),
            norms: pairs.iter().map(|p| p.0).collect(),
        }
    }

    /// Up to `cap` ids whose norm is within `tol` of `target`, nearest first.
    fn near(&self, target: f64, tol: f64, cap: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let mut hi = self.norms.partition_point(|&v| v < target);
        let mut lo = hi;
        while out.len() < cap {
            let down = lo
                .checked_sub(1)
                .map(|k| (k, target - self.norms[k]))
                .filter(|&(_, g)| g <= tol);
            let up = self
                .norms
                .get(hi)
                .map(|&v| (hi, v - target))
                .filter(|&(_, g)| g <= tol);
            match (down, up) {
                (Some((k, gd)), Some((_, gu))) if gd < gu => {
                    out.push(self.ids[k]);
                    lo = k;
                }
                (_, Some((k, _))) => {
                    out.push(self.ids[k]);
                    hi = k + 1;
                }
                (Some((k, _)), None) => {
                    out.push(self.ids[k]);
                    lo = k;
                }
                (None, None) => break,
            }
        }
        out
    }
}

fn row(m: &[f32], cols: usize, i: usize) -> &[f32] {
    &m[i * cols..(i + 1) * cols]
}

/// Inner product accumulated in f64.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..4 {
            acc[k] += f64::from(x[k]) * f64::from(y[k]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Squared Euclidean distance, f32 lanes (the hot loop of the final matching).
fn dist2(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            let d = x[k] - y[k];
            acc[k] += d * d;
        }
    }
    f64::from(acc.iter().sum::<f32>() + tail)
}

fn norms(m: &[f32], cols: usize) -> Vec<f64> {
    m.chunks_exact(cols).map(|r| dot(r, r).sqrt()).collect()
}

fn invalid(msg: impl Into<String>) -> AuditError {
    AuditError::Procrustes(msg.into())
}

/// Step 1a: seed pairs `(public, ciphertext)` from the top-norm rows and their Gram matrix.
fn seed_pairs(
    public: &[f32],
    encrypted: &[f32],
    cols: usize,
    p_norm: &[f64],
    e_index: &NormIndex,
    seeds: &[usize],
    opts: &ProcrustesOptions,
) -> Vec<(usize, usize)> {
    let tol = opts.tolerance;
    let cand: Vec<Vec<u32>> = seeds
        .iter()
        .map(|&r| e_index.near(p_norm[r], tol * p_norm[r], opts.max_candidates))
        .collect();
    let k = seeds.len();
    let min_votes = k.saturating_sub(1) / 3;
    let mut chosen: Vec<(usize, usize)> = Vec::new();
    for (ri, &r) in seeds.iter().enumerate() {
        let (a, na) = (row(public, cols, r), p_norm[r]);
        let mut scored: Vec<(usize, usize)> = cand[ri]
            .iter()
            .map(|&c| {
                let b = row(encrypted, cols, c as usize);
                let votes = seeds
                    .iter()
                    .enumerate()
                    .filter(|&(si, _)| si != ri)
                    .filter(|&(si, &s)| {
                        let g = dot(a, row(public, cols, s));
                        let t = tol * na * p_norm[s];
                        cand[si].iter().any(|&c2| {
                            c2 != c && (dot(b, row(encrypted, cols, c2 as usize)) - g).abs() <= t
                        })
                    })
                    .count();
                (votes, c as usize)
            })
            .collect();
        scored.sort_by_key(|x| std::cmp::Reverse(x.0));
        match scored.as_slice() {
            [(v, c)] if *v >= min_votes => chosen.push((r, *c)),
            [(v, c), (v2, _), ..] if *v >= min_votes && v > v2 => chosen.push((r, *c)),
            _ => {}
        }
    }
    // Prune until the chosen pairs agree on every Gram entry and use distinct ciphertext rows.
    let bad = |x: &(usize, usize), y: &(usize, usize)| {
        if x.1 == y.1 {
            return true;
        }
        let g = dot(row(public, cols, x.0), row(public, cols, y.0));
        let h = dot(row(encrypted, cols, x.1), row(encrypted, cols, y.1));
        // Written so that NaN counts as a violation.
        let agree = (g - h).abs() <= tol * p_norm[x.0] * p_norm[y.0];
        !agree
    };
    let m = chosen.len();
    let mut viol = vec![vec![false; m]; m];
    for i in 0..m {
        for j in i + 1..m {
            let v = bad(&chosen[i], &chosen[j]);
            viol[i][j] = v;
            viol[j][i] = v;
        }
    }
    let mut alive = vec![true; m];
    loop {
        let worst = (0..m)
            .filter(|&i| alive[i])
            .map(|i| ((0..m).filter(|&j| alive[j] && viol[i][j]).count(), i))
            .max();
        match worst {
            Some((count, i)) if count > 0 => alive[i] = false,
            _ => break,
        }
    }
    chosen
        .into_iter()
        .zip(alive)
        .filter_map(|(p, a)| a.then_some(p))
        .collect()
}

/// Step 1b: extends the seed pairs down the public rows by decreasing norm.
#[allow(clippy::too_many_arguments)]
fn extend_anchors(
    public: &[f32],
    encrypted: &[f32],
    cols: usize,
    p_norm: &[f64],
    e_index: &NormIndex,
    order: &[usize],
    seeds: &[(usize, usize)],
    target: usize,
    opts: &ProcrustesOptions,
) -> Vec<(usize, usize)> {
    let tol = opts.tolerance;
    let mut used = vec![false; encrypted.len() / cols];
    let mut is_seed = vec![false; public.len() / cols];
    for &(p, c) in seeds {
        used[c] = true;
        is_seed[p] = true;
    }
    let mut anchors = seeds.to_vec();
    for &i in order {
        if anchors.len() >= target {
            break;
        }
        if is_seed[i] {
            continue;
        }
        let (a, na) = (row(public, cols, i), p_norm[i]);
        let feats: Vec<(f64, f64)> = seeds
            .iter()
            .map(|&(s, _)| (dot(a, row(public, cols, s)), tol * na * p_norm[s]))
            .collect();
        let mut hit = None;
        let mut hits = 0;
        for c in e_index.near(na, tol * na, opts.max_candidates) {
            let c = c as usize;
            if used[c] {
                continue;
            }
            let b = row(encrypted, cols, c);
            let ok = seeds
                .iter()
                .zip(&feats)
                .all(|(&(_, sc), &(g, t))| (dot(b, row(encrypted, cols, sc)) - g).abs() <= t);
            if ok {
                hits += 1;
                hit = Some(c);
            }
        }
        if let (1, Some(c)) = (hits, hit) {
            used[c] = true;
            anchors.push((i, c));
        }
    }
    anchors
}

/// Step 2: `Q̂ = U·Vᵀ` from the SVD of `AᵀB`; also returns `σ_min/σ_max`.
fn procrustes(
    public: &[f32],
    encrypted: &[f32],
    cols: usize,
    anchors: &[(usize, usize)],
) -> Result<(DMatrix<f64>, f64), AuditError> {
    let m = anchors.len();
    // Column-major cols × m: column k is anchor k's row.
    let a = DMatrix::<f64>::from_iterator(
        cols,
        m,
        anchors
            .iter()
            .flat_map(|&(p, _)| row(public, cols, p).iter().map(|&v| f64::from(v))),
    );
    let b = DMatrix::<f64>::from_iterator(
        cols,
        m,
        anchors
            .iter()
            .flat_map(|&(_, c)| row(encrypted, cols, c).iter().map(|&v| f64::from(v))),
    );
    let svd = (a * b.transpose())
        .try_svd(true, true, f64::EPSILON, 1_000_000)
        .ok_or_else(|| invalid("the SVD of AᵀB did not converge"))?;
    let (Some(u), Some(v_t)) = (svd.u, svd.v_t) else {
        return Err(invalid("the SVD of AᵀB returned no singular vectors"));
    };
    let s = &svd.singular_values;
    let (hi, lo) = (s.max(), s.min());
    let cond = if hi > 0.0 { lo / hi } else { 0.0 };
    Ok((u * v_t, cond))
}

/// Outcome of the pruned nearest-neighbour search for one rotated row.
struct Nearest {
    best: Option<(usize, f64)>,
    second: f64,
    evals: u64,
}

fn nearest(
    x: &[f32],
    public: &[f32],
    cols: usize,
    p_index: &NormIndex,
    ratio: f64,
    max_d: f64,
) -> Nearest {
    let nx = dot(x, x).sqrt();
    let mut hi = p_index.norms.partition_point(|&v| v < nx);
    let mut lo = hi;
    let (mut d1, mut d2, mut best, mut evals) = (f64::INFINITY, f64::INFINITY, None, 0u64);
    loop {
        let down = lo.checked_sub(1).map(|k| (k, nx - p_index.norms[k]));
        let up = p_index.norms.get(hi).map(|&v| (hi, v - nx));
        let (k, gap) = match (down, up) {
            (Some(d), Some(u)) if d.1 < u.1 => d,
            (_, Some(u)) => u,
            (Some(d), None) => d,
            (None, None) => break,
        };
        // Rows farther in norm than this cannot become nearest nor a close runner-up.
        // (NaN gaps stop the search too.)
        let within = gap <= d2.min(d1 / ratio).min(max_d);
        if !within {
            break;
        }
        if k < lo {
            lo = k;
        } else {
            hi = k + 1;
        }
        let id = p_index.ids[k] as usize;
        let d = dist2(x, row(public, cols, id)).sqrt();
        evals += 1;
        if d < d1 {
            d2 = d1;
            d1 = d;
            best = Some((id, d));
        } else if d < d2 {
            d2 = d;
        }
    }
    Nearest {
        best,
        second: d2,
        evals,
    }
}

/// Runs the rotation attack: `public` and `encrypted` are `rows × cols` row-major f32 matrices
/// (as [`weight_matching::embedding_rows`](crate::weight_matching::embedding_rows) returns),
/// `encrypted ≈ P·public·Q` for an unknown row permutation `P` and orthogonal `Q`.
pub fn attack(
    public: &[f32],
    encrypted: &[f32],
    cols: usize,
    opts: &ProcrustesOptions,
) -> Result<ProcrustesMatch, AuditError> {
    if cols == 0 || public.len() != encrypted.len() || !public.len().is_multiple_of(cols) {
        return Err(AuditError::Mismatch(format!(
            "embedding sizes differ ({} vs {} values, {cols} columns)",
            public.len(),
            encrypted.len()
        )));
    }
    if !(opts.ratio > 0.0 && opts.ratio <= 1.0) {
        return Err(invalid(format!("ratio {} is not in (0, 1]", opts.ratio)));
    }
    if !(opts.tolerance >= 0.0 && opts.max_distance >= 0.0) {
        return Err(invalid("tolerance and max_distance must be non-negative"));
    }
    let n = public.len() / cols;
    if let Some(bad) = opts.rows.iter().flatten().find(|&&c| c as usize >= n) {
        return Err(invalid(format!("row {bad} is outside the {n} rows")));
    }
    let start = Instant::now();
    let p_norm = norms(public, cols);
    let e_norm = norms(encrypted, cols);
    let p_index = NormIndex::new(&p_norm);
    let e_index = NormIndex::new(&e_norm);
    // Public rows by decreasing norm, zero rows excluded.
    let order: Vec<usize> = p_index
        .ids
        .iter()
        .rev()
        .map(|&i| i as usize)
        .filter(|&i| p_norm[i] > 0.0)
        .collect();

    let seed_ids: Vec<usize> = order.iter().copied().take(opts.seed_rows).collect();
    let seeds = seed_pairs(public, encrypted, cols, &p_norm, &e_index, &seed_ids, opts);
    if seeds.is_empty() {
        return Err(invalid(
            "no seed pair survived the Gram check (no rotation of the public rows, or tolerance too small)",
        ));
    }
    let target = if opts.anchors == 0 {
        2 * cols
    } else {
        opts.anchors
    };
    let anchors = extend_anchors(
        public, encrypted, cols, &p_norm, &e_index, &order, &seeds, target, opts,
    );
    let (q, conditioning) = procrustes(public, encrypted, cols, &anchors)?;

    // Step 3: rotate the attempted ciphertext rows back (columns of Q̂·Bᵀ) and match them.
    let attempted: Vec<usize> = match &opts.rows {
        Some(ids) => {
            let mut v: Vec<usize> = ids.iter().map(|&c| c as usize).collect();
            v.sort_unstable();
            v.dedup();
            v
        }
        None => (0..n).collect(),
    };
    let bt = match &opts.rows {
        None => DMatrix::<f32>::from_column_slice(cols, n, encrypted),
        Some(_) => DMatrix::<f32>::from_iterator(
            cols,
            attempted.len(),
            attempted
                .iter()
                .flat_map(|&c| row(encrypted, cols, c).iter().copied()),
        ),
    };
    let rotated = q.cast::<f32>() * bt;
    let rotated = rotated.as_slice();

    let mut guess: Vec<Option<u32>> = vec![None; n];
    let mut dist: Vec<f64> = vec![0.0; n];
    let mut claims = vec![0u32; n];
    let mut evals = 0u64;
    for (k, &c) in attempted.iter().enumerate() {
        let x = row(rotated, cols, k);
        let max_d = opts.max_distance * e_norm[c];
        let found = nearest(x, public, cols, &p_index, opts.ratio, max_d);
        evals += found.evals;
        if let Some((id, d1)) = found.best {
            if d1 <= max_d && d1 < opts.ratio * found.second {
                guess[c] = Some(id as u32);
                dist[c] = d1;
                claims[id] += 1;
            }
        }
    }
    // A public row claimed by two ciphertext rows is a contradiction: reject both.
    for g in guess.iter_mut() {
        if matches!(g, Some(id) if claims[*id as usize] > 1) {
            *g = None;
        }
    }
    let (mut num, mut den) = (0.0, 0.0);
    for (c, g) in guess.iter().enumerate() {
        if let Some(id) = g {
            num += dist[c] * dist[c];
            den += p_norm[*id as usize] * p_norm[*id as usize];
        }
    }
    let accepted = guess.iter().filter(|g| g.is_some()).count();
    Ok(ProcrustesMatch {
        anchors: anchors.len(),
        seeds: seeds.len(),
        residual: if den > 0.0 { (num / den).sqrt() } else { 0.0 },
        conditioning,
        attempted: attempted.len(),
        rejected: attempted.len() - accepted,
        distance_evals: evals,
        seconds: start.elapsed().as_secs_f64(),
        guess,
    })
}

/// Standard normal pairs by Box–Muller from a ChaCha20 stream.
fn gaussian_pair(rng: &mut ChaCha20Rng) -> (f64, f64) {
    let scale = 1.0 / (1u64 << 53) as f64;
    let u1 = ((rng.next_u64() >> 11) + 1) as f64 * scale; // (0, 1]
    let u2 = (rng.next_u64() >> 11) as f64 * scale; // [0, 1)
    let r = (-2.0 * u1.ln()).sqrt();
    let t = std::f64::consts::TAU * u2;
    (r * t.cos(), r * t.sin())
}

/// Uniform draw in `0..bound` (multiply-shift; bias below `bound/2⁶⁴`).
fn below(rng: &mut ChaCha20Rng, bound: usize) -> usize {
    ((u128::from(rng.next_u64()) * bound as u128) >> 64) as usize
}

/// Simulates a **rotation mode** for measuring [`attack`]: returns `P·rows·Q` for a random
/// orthogonal `Q` (QR of a Gaussian `cols × cols` matrix drawn from a ChaCha20 stream seeded by
/// `seed`, with `R`'s diagonal made positive so `Q` is Haar-distributed) and a random row
/// permutation `P`, plus the truth `plain_of[c]` = the input row placed at output row `c`
/// (what [`Truth::from_plain_of`](crate::score::Truth::from_plain_of) takes).
///
/// No equicrypt mode uses rotations today; this exists only to measure the attack. A trailing
/// partial row is dropped; `cols == 0` gives empty output.
pub fn rotate_rows(rows: &[f32], cols: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    if cols == 0 {
        return (Vec::new(), Vec::new());
    }
    let n = rows.len() / cols;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut gauss = Vec::with_capacity(cols * cols + 1);
    while gauss.len() < cols * cols {
        let (a, b) = gaussian_pair(&mut rng);
        gauss.push(a);
        gauss.push(b);
    }
    gauss.truncate(cols * cols);
    let qr = DMatrix::from_vec(cols, cols, gauss).qr();
    let r = qr.r();
    let mut q = qr.q();
    for j in 0..cols {
        if r[(j, j)] < 0.0 {
            q.column_mut(j).neg_mut();
        }
    }
    let mut plain_of: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = below(&mut rng, i + 1);
        plain_of.swap(i, j);
    }
    // Row-major rows·Q is column-major Qᵀ·rowsᵀ.
    let x = DMatrix::<f32>::from_column_slice(cols, n, &rows[..n * cols]);
    let y = q.transpose().cast::<f32>() * x;
    let y = y.as_slice();
    let mut out = Vec::with_capacity(n * cols);
    for &p in &plain_of {
        out.extend_from_slice(row(y, cols, p as usize));
    }
    (out, plain_of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::{score, Truth};

    fn gaussian_rows(n: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        (0..n * cols)
            .map(|_| gaussian_pair(&mut rng).0 as f32)
            .collect()
    }

    fn recovered(guess: &[Option<u32>], plain_of: &[u32]) -> f64 {
        let truth = Truth::from_plain_of(plain_of).unwrap();
        score(guess, &truth, &[], &[], &[]).unwrap().vocab_recovered
    }

    #[test]
    fn rotation_is_orthogonal_and_permutes_rows() {
        let rows = gaussian_rows(50, 7, 1);
        let (enc, plain_of) = rotate_rows(&rows, 7, 2);
        let mut sorted = plain_of.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<u32>>());
        for c in 0..50 {
            for c2 in [0, 17, 49] {
                let g = dot(
                    row(&rows, 7, plain_of[c] as usize),
                    row(&rows, 7, plain_of[c2] as usize),
                );
                let h = dot(row(&enc, 7, c), row(&enc, 7, c2));
                assert!((g - h).abs() < 1e-4, "{g} vs {h}");
            }
        }
        assert_eq!(rotate_rows(&rows, 7, 2).0, enc);
    }

    #[test]
    fn recovers_a_noisy_rotation() {
        let rows = gaussian_rows(300, 24, 3);
        let (mut enc, plain_of) = rotate_rows(&rows, 24, 4);
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        for v in enc.iter_mut() {
            *v += 1e-6 * gaussian_pair(&mut rng).0 as f32;
        }
        let m = attack(&rows, &enc, 24, &ProcrustesOptions::default()).unwrap();
        let frac = recovered(&m.guess, &plain_of);
        assert!(frac >= 0.99, "{frac} {m:?}");
        assert!(m.residual < 1e-4, "{}", m.residual);
        assert!(m.anchors >= 24 && m.conditioning > 1e-3);
    }

    #[test]
    fn recovers_a_signed_coordinate_permutation_exactly() {
        let (n, d) = (300, 24);
        let rows = gaussian_rows(n, d, 6);
        let (_, plain_of) = rotate_rows(&rows, d, 7);
        // Q = signed permutation: column j of the output is ±column (j·5 mod 24) of the input.
        let mut enc = Vec::with_capacity(n * d);
        for &p in &plain_of {
            let r = row(&rows, d, p as usize);
            enc.extend((0..d).map(|j| {
                if j % 3 == 0 {
                    -r[j * 5 % d]
                } else {
                    r[j * 5 % d]
                }
            }));
        }
        let m = attack(&rows, &enc, d, &ProcrustesOptions::default()).unwrap();
        assert_eq!(recovered(&m.guess, &plain_of), 1.0, "{m:?}");
        assert_eq!(m.rejected, 0);
    }

    #[test]
    fn duplicated_rows_are_not_guessed() {
        let (n, d) = (300, 24);
        let mut rows = gaussian_rows(n, d, 8);
        // Row 5 = row 6 and rows 10 = 11 = 12; also duplicate the largest-norm row.
        let top = norms(&rows, d)
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap();
        let dup = [(5, 6), (10, 11), (10, 12), (top, (top + 1) % n)];
        for (src, dst) in dup {
            let r = row(&rows, d, src).to_vec();
            rows[dst * d..(dst + 1) * d].copy_from_slice(&r);
        }
        let (enc, plain_of) = rotate_rows(&rows, d, 9);
        let m = attack(&rows, &enc, d, &ProcrustesOptions::default()).unwrap();
        let dups = [5, 6, 10, 11, 12, top, (top + 1) % n];
        for (c, &p) in plain_of.iter().enumerate() {
            if dups.contains(&(p as usize)) {
                assert_eq!(m.guess[c], None, "duplicate {p} guessed");
            } else {
                assert_eq!(m.guess[c], Some(p));
            }
        }
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let same = vec![1.0f32; 40];
        match attack(&same, &same, 4, &ProcrustesOptions::default()) {
            Ok(m) => assert!(m.guess.iter().all(Option::is_none)),
            Err(AuditError::Procrustes(_)) => {}
            Err(e) => panic!("{e}"),
        }
        let zeros = vec![0.0f32; 40];
        assert!(attack(&zeros, &zeros, 4, &ProcrustesOptions::default()).is_err());
        let nan = vec![f32::NAN; 40];
        assert!(attack(&nan, &nan, 4, &ProcrustesOptions::default()).is_err());
        let one = [1.0f32, 2.0, 3.0];
        let m = attack(&one, &one, 3, &ProcrustesOptions::default()).unwrap();
        assert_eq!(m.guess, vec![Some(0)]);
        assert!(attack(&[], &[], 3, &ProcrustesOptions::default()).is_err());
        assert_eq!(rotate_rows(&one, 0, 1), (vec![], vec![]));
        assert_eq!(rotate_rows(&one, 2, 1).0.len(), 2);
    }

    #[test]
    fn size_mismatch_and_bad_options_are_errors() {
        let o = ProcrustesOptions::default();
        assert!(matches!(
            attack(&[1.0, 2.0], &[1.0], 1, &o),
            Err(AuditError::Mismatch(_))
        ));
        assert!(attack(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0], 2, &o).is_err());
        assert!(attack(&[1.0, 2.0], &[1.0, 2.0], 0, &o).is_err());
        let bad_ratio = ProcrustesOptions {
            ratio: 0.0,
            ..o.clone()
        };
        assert!(attack(&[1.0, 2.0], &[1.0, 2.0], 2, &bad_ratio).is_err());
        let bad_rows = ProcrustesOptions {
            rows: Some(vec![1]),
            ..o
        };
        assert!(attack(&[1.0, 2.0], &[1.0, 2.0], 2, &bad_rows).is_err());
    }

    #[test]
    fn budget_matches_only_the_given_rows() {
        let rows = gaussian_rows(300, 24, 10);
        let (enc, plain_of) = rotate_rows(&rows, 24, 11);
        let opts = ProcrustesOptions {
            rows: Some(vec![3, 7, 250]),
            ..ProcrustesOptions::default()
        };
        let m = attack(&rows, &enc, 24, &opts).unwrap();
        assert_eq!(m.attempted, 3);
        for (c, g) in m.guess.iter().enumerate() {
            let want = [3, 7, 250].contains(&c).then_some(plain_of[c]);
            assert_eq!(*g, want);
        }
    }

    /// Measurement on the real SmolLM2 embedding; run with
    /// `RAYON_NUM_THREADS=1 cargo test --release -p equicrypt-audit -- --ignored smollm2 --nocapture`.
    #[test]
    #[ignore = "needs models/smollm2 (about 5 s)"]
    fn smollm2_rotation() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        let (n, d, rows) = crate::weight_matching::embedding_rows(&path).unwrap();
        let t = Instant::now();
        let (enc, plain_of) = rotate_rows(&rows, d, 42);
        eprintln!("rotate_rows {n}×{d}: {:.2}s", t.elapsed().as_secs_f64());
        let m = attack(&rows, &enc, d, &ProcrustesOptions::default()).unwrap();
        let frac = recovered(&m.guess, &plain_of);
        let wrong = m
            .guess
            .iter()
            .zip(&plain_of)
            .filter(|(g, t)| matches!(g, Some(x) if x != *t))
            .count();
        let mut seen = std::collections::HashMap::new();
        for r in rows.chunks_exact(d) {
            let key: Vec<u32> = r.iter().map(|v| v.to_bits()).collect();
            *seen.entry(key).or_insert(0usize) += 1;
        }
        let dup_rows: usize = seen.values().filter(|&&k| k > 1).sum();
        eprintln!("public rows with an identical twin: {dup_rows}");
        eprintln!(
            "recovered {frac:.4} wrong {wrong} rejected {} anchors {} seeds {} residual {:.2e} \
             cond {:.2e} evals {} ({:.1}/row) {:.2}s",
            m.rejected,
            m.anchors,
            m.seeds,
            m.residual,
            m.conditioning,
            m.distance_evals,
            m.distance_evals as f64 / m.attempted.max(1) as f64,
            m.seconds
        );
        assert!(frac > 0.9);
    }
}
