//! The HTTP and WebSocket contract of the serving layer, against an in-memory store.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::Utf8Bytes;
use axum::http::{Request, StatusCode};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tidemark_model::{EventTime, FieldValue, Point, Tier, Update};
use tidemark_tsdb_writer::{Aggregate, MetricQuery, Series, Store, StoreError};
use tidemark_ws_server::{
    router, run_session, serve, Access, AccessConfig, Principal, Role, ServerState,
};
use tokio::sync::broadcast;
use tower::ServiceExt;

/// Credentials for a test server: a users file and audit log in a folder of
/// its own (kept alive by the returned guard), and the ingest key `ingest`.
fn test_access() -> (Access, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let access = Access::open(AccessConfig {
        users_file: dir.path().join("users.toml"),
        jwt_secret: vec![7; 32],
        ingest_keys: vec!["ingest".into()],
        audit_log: dir.path().join("audit.ndjson"),
    })
    .unwrap();
    (access, dir)
}

/// A service token of `role` on `state`.
fn token(state: &ServerState, role: Role) -> String {
    state.access().users().create_token(role, "test").unwrap().0
}

fn analyst() -> Option<Principal> {
    Some(Principal::Service {
        id: "test".into(),
        role: Role::Analyst,
    })
}

/// Keeps points in a list and answers queries by scanning it (sum only). A
/// point written again (same measurement, tier, tags and time) replaces the
/// one before, as in the real stores.
#[derive(Debug, Default)]
struct MemStore {
    points: Mutex<Vec<Point>>,
    queries: Mutex<Vec<MetricQuery>>,
    down: AtomicBool,
}

#[async_trait::async_trait]
impl Store for MemStore {
    async fn ensure_schema(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn write(&self, points: &[Point]) -> Result<(), StoreError> {
        let mut stored = self.points.lock().unwrap();
        for p in points {
            stored.retain(|q| {
                (&q.measurement, q.tier, &q.tags, q.time)
                    != (&p.measurement, p.tier, &p.tags, p.time)
            });
            stored.push(p.clone());
        }
        Ok(())
    }

    async fn query(&self, q: &MetricQuery) -> Result<Vec<Series>, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("down for the test".into()));
        }
        self.queries.lock().unwrap().push(q.clone());
        let mut groups: BTreeMap<BTreeMap<String, String>, BTreeMap<EventTime, f64>> =
            BTreeMap::new();
        for p in self.points.lock().unwrap().iter() {
            let matches = p.measurement == q.measurement
                && p.tier == q.tier
                && p.time >= q.from
                && p.time < q.to
                && q.filters.iter().all(|(k, v)| p.tag(k) == Some(v.as_str()));
            let Some(v) = p.field(&q.field).filter(|_| matches) else {
                continue;
            };
            let tags = q
                .group_by
                .iter()
                .filter_map(|k| p.tag(k).map(|v| (k.clone(), v.to_string())))
                .collect();
            *groups.entry(tags).or_default().entry(p.time).or_default() += v.as_f64();
        }
        Ok(groups
            .into_iter()
            .map(|(tags, points)| Series {
                tags,
                points: points.into_iter().collect(),
            })
            .collect())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

const T0: i64 = 1_795_420_800_000; // 2026-11-23T08:00:00Z

fn traffic(tier: Tier, minute: i64, event_type: &str, country: &str, events: i64) -> Point {
    Point::new(
        "traffic",
        tier,
        EventTime(T0 + minute * 60_000),
        vec![
            ("event_type".into(), event_type.into()),
            ("country".into(), country.into()),
        ],
        vec![("events".into(), FieldValue::Int(events))],
    )
}

fn users(minute: i64, n: i64) -> Point {
    Point::new(
        "active_users",
        Tier::Rt,
        EventTime(T0 + minute * 60_000),
        vec![],
        vec![("users".into(), FieldValue::Int(n))],
    )
}

/// A server over `store` that follows live updates from a channel holding
/// `backlog` of them.
struct Served {
    updates: broadcast::Sender<Update>,
    registry: prometheus::Registry,
    state: Arc<ServerState>,
    _access_dir: tempfile::TempDir,
}

fn served(store: Arc<MemStore>, backlog: usize) -> Served {
    let (updates, _) = broadcast::channel(backlog);
    let registry = prometheus::Registry::new();
    let (access, access_dir) = test_access();
    let state = Arc::new(ServerState::new(
        store,
        updates.clone(),
        registry.clone(),
        None,
        access,
    ));
    Served {
        updates,
        registry,
        state,
        _access_dir: access_dir,
    }
}

struct Fixture {
    store: Arc<MemStore>,
    updates: broadcast::Sender<Update>,
    registry: prometheus::Registry,
    state: Arc<ServerState>,
    _access_dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let store = Arc::new(MemStore::default());
    store
        .write(&[
            traffic(Tier::Rt, 0, "like", "DE", 40),
            traffic(Tier::Rt, 0, "like", "FR", 2),
            traffic(Tier::Rt, 0, "view", "DE", 100),
            traffic(Tier::Rt, 1, "like", "DE", 7),
            traffic(Tier::Hourly, 0, "like", "DE", 1000),
        ])
        .await
        .unwrap();
    let Served {
        updates,
        registry,
        state,
        _access_dir,
    } = served(store.clone(), 16);
    Fixture {
        store,
        updates,
        registry,
        state,
        _access_dir,
    }
}

async fn get(state: &Arc<ServerState>, uri: &str) -> (StatusCode, Vec<u8>) {
    let response = router(state.clone())
        .oneshot(
            Request::get(uri)
                .header(
                    "authorization",
                    format!("Bearer {}", token(state, Role::Analyst)),
                )
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, body.to_vec())
}

async fn get_json(state: &Arc<ServerState>, uri: &str) -> (StatusCode, Value) {
    let (status, body) = get(state, uri).await;
    (status, serde_json::from_slice(&body).unwrap())
}

const RANGE: &str = "from=2026-11-23T08:00:00Z&to=2026-11-23T09:00:00Z";

#[tokio::test]
async fn health_names_the_store() {
    let f = fixture().await;
    let (status, body) = get_json(&f.state, "/api/v1/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"status": "ok", "store": "memory", "database": "tidemark"})
    );
}

#[tokio::test]
async fn sdk_settings_name_the_dashboard_ingest_key_once_set() {
    let f = fixture().await;
    let (status, body) = get_json(&f.state, "/api/v1/sdk").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"ingest_key": null}),
        "no ingest on this listener"
    );
    f.state.set_dashboard_ingest_key("public-key".into());
    f.state.set_dashboard_ingest_key("second".into());
    let (_, body) = get_json(&f.state, "/api/v1/sdk").await;
    assert_eq!(body, json!({"ingest_key": "public-key"}));
}

