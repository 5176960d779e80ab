//! The blind inference server: ciphertext token ids in, ciphertext token ids out.
//!
//! The server holds **no key and no tokenizer**: it loads an encrypted GGUF model and runs it on the
//! ids it is sent. It never logs token ids or request bodies — only counts, timings and statuses.
//!
//! # Endpoints
//!
//! | route | |
//! |---|---|
//! | `POST /completion` (alias `/completions`) | llama.cpp shape ([`equicrypt_protocol::CompletionRequest`]); `stream: true` gives server-sent events |
//! | `POST /v1/completions` | OpenAI shape, ids in `choices[0].tokens`; streams end with `data: [DONE]` |
//! | `GET /v1/models` | the served model: id (file stem), key fingerprint, mode, session label of a re-keyed file, vocabulary, context |
//! | `GET /health` | `{"status":"ok"}` |
//! | `GET /metrics` | Prometheus text |
//!
//! Every error is JSON ([`equicrypt_protocol::ErrorBody`]): 400 for bad input (wrong types, unknown
//! fields, empty prompt, ids ≥ vocabulary, prompt ≥ context, `n_predict` above the server limit,
//! non-finite temperature, `top_p` outside (0, 1], …), 413 for a body above the size cap, 404/405 for
//! unknown routes or methods, 503 `server_busy` with `Retry-After: 1` when the queue is full, 503
//! `shutting_down` while stopping, 500 `internal_error` only for engine failures (never expected).
//!
//! # Generation semantics
//!
//! - `n_predict: -1` means the server's `max_tokens`; above `max_tokens` is a 400.
//! - `prompt + n_predict` beyond the context is **clipped**: generation stops when the context is
//!   full, with `stop_type: "limit"` (`finish_reason: "length"`), like llama.cpp.
//! - A sampled stop id or the model's EOS (GGUF `tokenizer.ggml.eos_token_id`, a ciphertext id in an
//!   encrypted file) ends generation with `stop_type: "eos"` / `finish_reason: "stop"` and is not
//!   returned. `ignore_eos: true` leaves the EOS out (only `stop_ids` stop): for clients that
//!   send no stop ids and stop the stream themselves; a file written with
//!   `encrypt --hide-special-ids` has no EOS at all.
//! - The ids are exactly those of [`equicrypt_engine::generate`] with the same parameters and
//!   `stop_ids` plus EOS.
//! - `n_probs`: the top alternatives come from a log-softmax of the *sampling* logits (after the
//!   repetition penalty, divided by the temperature when it is positive).
//!
//! # Concurrency
//!
//! One worker thread owns the engine and runs jobs one at a time from a bounded FIFO queue
//! ([`Limits::queue_capacity`] waiting jobs). A client that disconnects cancels its job: the worker
//! checks after every token. On shutdown the server stops accepting connections, answers queued jobs
//! with 503, lets the running job finish, and returns.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod api;
pub mod error;
mod metrics;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::JoinHandle;

use equicrypt_engine::{Engine, LlamaModel};
use equicrypt_model::{EncryptedModelInfo, GgufFile};
use tokio::net::TcpListener;

pub use api::router;
pub use error::{ApiError, ServerError};

/// Limits of one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Jobs that may wait in the queue (besides the running one); at least 1. Default 16.
    pub queue_capacity: usize,
    /// Largest `n_predict` / `max_tokens` accepted; `n_predict: -1` means this. Default 2048.
    pub max_tokens: usize,
    /// Largest request body in bytes (larger: 413). Default 1 MiB.
    pub max_body_bytes: usize,
    /// Largest `n_probs` accepted (also capped by the vocabulary size). Default 100.
    pub max_n_probs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue_capacity: 16,
            max_tokens: 2048,
            max_body_bytes: 1 << 20,
            max_n_probs: 100,
        }
    }
}

/// Everything [`serve`] needs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The (encrypted) GGUF model to serve.
    pub model: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Allow a non-loopback listen address.
    pub allow_remote: bool,
    /// Request and queue limits.
    pub limits: Limits,
    /// Lower the model's context window (bounds the KV cache's memory).
    pub context_length: Option<usize>,
}

impl ServerConfig {
    /// A configuration with default limits.
    pub fn new(model: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Self {
            model: model.into(),
            listen,
            allow_remote: false,
            limits: Limits::default(),
            context_length: None,
        }
    }
}

/// What the server tells clients about its model (read from the GGUF metadata, never a key).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelMeta {
    /// Model id: the file stem.
    pub id: String,
    /// `equicrypt.key_fingerprint`, if the file is an encrypted model.
    pub key_fingerprint: Option<String>,
    /// Encryption mode (`perm-exact` / `perm-full`), if encrypted.
    pub encryption_mode: Option<String>,
    /// Session label of a re-keyed model (`equicrypt.session`), if the file is one.
    pub session: Option<String>,
    /// `tokenizer.ggml.eos_token_id` (a ciphertext id in an encrypted model): always stops.
    pub eos_id: Option<u32>,
}

impl ModelMeta {
    /// Reads the metadata of a GGUF file. A plaintext model is accepted (no fingerprint).
    pub fn read(path: &Path) -> Result<Self, ServerError> {
        let f = GgufFile::open(path).map_err(|e| ServerError::Model(e.to_string()))?;
        let info = EncryptedModelInfo::read(&f).ok();
        let eos_id = f
            .meta_u64("tokenizer.ggml.eos_token_id")
            .ok()
            .and_then(|v| u32::try_from(v).ok());
        Ok(Self {
            id: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into()),
            key_fingerprint: info.as_ref().map(|i| i.fingerprint.0.clone()),
            encryption_mode: info.map(|i| i.mode.as_str().to_string()),
            session: equicrypt_model::rekey::session_label(&f),
            eos_id,
        })
    }
}

