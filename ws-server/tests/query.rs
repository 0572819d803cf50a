//! `POST /api/v1/query` over the embedded store: answers, refusals, the
//! row limit, the timeout and the audit entry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use tidemark_model::{EventTime, FieldValue, Point, Tier};
use tidemark_tsdb_writer::sqlite::SqliteStore;
use tidemark_tsdb_writer::Store;
use tidemark_ws_server::{router, Access, AccessConfig, Role, ServerState};
use tokio::sync::broadcast;
use tower::ServiceExt;

const T0: i64 = 1_795_420_800_000; // 2026-11-23T08:00:00Z
const MINUTE: i64 = 60_000;

struct Server {
    state: Arc<ServerState>,
    token: String,
    dir: tempfile::TempDir,
}

fn traffic(tier: Tier, minute: i64, event_type: &str, country: &str, events: i64) -> Point {
    Point::new(
        "traffic",
        tier,
        EventTime(T0 + minute * MINUTE),
        vec![
            ("country".into(), country.into()),
            ("device".into(), "web".into()),
            ("event_type".into(), event_type.into()),
        ],
        vec![("events".into(), FieldValue::Int(events))],
    )
}

/// Ten minutes of `like` and `view` in two countries, and an hourly point
/// that a query of the default tier must not count.
async fn server() -> Server {
    let store = SqliteStore::open_in_memory().unwrap();
    store.ensure_schema().await.unwrap();
    let mut points = Vec::new();
    for minute in 0..10 {
        points.push(traffic(Tier::Rt, minute, "like", "DE", minute + 1));
        points.push(traffic(Tier::Rt, minute, "like", "FR", 10));
        points.push(traffic(Tier::Rt, minute, "view", "DE", 100));
    }
    points.push(traffic(Tier::Hourly, 0, "like", "DE", 1000));
    store.write(&points).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let access = Access::open(AccessConfig {
        users_file: dir.path().join("users.toml"),
        jwt_secret: vec![3; 32],
        ingest_keys: Vec::new(),
        audit_log: dir.path().join("audit.ndjson"),
    })
    .unwrap();
    let (updates, _) = broadcast::channel(4);
    let state = Arc::new(ServerState::new(
        Arc::new(store),
        updates,
        prometheus::Registry::new(),
        None,
        access,
    ));
    let token = state
        .access()
        .users()
        .create_token(Role::Analyst, "test")
        .unwrap()
        .0;
    Server { state, token, dir }
}

