//! Ingest: the HTTP collector at the front of the data flow.
//!
//! `POST /v1/events` takes a JSON array or NDJSON (optionally gzip), checks the
//! API key, validates and enriches each event, drops duplicates by `event_id`,
//! and appends the accepted ones to the log; rejected ones go to the
//! dead-letter topic with their reason. Web pages post to it too (the
//! JavaScript SDK in `sdk/js`): from the origins `--cors-origin` allows, with
//! the key as `?key=` where a header cannot be set (`sendBeacon`).

mod cors;
mod dedup;
mod error;
mod limit;
mod metrics;

use std::io::Read;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use rustc_hash::FxHashSet;
use serde::Serialize;
use serde_json::value::RawValue;
use tidemark_log::{Log, LogError, Record};
use tidemark_model::{topic, wire, DeadLetter, Event, EventTime, Limits};

pub use cors::CorsOrigins;
pub use dedup::Dedup;
pub use error::IngestError;
pub use limit::{RateLimit, RateLimitArgs};
pub use metrics::IngestMetrics;

/// Settings of the collector.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Accepted keys, sent as `Authorization: Bearer <key>` or `?key=<key>`.
    pub api_keys: Vec<String>,
    /// Foreign origins whose pages may post (the collector's own always may).
    pub cors_origins: CorsOrigins,
    /// Validation limits applied to every event.
    pub limits: Limits,
    /// Largest request body, before and after gzip decompression.
    pub max_body_bytes: usize,
    /// How long an accepted `event_id` makes later copies duplicates.
    pub dedup_window: Duration,
    /// Most `event_id`s remembered; the oldest are forgotten first.
    pub dedup_capacity: usize,
    /// Events a second (and burst) each key may post; unlimited if `None`.
    pub rate_limit: Option<RateLimit>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            api_keys: Vec::new(),
            cors_origins: CorsOrigins::default(),
            limits: Limits::default(),
            max_body_bytes: 5 * 1024 * 1024,
            dedup_window: Duration::from_secs(10 * 60),
            dedup_capacity: 1_000_000,
            rate_limit: None,
        }
    }
}

/// Shared state of the collector's handlers.
#[derive(Debug)]
pub struct IngestState {
    config: IngestConfig,
    log: Arc<dyn Log>,
    metrics: IngestMetrics,
    ids: Mutex<Ids>,
    /// Woken whenever a request gives up its claims (see [`Claims`]).
    claims_released: tokio::sync::Notify,
    limiter: Option<limit::Limiter>,
}

/// The `event_id`s ingest knows of: appended ones (`seen`), and those a
/// request is appending now (`in_flight`), so that a concurrent request
/// with the same id waits for that append's outcome instead of appending
/// the event a second time.
#[derive(Debug)]
struct Ids {
    seen: Dedup,
    in_flight: FxHashSet<u64>,
}

/// A request's claims on the ids it appends; given up when dropped (also
/// when the request is cancelled), after the appended ones were marked seen.
struct Claims<'a> {
    state: &'a IngestState,
    hashes: FxHashSet<u64>,
}

impl Claims<'_> {
    fn release(&mut self) {
        if self.hashes.is_empty() {
            return;
        }
        let mut ids = self
            .state
            .ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for hash in self.hashes.drain() {
            ids.in_flight.remove(&hash);
        }
        drop(ids);
        self.state.claims_released.notify_waiters();
    }
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

impl IngestState {
    /// State over `log`; the dedup memory starts empty.
    pub fn new(config: IngestConfig, log: Arc<dyn Log>, metrics: IngestMetrics) -> IngestState {
        let ids = Mutex::new(Ids {
            seen: Dedup::new(config.dedup_window, config.dedup_capacity),
            in_flight: FxHashSet::default(),
        });
        let limiter = config
            .rate_limit
            .map(|limit| limit::Limiter::new(limit, config.api_keys.len(), Instant::now()));
        IngestState {
            config,
            log,
            metrics,
            ids,
            claims_released: tokio::sync::Notify::new(),
            limiter,
        }
    }

    /// Creates the event topics and the dead-letter topic with their default
    /// partition counts (existing topics are left as they are).
    pub async fn ensure_topics(&self) -> Result<(), LogError> {
        for t in topic::INPUT_TOPICS.iter().chain([&topic::DEAD_LETTER]) {
            self.log
                .ensure_topic(t, topic::default_partitions(t))
                .await?;
        }
        Ok(())
    }

