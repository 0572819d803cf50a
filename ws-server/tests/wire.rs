//! Real samples of every REST answer and WebSocket message the web
//! dashboard reads, compared with the copy the dashboard's type check reads
//! (`dashboards/web/src/wire/`): a change to a message fails here until the
//! samples are written again, and then fails the dashboard's `tsc` until
//! its types follow.
//!
//! `UPDATE_WIRE_SAMPLES=1 cargo test -p tidemark-ws-server --test wire`
//! writes the samples again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::Utf8Bytes;
use axum::http::{Method, Request, StatusCode};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tidemark_model::{EventTime, FieldValue, Point, Tier, Update};
use tidemark_tsdb_writer::sqlite::SqliteStore;
use tidemark_tsdb_writer::Store;
use tidemark_ws_server::serving_file::{write_serving, Serving, ServingAction, ServingChange};
use tidemark_ws_server::{router, run_session, Access, AccessConfig, Role, ServerState};
use tokio::sync::broadcast;
use tower::ServiceExt;

const MINUTE: i64 = 60_000;
const DAY: i64 = 86_400_000;
/// The day samples are written for, whatever day the test runs: campaign
/// totals are today's, so the points are written for today and every time
/// in the samples is moved to this day.
const SAMPLE_DAY: i64 = 1_796_256_000_000; // 2026-12-03T00:00:00Z
/// The minute of the day the points start at: midnight, so that they lie
/// in the past whenever the test runs. The overview reads the stored
/// windows only up to now, and a later minute would be in its snapshot in
/// an afternoon run and missing from a morning one.
const FIRST_MINUTE: i64 = 0;
const PASSWORD: &str = "a long password";
const CHANNELS: [&str; 5] = [
    "overview",
    "trending:5m",
    "campaigns",
    "campaign:c7",
    "engagement",
];

fn today() -> i64 {
    let now = EventTime::now().0;
    now - now.rem_euclid(DAY)
}

fn at(minute: i64) -> EventTime {
    EventTime(today() + (FIRST_MINUTE + minute) * MINUTE)
}

fn point(
    measurement: &str,
    minute: i64,
    tags: &[(&str, &str)],
    fields: &[(&str, FieldValue)],
) -> Point {
    Point::new(
        measurement,
        Tier::Rt,
        at(minute),
        tags.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        fields.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    )
}

/// One minute of every measurement, `scale` telling minutes apart.
fn minute_points(minute: i64, scale: i64) -> Vec<Point> {
    use FieldValue::{Float, Int};
    let mut points = vec![
        point(
            "traffic",
            minute,
            &[("country", "DE"), ("device", "ios"), ("event_type", "like")],
            &[("events", Int(40 * scale))],
        ),
        point(
            "traffic",
            minute,
            &[("country", "US"), ("device", "web"), ("event_type", "view")],
            &[("events", Int(100 * scale))],
        ),
        point("active_users", minute, &[], &[("users", Int(30 * scale))]),
        point(
            "engagement",
            minute,
            &[("country", "US"), ("segment", "new")],
            &[
                ("sessions_started", Int(4 * scale)),
                ("sessions_ended", Int(2 * scale)),
                ("active_sessions", Int(12 * scale)),
                ("engagement_score", Int(90 * scale)),
                ("avg_session_seconds", Float(95.5)),
                ("events_per_session", Float(7.25)),
            ],
        ),
        point(
            "engagement",
            minute,
            // No session ended: the averages are not written.
            &[("country", "DE"), ("segment", "returning")],
            &[
                ("sessions_started", Int(scale)),
                ("sessions_ended", Int(0)),
                ("active_sessions", Int(5 * scale)),
                ("engagement_score", Int(20 * scale)),
            ],
        ),
    ];
    for (device, country, impressions) in [("ios", "DE", 1000), ("web", "US", 400)] {
        points.push(point(
            "ads",
            minute,
            &[
                ("campaign_id", "c7"),
                ("country", country),
                ("device", device),
            ],
            &[
                ("impressions", Int(impressions * scale)),
                ("clicks", Int(31 * scale)),
                ("clicks_unattributed", Int(2)),
                ("conversions", Int(4 * scale)),
                ("spend", Float(12.5 * scale as f64)),
                ("revenue", Float(80.0 * scale as f64)),
            ],
        ));
    }
    // A campaign without clicks yet: its ratios are absent or null.
    points.push(point(
        "ads",
        minute,
        &[
            ("campaign_id", "c9"),
            ("country", "FR"),
            ("device", "android"),
        ],
        &[
            ("impressions", Int(50 * scale)),
            ("clicks", Int(0)),
            ("clicks_unattributed", Int(0)),
            ("conversions", Int(0)),
            ("spend", Float(0.5 * scale as f64)),
            ("revenue", Float(0.0)),
        ],
    ));
    for (rank, tag, users) in [(1, "rust", 120), (2, "kappa", 80)] {
        points.push(point(
            "trending",
            minute,
            &[("tag", tag), ("window", "5m")],
            &[
                ("rank", Int(rank)),
                ("score", Float(users as f64 / 40.0 * scale as f64)),
                ("users", Int(users * scale)),
                ("events", Int(users * 3 * scale)),
            ],
        ));
    }
    points
}

