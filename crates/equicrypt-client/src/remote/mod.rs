//! HTTP client for a blind inference server: ours (`equicrypt-server`, the
//! [`equicrypt_protocol`] wire types) or llama.cpp's stock `llama-server` serving an encrypted GGUF.
//!
//! Layers:
//!
//! * [`RemoteClient`]: the endpoints — `GET /health`, `GET /v1/models` ([`RemoteClient::model_info`],
//!   [`RemoteClient::check_fingerprint`]), `POST /completion` non-streamed
//!   ([`RemoteClient::complete`]) and streamed as server-sent events
//!   ([`RemoteClient::complete_stream`] → [`TokenStream`]).
//! * [`BlindChat`]: tokenize → encrypt → request → decrypt, streaming plaintext pieces to a callback.
//!
//! Only ciphertext token ids ever leave this module; the key stays in the [`CipherSession`].
//!
//! # Backends
//!
//! [`Backend::Equicrypt`] speaks [`equicrypt_protocol`] exactly (strict parsing: a response that
//! does not match the types is [`ClientError::MalformedResponse`]). [`Backend::LlamaCpp`] maps the
//! same calls onto llama-server: requests carry only the fields llama-server knows
//! (`return_tokens: true`, `seed` reduced to 32 bits), responses are parsed leniently and
//! normalized into [`CompletionResponse`] (`content` cleared — it is placeholder text of the
//! encrypted vocabulary; `stop_type` `word` → [`StopType::Eos`]). llama-server has no `stop_ids`: it
//! stops at the file's EOS only, so the client stops itself when any other stop id arrives — it
//! drops the connection, which makes llama-server cancel the generation. The client applies that
//! rule on both backends; a stop id is never part of the returned ids.
//!
//! # Key fingerprints
//!
//! [`RemoteClient::check_fingerprint`] must pass before a prompt is sent: a model encrypted with
//! another key would receive a prompt it reads as different plaintext. Our server reports the
//! fingerprint in `/v1/models`. llama-server has no field for it, so the client looks for a
//! 32-hex-digit fingerprint in the model's id or aliases (`llama-server --alias <fingerprint>`) and
//! in `GET /props`'s `model_path` (a file named after the fingerprint). When the server reports
//! none, the check fails with [`ClientError::FingerprintUnavailable`] unless the client was built
//! with [`RemoteClient::allow_unverified_fingerprint`].
//!
//! # Hidden stop ids
//!
//! With [`GenerateParams::hide_stop_ids`] the request carries no `stop_ids` and sets
//! `ignore_eos: true` (pair it with a model written by `equicrypt encrypt --hide-special-ids`,
//! which stores no EOS id); the client watches the decrypted stream and drops the connection when
//! an end-of-generation id arrives, which makes the server cancel the job. Text and ids are those
//! of the normal path; the server wastes the tokens it generates before it notices the
//! disconnect. This keeps the EOS ids out of the request bodies and the model file, but the
//! server still sees every stream end right after the EOS id (it observes the disconnect), and
//! chat-template tokens sit at fixed positions of every prompt; the attack lab measures how well
//! traffic alone identifies them.
//!
//! llama-server reads `ignore_eos` as a −∞ logit bias on the id it takes for EOS, and for a file
//! that names no EOS that is llama.cpp's default id 2, an ordinary ciphertext token: banning it
//! would change answers. So to llama-server the client sends no `ignore_eos`; when llama-server
//! stops at an id that is none of the client's stop ids, that id is part of the answer, and
//! [`BlindChat::generate`] continues with the prompt plus the answer so far (llama-server's prompt
//! cache makes that one decoding step). Greedy answers are those of a file with the real EOS; a
//! sampled answer is drawn from the same distribution, but the sampling seed restarts at each
//! continuation, and the server sees a new request there.
//!
//! Invariants: no method panics on anything a server sends; transport failures, non-2xx answers
//! and malformed bodies or event streams are distinct [`ClientError`] variants.

