//! The audit: runs every attack the given knowledge allows, scores each with the key (only to
//! measure: the attacks never read it), measures the defences, and writes a report.
//!
//! Attacks: A1 weight matching, A1-R Procrustes against a simulated rotation mode, A2 functional
//! fingerprint, A3 ciphertext-only frequency analysis with hill-climbing, A4 the model as its own
//! oracle. Defences: per-session vocabulary re-keying and hidden special ids. See
//! THREAT_MODEL.md for what the numbers mean.
//!
//! [`run_audit`] takes an [`AuditConfig`] (what the attacker is given, the budget, where the
//! report goes), writes `report.json`, `report.md`, `recovery_by_rank.svg` (and `traffic.jsonl`
//! when it simulates traffic) into [`AuditConfig::out`], and returns the [`AuditReport`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use equicrypt_core::{SecretKey, VocabPermutation};
use equicrypt_model::{llama_shape, EncryptedModelInfo, GgufFile};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::corpus::{self, BrownDocument};
use crate::dense::DenseLlama;
use crate::frequency::{self, FrequencyOptions, NgramStats};
use crate::functional::{self, FunctionalOptions};
use crate::oracle::{self, OracleOptions};
use crate::report::{AttackRow, AuditReport, Fact};
use crate::scenario::{self, PublicText, Traffic, HELD_OUT_GENRES};
use crate::score::{self, Score, Truth};
use crate::{cost, procrustes, weight_matching, AuditError};

type Result<T, E = AuditError> = std::result::Result<T, E>;

/// How much time the audit may spend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Budget {
    /// A couple of minutes: small samples of everything.
    Quick,
    /// The default: the full audit in about 15 minutes on 2 cores.
    Standard,
    /// Every id for A2 and longer searches: far longer than 15 minutes.
    Full,
}

impl Budget {
    /// The preset's name as the report records it: `quick`, `standard` or `full`.
    pub fn as_str(self) -> &'static str {
        match self {
            Budget::Quick => "quick",
            Budget::Standard => "standard",
            Budget::Full => "full",
        }
    }
}

/// Attacks and defence measurements that [`AuditConfig::only`] can select.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
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

/// What the audit is given and how long it may take.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// The encrypted model (what the server holds).
    pub encrypted: PathBuf,
    /// The public base model, if the attacker has it (enables A1, A1-R, A2).
    pub public: Option<PathBuf>,
    /// A plaintext GGUF holding the public tokenizer and chat template (default: `public`).
    /// The tokenizer is public even when the weights are not; A3 and A4 need it.
    pub tokenizer: Option<PathBuf>,
    /// Intercepted traffic, JSON lines `{"prompt": [ids]}` / `{"completion": [ids]}`
    /// (see [`Traffic::read`]). Without it, traffic is simulated from held-out text encrypted
    /// with `key` (and written to `out/traffic.jsonl`).
    pub traffic: Option<PathBuf>,
    /// The model's key, used only to score the attacks and to simulate traffic and sessions.
    pub key: Option<SecretKey>,
    /// The Brown corpus directory: the attacker's public text.
    pub corpus: PathBuf,
    /// Output directory for the report, the plot and simulated traffic.
    pub out: PathBuf,
    /// Time budget preset.
    pub budget: Budget,
    /// Run only these stages (`None`: all of them).
    pub only: Option<Vec<Stage>>,
    /// A2: ciphertext ids to fingerprint (overrides the budget).
    pub a2_targets: Option<usize>,
    /// A2: plaintext candidates to fingerprint (overrides the budget).
    pub a2_candidates: Option<usize>,
    /// A3: hill-climbing seconds (overrides the budget).
    pub a3_seconds: Option<f64>,
    /// A4: ciphertext tokens to sample from the model (overrides the budget).
    pub a4_tokens: Option<usize>,
    /// Simulated traffic size in tokens (overrides the budget).
    pub traffic_tokens: Option<usize>,
    /// Sessions for the re-keying defence (at least 2 are used).
    pub sessions: usize,
    /// The command line recorded in the report.
    pub command: String,
    /// Held-out plain text (the CLI's `data/eval.txt`): scored as it is and as part of the
    /// held-out prompt set.
    pub eval_text: String,
    /// Held-out prompts, one a line (the CLI's `data/prompts.txt`), scored as chat turns.
    pub prompts: String,
}

