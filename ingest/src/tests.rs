use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use axum::http::Request;
use prometheus::{Encoder, Registry, TextEncoder};
use serde_json::Value;
use tidemark_log::{Position, StoredRecord};
use tower::ServiceExt;

use super::*;

const KEY: &str = "test-key";

/// A log in memory that can be switched to refuse appends like an unreachable broker.
#[derive(Debug, Default)]
struct MemLog {
    topics: Mutex<HashMap<String, Vec<Record>>>,
    unavailable: AtomicBool,
    appends: AtomicUsize,
    /// While set, an append waits for `resume` (after telling `entered`).
    paused: AtomicBool,
    entered: tokio::sync::Notify,
    resume: tokio::sync::Notify,
}

impl MemLog {
    fn records(&self, topic: &str) -> Vec<Record> {
        self.topics
            .lock()
            .unwrap()
            .get(topic)
            .cloned()
            .unwrap_or_default()
    }

    fn total(&self) -> usize {
        self.topics.lock().unwrap().values().map(Vec::len).sum()
    }
}

#[async_trait]
impl Log for MemLog {
    async fn ensure_topic(&self, topic: &str, _partitions: u32) -> Result<(), LogError> {
        self.topics
            .lock()
            .unwrap()
            .entry(topic.to_owned())
            .or_default();
        Ok(())
    }

    async fn partition_count(&self, _topic: &str) -> Result<u32, LogError> {
        Ok(1)
    }

    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        if self.paused.load(Ordering::SeqCst) {
            let resumed = self.resume.notified();
            self.entered.notify_one();
            resumed.await;
        }
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(LogError::Unavailable("broker away".into()));
        }
        self.appends.fetch_add(1, Ordering::SeqCst);
        let mut topics = self.topics.lock().unwrap();
        let stored = topics.entry(topic.to_owned()).or_default();
        let first = stored.len() as u64;
        let positions = (0..records.len() as u64)
            .map(|i| Position {
                partition: 0,
                offset: first + i,
            })
            .collect();
        stored.extend(records);
        Ok(positions)
    }

    async fn read(&self, _: &str, _: u32, _: u64, _: usize) -> Result<Vec<StoredRecord>, LogError> {
        Ok(Vec::new())
    }

    async fn offset_for_time(&self, _: &str, _: u32, _: EventTime) -> Result<u64, LogError> {
        Ok(0)
    }

    async fn start_offset(&self, _: &str, _: u32) -> Result<u64, LogError> {
        Ok(0)
    }

    async fn end_offset(&self, _: &str, _: u32) -> Result<u64, LogError> {
        Ok(0)
    }
}

struct Harness {
    log: Arc<MemLog>,
    registry: Registry,
    app: Router,
}

fn harness() -> Harness {
    harness_with(CorsOrigins::default())
}

fn harness_with(cors_origins: CorsOrigins) -> Harness {
    harness_configured(IngestConfig {
        cors_origins,
        ..IngestConfig::default()
    })
}

/// A harness over `config`, with its keys `other-key` and [`KEY`].
fn harness_configured(config: IngestConfig) -> Harness {
    let log = Arc::new(MemLog::default());
    let registry = Registry::new();
    let metrics = IngestMetrics::new(&registry).unwrap();
    let config = IngestConfig {
        api_keys: vec!["other-key".into(), KEY.into()],
        ..config
    };
    let state = Arc::new(IngestState::new(config, log.clone(), metrics));
    Harness {
        log,
        registry,
        app: router(state),
    }
}

impl Harness {
    async fn send(&self, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (status, headers, json)
    }

    async fn post(&self, body: impl Into<Body>) -> (StatusCode, HeaderMap, Value) {
        self.send(authed().body(body.into()).unwrap()).await
    }

    fn metrics_text(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }
}

fn authed() -> axum::http::request::Builder {
    Request::post("/v1/events").header(header::AUTHORIZATION, format!("Bearer {KEY}"))
}

fn now_ms() -> i64 {
    EventTime::now().millis()
}

