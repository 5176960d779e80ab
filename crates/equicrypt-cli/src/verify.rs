//! `verify`: fidelity of an encrypted model against its plaintext original.
//!
//! Both models run the same tokens (plaintext ids for one, their ciphertext ids for the other);
//! the encrypted logits are mapped back through the vocabulary permutation and compared:
//! bit-identity, max |Δlogit|, top-1 agreement, KL(plain ‖ encrypted) and perplexity. Then both
//! generate greedily from chat prompts and the decrypted outputs are compared token for token.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use equicrypt_engine::{generate, Engine, SamplingParams};
use serde::{Deserialize, Serialize};

use equicrypt_core::{EngineKind, Exactness};

use crate::keyfile;
use crate::session::{load_encrypted, load_plain, ClientSide};

/// Built-in evaluation text (≈ 1,200 tokens of prose and code).
pub const EVAL_TEXT: &str = include_str!("../data/eval.txt");
/// Built-in chat prompts, one per line.
pub const PROMPTS: &str = include_str!("../data/prompts.txt");

/// Arguments of `verify`.
#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pair: crate::session::ModelPair,
    /// Text to score (default: built-in ≈1,200-token text).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Chat prompts, one per line (default: 20 built-in prompts).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Which engine runs both models: `equicrypt` (ours, candle), `llamacpp` (llama-cpp-python)
    /// or `transformers` (PyTorch CPU; `--plain` and `--encrypted` are checkpoint directories).
    #[arg(long, default_value = "equicrypt")]
    engine: String,
    /// Plaintext model whose tokenizer and chat template the client uses: a GGUF, or a
    /// transformers checkpoint directory (default: `--plain`).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// ONNX models (`--plain M.onnx --encrypted DIR`): directory of `<input name>.npy` files,
    /// one row per input along axis 0. `--engine` is then `tract` or `onnxruntime`.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// ONNX models: integer class labels (`.npy`), one per input, for accuracy.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// ONNX models with `--engine onnxruntime`: also measure throughput, plain vs encrypted,
    /// in 5 interleaved rounds of about this many seconds each.
    #[arg(long)]
    bench: Option<f64>,
}

/// Logit-level comparison over a text.
#[derive(Debug, Default, Serialize, Deserialize, Clone)]
pub struct LogitReport {
    /// Positions compared.
    pub tokens: usize,
    /// Positions whose whole logit row was bit-identical.
    pub bit_identical_rows: usize,
    /// Largest |plain − decrypted encrypted| logit difference.
    pub max_abs_logit_diff: f64,
    /// Fraction of positions with the same argmax.
    pub top1_agreement: f64,
    /// Mean KL(plain ‖ encrypted), nats.
    pub mean_kl: f64,
    /// Largest KL over positions.
    pub max_kl: f64,
    /// Perplexity of the plaintext model on the text.
    pub perplexity_plain: f64,
    /// Perplexity of the encrypted model on the (encrypted) text.
    pub perplexity_encrypted: f64,
}

/// Accumulates [`LogitReport`] one position at a time.
#[derive(Default)]
pub struct LogitComparer {
    r: LogitReport,
    top1_same: usize,
    kl_sum: f64,
    nll_plain: f64,
    nll_enc: f64,
    scored: usize,
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

impl LogitComparer {
    /// Adds one position: plaintext logits, encrypted logits already mapped to plaintext order,
    /// and the true next token (plaintext id) when known.
    pub fn add(&mut self, plain: &[f32], dec: &[f32], next: Option<u32>) {
        self.r.tokens += 1;
        if plain
            .iter()
            .zip(dec)
            .all(|(a, b)| a.to_bits() == b.to_bits())
        {
            self.r.bit_identical_rows += 1;
        }
        let diff = plain
            .iter()
            .zip(dec)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .fold(0.0, f64::max);
        self.r.max_abs_logit_diff = self.r.max_abs_logit_diff.max(diff);
        if argmax(plain) == argmax(dec) {
            self.top1_same += 1;
        }
        let (lp, lq) = (log_softmax(plain), log_softmax(dec));
        let kl: f64 = lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum();
        let kl = kl.max(0.0);
        self.kl_sum += kl;
        self.r.max_kl = self.r.max_kl.max(kl);
        if let Some(n) = next {
            self.nll_plain -= lp[n as usize];
            self.nll_enc -= lq[n as usize];
            self.scored += 1;
        }
    }

