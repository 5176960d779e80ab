//! A4: the model as its own oracle.
//!
//! A server without the public base weights still holds the encrypted model, and that model
//! speaks the language in ciphertext: sampled continuations are ciphertext text with the
//! statistics of real text. The attacker samples a corpus from the encrypted model and runs A3
//! ([`crate::frequency`]) on it instead of (or besides) intercepted traffic. It needs no traffic
//! and no public weights, only public plaintext statistics (the public tokenizer over public text).
//!
//! The first batch of sequences starts at uniformly random ciphertext ids (the attacker knows no
//! better start); later batches start at ids drawn from what the model has produced so far, so
//! contexts look like text rather than rare junk ids. The first [`OracleOptions::burn_in`] tokens
//! of each sequence are dropped.

use std::time::Instant;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::dense::DenseLlama;
use crate::frequency::{self, FrequencyOptions, FrequencyResult, NgramStats};
use crate::AuditError;

/// Budget of the oracle attack.
#[derive(Clone, Debug)]
pub struct OracleOptions {
    /// Sequences decoded together in one batch.
    pub batch: usize,
    /// New tokens per sequence.
    pub tokens_per_sequence: usize,
    /// Stop sampling once this many corpus tokens exist (after burn-in)…
    pub max_tokens: usize,
    /// …or once this many seconds have been spent sampling (checked between batches).
    pub max_seconds: f64,
    /// Leading tokens dropped from every sequence.
    pub burn_in: usize,
    /// Sampling temperature.
    pub temperature: f32,
    /// Seed of the start ids and of sampling.
    pub seed: u64,
    /// Hill-climbing budget of the A3 run on the sampled corpus.
    pub hill_climb_seconds: f64,
    /// Optional cap on hill-climbing proposals (reproducible runs).
    pub max_proposals: Option<u64>,
}

impl Default for OracleOptions {
    fn default() -> Self {
        Self {
            batch: 64,
            tokens_per_sequence: 128,
            max_tokens: 50_000,
            max_seconds: 180.0,
            burn_in: 4,
            temperature: 1.0,
            seed: 4,
            hill_climb_seconds: 60.0,
            max_proposals: None,
        }
    }
}

/// A sampled ciphertext corpus.
#[derive(Clone, Debug)]
pub struct SampledCorpus {
    /// The sequences (burn-in removed).
    pub sequences: Vec<Vec<u32>>,
    /// Tokens in all sequences.
    pub tokens: usize,
    /// Wall time spent sampling.
    pub seconds: f64,
}

/// What A4 found.
#[derive(Clone, Debug)]
pub struct OracleResult {
    /// The corpus it sampled.
    pub corpus_tokens: usize,
    /// Seconds spent sampling.
    pub sample_seconds: f64,
    /// A3 on the sampled corpus.
    pub attack: FrequencyResult,
}

