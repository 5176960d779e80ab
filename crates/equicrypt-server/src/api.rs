//! HTTP handlers, the JSON extractor, validation and the middleware.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::mpsc::TrySendError;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use equicrypt_engine::SamplingParams;
use equicrypt_protocol::{
    CompletionRequest, CompletionResponse, ErrorBody, ModelInfo, ModelList, OpenAiChoice,
    OpenAiCompletionRequest, OpenAiCompletionResponse, PositionProbs, StopType, Timings, Usage,
    DEFAULT_N_PREDICT,
};
use futures_util::stream::{self, Stream, StreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::ApiError;
use crate::metrics::endpoint_label;
use crate::worker::{Event, Job};
use crate::AppState;

/// The HTTP API over `state` (see the crate documentation for the routes).
pub fn router(state: AppState) -> Router {
    let limit = state.0.limits.max_body_bytes;
    Router::new()
        .route("/completion", post(completion))
        .route("/completions", post(completion))
        .route("/v1/completions", post(openai_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(json_errors))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Middleware

struct InFlight<'a>(&'a std::sync::atomic::AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts, times and logs every request (endpoint label, status, latency: never bodies or ids).
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let m = &state.0.shared.metrics;
    let endpoint = endpoint_label(req.uri().path());
    let start = Instant::now();
    m.in_flight.fetch_add(1, Ordering::Relaxed);
    let _guard = InFlight(&m.in_flight);
    let resp = next.run(req).await;
    let elapsed = start.elapsed();
    let status = resp.status().as_u16();
    m.record_request(endpoint, status, elapsed);
    tracing::info!(
        endpoint,
        status,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    resp
}

/// Turns any non-JSON error response (axum's own rejections) into a JSON [`ErrorBody`].
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let kind = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::SERVICE_UNAVAILABLE => "server_busy",
        s if s.is_server_error() => "internal_error",
        _ => "invalid_request_error",
    };
    let message = status.canonical_reason().unwrap_or("error").to_string();
    let (mut parts, _) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = serde_json::to_vec(&ErrorBody::new(kind, message)).unwrap_or_default();
    Response::from_parts(parts, Body::from(body))
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    ApiError::Internal("handler panicked".into()).into_response()
}

// ---------------------------------------------------------------------------------------------
// JSON extractor

/// A JSON body whose every failure (size, syntax, types, unknown fields) is an [`ApiError`].
pub(crate) struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_body(req, state).await?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
    }
}

async fn read_body(req: Request, state: &AppState) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(state.0.limits.max_body_bytes)
        } else {
            ApiError::bad(r.body_text())
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Simple endpoints

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics_text(),
    )
}

async fn models(State(state): State<AppState>) -> Json<ModelList> {
    let s = &state.0;
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelInfo {
            id: s.meta.id.clone(),
            object: "model".into(),
            owned_by: "equicrypt".into(),
            key_fingerprint: s.meta.key_fingerprint.clone(),
            encryption_mode: s.meta.encryption_mode.clone(),
            session: s.meta.session.clone(),
            vocab_size: s.vocab_size,
            context_length: s.context_length,
        }],
    })
}

// ---------------------------------------------------------------------------------------------
// Validation and submission

/// A generation request in the server's terms, before validation.
struct GenSpec {
    prompt: Vec<u32>,
    /// Requested tokens; `None`: the default; `Some(-1)`: the server limit.
    n_predict: Option<i64>,
    params: SamplingParams,
    stop_ids: Vec<u32>,
    /// Do not add the model's EOS to the stop ids.
    ignore_eos: bool,
    n_probs: usize,
}

/// A validated generation request.
struct Valid {
    prompt: Vec<u32>,
    max_new: usize,
    params: SamplingParams,
    stop: Vec<bool>,
    n_probs: usize,
}

fn validate(state: &AppState, spec: GenSpec) -> Result<Valid, ApiError> {
    let s = &state.0;
    let vocab = s.vocab_size;
    if spec.prompt.is_empty() {
        return Err(ApiError::bad("prompt is empty"));
    }
    if let Some(pos) = spec.prompt.iter().position(|&id| id as usize >= vocab) {
        return Err(ApiError::bad(format!(
            "prompt[{pos}] is not a token id of this model (vocabulary size {vocab})"
        )));
    }
    if spec.prompt.len() >= s.context_length {
        return Err(ApiError::bad(format!(
            "prompt has {} tokens; the context holds {} (the prompt must be shorter)",
            spec.prompt.len(),
            s.context_length
        )));
    }
    let max = s.limits.max_tokens;
    let max_new = match spec.n_predict {
        None => (DEFAULT_N_PREDICT).min(max),
        Some(-1) => max,
        Some(n) if n < -1 => {
            return Err(ApiError::bad(format!("n_predict {n} must be -1 or >= 0")))
        }
        Some(n) if n as u64 > max as u64 => {
            return Err(ApiError::bad(format!(
                "n_predict {n} exceeds the server limit {max}"
            )))
        }
        Some(n) => n as usize,
    };
    let p = &spec.params;
    if !p.temperature.is_finite() {
        return Err(ApiError::bad("temperature must be a finite number"));
    }
    p.validate().map_err(|e| ApiError::bad(e.to_string()))?;
    let mut stop = vec![false; vocab];
    for (i, &id) in spec.stop_ids.iter().enumerate() {
        match stop.get_mut(id as usize) {
            Some(slot) => *slot = true,
            None => {
                return Err(ApiError::bad(format!(
                    "stop_ids[{i}] is not a token id of this model (vocabulary size {vocab})"
                )))
            }
        }
    }
    if let Some(slot) = s
        .meta
        .eos_id
        .filter(|_| !spec.ignore_eos)
        .and_then(|e| stop.get_mut(e as usize))
    {
        *slot = true;
    }
    let max_probs = s.limits.max_n_probs.min(vocab);
    if spec.n_probs > max_probs {
        return Err(ApiError::bad(format!(
            "n_probs {} exceeds the limit {max_probs}",
            spec.n_probs
        )));
    }
    Ok(Valid {
        prompt: spec.prompt,
        max_new,
        params: spec.params,
        stop,
        n_probs: spec.n_probs,
    })
}