    /// The final report.
    pub fn finish(mut self) -> LogitReport {
        let n = self.r.tokens.max(1) as f64;
        self.r.top1_agreement = self.top1_same as f64 / n;
        self.r.mean_kl = self.kl_sum / n;
        let s = self.scored.max(1) as f64;
        self.r.perplexity_plain = (self.nll_plain / s).exp();
        self.r.perplexity_encrypted = (self.nll_enc / s).exp();
        self.r
    }
}

/// Greedy generation comparison.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct GenerationReport {
    /// Prompts run.
    pub prompts: usize,
    /// Prompts whose decrypted encrypted output equals the plaintext output token for token.
    pub identical: usize,
    /// Fraction of generated positions that agree before the first divergence, over all prompts.
    pub token_agreement: f64,
    /// First prompt's plaintext answer, for the eye.
    pub sample_answer: String,
}

/// The whole `verify` report.
#[derive(Debug, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Engine that produced it.
    pub engine: String,
    /// How the engine was built (llama.cpp's system info), when it reports it.
    #[serde(default)]
    pub engine_build: String,
    /// The CPU this ran on and its vector extensions.
    #[serde(default)]
    pub host: String,
    /// What the mode promises on this engine (`bit-identical logits` or `equal up to rounding`).
    #[serde(default)]
    pub promised: String,
    /// Encryption mode of the model.
    #[serde(default)]
    pub mode: String,
    /// Logit comparison.
    pub logits: LogitReport,
    /// Generation comparison.
    pub generation: GenerationReport,
}

/// Runs `verify`.
pub fn run(a: &VerifyArgs) -> Result<()> {
    let key = keyfile::read(&a.pair.key)?;
    if crate::onnx_cmds::is_onnx(&a.pair.plain) {
        let Some(inputs) = &a.inputs else {
            bail!("verify on an ONNX model needs --inputs DIR (one <input name>.npy per input)");
        };
        let engine = if a.engine == "equicrypt" {
            "tract"
        } else {
            a.engine.as_str()
        };
        return crate::onnx_cmds::verify(
            &key,
            &crate::onnx_cmds::OnnxVerifyArgs {
                plain: &a.pair.plain,
                encrypted: &a.pair.encrypted,
                inputs,
                labels: a.labels.as_ref(),
                engine,
                json: a.json.as_ref(),
                bench: a.bench,
            },
        );
    }
    let client = ClientSide::load(a.tokenizer.as_ref().unwrap_or(&a.pair.plain), &key)?;
    let (mode, k_quants) = if a.engine == "transformers" {
        let ck = equicrypt_model::hf::HfCheckpoint::open(&a.pair.encrypted)?;
        let info = ck.encrypted_info()?;
        info.check_key(&key)?;
        (info.mode, false)
    } else {
        let f = equicrypt_model::GgufFile::open(&a.pair.encrypted)?;
        let k_quants = f.tensors.iter().any(|t| {
            equicrypt_model::quant::BlockFormat::of(t.dtype).is_ok_and(|b| b.is_k_quant())
        });
        (
            equicrypt_model::EncryptedModelInfo::read(&f)?.mode,
            k_quants,
        )
    };
    let text = match &a.text {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?
        }
        None => EVAL_TEXT.to_string(),
    };
    let prompts_text = match &a.prompts {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?
        }
        None => PROMPTS.to_string(),
    };
    let prompts: Vec<&str> = prompts_text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();

    let tok = client.cipher.tokenizer();
    // Like llama.cpp's `llama_tokenize(add_special = true)`: BOS first when the model asks for it.
    let mut ids = tok.encode(&text, false)?;
    if let (true, Some(bos)) = (tok.add_bos_token(), tok.bos_id()) {
        ids.insert(0, bos);
    }
    if ids.len() < 2 {
        bail!("the evaluation text is too short ({} tokens)", ids.len());
    }
    let engine = match a.engine.as_str() {
        "equicrypt" => EngineKind::Equicrypt,
        "llamacpp" => EngineKind::LlamaCppPortable,
        "transformers" => EngineKind::Transformers,
        other => bail!("unknown engine '{other}' (expected equicrypt, llamacpp or transformers)"),
    };
    let mut report = match engine {
        EngineKind::LlamaCppPortable | EngineKind::Transformers => {
            run_stock(a, engine, &client, &ids, &prompts, mode.as_str())?
        }
        _ => run_ours(a, &key, &client, &ids, &prompts, mode.as_str())?,
    };
    let promise = mode.exactness_on_file(engine, k_quants);
    report.host = host_kind();
    report.promised = promise.describe().to_string();
    print_report(&report);
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    let l = &report.logits;
    if promise == Exactness::BitIdentical && l.bit_identical_rows != l.tokens {
        bail!(
            "mode {} promises bit-identical logits on {} but {} of {} rows differ (max |Δlogit| {:.3e}) on this host ({})",
            mode.as_str(),
            engine.name(),
            l.tokens - l.bit_identical_rows,
            l.tokens,
            l.max_abs_logit_diff,
            report.host
        );
    }
    Ok(())
}

