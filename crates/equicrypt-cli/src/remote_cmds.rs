//! `chat` and `proxy`: the key holder's side of blind serving.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use equicrypt_client::remote::{Backend, BlindChat, GenerateParams, RemoteClient};
use equicrypt_client::ChatMessage;
use equicrypt_proxy::ProxyState;

use crate::keyfile;
use crate::session::ClientSide;

/// Which kind of server answers.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum BackendArg {
    /// `equicrypt serve`.
    Equicrypt,
    /// llama.cpp's `llama-server` (token-id prompts; start it with `--alias` holding the key
    /// fingerprint so the client can check it).
    Llamacpp,
    /// vLLM's OpenAI server on an encrypted transformers checkpoint (start it with
    /// `--skip-tokenizer-init --served-model-name <fingerprint>`).
    Vllm,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Equicrypt => Backend::Equicrypt,
            BackendArg::Llamacpp => Backend::LlamaCpp,
            BackendArg::Vllm => Backend::Vllm,
        }
    }
}

/// Arguments shared by `chat` and `proxy`.
#[derive(Args)]
pub struct RemoteArgs {
    /// Key file.
    #[arg(long)]
    pub key: PathBuf,
    /// Plaintext model whose tokenizer and chat template the client uses: a GGUF, or a
    /// transformers checkpoint directory.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Blind server URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Server kind.
    #[arg(long, value_enum, default_value = "equicrypt")]
    pub backend: BackendArg,
    /// Session label of the served model (written by `rekey`): ids use the session permutation.
    /// An equicrypt server reporting another session (or none) is refused before any prompt.
    #[arg(long)]
    pub session: Option<String>,
}

/// Arguments of `chat`.
#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// Maximum new tokens per answer.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the ciphertext ids the server saw and produced.
    #[arg(long)]
    show_ciphertext: bool,
    /// Send no stop ids (and ignore_eos): stop by watching the decrypted stream and dropping the
    /// connection (for models encrypted with --hide-special-ids).
    #[arg(long)]
    hide_stop_ids: bool,
}

/// Arguments of `proxy`.
#[derive(Args)]
pub struct ProxyArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// Address to listen on (loopback unless --allow-remote).
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Allow a non-loopback listen address (the proxy serves plaintext).
    #[arg(long)]
    allow_remote: bool,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Loads the client side and connects, checking the server's key fingerprint first.
async fn connect(
    a: &RemoteArgs,
) -> Result<(
    ClientSide,
    RemoteClient,
    equicrypt_core::KeyFingerprint,
    String,
)> {
    let key = keyfile::read(&a.key)?;
    let fingerprint = key.fingerprint();
    let client_side = ClientSide::load_session(&a.tokenizer, &key, a.session.as_deref())?;
    drop(key);
    let client =
        RemoteClient::new(&a.server, a.backend.into())?.expect_session(a.session.as_deref());
    let info = client
        .check_fingerprint(&fingerprint)
        .await
        .with_context(|| format!("server {}", a.server))?;
    Ok((client_side, client, fingerprint, info.id))
}

/// Runs `chat`: an interactive conversation through a blind server.
pub fn chat(a: &ChatArgs) -> Result<()> {
    runtime()?.block_on(async {
        let (side, client, fp, model) = connect(&a.remote).await?;
        let Some(template) = side.template.as_ref() else {
            bail!("the model has no chat template");
        };
        eprintln!(
            "connected to {} ({model}, key {fp}); /reset clears the history, /quit or Ctrl-D ends",
            a.remote.server
        );
        let blind = BlindChat::new(&side.cipher, &client);
        let mut history: Vec<ChatMessage> = Vec::new();
        let stdin = std::io::stdin();
        loop {
            eprint!("> ");
            let mut line = String::new();
            if stdin.lock().read_line(&mut line)? == 0 {
                break;
            }
            let line = line.trim();
            match line {
                "" => continue,
                "/quit" | "/exit" => break,
                "/reset" => {
                    history.clear();
                    continue;
                }
                _ => {}
            }
            history.push(ChatMessage::new("user", line));
            let prompt = template.render(&history, true)?;
            let params = GenerateParams {
                max_tokens: a.max_tokens,
                temperature: a.temperature,
                seed: a.seed,
                parse_special: true,
                render_special: false,
                hide_stop_ids: a.hide_stop_ids,
                ..GenerateParams::default()
            };
            let mut out = std::io::stdout();
            let result = blind
                .generate(&prompt, params, |text, _| {
                    let _ = out.write_all(text.as_bytes());
                    let _ = out.flush();
                })
                .await?;
            println!();
            if a.show_ciphertext {
                println!(
                    "[server saw {} prompt ids: {:?}]",
                    result.prompt_cipher_ids.len(),
                    result.prompt_cipher_ids
                );
                println!(
                    "[server produced {} ids: {:?}]",
                    result.cipher_ids.len(),
                    result.cipher_ids
                );
            }
            history.push(ChatMessage::new("assistant", result.text.trim()));
        }
        Ok(())
    })
}

/// Runs `generate --server`: one blind generation of `prompt` (through the chat template unless
/// `raw`), printed as it streams.
pub fn generate_once(
    a: &RemoteArgs,
    prompt: &str,
    raw: bool,
    params: GenerateParams,
    show_ciphertext: bool,
) -> Result<()> {
    runtime()?.block_on(async {
        let (side, client, _, _) = connect(a).await?;
        let text = side.prompt_text(prompt, raw)?;
        let blind = BlindChat::new(&side.cipher, &client);
        let mut out = std::io::stdout();
        let result = blind
            .generate(&text, params, |piece, _| {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            })
            .await
            .with_context(|| format!("server {}", a.server))?;
        println!();
        if show_ciphertext {
            println!(
                "ciphertext prompt ids ({}): {:?}",
                result.prompt_cipher_ids.len(),
                result.prompt_cipher_ids
            );
            println!(
                "ciphertext output ids ({}): {:?}",
                result.cipher_ids.len(),
                result.cipher_ids
            );
        }
        Ok(())
    })
}

/// Runs `proxy`: an OpenAI-compatible plaintext front on this machine.
pub fn proxy(a: &ProxyArgs) -> Result<()> {
    if !a.listen.ip().is_loopback() && !a.allow_remote {
        bail!(
            "refusing to listen on non-loopback address {} (the proxy serves plaintext; pass --allow-remote to override)",
            a.listen
        );
    }
    runtime()?.block_on(async {
        let (side, client, fingerprint, model_id) = connect(&a.remote).await?;
        let state = Arc::new(ProxyState {
            session: side.cipher,
            template: side.template,
            client,
            model_id,
            fingerprint,
        });
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("cannot listen on {}", a.listen))?;
        eprintln!(
            "proxy listening on http://{} -> blind server {} (key {})",
            listener.local_addr()?,
            a.remote.server,
            state.fingerprint
        );
        axum::serve(listener, equicrypt_proxy::router(state))
            .with_graceful_shutdown(equicrypt_server::shutdown_signal())
            .await
            .context("proxy failed")
    })
}
