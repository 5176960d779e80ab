//! `bench`: decode throughput of the encrypted vs the plaintext model in one run (interleaved
//! rounds, medians), encryption time, and optionally llama.cpp's plaintext decode speed on the
//! same file (through `scripts/llamacpp_bench.py`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use equicrypt_engine::{Engine, LlamaModel, Sampler, SamplingParams};
use equicrypt_model::{encrypt_gguf, EncryptOptions};
use serde::Serialize;

use crate::keyfile;
use crate::session::{load_encrypted, load_plain, ClientSide};

/// Arguments of `bench`.
#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pair: crate::session::ModelPair,
    /// Tokens decoded per round.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Rounds per model (interleaved).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Also time llama.cpp (llama-cpp-python) decoding the plaintext file.
    #[arg(long)]
    llamacpp: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct BenchReport {
    threads: String,
    tokens_per_round: usize,
    rounds: usize,
    plain_decode_tok_s: f64,
    encrypted_decode_tok_s: f64,
    encrypted_over_plain: f64,
    llamacpp_decode_tok_s: Option<f64>,
    ours_over_llamacpp: Option<f64>,
    encrypt_seconds_median: f64,
    encrypt_seconds_min: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Greedy decode of `n` tokens after `prompt`; returns decode tokens per second.
fn decode_rate(m: &mut LlamaModel, prompt: &[u32], n: usize) -> Result<f64> {
    m.reset();
    let mut sampler = Sampler::new(SamplingParams::greedy())?;
    let mut logits = m.forward(prompt)?;
    let t = Instant::now();
    for _ in 0..n {
        let id = sampler.sample(&logits)?;
        logits = m.forward(&[id])?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Runs [`decode_rate`] in a child process (`equicrypt bench-decode`) and returns its tok/s.
fn decode_rate_in_child(model: &std::path::Path, prompt: &[u32], n: usize) -> Result<f64> {
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let out = Command::new(std::env::current_exe().context("cannot find the equicrypt binary")?)
        .arg("bench-decode")
        .arg("--model")
        .arg(model)
        .args(["--tokens", &n.to_string(), "--prompt-ids", &ids.join(",")])
        .output()
        .context("cannot start the benchmark child process")?;
    if !out.status.success() {
        bail!(
            "benchmark child failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("benchmark child printed no rate")
}

/// `equicrypt bench-decode` (hidden): load one model, decode, print tokens per second.
pub fn decode_child(model: &std::path::Path, prompt_ids: &str, n: usize) -> Result<()> {
    let prompt: Vec<u32> = prompt_ids
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .context("--prompt-ids must be comma-separated integers")
        })
        .collect::<Result<_>>()?;
    let mut m =
        LlamaModel::load(model).with_context(|| format!("cannot load {}", model.display()))?;
    decode_rate(&mut m, &prompt, 4)?; // warm-up
    println!("{}", decode_rate(&mut m, &prompt, n)?);
    Ok(())
}

/// Runs `bench`.
pub fn run(a: &BenchArgs) -> Result<()> {
    if a.rounds == 0 || a.tokens == 0 {
        bail!("--rounds and --tokens must be at least 1");
    }
    let key = keyfile::read(&a.pair.key)?;
    let client = ClientSide::load(&a.pair.plain, &key)?;
    // Both files must be what they claim (and the key must match) before timing anything.
    drop(load_encrypted(&a.pair.encrypted, &key)?);
    drop(load_plain(&a.pair.plain)?);
    let text = client.prompt_text("Tell me a long story about a lighthouse.", false)?;
    let prompt = client.cipher.tokenizer().encode(&text, true)?;
    let cprompt = client.cipher.encrypt_ids(&prompt)?;
    let (mut p, mut e, mut l) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..a.rounds {
        eprintln!("round {}/{}", r + 1, a.rounds);
        // Every measurement runs in a fresh process: within one process the model loaded first
        // decodes ~10 % faster (memory placement), which would bias the ratio. The order
        // alternates (ABBA…) so that running second falls on both models equally.
        if r % 2 == 0 {
            p.push(decode_rate_in_child(&a.pair.plain, &prompt, a.tokens)?);
            e.push(decode_rate_in_child(&a.pair.encrypted, &cprompt, a.tokens)?);
        } else {
            e.push(decode_rate_in_child(&a.pair.encrypted, &cprompt, a.tokens)?);
            p.push(decode_rate_in_child(&a.pair.plain, &prompt, a.tokens)?);
        }
        if a.llamacpp {
            l.push(llamacpp_rate(a, &prompt)?);
        }
    }
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut enc_times = Vec::new();
    for i in 0..a.rounds {
        let out = dir.path().join(format!("e{i}.gguf"));
        let r = encrypt_gguf(&key, &a.pair.plain, &out, &EncryptOptions::default())?;
        enc_times.push(r.seconds);
        std::fs::remove_file(out)?;
    }
    let pm = median(&mut p);
    let em = median(&mut e);
    let lm = (!l.is_empty()).then(|| median(&mut l));
    let report = BenchReport {
        threads: std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into()),
        tokens_per_round: a.tokens,
        rounds: a.rounds,
        plain_decode_tok_s: pm,
        encrypted_decode_tok_s: em,
        encrypted_over_plain: em / pm,
        llamacpp_decode_tok_s: lm,
        ours_over_llamacpp: lm.map(|l| pm / l),
        encrypt_seconds_min: enc_times.iter().copied().fold(f64::INFINITY, f64::min),
        encrypt_seconds_median: median(&mut enc_times),
    };
    println!("threads (RAYON_NUM_THREADS): {}", report.threads);
    println!(
        "plain decode:      {:.1} tok/s (median of {})",
        pm, a.rounds
    );
    println!("encrypted decode:  {:.1} tok/s", em);
    println!("encrypted ÷ plain: {:.3}", report.encrypted_over_plain);
    if let (Some(l), Some(r)) = (lm, report.ours_over_llamacpp) {
        println!("llama.cpp plain:   {:.1} tok/s", l);
        println!("ours ÷ llama.cpp:  {:.3}", r);
    }
    println!(
        "encrypt time:      {:.3} s median, {:.3} s min",
        report.encrypt_seconds_median, report.encrypt_seconds_min
    );
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

fn llamacpp_rate(a: &BenchArgs, prompt: &[u32]) -> Result<f64> {
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "2".into());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/llamacpp_bench.py"
    );
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let out = Command::new("python3")
        .arg(script)
        .arg("--model")
        .arg(&a.pair.plain)
        .args(["--tokens", &a.tokens.to_string(), "--threads", &threads])
        .args(["--prompt-ids", &ids.join(",")])
        .output()
        .context("cannot run python3 scripts/llamacpp_bench.py")?;
    if !out.status.success() {
        bail!(
            "llama.cpp benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("llama.cpp benchmark printed no JSON")?;
    v["decode_tok_s"]
        .as_f64()
        .context("llama.cpp benchmark JSON lacks decode_tok_s")
}