/// The CPU model and the vector extensions that decide which kernels run (from /proc/cpuinfo).
fn host_kind() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let model = field("model name");
    let flags = field("flags");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let ext: Vec<&str> = [
        ("avx2", "AVX2"),
        ("avx512f", "AVX-512"),
        ("avx512_vnni", "AVX-512 VNNI"),
        ("amx_tile", "AMX"),
    ]
    .into_iter()
    .filter(|(f, _)| has(f))
    .map(|(_, n)| n)
    .collect();
    format!(
        "{} {}; {}",
        std::env::consts::ARCH,
        if model.is_empty() {
            "(unknown CPU)"
        } else {
            &model
        },
        if ext.is_empty() {
            "no AVX2".to_string()
        } else {
            ext.join(", ")
        }
    )
}

/// Chat-templated plaintext ids of every prompt.
fn prompt_ids(client: &ClientSide, prompts: &[&str]) -> Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .map(|p| {
            let text = client.prompt_text(p, false)?;
            Ok(client.cipher.tokenizer().encode(&text, true)?)
        })
        .collect()
}

/// Runs both models in a stock engine (llama.cpp through `scripts/llamacpp_eval.py`,
/// transformers through `scripts/transformers_eval.py`). The job file holds the vocabulary
/// permutation (secret), so it is created 0600 in a private temporary directory that is removed
/// afterwards.
fn run_stock(
    a: &VerifyArgs,
    engine: EngineKind,
    client: &ClientSide,
    ids: &[u32],
    prompts: &[&str],
    mode: &str,
) -> Result<VerifyReport> {
    let perm = client.cipher.permutation();
    let prompts: Vec<serde_json::Value> = prompt_ids(client, prompts)?
        .into_iter()
        .map(|p| {
            let c = client.cipher.encrypt_ids(&p)?;
            Ok(serde_json::json!({"ids": p, "cipher_ids": c}))
        })
        .collect::<Result<_>>()?;
    let job = serde_json::json!({
        "ids": ids,
        "cipher_ids": client.cipher.encrypt_ids(ids)?,
        "perm": perm.0.forward(),
        "prompts": prompts,
        "gen_tokens": a.gen_tokens,
        "stop_plain": client.cipher.tokenizer().eog_ids(),
        "stop_cipher": client.cipher.eog_cipher_ids()?,
        "threads": std::env::var("RAYON_NUM_THREADS").ok().and_then(|t| t.parse::<usize>().ok()).unwrap_or(2),
    });
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let job_path = dir.path().join("job.json");
    {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let mut f = o.open(&job_path).context("cannot create the job file")?;
        std::io::Write::write_all(&mut f, serde_json::to_string(&job)?.as_bytes())?;
    }
    let scripts = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/");
    let (python, script) = match engine {
        EngineKind::Transformers => (crate::fetch::hf_python(), "transformers_eval.py"),
        _ => (PathBuf::from("python3"), "llamacpp_eval.py"),
    };
    eprintln!("running both models in {}…", engine.name());
    let out = std::process::Command::new(&python)
        .arg(format!("{scripts}{script}"))
        .arg("--plain")
        .arg(&a.pair.plain)
        .arg("--encrypted")
        .arg(&a.pair.encrypted)
        .arg("--job")
        .arg(&job_path)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {} scripts/{script}", python.display()))?;
    if !out.status.success() {
        bail!("{} evaluation failed ({})", engine.name(), out.status);
    }
    let mut r: VerifyReport = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} evaluation printed no report", engine.name()))?;
    r.mode = mode.to_string();
    Ok(r)
}

