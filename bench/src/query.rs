//! `tidemark bench query`: read latency of the serving layer over `--days`
//! of 1-minute traffic in the embedded SQLite store.
//!
//! The store holds the traffic the generator's tags give (every
//! country × device pair it produces, by event type) for each minute of the
//! days, ending now. Measured in process, through the router (routing,
//! credential check, JSON) without a socket, `--runs` times each:
//! 24 hours at 1 minute grouped by `event_type` through `GET
//! /api/v1/metrics` and through `POST /api/v1/query`, and the newest hour
//! both ways, which the hot cache answers (fed the way the live processor
//! feeds it: final updates), beside the same hour read from the store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use tidemark_model::{EventTime, FieldValue, Point, Tier, Update};
use tidemark_tsdb_writer::sqlite::SqliteStore;
use tidemark_tsdb_writer::{Aggregate, MetricQuery, Store};
use tidemark_ws_server::{router, Access, AccessConfig, Role, ServerState};
use tokio::sync::broadcast;
use tower::ServiceExt as _;

use super::args::BenchArgs;
use super::report::summary;
use tidemark_generator::{COUNTRIES, DEVICES, MIX};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Points written per store call while loading.
const LOAD_BATCH: usize = 20_000;

/// Every (country, device) pair generated users have: both follow the user
/// number, so there are as many pairs as their least common multiple.
fn tag_pairs() -> Vec<(&'static str, &'static str)> {
    let mut pairs: Vec<_> = (0..COUNTRIES.len() * DEVICES.len())
        .map(|user| {
            (
                COUNTRIES[user % COUNTRIES.len()],
                DEVICES[user % DEVICES.len()],
            )
        })
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

/// One minute of traffic: every pair by every event type, and its users.
fn minute_points(time: EventTime, pairs: &[(&str, &str)]) -> Vec<Point> {
    let minute = time.millis() / 60_000;
    let mut points = Vec::with_capacity(pairs.len() * MIX.len() + 1);
    for (i, (country, device)) in pairs.iter().enumerate() {
        for (j, event_type) in MIX.iter().map(|(t, _)| t).enumerate() {
            let events = 1 + (minute + i as i64 * 7 + j as i64 * 13) % 50;
            points.push(Point::new(
                "traffic",
                Tier::Rt,
                time,
                vec![
                    ("country".into(), country.to_string()),
                    ("device".into(), device.to_string()),
                    ("event_type".into(), event_type.to_string()),
                ],
                vec![("events".into(), FieldValue::Int(events))],
            ));
        }
    }
    points.push(Point::new(
        "active_users",
        Tier::Rt,
        time,
        Vec::new(),
        vec![("users".into(), FieldValue::Int(1000 + minute % 100))],
    ));
    points
}

struct Bench {
    state: Arc<ServerState>,
    token: String,
}

impl Bench {
    async fn call(&self, request: Request<Body>) -> anyhow::Result<Value> {
        let response = router(self.state.clone()).oneshot(request).await?;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 28).await?;
        let value: Value = serde_json::from_slice(&bytes).context("answer is not JSON")?;
        ensure!(status == StatusCode::OK, "answered {status}: {value}");
        Ok(value)
    }

    async fn metrics(&self, from: EventTime, to: EventTime) -> anyhow::Result<usize> {
        let uri = format!(
            "/api/v1/metrics?name=traffic&field=events&group_by=event_type&step=1m&from={}&to={}",
            from.millis(),
            to.millis()
        );
        let request = Request::get(uri)
            .header("authorization", format!("Bearer {}", self.token))
            .body(Body::empty())?;
        let answer = self.call(request).await?;
        Ok(answer["series"].as_array().map_or(0, |s| {
            s.iter()
                .map(|s| s["points"].as_array().map_or(0, Vec::len))
                .sum()
        }))
    }

    async fn query(&self, from: EventTime, to: EventTime) -> anyhow::Result<usize> {
        let sql = format!(
            "SELECT time, event_type, sum(events) AS events FROM traffic \
             WHERE time >= {} AND time < {} GROUP BY time, event_type",
            from.millis(),
            to.millis()
        );
        let request = Request::post("/api/v1/query")
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Body::from(
                json!({ "sql": sql, "limit": 100_000 }).to_string(),
            ))?;
        let answer = self.call(request).await?;
        Ok(answer["row_count"].as_u64().unwrap_or(0) as usize)
    }
}

