//! Scoring an attack's guess against the truth.
//!
//! The truth is the key holder's vocabulary permutation; only the audit driver builds a
//! [`Truth`], the attacks never see one. A guess maps ciphertext ids to plaintext ids
//! (`guess[c] = Some(p)`); it is scored three ways:
//! - **vocabulary recovered**: correct ids ÷ vocabulary size (every id counts once);
//! - **tokens recovered**: over a held-out sequence of plaintext tokens, the fraction whose
//!   ciphertext id the guess decrypts correctly — frequent tokens weigh more, so this is how much
//!   of real text a server reads. It is given for the held-out prompts (chat turns, template
//!   tokens included) and for held-out plain text alone (what the user wrote);
//! - **by frequency rank**: vocabulary recovered inside buckets of public-frequency rank.

use equicrypt_core::Permutation;
use serde::Serialize;

use crate::AuditError;

/// The true substitution: plaintext id `p` sits at ciphertext id `perm.apply(p)`.
#[derive(Clone, Debug)]
pub struct Truth {
    perm: Permutation,
}

impl Truth {
    /// Builds the truth from `cipher_of` (plaintext → ciphertext); it must be a permutation.
    pub fn new(cipher_of: Vec<u32>) -> Result<Self, AuditError> {
        let perm = Permutation::from_forward(cipher_of)
            .map_err(|e| AuditError::Mismatch(format!("the truth: {e}")))?;
        Ok(Self { perm })
    }

    /// Builds the truth from `plain_of` (ciphertext → plaintext); it must be a permutation.
    pub fn from_plain_of(plain_of: &[u32]) -> Result<Self, AuditError> {
        Ok(Self {
            perm: Self::new(plain_of.to_vec())?.perm.inverse(),
        })
    }

    /// `plain_of[c]` for every ciphertext id `c`.
    pub fn plain_ids(&self) -> &[u32] {
        self.perm.inverse_map()
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.perm.len()
    }

    /// The ciphertext id of plaintext id `p`.
    pub fn cipher_of(&self, p: u32) -> u32 {
        self.perm.apply(p)
    }

    /// The plaintext id at ciphertext id `c`.
    pub fn plain_of(&self, c: u32) -> u32 {
        self.perm.invert(c)
    }

    /// Encrypts a plaintext id sequence (ids out of range are an error).
    pub fn encrypt(&self, plain: &[u32]) -> Result<Vec<u32>, AuditError> {
        plain
            .iter()
            .map(|&p| {
                self.perm.forward().get(p as usize).copied().ok_or_else(|| {
                    AuditError::Mismatch(format!(
                        "token id {p} is outside the vocabulary of {}",
                        self.vocab()
                    ))
                })
            })
            .collect()
    }
}

/// Recovery inside one bucket of public-frequency ranks `[lo, hi)` (0-based).
#[derive(Clone, Debug, Serialize)]
pub struct RankBucket {
    /// First rank of the bucket.
    pub lo: usize,
    /// One past the last rank.
    pub hi: usize,
    /// Fraction of the bucket's ids recovered.
    pub recovered: f64,
}

/// How well a guess matches the truth.
#[derive(Clone, Debug, Serialize)]
pub struct Score {
    /// Correct ids ÷ vocabulary size.
    pub vocab_recovered: f64,
    /// Ciphertext ids the attack named a plaintext for.
    pub guessed: usize,
    /// Of those, how many are right.
    pub correct: usize,
    /// `correct ÷ guessed` (1 when nothing was guessed).
    pub precision: f64,
    /// Fraction of the held-out tokens decrypted correctly.
    pub tokens_recovered: f64,
    /// Number of held-out tokens.
    pub held_out_tokens: usize,
    /// Fraction of the held-out plain-text tokens (no template) decrypted correctly.
    pub text_tokens_recovered: f64,
    /// Vocabulary recovered by bucket of public-frequency rank.
    pub by_rank: Vec<RankBucket>,
}

/// Bucket edges of [`Score::by_rank`]: roughly ×3 apart.
pub const RANK_EDGES: [usize; 10] = [
    10,
    30,
    100,
    300,
    1000,
    3000,
    10_000,
    30_000,
    100_000,
    1 << 30,
];