    /// The metrics this state counts into.
    pub fn metrics(&self) -> &IngestMetrics {
        &self.metrics
    }

    /// The settings the state was built with.
    pub fn config(&self) -> &IngestConfig {
        &self.config
    }
}

/// The collector's routes: `POST /v1/events` and its CORS preflight.
pub fn router(state: Arc<IngestState>) -> Router {
    Router::new()
        .route("/v1/events", post(post_events).options(preflight))
        .with_state(state)
}

/// The reply to a request whose body was read and parsed.
#[derive(Debug, Serialize)]
struct Summary {
    accepted: usize,
    duplicates: usize,
    rejected: Vec<Rejection>,
}

#[derive(Debug, Serialize)]
struct Rejection {
    index: usize,
    reason: &'static str,
    error: String,
}

async fn preflight(State(state): State<Arc<IngestState>>, headers: HeaderMap) -> Response {
    state
        .config
        .cors_origins
        .preflight(&headers)
        .unwrap_or_else(IntoResponse::into_response)
}

async fn post_events(
    State(state): State<Arc<IngestState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let origin = state.config.cors_origins.check(&headers);
    let result = match origin {
        cors::OriginCheck::Refused => Err(IngestError::OriginNotAllowed),
        _ => ingest(&state, &uri, &headers, body).await,
    };
    let mut response = match result {
        Ok(response) => response,
        Err(e) => {
            if let IngestError::Log(err) = &e {
                tracing::warn!(error = %err, "Log append failed; request refused");
            } else {
                state
                    .metrics
                    .rejected
                    .with_label_values(&[e.reason()])
                    .inc();
            }
            e.into_response()
        }
    };
    if let cors::OriginCheck::Allowed(origin) = origin {
        cors::allow(response.headers_mut(), origin);
    }
    state
        .metrics
        .requests
        .with_label_values(&[response.status().as_str()])
        .inc();
    response
}

/// Awaits `append`, observing how long it took in `histogram`.
async fn timed<T>(
    histogram: &prometheus::Histogram,
    append: impl std::future::Future<Output = T>,
) -> T {
    let started = Instant::now();
    let result = append.await;
    histogram.observe(started.elapsed().as_secs_f64());
    result
}

/// Splits `parsed` into the events to append, claimed for this request, and
/// the count of duplicates: of an appended event, or of an earlier event of
/// the same request. An id another request is appending right now is
/// neither yet: the request gives up its claims, waits for that append's
/// outcome, and looks again (holding no claim while it waits, so two
/// requests can never wait for each other).
async fn claim_ids(
    state: &IngestState,
    parsed: Vec<(u64, Event)>,
    received_at: EventTime,
) -> (Vec<(u64, Event)>, usize, Claims<'_>) {
    let mut claims = Claims {
        state,
        hashes: FxHashSet::default(),
    };
    let mut events: Vec<Option<(u64, Event)>> = parsed.into_iter().map(Some).collect();
    loop {
        let released = state.claims_released.notified();
        tokio::pin!(released);
        // Registered before looking, so a release in between is not missed.
        released.as_mut().enable();
        let mut fresh = Vec::with_capacity(events.len());
        let mut duplicates = 0;
        let mut blocked = false;
        {
            let mut ids = state.ids.lock().unwrap_or_else(PoisonError::into_inner);
            for (i, item) in events.iter().enumerate() {
                let Some((hash, _)) = item else { continue };
                if ids.seen.contains(*hash, received_at) || claims.hashes.contains(hash) {
                    duplicates += 1;
                } else if ids.in_flight.contains(hash) {
                    blocked = true;
                    break;
                } else {
                    ids.in_flight.insert(*hash);
                    claims.hashes.insert(*hash);
                    fresh.push(i);
                }
            }
        }
        if !blocked {
            let fresh = fresh.into_iter().filter_map(|i| events[i].take()).collect();
            return (fresh, duplicates, claims);
        }
        claims.release();
        released.await;
    }
}

/// One accepted event waiting for its append; ranges index the request's buffer.
struct Pending {
    key: Range<usize>,
    value: Range<usize>,
    timestamp: EventTime,
    id_hash: u64,
}

