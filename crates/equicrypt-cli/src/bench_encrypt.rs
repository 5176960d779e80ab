//! `bench-encrypt`: encryption time and peak memory on a synthetic transformers checkpoint of a
//! real model's shape (BF16 shards, pseudo-random weights). The encryption runs as its own
//! `equicrypt encrypt` process, which reports its peak RSS (`VmHWM`), so the checkpoint writer's
//! memory does not count. The page cache is warmed by one read of the shards first.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use equicrypt_model::synthetic::HfShape;

/// Arguments of `bench-encrypt`.
#[derive(Args)]
pub struct BenchEncryptArgs {
    /// Model shape: `1b` (Llama 3.2 1B, tied) or `7b` (Llama 2 7B, untied).
    #[arg(long, default_value = "1b")]
    shape: String,
    /// Working directory (the synthetic checkpoint is kept there and reused).
    #[arg(long)]
    dir: PathBuf,
    /// Largest shard, in bytes.
    #[arg(long, default_value_t = 2_000_000_000)]
    shard_bytes: u64,
}

/// The peak resident set size of this process (`VmHWM` of /proc/self/status), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs `bench-encrypt`.
pub fn run(a: &BenchEncryptArgs) -> Result<()> {
    let shape = match a.shape.as_str() {
        "1b" => HfShape::LLAMA_1B,
        "7b" => HfShape::LLAMA_7B,
        other => bail!("unknown shape '{other}' (expected 1b or 7b)"),
    };
    let plain = a.dir.join(format!("synthetic-{}", a.shape));
    if !plain.join("config.json").exists() {
        eprintln!(
            "writing the synthetic {} checkpoint to {}…",
            a.shape,
            plain.display()
        );
        let t = Instant::now();
        shape.write_checkpoint(&plain, a.shard_bytes)?;
        eprintln!("  written in {:.1} s", t.elapsed().as_secs_f64());
    }
    let mut total = 0u64;
    for e in std::fs::read_dir(&plain)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            // Warm the page cache (the goal is stated for a warm cache).
            total += std::io::copy(&mut std::fs::File::open(&p)?, &mut std::io::sink())?;
        }
    }
    let key = a.dir.join("bench.key");
    if !key.exists() {
        crate::keyfile::write_new(&key, &equicrypt_core::SecretKey::generate()?)?;
    }
    let out = a.dir.join(format!("encrypted-{}", a.shape));
    if out.exists() {
        std::fs::remove_dir_all(&out)
            .with_context(|| format!("cannot remove {}", out.display()))?;
    }
    let t = Instant::now();
    let o = Command::new(std::env::current_exe()?)
        .arg("encrypt")
        .arg("--key")
        .arg(&key)
        .arg("--model")
        .arg(&plain)
        .arg("--out")
        .arg(&out)
        .output()
        .context("cannot run equicrypt encrypt")?;
    let wall = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        bail!(
            "encrypt failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let rss: u64 = stdout
        .split("peak RSS ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|mb| mb.parse::<f64>().ok())
        .map(|mb| (mb * 1e6) as u64)
        .context("encrypt did not report its peak RSS")?;
    let largest = shape.largest_tensor_bytes();
    println!(
        "shape {}: {:.2} GB of BF16 tensors, largest tensor {:.0} MB",
        a.shape,
        total as f64 / 1e9,
        largest as f64 / 1e6
    );
    println!(
        "encrypt: {wall:.1} s wall ({:.0} MB/s), peak RSS {:.0} MB = {:.2} × the largest tensor",
        total as f64 / 1e6 / wall,
        rss as f64 / 1e6,
        rss as f64 / largest as f64
    );
    std::fs::remove_dir_all(&out).with_context(|| format!("cannot remove {}", out.display()))?;
    Ok(())
}
