//! The HTTP and WebSocket contract of the serving layer, against an in-memory store.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
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

/// Keeps points in a list and answers queries by scanning it (sum only).
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
        self.points.lock().unwrap().extend_from_slice(points);
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
    let (updates, _) = broadcast::channel(16);
    let registry = prometheus::Registry::new();
    let (access, access_dir) = test_access();
    let state = Arc::new(ServerState::new(
        store.clone(),
        updates.clone(),
        registry.clone(),
        None,
        access,
    ));
    Fixture {
        store,
        updates,
        registry,
        state,
        _access_dir: access_dir,
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
    assert!(text.contains("tidemark_query_seconds_count 1"), "{text}");
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
    Update {
        window_start: EventTime(T0 + minute * 60_000),
        is_final,
        newest_received_at: EventTime::now(),
        points,
    }
}

/// A session over channels: what the client sends, what it receives.
fn channel_session(
    state: &Arc<ServerState>,
) -> (
    futures::channel::mpsc::Sender<String>,
    futures::channel::mpsc::Receiver<String>,
    tokio::task::JoinHandle<()>,
) {
    let (client_tx, server_rx) = futures::channel::mpsc::channel::<String>(8);
    let (server_tx, client_rx) = futures::channel::mpsc::channel::<String>(8);
    let session = tokio::spawn({
        let state = state.clone();
        async move {
            run_session(state, analyst(), server_tx, server_rx).await;
        }
    });
    (client_tx, client_rx, session)
}

/// The next message a channel session sent, within 5 s.
async fn recv(rx: &mut futures::channel::mpsc::Receiver<String>) -> Value {
    let msg = tokio::time::timeout(Duration::from_secs(5), rx.next())
        .await
        .expect("a message in time")
        .unwrap();
    serde_json::from_str(&msg).unwrap()
}

