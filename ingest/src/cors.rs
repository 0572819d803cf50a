//! Cross-origin access to `POST /v1/events` for web pages (the JavaScript
//! SDK): which origins may post, and the preflight answer.
//!
//! Nothing but the collector's own origin is allowed unless configured. A
//! browser always sends `Origin` on a cross-origin POST, so a page of another
//! origin is refused outright (403) instead of only being kept from reading
//! the answer: an ingest key is public by design, and this is what keeps a
//! foreign site from posting with it. Clients that are not browsers send no
//! `Origin` and are not affected.

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::IngestError;

/// What a preflight may ask for: the SDK sends its key either as
/// `Authorization` or as `?key=`, its body as NDJSON, maybe gzipped.
const ALLOWED_HEADERS: &str = "authorization, content-type, content-encoding";
/// `Retry-After` is not a CORS-safelisted response header; without this the
/// SDK could not honour it.
const EXPOSED_HEADERS: &str = "retry-after";
/// Browsers cap this (Chromium at 2 hours); a day asks for the most.
const PREFLIGHT_MAX_AGE_SECONDS: &str = "86400";

/// The origins allowed to post from a web page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorsOrigins {
    origins: Vec<String>,
}

/// How a request stands with respect to cross-origin rules.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OriginCheck {
    /// No `Origin`, or the collector's own: no CORS headers are needed.
    NotCrossOrigin,
    /// An allowed foreign origin: answered with its CORS headers.
    Allowed(HeaderValue),
    /// A foreign origin that is not allowed.
    Refused,
}

impl CorsOrigins {
    /// `origins` are exact origins such as `https://app.example.com` (scheme,
    /// host and port, no path), or `*` for any. Trailing slashes are ignored.
    pub fn new(origins: impl IntoIterator<Item = String>) -> CorsOrigins {
        CorsOrigins {
            origins: origins
                .into_iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect(),
        }
    }

    /// Whether no foreign origin is allowed.
    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    fn allows(&self, origin: &str) -> bool {
        self.origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }

    pub(crate) fn check(&self, headers: &HeaderMap) -> OriginCheck {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return OriginCheck::NotCrossOrigin;
        };
        let Ok(text) = origin.to_str() else {
            return OriginCheck::Refused;
        };
        if is_same_origin(text, headers) {
            return OriginCheck::NotCrossOrigin;
        }
        if self.allows(text) {
            OriginCheck::Allowed(origin.clone())
        } else {
            OriginCheck::Refused
        }
    }

    /// The answer to `OPTIONS /v1/events`: for an allowed origin, the
    /// headers that let it POST (the browser itself refuses other methods
    /// against `Access-Control-Allow-Methods`); for a refused one, an error.
    pub(crate) fn preflight(&self, headers: &HeaderMap) -> Result<Response, IngestError> {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let out = response.headers_mut();
        match self.check(headers) {
            OriginCheck::Refused => return Err(IngestError::OriginNotAllowed),
            OriginCheck::NotCrossOrigin => {
                out.insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
            }
            OriginCheck::Allowed(origin) => {
                allow(out, origin);
                out.insert(
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    HeaderValue::from_static("POST"),
                );
                out.insert(
                    header::ACCESS_CONTROL_ALLOW_HEADERS,
                    HeaderValue::from_static(ALLOWED_HEADERS),
                );
                out.insert(
                    header::ACCESS_CONTROL_MAX_AGE,
                    HeaderValue::from_static(PREFLIGHT_MAX_AGE_SECONDS),
                );
            }
        }
        Ok(response)
    }
}

/// Adds the headers that let `origin` read an answer.
pub(crate) fn allow(out: &mut HeaderMap, origin: HeaderValue) {
    out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    out.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSED_HEADERS),
    );
    // Answers differ by origin; a shared cache must not hand one origin's to another.
    out.append(header::VARY, HeaderValue::from_static("origin"));
}

/// Whether `origin` (`scheme://host[:port]`) names the host the request was sent to.
fn is_same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let host = headers
        .get(FORWARDED_HOST)
        .or_else(|| headers.get(header::HOST))
        .and_then(|h| h.to_str().ok());
    let authority = origin.split_once("://").map(|(_, rest)| rest);
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
}

/// Set by reverse proxies that rewrite `Host`, so the page's origin still matches.
const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
