//! `audit`: runs every attack the given knowledge allows, scores each with the key (only to
//! measure: the attacks never read it), measures the defences, and writes a report.
//!
//! Attacks (crate `equicrypt-audit`): A1 weight matching, A1-R Procrustes against a simulated
//! rotation mode, A2 functional fingerprint, A3 ciphertext-only frequency analysis with
//! hill-climbing, A4 the model as its own oracle. Defences: per-session vocabulary re-keying and
//! hidden special ids. See THREAT_MODEL.md for what the numbers mean.

mod report;
mod scenario;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use equicrypt_audit::dense::DenseLlama;
use equicrypt_audit::frequency::{self, FrequencyOptions, NgramStats};
use equicrypt_audit::functional::{self, FunctionalOptions};
use equicrypt_audit::oracle::{self, OracleOptions};
use equicrypt_audit::score::{self, Score, Truth};
use equicrypt_audit::{corpus, procrustes, weight_matching};
use equicrypt_core::{SecretKey, VocabPermutation};
use equicrypt_model::{llama_shape, EncryptedModelInfo, GgufFile};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use self::report::{AttackRow, Fact, Report};
use self::scenario::{PublicText, Traffic, HELD_OUT_GENRES};
use crate::keyfile;

/// How much time the audit may spend.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Budget {
    /// A couple of minutes: small samples of everything.
    Quick,
    /// The default: the full audit in about 15 minutes on 2 cores.
    Standard,
    /// Every id for A2 and longer searches: far longer than 15 minutes.
    Full,
}

/// Attacks and defence measurements that `--only` can select.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Stage {
    /// A1: sorted-row weight matching against the public weights.
    A1,
    /// A1-R: Procrustes against a simulated rotation mode.
    Rotation,
    /// A2: functional fingerprint.
    A2,
    /// A3: ciphertext-only frequency analysis with hill-climbing.
    A3,
    /// A4: the model as its own oracle.
    A4,
    /// Defence (a): per-session vocabulary re-keying.
    Rekey,
    /// Defence (b): hidden special ids.
    Special,
}

/// Arguments of `audit`.
#[derive(Args)]
pub struct AuditArgs {
    /// The encrypted model (what the server holds).
    #[arg(long)]
    encrypted: PathBuf,
    /// The public base model, if the attacker has it (enables A1, A1-R, A2).
    #[arg(long)]
    public: Option<PathBuf>,
    /// A plaintext GGUF holding the public tokenizer and chat template (default: --public).
    /// The tokenizer is public even when the weights are not; A3 and A4 need it.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Intercepted traffic, JSON lines `{"prompt": [ids]}` / `{"completion": [ids]}`. Without it,
    /// traffic is simulated from held-out text encrypted with --key (and written to
    /// DIR/traffic.jsonl).
    #[arg(long)]
    traffic: Option<PathBuf>,
    /// Key file, used only to score the attacks and to simulate traffic and sessions.
    #[arg(long)]
    key: Option<PathBuf>,
    /// The Brown corpus (`equicrypt fetch-corpus brown`): the attacker's public text.
    #[arg(long, default_value = "models/corpora/brown")]
    corpus: PathBuf,
    /// Output directory for report.md, report.json and the plot.
    #[arg(long)]
    out: PathBuf,
    /// Time budget preset.
    #[arg(long, value_enum, default_value = "standard")]
    budget: Budget,
    /// Run only these stages (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Option<Vec<Stage>>,
    /// A2: ciphertext ids to fingerprint (overrides the budget).
    #[arg(long)]
    a2_targets: Option<usize>,
    /// A2: plaintext candidates to fingerprint (overrides the budget).
    #[arg(long)]
    a2_candidates: Option<usize>,
    /// A3: hill-climbing seconds (overrides the budget).
    #[arg(long)]
    a3_seconds: Option<f64>,
    /// A4: ciphertext tokens to sample from the model (overrides the budget).
    #[arg(long)]
    a4_tokens: Option<usize>,
    /// Simulated traffic size in tokens (overrides the budget).
    #[arg(long)]
    traffic_tokens: Option<usize>,
    /// Sessions for the re-keying defence.
    #[arg(long, default_value_t = 8)]
    sessions: usize,
}

