//! The transport: [`RemoteClient`]'s HTTP requests (`/health`, `/v1/models`, `/completion`), the
//! key-fingerprint and session checks, and the mapping of HTTP answers and server errors onto
//! [`ClientError`]. A streamed answer is read by [`TokenStream`] (over [`super::sse`]); the shapes
//! that are llama-server's own live in [`super::llamacpp`].

use std::sync::Arc;
use std::time::Duration;

use equicrypt_core::KeyFingerprint;
use equicrypt_protocol::{
    CompletionRequest, CompletionResponse, ErrorBody, ModelInfo, ModelList, StopType,
};
use futures_util::stream::StreamExt;
use serde_json::Value;

use super::llamacpp::{LlamaCppRequest, LlamaCppResponse};
use super::token_stream::TokenStream;
use super::vllm::{vllm_model_info, VllmRequest, VllmResponse};
use crate::{ClientError, Result};

/// Longest server error text kept in [`ClientError::Server`] when the body is not JSON.
const MAX_ERROR_TEXT: usize = 512;

/// Which server implementation is on the other end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `equicrypt-server` ([`equicrypt_protocol`] wire types).
    Equicrypt,
    /// llama.cpp's `llama-server` serving an encrypted GGUF.
    LlamaCpp,
    /// vLLM's OpenAI server serving an encrypted transformers checkpoint
    /// (`--skip-tokenizer-init`; token-id prompts on `/v1/completions`).
    Vllm,
}

impl Backend {
    /// The completion endpoint's path.
    fn completion_path(self) -> &'static str {
        match self {
            Backend::Equicrypt | Backend::LlamaCpp => "/completion",
            Backend::Vllm => "/v1/completions",
        }
    }
}

/// HTTP client of one blind server.
#[derive(Clone, Debug)]
pub struct RemoteClient {
    http: reqwest::Client,
    base: String,
    backend: Backend,
    allow_unverified: bool,
    /// Session label whose permutation this client's ids use (`None`: the base permutation).
    session: Option<String>,
    /// llama-server: the ciphertext id of the file's EOS (from `/props`), looked up once.
    pub(super) server_eos: Arc<tokio::sync::OnceCell<Option<u32>>>,
    /// vLLM: the served model's name (every request names it), looked up once.
    served_model: Arc<tokio::sync::OnceCell<String>>,
}