fn run_ours(
    a: &VerifyArgs,
    key: &equicrypt_core::SecretKey,
    client: &ClientSide,
    ids: &[u32],
    prompts: &[&str],
    mode: &str,
) -> Result<VerifyReport> {
    let mut enc = load_encrypted(&a.pair.encrypted, key)?;
    let mut plain = load_plain(&a.pair.plain)?;
    let tok = client.cipher.tokenizer();
    let n = ids.len().min(plain.context_length());
    let ids = &ids[..n];
    let cipher = client.cipher.encrypt_ids(ids)?;
    eprintln!("scoring {n} tokens with both models…");
    let vocab = plain.vocab_size();
    let mut plain_rows = Vec::with_capacity(n * vocab);
    plain.reset();
    plain.forward_chunked(ids, 256, &mut |_, row| plain_rows.extend_from_slice(row))?;
    let perm = client.cipher.permutation();
    let mut cmp = LogitComparer::default();
    let mut dec = vec![0f32; vocab];
    enc.reset();
    enc.forward_chunked(&cipher, 256, &mut |i, row| {
        for (p, d) in dec.iter_mut().enumerate() {
            *d = row[perm.0.apply(p as u32) as usize];
        }
        let next = ids.get(i + 1).copied();
        cmp.add(&plain_rows[i * vocab..(i + 1) * vocab], &dec, next);
    })?;
    let logits = cmp.finish();

    eprintln!("greedy generation on {} prompts…", prompts.len());
    let mut identical = 0;
    let (mut agree, mut total) = (0usize, 0usize);
    let mut sample_answer = String::new();
    let stop_plain = tok.eog_ids().to_vec();
    let stop_enc = client.cipher.eog_cipher_ids()?;
    let greedy = SamplingParams::greedy();
    for (k, pids) in prompt_ids(client, prompts)?.into_iter().enumerate() {
        plain.reset();
        let g_plain = generate(
            &mut plain,
            &pids,
            a.gen_tokens,
            &greedy,
            &stop_plain,
            |_| true,
        )?;
        enc.reset();
        let cids = client.cipher.encrypt_ids(&pids)?;
        let g_enc = generate(&mut enc, &cids, a.gen_tokens, &greedy, &stop_enc, |_| true)?;
        let d = client.cipher.decrypt_ids(&g_enc.tokens)?;
        if d == g_plain.tokens {
            identical += 1;
        }
        let common = d
            .iter()
            .zip(&g_plain.tokens)
            .take_while(|(x, y)| x == y)
            .count();
        agree += common;
        total += g_plain.tokens.len().max(d.len());
        if k == 0 {
            sample_answer = tok.decode(&g_plain.tokens)?;
        }
    }
    Ok(VerifyReport {
        engine: "equicrypt (candle)".into(),
        engine_build: String::new(),
        host: String::new(),
        promised: String::new(),
        mode: mode.to_string(),
        logits,
        generation: GenerationReport {
            prompts: prompts.len(),
            identical,
            token_agreement: if total == 0 {
                1.0
            } else {
                agree as f64 / total as f64
            },
            sample_answer,
        },
    })
}

fn print_report(r: &VerifyReport) {
    let l = &r.logits;
    println!("engine: {}   mode: {}", r.engine, r.mode);
    if !r.engine_build.is_empty() {
        println!("engine build:           {}", r.engine_build);
    }
    println!("host:                   {}", r.host);
    println!("promised here:          {}", r.promised);
    println!("tokens scored:          {}", l.tokens);
    println!(
        "bit-identical rows:     {} / {}",
        l.bit_identical_rows, l.tokens
    );
    println!("max |Δlogit|:           {:.3e}", l.max_abs_logit_diff);
    println!("top-1 agreement:        {:.2} %", 100.0 * l.top1_agreement);
    println!(
        "KL mean / max:          {:.3e} / {:.3e}",
        l.mean_kl, l.max_kl
    );
    println!(
        "perplexity plain/enc:   {:.4} / {:.4}",
        l.perplexity_plain, l.perplexity_encrypted
    );
    let g = &r.generation;
    println!(
        "greedy identical:       {} / {} prompts",
        g.identical, g.prompts
    );
    println!("greedy token agreement: {:.2} %", 100.0 * g.token_agreement);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_rows_score_perfectly() {
        let mut c = LogitComparer::default();
        let row = [1.0f32, 2.0, 3.0];
        c.add(&row, &row, Some(2));
        let r = c.finish();
        assert_eq!(r.bit_identical_rows, 1);
        assert_eq!(r.max_abs_logit_diff, 0.0);
        assert_eq!(r.top1_agreement, 1.0);
        assert!(r.mean_kl.abs() < 1e-12);
        assert!((r.perplexity_plain - r.perplexity_encrypted).abs() < 1e-12);
    }

    #[test]
    fn differences_are_measured() {
        let mut c = LogitComparer::default();
        c.add(&[0.0, 1.0], &[1.0, 0.0], Some(1));
        let r = c.finish();
        assert_eq!(r.bit_identical_rows, 0);
        assert_eq!(r.max_abs_logit_diff, 1.0);
        assert_eq!(r.top1_agreement, 0.0);
        // KL between softmax([0,1]) and softmax([1,0]) = (p1 - p0) * 1 = tanh(0.5).
        assert!((r.mean_kl - 0.5f64.tanh()).abs() < 1e-9, "{}", r.mean_kl);
        assert!(r.perplexity_encrypted > r.perplexity_plain);
    }
}