/// Runs `f` `runs` times: its answer's size and the latencies' p50, p95
/// and max in milliseconds.
async fn measure<F, Fut>(runs: usize, mut f: F) -> anyhow::Result<Value>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    let mut rows = 0;
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        rows = f().await?;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| (ms[((ms.len() - 1) as f64 * q).round() as usize] * 100.0).round() / 100.0;
    Ok(json!({ "rows": rows, "p50_ms": at(0.5), "p95_ms": at(0.95), "max_ms": at(1.0) }))
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<Value> {
    ensure!(args.days >= 1, "--days must be at least 1");
    ensure!(args.runs >= 1, "--runs must be at least 1");
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SqliteStore::open(dir.path().join("bench.db"))?);
    store.ensure_schema().await?;
    let end = EventTime::now().floor(MINUTE);
    let start = end.minus(DAY * args.days as u32);
    let pairs = tag_pairs();

    let loading = Instant::now();
    let mut batch = Vec::with_capacity(LOAD_BATCH + pairs.len() * MIX.len() + 1);
    let mut written = 0usize;
    let mut t = start;
    while t < end {
        batch.extend(minute_points(t, &pairs));
        if batch.len() >= LOAD_BATCH {
            store.write(&batch).await?;
            written += batch.len();
            batch.clear();
        }
        t = t.plus(MINUTE);
    }
    store.write(&batch).await?;
    written += batch.len();
    let load_seconds = loading.elapsed().as_secs_f64();

    let access = Access::open(AccessConfig {
        users_file: dir.path().join("users.toml"),
        jwt_secret: vec![1; 32],
        ingest_keys: Vec::new(),
        audit_log: dir.path().join("audit.ndjson"),
    })?;
    let (updates, _) = broadcast::channel(256);
    let state = Arc::new(ServerState::new(
        store.clone(),
        updates.clone(),
        prometheus::Registry::new(),
        None,
        access,
    ));
    let token = state
        .access()
        .users()
        .create_token(Role::Analyst, "bench")?
        .0;
    let bench = Bench { state, token };

    // The hot cache hears the newest hour (and the minutes it needs to
    // count itself complete) as the live processor would tell it.
    let hour_from = end.minus(HOUR);
    let mut t = hour_from.minus(MINUTE * 5);
    while t < end {
        let update = Update {
            window_start: t,
            is_final: true,
            newest_received_at: EventTime::now(),
            points: minute_points(t, &pairs),
        };
        while updates.len() > 200 {
            tokio::task::yield_now().await;
        }
        updates
            .send(update)
            .context("the server stopped listening")?;
        t = t.plus(MINUTE);
    }
    let waiting = Instant::now();
    while !bench.state.hot_covers(Tier::Rt, "traffic", hour_from)
        || bench.metrics(end.minus(MINUTE), end).await? == 0
    {
        ensure!(
            waiting.elapsed() < Duration::from_secs(30),
            "the hot cache did not take the newest hour"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let runs = args.runs;
    let day_from = end.minus(DAY);
    let metrics_day = measure(runs, || bench.metrics(day_from, end)).await?;
    let query_day = measure(runs, || bench.query(day_from, end)).await?;
    let metrics_hot = measure(runs, || bench.metrics(hour_from, end)).await?;
    let query_hot = measure(runs, || bench.query(hour_from, end)).await?;
    let hour_query = MetricQuery {
        measurement: "traffic".into(),
        field: "events".into(),
        tier: Tier::Rt,
        from: hour_from,
        to: end,
        filters: Vec::new(),
        group_by: vec!["event_type".into()],
        aggregate: Aggregate::Sum,
    };
    let store_hour = measure(runs, || async {
        let series = store.query(&hour_query).await?;
        Ok(series.iter().map(|s| s.points.len()).sum())
    })
    .await?;
    ensure!(
        metrics_hot["rows"] == store_hour["rows"],
        "the hot cache and the store disagree on the newest hour"
    );
    Ok(summary(
        "query",
        written as u64,
        load_seconds,
        json!({
            "days": args.days,
            "series_per_minute": pairs.len() * MIX.len(),
            "runs": runs,
            "metrics_24h_1m": metrics_day,
            "query_24h_1m": query_day,
            "metrics_hot_hour": metrics_hot,
            "query_hot_hour": query_hot,
            "store_hour": store_hour,
        }),
    ))
}