impl RemoteClient {
    /// A client for the server at `base_url` (`http://host:port`, optionally with a path prefix).
    ///
    /// Proxy environment variables are ignored (the server is normally on loopback or a private
    /// network, and a proxy would only add a party that sees the ciphertext); connecting times out
    /// after 10 s. Use [`RemoteClient::with_http_client`] for other settings.
    pub fn new(base_url: &str, backend: Backend) -> Result<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ClientError::InvalidUrl {
                url: base_url.to_string(),
                reason: format!("cannot build the HTTP client: {}", error_chain(&e)),
            })?;
        Self::with_http_client(base_url, backend, http)
    }

    /// Like [`RemoteClient::new`] with a caller-configured `reqwest::Client`.
    pub fn with_http_client(
        base_url: &str,
        backend: Backend,
        http: reqwest::Client,
    ) -> Result<Self> {
        let bad = |reason: &str| ClientError::InvalidUrl {
            url: base_url.to_string(),
            reason: reason.to_string(),
        };
        let url = reqwest::Url::parse(base_url).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("the scheme must be http or https"));
        }
        if url.host_str().is_none() {
            return Err(bad("no host"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("a base URL takes no query or fragment"));
        }
        Ok(Self {
            http,
            base: url.as_str().trim_end_matches('/').to_string(),
            backend,
            allow_unverified: false,
            session: None,
            server_eos: Arc::default(),
            served_model: Arc::default(),
        })
    }

    /// Lets [`RemoteClient::check_fingerprint`] pass when the server reports no fingerprint at all
    /// (a mismatch is still refused). The caller should warn its user: nothing then shows that the
    /// served model belongs to this key.
    pub fn allow_unverified_fingerprint(mut self, allow: bool) -> Self {
        self.allow_unverified = allow;
        self
    }

    /// Declares the session label whose permutation the caller encrypts ids with (`None`, the
    /// default: the base permutation). [`RemoteClient::check_fingerprint`] then refuses a server
    /// that reports another session, since ids would decrypt to other tokens.
    pub fn expect_session(mut self, session: Option<&str>) -> Self {
        self.session = session.map(str::to_string);
        self
    }

    /// The backend this client speaks to.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The base URL (no trailing `/`).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub(super) fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// `GET /health`: `Ok` when the server answers 2xx (llama-server answers 503 while loading).
    pub async fn health(&self) -> Result<()> {
        let url = self.url("/health");
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| transport(&url, &e))?;
        check_status(resp).await.map(|_| ())
    }

    /// Polls [`RemoteClient::health`] every 100 ms until it succeeds or `timeout` has passed; then
    /// returns the last error.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.health().await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The served model (`GET /v1/models`; for llama-server synthesized from `/v1/models` and,
    /// when the fingerprint is not in the model's names, `/props`).
    pub async fn model_info(&self) -> Result<ModelInfo> {
        let body = self.get_bytes("/v1/models").await?;
        match self.backend {
            Backend::Equicrypt => {
                let list: ModelList = parse_json(&body, "/v1/models")?;
                list.data.into_iter().next().ok_or_else(|| {
                    ClientError::MalformedResponse("/v1/models lists no model".into())
                })
            }
            Backend::LlamaCpp => {
                let v: Value = parse_json(&body, "/v1/models")?;
                self.llamacpp_model_info(&v).await
            }
            Backend::Vllm => {
                let v: Value = parse_json(&body, "/v1/models")?;
                let info = vllm_model_info(&v)?;
                let _ = self.served_model.set(info.id.clone());
                Ok(info)
            }
        }
    }

    /// vLLM: the served model's name, from `/v1/models` the first time.
    async fn vllm_served_model(&self) -> Result<&str> {
        self.served_model
            .get_or_try_init(|| async { self.model_info().await.map(|i| i.id) })
            .await
            .map(String::as_str)
    }

    /// Checks that the served model was encrypted with the key of fingerprint `expected`, before
    /// any prompt is sent. A different fingerprint is [`ClientError::FingerprintMismatch`]; none
    /// at all is [`ClientError::FingerprintUnavailable`] unless
    /// [`RemoteClient::allow_unverified_fingerprint`] was set.
    ///
    /// An equicrypt server also reports the session label of a re-keyed model: one other than
    /// [`RemoteClient::expect_session`]'s is [`ClientError::SessionMismatch`]. llama-server and
    /// vLLM report none, so there the session is not checked.
    pub async fn check_fingerprint(&self, expected: &KeyFingerprint) -> Result<ModelInfo> {
        let info = self.model_info().await?;
        match &info.key_fingerprint {
            Some(fp) if fp.trim().eq_ignore_ascii_case(expected.0.trim()) => {}
            Some(fp) => {
                return Err(ClientError::FingerprintMismatch {
                    server: fp.clone(),
                    key: expected.0.clone(),
                })
            }
            None if self.allow_unverified => {}
            None => {
                return Err(ClientError::FingerprintUnavailable {
                    url: self.base.clone(),
                })
            }
        }
        if self.backend == Backend::Equicrypt && info.session != self.session {
            return Err(ClientError::SessionMismatch {
                server: info.session,
                client: self.session.clone(),
            });
        }
        Ok(info)
    }

    /// `POST /completion` without streaming. Ids after the first of `req.stop_ids` are cut off
    /// (llama-server does not know stop ids) and `stop_type` becomes [`StopType::Eos`].
    pub async fn complete(&self, req: &CompletionRequest) -> Result<CompletionResponse> {
        let resp = self.post_completion(req, false).await?;
        let url = self.url(self.backend.completion_path());
        let body = resp.bytes().await.map_err(|e| transport(&url, &e))?;
        let v: Value = parse_json(&body, "/completion")?;
        let mut out = self.normalize(v)?;
        let stops = sorted(&req.stop_ids);
        if let Some(i) = out.tokens.iter().position(|t| is_stop(&stops, *t)) {
            out.tokens.truncate(i);
            out.stop_type = StopType::Eos;
            if self.backend != Backend::Equicrypt {
                out.completion_probabilities.truncate(i);
                out.tokens_predicted = i;
            }
        }
        Ok(out)
    }

    /// `POST /completion` with `stream: true`; the events are read with [`TokenStream::next`].
    ///
    /// llama-server streams the EOS token it stops at; when that id is one of `req.stop_ids`
    /// the stream reads on to llama-server's final event (for its timings) instead of dropping
    /// the connection. The EOS id is read once per client from `GET /props` (`eos_token`, the
    /// placeholder `<ct{id}>` of the encrypted vocabulary).
    pub async fn complete_stream(&self, req: &CompletionRequest) -> Result<TokenStream> {
        self.complete_stream_stopping_at(req, &req.stop_ids).await
    }

    /// Like [`RemoteClient::complete_stream`], but the stream stops itself at `stop_ids`, which
    /// need not be in `req` (the server is not told them: hidden stop ids). When one arrives the
    /// stream ends with [`StopType::Eos`] and the connection is dropped, cancelling the job.
    pub async fn complete_stream_stopping_at(
        &self,
        req: &CompletionRequest,
        stop_ids: &[u32],
    ) -> Result<TokenStream> {
        let server_eos = match self.backend {
            Backend::Equicrypt | Backend::Vllm => None,
            Backend::LlamaCpp => self.llamacpp_eos().await,
        };
        let resp = self.post_completion(req, true).await?;
        let url = self.url(self.backend.completion_path());
        let body = resp
            .bytes_stream()
            .map(move |r| r.map(|b| b.to_vec()).map_err(|e| transport(&url, &e)))
            .boxed();
        let mut ts = TokenStream::new(body, self.backend, stop_ids);
        ts.server_eos = server_eos;
        Ok(ts)
    }

    async fn post_completion(
        &self,
        req: &CompletionRequest,
        stream: bool,
    ) -> Result<reqwest::Response> {
        let url = self.url(self.backend.completion_path());
        let builder = self.http.post(&url);
        let builder = match self.backend {
            Backend::Equicrypt => {
                let mut r = req.clone();
                r.stream = stream;
                builder.json(&r)
            }
            Backend::LlamaCpp => builder.json(&LlamaCppRequest::new(req, stream)),
            Backend::Vllm => {
                // Checked before the model lookup: nothing is sent for a request vLLM refuses.
                VllmRequest::check(req)?;
                let model = self.vllm_served_model().await?;
                builder.json(&VllmRequest::new(model, req, stream))
            }
        };
        let resp = builder.send().await.map_err(|e| transport(&url, &e))?;
        check_status(resp).await
    }

    pub(super) async fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let url = self.url(path);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| transport(&url, &e))?;
        let resp = check_status(resp).await?;
        Ok(resp
            .bytes()
            .await
            .map_err(|e| transport(&url, &e))?
            .to_vec())
    }

    fn normalize(&self, v: Value) -> Result<CompletionResponse> {
        normalize(self.backend, v)
    }
}

