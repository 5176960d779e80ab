//! Shared helpers of the server's integration tests: a tiny encrypted model, a slow engine
//! wrapper, a server on 127.0.0.1:0, SSE and Prometheus parsing.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use equicrypt_engine::{Engine, LlamaModel};
use equicrypt_server::{Limits, ModelMeta, Server, ServerError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Writes a tiny synthetic model and its encryption (key `[1; 32]`) into `dir`; returns the
/// encrypted model's path.
pub fn tiny_encrypted(dir: &Path) -> PathBuf {
    let plain = dir.join("plain.gguf");
    let enc = dir.join("tiny-enc.gguf");
    equicrypt_model::synthetic::SyntheticLlama::tiny_f32(7)
        .write(&plain)
        .unwrap();
    let key = equicrypt_core::SecretKey::from_bytes([1; 32]);
    equicrypt_model::encrypt_gguf(&key, &plain, &enc, &Default::default()).unwrap();
    enc
}

/// An engine that sleeps before every forward pass (to make jobs observably long).
pub struct Slow<E> {
    pub inner: E,
    pub delay: Duration,
}

impl<E: Engine> Engine for Slow<E> {
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn context_length(&self) -> usize {
        self.inner.context_length()
    }
    fn position(&self) -> usize {
        self.inner.position()
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
    fn forward(&mut self, tokens: &[u32]) -> equicrypt_engine::Result<Vec<f32>> {
        std::thread::sleep(self.delay);
        self.inner.forward(tokens)
    }
    fn forward_all(&mut self, tokens: &[u32]) -> equicrypt_engine::Result<Vec<f32>> {
        std::thread::sleep(self.delay);
        self.inner.forward_all(tokens)
    }
}

/// A server running on a background task.
pub struct TestServer {
    pub addr: SocketAddr,
    pub base: String,
    pub model: PathBuf,
    pub meta: ModelMeta,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ServerError>>>,
    _dir: tempfile::TempDir,
}

/// Options of [`start`].
pub struct Opts {
    pub limits: Limits,
    /// Sleep per forward pass.
    pub delay: Option<Duration>,
    /// Keep the model's EOS as a stop id (false: no EOS, so long jobs run to their limit).
    pub eos: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            delay: None,
            eos: true,
        }
    }
}

pub async fn start(opts: Opts) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_encrypted(dir.path());
    let mut meta = ModelMeta::read(&model).unwrap();
    if !opts.eos {
        meta.eos_id = None;
    }
    let engine = LlamaModel::load(&model).unwrap();
    let server = match opts.delay {
        Some(delay) => Server::start(
            Slow {
                inner: engine,
                delay,
            },
            meta.clone(),
            opts.limits,
        ),
        None => Server::start(engine, meta.clone(), opts.limits),
    }
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(server.run(listener, async move {
        let _ = rx.await;
    }));
    TestServer {
        addr,
        base: format!("http://{addr}"),
        model,
        meta,
        shutdown: Some(tx),
        handle: Some(handle),
        _dir: dir,
    }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Triggers the graceful shutdown and returns the serve task's handle.
    pub fn trigger_shutdown(&mut self) -> JoinHandle<Result<(), ServerError>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.take().unwrap()
    }

    /// Shuts down and waits (at most 30 s) for the server to return.
    pub async fn stop(mut self) {
        let h = self.trigger_shutdown();
        tokio::time::timeout(Duration::from_secs(30), h)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }

    pub async fn metrics(&self, client: &reqwest::Client) -> String {
        let r = client.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }
}

/// The `data:` payloads of a server-sent-event body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_string()
        })
        .collect()
}

/// Parses Prometheus text: every sample line is `name{labels} value` with a numeric value.
/// Returns `(series, value)` pairs.
pub fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "bad comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels in {line:?}");
        }
        out.push((series.to_string(), v));
    }
    out
}

/// The value of one series (0 when absent).
pub fn metric(text: &str, series: &str) -> f64 {
    parse_prometheus(text)
        .into_iter()
        .find(|(s, _)| s == series)
        .map(|(_, v)| v)
        .unwrap_or(0.0)
}