mod sse;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use equicrypt_core::KeyFingerprint;
pub use equicrypt_protocol::{
    CompletionRequest, CompletionResponse, ErrorBody, ModelInfo, ModelList, PositionProbs,
    StopType, Timings,
};
use futures_util::stream::{self, BoxStream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use sse::{SseEvent, SseParser, MAX_EVENT_BYTES};

use crate::session::CipherSession;
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
    server_eos: Arc<tokio::sync::OnceCell<Option<u32>>>,
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

    fn url(&self, path: &str) -> String {
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
                let mut info = llamacpp_model_info(&v)?;
                if info.key_fingerprint.is_none() {
                    // `/props` is optional information: a failure here only means "no fingerprint".
                    if let Ok(props) = self.get_bytes("/props").await {
                        if let Ok(p) = serde_json::from_slice::<Value>(&props) {
                            info.key_fingerprint = ["model_path", "model_alias"]
                                .iter()
                                .filter_map(|k| p.get(*k).and_then(Value::as_str))
                                .find_map(find_fingerprint);
                        }
                    }
                }
                Ok(info)
            }
        }
    }

    /// Checks that the served model was encrypted with the key of fingerprint `expected`, before
    /// any prompt is sent. A different fingerprint is [`ClientError::FingerprintMismatch`]; none
    /// at all is [`ClientError::FingerprintUnavailable`] unless
    /// [`RemoteClient::allow_unverified_fingerprint`] was set.
    ///
    /// An equicrypt server also reports the session label of a re-keyed model: one other than
    /// [`RemoteClient::expect_session`]'s is [`ClientError::SessionMismatch`]. llama-server
    /// reports none, so there the session is not checked.
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
        let url = self.url("/completion");
        let body = resp.bytes().await.map_err(|e| transport(&url, &e))?;
        let v: Value = parse_json(&body, "/completion")?;
        let mut out = self.normalize(v)?;
        let stops = sorted(&req.stop_ids);
        if let Some(i) = out.tokens.iter().position(|t| is_stop(&stops, *t)) {
            out.tokens.truncate(i);
            out.stop_type = StopType::Eos;
            if self.backend == Backend::LlamaCpp {
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
            Backend::Equicrypt => None,
            Backend::LlamaCpp => self.llamacpp_eos().await,
        };
        let resp = self.post_completion(req, true).await?;
        let url = self.url("/completion");
        let body = resp
            .bytes_stream()
            .map(move |r| r.map(|b| b.to_vec()).map_err(|e| transport(&url, &e)))
            .boxed();
        let mut ts = TokenStream::new(body, self.backend, stop_ids);
        ts.server_eos = server_eos;
        Ok(ts)
    }

    /// llama-server's EOS as a ciphertext id, if `/props` names it as `<ct{id}>`.
    async fn llamacpp_eos(&self) -> Option<u32> {
        *self
            .server_eos
            .get_or_init(|| async {
                let body = self.get_bytes("/props").await.ok()?;
                let v: Value = serde_json::from_slice(&body).ok()?;
                let eos = v.get("eos_token")?.as_str()?;
                eos.strip_prefix("<ct")?.strip_suffix('>')?.parse().ok()
            })
            .await
    }

    async fn post_completion(
        &self,
        req: &CompletionRequest,
        stream: bool,
    ) -> Result<reqwest::Response> {
        let url = self.url("/completion");
        let builder = self.http.post(&url);
        let builder = match self.backend {
            Backend::Equicrypt => {
                let mut r = req.clone();
                r.stream = stream;
                builder.json(&r)
            }
            Backend::LlamaCpp => builder.json(&LlamaCppRequest::new(req, stream)),
        };
        let resp = builder.send().await.map_err(|e| transport(&url, &e))?;
        check_status(resp).await
    }

    async fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
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
fn normalize(backend: Backend, v: Value) -> Result<CompletionResponse> {
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
    }
}

/// One event of a streamed completion.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    /// Newly generated ciphertext ids (never empty, never a stop id).
    Tokens(Vec<u32>),
    /// Generation ended; nothing follows.
    Done {
        /// Why it ended ([`StopType::Eos`] also when the client stopped at a stop id itself).
        stop_type: StopType,
        /// Server timings, when the server sent its final event.
        timings: Option<Timings>,
        /// Tokens generated according to the server's final event; when the client found a stop
        /// id among the ids (it stopped itself, or llama-server streamed its EOS), the number of
        /// ids delivered.
        tokens_predicted: usize,
    },
}