async fn ingest(
    state: &IngestState,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, IngestError> {
    let Some(key) = authorized_key(headers, uri.query(), &state.config.api_keys) else {
        return Err(IngestError::Unauthorized);
    };
    let body = read_body(headers, body, state.config.max_body_bytes).await?;
    let received_at = EventTime::now();
    let items = split_events(&body)?;
    if items.is_empty() {
        return Err(IngestError::EmptyBody);
    }
    if let Some(limiter) = &state.limiter {
        // Before anything is appended: a limited request leaves no trace.
        let events = items.len() as u64;
        let limit = limiter.limit();
        match limiter.take(key, events, Instant::now()) {
            Ok(()) => {}
            Err(limit::Refusal::Wait(wait)) => {
                return Err(IngestError::RateLimited {
                    events_per_second: limit.events_per_second,
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                })
            }
            Err(limit::Refusal::OverBurst) => {
                return Err(IngestError::OverBurst {
                    events,
                    burst: limit.burst,
                })
            }
        }
    }

    let mut rejected = Vec::new();
    let mut parsed = Vec::with_capacity(items.len());
    for (index, raw) in items.iter().enumerate() {
        match Event::from_json(raw, received_at, &state.config.limits) {
            Ok(ev) => parsed.push((dedup::id_hash(&ev.event_id), ev)),
            Err(e) => rejected.push((index, e)),
        }
    }

    let (fresh, duplicates, mut claims) = claim_ids(state, parsed, received_at).await;

    // Every key and value of the request lives in one buffer; records slice it.
    let mut buf = Vec::with_capacity(body.len() + 64 * rejected.len());
    let mut groups: Vec<(&'static str, Vec<Pending>)> = Vec::with_capacity(4);
    for (hash, ev) in &fresh {
        let t = topic::topic_for(&ev.event_type);
        let key_start = buf.len();
        buf.extend_from_slice(ev.user_id.as_bytes());
        let value_start = buf.len();
        wire::encode(ev, &mut buf);
        let pending = Pending {
            key: key_start..value_start,
            value: value_start..buf.len(),
            timestamp: ev.timestamp,
            id_hash: *hash,
        };
        match groups.iter_mut().find(|(name, _)| *name == t) {
            Some((_, group)) => group.push(pending),
            None => groups.push((t, vec![pending])),
        }
    }
    let mut dead = Vec::with_capacity(rejected.len());
    for (index, e) in &rejected {
        let key_start = buf.len();
        buf.extend_from_slice(index.to_string().as_bytes());
        let value_start = buf.len();
        let letter = DeadLetter::refused(e, items[*index]);
        if serde_json::to_writer(&mut buf, &letter).is_err() {
            // Serialising plain strings into a Vec cannot fail; drop the letter if it ever does.
            buf.truncate(key_start);
            continue;
        }
        dead.push(Pending {
            key: key_start..value_start,
            value: value_start..buf.len(),
            timestamp: received_at,
            id_hash: 0,
        });
    }
    let buf = Bytes::from(buf);
    let records = |pending: &[Pending]| -> Vec<Record> {
        pending
            .iter()
            .map(|p| Record {
                key: buf.slice(p.key.clone()),
                value: buf.slice(p.value.clone()),
                timestamp: p.timestamp,
            })
            .collect()
    };

    // Topics, dead letters included, are appended concurrently: their group
    // fsyncs overlap, and a request waits for one append's timeout at most.
    let appends = futures::future::join_all(
        groups
            .iter()
            .map(|(t, pending)| state.log.append(t, records(pending))),
    );
    let dead_letters = async {
        if dead.is_empty() {
            return None;
        }
        Some(
            timed(
                &state.metrics.append_seconds,
                state.log.append(topic::DEAD_LETTER, records(&dead)),
            )
            .await,
        )
    };
    let (results, dead_result) =
        futures::future::join(timed(&state.metrics.append_seconds, appends), dead_letters).await;
    match dead_result {
        None => {}
        Some(Ok(_)) => state.metrics.log_appended.inc_by(dead.len() as u64),
        // The client is told why each event was rejected either way; losing
        // the dead letter is not worth failing the accepted events.
        Some(Err(e)) => tracing::warn!(error = %e, count = dead.len(), "Dead-letter append failed"),
    }
    let mut first_error = None;
    for ((_, pending), result) in groups.iter().zip(results) {
        if let Err(e) = result {
            first_error.get_or_insert(e);
            continue;
        }
        // Only now are these ids durable; marking them earlier would turn a
        // retry after a failed append into a silently dropped duplicate.
        let mut ids = state.ids.lock().unwrap_or_else(PoisonError::into_inner);
        for p in pending {
            ids.seen.insert(p.id_hash, received_at);
        }
        // Under the same lock, so concurrent requests cannot lower it.
        state
            .metrics
            .observe_appended(pending.iter().map(|p| p.timestamp));
        drop(ids);
        state.metrics.log_appended.inc_by(pending.len() as u64);
        state.metrics.accepted.inc_by(pending.len() as u64);
    }
    // The appended ids are seen now: requests waiting on them find them
    // duplicates; those of a failed append are free to be appended again.
    claims.release();
    if let Some(e) = first_error {
        return Err(e.into());
    }

    state.metrics.duplicates.inc_by(duplicates as u64);
    for (_, e) in &rejected {
        state
            .metrics
            .rejected
            .with_label_values(&[e.reason()])
            .inc();
    }
    let summary = Summary {
        accepted: fresh.len(),
        duplicates,
        rejected: rejected
            .iter()
            .map(|(index, e)| Rejection {
                index: *index,
                reason: e.reason(),
                error: e.to_string(),
            })
            .collect(),
    };
    let status = if summary.accepted + summary.duplicates > 0 {
        StatusCode::ACCEPTED
    } else {
        StatusCode::BAD_REQUEST
    };
    Ok((status, Json(summary)).into_response())
}

/// The index of the configured key the request carries, as `Authorization:
/// Bearer <key>` or, for `sendBeacon`, which cannot set headers, as
/// `?key=<key>`.
fn authorized_key(headers: &HeaderMap, query: Option<&str>, keys: &[String]) -> Option<usize> {
    let from_header = headers.get(header::AUTHORIZATION).and_then(|value| {
        let value = value.as_bytes();
        value
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case(b"bearer "))
            .map(|_| value[7..].trim_ascii().to_vec())
    });
    let from_query = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(name, _)| name == "key")
            .map(|(_, key)| key.into_owned().into_bytes())
    });
    // Compare against every key without an early exit so timing does not leak a prefix.
    [from_header, from_query]
        .into_iter()
        .flatten()
        .find_map(|token| {
            keys.iter().enumerate().fold(None, |found, (index, key)| {
                let equal = constant_time_eq(&token, key.as_bytes());
                found.or(equal.then_some(index))
            })
        })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the body within `limit` bytes and undoes `Content-Encoding: gzip`,