/// Validates, enqueues and waits until the worker starts the job; then returns its event stream.
async fn submit(
    state: &AppState,
    spec: GenSpec,
) -> Result<(UnboundedReceiver<Event>, usize), ApiError> {
    let Valid {
        prompt,
        max_new,
        params,
        stop,
        n_probs,
    } = validate(state, spec)?;
    let s = &state.0;
    let m = &s.shared.metrics;
    if s.shared.is_shutting_down() {
        m.rejected_shutdown.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::ShuttingDown);
    }
    let prompt_n = prompt.len();
    let (tx, mut rx) = unbounded_channel();
    let job = Job {
        prompt,
        max_new,
        params,
        stop,
        n_probs,
        enqueued: Instant::now(),
        events: tx,
    };
    m.queue_depth.fetch_add(1, Ordering::Relaxed);
    match s.jobs.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            m.queue_depth.fetch_sub(1, Ordering::Relaxed);
            m.rejected_queue_full.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::Busy);
        }
        Err(TrySendError::Disconnected(_)) => {
            m.queue_depth.fetch_sub(1, Ordering::Relaxed);
            m.rejected_shutdown.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::ShuttingDown);
        }
    }
    match rx.recv().await {
        Some(Event::Started) => Ok((rx, prompt_n)),
        Some(Event::Failed(msg)) => Err(ApiError::Internal(msg)),
        Some(Event::Cancelled) | None => {
            m.rejected_shutdown.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::ShuttingDown)
        }
        Some(_) => Err(ApiError::Internal("job events out of order".into())),
    }
}

/// What a whole (non-streamed) job produced.
struct Collected {
    tokens: Vec<u32>,
    probs: Vec<PositionProbs>,
    stop: StopType,
    timings: Timings,
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Collected, ApiError> {
    let mut tokens = Vec::new();
    let mut probs = Vec::new();
    loop {
        match rx.recv().await {
            Some(Event::Token { id, probs: p }) => {
                tokens.push(id);
                probs.extend(p);
            }
            Some(Event::Done { stop, timings }) => {
                return Ok(Collected {
                    tokens,
                    probs,
                    stop,
                    timings,
                })
            }
            Some(Event::Failed(msg)) => return Err(ApiError::Internal(msg)),
            Some(Event::Started) | Some(Event::Cancelled) | None => {
                return Err(ApiError::Internal("the job ended unexpectedly".into()))
            }
        }
    }
}

/// A server-sent-event stream over a job's events: `on_event` maps each event to the SSE events
/// to send and whether the stream is finished.
fn sse_stream<F>(
    rx: UnboundedReceiver<Event>,
    on_event: F,
) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnMut(Option<Event>) -> (Vec<SseEvent>, bool) + Send + 'static,
{
    stream::unfold(Some((rx, on_event)), |st| async move {
        let (mut rx, mut f) = st?;
        let ev = rx.recv().await;
        let (out, done) = f(ev);
        Some((out, if done { None } else { Some((rx, f)) }))
    })
    .flat_map(|v| stream::iter(v.into_iter().map(Ok)))
}

fn json_event<T: serde::Serialize>(v: &T) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(v).unwrap_or_default())
}

fn error_event(msg: &str) -> SseEvent {
    json_event(&ApiError::Internal(msg.to_string()).body())
}

// ---------------------------------------------------------------------------------------------
// POST /completion