/// Numbers a budget preset fixes.
#[derive(Clone, Debug)]
struct Plan {
    traffic_tokens: usize,
    a2_targets: usize,
    a2_candidates: usize,
    a3_seconds: f64,
    a4_tokens: usize,
    a4_seconds: f64,
    a4_hill_seconds: f64,
    session_seconds: f64,
}

impl Plan {
    fn new(a: &AuditArgs) -> Self {
        let mut p = match a.budget {
            Budget::Quick => Plan {
                traffic_tokens: 30_000,
                a2_targets: 256,
                a2_candidates: 2048,
                a3_seconds: 10.0,
                a4_tokens: 4096,
                a4_seconds: 40.0,
                a4_hill_seconds: 10.0,
                session_seconds: 5.0,
            },
            Budget::Standard => Plan {
                traffic_tokens: 100_000,
                a2_targets: 2048,
                a2_candidates: 16_384,
                a3_seconds: 60.0,
                a4_tokens: 30_000,
                a4_seconds: 240.0,
                a4_hill_seconds: 45.0,
                session_seconds: 30.0,
            },
            Budget::Full => Plan {
                traffic_tokens: 400_000,
                a2_targets: usize::MAX,
                a2_candidates: usize::MAX,
                a3_seconds: 300.0,
                a4_tokens: 200_000,
                a4_seconds: 1800.0,
                a4_hill_seconds: 300.0,
                session_seconds: 120.0,
            },
        };
        if let Some(v) = a.a2_targets {
            p.a2_targets = v;
        }
        if let Some(v) = a.a2_candidates {
            p.a2_candidates = v;
        }
        if let Some(v) = a.a3_seconds {
            p.a3_seconds = v;
        }
        if let Some(v) = a.a4_tokens {
            p.a4_tokens = v;
            p.a4_seconds = v as f64 / 50.0;
        }
        if let Some(v) = a.traffic_tokens {
            p.traffic_tokens = v;
        }
        p
    }
}

/// The scorer: truth, held-out prompt set and public rank order.
struct Scorer {
    truth: Option<Truth>,
    held_out: Vec<u32>,
    held_out_text: Vec<u32>,
    rank_order: Vec<u32>,
}

impl Scorer {
    fn score(&self, guess: &[Option<u32>]) -> Result<Option<Score>> {
        self.score_with(self.truth.as_ref(), guess)
    }

    fn score_with(&self, truth: Option<&Truth>, guess: &[Option<u32>]) -> Result<Option<Score>> {
        Ok(match truth {
            Some(t) => Some(score::score(
                guess,
                t,
                &self.held_out,
                &self.held_out_text,
                &self.rank_order,
            )?),
            None => None,
        })
    }

    /// Fraction of the ids in `traffic` that `guess` decrypts correctly.
    fn traffic(
        &self,
        truth: Option<&Truth>,
        traffic: Option<&Traffic>,
        guess: &[Option<u32>],
    ) -> Option<f64> {
        let (t, traffic) = (truth?, traffic?);
        Some(frequency::recovery(guess, t.plain_ids(), &traffic.streams()).token_fraction())
    }
}

fn bar(mp: &MultiProgress, label: &str) -> ProgressBar {
    let b = mp.add(ProgressBar::new(0));
    b.set_style(
        ProgressStyle::with_template("{prefix:>12} {bar:32} {pos}/{len} {elapsed}")
            .expect("static template"),
    );
    b.set_prefix(label.to_string());
    b
}

