//! `equicrypt serve`: the blind inference server (no key, no tokenizer) over HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use equicrypt_server::{Limits, ServerConfig};

/// Options of `equicrypt serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Encrypted GGUF model to serve.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on (loopback only unless --allow-remote).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Allow a non-loopback listen address.
    #[arg(long)]
    allow_remote: bool,
    /// Requests that may wait in the queue (more: 503 with Retry-After).
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Largest n_predict / max_tokens accepted.
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Lower the model's context window (bounds KV-cache memory).
    #[arg(long)]
    context: Option<usize>,
}

/// Runs the server until SIGTERM or ctrl-c, then shuts down gracefully (exit status 0).
pub fn run(a: &ServeArgs) -> Result<()> {
    let config = ServerConfig {
        model: a.model.clone(),
        listen: a.listen,
        allow_remote: a.allow_remote,
        limits: Limits {
            queue_capacity: a.queue,
            max_tokens: a.max_tokens,
            ..Limits::default()
        },
        context_length: a.context,
    };
    equicrypt_server::run_blocking(config)?;
    Ok(())
}
