//! `rekey`: per-session vocabulary re-keying of an encrypted model (see `equicrypt_model::rekey`).
//!
//! `equicrypt rekey --encrypted ENC --key K --session LABEL --out OUT [--force]` writes the session
//! model; `--bench N` instead builds N session tables in memory and reports the time per session
//! and the resident-memory growth of holding them all in one process.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use equicrypt_audit::cost::bench_tables;
use equicrypt_model::rekey_gguf;

use crate::keyfile;

/// Arguments of `rekey`.
#[derive(Args)]
pub struct RekeyArgs {
    /// Base encrypted GGUF (written by `encrypt`, not itself re-keyed).
    #[arg(long)]
    encrypted: PathBuf,
    /// Key file (the model's key).
    #[arg(long)]
    key: PathBuf,
    /// Session label: 1 to 64 printable ASCII characters without spaces; not secret, but stored
    /// in the session file.
    #[arg(long, required_unless_present = "bench")]
    session: Option<String>,
    /// Session model to write.
    #[arg(long, required_unless_present = "bench")]
    out: Option<PathBuf>,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
    /// Write nothing: build N session tables in memory (labels `LABEL-0` … or `bench-0` …),
    /// print the time per session and the resident-memory growth of holding all N.
    #[arg(long, value_name = "N", conflicts_with = "out")]
    bench: Option<usize>,
}

/// Runs `rekey`.
pub fn run(a: &RekeyArgs) -> Result<()> {
    let key = keyfile::read(&a.key)?;
    if let Some(n) = a.bench {
        return bench(a, &key, n);
    }
    let (Some(label), Some(out)) = (a.session.as_deref(), a.out.as_ref()) else {
        anyhow::bail!("--session and --out are required");
    };
    let r = rekey_gguf(&a.encrypted, &key, label, out, a.force)?;
    println!(
        "re-keyed session '{label}' -> {} (key {})",
        out.display(),
        r.fingerprint
    );
    println!(
        "re-key time:        {:.3} s for the per-session tables, {:.3} s for the whole file",
        r.table_seconds, r.seconds
    );
    println!(
        "per-session tables: {} bytes ({:.1} MB; every other tensor is shared with the base model)",
        r.table_bytes,
        r.table_bytes as f64 / 1e6
    );
    println!(
        "session file:       {} bytes ({:.1} MB, {} tensors)",
        r.file_bytes,
        r.file_bytes as f64 / 1e6,
        r.tensors
    );
    Ok(())
}

fn bench(a: &RekeyArgs, key: &equicrypt_core::SecretKey, n: usize) -> Result<()> {
    let prefix = a.session.as_deref().unwrap_or("bench");
    anyhow::ensure!(n > 0, "--bench needs at least one session");
    let labels: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let b = bench_tables(&a.encrypted, key, &labels)?;
    let mut sorted = b.seconds.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "base tables:        {} bytes ({}; vocabulary {})",
        b.base_bytes,
        b.tensors.join(", "),
        b.vocab
    );
    println!(
        "re-key time:        median {:.2} ms per session (min {:.2}, max {:.2}; {n} sessions)",
        b.median_seconds() * 1e3,
        sorted[0] * 1e3,
        sorted[n - 1] * 1e3
    );
    let per = b.bytes_per_session;
    println!(
        "per-session tables: {per} bytes ({:.1} MB)",
        per as f64 / 1e6
    );
    match b.rss_kb {
        Some((before, after)) => println!(
            "resident memory:    +{:.1} MB holding {n} session tables ({:.1} MB per session; VmRSS {:.1} -> {:.1} MB)",
            after.saturating_sub(before) as f64 / 1e3,
            after.saturating_sub(before) as f64 / 1e3 / n as f64,
            before as f64 / 1e3,
            after as f64 / 1e3
        ),
        None => println!("resident memory:    n/a (no /proc/self/status)"),
    }
    Ok(())
}
