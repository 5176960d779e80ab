//! `audit`: runs the attacks the given knowledge allows and scores them with the key.
//!
//! Implemented: A1 (weight matching against the public base model). The key is read only to
//! score the attacks, never by them.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use equicrypt_audit::weight_matching;
use equicrypt_core::VocabPermutation;
use serde::Serialize;

use crate::keyfile;
use crate::session::ClientSide;
use crate::verify::{EVAL_TEXT, PROMPTS};

/// Arguments of `audit`.
#[derive(Args)]
pub struct AuditArgs {
    /// The encrypted model (what the server holds).
    #[arg(long)]
    encrypted: PathBuf,
    /// The public base model, if the attacker has it (enables A1).
    #[arg(long)]
    public: Option<PathBuf>,
    /// Key file, used only to score the attacks.
    #[arg(long)]
    key: PathBuf,
    /// Output directory for report.md and report.json.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Serialize)]
struct AttackResult {
    attack: &'static str,
    knowledge: &'static str,
    vocab_recovered: f64,
    prompt_tokens_recovered: f64,
    attacker_seconds: f64,
    notes: String,
}

/// Runs `audit`.
pub fn run(a: &AuditArgs) -> Result<()> {
    let key = keyfile::read(&a.key)?;
    let f = equicrypt_model::GgufFile::open(&a.encrypted)?;
    equicrypt_model::EncryptedModelInfo::read(&f)?.check_key(&key)?;
    drop(f);
    let mut results = Vec::new();
    match &a.public {
        None => eprintln!(
            "no --public model: A1 (weight matching) needs the public base weights; skipped"
        ),
        Some(public) => {
            eprintln!(
                "A1: sorted-row matching of embedding rows against {}…",
                public.display()
            );
            let m = weight_matching::attack(public, &a.encrypted)?;
            let vocab = m.guess.len();
            let perm = VocabPermutation::derive(&key, vocab);
            let plain_of: Vec<u32> = (0..vocab as u32).map(|c| perm.0.invert(c)).collect();
            let client = ClientSide::load(public, &key)?;
            let mut tokens = client.cipher.tokenizer().encode(EVAL_TEXT, false)?;
            for p in PROMPTS.lines().filter(|l| !l.trim().is_empty()) {
                let text = client.prompt_text(p, false)?;
                tokens.extend(client.cipher.tokenizer().encode(&text, true)?);
            }
            let (v, t) = weight_matching::score(&m.guess, &plain_of, perm.0.forward(), &tokens);
            results.push(AttackResult {
                attack: "A1 weight matching (sorted embedding rows)",
                knowledge: "encrypted file + public base weights",
                vocab_recovered: v,
                prompt_tokens_recovered: t,
                attacker_seconds: m.seconds,
                notes: format!(
                    "{} ids matched uniquely, {} ambiguous (identical public rows); {} held-out tokens",
                    m.unique,
                    m.ambiguous,
                    tokens.len()
                ),
            });
        }
    }
    if results.is_empty() {
        bail!("no attack could run with the given knowledge (pass --public)");
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let json = serde_json::to_string_pretty(&results)?;
    std::fs::write(a.out.join("report.json"), json)?;
    let mut md = String::from(
        "# equicrypt audit\n\n| attack | knowledge | vocabulary recovered | prompt tokens recovered | attacker time |\n|---|---|---|---|---|\n",
    );
    for r in &results {
        md.push_str(&format!(
            "| {} | {} | {:.2} % | {:.2} % | {:.2} s |\n",
            r.attack,
            r.knowledge,
            100.0 * r.vocab_recovered,
            100.0 * r.prompt_tokens_recovered,
            r.attacker_seconds
        ));
    }
    for r in &results {
        md.push_str(&format!("\n- {}: {}\n", r.attack, r.notes));
    }
    std::fs::write(a.out.join("report.md"), &md)?;
    print!("{md}");
    Ok(())
}
