//! `audit`: the attack lab (`equicrypt_audit::run`). This module only turns the arguments into
//! an [`AuditConfig`], runs it and prints the summary; see THREAT_MODEL.md for what the numbers
//! mean.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use equicrypt_audit::{run_audit, AuditConfig};

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

impl From<Budget> for equicrypt_audit::Budget {
    fn from(b: Budget) -> Self {
        match b {
            Budget::Quick => Self::Quick,
            Budget::Standard => Self::Standard,
            Budget::Full => Self::Full,
        }
    }
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

impl From<Stage> for equicrypt_audit::Stage {
    fn from(s: Stage) -> Self {
        match s {
            Stage::A1 => Self::A1,
            Stage::Rotation => Self::Rotation,
            Stage::A2 => Self::A2,
            Stage::A3 => Self::A3,
            Stage::A4 => Self::A4,
            Stage::Rekey => Self::Rekey,
            Stage::Special => Self::Special,
        }
    }
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

impl AuditArgs {
    /// The library's configuration: the key read from its file, the held-out text and prompts
    /// from `data/`, and this process's command line for the report.
    fn config(&self) -> Result<AuditConfig> {
        let key = match &self.key {
            Some(p) => Some(keyfile::read(p)?),
            None => None,
        };
        Ok(AuditConfig {
            encrypted: self.encrypted.clone(),
            public: self.public.clone(),
            tokenizer: self.tokenizer.clone(),
            traffic: self.traffic.clone(),
            key,
            corpus: self.corpus.clone(),
            out: self.out.clone(),
            budget: self.budget.into(),
            only: self
                .only
                .as_ref()
                .map(|o| o.iter().map(|&s| s.into()).collect()),
            a2_targets: self.a2_targets,
            a2_candidates: self.a2_candidates,
            a3_seconds: self.a3_seconds,
            a4_tokens: self.a4_tokens,
            traffic_tokens: self.traffic_tokens,
            sessions: self.sessions,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            eval_text: crate::verify::EVAL_TEXT.to_string(),
            prompts: crate::verify::PROMPTS.to_string(),
        })
    }
}

/// Runs `audit`.
pub fn run(a: &AuditArgs) -> Result<()> {
    let report = run_audit(&a.config()?)?;
    print!("{}", report.summary());
    println!("report: {}", a.out.join("report.md").display());
    Ok(())
}