async fn completion(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let spec = GenSpec {
        prompt: req.prompt,
        n_predict: Some(req.n_predict),
        params: SamplingParams {
            temperature: req.temperature,
            top_k: req.top_k,
            top_p: req.top_p,
            repeat_penalty: req.repeat_penalty,
            repeat_last_n: req.repeat_last_n,
            seed: req.seed,
        },
        stop_ids: req.stop_ids,
        ignore_eos: req.ignore_eos,
        n_probs: req.n_probs,
    };
    let (rx, prompt_n) = submit(&state, spec).await?;
    if !req.stream {
        let c = collect(rx).await?;
        return Ok(Json(CompletionResponse {
            content: String::new(),
            tokens_predicted: c.tokens.len(),
            tokens: c.tokens,
            stop: true,
            stop_type: c.stop,
            tokens_evaluated: prompt_n,
            completion_probabilities: c.probs,
            timings: Some(c.timings),
        })
        .into_response());
    }
    let mut n = 0usize;
    let stream = sse_stream(rx, move |ev| match ev {
        Some(Event::Token { id, probs }) => {
            n += 1;
            let chunk = CompletionResponse {
                content: String::new(),
                tokens: vec![id],
                stop: false,
                stop_type: StopType::None,
                tokens_predicted: n,
                tokens_evaluated: prompt_n,
                completion_probabilities: probs.into_iter().collect(),
                timings: None,
            };
            (vec![json_event(&chunk)], false)
        }
        Some(Event::Done { stop, timings }) => {
            let chunk = CompletionResponse {
                content: String::new(),
                tokens: Vec::new(),
                stop: true,
                stop_type: stop,
                tokens_predicted: n,
                tokens_evaluated: prompt_n,
                completion_probabilities: Vec::new(),
                timings: Some(timings),
            };
            (vec![json_event(&chunk)], true)
        }
        Some(Event::Failed(msg)) => (vec![error_event(&msg)], true),
        Some(Event::Started) | Some(Event::Cancelled) | None => {
            (vec![error_event("the job ended unexpectedly")], true)
        }
    });
    Ok(Sse::new(stream).into_response())
}

// ---------------------------------------------------------------------------------------------
// POST /v1/completions

const OPENAI_FIELDS: [&str; 8] = [
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stream",
    "stop_ids",
];

fn finish_reason(stop: StopType) -> String {
    match stop {
        StopType::Eos => "stop".into(),
        StopType::Limit | StopType::None => "length".into(),
    }
}

async fn openai_completions(
    State(state): State<AppState>,
    ApiJson(value): ApiJson<serde_json::Value>,
) -> Result<Response, ApiError> {
    let obj = value
        .as_object()
        .ok_or_else(|| ApiError::bad("the body must be a JSON object"))?;
    if let Some(k) = obj.keys().find(|k| !OPENAI_FIELDS.contains(&k.as_str())) {
        let hint = if k == "stop" {
            " (the server has no tokenizer: use stop_ids)"
        } else {
            ""
        };
        return Err(ApiError::bad(format!(
            "unknown field `{k}`, expected one of {OPENAI_FIELDS:?}{hint}"
        )));
    }
    let req: OpenAiCompletionRequest = serde_json::from_value(value)
        .map_err(|e| ApiError::bad(format!("invalid request: {e}")))?;
    let spec = GenSpec {
        prompt: req.prompt,
        n_predict: req.max_tokens.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
        params: SamplingParams {
            temperature: req.temperature.unwrap_or(1.0),
            top_k: 0,
            top_p: req.top_p.unwrap_or(1.0),
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            seed: req.seed.unwrap_or(0),
        },
        stop_ids: req.stop_ids,
        ignore_eos: false,
        n_probs: 0,
    };
    let (rx, prompt_n) = submit(&state, spec).await?;
    let id = format!(
        "cmpl-{:08x}",
        state.0.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let model = state.0.meta.id.clone();
    let response = move |tokens: Vec<u32>, finish: Option<String>, usage: Option<Usage>| {
        OpenAiCompletionResponse {
            id: id.clone(),
            object: "text_completion".into(),
            created,
            model: model.clone(),
            choices: vec![OpenAiChoice {
                index: 0,
                text: String::new(),
                tokens,
                finish_reason: finish,
            }],
            usage,
        }
    };
    let usage = move |n: usize| Usage {
        prompt_tokens: prompt_n,
        completion_tokens: n,
        total_tokens: prompt_n + n,
    };
    if !req.stream {
        let c = collect(rx).await?;
        let u = usage(c.tokens.len());
        return Ok(Json(response(c.tokens, Some(finish_reason(c.stop)), Some(u))).into_response());
    }
    let mut n = 0usize;
    let stream = sse_stream(rx, move |ev| match ev {
        Some(Event::Token { id, .. }) => {
            n += 1;
            (vec![json_event(&response(vec![id], None, None))], false)
        }
        Some(Event::Done { stop, .. }) => (
            vec![
                json_event(&response(
                    Vec::new(),
                    Some(finish_reason(stop)),
                    Some(usage(n)),
                )),
                SseEvent::default().data("[DONE]"),
            ],
            true,
        ),
        Some(Event::Failed(msg)) => (vec![error_event(&msg)], true),
        Some(Event::Started) | Some(Event::Cancelled) | None => {
            (vec![error_event("the job ended unexpectedly")], true)
        }
    });
    Ok(Sse::new(stream).into_response())
}