/// bounding the decompressed size by the same limit.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, IngestError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(IngestError::BodyTooLarge { limit });
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(IngestError::BodyTooLarge { limit })
        }
        Err(e) => return Err(IngestError::BodyRead(e.to_string())),
    };
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("").trim());
    match encoding {
        None => Ok(bytes),
        Some(e) if e.is_empty() || e.eq_ignore_ascii_case("identity") => Ok(bytes),
        Some(e) if e.eq_ignore_ascii_case("gzip") || e.eq_ignore_ascii_case("x-gzip") => {
            gunzip(&bytes, limit)
        }
        Some(e) => Err(IngestError::UnsupportedEncoding(e.to_string())),
    }
}

fn gunzip(compressed: &[u8], limit: usize) -> Result<Bytes, IngestError> {
    let mut out = Vec::with_capacity(compressed.len().saturating_mul(4).min(limit));
    // Reading one byte past the limit tells "exactly at the limit" from "over it"
    // without ever inflating more than that.
    let mut reader = flate2::read::MultiGzDecoder::new(compressed).take(limit as u64 + 1);
    reader
        .read_to_end(&mut out)
        .map_err(|e| IngestError::InvalidGzip(e.to_string()))?;
    if out.len() > limit {
        return Err(IngestError::BodyTooLarge { limit });
    }
    Ok(Bytes::from(out))
}

/// Splits a body into the raw bytes of its events: a JSON array of objects when
/// it starts with `[`, otherwise NDJSON (one event per non-blank line).
/// `Content-Type` is not consulted: `text/plain` is what a page sends without
/// a CORS preflight, and what `sendBeacon` sends for a string body.
fn split_events(body: &[u8]) -> Result<Vec<&[u8]>, IngestError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let items: Vec<&RawValue> =
            serde_json::from_slice(body).map_err(|e| IngestError::InvalidJson(e.to_string()))?;
        return Ok(items.into_iter().map(|raw| raw.get().as_bytes()).collect());
    }
    Ok(body
        .split(|&b| b == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|line| !line.is_empty())
        .collect())
}

#[cfg(test)]
mod tests;
