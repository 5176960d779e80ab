//! `audit`: the attack lab (`equicrypt_audit::run`). This module only turns the arguments into
//! an [`AuditConfig`], runs it and prints the summary; see THREAT_MODEL.md for what the numbers
//! mean.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use equicrypt_audit::{run_audit, AuditConfig, Budget, Stage};

use crate::keyfile;

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
            budget: self.budget,
            only: self.only.clone(),
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