#[tokio::test]
async fn metrics_groups_filters_and_formats_points() {
    let f = fixture().await;
    let uri = format!(
        "/api/v1/metrics?name=traffic&field=events&{RANGE}&step=1m&group_by=event_type&event_type=like"
    );
    let (status, body) = get_json(&f.state, &uri).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({
            "name": "traffic", "field": "events", "step": "1m",
            "series": [{
                "tags": {"event_type": "like"},
                "points": [
                    {"t": "2026-11-23T08:00:00Z", "v": 42},
                    {"t": "2026-11-23T08:01:00Z", "v": 7},
                ],
            }],
        })
    );
    let q = f.store.queries.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        q.filters,
        vec![("event_type".to_string(), "like".to_string())]
    );
    assert_eq!(q.group_by, vec!["event_type".to_string()]);
    assert_eq!(q.from, EventTime(T0));
    assert_eq!(q.to, EventTime(T0 + 3_600_000));
    assert_eq!(q.aggregate, Aggregate::Sum);
}

#[tokio::test]
async fn metrics_without_group_by_totals_and_step_picks_tier() {
    let f = fixture().await;
    let uri = format!("/api/v1/metrics?name=traffic&field=events&{RANGE}");
    let (status, body) = get_json(&f.state, &uri).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["series"][0]["tags"], json!({}));
    assert_eq!(body["series"][0]["points"][0]["v"], json!(142));

    let uri = format!(
        "/api/v1/metrics?name=traffic&field=events&from={}&to={}&step=1h&agg=max",
        T0,
        T0 + 3_600_000
    );
    let (status, body) = get_json(&f.state, &uri).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["step"], "1h");
    assert_eq!(body["series"][0]["points"][0]["v"], json!(1000));
    let q = f.store.queries.lock().unwrap().last().cloned().unwrap();
    assert_eq!(q.tier, Tier::Hourly);
    assert_eq!(q.aggregate, Aggregate::Max);
}

#[tokio::test]
async fn metrics_rejects_bad_parameters_with_json_400() {
    let f = fixture().await;
    for query in [
        "field=events",
        "name=traffic",
        "name=traffic;drop&field=events",
        "name=traffic&field=events&step=2m",
        "name=traffic&field=events&from=soon",
        "name=traffic&field=events&group_by=event-type",
        "name=traffic&field=events&agg=p99",
    ] {
        let (status, body) = get_json(&f.state, &format!("/api/v1/metrics?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{query}: {body}"
        );
    }
    assert!(f.store.queries.lock().unwrap().is_empty());
}

#[tokio::test]
async fn metrics_reports_an_unavailable_store_as_503() {
    let f = fixture().await;
    f.store.down.store(true, Ordering::SeqCst);
    let (status, body) = get_json(&f.state, "/api/v1/metrics?name=traffic&field=events").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["error"].as_str().is_some());
}

#[tokio::test]
async fn prometheus_endpoint_renders_the_registry() {
    let f = fixture().await;
    let other = prometheus::IntCounter::new("tidemark_other_total", "another component").unwrap();
    f.registry.register(Box::new(other.clone())).unwrap();
    other.inc_by(3);
    get(&f.state, "/api/v1/metrics?name=traffic&field=events").await;
    let (status, body) = get(&f.state, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("tidemark_other_total 3"), "{text}");
    assert!(text.contains("tidemark_ws_clients 0"), "{text}");
    assert!(
        text.contains("tidemark_serve_query_seconds_count 1"),
        "{text}"
    );
}

#[tokio::test]
async fn root_explains_how_to_build_the_dashboard() {
    let f = fixture().await;
    let (status, body) = get(&f.state, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8(body)
        .unwrap()
        .contains("npm --prefix dashboards/web ci"));
}

