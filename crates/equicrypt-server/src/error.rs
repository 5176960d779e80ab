//! Errors: [`ServerError`] for starting and running the server, [`ApiError`] for one HTTP answer.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use equicrypt_protocol::ErrorBody;

/// Everything that can stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The model file could not be read or loaded.
    #[error("model: {0}")]
    Model(String),
    /// A configuration value is out of its domain.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listen address is not a loopback address and remote access was not allowed.
    #[error("refusing to listen on non-loopback address {0} (pass --allow-remote to allow it)")]
    RemoteListen(std::net::SocketAddr),
    /// Binding or serving failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The worker thread ended abnormally.
    #[error("worker thread panicked")]
    WorkerPanicked,
}

/// An error answer of the HTTP API; every variant becomes a JSON [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// 400 `invalid_request_error`.
    #[error("{0}")]
    BadRequest(String),
    /// 413 `invalid_request_error`.
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// 404 `not_found`.
    #[error("no such endpoint")]
    NotFound,
    /// 405 `invalid_request_error`.
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    /// 503 `server_busy` with `Retry-After: 1`: the job queue is full.
    #[error("server busy: the job queue is full, retry later")]
    Busy,
    /// 503 `shutting_down`: the server is stopping and takes no new work.
    #[error("server is shutting down")]
    ShuttingDown,
    /// 500 `internal_error`.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// Shorthand for [`ApiError::BadRequest`].
    pub fn bad(msg: impl Into<String>) -> Self {
        ApiError::BadRequest(msg.into())
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Busy | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error.type` string of this error.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) | ApiError::TooLarge(_) | ApiError::MethodNotAllowed => {
                "invalid_request_error"
            }
            ApiError::NotFound => "not_found",
            ApiError::Busy => "server_busy",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::Internal(_) => "internal_error",
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody::new(self.kind(), self.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), Json(self.body())).into_response();
        if self == ApiError::Busy {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, ApiError::TooLarge(_)) {
            // The rest of the body is never read, so this connection cannot carry another
            // request: say so, or a keep-alive client reuses it and sees it reset.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}