/// Runs `audit`.
pub fn run(a: &AuditArgs) -> Result<()> {
    let t0 = Instant::now();
    let plan = Plan::new(a);
    let wants = |s: Stage| a.only.as_ref().is_none_or(|o| o.contains(&s));
    let mp = MultiProgress::new();
    let mut rows: Vec<AttackRow> = Vec::new();
    let mut facts: Vec<Fact> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let mut given = vec!["encrypted model".to_string()];

    // What the server holds.
    let f = GgufFile::open(&a.encrypted)?;
    let info = EncryptedModelInfo::read(&f)?;
    let vocab = llama_shape(&f)?.vocab_size;
    let file_special = |k: &str| f.meta(k).and_then(|v| v.to_u32().ok());
    let file_bos = file_special("tokenizer.ggml.bos_token_id");
    let file_eos = file_special("tokenizer.ggml.eos_token_id");
    drop(f);

    // The key: only to score and to simulate.
    let key: Option<SecretKey> = match &a.key {
        Some(p) => {
            let k = keyfile::read(p)?;
            info.check_key(&k)?;
            given.push("key (scoring only)".into());
            Some(k)
        }
        None => None,
    };
    let truth = match &key {
        Some(k) => Some(Truth::new(
            VocabPermutation::derive(k, vocab).0.forward().to_vec(),
        )?),
        None => None,
    };

    // Public tokenizer, template and text.
    let tokenizer_path = a.tokenizer.as_ref().or(a.public.as_ref());
    let public_text = match tokenizer_path {
        Some(p) => {
            let pf = GgufFile::open(p)?;
            if equicrypt_model::is_encrypted(&pf) {
                bail!(
                    "{} is encrypted; the public tokenizer comes from a plaintext model",
                    p.display()
                );
            }
            let tok = equicrypt_client::GgufTokenizer::from_content(&pf.content)
                .with_context(|| format!("{}: cannot build the tokenizer", p.display()))?;
            if tok.vocab_size() != vocab {
                bail!(
                    "the tokenizer of {} has {} ids but the encrypted model has {vocab}",
                    p.display(),
                    tok.vocab_size()
                );
            }
            let template = equicrypt_client::ChatTemplate::from_content(&pf.content).ok();
            given.push("public tokenizer".into());
            Some(PublicText { tok, template })
        }
        None => None,
    };
    if a.public.is_some() {
        given.push("public base weights".into());
    }
    let (public_docs, held_docs) = match &public_text {
        Some(_) if a.corpus.join("cats.txt").exists() => {
            let docs = corpus::read_brown(&a.corpus)?;
            given.push("public text (Brown corpus, non-fiction)".into());
            corpus::split_by_category(docs, &HELD_OUT_GENRES)
        }
        Some(_) => {
            skipped.push(format!(
                "no corpus at {} (run `equicrypt fetch-corpus brown`): A3, A4 and traffic simulation need public text",
                a.corpus.display()
            ));
            (Vec::new(), Vec::new())
        }
        None => (Vec::new(), Vec::new()),
    };
    let stats_bar = bar(&mp, "public text");
    let public_stats = match &public_text {
        Some(pt) if !public_docs.is_empty() => {
            let conv = pt.conversations(&public_docs, usize::MAX)?;
            let s = NgramStats::from_sequences(&conv.streams(), vocab)?;
            facts.push(Fact {
                what: "public text (Brown minus fiction), chat-formatted".into(),
                value: format!("{} tokens", s.tokens()),
            });
            Some(s)
        }
        _ => None,
    };
    stats_bar.finish_and_clear();
    let scorer = Scorer {
        truth: truth.clone(),
        held_out: match &public_text {
            Some(pt) => pt.held_out_prompts()?,
            None => Vec::new(),
        },
        held_out_text: match &public_text {
            Some(pt) => pt.tok.encode(crate::verify::EVAL_TEXT, false)?,
            None => Vec::new(),
        },
        rank_order: public_stats
            .as_ref()
            .map(|s| s.rank_order())
            .unwrap_or_default(),
    };
    if scorer.truth.is_some() && scorer.held_out.is_empty() {
        skipped.push("no public tokenizer: scores cover the vocabulary only".into());
    }

    // Traffic: given, or simulated from held-out text.
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let traffic: Option<Traffic> = match (&a.traffic, &truth, &public_text) {
        (Some(p), _, _) => {
            given.push(format!("intercepted traffic ({})", p.display()));
            Some(Traffic::read(p, vocab)?)
        }
        (None, Some(t), Some(pt)) if !held_docs.is_empty() => {
            let plain = pt.conversations(&held_docs, plan.traffic_tokens)?;
            let cipher = plain.map(|p| t.cipher_of(p));
            cipher.write(&a.out.join("traffic.jsonl"))?;
            given.push(format!(
                "intercepted traffic (simulated: {} turns of Brown fiction, {} ids)",
                cipher.prompts.len(),
                cipher.tokens()
            ));
            Some(cipher)
        }
        _ => None,
    };
    let anchors: Vec<(u32, u32)> = match &public_text {
        Some(pt) => [(file_bos, pt.tok.bos_id()), (file_eos, pt.tok.eos_id())]
            .into_iter()
            .filter_map(|(c, p)| Some((c?, p?)))
            .collect(),
        None => Vec::new(),
    };

    // A1 and A1-R: the public weights.
    if let Some(public) = &a.public {
        if wants(Stage::A1) {
            let m = weight_matching::attack(public, &a.encrypted)?;
            rows.push(AttackRow {
                id: "A1".into(),
                attack: "weight matching: sorted embedding rows".into(),
                knowledge: "encrypted file + public base weights".into(),
                defence: "none".into(),
                score: scorer.score(&m.guess)?,
                traffic_tokens_recovered: scorer.traffic(truth.as_ref(), traffic.as_ref(), &m.guess),
                attacker_seconds: m.seconds,
                notes: format!(
                    "{} ids matched uniquely, {} ambiguous (several public rows with the same values)",
                    m.unique, m.ambiguous
                ),
            });
        }
        if wants(Stage::Rotation) {
            rows.push(rotation_row(public, &scorer)?);
        }
    } else {
        skipped.push("A1, A1-R, A2: need the public base weights (--public)".into());
    }

    // A2: black-box queries of both models.
    if let (Some(public), true) = (&a.public, wants(Stage::A2)) {
        let b = bar(&mp, "A2 queries");
        let enc = DenseLlama::load(&a.encrypted)?;
        let pubm = DenseLlama::load(public)?;
        // Budget: the ciphertext ids seen most in traffic first, then the rest in id order;
        // plaintext candidates by public frequency, then the rest.
        let targets = prioritized(
            traffic.as_ref().map(|t| t.all_ids()).unwrap_or_default(),
            vocab,
            plan.a2_targets,
        );
        let candidates = extend_order(&scorer.rank_order, vocab, plan.a2_candidates);
        let opts = FunctionalOptions {
            targets: Some(targets.clone()),
            candidates: Some(candidates.clone()),
            top_k: 32,
            batch: 128,
        };
        let m = functional::attack(&pubm, &enc, &opts, &b)?;
        b.finish_and_clear();
        rows.push(AttackRow {
            id: "A2".into(),
            attack: "functional fingerprint: sorted next-token distributions".into(),
            knowledge: "black-box use of encrypted model + public model".into(),
            defence: "none".into(),
            score: scorer.score(&m.guess)?,
            traffic_tokens_recovered: scorer.traffic(truth.as_ref(), traffic.as_ref(), &m.guess),
            attacker_seconds: m.seconds,
            notes: format!(
                "{} ciphertext ids fingerprinted (most frequent in traffic first) against {} plaintext candidates (most frequent in public text first), ambiguous ones re-checked in two-token contexts; {} matched, {} model queries",
                targets.len(),
                candidates.len(),
                m.matched,
                m.queries
            ),
        });
    }

    // A3: ciphertext only.
    match (&traffic, &public_stats) {
        (Some(t), Some(stats)) if wants(Stage::A3) => {
            let b = bar(&mp, "A3 climb");
            let r = frequency::attack(
                stats,
                &t.streams(),
                &FrequencyOptions {
                    seconds: plan.a3_seconds,
                    seed: 3,
                    anchors: anchors.clone(),
                    ..FrequencyOptions::default()
                },
                &b,
            )?;
            b.finish_and_clear();
            let knowledge = format!(
                "intercepted traffic ({} ids) + public tokenizer and text{}",
                t.tokens(),
                if anchors.is_empty() {
                    String::new()
                } else {
                    format!(" + {} special ids read from the file", anchors.len())
                }
            );
            rows.push(AttackRow {
                id: "A3-freq".into(),
                attack: "frequency ranking only".into(),
                knowledge: knowledge.clone(),
                defence: "none".into(),
                score: scorer.score(&r.initial)?,
                traffic_tokens_recovered: scorer.traffic(truth.as_ref(), Some(t), &r.initial),
                attacker_seconds: 0.0,
                notes: "each ciphertext id gets the plaintext id of the same frequency rank".into(),
            });
            rows.push(AttackRow {
                id: "A3".into(),
                attack: "frequency analysis + bigram hill-climbing".into(),
                knowledge,
                defence: "none".into(),
                score: scorer.score(&r.guess)?,
                traffic_tokens_recovered: scorer.traffic(truth.as_ref(), Some(t), &r.guess),
                attacker_seconds: r.seconds,
                notes: format!(
                    "{} of {} swaps accepted; bigram log-likelihood {:.0} → {:.0}",
                    r.swaps_accepted, r.swaps_tried, r.initial_score, r.final_score
                ),
            });
        }
        _ if wants(Stage::A3) => skipped.push(
            "A3: needs traffic (--traffic, or --key to simulate it) and public text (--tokenizer/--public and the corpus)".into(),
        ),
        _ => {}
    }

    // A4: the model as oracle.
    match &public_stats {
        Some(stats) if wants(Stage::A4) => {
            let model = DenseLlama::load(&a.encrypted)?;
            let sb = bar(&mp, "A4 sample");
            let cb = bar(&mp, "A4 climb");
            let opts = OracleOptions {
                max_tokens: plan.a4_tokens,
                max_seconds: plan.a4_seconds,
                hill_climb_seconds: plan.a4_hill_seconds,
                ..OracleOptions::default()
            };
            let r = oracle::attack(&model, stats, &opts, &sb, &cb)?;
            sb.finish_and_clear();
            cb.finish_and_clear();
            rows.push(AttackRow {
                id: "A4".into(),
                attack: "model as oracle: sample ciphertext text, then A3".into(),
                knowledge: "encrypted file only (weights private) + public tokenizer and text".into(),
                defence: "none".into(),
                score: scorer.score(&r.attack.guess)?,
                traffic_tokens_recovered: scorer.traffic(truth.as_ref(), traffic.as_ref(), &r.attack.guess),
                attacker_seconds: r.sample_seconds + r.attack.seconds,
                notes: format!(
                    "sampled {} ciphertext tokens at temperature {} in {:.0} s, then {:.0} s of hill-climbing",
                    r.corpus_tokens, opts.temperature, r.sample_seconds, r.attack.seconds
                ),
            });
        }
        _ if wants(Stage::A4) => {
            skipped.push("A4: needs public text (--tokenizer/--public and the corpus)".into())
        }
        _ => {}
    }

    // Defence (b): special ids.
    if wants(Stage::Special) {
        facts.push(Fact {
            what: "special ids in the file's metadata".into(),
            value: match (file_bos, file_eos) {
                (None, None) => "none (hidden)".into(),
                (b, e) => format!(
                    "revealed: bos {}, eos {}",
                    b.map_or("–".into(), |v| v.to_string()),
                    e.map_or("–".into(), |v| v.to_string())
                ),
            },
        });
        if let (Some(t), Some(pt)) = (&traffic, &public_text) {
            let (start, end) = scenario::special_ids_from_traffic(t);
            let check = |guess: Option<u32>, want: Option<u32>| match (&truth, guess, want) {
                (Some(tr), Some(g), Some(w)) => {
                    if tr.plain_of(g) == w {
                        "right"
                    } else {
                        "wrong"
                    }
                }
                _ => "unscored",
            };
            facts.push(Fact {
                what: "EOS from traffic alone (most common last id of completions)".into(),
                value: check(end, pt.tok.eos_id()).into(),
            });
            facts.push(Fact {
                what: "chat-start id from traffic alone (most common first id of prompts)".into(),
                value: check(start, pt.tok.token_id("<|im_start|>")).into(),
            });
            // The defence removes the file's special ids; the attacker either goes without
            // (naive) or takes them from the traffic's structure (the realistic case).
            let from_traffic: Vec<(u32, u32)> = [
                (start, pt.tok.token_id("<|im_start|>")),
                (end, pt.tok.eos_id()),
            ]
            .into_iter()
            .filter_map(|(c, p)| Some((c?, p?)))
            .filter(|_| start != end)
            .collect();
            if let Some(stats) = &public_stats {
                for (id, anchors, how) in [
                    (
                        "A3/hidden-special/naive",
                        Vec::new(),
                        "no anchors at all",
                    ),
                    (
                        "A3/hidden-special",
                        from_traffic,
                        "anchors taken from the traffic: most common first id of prompts = <|im_start|>, most common last id of completions = EOS",
                    ),
                ] {
                    let b = bar(&mp, id);
                    let r = frequency::attack(
                        stats,
                        &t.streams(),
                        &FrequencyOptions {
                            seconds: plan.a3_seconds,
                            seed: 3,
                            anchors,
                            ..FrequencyOptions::default()
                        },
                        &b,
                    )?;
                    b.finish_and_clear();
                    rows.push(AttackRow {
                        id: id.into(),
                        attack: "A3 with no special ids in the file".into(),
                        knowledge: "intercepted traffic + public tokenizer and text".into(),
                        defence: "special ids hidden (encrypt --hide-special-ids, client-side stop)"
                            .into(),
                        score: scorer.score(&r.guess)?,
                        traffic_tokens_recovered: scorer.traffic(truth.as_ref(), Some(t), &r.guess),
                        attacker_seconds: r.seconds,
                        notes: format!(
                            "same budget as A3; {how}; {} of {} swaps accepted",
                            r.swaps_accepted, r.swaps_tried
                        ),
                    });
                }
            }
        }
    }

    // Defence (a): per-session re-keying.
    if wants(Stage::Rekey) {
        match (&key, &traffic, &public_stats) {
            (Some(k), Some(t), Some(stats)) => rekey_rows(
                a, k, vocab, t, stats, &anchors, &plan, &scorer, &mp, &mut rows, &mut facts,
            )?,
            _ => skipped.push(
                "re-keying defence: needs --key (to build sessions), traffic and public text"
                    .into(),
            ),
        }
    }

    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        encrypted: a.encrypted.display().to_string(),
        mode: info.mode.as_str().into(),
        vocab,
        budget: format!("{:?}", a.budget).to_lowercase(),
        given,
        rows,
        facts,
        skipped,
        total_seconds: t0.elapsed().as_secs_f64(),
    };
    if report.rows.is_empty() {
        bail!(
            "no attack could run with the given knowledge ({})",
            report.skipped.join("; ")
        );
    }
    report.write(&a.out)?;
    print!("{}", report.summary());
    println!("report: {}", a.out.join("report.md").display());
    Ok(())
}