/// The session over channels: subscribe, snapshot, updates, errors, lag.
#[tokio::test]
async fn session_sends_snapshot_updates_and_coalesces_when_lagging() {
    let store = Arc::new(MemStore::default());
    let (updates, _) = broadcast::channel(2);
    let registry = prometheus::Registry::new();
    let (access, _access_dir) = test_access();
    let state = Arc::new(ServerState::new(
        store,
        updates.clone(),
        registry.clone(),
        None,
        access,
    ));
    let (mut client_tx, mut client_rx, session) = channel_session(&state);

    client_tx.send(r#"{"op":"dance"}"#.into()).await.unwrap();
    assert_eq!(recv(&mut client_rx).await["type"], "error");
    client_tx
        .send(r#"{"op":"subscribe","channel":"weather"}"#.into())
        .await
        .unwrap();
    assert_eq!(recv(&mut client_rx).await["type"], "error");
    client_tx.send("not json".into()).await.unwrap();
    assert_eq!(recv(&mut client_rx).await["type"], "error");

    client_tx
        .send(r#"{"op":"subscribe","channel":"overview"}"#.into())
        .await
        .unwrap();
    let snapshot = recv(&mut client_rx).await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["windows"], json!([]));

    updates
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
    assert_eq!(msg["type"], "update");
    assert_eq!(msg["channel"], "overview");
    assert_eq!(
        msg["windows"],
        json!([{"window_start": "2026-11-23T08:00:00Z", "final": false,
                "traffic": {"like": 5}, "active_users": 0}])
    );
    // Active users arrive separately and do not wipe the traffic counts.
    updates.send(update(0, true, vec![users(0, 3)])).unwrap();
    let msg = recv(&mut client_rx).await;
    assert_eq!(msg["windows"][0]["traffic"], json!({"like": 5}));
    assert_eq!(msg["windows"][0]["active_users"], 3);
    assert_eq!(msg["windows"][0]["final"], true);

    // More updates than the channel holds, with no chance for the session to
    // run in between (single-threaded runtime): it must coalesce.
    for minute in 1..=4 {
        updates
            .send(update(
                minute,
                false,
                vec![traffic(Tier::Rt, minute, "view", "DE", minute)],
            ))
            .unwrap();
    }
    let msg = recv(&mut client_rx).await;
    assert_eq!(msg["type"], "snapshot");
    // Nothing is lost: the newest window arrives in the snapshot or right after it.
    let mut msg = msg;
    loop {
        let newest = msg["windows"].as_array().and_then(|w| w.last()).cloned();
        if newest.is_some_and(|w| w["window_start"] == "2026-11-23T08:04:00Z") {
            assert_eq!(
                msg["windows"].as_array().unwrap().last().unwrap()["traffic"],
                json!({"view": 4})
            );
            break;
        }
        msg = recv(&mut client_rx).await;
    }
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
    // Seed the hot cache and wait until the cache task has applied it.
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
        snapshot["windows"],
        json!([{"window_start": "2026-11-23T08:00:00Z", "final": true,
                "traffic": {"like": 9}, "active_users": 2}])
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
    assert_eq!(msg["windows"][0]["window_start"], "2026-11-23T08:01:00Z");
    assert_eq!(msg["windows"][0]["traffic"], json!({"share": 1}));

    let (_, metrics) = get(&f.state, "/metrics").await;
    let text = String::from_utf8(metrics).unwrap();
    assert!(text.contains("tidemark_ws_clients 1"), "{text}");
    assert!(
        text.contains("tidemark_event_to_update_seconds_count 1"),
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
    let (updates, _) = broadcast::channel(16);
    let (access, _access_dir) = test_access();
    let state = Arc::new(ServerState::new(
        live.clone(),
        updates.clone(),
        prometheus::Registry::new(),
        None,
        access,
    ));
    let (mut client_tx, mut client_rx, session) = channel_session(&state);
    let window = |minute: i64, traffic: Value| {
        json!({"window_start": at(minute).to_rfc3339(), "final": true,
               "traffic": traffic, "active_users": 0})
    };
    client_tx
        .send(r#"{"op":"subscribe","channel":"overview"}"#.into())
        .await
        .unwrap();
    assert_eq!(recv(&mut client_rx).await["windows"], json!([]));

    state.serving().switch("v2", promoted.clone());
    let msg = recv(&mut client_rx).await;
    assert_eq!(msg["type"], "snapshot");
    assert_eq!(msg["windows"], json!([window(0, json!({"like": 7}))]));
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
    assert_eq!(msg["windows"], json!([window(2, json!({"share": 2}))]));
    // A client connecting now starts from the promoted database too.
    let overview: Vec<EventTime> = state.overview().windows().map(|(t, _)| t).collect();
    assert_eq!(overview, vec![at(0), at(2)]);

    // Rollback: the live database's (empty) overview, then live updates again.
    state.serving().switch("tidemark", live.clone());
    let msg = recv(&mut client_rx).await;
    assert_eq!(msg["type"], "snapshot");
    assert_eq!(msg["windows"], json!([]));
    updates.send(live_update).unwrap();
    let msg = recv(&mut client_rx).await;
    assert_eq!(msg["type"], "update");
    assert_eq!(msg["windows"][0]["traffic"], json!({"view": 3}));

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
        for (key, value) in msg["data"].as_object().unwrap() {
            state[key] = value.clone();
        }
    }
    assert_eq!(state["final"], true);
    let (status, rest) = get_json(&f.state, &format!("/api/v1/trending?window=5m&at={T0}")).await;
    assert_eq!(status, StatusCode::OK);
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
    assert_eq!(alerts["data"], json!({"alerts": []}));
    client_tx
        .send(r#"{"op":"subscribe","channel":"trending:2m"}"#.into())
        .await
        .unwrap();
    assert_eq!(recv(&mut client_rx).await["code"], "unknown_channel");
}

/// A client that stops reading is dropped after 10 s with close code 4008,
/// while another client on the same channel gets every change at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_as_slow_and_others_never_wait() {
    use tokio_tungstenite::tungstenite::Message;
    let store = Arc::new(MemStore::default());
    let (updates, _) = broadcast::channel(8192);
    let registry = prometheus::Registry::new();
    let (access, _access_dir) = test_access();
    let state = Arc::new(ServerState::new(
        store,
        updates.clone(),
        registry.clone(),
        None,
        access,
    ));
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
    stop_tx.send(()).unwrap();
    drop(fast);
    server.await.unwrap().unwrap();
}
