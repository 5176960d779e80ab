//! equicrypt-proxy: an OpenAI-compatible plaintext front for a blind server.
//!
//! Applications talk plaintext to this proxy on the user's own machine (loopback by default). The
//! proxy holds the key and the tokenizer: it renders the chat template, tokenizes, encrypts the
//! ids, sends only ciphertext ids to the blind server, and decrypts the returned stream back to
//! text. Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health`; streaming answers are OpenAI server-sent events ending in `data: [DONE]`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod openai;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use equicrypt_client::remote::{BlindChat, GenerateParams, RemoteClient};
use equicrypt_client::{ChatMessage, ChatTemplate, CipherSession};
use equicrypt_core::KeyFingerprint;
use equicrypt_protocol::{ErrorBody, StopType};
use futures_util::stream::Stream;
use tokio::sync::mpsc;

pub use openai::{ChatCompletionRequest, CompletionRequest as TextCompletionRequest};

/// Everything the proxy needs, shared by all requests.
pub struct ProxyState {
    /// Tokenizer and vocabulary permutation.
    pub session: CipherSession,
    /// The model's chat template.
    pub template: Option<ChatTemplate>,
    /// The blind server.
    pub client: RemoteClient,
    /// Model id reported to applications.
    pub model_id: String,
    /// Fingerprint of the key: the server must serve a model encrypted with it.
    pub fingerprint: KeyFingerprint,
}

/// Errors answered as OpenAI-style JSON.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The request is malformed or unsupported.
    #[error("{0}")]
    BadRequest(String),
    /// The request body is larger than the proxy reads (axum's default cap, 2 MB).
    #[error("request body too large: {0}")]
    TooLarge(String),
    /// The blind server failed.
    #[error("upstream: {0}")]
    Upstream(String),
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            ProxyError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error"),
            ProxyError::Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream_error"),
        };
        let mut resp = (status, Json(ErrorBody::new(kind, self.to_string()))).into_response();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is never read, so the connection cannot carry another request.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// JSON extractor whose rejections are OpenAI-style JSON errors.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ProxyError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ProxyError::TooLarge(e.body_text()))
            }
            Err(e) => Err(ProxyError::BadRequest(e.body_text())),
        }
    }
}

/// The proxy's routes.
pub fn router(state: Arc<ProxyState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(ErrorBody::new("not_found", "no such endpoint")),
            )
        })
        // axum's own 405 has an empty body; OpenAI clients expect a JSON error.
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(ErrorBody::new(
                    "invalid_request_error",
                    "method not allowed on this endpoint",
                )),
            )
        })
        .with_state(state)
}

/// A response id unique within this process (`PREFIX-SECONDS-COUNTER`): OpenAI clients use ids to
/// tell completions apart, and seconds alone repeat within a second.
fn response_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        now(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(s: StopType) -> &'static str {
    match s {
        StopType::Limit => "length",
        _ => "stop",
    }
}

async fn models(State(st): State<Arc<ProxyState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{"id": st.model_id, "object": "model", "owned_by": "equicrypt", "created": 0}],
    }))
}

/// What one request asks the blind server for.
struct Job {
    prompt: String,
    params: GenerateParams,
    stream: bool,
    include_usage: bool,
    chat: bool,
    model: String,
}