/// A1-R: Procrustes against the public embedding put through a simulated rotation mode.
fn rotation_row(public: &std::path::Path, scorer: &Scorer) -> Result<AttackRow> {
    let (_, cols, rows) = weight_matching::embedding_rows(public)?;
    let (rotated, plain_of) = procrustes::rotate_rows(&rows, cols, 7);
    let m = procrustes::attack(
        &rows,
        &rotated,
        cols,
        &procrustes::ProcrustesOptions::default(),
    )?;
    let mut cipher_of = vec![0u32; plain_of.len()];
    for (c, &p) in plain_of.iter().enumerate() {
        if let Some(slot) = cipher_of.get_mut(p as usize) {
            *slot = c as u32;
        }
    }
    let truth = Truth::new(cipher_of)?;
    Ok(AttackRow {
        id: "A1-R".into(),
        attack: "row norms + Gram anchors + orthogonal Procrustes".into(),
        knowledge: "public base weights; simulated rotation mode (not an equicrypt mode)".into(),
        defence: "secret rotation of the hidden space (simulated)".into(),
        score: scorer.score_with(Some(&truth), &m.guess)?,
        traffic_tokens_recovered: None,
        attacker_seconds: m.seconds,
        notes: format!(
            "public embedding × random orthogonal matrix, rows permuted; {} anchors, residual {:.2e}",
            m.anchors, m.residual
        ),
    })
}