#[tokio::test]
async fn dashboard_is_served_with_index_fallback() {
    let dir = std::env::temp_dir().join(format!("tidemark-web-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("assets")).unwrap();
    std::fs::write(dir.join("index.html"), "<html>dashboard</html>").unwrap();
    std::fs::write(dir.join("assets/app.js"), "console.log(1)").unwrap();
    let f = fixture().await;
    let (access, _access_dir) = test_access();
    let state = Arc::new(ServerState::new(
        f.store.clone(),
        f.updates.clone(),
        f.registry,
        Some(dir.clone()),
        access,
    ));
    let (status, body) = get(&state, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"<html>dashboard</html>");
    let (_, body) = get(&state, "/assets/app.js").await;
    assert_eq!(body, b"console.log(1)");
    let (status, body) = get(&state, "/some/client/route").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"<html>dashboard</html>");
    let (_, health) = get_json(&state, "/api/v1/health").await;
    assert_eq!(health["status"], "ok");
    std::fs::remove_dir_all(dir).ok();
}

fn update(minute: i64, is_final: bool, points: Vec<Point>) -> Update {
    update_at(EventTime(T0 + minute * 60_000), is_final, points)
}

fn update_at(window_start: EventTime, is_final: bool, points: Vec<Point>) -> Update {
    Update {
        window_start,
        is_final,
        newest_received_at: EventTime::now(),
        points,
    }
}

type ClientTx = futures::channel::mpsc::Sender<String>;
type ClientRx = futures::channel::mpsc::Receiver<String>;

/// A session over channels: what the client sends, what it receives.
fn channel_session(state: &Arc<ServerState>) -> (ClientTx, ClientRx, tokio::task::JoinHandle<()>) {
    let (client_tx, server_rx) = futures::channel::mpsc::channel::<String>(8);
    let (server_tx, client_rx) = futures::channel::mpsc::channel::<String>(8);
    let session = tokio::spawn({
        let state = state.clone();
        async move {
            let server_tx = server_tx.with(|text: Utf8Bytes| {
                futures::future::ready(Ok::<_, futures::channel::mpsc::SendError>(text.to_string()))
            });
            let _ = run_session(state, analyst(), server_tx, server_rx).await;
        }
    });
    (client_tx, client_rx, session)
}

/// The next message a channel session sent, within 5 s.
async fn recv(rx: &mut ClientRx) -> Value {
    let msg = tokio::time::timeout(Duration::from_secs(5), rx.next())
        .await
        .expect("a message in time")
        .unwrap();
    serde_json::from_str(&msg).unwrap()
}

/// Sends `{"op": op, "channel": channel}`.
async fn op(tx: &mut ClientTx, op: &str, channel: &str) {
    tx.send(json!({"op": op, "channel": channel}).to_string())
        .await
        .unwrap();
}

/// A client's copy of each channel it follows: the `seq` it has and the
/// data, its snapshot with every update since merged in.
type Copies = BTreeMap<String, (u64, Value)>;

/// Merges an update's data into a channel's data as a client does: a JSON
/// merge patch (RFC 7396).
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(patch) => {
            if !target.is_object() {
                *target = json!({});
            }
            let object = target.as_object_mut().unwrap();
            for (key, value) in patch {
                if value.is_null() {
                    object.remove(key);
                } else {
                    merge(object.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// `value` without its `null`s: channel data leaves out what a REST answer
/// has as `null`.
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// Applies a channel message to `copies`: a snapshot replaces the copy; an
/// update must be numbered one after the copy's `seq`, and is merged in.
fn apply(copies: &mut Copies, msg: &Value) {
    let (Some(channel), Some(seq)) = (msg["channel"].as_str(), msg["seq"].as_u64()) else {
        panic!("not a channel message: {msg}");
    };
    match msg["type"].as_str() {
        Some("snapshot") => {
            copies.insert(channel.to_string(), (seq, msg["data"].clone()));
        }
        Some("update") => {
            let (last, data) = copies
                .get_mut(channel)
                .unwrap_or_else(|| panic!("an update before its snapshot: {msg}"));
            assert_eq!(seq, *last + 1, "gapless: {msg}");
            *last = seq;
            merge(data, &msg["data"]);
        }
        _ => panic!("not a channel message: {msg}"),
    }
}

/// Reads channel messages into `copies` until `done` holds for them (each
/// message within 5 s); gives the messages read.
async fn follow_until(
    rx: &mut ClientRx,
    copies: &mut Copies,
    done: impl Fn(&Copies) -> bool,
) -> Vec<Value> {
    let mut read = Vec::new();
    while !done(copies) {
        let msg = recv(rx).await;
        apply(copies, &msg);
        read.push(msg);
    }
    read
}

/// Subscribes to `channel` and reads until its snapshot came.
async fn subscribe(tx: &mut ClientTx, rx: &mut ClientRx, copies: &mut Copies, channel: &str) {
    copies.remove(channel);
    op(tx, "subscribe", channel).await;
    follow_until(rx, copies, |c| c.contains_key(channel)).await;
}

/// Unsubscribes from `channel`, then (since a session handles its client's
/// messages in order) makes sure by a round trip that the session has
/// handled it.
async fn unsubscribe(tx: &mut ClientTx, rx: &mut ClientRx, copies: &mut Copies, channel: &str) {
    op(tx, "unsubscribe", channel).await;
    copies.remove(channel);
    subscribe(tx, rx, copies, "alerts").await;
    assert_eq!(copies["alerts"].1, json!({"alerts": {}}));
}

/// Reads until `done`, and checks that `quiet` said nothing meanwhile.
async fn follow_without(
    rx: &mut ClientRx,
    copies: &mut Copies,
    quiet: &str,
    done: impl Fn(&Copies) -> bool,
) {
    for msg in follow_until(rx, copies, done).await {
        assert_ne!(msg["channel"], quiet, "unsubscribed: {msg}");
    }
}

/// The windows of overview data, oldest first.
fn windows(data: &Value) -> Vec<Value> {
    data["windows"]
        .as_object()
        .map(|w| w.values().cloned().collect())
        .unwrap_or_default()
}

/// Bad messages and unknown channels get an error, and the socket stays
/// open; the overview: a snapshot, then each changed window whole.
#[tokio::test]
async fn session_answers_errors_and_sends_overview_windows_whole() {
    let f = fixture().await;
    let (mut client_tx, mut client_rx, session) = channel_session(&f.state);

    client_tx.send(r#"{"op":"dance"}"#.into()).await.unwrap();
    assert_eq!(recv(&mut client_rx).await["code"], "unknown_op");
    for channel in ["weather", "campaign:", "trending:2m"] {
        op(&mut client_tx, "subscribe", channel).await;
        let error = recv(&mut client_rx).await;
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("error"), Some("unknown_channel")),
            "{channel}: {error}"
        );
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    op(&mut client_tx, "unsubscribe", "weather").await;
    assert_eq!(recv(&mut client_rx).await["code"], "unknown_channel");
    client_tx.send("not json".into()).await.unwrap();
    assert_eq!(recv(&mut client_rx).await["code"], "bad_message");

    // Still open: subscriptions work.
    op(&mut client_tx, "subscribe", "overview").await;
    let snapshot = recv(&mut client_rx).await;
    assert_eq!(
        (snapshot["type"].as_str(), snapshot["channel"].as_str()),
        (Some("snapshot"), Some("overview"))
    );
    assert_eq!(snapshot["data"], json!({"windows": {}}));
    let seq = snapshot["seq"].as_u64().unwrap();

    f.updates
        .send(update(
            0,
            false,
            vec![
                traffic(Tier::Rt, 0, "like", "DE", 4),
                traffic(Tier::Rt, 0, "like", "FR", 1),
                traffic(Tier::Hourly, 0, "like", "FR", 1000),
            ],
        ))
        .unwrap();
    let msg = recv(&mut client_rx).await;
    assert_eq!(
        (msg["type"].as_str(), msg["seq"].as_u64()),
        (Some("update"), Some(seq + 1))
    );
    assert_eq!(
        msg["data"],
        json!({"windows": {"2026-11-23T08:00:00Z": {"window_start": "2026-11-23T08:00:00Z",
            "final": false, "traffic": {"like": 5}, "active_users": 0}}})
    );
    // Active users arrive separately and do not wipe the traffic counts;
    // the window comes whole.
    f.updates.send(update(0, true, vec![users(0, 3)])).unwrap();
    let msg = recv(&mut client_rx).await;
    let window = &msg["data"]["windows"]["2026-11-23T08:00:00Z"];
    assert_eq!(window["traffic"], json!({"like": 5}));
    assert_eq!(window["active_users"], 3);
    assert_eq!(window["final"], true);

    drop(client_tx);
    session.await.unwrap();
}

/// A session more than a channel's backlog behind gets one snapshot of the
/// newest values instead of what it missed, and goes on from there.
#[tokio::test]
async fn a_session_that_falls_behind_gets_a_snapshot_of_the_newest_values() {
    let store = Arc::new(MemStore::default());
    let Served {
        updates,
        registry,
        state,
        _access_dir,
    } = served(store, 4096);
    let (mut client_tx, mut client_rx, session) = channel_session(&state);
    let mut copies = Copies::new();
    subscribe(&mut client_tx, &mut client_rx, &mut copies, "overview").await;

    // Far more changes than the backlog (256) while the client reads
    // nothing: the session can pass on only what its 8-message socket
    // holds, and falls behind.
    const CHANGES: i64 = 1000;
    for minute in 0..CHANGES {
        updates
            .send(update(
                minute,
                false,
                vec![traffic(Tier::Rt, minute, "view", "DE", minute)],
            ))
            .unwrap();
    }
    let newest = EventTime(T0 + (CHANGES - 1) * 60_000).to_rfc3339();
    let read = follow_until(&mut client_rx, &mut copies, |c| {
        c["overview"].1["windows"][&newest]["traffic"]["view"] == CHANGES - 1
    })
    .await;
    assert!(
        read.iter().any(|m| m["type"] == "snapshot"),
        "coalesced into a snapshot"
    );
    assert!(read.len() < CHANGES as usize, "{} messages", read.len());
    assert_eq!(windows(&copies["overview"].1).len(), 60);
    assert!(metric_value(&registry, "tidemark_ws_messages_dropped_total") >= 1.0);
    assert_eq!(metric_value(&registry, "tidemark_ws_clients"), 1.0);

    drop(client_tx);
    session.await.unwrap();
    assert_eq!(metric_value(&registry, "tidemark_ws_clients"), 0.0);
}

/// The value of an unlabelled counter or gauge in the registry.
fn metric_value(registry: &prometheus::Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .find(|family| family.get_name() == name)
        .and_then(|family| family.get_metric().first().cloned())
        // The kind a family is not has its default value, zero.
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .unwrap_or(f64::NAN)
}

#[tokio::test]
async fn websocket_subscribe_gets_snapshot_then_update() {
    let f = fixture().await;
    // Seed the overview and wait until the channel task has applied it.
    f.updates
        .send(update(
            0,
            true,
            vec![traffic(Tier::Rt, 0, "like", "DE", 9), users(0, 2)],
        ))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while f.state.overview().windows().count() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, router(f.state.clone()), async {
        stop_rx.await.ok();
    }));

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    use tokio_tungstenite::tungstenite::Message;
    async fn recv<S>(ws: &mut S) -> Value
    where
        S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        serde_json::from_str(msg.to_text().unwrap()).unwrap()
    }
    ws.send(Message::text(r#"{"op":"subscribe","channel":"overview"}"#))
        .await
        .unwrap();
    let refused = recv(&mut ws).await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("unauthorized"))
    );
    let auth = json!({"op": "auth", "token": token(&f.state, Role::Analyst)});
    ws.send(Message::text(auth.to_string())).await.unwrap();
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "authenticated", "role": "analyst"})
    );
    ws.send(Message::text(r#"{"op":"subscribe","channel":"overview"}"#))
        .await
        .unwrap();
    let snapshot = recv(&mut ws).await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(
        windows(&snapshot["data"]),
        vec![
            json!({"window_start": "2026-11-23T08:00:00Z", "final": true,
                "traffic": {"like": 9}, "active_users": 2})
        ]
    );

    f.updates
        .send(update(
            1,
            false,
            vec![traffic(Tier::Rt, 1, "share", "DE", 1)],
        ))
        .unwrap();
    let msg = recv(&mut ws).await;
    assert_eq!(msg["type"], "update");
    assert_eq!(msg["seq"], snapshot["seq"].as_u64().unwrap() + 1);
    let window = &msg["data"]["windows"]["2026-11-23T08:01:00Z"];
    assert_eq!(window["window_start"], "2026-11-23T08:01:00Z");
    assert_eq!(window["traffic"], json!({"share": 1}));

    let (_, metrics) = get(&f.state, "/metrics").await;
    let text = String::from_utf8(metrics).unwrap();
    assert!(text.contains("tidemark_ws_clients 1"), "{text}");
    assert!(
        text.contains("tidemark_serve_event_to_update_seconds_count 1"),
        "{text}"
    );

    drop(ws);
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// `tidemark promote`: sessions get a snapshot of the newly served database,
/// then its changes; live updates are held back until the live database is
/// served again.
#[tokio::test]
async fn switching_the_served_database_resends_the_overview_from_it() {
    let live = Arc::new(MemStore::default());
    let promoted = Arc::new(MemStore::default());
    // Some hours old, as replayed history is.
    let base = EventTime::now()
        .minus(Duration::from_secs(3 * 3600))
        .floor(Duration::from_secs(60));
    let at = |minute: i64| EventTime(base.0 + minute * 60_000);
    let point = |minute: i64, kind: &str, n: i64| {
        Point::new(
            "traffic",
            Tier::Rt,
            at(minute),
            vec![("event_type".into(), kind.into())],
            vec![("events".into(), FieldValue::Int(n))],
        )
    };
    promoted.write(&[point(0, "like", 7)]).await.unwrap();
    let Served {
        updates,
        state,
        _access_dir,
        ..
    } = served(live.clone(), 16);
    let (mut client_tx, mut client_rx, session) = channel_session(&state);
    let window = |minute: i64, traffic: Value| {
        json!({"window_start": at(minute).to_rfc3339(), "final": true,
               "traffic": traffic, "active_users": 0})
    };
    op(&mut client_tx, "subscribe", "overview").await;
    assert!(windows(&recv(&mut client_rx).await["data"]).is_empty());

    state.serving().switch("v2", promoted.clone());
    let msg = recv(&mut client_rx).await;
    assert_eq!(msg["type"], "snapshot");
    assert_eq!(windows(&msg["data"]), vec![window(0, json!({"like": 7}))]);
    // The live processor's updates describe the live database: held back.
    let live_update = Update {
        window_start: at(1),
        is_final: false,
        newest_received_at: EventTime::now(),
        points: vec![point(1, "view", 3)],
    };
    updates.send(live_update.clone()).unwrap();
    // What the promoted database gains arrives as an update.
    promoted.write(&[point(2, "share", 2)]).await.unwrap();
    let msg = recv(&mut client_rx).await;
    assert_eq!(msg["type"], "update");
    assert_eq!(windows(&msg["data"]), vec![window(2, json!({"share": 2}))]);
    // A client connecting now starts from the promoted database too.
    let overview: Vec<EventTime> = state.overview().windows().map(|(t, _)| t).collect();
    assert_eq!(overview, vec![at(0), at(2)]);

    // Rollback: the live database's (empty) overview, then live updates again.
    state.serving().switch("tidemark", live.clone());
    let msg = recv(&mut client_rx).await;
    assert_eq!(msg["type"], "snapshot");
    assert!(windows(&msg["data"]).is_empty());
    updates.send(live_update).unwrap();
    let msg = recv(&mut client_rx).await;
    assert_eq!(msg["type"], "update");
    assert_eq!(windows(&msg["data"])[0]["traffic"], json!({"view": 3}));

    drop(client_tx);
    session.await.unwrap();
}

fn trending_point(minute: i64, window: &str, tag: &str, rank: i64, users: i64) -> Point {
    Point::new(
        "trending",
        Tier::Rt,
        EventTime(T0 + minute * 60_000),
        vec![("tag".into(), tag.into()), ("window".into(), window.into())],
        vec![
            ("events".into(), FieldValue::Int(users * 3)),
            ("rank".into(), FieldValue::Int(rank)),
            ("score".into(), FieldValue::Float(users as f64 / 2.0)),
            ("users".into(), FieldValue::Int(users)),
        ],
    )
}

/// The trending channel: a numbered snapshot, then numbered changes only,
/// ending equal to the REST answer for the final window; other channels
/// and unsubscribing.
#[tokio::test]
async fn trending_channel_numbers_its_changes_and_ends_equal_to_rest() {
    let f = fixture().await;
    let (mut client_tx, mut client_rx, _session) = channel_session(&f.state);
    client_tx
        .send(r#"{"op":"subscribe","channel":"trending:5m"}"#.into())
        .await
        .unwrap();
    let snapshot = recv(&mut client_rx).await;
    assert_eq!(
        (snapshot["type"].as_str(), snapshot["seq"].as_u64()),
        (Some("snapshot"), Some(0))
    );
    let mut state = snapshot["data"].clone();
    assert_eq!(state["tags"], json!([]));

    let early = vec![
        trending_point(0, "5m", "rust", 1, 9),
        trending_point(0, "5m", "go", 2, 4),
        trending_point(0, "1m", "zig", 1, 2),
    ];
    f.updates.send(update(0, false, early)).unwrap();
    let last = vec![
        trending_point(0, "5m", "go", 1, 12),
        trending_point(0, "5m", "rust", 2, 10),
        trending_point(0, "5m", "c", 3, 1),
    ];
    f.store.write(&last).await.unwrap();
    f.updates.send(update(0, true, last)).unwrap();
    for seq in 1..=2 {
        let msg = recv(&mut client_rx).await;
        assert_eq!(msg["type"], "update", "{msg}");
        assert_eq!(msg["seq"], seq, "gapless: {msg}");
        merge(&mut state, &msg["data"]);
    }
    assert_eq!(state["final"], true);
    let (status, rest) = get_json(&f.state, &format!("/api/v1/trending?window=5m&at={T0}")).await;
    assert_eq!(status, StatusCode::OK);
    let rest = without_nulls(&rest);
    for key in ["window", "start", "end", "final", "tags"] {
        assert_eq!(
            state[key], rest[key],
            "{key}: channel {state} vs REST {rest}"
        );
    }

    // Unsubscribed, the 5m channel is quiet while the 1m one speaks.
    client_tx
        .send(r#"{"op":"unsubscribe","channel":"trending:5m"}"#.into())
        .await
        .unwrap();
    client_tx
        .send(r#"{"op":"subscribe","channel":"trending:1m"}"#.into())
        .await
        .unwrap();
    let one = recv(&mut client_rx).await;
    assert_eq!(
        (one["channel"].as_str(), one["seq"].as_u64()),
        (Some("trending:1m"), Some(1))
    );
    assert_eq!(one["data"]["tags"][0]["tag"], "zig");
    f.updates
        .send(update(
            1,
            false,
            vec![
                trending_point(1, "5m", "x", 1, 1),
                trending_point(1, "1m", "y", 1, 1),
            ],
        ))
        .unwrap();
    let next = recv(&mut client_rx).await;
    assert_eq!(
        (next["channel"].as_str(), next["seq"].as_u64()),
        (Some("trending:1m"), Some(2)),
        "{next}"
    );

    client_tx
        .send(r#"{"op":"subscribe","channel":"alerts"}"#.into())
        .await
        .unwrap();
    let alerts = recv(&mut client_rx).await;
    assert_eq!(alerts["data"], json!({"alerts": {}}));
    client_tx
        .send(r#"{"op":"subscribe","channel":"trending:2m"}"#.into())
        .await
        .unwrap();
    assert_eq!(recv(&mut client_rx).await["code"], "unknown_channel");
}

/// The overview channel ends equal to the REST answers for a final window,
/// and is quiet once unsubscribed.
#[tokio::test]
async fn overview_channel_ends_equal_to_rest() {
    let f = fixture().await;
    let (mut tx, mut rx, _session) = channel_session(&f.state);
    let mut copies = Copies::new();
    subscribe(&mut tx, &mut rx, &mut copies, "overview").await;
    let start = EventTime(T0).to_rfc3339();

    f.updates
        .send(update(
            0,
            false,
            vec![traffic(Tier::Rt, 0, "like", "DE", 3), users(0, 1)],
        ))
        .unwrap();
    // What the fixture's store holds for the minute, now final.
    let last = vec![
        traffic(Tier::Rt, 0, "like", "DE", 40),
        traffic(Tier::Rt, 0, "like", "FR", 2),
        traffic(Tier::Rt, 0, "view", "DE", 100),
        users(0, 5),
    ];
    f.store.write(&last).await.unwrap();
    f.updates.send(update(0, true, last)).unwrap();
    follow_until(&mut rx, &mut copies, |c| {
        c["overview"].1["windows"][&start]["final"] == true
    })
    .await;

    let window = &copies["overview"].1["windows"][&start];
    let range = format!("from={T0}&to={}", T0 + 60_000);
    let (_, rest) = get_json(
        &f.state,
        &format!("/api/v1/metrics?name=traffic&field=events&step=1m&group_by=event_type&{range}"),
    )
    .await;
    let rest_traffic: serde_json::Map<String, Value> = rest["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let kind = s["tags"]["event_type"].as_str().unwrap().to_string();
            (kind, s["points"][0]["v"].clone())
        })
        .collect();
    assert_eq!(window["traffic"], Value::Object(rest_traffic));
    let (_, rest) = get_json(
        &f.state,
        &format!("/api/v1/metrics?name=active_users&field=users&step=1m&{range}"),
    )
    .await;
    assert_eq!(window["active_users"], rest["series"][0]["points"][0]["v"]);
    assert_eq!(window["window_start"], start);

    // Unsubscribed: quiet, while another channel goes on.
    unsubscribe(&mut tx, &mut rx, &mut copies, "overview").await;
    subscribe(&mut tx, &mut rx, &mut copies, "trending:1m").await;
    f.updates
        .send(update(
            1,
            false,
            vec![
                traffic(Tier::Rt, 1, "like", "DE", 1),
                trending_point(1, "1m", "y", 1, 1),
            ],
        ))
        .unwrap();
    follow_without(&mut rx, &mut copies, "overview", |c| {
        c["trending:1m"].1["tags"][0]["tag"] == "y"
    })
    .await;
}

#[allow(clippy::too_many_arguments)]
fn engagement_point(
    minute: i64,
    country: &str,
    segment: &str,
    started: i64,
    ended: i64,
    active: i64,
    score: i64,
    averages: Option<(f64, f64)>,
) -> Point {
    let mut fields = vec![
        ("sessions_started".into(), FieldValue::Int(started)),
        ("sessions_ended".into(), FieldValue::Int(ended)),
        ("active_sessions".into(), FieldValue::Int(active)),
        ("engagement_score".into(), FieldValue::Int(score)),
    ];
    // As the processor writes them: only when sessions ended.
    if let Some((seconds, events)) = averages {
        fields.push(("avg_session_seconds".into(), FieldValue::Float(seconds)));
        fields.push(("events_per_session".into(), FieldValue::Float(events)));
    }
    Point::new(
        "engagement",
        Tier::Rt,
        EventTime(T0 + minute * 60_000),
        vec![
            ("country".into(), country.into()),
            ("segment".into(), segment.into()),
        ],
        fields,
    )
}

/// The engagement channel ends equal to the REST answer for a final
/// minute; a new minute replaces every group; unsubscribing quiets it.
#[tokio::test]
async fn engagement_channel_ends_equal_to_rest() {
    let f = fixture().await;
    let (mut tx, mut rx, _session) = channel_session(&f.state);
    let mut copies = Copies::new();
    subscribe(&mut tx, &mut rx, &mut copies, "engagement").await;
    assert_eq!(
        copies["engagement"].1,
        json!({"final": false, "groups": {}})
    );

    f.updates
        .send(update(
            0,
            false,
            vec![
                engagement_point(0, "US", "new", 2, 0, 2, 10, None),
                engagement_point(0, "DE", "loyal", 1, 0, 1, 3, None),
            ],
        ))
        .unwrap();
    // One segment per country, so REST's answer by country is the group's.
    let last = vec![
        engagement_point(0, "US", "new", 3, 2, 3, 25, Some((95.5, 7.5))),
        engagement_point(0, "DE", "loyal", 1, 0, 1, 4, None),
    ];
    f.store.write(&last).await.unwrap();
    f.updates.send(update(0, true, last)).unwrap();
    follow_until(&mut rx, &mut copies, |c| c["engagement"].1["final"] == true).await;

    let data = &copies["engagement"].1;
    assert_eq!(data["minute"], EventTime(T0).to_rfc3339());
    let (status, rest) = get_json(
        &f.state,
        &format!(
            "/api/v1/engagement?from={T0}&to={}&step=1m&group_by=country",
            T0 + 60_000
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rest}");
    let segment = |country: &str| if country == "US" { "new" } else { "loyal" };
    let mut groups = serde_json::Map::new();
    for series in rest["series"].as_array().unwrap() {
        let country = series["tags"]["country"].as_str().unwrap();
        let mut fields = without_nulls(&series["points"][0]);
        fields.as_object_mut().unwrap().remove("t");
        groups.insert(format!("{country}/{}", segment(country)), fields);
    }
    assert_eq!(data["groups"], Value::Object(groups));

    // The next minute's groups replace the last minute's.
    f.updates
        .send(update(
            1,
            false,
            vec![engagement_point(1, "FR", "new", 1, 0, 1, 1, None)],
        ))
        .unwrap();
    follow_until(&mut rx, &mut copies, |c| {
        c["engagement"].1["minute"] == EventTime(T0 + 60_000).to_rfc3339()
    })
    .await;
    let groups: Vec<&String> = copies["engagement"].1["groups"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(groups, ["FR/new"]);
    assert_eq!(copies["engagement"].1["final"], false);

    unsubscribe(&mut tx, &mut rx, &mut copies, "engagement").await;
    subscribe(&mut tx, &mut rx, &mut copies, "trending:1m").await;
    f.updates
        .send(update(
            2,
            false,
            vec![
                engagement_point(2, "FR", "new", 1, 0, 1, 1, None),
                trending_point(2, "1m", "y", 1, 1),
            ],
        ))
        .unwrap();
    follow_without(&mut rx, &mut copies, "engagement", |c| {
        c["trending:1m"].1["tags"][0]["tag"] == "y"
    })
    .await;
}

const DAY_MS: i64 = 86_400_000;

/// Midnight (UTC) of today: campaign totals are today's.
fn today() -> EventTime {
    EventTime::now().floor(Duration::from_millis(DAY_MS as u64))
}

/// An `ads` point: `[impressions, clicks, conversions]`, spend and revenue.
fn ad(
    time: EventTime,
    campaign: &str,
    (country, device): (&str, &str),
    [impressions, clicks, conversions]: [i64; 3],
    spend: f64,
    revenue: f64,
) -> Point {
    let mut fields = vec![
        ("impressions".into(), FieldValue::Int(impressions)),
        ("clicks".into(), FieldValue::Int(clicks)),
        ("clicks_unattributed".into(), FieldValue::Int(0)),
        ("conversions".into(), FieldValue::Int(conversions)),
        ("spend".into(), FieldValue::Float(spend)),
        ("revenue".into(), FieldValue::Float(revenue)),
    ];
    // Stored as the processor stores it; summed ratios mean nothing, and the
    // server computes them from the summed counts.
    if impressions > 0 {
        let ctr = clicks as f64 / impressions as f64;
        fields.push(("ctr".into(), FieldValue::Float(ctr)));
    }
    Point::new(
        "ads",
        Tier::Rt,
        time,
        vec![
            ("campaign_id".into(), campaign.into()),
            ("country".into(), country.into()),
            ("device".into(), device.into()),
        ],
        fields,
    )
}

/// Writes the daily-tier `ads` points of today from the stored minutes, as
/// the processor does.
async fn write_daily(store: &MemStore) {
    let day = today();
    let mut sums: BTreeMap<Vec<(String, String)>, BTreeMap<String, f64>> = BTreeMap::new();
    for p in store.points.lock().unwrap().iter() {
        if p.measurement == "ads" && p.tier == Tier::Rt && p.time >= day {
            let fields = sums.entry(p.tags.clone()).or_default();
            for (k, v) in &p.fields {
                *fields.entry(k.clone()).or_default() += v.as_f64();
            }
        }
    }
    let daily: Vec<Point> = sums
        .into_iter()
        .map(|(tags, fields)| {
            let fields = fields
                .into_iter()
                .map(|(k, v)| (k, FieldValue::Float(v)))
                .collect();
            Point::new("ads", Tier::Daily, day, tags, fields)
        })
        .collect();
    store.write(&daily).await.unwrap();
}

/// `GET /api/v1/campaigns` over `[from, to)`: fields by campaign, without
/// `null`s.
async fn rest_campaigns(state: &Arc<ServerState>, from: EventTime, to: EventTime) -> Value {
    let uri = format!("/api/v1/campaigns?from={}&to={}", from.0, to.0);
    let (status, body) = get_json(state, &uri).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut campaigns = serde_json::Map::new();
    for c in body["campaigns"].as_array().unwrap() {
        let mut fields = without_nulls(c);
        let id = fields
            .as_object_mut()
            .unwrap()
            .remove("campaign_id")
            .unwrap();
        campaigns.insert(id.as_str().unwrap().to_string(), fields);
    }
    Value::Object(campaigns)
}

/// `GET /api/v1/campaigns/{id}` over one step: `{"total","by_device",
/// "by_country"}`, without `null`s.
async fn rest_campaign(state: &Arc<ServerState>, id: &str, from: EventTime, step: &str) -> Value {
    let to = EventTime(from.0 + if step == "1d" { DAY_MS } else { 60_000 });
    let mut split = serde_json::Map::new();
    for (key, group) in [
        ("total", ""),
        ("by_device", "device"),
        ("by_country", "country"),
    ] {
        let uri = format!(
            "/api/v1/campaigns/{id}?from={}&to={}&step={step}&group_by={group}",
            from.0, to.0
        );
        let (status, body) = get_json(state, &uri).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let mut groups = serde_json::Map::new();
        for series in body["series"].as_array().unwrap() {
            let points = series["points"].as_array().unwrap();
            assert_eq!(points.len(), 1, "one step: {body}");
            let mut fields = without_nulls(&points[0]);
            fields.as_object_mut().unwrap().remove("t");
            match series["tags"][group].as_str() {
                Some(value) => groups.insert(value.to_string(), fields),
                None => split.insert(key.to_string(), fields),
            };
        }
        if !group.is_empty() {
            split.insert(key.to_string(), Value::Object(groups));
        }
    }
    Value::Object(split)
}

/// `campaigns` and `campaign:<id>`: the newest minute and today's totals,
/// ending equal to the REST answers once the minutes are final; a late
/// correction replaces the minute it corrects; an id not seen yet starts
/// empty and fills; unsubscribing quiets a channel.
#[tokio::test]
async fn campaign_channels_end_equal_to_rest_for_today_and_the_minute() {
    let f = fixture().await;
    let (mut tx, mut rx, _session) = channel_session(&f.state);
    let day = today();
    let at = |minute: i64| EventTime(day.0 + minute * 60_000);
    let mut copies = Copies::new();
    subscribe(&mut tx, &mut rx, &mut copies, "campaigns").await;
    subscribe(&mut tx, &mut rx, &mut copies, "campaign:c1").await;
    let c1 = &copies["campaign:c1"].1;
    assert_eq!(c1["campaign_id"], "c1");
    assert!(
        c1.get("today").is_none() && c1.get("current").is_none(),
        "{c1}"
    );

    let de_ios = ("DE", "ios");
    let fr_web = ("FR", "web");
    f.updates
        .send(update_at(
            at(1),
            false,
            vec![ad(at(1), "c1", de_ios, [4, 1, 0], 1.0, 0.0)],
        ))
        .unwrap();
    let first = vec![
        ad(at(1), "c1", de_ios, [8, 2, 1], 2.0, 5.0),
        ad(at(1), "c1", fr_web, [4, 0, 0], 1.0, 0.0),
        ad(at(1), "c2", de_ios, [2, 1, 0], 0.5, 0.0),
    ];
    f.store.write(&first).await.unwrap();
    f.updates
        .send(update_at(at(1), true, first.clone()))
        .unwrap();
    // A late event corrects the minute: the window comes again, whole.
    let corrected = vec![
        ad(at(1), "c1", de_ios, [12, 3, 1], 3.0, 5.0),
        first[1].clone(),
        first[2].clone(),
    ];
    f.store.write(&corrected).await.unwrap();
    f.updates.send(update_at(at(1), true, corrected)).unwrap();
    f.updates
        .send(update_at(
            at(2),
            false,
            vec![ad(at(2), "c1", ("DE", "android"), [2, 0, 0], 0.25, 0.0)],
        ))
        .unwrap();
    let second = vec![ad(at(2), "c1", ("DE", "android"), [4, 1, 1], 0.5, 2.0)];
    f.store.write(&second).await.unwrap();
    write_daily(&f.store).await;
    f.updates.send(update_at(at(2), true, second)).unwrap();
    let minute = at(2).to_rfc3339();
    follow_until(&mut rx, &mut copies, |c| {
        ["campaigns", "campaign:c1"]
            .iter()
            .all(|name| c[*name].1["minute"] == minute && c[*name].1["final"] == true)
    })
    .await;

    let all = &copies["campaigns"].1;
    assert_eq!(all["day"], day.to_rfc3339());
    let today_rest = rest_campaigns(&f.state, day, EventTime(day.0 + DAY_MS)).await;
    let minute_rest = rest_campaigns(&f.state, at(2), at(3)).await;
    for (id, entry) in all["campaigns"].as_object().unwrap() {
        assert_eq!(entry["today"], today_rest[id], "{id} today");
        match minute_rest.get(id) {
            Some(fields) => assert_eq!(&entry["current"], fields, "{id} now"),
            None => assert!(entry.get("current").is_none(), "{id}: {entry}"),
        }
    }
    assert_eq!(all["campaigns"].as_object().unwrap().len(), 2);
    // The corrected minute replaced its first version: 12 + 4 + 4.
    assert_eq!(all["campaigns"]["c1"]["today"]["impressions"], 20);
    let c1 = &copies["campaign:c1"].1;
    assert_eq!(c1["today"], rest_campaign(&f.state, "c1", day, "1d").await);
    assert_eq!(
        c1["current"],
        rest_campaign(&f.state, "c1", at(2), "1m").await
    );
    assert_eq!(c1["today"]["by_device"]["ios"]["impressions"], 12);

    // What the client merged is what a new subscriber gets.
    let merged = copies["campaigns"].1.clone();
    subscribe(&mut tx, &mut rx, &mut copies, "campaigns").await;
    assert_eq!(copies["campaigns"].1, merged);

    // Unsubscribed from c1: quiet, while `campaigns` goes on.
    unsubscribe(&mut tx, &mut rx, &mut copies, "campaign:c1").await;
    f.updates
        .send(update_at(
            at(3),
            false,
            vec![ad(at(3), "c1", de_ios, [1, 0, 0], 0.25, 0.0)],
        ))
        .unwrap();
    let minute = at(3).to_rfc3339();
    follow_without(&mut rx, &mut copies, "campaign:c1", |c| {
        c["campaigns"].1["minute"] == minute
    })
    .await;
}

/// Today's campaign totals are read from the store when the server starts
/// and when another database is served, so a restart mid-day shows them.
#[tokio::test]
async fn campaign_totals_of_today_are_seeded_from_the_store() {
    let day = today();
    let at = |minute: i64| EventTime(day.0 + minute * 60_000);
    let store = Arc::new(MemStore::default());
    let mut hourly = ad(day, "c1", ("DE", "ios"), [5000, 0, 0], 9.0, 0.0);
    hourly.tier = Tier::Hourly;
    store
        .write(&[
            ad(at(1), "c1", ("DE", "ios"), [10, 2, 1], 2.5, 10.0),
            ad(at(2), "c1", ("US", "web"), [6, 1, 0], 1.5, 0.0),
            ad(at(2), "c2", ("US", "web"), [4, 0, 0], 1.0, 0.0),
            // Yesterday's, and another tier's: not in today's totals.
            ad(
                EventTime(day.0 - 60_000),
                "c1",
                ("DE", "ios"),
                [1000, 0, 0],
                9.0,
                0.0,
            ),
            hourly,
        ])
        .await
        .unwrap();
    let Served {
        updates,
        state,
        _access_dir,
        ..
    } = served(store.clone(), 16);
    let (mut tx, mut rx, _session) = channel_session(&state);
    let mut copies = Copies::new();
    subscribe(&mut tx, &mut rx, &mut copies, "campaigns").await;
    subscribe(&mut tx, &mut rx, &mut copies, "campaign:c1").await;
    // Subscribed before the store was read, a client gets the seeded
    // snapshot as the channel's next change.
    follow_until(&mut rx, &mut copies, |c| {
        c["campaigns"].1.get("day").is_some() && c["campaign:c1"].1.get("today").is_some()
    })
    .await;
    let all = &copies["campaigns"].1;
    let rest = rest_campaigns(&state, day, EventTime(day.0 + DAY_MS)).await;
    let today: serde_json::Map<String, Value> = all["campaigns"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(id, entry)| (id.clone(), entry["today"].clone()))
        .collect();
    assert_eq!(Value::Object(today), rest);
    assert_eq!(all["campaigns"]["c1"]["today"]["impressions"], 16);
    // The newest stored minute is the current one, and final.
    assert_eq!(
        (all["minute"].as_str(), all["final"].as_bool()),
        (Some(at(2).to_rfc3339().as_str()), Some(true))
    );
    assert_eq!(
        copies["campaign:c1"].1["today"]["by_country"]["US"]["impressions"],
        6
    );

    // A live minute the store also holds replaces the seeded one.
    let corrected = ad(at(2), "c1", ("US", "web"), [7, 1, 0], 1.75, 0.0);
    store.write(std::slice::from_ref(&corrected)).await.unwrap();
    updates
        .send(update_at(
            at(2),
            true,
            vec![
                corrected,
                ad(at(2), "c2", ("US", "web"), [4, 0, 0], 1.0, 0.0),
            ],
        ))
        .unwrap();
    follow_until(&mut rx, &mut copies, |c| {
        c["campaigns"].1["campaigns"]["c1"]["today"]["impressions"] == 17
    })
    .await;
    let rest = rest_campaigns(&state, day, EventTime(day.0 + DAY_MS)).await;
    assert_eq!(
        copies["campaigns"].1["campaigns"]["c1"]["today"],
        rest["c1"]
    );

    // `tidemark promote`: the other database's totals, as a snapshot.
    let other = Arc::new(MemStore::default());
    other
        .write(&[ad(at(5), "c3", ("FR", "android"), [3, 3, 1], 0.75, 4.0)])
        .await
        .unwrap();
    state.serving().switch("v2", other);
    let read = follow_until(&mut rx, &mut copies, |c| {
        c["campaigns"].1["campaigns"].get("c3").is_some()
            && c["campaign:c1"].1.get("today").is_none()
    })
    .await;
    assert!(read.iter().all(|m| m["type"] == "snapshot"), "{read:?}");
    let rest = rest_campaigns(&state, day, EventTime(day.0 + DAY_MS)).await;
    let ids: Vec<&String> = copies["campaigns"].1["campaigns"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(ids, ["c3"]);
    assert_eq!(
        copies["campaigns"].1["campaigns"]["c3"]["today"],
        rest["c3"]
    );
}

/// Updates the channel task missed (it fell behind the updates channel)
/// cannot be missing from today's totals: it starts over from the store.
#[tokio::test]
async fn missed_live_updates_start_the_channels_over_from_the_store() {
    let day = today();
    let at = |minute: i64| EventTime(day.0 + minute * 60_000);
    let store = Arc::new(MemStore::default());
    let Served {
        updates,
        registry,
        state,
        _access_dir,
    } = served(store.clone(), 2);
    let (mut tx, mut rx, _session) = channel_session(&state);
    let mut copies = Copies::new();
    subscribe(&mut tx, &mut rx, &mut copies, "campaigns").await;
    follow_until(&mut rx, &mut copies, |c| {
        c["campaigns"].1.get("day").is_some()
    })
    .await;

    // Four final minutes at once into a channel that holds two.
    for minute in 1..=4 {
        let points = vec![ad(
            at(minute),
            "c1",
            ("DE", "ios"),
            [minute, 0, 0],
            0.25,
            0.0,
        )];
        store.write(&points).await.unwrap();
        updates.send(update_at(at(minute), true, points)).unwrap();
    }
    follow_until(&mut rx, &mut copies, |c| {
        c["campaigns"].1["campaigns"]["c1"]["today"]["impressions"] == 1 + 2 + 3 + 4
    })
    .await;
    let rest = rest_campaigns(&state, day, EventTime(day.0 + DAY_MS)).await;
    assert_eq!(
        copies["campaigns"].1["campaigns"]["c1"]["today"],
        rest["c1"]
    );
    assert!(metric_value(&registry, "tidemark_ws_messages_dropped_total") >= 2.0);
}

/// A client that stops reading is dropped after 10 s with close code 4008,
/// while another client on the same channel gets every change at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_as_slow_and_others_never_wait() {
    use tokio_tungstenite::tungstenite::Message;
    let store = Arc::new(MemStore::default());
    let Served {
        updates,
        registry,
        state,
        _access_dir,
    } = served(store, 8192);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, router(state.clone()), async {
        stop_rx.await.ok();
    }));
    let connect = || async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .unwrap();
        let auth = json!({"op": "auth", "token": token(&state, Role::Analyst)});
        ws.send(Message::text(auth.to_string())).await.unwrap();
        ws.send(Message::text(
            r#"{"op":"subscribe","channel":"trending:5m"}"#,
        ))
        .await
        .unwrap();
        ws
    };
    let mut slow = connect().await;
    let mut fast = connect().await;
    async fn next_json<S>(ws: &mut S) -> Value
    where
        S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("a message in time")
                .unwrap()
                .unwrap();
            if let Message::Text(text) = msg {
                return serde_json::from_str(&text).unwrap();
            }
        }
    }
    for ws in [&mut slow, &mut fast] {
        assert_eq!(next_json(ws).await["type"], "authenticated");
        assert_eq!(next_json(ws).await["type"], "snapshot");
    }

    // Megabytes of changes: far more than the slow client's socket holds.
    const CHANGES: i64 = 3000;
    let long_tag = |i: i64, k: i64| format!("{k:02}-{}", "t".repeat(100 + (i % 7) as usize));
    for i in 0..CHANGES {
        let points = (1..=40)
            .map(|k| trending_point(i, "5m", &long_tag(i, k), k, 100 - k))
            .collect();
        updates.send(update(i, false, points)).unwrap();
        if i % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // The reading client reaches the last change while the slow one is
    // still connected: nobody waited for it.
    let last_start = EventTime(T0 + (CHANGES - 1) * 60_000).to_rfc3339();
    loop {
        let msg = next_json(&mut fast).await;
        if msg["data"]["start"] == last_start {
            break;
        }
    }
    assert_eq!(metric_value(&registry, "tidemark_ws_clients"), 2.0);

    // The slow client's session ends after it took nothing for 10 s...
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), async {
        while metric_value(&registry, "tidemark_ws_clients") > 1.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the slow client is let go");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // ...and, reading again, it finds the close frame behind what it missed.
    let close = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = slow.next().await {
            if let Ok(Message::Close(frame)) = msg {
                return frame;
            }
        }
        None
    })
    .await
    .expect("the socket ends")
    .expect("a close frame");
    assert_eq!(u16::from(close.code), 4008);
    assert_eq!(close.reason.as_str(), "slow");
    assert_eq!(
        metric_value(&registry, "tidemark_ws_slow_disconnects_total"),
        1.0
    );
    stop_tx.send(()).unwrap();
    drop(fast);
    server.await.unwrap().unwrap();
}
