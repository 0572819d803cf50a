//! Request-level failures of the collector and their HTTP form.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tidemark_log::LogError;

/// Why a whole request failed. Per-event problems are not errors: they are
/// reported in the reply and sent to the dead-letter topic.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("origin not allowed to post events (see --cors-origin)")]
    OriginNotAllowed,
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("invalid gzip body: {0}")]
    InvalidGzip(String),
    #[error("unsupported Content-Encoding `{0}`")]
    UnsupportedEncoding(String),
    #[error("invalid JSON array: {0}")]
    InvalidJson(String),
    #[error("request body has no events")]
    EmptyBody,
    #[error("failed to read request body: {0}")]
    BodyRead(String),
    #[error("log append failed: {0}")]
    Log(#[from] LogError),
}

impl IngestError {
    /// Whether the client may retry the same request later.
    pub fn is_retryable(&self) -> bool {
        match self {
            IngestError::Log(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// The reason label counted in `tidemark_ingest_events_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            IngestError::Unauthorized => "unauthorized",
            IngestError::OriginNotAllowed => "origin_not_allowed",
            IngestError::BodyTooLarge { .. } => "body_too_large",
            IngestError::InvalidGzip(_) => "invalid_gzip",
            IngestError::UnsupportedEncoding(_) => "unsupported_encoding",
            IngestError::InvalidJson(_) => "invalid_json",
            IngestError::EmptyBody => "empty_body",
            IngestError::BodyRead(_) => "body_read",
            IngestError::Log(_) => "log_unavailable",
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::Unauthorized => StatusCode::UNAUTHORIZED,
            IngestError::OriginNotAllowed => StatusCode::FORBIDDEN,
            IngestError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::InvalidGzip(_)
            | IngestError::InvalidJson(_)
            | IngestError::EmptyBody
            | IngestError::BodyRead(_) => StatusCode::BAD_REQUEST,
            IngestError::Log(e) if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Log(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(serde::Serialize)]
struct ErrorBody {
    error: String,
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry = self.is_retryable();
        let mut response = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