struct Server {
    state: Arc<ServerState>,
    updates: broadcast::Sender<Update>,
    _dir: tempfile::TempDir,
}

async fn server() -> Server {
    let store = SqliteStore::open_in_memory().unwrap();
    store.ensure_schema().await.unwrap();
    let mut stored = minute_points(0, 1);
    stored.extend(minute_points(1, 2));
    store.write(&stored).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let access = Access::open(AccessConfig {
        users_file: dir.path().join("users.toml"),
        jwt_secret: vec![9; 32],
        ingest_keys: Vec::new(),
        audit_log: dir.path().join("audit.ndjson"),
    })
    .unwrap();
    access
        .users()
        .put_user("admin", Role::Admin, PASSWORD)
        .unwrap();
    let (updates, _) = broadcast::channel(16);
    let state = Arc::new(ServerState::new(
        Arc::new(store),
        updates.clone(),
        prometheus::Registry::new(),
        None,
        access,
    ));
    // Times of today, as every time here, so that the samples' times
    // (shifted to `SAMPLE_DAY`) do not change with the day the test runs on.
    let change = |minute_of_day: i64, action, database: &str, previous: &str| ServingChange {
        time: EventTime(today() + minute_of_day * MINUTE).to_rfc3339(),
        action,
        database: database.into(),
        previous: previous.into(),
        by: "cli:alice".into(),
    };
    let promoted = Serving::switched(
        None,
        change(9 * 60, ServingAction::Promote, "v2", "tidemark"),
    );
    let rolled_back = Serving::switched(
        Some(promoted),
        change(9 * 60 + 30, ServingAction::Rollback, "tidemark", "v2"),
    );
    write_serving(dir.path(), &rolled_back).unwrap();
    state.set_serving_dir(dir.path().to_path_buf());
    Server {
        state,
        updates,
        _dir: dir,
    }
}

impl Server {
    async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = match body {
            Some(body) => request
                .header("content-type", "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        }
        .unwrap();
        let response = router(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{uri} answered no JSON ({e}): {bytes:?}"));
        (status, body)
    }
}

/// The REST answers the dashboard reads.
async fn rest_samples(server: &Server, samples: &mut BTreeMap<String, Value>) -> String {
    let (status, login) = server
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"name": "admin", "password": PASSWORD})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let token = login["access_token"].as_str().unwrap().to_string();
    samples.insert("rest_auth_login".into(), login);

