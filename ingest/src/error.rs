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
    #[error(
        "this key may post {events_per_second} events a second; retry after {retry_after_secs} s"
    )]
    RateLimited {
        events_per_second: f64,
        retry_after_secs: u64,
    },
    #[error("a request of {events} events is more than this key's burst of {burst}; send smaller requests")]
    OverBurst { events: u64, burst: u64 },
}

impl IngestError {
    /// Whether the client may retry the same request later.
    pub fn is_retryable(&self) -> bool {
        match self {
            IngestError::Log(e) => e.is_retryable(),
            IngestError::RateLimited { .. } => true,
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
            IngestError::RateLimited { .. } => "rate_limited",
            IngestError::OverBurst { .. } => "over_burst",
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::Unauthorized => StatusCode::UNAUTHORIZED,
            IngestError::OriginNotAllowed => StatusCode::FORBIDDEN,
            IngestError::BodyTooLarge { .. } | IngestError::OverBurst { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            IngestError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
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
        let retry_after = match &self {
            IngestError::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ if self.is_retryable() => Some(1),
            _ => None,
        };
        let mut response = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