/// One event of `kind` with the fields that type needs.
fn event(id: &str, kind: &str) -> String {
    let extra = match kind {
        "like" | "view" | "comment" | "share" | "post_created" => r#","post_id":"p1""#,
        "ad_click" => r#","campaign_id":"c1","impression_id":"i1""#,
        _ => "",
    };
    format!(
        r#"{{"event_id":"{id}","event_type":"{kind}","user_id":"u-{id}","timestamp":{}{extra}}}"#,
        now_ms()
    )
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn reasons(body: &Value) -> Vec<(u64, String)> {
    body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn accepts_array_and_routes_by_type() {
    let h = harness();
    let body = format!(
        "  [{},{},{}]",
        event("a", "page_view"),
        event("b", "like"),
        event("c", "ad_click")
    );
    let (status, _, json) = h.post(body).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(json["accepted"], 3);
    assert_eq!(json["duplicates"], 0);
    assert_eq!(json["rejected"], serde_json::json!([]));

    let user = h.log.records(topic::USER_EVENTS);
    assert_eq!(user.len(), 1);
    assert_eq!(&user[0].key[..], b"u-a");
    let decoded = wire::decode(&user[0].value).unwrap();
    assert_eq!(decoded.event_id, "a");
    assert_eq!(user[0].timestamp, decoded.timestamp);
    assert!(decoded.received_at.millis() > 0);
    assert_eq!(h.log.records(topic::CONTENT_EVENTS).len(), 1);
    assert_eq!(
        wire::decode(&h.log.records(topic::AD_EVENTS)[0].value)
            .unwrap()
            .event_id,
        "c"
    );
    assert!(h.log.records(topic::DEAD_LETTER).is_empty());
    assert_eq!(
        h.log.appends.load(Ordering::SeqCst),
        3,
        "one append per topic"
    );
}

#[tokio::test]
async fn accepts_ndjson_with_blank_lines() {
    let h = harness();
    let body = format!(
        "{}\r\n\n   \n{}\n",
        event("a", "login"),
        event("b", "search")
    );
    let (status, _, json) = h.post(body).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(json["accepted"], 2);
    let user = h.log.records(topic::USER_EVENTS);
    assert_eq!(user.len(), 2);
    assert_eq!(h.log.appends.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn accepts_gzip_body() {
    let h = harness();
    let body = format!("[{},{}]", event("a", "page_view"), event("b", "view"));
    let request = authed()
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(gzip(body.as_bytes())))
        .unwrap();
    let (status, _, json) = h.send(request).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(json["accepted"], 2);
    assert_eq!(h.log.total(), 2);
}

#[tokio::test]
async fn corrupt_gzip_is_rejected() {
    let h = harness();
    let request = authed()
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from("not gzip at all"))
        .unwrap();
    let (status, _, json) = h.send(request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(json["error"].as_str().unwrap().contains("gzip"));
    assert!(h
        .metrics_text()
        .contains(r#"tidemark_ingest_events_rejected_total{reason="invalid_gzip"} 1"#));
}

#[tokio::test]
async fn unsupported_encoding_is_415() {
    let h = harness();
    let request = authed()
        .header(header::CONTENT_ENCODING, "br")
        .body(Body::from(event("a", "login")))
        .unwrap();
    let (status, _, _) = h.send(request).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(h.log.total(), 0);
}

#[tokio::test]
async fn reports_each_rejected_event_and_dead_letters_it() {
    let h = harness();
    let future = now_ms() + 3_600_000;
    let events = [
        event("ok", "page_view"),
        format!(
            r#"{{"event_id":"w","event_type":"login","user_id":5,"timestamp":{}}}"#,
            now_ms()
        ),
        format!(
            r#"{{"event_id":"m","event_type":"login","timestamp":{}}}"#,
            now_ms()
        ),
        format!(
            r#"{{"event_id":"u","event_type":"teleport","user_id":"x","timestamp":{}}}"#,
            now_ms()
        ),
        format!(r#"{{"event_id":"f","event_type":"login","user_id":"x","timestamp":{future}}}"#),
    ];
    let (status, _, json) = h.post(format!("[{}]", events.join(","))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(json["accepted"], 1);
    assert_eq!(
        reasons(&json),
        vec![
            (1, "wrong_type".to_owned()),
            (2, "missing_field".to_owned()),
            (3, "unknown_event_type".to_owned()),
            (4, "timestamp_out_of_range".to_owned()),
        ]
    );
    assert!(json["rejected"][1]["error"]
        .as_str()
        .unwrap()
        .contains("user_id"));

    let dead = h.log.records(topic::DEAD_LETTER);
    assert_eq!(dead.len(), 4);
    assert_eq!(&dead[2].key[..], b"3");
    let letter: Value = serde_json::from_slice(&dead[2].value).unwrap();
    assert_eq!(letter["reason"], "unknown_event_type");
    assert!(letter["error"].as_str().unwrap().contains("teleport"));
    assert_eq!(letter["raw"].as_str().unwrap(), events[3]);
}

#[tokio::test]
async fn dead_letter_raw_is_truncated() {
    let h = harness();
    let line = format!(
        r#"{{"event_id":"x","event_type":"nope","user_id":"{}"}}"#,
        "é".repeat(5000)
    );
    let (status, _, _) = h.post(line).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let dead = h.log.records(topic::DEAD_LETTER);
    let letter: Value = serde_json::from_slice(&dead[0].value).unwrap();
    let raw = letter["raw"].as_str().unwrap();
    assert!(
        raw.len() <= tidemark_model::dead_letter::RAW_LIMIT_BYTES + 3,
        "raw kept {} bytes",
        raw.len()
    );
    assert!(raw.starts_with(r#"{"event_id":"x""#));
}

#[tokio::test]
async fn invalid_utf8_line_rejects_only_that_event() {
    let h = harness();
    let mut body = event("a", "login").into_bytes();
    body.extend_from_slice(b"\n{\"event_id\":\"\xff\xfe\"}\n");
    body.extend_from_slice(event("b", "login").as_bytes());
    let (status, _, json) = h.post(body).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(json["accepted"], 2);
    assert_eq!(reasons(&json), vec![(1, "invalid_utf8".to_owned())]);
}

#[tokio::test]
async fn malformed_array_fails_whole_request() {
    let h = harness();
    let (status, _, json) = h
        .post(format!("[{}, {{\"event_id\": ", event("a", "login")))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(json["error"].as_str().unwrap().starts_with("invalid JSON"));
    assert_eq!(h.log.total(), 0);
    assert!(h
        .metrics_text()
        .contains(r#"tidemark_ingest_events_rejected_total{reason="invalid_json"} 1"#));
}

#[tokio::test]
async fn malformed_ndjson_line_is_per_event_and_all_rejected_is_400() {
    let h = harness();
    let (status, _, json) = h.post("{\"event_id\": \n[1,2]\n").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["accepted"], 0);
    assert_eq!(
        reasons(&json),
        vec![
            (0, "invalid_json".to_owned()),
            (1, "not_an_object".to_owned())
        ]
    );
    assert_eq!(h.log.records(topic::DEAD_LETTER).len(), 2);
}

#[tokio::test]
async fn empty_body_is_400() {
    let h = harness();
    for body in ["", " \n\r\n ", "[]"] {
        let (status, _, json) = h.post(body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "body {body:?}");
        assert!(json["error"].is_string());
    }
    assert_eq!(h.log.total(), 0);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let h = harness();
    let big = vec![b' '; 10 * 1024 * 1024];
    // Without a Content-Length the limit is enforced while reading.
    let (status, _, json) = h.post(big.clone()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(json["error"].as_str().unwrap().contains("exceeds"));
    // With one it is refused before reading.
    let request = authed()
        .header(header::CONTENT_LENGTH, big.len())
        .body(Body::from(big.clone()))
        .unwrap();
    assert_eq!(h.send(request).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    // A small gzip body that inflates past the limit.
    let bomb = gzip(&big);
    assert!(bomb.len() < 100_000);
    let request = authed()
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(bomb))
        .unwrap();
    assert_eq!(h.send(request).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(h
        .metrics_text()
        .contains(r#"tidemark_ingest_events_rejected_total{reason="body_too_large"} 3"#));
}

#[tokio::test]
async fn requires_a_valid_api_key() {
    let h = harness();
    let missing = Request::post("/v1/events")
        .body(Body::from(event("a", "login")))
        .unwrap();
    let (status, _, json) = h.send(missing).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        json,
        serde_json::json!({"error": "missing or invalid API key"})
    );
    for value in ["Bearer wrong", "Basic test-key", "Bearer ", "test-key"] {
        let request = Request::post("/v1/events")
            .header(header::AUTHORIZATION, value)
            .body(Body::from(event("a", "login")))
            .unwrap();
        assert_eq!(h.send(request).await.0, StatusCode::UNAUTHORIZED, "{value}");
    }
    let other = Request::post("/v1/events")
        .header(header::AUTHORIZATION, "bearer other-key")
        .body(Body::from(event("a", "login")))
        .unwrap();
    assert_eq!(h.send(other).await.0, StatusCode::ACCEPTED);
    assert_eq!(h.log.total(), 1);
    let text = h.metrics_text();
    assert!(
        text.contains(r#"tidemark_ingest_events_rejected_total{reason="unauthorized"} 5"#),
        "{text}"
    );
    assert!(
        text.contains(r#"tidemark_ingest_requests_total{status="401"} 5"#),
        "{text}"
    );
}

#[tokio::test]
async fn duplicates_are_acknowledged_but_not_appended_twice() {
    let h = harness();
    let batch = format!("[{},{}]", event("a", "login"), event("b", "like"));
    let (status, _, json) = h.post(batch.clone()).await;
    assert_eq!(
        (status, json["accepted"].as_u64()),
        (StatusCode::ACCEPTED, Some(2))
    );

    let (status, _, json) = h.post(batch).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(json["accepted"], 0);
    assert_eq!(json["duplicates"], 2);
    assert_eq!(h.log.total(), 2);

    // A repeat inside one batch counts once.
    let (_, _, json) = h
        .post(format!(
            "{}\n{}\n",
            event("c", "login"),
            event("c", "login")
        ))
        .await;
    assert_eq!(
        (json["accepted"].as_u64(), json["duplicates"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(h.log.total(), 3);
    assert!(h
        .metrics_text()
        .contains("tidemark_ingest_duplicates_total 3"));
}

#[tokio::test]
async fn unavailable_log_is_503_and_retry_succeeds() {
    let h = harness();
    let batch = format!("[{},{}]", event("a", "login"), event("b", "like"));
    h.log.unavailable.store(true, Ordering::SeqCst);
    let (status, headers, json) = h.post(batch.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers.get(header::RETRY_AFTER).unwrap(), "1");
    assert!(json["error"].as_str().unwrap().contains("unavailable"));
    assert_eq!(h.log.total(), 0);

    h.log.unavailable.store(false, Ordering::SeqCst);
    let (status, _, json) = h.post(batch).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        json["accepted"], 2,
        "the failed attempt must not mark ids as seen"
    );
    assert_eq!(json["duplicates"], 0);
    assert_eq!(h.log.total(), 2);
}

#[tokio::test]
async fn metrics_count_by_reason_and_status() {
    let h = harness();
    let bad_type = format!(
        r#"{{"event_id":"w","event_type":"login","user_id":[],"timestamp":{}}}"#,
        now_ms()
    );
    let no_user = format!(
        r#"{{"event_id":"m","event_type":"login","timestamp":{}}}"#,
        now_ms()
    );
    let body = format!(
        "{}\n{bad_type}\n{no_user}\n{no_user}\n",
        event("a", "login")
    );
    let posted_at = now_ms();
    assert_eq!(h.post(body).await.0, StatusCode::ACCEPTED);
    let text = h.metrics_text();
    let newest: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tidemark_ingest_newest_event_timestamp_seconds "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no newest event time in\n{text}"));
    // The one accepted event was stamped just before the post.
    assert!(
        (newest * 1000.0 - posted_at as f64).abs() < 60_000.0,
        "{newest} is not the posted event's time"
    );
    for line in [
        r#"tidemark_ingest_events_rejected_total{reason="wrong_type"} 1"#,
        r#"tidemark_ingest_events_rejected_total{reason="missing_field"} 2"#,
        "tidemark_ingest_events_accepted_total 1",
        r#"tidemark_ingest_requests_total{status="202"} 1"#,
        "tidemark_log_appended_events_total 4",
        "tidemark_ingest_append_seconds_count 2",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        );
    }
}

#[tokio::test]
async fn ensure_topics_creates_all() {
    let h = harness();
    let state = IngestState::new(
        IngestConfig::default(),
        h.log.clone(),
        IngestMetrics::new(&Registry::new()).unwrap(),
    );
    state.ensure_topics().await.unwrap();
    let topics = h.log.topics.lock().unwrap();
    for t in topic::INPUT_TOPICS.iter().chain([&topic::DEAD_LETTER]) {
        assert!(topics.contains_key(*t), "{t}");
    }
}

/// Rough end-to-end rate through the router with an in-memory log; run with
/// `--release -- --ignored throughput --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    let h = harness();
    let batches: Vec<String> = (0..2_000)
        .map(|b| {
            let events: Vec<String> = (0..100)
                .map(|i| {
                    let kind = ["page_view", "like", "ad_click", "login"][i % 4];
                    event(&format!("{b}-{i}"), kind)
                })
                .collect();
            events.join("\n")
        })
        .collect();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in batches.chunks(batches.len() / 4) {
        let app = h.app.clone();
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            for body in chunk {
                let request = authed().body(Body::from(body)).unwrap();
                let response = app.clone().oneshot(request).await.unwrap();
                assert_eq!(response.status(), StatusCode::ACCEPTED);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let rate = 200_000.0 / started.elapsed().as_secs_f64();
    println!("ingest throughput: {rate:.0} events/s");
    assert_eq!(h.log.total(), 200_000);
}

#[tokio::test]
async fn key_in_the_query_authorizes_like_the_header() {
    let h = harness();
    let post = |uri: &str| {
        Request::post(uri)
            .header(header::CONTENT_TYPE, "text/plain;charset=UTF-8")
            .body(Body::from(event(uri, "login")))
            .unwrap()
    };
    for uri in ["/v1/events?key=test-key", "/v1/events?v=1&key=other%2Dkey"] {
        let (status, _, json) = h.send(post(uri)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{uri}: {json}");
    }
    for uri in [
        "/v1/events?key=wrong",
        "/v1/events?key=",
        "/v1/events?key",
        "/v1/events?key=%ZZ%",
        "/v1/events?token=test-key",
        "/v1/events?key=test-key-",
    ] {
        let (status, _, json) = h.send(post(uri)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(json["error"], "missing or invalid API key", "{uri}");
    }
    // A wrong header does not spoil a right query key, nor the other way round.
    let both = Request::post("/v1/events?key=wrong")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .body(Body::from(event("h", "login")))
        .unwrap();
    assert_eq!(h.send(both).await.0, StatusCode::ACCEPTED);
    assert_eq!(h.log.records(topic::USER_EVENTS).len(), 3);
}

#[tokio::test]
async fn text_plain_ndjson_is_accepted() {
    let h = harness();
    let body = format!("{}\n{}\n", event("a", "login"), event("b", "page_view"));
    let request = authed()
        .header(header::CONTENT_TYPE, "text/plain;charset=UTF-8")
        .body(Body::from(body))
        .unwrap();
    let (status, _, json) = h.send(request).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    assert_eq!(json["accepted"], 2);
    let bad = authed()
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("this is not json\n"))
        .unwrap();
    let (status, _, json) = h.send(bad).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(reasons(&json), vec![(0, "invalid_json".to_owned())]);
}

const APP: &str = "https://app.example.com";

fn preflight(origin: &str) -> Request<Body> {
    Request::options("/v1/events")
        .header(header::HOST, "ingest.example.com")
        .header(header::ORIGIN, origin)
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            "authorization, content-type",
        )
        .body(Body::empty())
        .unwrap()
}

fn cors_headers(headers: &HeaderMap) -> Vec<String> {
    headers
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

#[tokio::test]
async fn preflight_answers_an_allowed_origin_only() {
    let h = harness_with(CorsOrigins::new([
        format!("{APP}/"),
        "http://localhost:5173".into(),
    ]));
    let (status, headers, _) = h.send(preflight(APP)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], APP);
    assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_METHODS], "POST");
    let allowed = headers[header::ACCESS_CONTROL_ALLOW_HEADERS]
        .to_str()
        .unwrap();
    for name in ["authorization", "content-type", "content-encoding"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    assert_eq!(headers[header::ACCESS_CONTROL_MAX_AGE], "86400");
    assert_eq!(headers[header::VARY], "origin");

    for refused in [
        "https://evil.example.com",
        "https://app.example.com.evil.net",
        "null",
    ] {
        let (status, headers, json) = h.send(preflight(refused)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
        assert_eq!(cors_headers(&headers), Vec::<String>::new(), "{refused}");
        assert!(json["error"].as_str().unwrap().contains("--cors-origin"));
    }
}

#[tokio::test]
async fn nothing_but_the_own_origin_is_allowed_by_default() {
    let h = harness();
    let (status, headers, _) = h.send(preflight(APP)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(cors_headers(&headers).is_empty());

    let post = |origin: &str, host: &str| {
        authed()
            .header(header::ORIGIN, origin)
            .header(header::HOST, host)
            .body(Body::from(event(origin, "login")))
            .unwrap()
    };
    let (status, headers, json) = h.send(post(APP, "ingest.example.com")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        json,
        serde_json::json!({"error": "origin not allowed to post events (see --cors-origin)"})
    );
    assert!(cors_headers(&headers).is_empty());
    assert_eq!(
        h.log.total(),
        0,
        "a refused origin's events are not appended"
    );
    assert!(h
        .metrics_text()
        .contains(r#"tidemark_ingest_events_rejected_total{reason="origin_not_allowed"} 1"#));

    // The page of the collector's own origin needs no CORS.
    let (status, headers, _) = h
        .send(post("http://127.0.0.1:8080", "127.0.0.1:8080"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(cors_headers(&headers).is_empty());
    let own = Request::options("/v1/events")
        .header(header::ORIGIN, "http://127.0.0.1:8080")
        .header(header::HOST, "127.0.0.1:8080")
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = h.send(own).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(headers[header::ALLOW], "POST, OPTIONS");
    assert_eq!(h.log.total(), 1);
}

#[tokio::test]
async fn an_allowed_origin_can_read_the_answer_and_retry_after() {
    let h = harness_with(CorsOrigins::new([APP.to_owned()]));
    let post = |body: String| {
        Request::post(format!("/v1/events?key={KEY}"))
            .header(header::ORIGIN, APP)
            .header(header::HOST, "ingest.example.com")
            .header(header::CONTENT_TYPE, "text/plain;charset=UTF-8")
            .body(Body::from(body))
            .unwrap()
    };
    let body = format!("{}\n{{\"event_id\":\"x\"}}\n", event("a", "login"));
    let (status, headers, json) = h.send(post(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(reasons(&json), vec![(1, "missing_field".to_owned())]);
    assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], APP);
    assert_eq!(
        headers[header::ACCESS_CONTROL_EXPOSE_HEADERS],
        "retry-after"
    );

    // Errors carry the headers too, or the page could not tell a 503 from a
    // network failure.
    h.log.unavailable.store(true, Ordering::SeqCst);
    let (status, headers, _) = h.send(post(event("b", "login"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], APP);
    assert_eq!(headers[header::RETRY_AFTER], "1");
}

#[tokio::test]
async fn a_wildcard_allows_any_origin() {
    let h = harness_with(CorsOrigins::new(["*".to_owned()]));
    let (status, headers, _) = h.send(preflight("https://anyone.example.org")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://anyone.example.org"
    );
}

#[tokio::test]
async fn a_key_over_its_rate_limit_gets_429_with_retry_after_and_appends_nothing() {
    let h = harness_configured(IngestConfig {
        // Slow enough that no token comes back during the test.
        rate_limit: Some(RateLimit::new(0.01, Some(3)).unwrap()),
        ..IngestConfig::default()
    });
    let batch = |ids: &[&str]| {
        let events: Vec<String> = ids.iter().map(|id| event(id, "login")).collect();
        format!("[{}]", events.join(","))
    };
    assert_eq!(h.post(batch(&["a", "b"])).await.0, StatusCode::ACCEPTED);
    // One token left: two events are refused as a whole.
    let (status, headers, json) = h.post(batch(&["c", "d"])).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{json}");
    let retry: u64 = headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // One missing token at 0.01 a second: 100 s.
    assert_eq!(retry, 100);
    assert!(
        json["error"].as_str().unwrap().contains("retry after"),
        "{json}"
    );
    assert_eq!(h.log.total(), 2, "the limited request appended nothing");
    // More than the burst can never pass as one request.
    let (status, _, json) = h.post(batch(&["e", "f", "g", "h"])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
    assert!(
        json["error"].as_str().unwrap().contains("burst of 3"),
        "{json}"
    );
    // The last token is still there, and the other key has its own bucket.
    assert_eq!(h.post(batch(&["i"])).await.0, StatusCode::ACCEPTED);
    let other = Request::post("/v1/events")
        .header(header::AUTHORIZATION, "Bearer other-key")
        .body(Body::from(batch(&["j", "k", "l"])))
        .unwrap();
    assert_eq!(h.send(other).await.0, StatusCode::ACCEPTED);
    assert_eq!(h.log.total(), 6);
    let text = h.metrics_text();
    for line in [
        r#"tidemark_ingest_events_rejected_total{reason="rate_limited"} 1"#,
        r#"tidemark_ingest_events_rejected_total{reason="over_burst"} 1"#,
        r#"tidemark_ingest_requests_total{status="429"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        );
    }
}

#[tokio::test]
async fn the_same_event_id_in_two_concurrent_requests_is_appended_once() {
    let h = Arc::new(harness());
    h.log.paused.store(true, Ordering::SeqCst);
    let post = |ids: [&str; 2]| {
        let h = h.clone();
        let body = format!("[{},{}]", event(ids[0], "login"), event(ids[1], "login"));
        tokio::spawn(async move { h.post(body).await })
    };
    let first = post(["x", "a"]);
    // The first request is inside its append, holding `x`.
    h.log.entered.notified().await;
    let second = post(["x", "b"]);
    // On this single-threaded runtime, each yield lets the second request
    // run until it waits: for `x`'s append to end (or, without the claim,
    // inside an append of its own).
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    h.log.paused.store(false, Ordering::SeqCst);
    h.log.resume.notify_waiters();
    let (status, _, first) = first.await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(first["accepted"], 2, "{first}");
    let (status, _, second) = second.await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        (second["accepted"].as_u64(), second["duplicates"].as_u64()),
        (Some(1), Some(1)),
        "{second}"
    );
    let ids: Vec<String> = h
        .log
        .records(topic::USER_EVENTS)
        .iter()
        .map(|r| wire::decode(&r.value).unwrap().event_id)
        .collect();
    assert_eq!(ids.iter().filter(|id| *id == "x").count(), 1, "{ids:?}");
    assert_eq!(ids.len(), 3, "{ids:?}");
}