/// A streamed completion: read with [`TokenStream::next`] until it returns `Ok(None)`.
///
/// Dropping it closes the connection, which makes the server stop generating.
pub struct TokenStream {
    body: BoxStream<'static, Result<Vec<u8>>>,
    parser: SseParser,
    queue: VecDeque<StreamEvent>,
    backend: Backend,
    stops: Vec<u32>,
    delivered: usize,
    /// The server stops by itself after this id (llama-server's EOS): after it, further ids are
    /// dropped and the final event is awaited instead of closing the connection.
    server_eos: Option<u32>,
    /// Saw `server_eos`; waiting for the final event.
    draining: bool,
    /// A `Done` was queued: no further server events are read.
    done: bool,
    /// The stream ended at one of its stop ids (not at a stop of the server's own).
    at_stop_id: bool,
    /// Nothing more will be returned (after `Done` or an error).
    finished: bool,
}

impl std::fmt::Debug for TokenStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStream")
            .field("backend", &self.backend)
            .field("stops", &self.stops)
            .field("delivered", &self.delivered)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl TokenStream {
    /// A stream over raw response-body chunks (the HTTP layer, or a test's byte source).
    pub fn from_chunks(
        body: BoxStream<'static, Result<Vec<u8>>>,
        backend: Backend,
        stop_ids: &[u32],
    ) -> Self {
        Self::new(body, backend, stop_ids)
    }

    fn new(body: BoxStream<'static, Result<Vec<u8>>>, backend: Backend, stop_ids: &[u32]) -> Self {
        Self {
            body,
            parser: SseParser::new(),
            queue: VecDeque::new(),
            backend,
            stops: sorted(stop_ids),
            delivered: 0,
            server_eos: None,
            draining: false,
            done: false,
            at_stop_id: false,
            finished: false,
        }
    }

    /// The next event: `Ok(Some(Tokens))` any number of times, then `Ok(Some(Done))`, then
    /// `Ok(None)`. An error (transport, server error event, malformed event, stream cut before
    /// the final event) ends the stream: later calls return `Ok(None)`.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                if matches!(ev, StreamEvent::Done { .. }) {
                    self.close();
                }
                return Ok(Some(ev));
            }
            if self.finished {
                return Ok(None);
            }
            let res = match self.body.next().await {
                Some(Ok(chunk)) => self.feed(&chunk),
                Some(Err(e)) => Err(e),
                None => self.end_of_body(),
            };
            if let Err(e) = res {
                self.close();
                self.queue.clear();
                return Err(e);
            }
        }
    }

    /// Whether the stream ended at one of its stop ids, rather than at a stop the server made by
    /// itself (its own EOS, the length limit) or not yet at all.
    pub fn ended_at_stop_id(&self) -> bool {
        self.at_stop_id
    }

    fn close(&mut self) {
        self.finished = true;
        self.body = stream::empty().boxed();
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<()> {
        for ev in self.parser.push(chunk)? {
            if self.done {
                break;
            }
            self.handle(ev)?;
        }
        Ok(())
    }

    fn end_of_body(&mut self) -> Result<()> {
        let truncated = self.parser.finish()?;
        if self.done {
            return Ok(());
        }
        Err(ClientError::MalformedResponse(format!(
            "event stream ended before the final event{}",
            if truncated {
                " (inside an unterminated event)"
            } else {
                ""
            }
        )))
    }

    fn handle(&mut self, ev: SseEvent) -> Result<()> {
        let data = ev.data.trim();
        if data == "[DONE]" {
            // OpenAI-style terminator: only acceptable after the final event.
            return Err(ClientError::MalformedResponse(
                "event stream ended ([DONE]) before the final event".into(),
            ));
        }
        let v: Value = serde_json::from_str(data).map_err(|e| {
            ClientError::MalformedResponse(format!("server-sent event is not JSON: {e}"))
        })?;
        if ev.event.as_deref() == Some("error") {
            return Err(server_error_from_value(500, v.get("error").unwrap_or(&v)));
        }
        let resp = normalize(self.backend, v)?;
        if self.draining {
            if resp.stop {
                self.at_stop_id = true;
                self.finish(StopType::Eos, resp.timings, self.delivered);
            }
            return Ok(());
        }
        if let Some(i) = resp.tokens.iter().position(|t| is_stop(&self.stops, *t)) {
            if i > 0 {
                self.delivered += i;
                self.queue
                    .push_back(StreamEvent::Tokens(resp.tokens[..i].to_vec()));
            }
            if Some(resp.tokens[i]) == self.server_eos && !resp.stop {
                // The server ends here by itself: read on to its final event.
                self.draining = true;
                return Ok(());
            }
            self.at_stop_id = true;
            self.finish(StopType::Eos, resp.timings, self.delivered);
            return Ok(());
        }
        if !resp.tokens.is_empty() {
            self.delivered += resp.tokens.len();
            self.queue.push_back(StreamEvent::Tokens(resp.tokens));
        }
        if resp.stop {
            self.finish(resp.stop_type, resp.timings, resp.tokens_predicted);
        }
        Ok(())
    }

    /// Queues the final event; nothing is read after it.
    fn finish(&mut self, stop_type: StopType, timings: Option<Timings>, tokens_predicted: usize) {
        self.queue.push_back(StreamEvent::Done {
            stop_type,
            timings,
            tokens_predicted,
        });
        self.done = true;
    }
}