impl Server {
    async fn query(&self, body: Value) -> (StatusCode, Value) {
        let request = Request::post("/api/v1/query")
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = router(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("audit.ndjson"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn within_the_ten_minutes(select: &str) -> String {
    format!(
        "{select} WHERE time >= '2026-11-23T08:00:00Z' AND time < {}",
        T0 + 10 * MINUTE
    )
}

#[tokio::test]
async fn a_grouped_select_sums_the_minutes_of_the_range_in_the_rt_tier() {
    let server = server().await;
    let sql = within_the_ten_minutes(
        "SELECT event_type, sum(events) AS events, count(*) AS points FROM traffic",
    ) + " GROUP BY event_type ORDER BY event_type";
    let (status, answer) = server.query(json!({ "sql": sql })).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["columns"], json!(["event_type", "events", "points"]));
    // like: 1 + 2 + … + 10 in DE and 10 × 10 in FR; the hourly 1000 is not counted.
    assert_eq!(
        answer["rows"],
        json!([["like", 155, 20], ["view", 1000, 10]])
    );
    assert_eq!(answer["truncated"], json!(false));
    assert_eq!(answer["row_count"], json!(2));

    let (_, hourly) = server
        .query(
            json!({ "sql": within_the_ten_minutes("SELECT tier, sum(events) FROM traffic")
            + " AND tier = 'hourly' GROUP BY tier" }),
        )
        .await;
    assert_eq!(hourly["rows"], json!([["hourly", 1000]]));

    let (_, narrowed) = server
        .query(json!({ "sql": "SELECT time, events FROM traffic WHERE country = 'DE' AND \
                       event_type = 'like' AND time BETWEEN 1795421040000 AND '2026-11-23T08:05:00Z' ORDER BY time" }))
        .await;
    assert_eq!(
        narrowed["rows"],
        json!([[T0 + 4 * MINUTE, 5], [T0 + 5 * MINUTE, 6]])
    );
}

#[tokio::test]
async fn anything_but_a_select_with_a_time_filter_is_refused_with_a_code() {
    let server = server().await;
    for (sql, code) in [
        ("DELETE FROM traffic WHERE time > 0", "not_read_only"),
        (
            "UPDATE traffic SET events = 0 WHERE time > 0",
            "not_read_only",
        ),
        ("CREATE TABLE x (a INTEGER)", "not_read_only"),
        ("ATTACH DATABASE '/tmp/x.db' AS x", "not_read_only"),
        (
            "SELECT 1 FROM traffic WHERE time > 0; DROP TABLE traffic",
            "not_read_only",
        ),
        ("SELECT sum(events) FROM traffic", "time_filter_required"),
        (
            "SELECT sum(events) FROM traffic WHERE time > 0 OR country = 'DE'",
            "time_filter_required",
        ),
        (
            "SELECT * FROM sqlite_master WHERE time > 0",
            "unknown_table",
        ),
        ("SELECT FROM WHERE", "invalid_query"),
        (
            "SELECT no_such_column FROM traffic WHERE time > 0",
            "invalid_query",
        ),
        (
            "SELECT * FROM traffic WHERE time > 'yesterday'",
            "invalid_query",
        ),
    ] {
        let (status, answer) = server.query(json!({ "sql": sql })).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{sql}: {answer}");
        assert_eq!(answer["code"], json!(code), "{sql}: {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let (status, answer) = server.query(json!({ "query": "SELECT 1" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["code"], json!("bad_request"));
}

#[tokio::test]
async fn the_row_limit_cuts_the_answer_and_says_so() {
    let server = server().await;
    let sql =
        within_the_ten_minutes("SELECT time, country, events FROM traffic") + " ORDER BY time";
    let (status, answer) = server.query(json!({ "sql": sql, "limit": 4 })).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["rows"].as_array().unwrap().len(), 4);
    assert_eq!(answer["truncated"], json!(true));
    let (_, all) = server.query(json!({ "sql": sql, "limit": 30 })).await;
    assert_eq!(all["rows"].as_array().unwrap().len(), 30);
    assert_eq!(all["truncated"], json!(false));
    let (status, answer) = server.query(json!({ "sql": sql, "limit": 0 })).await;
    assert_eq!(
        (status, &answer["code"]),
        (StatusCode::BAD_REQUEST, &json!("bad_request"))
    );
}

#[tokio::test]
async fn a_query_past_its_timeout_is_stopped_and_answered_408() {
    let server = server().await;
    let endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) \
                   SELECT count(*) FROM n, (SELECT count(*) FROM traffic WHERE time >= 0)";
    let started = Instant::now();
    let (status, answer) = server
        .query(json!({ "sql": endless, "timeout_ms": 300 }))
        .await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{answer}");
    assert_eq!(answer["code"], json!("query_timeout"));
    assert!(took >= Duration::from_millis(300), "{took:?}");
    // The timer answers; the engine is interrupted, so the next query runs.
    assert!(took < Duration::from_secs(5), "{took:?}");
    let sql = within_the_ten_minutes("SELECT count(*) FROM traffic");
    for _ in 0..3 {
        let (status, answer) = server.query(json!({ "sql": sql })).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["rows"], json!([[30]]));
    }
}

#[tokio::test]
async fn every_query_is_audited_with_its_text_rows_and_duration() {
    let server = server().await;
    let sql = within_the_ten_minutes("SELECT DISTINCT country FROM traffic");
    let (status, _) = server.query(json!({ "sql": sql })).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server.query(json!({ "sql": "DROP TABLE traffic" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let entries: Vec<Value> = server
        .audit()
        .into_iter()
        .filter(|e| e["action"] == "query")
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0]["detail"]["sql"], json!(sql));
    assert_eq!(entries[0]["detail"]["rows"], json!(2));
    assert!(entries[0]["detail"]["duration_ms"].as_f64().is_some());
    assert!(entries[0]["actor"].as_str().unwrap().starts_with("token:"));
    assert_eq!(entries[1]["detail"]["error"], json!("not_read_only"));
}

#[tokio::test]
async fn the_tables_route_lists_every_column() {
    let server = server().await;
    let request = Request::get("/api/v1/query/tables")
        .header("authorization", format!("Bearer {}", server.token))
        .body(Body::empty())
        .unwrap();
    let response = router(server.state.clone()).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let tables: Value = serde_json::from_slice(&bytes).unwrap();
    let traffic = tables["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "traffic")
        .unwrap();
    assert_eq!(
        traffic["columns"],
        json!(["time", "tier", "country", "device", "event_type", "events"])
    );
}