/// Scores `guess` (indexed by ciphertext id) against `truth`. `held_out` are plaintext ids of real
/// prompts, `held_out_text` of real text without any template; `rank_order` lists plaintext ids from most to least frequent in public text (ids missing
/// from it are ranked after it, in id order).
pub fn score(
    guess: &[Option<u32>],
    truth: &Truth,
    held_out: &[u32],
    held_out_text: &[u32],
    rank_order: &[u32],
) -> Result<Score, AuditError> {
    let n = truth.vocab();
    if guess.len() != n {
        return Err(AuditError::Mismatch(format!(
            "guess covers {} ids, vocabulary has {n}",
            guess.len()
        )));
    }
    let right = |c: usize| guess[c] == Some(truth.plain_of(c as u32));
    let guessed = guess.iter().filter(|g| g.is_some()).count();
    let correct = (0..n).filter(|&c| right(c)).count();
    let tokens_ok = |ids: &[u32]| -> Result<f64, AuditError> {
        let mut ok = 0usize;
        for &p in ids {
            let c = *truth.perm.forward().get(p as usize).ok_or_else(|| {
                AuditError::Mismatch(format!("held-out token {p} is outside the vocabulary"))
            })?;
            ok += usize::from(right(c as usize));
        }
        Ok(ok as f64 / ids.len().max(1) as f64)
    };
    // Full ranking: the public order, then every id it does not name.
    let mut seen = vec![false; n];
    let mut order: Vec<u32> = Vec::with_capacity(n);
    for &p in rank_order {
        if (p as usize) < n && !seen[p as usize] {
            seen[p as usize] = true;
            order.push(p);
        }
    }
    order.extend((0..n as u32).filter(|&p| !seen[p as usize]));
    let mut by_rank = Vec::new();
    let mut lo = 0;
    for &edge in RANK_EDGES.iter() {
        let hi = edge.min(n);
        if hi <= lo {
            break;
        }
        let ok = order[lo..hi]
            .iter()
            .filter(|&&p| right(truth.cipher_of(p) as usize))
            .count();
        by_rank.push(RankBucket {
            lo,
            hi,
            recovered: ok as f64 / (hi - lo) as f64,
        });
        lo = hi;
    }
    Ok(Score {
        vocab_recovered: correct as f64 / n.max(1) as f64,
        guessed,
        correct,
        precision: if guessed == 0 {
            1.0
        } else {
            correct as f64 / guessed as f64
        },
        tokens_recovered: tokens_ok(held_out)?,
        held_out_tokens: held_out.len(),
        text_tokens_recovered: tokens_ok(held_out_text)?,
        by_rank,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_vocab_tokens_and_ranks() {
        // plaintext p sits at ciphertext (p + 1) % 4.
        let truth = Truth::new(vec![1, 2, 3, 0]).unwrap();
        assert_eq!(truth.plain_of(0), 3);
        // Right about ciphertext 1 (plain 0) and 2 (plain 1); wrong about 3.
        let guess = vec![None, Some(0), Some(1), Some(3)];
        let s = score(&guess, &truth, &[0, 0, 0, 2], &[3], &[0, 2]).unwrap();
        assert_eq!((s.guessed, s.correct), (3, 2));
        assert_eq!(s.vocab_recovered, 0.5);
        assert!((s.precision - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.tokens_recovered, 0.75);
        assert_eq!(s.text_tokens_recovered, 0.0);
        // Ranking 0, 2, then 1, 3: only the first bucket (ranks 0..4) exists.
        assert_eq!(s.by_rank.len(), 1);
        assert_eq!(s.by_rank[0].recovered, 0.5);
    }

    #[test]
    fn rejects_a_non_permutation_and_bad_sizes() {
        assert!(Truth::new(vec![0, 0]).is_err());
        assert!(Truth::new(vec![0, 5]).is_err());
        assert!(Truth::from_plain_of(&[1, 1]).is_err());
        let t = Truth::from_plain_of(&[2, 0, 1]).unwrap();
        assert_eq!((t.cipher_of(2), t.plain_ids()), (0, &[2, 0, 1][..]));
        let truth = Truth::new(vec![0, 1]).unwrap();
        assert!(score(&[None], &truth, &[], &[], &[]).is_err());
        assert!(score(&[None, None], &truth, &[7], &[], &[]).is_err());
        assert!(score(&[None, None], &truth, &[], &[7], &[]).is_err());
        assert!(truth.encrypt(&[2]).is_err());
    }
}