/// Sampling and length settings of [`BlindChat::generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Softmax temperature (≤ 0: greedy).
    pub temperature: f32,
    /// Top-k (0: off).
    pub top_k: usize,
    /// Top-p (1: off).
    pub top_p: f32,
    /// Sampling seed (llama-server uses its low 32 bits).
    pub seed: u64,
    /// Repetition penalty (1: off).
    pub repeat_penalty: f32,
    /// Window of the repetition penalty.
    pub repeat_last_n: usize,
    /// Tokenize special-token text in the prompt (`<|im_start|>` ...) as special tokens; true for
    /// a rendered chat template.
    pub parse_special: bool,
    /// Render control tokens in the decrypted text.
    pub render_special: bool,
    /// Send no stop ids (and, except to llama-server, `ignore_eos: true`); stop by watching the
    /// decrypted stream and dropping the connection instead (see the module docs, "Hidden stop
    /// ids").
    pub hide_stop_ids: bool,
}

impl Default for GenerateParams {
    /// The protocol's defaults: 128 tokens, temperature 0.8, top-k 40, top-p 0.95, seed 0.
    fn default() -> Self {
        Self {
            max_tokens: equicrypt_protocol::DEFAULT_N_PREDICT,
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed: 0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            parse_special: true,
            render_special: false,
            hide_stop_ids: false,
        }
    }
}

impl GenerateParams {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            temperature: 0.0,
            top_k: 1,
            top_p: 1.0,
            ..Self::default()
        }
    }
}

/// What [`BlindChat::generate`] produced.
#[derive(Clone, Debug, PartialEq)]
pub struct BlindOutput {
    /// The decrypted answer.
    pub text: String,
    /// Plaintext ids of the answer (no stop id).
    pub plain_ids: Vec<u32>,
    /// Ciphertext ids the server produced (no stop id).
    pub cipher_ids: Vec<u32>,
    /// Why generation ended.
    pub stop_type: StopType,
    /// The prompt as the server saw it.
    pub prompt_cipher_ids: Vec<u32>,
    /// Server timings, when reported.
    pub timings: Option<Timings>,
}

/// Blind generation: the prompt is tokenized and encrypted here, the server only sees ciphertext
/// ids, and the streamed ids are decrypted here.
///
/// Check the server's key first with [`RemoteClient::check_fingerprint`]; `BlindChat` does not
/// hold the key's fingerprint.
#[derive(Clone, Copy, Debug)]
pub struct BlindChat<'a> {
    session: &'a CipherSession,
    client: &'a RemoteClient,
}

impl<'a> BlindChat<'a> {
    /// Pairs a cipher session with a server.
    pub fn new(session: &'a CipherSession, client: &'a RemoteClient) -> Self {
        Self { session, client }
    }