impl AuditConfig {
    /// An audit of `encrypted` writing into `out`, given nothing else: corpus
    /// `models/corpora/brown`, standard budget, 8 sessions, no held-out text.
    pub fn new(encrypted: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        AuditConfig {
            encrypted: encrypted.into(),
            public: None,
            tokenizer: None,
            traffic: None,
            key: None,
            corpus: PathBuf::from("models/corpora/brown"),
            out: out.into(),
            budget: Budget::Standard,
            only: None,
            a2_targets: None,
            a2_candidates: None,
            a3_seconds: None,
            a4_tokens: None,
            traffic_tokens: None,
            sessions: 8,
            command: String::new(),
            eval_text: String::new(),
            prompts: String::new(),
        }
    }

    fn wants(&self, s: Stage) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(&s))
    }
}

/// Runs the audit described by `cfg`, writes its report into `cfg.out` and returns it.
///
/// Fails before running anything when an input is unusable (wrong key, bad traffic log, a
/// tokenizer that does not fit the model), and with [`AuditError::NothingToRun`] when the given
/// knowledge allows no attack.
pub fn run_audit(cfg: &AuditConfig) -> Result<AuditReport> {
    let t0 = Instant::now();
    let mut audit = Audit::prepare(cfg)?;
    audit.public_weights()?;
    audit.functional()?;
    audit.ciphertext_only()?;
    audit.oracle()?;
    audit.hidden_special()?;
    audit.rekeying()?;
    audit.finish(t0)
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
    fn new(a: &AuditConfig) -> Self {
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
    fn new(
        truth: Option<Truth>,
        public_text: Option<&PublicText>,
        public_stats: Option<&NgramStats>,
        cfg: &AuditConfig,
    ) -> Result<Self> {
        Ok(Scorer {
            truth,
            held_out: match public_text {
                Some(pt) => pt.held_out_prompts(&cfg.eval_text, &cfg.prompts)?,
                None => Vec::new(),
            },
            held_out_text: match public_text {
                Some(pt) => pt.tok.encode(&cfg.eval_text, false)?,
                None => Vec::new(),
            },
            rank_order: public_stats.map(|s| s.rank_order()).unwrap_or_default(),
        })
    }

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

/// What the server holds, read from the encrypted file.
struct ServerView {
    vocab: usize,
    mode: String,
    /// Special ids the file's metadata reveals (absent when hidden).
    file_bos: Option<u32>,
    file_eos: Option<u32>,
}

impl ServerView {
    /// Reads the encrypted model and checks that `key` (if any) is its key.
    fn read(encrypted: &Path, key: Option<&SecretKey>) -> Result<Self> {
        let f = GgufFile::open(encrypted)?;
        let info = EncryptedModelInfo::read(&f)?;
        let vocab = llama_shape(&f)?.vocab_size;
        let file_special = |k: &str| f.meta(k).and_then(|v| v.to_u32().ok());
        let view = ServerView {
            vocab,
            mode: info.mode.as_str().into(),
            file_bos: file_special("tokenizer.ggml.bos_token_id"),
            file_eos: file_special("tokenizer.ggml.eos_token_id"),
        };
        drop(f);
        if let Some(k) = key {
            info.check_key(k)?;
        }
        Ok(view)
    }
}

/// What the report collects as the audit goes.
#[derive(Default)]
struct Findings {
    given: Vec<String>,
    rows: Vec<AttackRow>,
    facts: Vec<Fact>,
    skipped: Vec<String>,
}

/// One audit in progress: the knowledge gathered up front, and the findings so far.
struct Audit<'a> {
    cfg: &'a AuditConfig,
    plan: Plan,
    mp: MultiProgress,
    server: ServerView,
    public_text: Option<PublicText>,
    public_stats: Option<NgramStats>,
    scorer: Scorer,
    traffic: Option<Traffic>,
    /// Special ids read from the file, paired with their public ids: (ciphertext, plaintext).
    anchors: Vec<(u32, u32)>,
    found: Findings,
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

impl<'a> Audit<'a> {
    /// Reads everything the attacker is given (and the key, to score), and builds the public
    /// statistics, the scorer and the traffic.
    fn prepare(cfg: &'a AuditConfig) -> Result<Self> {
        let plan = Plan::new(cfg);
        let mp = MultiProgress::new();
        let mut found = Findings {
            given: vec!["encrypted model".to_string()],
            ..Findings::default()
        };
        let server = ServerView::read(&cfg.encrypted, cfg.key.as_ref())?;
        let vocab = server.vocab;

        // The key: only to score and to simulate.
        let truth = match &cfg.key {
            Some(k) => {
                found.given.push("key (scoring only)".into());
                Some(Truth::new(
                    VocabPermutation::derive(k, vocab).0.forward().to_vec(),
                )?)
            }
            None => None,
        };

        // Public tokenizer, template and text.
        let public_text = load_public_text(cfg, vocab)?;
        if public_text.is_some() {
            found.given.push("public tokenizer".into());
        }
        if cfg.public.is_some() {
            found.given.push("public base weights".into());
        }
        let (public_docs, held_docs) = match &public_text {
            Some(_) => read_corpus(&cfg.corpus, &mut found)?,
            None => (Vec::new(), Vec::new()),
        };
        let stats_bar = bar(&mp, "public text");
        let public_stats = match &public_text {
            Some(pt) if !public_docs.is_empty() => {
                let conv = pt.conversations(&public_docs, usize::MAX)?;
                let s = NgramStats::from_sequences(&conv.streams(), vocab)?;
                found.facts.push(Fact {
                    what: "public text (Brown minus fiction), chat-formatted".into(),
                    value: format!("{} tokens", s.tokens()),
                });
                Some(s)
            }
            _ => None,
        };
        stats_bar.finish_and_clear();
        let scorer = Scorer::new(truth, public_text.as_ref(), public_stats.as_ref(), cfg)?;
        if scorer.truth.is_some() && scorer.held_out.is_empty() {
            found
                .skipped
                .push("no public tokenizer: scores cover the vocabulary only".into());
        }

        // Traffic: given, or simulated from held-out text.
        std::fs::create_dir_all(&cfg.out).map_err(|source| AuditError::Io {
            message: format!("cannot create {}", cfg.out.display()),
            source,
        })?;
        let traffic = load_traffic(
            cfg,
            &plan,
            vocab,
            scorer.truth.as_ref(),
            public_text.as_ref(),
            &held_docs,
            &mut found.given,
        )?;
        let anchors: Vec<(u32, u32)> = match &public_text {
            Some(pt) => [
                (server.file_bos, pt.tok.bos_id()),
                (server.file_eos, pt.tok.eos_id()),
            ]
            .into_iter()
            .filter_map(|(c, p)| Some((c?, p?)))
            .collect(),
            None => Vec::new(),
        };
        Ok(Audit {
            cfg,
            plan,
            mp,
            server,
            public_text,
            public_stats,
            scorer,
            traffic,
            anchors,
            found,
        })
    }

    fn truth(&self) -> Option<&Truth> {
        self.scorer.truth.as_ref()
    }

    /// A1 and A1-R: the public weights.
    fn public_weights(&mut self) -> Result<()> {
        let Some(public) = &self.cfg.public else {
            self.found
                .skipped
                .push("A1, A1-R, A2: need the public base weights (--public)".into());
            return Ok(());
        };
        if self.cfg.wants(Stage::A1) {
            let m = weight_matching::attack(public, &self.cfg.encrypted)?;
            let row = AttackRow {
                id: "A1".into(),
                attack: "weight matching: sorted embedding rows".into(),
                knowledge: "encrypted file + public base weights".into(),
                defence: "none".into(),
                score: self.scorer.score(&m.guess)?,
                traffic_tokens_recovered: self.scorer.traffic(
                    self.truth(),
                    self.traffic.as_ref(),
                    &m.guess,
                ),
                attacker_seconds: m.seconds,
                notes: format!(
                    "{} ids matched uniquely, {} ambiguous (several public rows with the same values)",
                    m.unique, m.ambiguous
                ),
            };
            self.found.rows.push(row);
        }
        if self.cfg.wants(Stage::Rotation) {
            let row = rotation_row(public, &self.scorer)?;
            self.found.rows.push(row);
        }
        Ok(())
    }

    /// A2: black-box queries of both models.
    fn functional(&mut self) -> Result<()> {
        let (Some(public), true) = (&self.cfg.public, self.cfg.wants(Stage::A2)) else {
            return Ok(());
        };
        let vocab = self.server.vocab;
        let b = bar(&self.mp, "A2 queries");
        let enc = DenseLlama::load(&self.cfg.encrypted)?;
        let pubm = DenseLlama::load(public)?;
        // Budget: the ciphertext ids seen most in traffic first, then the rest in id order;
        // plaintext candidates by public frequency, then the rest.
        let targets = prioritized(
            self.traffic
                .as_ref()
                .map(|t| t.all_ids())
                .unwrap_or_default(),
            vocab,
            self.plan.a2_targets,
        );
        let candidates = extend_order(&self.scorer.rank_order, vocab, self.plan.a2_candidates);
        let opts = FunctionalOptions {
            targets: Some(targets.clone()),
            candidates: Some(candidates.clone()),
            top_k: 32,
            batch: 128,
        };
        let m = functional::attack(&pubm, &enc, &opts, &b)?;
        b.finish_and_clear();
        let row = AttackRow {
            id: "A2".into(),
            attack: "functional fingerprint: sorted next-token distributions".into(),
            knowledge: "black-box use of encrypted model + public model".into(),
            defence: "none".into(),
            score: self.scorer.score(&m.guess)?,
            traffic_tokens_recovered: self.scorer.traffic(
                self.truth(),
                self.traffic.as_ref(),
                &m.guess,
            ),
            attacker_seconds: m.seconds,
            notes: format!(
                "{} ciphertext ids fingerprinted (most frequent in traffic first) against {} plaintext candidates (most frequent in public text first), ambiguous ones re-checked in two-token contexts; {} matched, {} model queries",
                targets.len(),
                candidates.len(),
                m.matched,
                m.queries
            ),
        };
        self.found.rows.push(row);
        Ok(())
    }

    /// A3: ciphertext only, with the special ids the file reveals as anchors.
    fn ciphertext_only(&mut self) -> Result<()> {
        if !self.cfg.wants(Stage::A3) {
            return Ok(());
        }
        let (Some(t), Some(stats)) = (&self.traffic, &self.public_stats) else {
            self.found.skipped.push(
                "A3: needs traffic (--traffic, or --key to simulate it) and public text (--tokenizer/--public and the corpus)".into(),
            );
            return Ok(());
        };
        let b = bar(&self.mp, "A3 climb");
        let r = frequency::attack(
            stats,
            &t.streams(),
            &FrequencyOptions {
                seconds: self.plan.a3_seconds,
                seed: 3,
                anchors: self.anchors.clone(),
                ..FrequencyOptions::default()
            },
            &b,
        )?;
        b.finish_and_clear();
        let knowledge = format!(
            "intercepted traffic ({} ids) + public tokenizer and text{}",
            t.tokens(),
            if self.anchors.is_empty() {
                String::new()
            } else {
                format!(" + {} special ids read from the file", self.anchors.len())
            }
        );
        let rows = [
            AttackRow {
                id: "A3-freq".into(),
                attack: "frequency ranking only".into(),
                knowledge: knowledge.clone(),
                defence: "none".into(),
                score: self.scorer.score(&r.initial)?,
                traffic_tokens_recovered: self.scorer.traffic(self.truth(), Some(t), &r.initial),
                attacker_seconds: 0.0,
                notes: "each ciphertext id gets the plaintext id of the same frequency rank".into(),
            },
            AttackRow {
                id: "A3".into(),
                attack: "frequency analysis + bigram hill-climbing".into(),
                knowledge,
                defence: "none".into(),
                score: self.scorer.score(&r.guess)?,
                traffic_tokens_recovered: self.scorer.traffic(self.truth(), Some(t), &r.guess),
                attacker_seconds: r.seconds,
                notes: format!(
                    "{} of {} swaps accepted; bigram log-likelihood {:.0} → {:.0}",
                    r.swaps_accepted, r.swaps_tried, r.initial_score, r.final_score
                ),
            },
        ];
        self.found.rows.extend(rows);
        Ok(())
    }

    /// A4: the model as its own oracle.
    fn oracle(&mut self) -> Result<()> {
        if !self.cfg.wants(Stage::A4) {
            return Ok(());
        }
        let Some(stats) = &self.public_stats else {
            self.found
                .skipped
                .push("A4: needs public text (--tokenizer/--public and the corpus)".into());
            return Ok(());
        };
        let model = DenseLlama::load(&self.cfg.encrypted)?;
        let sb = bar(&self.mp, "A4 sample");
        let cb = bar(&self.mp, "A4 climb");
        let opts = OracleOptions {
            max_tokens: self.plan.a4_tokens,
            max_seconds: self.plan.a4_seconds,
            hill_climb_seconds: self.plan.a4_hill_seconds,
            ..OracleOptions::default()
        };
        let r = oracle::attack(&model, stats, &opts, &sb, &cb)?;
        sb.finish_and_clear();
        cb.finish_and_clear();
        let row = AttackRow {
            id: "A4".into(),
            attack: "model as oracle: sample ciphertext text, then A3".into(),
            knowledge: "encrypted file only (weights private) + public tokenizer and text".into(),
            defence: "none".into(),
            score: self.scorer.score(&r.attack.guess)?,
            traffic_tokens_recovered: self.scorer.traffic(
                self.truth(),
                self.traffic.as_ref(),
                &r.attack.guess,
            ),
            attacker_seconds: r.sample_seconds + r.attack.seconds,
            notes: format!(
                "sampled {} ciphertext tokens at temperature {} in {:.0} s, then {:.0} s of hill-climbing",
                r.corpus_tokens, opts.temperature, r.sample_seconds, r.attack.seconds
            ),
        };
        self.found.rows.push(row);
        Ok(())
    }

    /// Defence (b): special ids hidden from the file. What the metadata reveals, what the
    /// traffic's structure reveals, and A3 without the file's anchors.
    fn hidden_special(&mut self) -> Result<()> {
        if !self.cfg.wants(Stage::Special) {
            return Ok(());
        }
        self.found.facts.push(Fact {
            what: "special ids in the file's metadata".into(),
            value: match (self.server.file_bos, self.server.file_eos) {
                (None, None) => "none (hidden)".into(),
                (b, e) => format!(
                    "revealed: bos {}, eos {}",
                    b.map_or("–".into(), |v| v.to_string()),
                    e.map_or("–".into(), |v| v.to_string())
                ),
            },
        });
        let (Some(t), Some(pt)) = (&self.traffic, &self.public_text) else {
            return Ok(());
        };
        let (start, end) = scenario::special_ids_from_traffic(t);
        let chat_start = pt.tok.token_id("<|im_start|>");
        let eos = pt.tok.eos_id();
        let check = |guess: Option<u32>, want: Option<u32>| match (self.truth(), guess, want) {
            (Some(tr), Some(g), Some(w)) => {
                if tr.plain_of(g) == w {
                    "right"
                } else {
                    "wrong"
                }
            }
            _ => "unscored",
        };
        let facts = [
            Fact {
                what: "EOS from traffic alone (most common last id of completions)".into(),
                value: check(end, eos).into(),
            },
            Fact {
                what: "chat-start id from traffic alone (most common first id of prompts)".into(),
                value: check(start, chat_start).into(),
            },
        ];
        self.found.facts.extend(facts);
        // The defence removes the file's special ids; the attacker either goes without
        // (naive) or takes them from the traffic's structure (the realistic case).
        let from_traffic: Vec<(u32, u32)> = [(start, chat_start), (end, eos)]
            .into_iter()
            .filter_map(|(c, p)| Some((c?, p?)))
            .filter(|_| start != end)
            .collect();
        let Some(stats) = &self.public_stats else {
            return Ok(());
        };
        let mut rows = Vec::new();
        for (id, anchors, how) in [
            ("A3/hidden-special/naive", Vec::new(), "no anchors at all"),
            (
                "A3/hidden-special",
                from_traffic,
                "anchors taken from the traffic: most common first id of prompts = <|im_start|>, most common last id of completions = EOS",
            ),
        ] {
            let b = bar(&self.mp, id);
            let r = frequency::attack(
                stats,
                &t.streams(),
                &FrequencyOptions {
                    seconds: self.plan.a3_seconds,
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
                defence: "special ids hidden (encrypt --hide-special-ids, client-side stop)".into(),
                score: self.scorer.score(&r.guess)?,
                traffic_tokens_recovered: self.scorer.traffic(self.truth(), Some(t), &r.guess),
                attacker_seconds: r.seconds,
                notes: format!(
                    "same budget as A3; {how}; {} of {} swaps accepted",
                    r.swaps_accepted, r.swaps_tried
                ),
            });
        }
        self.found.rows.extend(rows);
        Ok(())
    }

    /// Defence (a): per-session re-keying.
    fn rekeying(&mut self) -> Result<()> {
        if !self.cfg.wants(Stage::Rekey) {
            return Ok(());
        }
        match (&self.cfg.key, &self.traffic, &self.public_stats) {
            (Some(k), Some(t), Some(stats)) => {
                let (rows, facts) = Rekeying::new(self, k)?.measure(t, stats)?;
                self.found.rows.extend(rows);
                self.found.facts.extend(facts);
            }
            _ => self.found.skipped.push(
                "re-keying defence: needs --key (to build sessions), traffic and public text"
                    .into(),
            ),
        }
        Ok(())
    }

    /// The report, written into the output directory.
    fn finish(self, t0: Instant) -> Result<AuditReport> {
        let report = AuditReport {
            command: self.cfg.command.clone(),
            encrypted: self.cfg.encrypted.display().to_string(),
            mode: self.server.mode,
            vocab: self.server.vocab,
            budget: self.cfg.budget.as_str().into(),
            given: self.found.given,
            rows: self.found.rows,
            facts: self.found.facts,
            skipped: self.found.skipped,
            total_seconds: t0.elapsed().as_secs_f64(),
        };
        if report.rows.is_empty() {
            return Err(AuditError::NothingToRun {
                skipped: report.skipped,
            });
        }
        report.write(&self.cfg.out)?;
        Ok(report)
    }
}

/// The public tokenizer and chat template from `cfg.tokenizer` (or `cfg.public`), checked
/// against the encrypted model's vocabulary.
fn load_public_text(cfg: &AuditConfig, vocab: usize) -> Result<Option<PublicText>> {
    let Some(p) = cfg.tokenizer.as_ref().or(cfg.public.as_ref()) else {
        return Ok(None);
    };
    let pf = GgufFile::open(p)?;
    if equicrypt_model::is_encrypted(&pf) {
        return Err(AuditError::EncryptedTokenizer { path: p.clone() });
    }
    let tok = equicrypt_client::GgufTokenizer::from_content(&pf.content).map_err(|source| {
        AuditError::Tokenizer {
            path: p.clone(),
            source,
        }
    })?;
    if tok.vocab_size() != vocab {
        return Err(AuditError::TokenizerVocab {
            path: p.clone(),
            tokenizer: tok.vocab_size(),
            model: vocab,
        });
    }
    let template = equicrypt_client::ChatTemplate::from_content(&pf.content).ok();
    Ok(Some(PublicText { tok, template }))
}

/// The Brown corpus split into the attacker's public text and the victim's held-out genres;
/// both empty (and a note in `skipped`) when the corpus is absent.
fn read_corpus(
    dir: &Path,
    found: &mut Findings,
) -> Result<(Vec<BrownDocument>, Vec<BrownDocument>)> {
    if !dir.join("cats.txt").exists() {
        found.skipped.push(format!(
            "no corpus at {} (run `equicrypt fetch-corpus brown`): A3, A4 and traffic simulation need public text",
            dir.display()
        ));
        return Ok((Vec::new(), Vec::new()));
    }
    let docs = corpus::read_brown(dir)?;
    found
        .given
        .push("public text (Brown corpus, non-fiction)".into());
    Ok(corpus::split_by_category(docs, &HELD_OUT_GENRES))
}

/// The intercepted traffic: read from `cfg.traffic`, or simulated from the held-out genres
/// encrypted with the key (and written to `out/traffic.jsonl`), or none.
fn load_traffic(
    cfg: &AuditConfig,
    plan: &Plan,
    vocab: usize,
    truth: Option<&Truth>,
    public_text: Option<&PublicText>,
    held_docs: &[BrownDocument],
    given: &mut Vec<String>,
) -> Result<Option<Traffic>> {
    Ok(match (&cfg.traffic, truth, public_text) {
        (Some(p), _, _) => {
            given.push(format!("intercepted traffic ({})", p.display()));
            Some(Traffic::read(p, vocab)?)
        }
        (None, Some(t), Some(pt)) if !held_docs.is_empty() => {
            let plain = pt.conversations(held_docs, plan.traffic_tokens)?;
            let cipher = plain.map(|p| t.cipher_of(p));
            cipher.write(&cfg.out.join("traffic.jsonl"))?;
            given.push(format!(
                "intercepted traffic (simulated: {} turns of Brown fiction, {} ids)",
                cipher.prompts.len(),
                cipher.tokens()
            ));
            Some(cipher)
        }
        _ => None,
    })
}

/// A1-R: Procrustes against the public embedding put through a simulated rotation mode.
fn rotation_row(public: &Path, scorer: &Scorer) -> Result<AttackRow> {
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

/// Defence (a): sessions with their own vocabulary permutation. The conversations are split
/// round-robin over the sessions; session `s` sees its own ids.
struct Rekeying<'a, 'c> {
    audit: &'a Audit<'c>,
    key: &'a SecretKey,
    /// The model's own permutation (the audit's truth).
    base: &'a Truth,
    labels: Vec<String>,
    perms: Vec<VocabPermutation>,
}

impl<'a, 'c> Rekeying<'a, 'c> {
    fn new(audit: &'a Audit<'c>, key: &'a SecretKey) -> Result<Self> {
        let n = audit.cfg.sessions.max(2);
        let base = audit
            .truth()
            .ok_or_else(|| AuditError::InvalidInput("re-keying needs the key".into()))?;
        let labels: Vec<String> = (0..n).map(|s| format!("audit-{s}")).collect();
        let perms: Vec<VocabPermutation> = labels
            .iter()
            .map(|l| VocabPermutation::derive_session(key, l, audit.server.vocab))
            .collect::<Result<_, _>>()?;
        Ok(Rekeying {
            audit,
            key,
            base,
            labels,
            perms,
        })
    }

    /// The A3 row on one session's traffic and the facts on linking and cost.
    fn measure(
        &self,
        traffic: &Traffic,
        stats: &NgramStats,
    ) -> Result<(Vec<AttackRow>, Vec<Fact>)> {
        let row = self.one_session(traffic, stats)?;
        let facts = vec![self.linking()?, self.cost()?];
        Ok((vec![row], facts))
    }

    /// The part of `traffic` session `s` carries, in that session's ids.
    fn session_traffic(&self, traffic: &Traffic, s: usize) -> Traffic {
        let n = self.labels.len();
        let pick = |v: &Vec<Vec<u32>>| {
            v.iter()
                .enumerate()
                .filter(|(i, _)| i % n == s)
                .map(|(_, x)| {
                    x.iter()
                        .map(|&c| self.perms[s].0.apply(self.base.plain_of(c)))
                        .collect::<Vec<u32>>()
                })
                .collect()
        };
        Traffic {
            prompts: pick(&traffic.prompts),
            completions: pick(&traffic.completions),
        }
    }

    /// A3 on session 0's traffic alone, scored against session 0's permutation.
    fn one_session(&self, traffic: &Traffic, stats: &NgramStats) -> Result<AttackRow> {
        let n = self.labels.len();
        let (plan, scorer) = (&self.audit.plan, &self.audit.scorer);
        let truth0 = Truth::new(self.perms[0].0.forward().to_vec())?;
        let t0 = self.session_traffic(traffic, 0);
        let b = bar(&self.audit.mp, "A3 session");
        let r = frequency::attack(
            stats,
            &t0.streams(),
            &FrequencyOptions {
                seconds: plan.session_seconds,
                seed: 3,
                anchors: self
                    .audit
                    .anchors
                    .iter()
                    .map(|&(_, p)| (self.perms[0].0.apply(p), p))
                    .collect(),
                ..FrequencyOptions::default()
            },
            &b,
        )?;
        b.finish_and_clear();
        Ok(AttackRow {
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
        })
    }

    /// Linking: the server holds every session's embedding table; identical rows link them.
    fn linking(&self) -> Result<Fact> {
        let vocab = self.audit.server.vocab;
        let (_, cols, emb) = weight_matching::embedding_rows(&self.audit.cfg.encrypted)?;
        let table = |s: usize| -> Vec<f32> {
            let mut t = vec![0f32; emb.len()];
            for (c, row) in emb.chunks_exact(cols).enumerate() {
                let to = self.perms[s].0.apply(self.base.plain_of(c as u32)) as usize;
                t[to * cols..(to + 1) * cols].copy_from_slice(row);
            }
            t
        };
        let (t_0, t_1) = (table(0), table(1));
        let start = Instant::now();
        let link = weight_matching::match_rows(&t_0, &t_1, cols)?;
        let link_seconds = start.elapsed().as_secs_f64();
        let (p0, p1) = (&self.perms[0].0, &self.perms[1].0);
        let linked_ok = link
            .guess
            .iter()
            .enumerate()
            .filter(|(c1, g)| **g == Some(p0.apply(p1.invert(*c1 as u32))))
            .count();
        Ok(Fact {
            what: "session linking: ids of session 1 mapped to session 0 by matching their embedding tables".into(),
            value: format!(
                "{:.2} % of the vocabulary in {:.1} s (no public weights needed)",
                100.0 * linked_ok as f64 / vocab as f64,
                link_seconds
            ),
        })
    }

    /// Re-key cost: the server keeps one body and, per session, tables whose rows moved.
    fn cost(&self) -> Result<Fact> {
        let n = self.labels.len();
        let cost = cost::bench_tables(&self.audit.cfg.encrypted, self.key, &self.labels)?;
        Ok(Fact {
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
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_overrides_and_id_orders() {
        let mut cfg = AuditConfig::new("enc.gguf", "out");
        cfg.budget = Budget::Quick;
        cfg.a4_tokens = Some(1000);
        let p = Plan::new(&cfg);
        assert_eq!((p.a2_targets, p.a4_tokens, p.a4_seconds), (256, 1000, 20.0));
        assert_eq!(Budget::Full.as_str(), "full");
        assert!(cfg.wants(Stage::A3));
        cfg.only = Some(vec![Stage::A1]);
        assert!(!cfg.wants(Stage::A3));
        assert_eq!(prioritized(vec![3, 1, 3, 9], 5, 3), vec![3, 1, 0]);
        assert_eq!(extend_order(&[4, 4, 7, 2], 5, 4), vec![4, 2, 0, 1]);
    }

    #[test]
    fn nothing_to_run_without_knowledge_is_an_error() {
        let e = AuditError::NothingToRun {
            skipped: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            e.to_string(),
            "no attack could run with the given knowledge (a; b)"
        );
    }
}