/// State shared by the HTTP side and the worker.
#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) metrics: metrics::Metrics,
    shutting_down: AtomicBool,
}

impl Shared {
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

pub(crate) struct StateInner {
    pub(crate) shared: Arc<Shared>,
    pub(crate) jobs: SyncSender<worker::Job>,
    pub(crate) meta: ModelMeta,
    pub(crate) vocab_size: usize,
    pub(crate) context_length: usize,
    pub(crate) limits: Limits,
    pub(crate) next_id: AtomicU64,
}

/// Handle to a running server's state, for [`router`]. Cheap to clone.
#[derive(Clone)]
pub struct AppState(pub(crate) Arc<StateInner>);

impl AppState {
    /// Stops taking new generation requests; queued ones are answered 503, the running one finishes.
    pub fn begin_shutdown(&self) {
        self.0.shared.shutting_down.store(true, Ordering::SeqCst);
    }

    /// The served model's metadata.
    pub fn meta(&self) -> &ModelMeta {
        &self.0.meta
    }

    /// The current metrics in Prometheus text format (what `GET /metrics` returns).
    pub fn metrics_text(&self) -> String {
        self.0.shared.metrics.render()
    }
}

/// A started worker and its state; [`Server::run`] serves it over HTTP.
pub struct Server {
    state: AppState,
    worker: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts the worker thread on any engine (tests use wrappers around [`LlamaModel`]).
    pub fn start<E: Engine + Send + 'static>(
        engine: E,
        meta: ModelMeta,
        limits: Limits,
    ) -> Result<Self, ServerError> {
        if limits.queue_capacity == 0 {
            return Err(ServerError::Config(
                "queue capacity must be at least 1".into(),
            ));
        }
        if limits.max_tokens == 0 {
            return Err(ServerError::Config("max tokens must be at least 1".into()));
        }
        let shared = Arc::new(Shared::default());
        let (tx, rx) = std::sync::mpsc::sync_channel(limits.queue_capacity);
        let state = AppState(Arc::new(StateInner {
            shared: shared.clone(),
            jobs: tx,
            meta,
            vocab_size: engine.vocab_size(),
            context_length: engine.context_length(),
            limits,
            next_id: AtomicU64::new(0),
        }));
        let worker = std::thread::Builder::new()
            .name("equicrypt-worker".into())
            .spawn(move || worker::run(engine, rx, shared))?;
        Ok(Self {
            state,
            worker: Some(worker),
        })
    }

    /// Loads the model of `config` and starts the worker.
    pub fn load(config: &ServerConfig) -> Result<Self, ServerError> {
        let meta = ModelMeta::read(&config.model)?;
        let mut model =
            LlamaModel::load(&config.model).map_err(|e| ServerError::Model(e.to_string()))?;
        if let Some(n) = config.context_length {
            if n < model.context_length() {
                model
                    .set_context_length(n)
                    .map_err(|e| ServerError::Config(e.to_string()))?;
            }
        }
        Self::start(model, meta, config.limits.clone())
    }

    /// The state to build a [`router`] from.
    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Serves HTTP on `listener` until `shutdown` completes, then shuts down gracefully: no new
    /// connections, queued jobs answered 503, the running job and open streams finish; then the
    /// worker is joined.
    pub async fn run(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let state = self.state.clone();
        let app = router(self.state.clone());
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                tracing::info!("shutting down");
                state.begin_shutdown();
            })
            .await;
        self.state.begin_shutdown();
        if let Some(worker) = self.worker.take() {
            let joined = tokio::task::spawn_blocking(move || worker.join())
                .await
                .map_err(|_| ServerError::WorkerPanicked)?;
            joined.map_err(|_| ServerError::WorkerPanicked)?;
        }
        served?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A server dropped without `run` still lets its worker thread end.
        self.state.begin_shutdown();
    }
}

/// Loads the model, binds `config.listen` (loopback only unless `allow_remote`), prints one line
/// `listening on ADDR (model fingerprint …)` to stderr, and serves until `shutdown` completes.
pub async fn serve(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    if !config.listen.ip().is_loopback() && !config.allow_remote {
        return Err(ServerError::RemoteListen(config.listen));
    }
    let cfg = config.clone();
    let server = tokio::task::spawn_blocking(move || Server::load(&cfg))
        .await
        .map_err(|e| ServerError::Model(e.to_string()))??;
    let listener = TcpListener::bind(config.listen).await?;
    let meta = server.state.meta();
    eprintln!(
        "listening on {} (model fingerprint {})",
        listener.local_addr()?,
        meta.key_fingerprint
            .as_deref()
            .unwrap_or("none: not an encrypted model")
    );
    server.run(listener, shutdown).await
}

/// Completes on ctrl-c (SIGINT) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// For the command line: logs (counts, timings, statuses) to stderr, builds a runtime, runs
/// [`serve`] until ctrl-c or SIGTERM, and returns `Ok(())` after a graceful shutdown.
pub fn run_blocking(config: ServerConfig) -> Result<(), ServerError> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .with_target(false)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(config, shutdown_signal()))
}