/// Pieces sent from the generating task to the response.
enum Piece {
    Text(String),
    Done {
        stop: StopType,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

fn spawn_generation(st: Arc<ProxyState>, job: &Job) -> mpsc::UnboundedReceiver<Piece> {
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt = job.prompt.clone();
    let params = job.params.clone();
    tokio::spawn(async move {
        let chat = BlindChat::new(&st.session, &st.client);
        let txt = tx.clone();
        let generation = chat.generate(&prompt, params, move |text, _ids| {
            if !text.is_empty() {
                let _ = txt.send(Piece::Text(text.to_string()));
            }
        });
        // When the application goes away (the receiver is dropped), dropping the generation
        // closes the connection to the blind server, which then stops generating.
        let out = tokio::select! {
            out = generation => out,
            () = tx.closed() => return,
        };
        let _ = tx.send(match out {
            Ok(o) => Piece::Done {
                stop: o.stop_type,
                prompt_tokens: o.prompt_cipher_ids.len(),
                completion_tokens: o.cipher_ids.len(),
            },
            Err(e) => Piece::Failed(e.to_string()),
        });
    });
    rx
}

async fn run(st: Arc<ProxyState>, job: Job) -> Result<Response, ProxyError> {
    // Check the server's key fingerprint before sending anything derived from the prompt.
    st.client
        .check_fingerprint(&st.fingerprint)
        .await
        .map_err(|e| ProxyError::Upstream(e.to_string()))?;
    let id = response_id(if job.chat { "chatcmpl" } else { "cmpl" });
    let created = now();
    let mut rx = spawn_generation(st, &job);
    if !job.stream {
        let mut text = String::new();
        while let Some(p) = rx.recv().await {
            match p {
                Piece::Text(t) => text.push_str(&t),
                Piece::Failed(e) => return Err(ProxyError::Upstream(e)),
                Piece::Done {
                    stop,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let usage = openai::usage(prompt_tokens, completion_tokens);
                    let body = if job.chat {
                        openai::chat_response(
                            &id,
                            created,
                            &job.model,
                            text,
                            finish_reason(stop),
                            usage,
                        )
                    } else {
                        openai::text_response(
                            &id,
                            created,
                            &job.model,
                            text,
                            finish_reason(stop),
                            usage,
                        )
                    };
                    return Ok(Json(body).into_response());
                }
            }
        }
        return Err(ProxyError::Upstream(
            "generation ended without a result".into(),
        ));
    }
    let stream = sse_stream(rx, id, created, job);
    Ok(Sse::new(stream).into_response())
}

fn sse_stream(
    mut rx: mpsc::UnboundedReceiver<Piece>,
    id: String,
    created: u64,
    job: Job,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream(move |tx| async move {
        if job.chat {
            let first = openai::chat_chunk(&id, created, &job.model, Some("assistant"), None, None);
            if !tx.send(Event::default().data(first.to_string())).await {
                return;
            }
        }
        while let Some(p) = rx.recv().await {
            match p {
                Piece::Text(t) => {
                    let c = if job.chat {
                        openai::chat_chunk(&id, created, &job.model, None, Some(&t), None)
                    } else {
                        openai::text_chunk(&id, created, &job.model, &t, None)
                    };
                    if !tx.send(Event::default().data(c.to_string())).await {
                        // Dropping `rx` cancels the generation.
                        return;
                    }
                }
                Piece::Failed(e) => {
                    let err = serde_json::to_string(&ErrorBody::new("upstream_error", e))
                        .unwrap_or_default();
                    tx.send(Event::default().data(err)).await;
                    break;
                }
                Piece::Done {
                    stop,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let reason = finish_reason(stop);
                    let c = if job.chat {
                        openai::chat_chunk(&id, created, &job.model, None, None, Some(reason))
                    } else {
                        openai::text_chunk(&id, created, &job.model, "", Some(reason))
                    };
                    tx.send(Event::default().data(c.to_string())).await;
                    if job.include_usage {
                        let u = openai::usage_chunk(
                            &id,
                            created,
                            &job.model,
                            job.chat,
                            openai::usage(prompt_tokens, completion_tokens),
                        );
                        tx.send(Event::default().data(u.to_string())).await;
                    }
                    break;
                }
            }
        }
        tx.send(Event::default().data("[DONE]")).await;
    })
}

/// A tiny channel-backed stream builder (avoids a dependency on `async-stream`).
struct Yield(mpsc::Sender<Event>);

impl Yield {
    /// Sends one event; `false` once the response body is gone (the application disconnected).
    async fn send(&self, e: Event) -> bool {
        self.0.send(e).await.is_ok()
    }
}

fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(Yield) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(f(Yield(tx)));
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
    )
}

async fn chat_completions(
    State(st): State<Arc<ProxyState>>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ProxyError> {
    req.validate().map_err(ProxyError::BadRequest)?;
    let template = st
        .template
        .as_ref()
        .ok_or_else(|| ProxyError::BadRequest("the model has no chat template".into()))?;
    let messages: Vec<ChatMessage> = req
        .messages
        .iter()
        .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
        .collect();
    let prompt = template
        .render(&messages, true)
        .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    let job = Job {
        prompt,
        params: req.params(),
        stream: req.sampling.stream,
        include_usage: req.sampling.include_usage(),
        chat: true,
        model: st.model_id.clone(),
    };
    run(st, job).await
}

async fn completions(
    State(st): State<Arc<ProxyState>>,
    ApiJson(req): ApiJson<TextCompletionRequest>,
) -> Result<Response, ProxyError> {
    req.validate().map_err(ProxyError::BadRequest)?;
    let job = Job {
        prompt: req.prompt.clone(),
        params: req.params(),
        stream: req.sampling.stream,
        include_usage: req.sampling.include_usage(),
        chat: false,
        model: st.model_id.clone(),
    };
    run(st, job).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_ids_are_unique() {
        let a = response_id("chatcmpl");
        let b = response_id("chatcmpl");
        assert_ne!(a, b);
        assert!(a.starts_with("chatcmpl-"));
    }

    fn json_request(body: Vec<u8>) -> Request {
        Request::builder()
            .method("POST")
            .header(header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::from(body))
            .unwrap()
    }

    #[tokio::test]
    async fn an_oversized_body_is_413_and_closes_the_connection() {
        let mut big = b"{\"prompt\": \"".to_vec();
        big.resize(3 << 20, b'a');
        big.extend_from_slice(b"\"}");
        let err = match ApiJson::<serde_json::Value>::from_request(json_request(big), &()).await {
            Err(e) => e,
            Ok(_) => panic!("a 3 MiB body was accepted"),
        };
        assert!(matches!(err, ProxyError::TooLarge(_)), "{err:?}");
        let resp = err.into_response();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(resp.headers()[header::CONNECTION], "close");

        // Bad JSON of a normal size stays a 400 on a reusable connection.
        let err = match ApiJson::<serde_json::Value>::from_request(json_request(b"{".to_vec()), &())
            .await
        {
            Err(e) => e,
            Ok(_) => panic!("\"{{\" parsed"),
        };
        let resp = err.into_response();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert!(resp.headers().get(header::CONNECTION).is_none());
    }
}