/// Turns one response object (a whole response or one event's data) into a
/// [`CompletionResponse`], or the error it carries into [`ClientError::Server`].
pub(super) fn normalize(backend: Backend, v: Value) -> Result<CompletionResponse> {
    if let Some(err) = v.get("error") {
        return Err(server_error_from_value(500, err));
    }
    match backend {
        Backend::Equicrypt => serde_json::from_value(v).map_err(|e| {
            ClientError::MalformedResponse(format!("completion does not match the protocol: {e}"))
        }),
        Backend::LlamaCpp => {
            let r: LlamaCppResponse = serde_json::from_value(v).map_err(|e| {
                ClientError::MalformedResponse(format!("llama-server completion: {e}"))
            })?;
            Ok(r.into_protocol())
        }
        Backend::Vllm => {
            let r: VllmResponse = serde_json::from_value(v)
                .map_err(|e| ClientError::MalformedResponse(format!("vLLM completion: {e}")))?;
            r.into_protocol()
        }
    }
}

pub(super) fn sorted(ids: &[u32]) -> Vec<u32> {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

pub(super) fn is_stop(sorted_stops: &[u32], id: u32) -> bool {
    sorted_stops.binary_search(&id).is_ok()
}

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| ClientError::MalformedResponse(format!("{what}: {e}")))
}

/// The error and its sources on one line (reqwest puts the useful part, e.g. "Connection
/// refused", in a source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

fn transport(url: &str, e: &reqwest::Error) -> ClientError {
    if e.is_connect() {
        ClientError::Unreachable {
            url: url.to_string(),
            reason: error_chain(e),
        }
    } else {
        ClientError::Transport {
            url: url.to_string(),
            reason: error_chain(e),
        }
    }
}

/// Passes 2xx responses; turns any other into [`ClientError::Server`] with the `ErrorBody`
/// message (or the start of the body text).
async fn check_status(resp: reqwest::Response) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let code = status.as_u16();
    let body = resp.bytes().await.unwrap_or_default();
    if let Ok(b) = serde_json::from_slice::<ErrorBody>(&body) {
        return Err(ClientError::Server {
            status: code,
            message: b.error.message,
        });
    }
    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
        if let Some(err) = v.get("error") {
            return Err(server_error_from_value(code, err));
        }
    }
    let text = String::from_utf8_lossy(&body);
    let mut message: String = text.trim().chars().take(MAX_ERROR_TEXT).collect();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_string();
    }
    Err(ClientError::Server {
        status: code,
        message,
    })
}

/// An `error` value (`{"message", "type", "code"?}` or a string) as [`ClientError::Server`].
pub(super) fn server_error_from_value(default_status: u16, err: &Value) -> ClientError {
    let status = err
        .get("code")
        .and_then(Value::as_u64)
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (400..600).contains(c))
        .unwrap_or(default_status);
    let message = match err {
        Value::String(s) => s.clone(),
        _ => err
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| err.to_string()),
    };
    ClientError::Server {
        status,
        message: message.chars().take(MAX_ERROR_TEXT).collect(),
    }
}