/// Defence (a): sessions with their own vocabulary permutation.
#[allow(clippy::too_many_arguments)]
fn rekey_rows(
    a: &AuditArgs,
    key: &SecretKey,
    vocab: usize,
    traffic: &Traffic,
    stats: &NgramStats,
    anchors: &[(u32, u32)],
    plan: &Plan,
    scorer: &Scorer,
    mp: &MultiProgress,
    rows: &mut Vec<AttackRow>,
    facts: &mut Vec<Fact>,
) -> Result<()> {
    let n = a.sessions.max(2);
    let base = scorer.truth.as_ref().context("re-keying needs the key")?;
    // Split the conversations round-robin over n sessions; session s sees its own ids.
    let labels: Vec<String> = (0..n).map(|s| format!("audit-{s}")).collect();
    let perms: Vec<VocabPermutation> = labels
        .iter()
        .map(|l| VocabPermutation::derive_session(key, l, vocab))
        .collect::<Result<_, _>>()?;
    let session_traffic = |s: usize| -> Traffic {
        let pick = |v: &Vec<Vec<u32>>| {
            v.iter()
                .enumerate()
                .filter(|(i, _)| i % n == s)
                .map(|(_, x)| {
                    x.iter()
                        .map(|&c| perms[s].0.apply(base.plain_of(c)))
                        .collect::<Vec<u32>>()
                })
                .collect()
        };
        Traffic {
            prompts: pick(&traffic.prompts),
            completions: pick(&traffic.completions),
        }
    };
    let truth0 = Truth::new(perms[0].0.forward().to_vec())?;
    let t0 = session_traffic(0);
    let b = bar(mp, "A3 session");
    let r = frequency::attack(
        stats,
        &t0.streams(),
        &FrequencyOptions {
            seconds: plan.session_seconds,
            seed: 3,
            anchors: anchors
                .iter()
                .map(|&(_, p)| (perms[0].0.apply(p), p))
                .collect(),
            ..FrequencyOptions::default()
        },
        &b,
    )?;
    b.finish_and_clear();
    rows.push(AttackRow {
        id: "A3/one-session".into(),
        attack: format!("A3 on one session's traffic (1 of {n})"),
        knowledge: format!(
            "one session's traffic ({} ids) + public tokenizer and text",
            t0.tokens()
        ),
        defence: format!("per-session vocabulary re-keying, {n} sessions"),
        score: scorer.score_with(Some(&truth0), &r.guess)?,
        traffic_tokens_recovered: scorer.traffic(Some(&truth0), Some(&t0), &r.guess),
        attacker_seconds: r.seconds,
        notes: "a network observer cannot pool sessions: each has its own substitution".into(),
    });

    // Linking: the server holds every session's embedding table; identical rows link them.
    let (_, cols, emb) = weight_matching::embedding_rows(&a.encrypted)?;
    let table = |s: usize| -> Vec<f32> {
        let mut t = vec![0f32; emb.len()];
        for (c, row) in emb.chunks_exact(cols).enumerate() {
            let to = perms[s].0.apply(base.plain_of(c as u32)) as usize;
            t[to * cols..(to + 1) * cols].copy_from_slice(row);
        }
        t
    };
    let (t_0, t_1) = (table(0), table(1));
    let start = Instant::now();
    let link = weight_matching::match_rows(&t_0, &t_1, cols)?;
    let link_seconds = start.elapsed().as_secs_f64();
    let linked_ok = link
        .guess
        .iter()
        .enumerate()
        .filter(|(c1, g)| **g == Some(perms[0].0.apply(perms[1].0.invert(*c1 as u32))))
        .count();
    facts.push(Fact {
        what: "session linking: ids of session 1 mapped to session 0 by matching their embedding tables".into(),
        value: format!(
            "{:.2} % of the vocabulary in {:.1} s (no public weights needed)",
            100.0 * linked_ok as f64 / vocab as f64,
            link_seconds
        ),
    });
    // Re-key cost: the server keeps one body and, per session, tables whose rows moved.
    let cost = crate::rekey::bench_tables(&a.encrypted, key, &labels)?;
    facts.push(Fact {
        what: "re-key cost per session (embedding/head rows only)".into(),
        value: format!(
            "{:.1} ms and {:.1} MiB of tables per session; resident memory {} for {n} sessions",
            1e3 * cost.seconds.iter().sum::<f64>() / n as f64,
            cost.bytes_per_session as f64 / (1 << 20) as f64,
            match cost.rss_kb {
                Some((before, after)) =>
                    format!("+{:.1} MiB", after.saturating_sub(before) as f64 / 1024.0),
                None => "not measured (no /proc)".into(),
            }
        ),
    });
    Ok(())
}

/// Up to `limit` ids: those in `seen` by descending count, then every other id in order.
fn prioritized(seen: Vec<u32>, vocab: usize, limit: usize) -> Vec<u32> {
    let mut counts = vec![0u32; vocab];
    for i in seen {
        if let Some(c) = counts.get_mut(i as usize) {
            *c += 1;
        }
    }
    let mut order: Vec<u32> = (0..vocab as u32).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(counts[i as usize]), i));
    order.truncate(limit.min(vocab));
    order
}

/// Up to `limit` ids: `first` (deduplicated, in range), then every other id in order.
fn extend_order(first: &[u32], vocab: usize, limit: usize) -> Vec<u32> {
    let mut seen = vec![false; vocab];
    let mut out = Vec::with_capacity(vocab.min(limit));
    for &i in first.iter().chain(&(0..vocab as u32).collect::<Vec<_>>()) {
        if out.len() >= limit {
            break;
        }
        if (i as usize) < vocab && !seen[i as usize] {
            seen[i as usize] = true;
            out.push(i);
        }
    }
    out
}