/// Samples a ciphertext corpus from `model` within the budget of `opts`; `bar` counts tokens.
pub fn sample_corpus(
    model: &DenseLlama,
    opts: &OracleOptions,
    bar: &indicatif::ProgressBar,
) -> Result<SampledCorpus, AuditError> {
    if opts.batch == 0 || opts.tokens_per_sequence <= opts.burn_in {
        return Err(AuditError::Mismatch(format!(
            "oracle budget: batch {} and {} tokens per sequence (burn-in {}) sample nothing",
            opts.batch, opts.tokens_per_sequence, opts.burn_in
        )));
    }
    let start = Instant::now();
    let mut rng = ChaCha20Rng::seed_from_u64(opts.seed);
    let vocab = model.vocab() as u64;
    bar.set_length(opts.max_tokens as u64);
    let mut sequences: Vec<Vec<u32>> = Vec::new();
    let mut tokens = 0usize;
    let mut round = 0u64;
    while tokens < opts.max_tokens && start.elapsed().as_secs_f64() < opts.max_seconds {
        // First round: uniform starts. Later rounds start from ids the model itself produced,
        // drawn uniformly from the corpus so far: text-like contexts, not rare junk ids.
        // Every kept sequence has `per_sequence` ids, so the corpus so far is indexed without
        // copying it: id `i` is `sequences[i / per_sequence][i % per_sequence]`.
        let per_sequence = opts.tokens_per_sequence - opts.burn_in;
        let batch = opts
            .batch
            .min((opts.max_tokens - tokens).div_ceil(per_sequence));
        let starts: Vec<u32> = (0..batch)
            .map(|_| {
                if tokens == 0 {
                    (rng.next_u64() % vocab) as u32
                } else {
                    let i = (rng.next_u64() % tokens as u64) as usize;
                    sequences[i / per_sequence][i % per_sequence]
                }
            })
            .collect();
        let before = tokens;
        let out = model.sample(
            &starts,
            opts.tokens_per_sequence,
            opts.temperature,
            opts.seed ^ (round.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            &mut |step| {
                bar.set_position((before + step * opts.batch).min(opts.max_tokens) as u64);
            },
        )?;
        for seq in out {
            let kept: Vec<u32> = seq.into_iter().skip(opts.burn_in + 1).collect();
            tokens += kept.len();
            sequences.push(kept);
        }
        bar.set_position(tokens.min(opts.max_tokens) as u64);
        round += 1;
    }
    Ok(SampledCorpus {
        sequences,
        tokens,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Runs A4: sample a corpus from `model`, then A3 against `public` statistics.
pub fn attack(
    model: &DenseLlama,
    public: &NgramStats,
    opts: &OracleOptions,
    sample_bar: &indicatif::ProgressBar,
    attack_bar: &indicatif::ProgressBar,
) -> Result<OracleResult, AuditError> {
    let corpus = sample_corpus(model, opts, sample_bar)?;
    let attack = frequency::attack(
        public,
        &corpus.sequences,
        &FrequencyOptions {
            seconds: opts.hill_climb_seconds,
            seed: opts.seed,
            anchors: Vec::new(),
            max_proposals: opts.max_proposals,
        },
        attack_bar,
    )?;
    Ok(OracleResult {
        corpus_tokens: corpus.tokens,
        sample_seconds: corpus.seconds,
        attack,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frequency::recovery;
    use equicrypt_core::{SecretKey, VocabPermutation};
    use equicrypt_model::encrypt::{encrypt_gguf, EncryptOptions};
    use equicrypt_model::synthetic::SyntheticLlama;
    use indicatif::ProgressBar;

    /// In the tiny world the plaintext model's own samples are the "public text"; the encrypted
    /// model's samples are the ciphertext corpus. A random tiny model is far from Zipfian (and
    /// near-deterministic at temperature 1), so it is sampled hot; the test checks that the oracle
    /// reproduces the plaintext language and that the pipeline climbs, not how strong A4 is (the
    /// SmolLM2 audit measures that).
    #[test]
    fn sampling_is_deterministic_and_a4_beats_frequency_ranking() {
        let dir = tempfile::tempdir().unwrap();
        let (plain, enc) = (dir.path().join("p.gguf"), dir.path().join("e.gguf"));
        let mut spec = SyntheticLlama::tiny_f32(5);
        spec.shape.vocab = 64;
        spec.write(&plain).unwrap();
        let key = SecretKey::from_bytes([3; 32]);
        encrypt_gguf(&key, &plain, &enc, &EncryptOptions::default()).unwrap();
        let (p, e) = (
            DenseLlama::load(&plain).unwrap(),
            DenseLlama::load(&enc).unwrap(),
        );
        let opts = OracleOptions {
            batch: 32,
            tokens_per_sequence: 100,
            max_tokens: 20_000,
            max_seconds: 60.0,
            temperature: 5.0,
            hill_climb_seconds: 120.0,
            max_proposals: Some(400_000),
            ..OracleOptions::default()
        };
        let hidden = ProgressBar::hidden();
        let public_opts = OracleOptions {
            seed: 99,
            ..opts.clone()
        };
        let public = sample_corpus(&p, &public_opts, &hidden).unwrap();
        assert!(public.tokens >= 20_000);
        assert!(public
            .sequences
            .iter()
            .all(|s| s.len() == 100 - opts.burn_in));
        let again = sample_corpus(&p, &public_opts, &hidden).unwrap();
        assert_eq!(public.sequences, again.sequences);
        let stats = NgramStats::from_sequences(&public.sequences, p.vocab()).unwrap();

        let r = attack(&e, &stats, &opts, &hidden, &hidden).unwrap();
        assert!(r.corpus_tokens >= 20_000);
        let perm = VocabPermutation::derive(&key, p.vocab());
        let plain_of: Vec<u32> = (0..p.vocab() as u32).map(|c| perm.0.invert(c)).collect();
        let corpus = sample_corpus(&e, &opts, &hidden).unwrap().sequences;
        // The oracle speaks the plaintext model's language: decrypted, its unigram frequencies
        // match the plaintext model's own samples.
        let mut fp = vec![0f64; p.vocab()];
        let mut fe = vec![0f64; p.vocab()];
        let mut fw = vec![0f64; p.vocab()];
        for &t in public.sequences.iter().flatten() {
            fp[t as usize] += 1.0;
        }
        for &c in corpus.iter().flatten() {
            fe[plain_of[c as usize] as usize] += 1.0;
            fw[c as usize] += 1.0; // read without decrypting
        }
        let (corr, wrong) = (correlation(&fp, &fe), correlation(&fp, &fw));
        assert!(
            corr > 0.7 && corr > wrong + 0.4,
            "unigram correlation {corr} decrypted vs {wrong} not"
        );
        // Hill-climbing improves the bigram fit over frequency ranking, and the guess is scored.
        assert!(r.attack.final_score > r.attack.initial_score);
        let after = recovery(&r.attack.guess, &plain_of, &corpus).token_fraction();
        assert!(after > 0.0, "A4 recovered nothing");
    }

    fn correlation(a: &[f64], b: &[f64]) -> f64 {
        let n = a.len() as f64;
        let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
        let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
        let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
        cov / (va * vb).sqrt()
    }

    #[test]
    fn an_empty_budget_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("p.gguf");
        SyntheticLlama::tiny_f32(5).write(&plain).unwrap();
        let m = DenseLlama::load(&plain).unwrap();
        let opts = OracleOptions {
            tokens_per_sequence: 2,
            ..OracleOptions::default()
        };
        assert!(sample_corpus(&m, &opts, &ProgressBar::hidden()).is_err());
    }
}