    /// Encrypts `prompt_text` (already rendered with the chat template, if any), streams the
    /// completion, and calls `on_text(piece, cipher_ids)` for every server event with the
    /// plaintext that became complete (possibly empty: UTF-8 is buffered) and that event's
    /// ciphertext ids; a final flush of buffered bytes comes with no ids. The session's
    /// end-of-generation ids are the stop ids: sent to the server, or with
    /// [`GenerateParams::hide_stop_ids`] only watched for here.
    pub async fn generate(
        &self,
        prompt_text: &str,
        params: GenerateParams,
        mut on_text: impl FnMut(&str, &[u32]),
    ) -> Result<BlindOutput> {
        let prompt_cipher_ids = self
            .session
            .encrypt_prompt(prompt_text, params.parse_special)?;
        let eog = self.session.eog_cipher_ids()?;
        // llama-server turns `ignore_eos` into a −∞ bias on the id it takes for EOS, and with a
        // file that names no EOS that is an ordinary token (llama.cpp's default id): banning it
        // would change the answer. So llama-server is left to stop there, and the client
        // continues past a stop that is not one of its own (see the module docs).
        let continue_past_server_stops =
            params.hide_stop_ids && self.client.backend() == Backend::LlamaCpp;
        let mut req = CompletionRequest {
            prompt: prompt_cipher_ids.clone(),
            n_predict: i64::try_from(params.max_tokens).unwrap_or(i64::MAX),
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            seed: params.seed,
            repeat_penalty: params.repeat_penalty,
            repeat_last_n: params.repeat_last_n,
            stop_ids: if params.hide_stop_ids {
                Vec::new()
            } else {
                eog.clone()
            },
            ignore_eos: params.hide_stop_ids && !continue_past_server_stops,
            stream: true,
            n_probs: 0,
            return_tokens: Some(true),
            cache_prompt: None,
        };
        let mut dec = self.session.decrypt_stream(params.render_special);
        let mut out = BlindOutput {
            text: String::new(),
            plain_ids: Vec::new(),
            cipher_ids: Vec::new(),
            stop_type: StopType::None,
            prompt_cipher_ids,
            timings: None,
        };
        loop {
            let before = out.cipher_ids.len();
            let mut stream = self.client.complete_stream_stopping_at(&req, &eog).await?;
            while let Some(ev) = stream.next().await? {
                match ev {
                    StreamEvent::Tokens(ids) => {
                        let mut piece = String::new();
                        for &cid in &ids {
                            let (pid, text) = dec.push_with_id(cid)?;
                            out.plain_ids.push(pid);
                            piece.push_str(&text);
                        }
                        out.cipher_ids.extend_from_slice(&ids);
                        out.text.push_str(&piece);
                        on_text(&piece, &ids);
                    }
                    StreamEvent::Done {
                        stop_type, timings, ..
                    } => {
                        out.stop_type = stop_type;
                        out.timings = timings;
                    }
                }
            }
            let left = params.max_tokens.saturating_sub(out.cipher_ids.len());
            // A stop that produced nothing is taken as final: asking again would loop.
            let false_stop = continue_past_server_stops
                && out.stop_type == StopType::Eos
                && !stream.ended_at_stop_id()
                && out.cipher_ids.len() > before;
            if !false_stop {
                break;
            }
            if left == 0 {
                out.stop_type = StopType::Limit;
                break;
            }
            // The server stopped at an id that ends nothing for this client (it is part of the
            // answer, already delivered): go on from there. llama-server's prompt cache makes
            // this one decoding step; a sampling seed restarts, greedy answers are unchanged.
            req.prompt = out.prompt_cipher_ids.clone();
            req.prompt.extend_from_slice(&out.cipher_ids);
            req.n_predict = i64::try_from(left).unwrap_or(i64::MAX);
        }
        let tail = dec.finish();
        if !tail.is_empty() {
            out.text.push_str(&tail);
            on_text(&tail, &[]);
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// llama-server shapes

/// The `/completion` fields llama-server understands.
#[derive(Serialize)]
struct LlamaCppRequest<'a> {
    prompt: &'a [u32],
    n_predict: i64,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    seed: u32,
    repeat_penalty: f32,
    repeat_last_n: usize,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ignore_eos: bool,
    stream: bool,
    return_tokens: bool,
    n_probs: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_prompt: Option<bool>,
}

impl<'a> LlamaCppRequest<'a> {
    fn new(r: &'a CompletionRequest, stream: bool) -> Self {
        Self {
            prompt: &r.prompt,
            n_predict: r.n_predict,
            temperature: r.temperature,
            top_k: r.top_k,
            top_p: r.top_p,
            seed: llamacpp_seed(r.seed),
            repeat_penalty: r.repeat_penalty,
            repeat_last_n: r.repeat_last_n,
            ignore_eos: r.ignore_eos,
            stream,
            return_tokens: true,
            n_probs: r.n_probs,
            cache_prompt: r.cache_prompt,
        }
    }
}

/// llama-server's seed is a `uint32_t` whose all-ones value means "random": keep the low 32 bits
/// and move that one value aside so that every seed stays deterministic.
fn llamacpp_seed(seed: u64) -> u32 {
    let s = (seed & 0xFFFF_FFFF) as u32;
    if s == u32::MAX {
        u32::MAX - 1
    } else {
        s
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LlamaCppTimings {
    prompt_n: Option<i64>,
    prompt_ms: Option<f64>,
    predicted_n: Option<i64>,
    predicted_ms: Option<f64>,
    predicted_per_second: Option<f64>,
    queue_ms: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LlamaCppResponse {
    tokens: Vec<u32>,
    stop: bool,
    stop_type: Option<String>,
    tokens_predicted: Option<i64>,
    tokens_evaluated: Option<i64>,
    completion_probabilities: Vec<PositionProbs>,
    timings: Option<LlamaCppTimings>,
}

fn count(n: Option<i64>) -> usize {
    n.and_then(|n| usize::try_from(n).ok()).unwrap_or(0)
}

impl LlamaCppResponse {
    fn into_protocol(self) -> CompletionResponse {
        let stop_type = match self.stop_type.as_deref() {
            Some("eos") | Some("word") => StopType::Eos,
            Some("limit") => StopType::Limit,
            _ => StopType::None,
        };
        CompletionResponse {
            content: String::new(),
            tokens: self.tokens,
            stop: self.stop,
            stop_type,
            tokens_predicted: count(self.tokens_predicted),
            tokens_evaluated: count(self.tokens_evaluated),
            completion_probabilities: self.completion_probabilities,
            timings: self.timings.map(|t| Timings {
                prompt_n: count(t.prompt_n),
                prompt_ms: t.prompt_ms.unwrap_or(0.0),
                predicted_n: count(t.predicted_n),
                predicted_ms: t.predicted_ms.unwrap_or(0.0),
                predicted_per_second: t.predicted_per_second.unwrap_or(0.0),
                queue_ms: t.queue_ms.unwrap_or(0.0),
            }),
        }
    }
}

/// [`ModelInfo`] from llama-server's `/v1/models` (`data[0]` with `meta.n_vocab`, `meta.n_ctx`).
fn llamacpp_model_info(v: &Value) -> Result<ModelInfo> {
    let m = v
        .get("data")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .ok_or_else(|| ClientError::MalformedResponse("/v1/models lists no model".into()))?;
    let id = m
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let meta = m.get("meta");
    let num = |k: &str| {
        meta.and_then(|x| x.get(k))
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
    };
    let vocab_size = num("n_vocab").ok_or_else(|| {
        ClientError::MalformedResponse("llama-server /v1/models has no meta.n_vocab".into())
    })?;
    let context_length = num("n_ctx").or_else(|| num("n_ctx_train")).unwrap_or(0);
    let mut names = vec![id.clone()];
    if let Some(a) = m.get("aliases").and_then(Value::as_array) {
        names.extend(a.iter().filter_map(Value::as_str).map(str::to_string));
    }
    Ok(ModelInfo {
        key_fingerprint: names.iter().find_map(|n| find_fingerprint(n)),
        id,
        object: "model".into(),
        owned_by: m
            .get("owned_by")
            .and_then(Value::as_str)
            .unwrap_or("llamacpp")
            .to_string(),
        encryption_mode: None,
        session: None,
        vocab_size,
        context_length,
    })
}

/// The first run of exactly 32 hex digits in `s` (a key fingerprint), lower-cased.
fn find_fingerprint(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_hexdigit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_hexdigit() {
                i += 1;
            }
            if i - start == 32 {
                return Some(s[start..i].to_ascii_lowercase());
            }
        } else {
            i += 1;
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// helpers

fn sorted(ids: &[u32]) -> Vec<u32> {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

fn is_stop(sorted_stops: &[u32], id: u32) -> bool {
    sorted_stops.binary_search(&id).is_ok()
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T> {
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
fn server_error_from_value(default_status: u16, err: &Value) -> ClientError {
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

#[cfg(test)]
mod tests;