    let from = at(0).to_rfc3339();
    let to = at(2).to_rfc3339();
    let range = format!("from={from}&to={to}");
    let gets = [
        (
            "rest_error",
            "/api/v1/trending?window=7m".to_string(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "rest_metrics",
            format!(
                "/api/v1/metrics?name=traffic&field=events&step=1m&group_by=event_type&{range}"
            ),
            StatusCode::OK,
        ),
        (
            "rest_trending",
            format!("/api/v1/trending?window=5m&at={}", at(1).to_rfc3339()),
            StatusCode::OK,
        ),
        (
            "rest_trending_empty",
            format!("/api/v1/trending?window=1m&at={}", at(1).to_rfc3339()),
            StatusCode::OK,
        ),
        (
            "rest_trending_tag",
            format!("/api/v1/trending/rust?window=5m&{range}"),
            StatusCode::OK,
        ),
        (
            "rest_campaigns",
            format!("/api/v1/campaigns?{range}"),
            StatusCode::OK,
        ),
        (
            "rest_campaign",
            format!("/api/v1/campaigns/c7?{range}&step=1m&group_by=device"),
            StatusCode::OK,
        ),
        (
            "rest_engagement",
            format!("/api/v1/engagement?{range}&step=1m&group_by=segment"),
            StatusCode::OK,
        ),
        (
            "rest_query_tables",
            "/api/v1/query/tables".to_string(),
            StatusCode::OK,
        ),
        ("rest_users", "/api/v1/users".to_string(), StatusCode::OK),
        (
            "rest_serving",
            "/api/v1/serving".to_string(),
            StatusCode::OK,
        ),
        (
            "rest_serving_history",
            "/api/v1/serving/history".to_string(),
            StatusCode::OK,
        ),
    ];
    for (name, uri, want) in gets {
        let (status, answer) = server
            .call(Method::GET, &uri, Some(token.as_str()), None)
            .await;
        assert_eq!(status, want, "{uri}: {answer}");
        samples.insert(name.into(), answer);
    }
    let sql = format!(
        "SELECT event_type, sum(events) AS events FROM traffic WHERE time >= '{from}' AND time < '{to}' GROUP BY event_type ORDER BY event_type"
    );
    let (status, answer) = server
        .call(
            Method::POST,
            "/api/v1/query",
            Some(token.as_str()),
            Some(json!({"sql": sql})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    samples.insert("rest_query".into(), answer);
    let (status, created) = server
        .call(
            Method::POST,
            "/api/v1/tokens",
            Some(token.as_str()),
            Some(json!({"role": "analyst", "name": "grafana"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    samples.insert("rest_token_created".into(), created);
    let (status, tokens) = server
        .call(Method::GET, "/api/v1/tokens", Some(token.as_str()), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    samples.insert("rest_tokens".into(), tokens);
    let (status, audit) = server
        .call(Method::GET, "/api/v1/audit", Some(token.as_str()), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{audit}");
    samples.insert("rest_audit".into(), audit);
    token
}

type ClientTx = futures::channel::mpsc::Sender<String>;
type ClientRx = futures::channel::mpsc::Receiver<String>;

/// A session over channels, not yet authenticated.
fn session(state: &Arc<ServerState>) -> (ClientTx, ClientRx) {
    let (client_tx, server_rx) = futures::channel::mpsc::channel::<String>(8);
    let (server_tx, client_rx) = futures::channel::mpsc::channel::<String>(64);
    let state = state.clone();
    tokio::spawn(async move {
        let server_tx = server_tx.with(|text: Utf8Bytes| {
            futures::future::ready(Ok::<_, futures::channel::mpsc::SendError>(text.to_string()))
        });
        let _ = run_session(state, None, server_tx, server_rx).await;
    });
    (client_tx, client_rx)
}

async fn recv(rx: &mut ClientRx) -> Value {
    let text = tokio::time::timeout(Duration::from_secs(10), rx.next())
        .await
        .expect("a message within 10 s")
        .expect("the session is open");
    serde_json::from_str(&text).unwrap()
}

/// Reads messages until `done` holds for the first message per channel and
/// type.
async fn until(
    rx: &mut ClientRx,
    seen: &mut BTreeMap<(String, String), Value>,
    done: impl Fn(&BTreeMap<(String, String), Value>) -> bool,
) {
    while !done(seen) {
        let message = recv(rx).await;
        let key = (
            message["channel"].as_str().unwrap_or_default().to_string(),
            message["type"].as_str().unwrap_or_default().to_string(),
        );
        // The first of each: what follows one change is the same every run.
        seen.entry(key).or_insert(message);
    }
}

fn has(seen: &BTreeMap<(String, String), Value>, channel: &str, kind: &str, key: &str) -> bool {
    seen.get(&(channel.to_string(), kind.to_string()))
        .is_some_and(|m| m["data"].get(key).is_some())
}

/// Whether the overview snapshot holds every window in `starts`: the stored
/// ones come with the hub's seed, which may follow the first subscription.
fn overview_holds(seen: &BTreeMap<(String, String), Value>, starts: &[EventTime]) -> bool {
    seen.get(&("overview".to_string(), "snapshot".to_string()))
        .is_some_and(|m| {
            starts
                .iter()
                .all(|s| m["data"]["windows"].get(s.to_rfc3339()).is_some())
        })
}

/// The WebSocket messages of every channel the dashboard follows.
async fn socket_samples(server: &Server, token: &str, samples: &mut BTreeMap<String, Value>) {
    let (mut tx, mut rx) = session(&server.state);
    tx.send(json!({"op": "auth", "token": token}).to_string())
        .await
        .unwrap();
    samples.insert("ws_authenticated".into(), recv(&mut rx).await);
    tx.send(json!({"op": "shout"}).to_string()).await.unwrap();
    samples.insert("ws_error".into(), recv(&mut rx).await);

    let live = |minute: i64, scale: i64, is_final: bool| Update {
        window_start: at(minute),
        is_final,
        newest_received_at: EventTime::now(),
        points: minute_points(minute, scale),
    };
    let subscribe_all = |tx: &mut ClientTx| {
        let messages: Vec<String> = CHANNELS
            .iter()
            .map(|c| json!({"op": "subscribe", "channel": c}).to_string())
            .collect();
        let mut tx = tx.clone();
        async move {
            for m in messages {
                tx.send(m).await.unwrap();
            }
        }
    };
    // The channels fill from live updates and from the store (today's
    // campaign totals are read after the start): subscribe again until
    // every snapshot holds the minute that came live.
    server.updates.send(live(1, 2, true)).unwrap();
    let wanted = [
        ("overview", "windows"),
        ("trending:5m", "tags"),
        ("campaigns", "campaigns"),
        ("campaign:c7", "today"),
        ("engagement", "groups"),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = BTreeMap::new();
    loop {
        seen.clear();
        subscribe_all(&mut tx).await;
        until(&mut rx, &mut seen, |s| {
            CHANNELS
                .iter()
                .all(|c| s.contains_key(&(c.to_string(), "snapshot".to_string())))
        })
        .await;
        let filled = wanted.iter().all(|(c, key)| {
            has(&seen, c, "snapshot", key)
                && (*c == "overview"
                    || has(&seen, c, "snapshot", "minute")
                    || c.starts_with("trending"))
        }) && overview_holds(&seen, &[at(0), at(1)]);
        if filled {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "snapshots still without the live minute: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The next minute, still open: every channel changes.
    server.updates.send(live(2, 3, false)).unwrap();
    until(&mut rx, &mut seen, |s| {
        CHANNELS
            .iter()
            .all(|c| s.contains_key(&(c.to_string(), "update".to_string())))
    })
    .await;
    for (channel, name) in [
        ("overview", "overview"),
        ("trending:5m", "trending"),
        ("campaigns", "campaigns"),
        ("campaign:c7", "campaign"),
        ("engagement", "engagement"),
    ] {
        for kind in ["snapshot", "update"] {
            let message = seen[&(channel.to_string(), kind.to_string())].clone();
            samples.insert(format!("ws_{name}_{kind}"), message);
        }
    }
}

/// Replaces what differs from run to run (tokens, ids, the clock, the
/// order of changes) with fixed values of the same type, and moves every
/// time to [`SAMPLE_DAY`].
fn normalise(name: &str, value: &mut Value, shift: i64) {
    fn walk(value: &mut Value, shift: i64) {
        match value {
            Value::String(s) => {
                if let Some(t) = shifted(s, shift) {
                    *s = t;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| walk(v, shift)),
            Value::Object(map) => {
                let entries: Vec<(String, Value)> = std::mem::take(map).into_iter().collect();
                for (key, mut v) in entries {
                    walk(&mut v, shift);
                    map.insert(shifted(&key, shift).unwrap_or(key), v);
                }
            }
            _ => {}
        }
    }
    fn shifted(text: &str, shift: i64) -> Option<String> {
        if !text.contains('T') || !text.ends_with('Z') {
            return None;
        }
        EventTime::parse(text).map(|t| EventTime(t.0 - shift).to_rfc3339())
    }
    walk(value, shift);
    let fixed = |v: &mut Value, key: &str, to: Value| {
        if let Some(slot) = v.get_mut(key) {
            *slot = to;
        }
    };
    match name {
        "rest_auth_login" => {
            fixed(value, "access_token", json!("<access token>"));
            fixed(value, "refresh_token", json!("<refresh token>"));
        }
        "rest_token_created" => {
            fixed(value, "token", json!("tmk_<id>_<secret>"));
            fixed(value, "id", json!("<id>"));
        }
        "rest_tokens" => {
            for t in value["tokens"].as_array_mut().unwrap() {
                fixed(t, "id", json!("<id>"));
                fixed(t, "created", json!("2026-12-03T10:12:00Z"));
            }
        }
        "rest_query" => fixed(value, "elapsed_ms", json!(1.25)),
        "rest_audit" => {
            // The first entry stands for all: the rest are more of the same.
            let entries = value["entries"].as_array_mut().unwrap();
            entries.truncate(1);
            for e in entries {
                fixed(e, "time", json!("2026-12-03T10:12:00.123Z"));
                fixed(e, "prev", json!("0".repeat(64)));
            }
        }
        _ => {}
    }
    if name.starts_with("ws_") && value.get("seq").is_some() {
        let seq = if value["type"] == "snapshot" { 7 } else { 8 };
        value["seq"] = json!(seq);
    }
}

fn wire_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dashboards/web/src/wire")
}

/// The TypeScript module that types every sample (see `types.ts` there).
fn check_module(samples: &str) -> String {
    format!(
        "// Written by ws-server/tests/wire.rs from samples.json: do not edit. Every\n\
         // sample is an object literal typed with its declared wire type, so `tsc`\n\
         // fails on a field that is missing, renamed, added or of another type.\n\
         import type {{ WireSamples }} from './types';\n\n\
         export const samples: WireSamples = {samples};\n"
    )
}

#[tokio::test]
async fn the_dashboards_wire_samples_are_what_the_server_sends() {
    let server = server().await;
    let mut samples = BTreeMap::new();
    let token = rest_samples(&server, &mut samples).await;
    socket_samples(&server, &token, &mut samples).await;
    let shift = today() - SAMPLE_DAY;
    for (name, value) in samples.iter_mut() {
        normalise(name, value, shift);
    }
    let text = serde_json::to_string_pretty(&samples).unwrap() + "\n";
    let files = [
        (wire_dir().join("samples.json"), text.clone()),
        (
            wire_dir().join("samples.check.ts"),
            check_module(text.trim_end()),
        ),
    ];
    if std::env::var_os("UPDATE_WIRE_SAMPLES").is_some() {
        for (path, content) in &files {
            std::fs::write(path, content).unwrap();
        }
        return;
    }
    for (path, content) in &files {
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        if committed != *content {
            let first_difference = committed
                .lines()
                .zip(content.lines())
                .enumerate()
                .find(|(_, (a, b))| a != b)
                .map_or_else(
                    || "one is longer".to_string(),
                    |(i, (a, b))| format!("line {}: committed {a:?}, now {b:?}", i + 1),
                );
            panic!(
                "{} differs from what the server sends ({first_difference}).\n\
                 If the change is meant, write the samples again with\n  \
                 UPDATE_WIRE_SAMPLES=1 cargo test -p tidemark-ws-server --test wire\n\
                 then make the dashboard's types (dashboards/web/src/wire/types.ts) follow \
                 until `npm run test` in dashboards/web passes, and commit both.",
                path.display()
            );
        }
    }
}
