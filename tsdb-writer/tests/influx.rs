//! The InfluxDB store against a real `influxd` (1.x).
//!
//! Needs `influxd` (or `$TIDEMARK_INFLUXD`); fails without it unless
//! `TIDEMARK_SKIP_INFLUX=1`.

use std::sync::Arc;
use std::time::Duration;

use tidemark_model::{EventTime, FieldValue, Point, Tier};
use tidemark_tsdb_writer::influx::{InfluxConfig, InfluxStore};
use tidemark_tsdb_writer::testing::{InfluxServer, TestCertificates};
use tidemark_tsdb_writer::writer::{BatchingWriter, WriterConfig, WriterMetrics};
use tidemark_tsdb_writer::{Aggregate, MetricQuery, Series, Store};

mod common;
use common::{point, tags};

fn server() -> Option<InfluxServer> {
    if std::env::var("TIDEMARK_SKIP_INFLUX").as_deref() == Ok("1") {
        eprintln!("TIDEMARK_SKIP_INFLUX=1: skipping InfluxDB test");
        return None;
    }
    match InfluxServer::start() {
        Ok(s) => Some(s),
        Err(e) => panic!("{e}"),
    }
}

fn store(server: &InfluxServer) -> InfluxStore {
    InfluxStore::new(InfluxConfig {
        url: server.url.clone(),
        timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .unwrap()
}

// Recent times, so the 7-day `rt` policy accepts them.
fn base() -> i64 {
    EventTime::now().floor(Duration::from_secs(3600)).millis() - 3_600_000
}

fn query(t0: i64, field: &str, aggregate: Aggregate) -> MetricQuery {
    MetricQuery {
        measurement: "traffic".into(),
        field: field.into(),
        tier: Tier::Rt,
        from: EventTime(t0),
        to: EventTime(t0 + 600_000),
        filters: vec![],
        group_by: vec![],
        aggregate,
    }
}

#[tokio::test]
async fn schema_is_idempotent() {
    let Some(server) = server() else { return };
    let store = store(&server);
    // A policy left with other settings is brought to ours.
    let client = reqwest::Client::new();
    for q in [
        "CREATE DATABASE tidemark",
        "CREATE RETENTION POLICY hourly ON tidemark DURATION 2d REPLICATION 1",
    ] {
        let status = client
            .post(format!("{}/query", server.url))
            .form(&[("q", q)])
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success());
    }
    store.ensure_schema().await.unwrap();
    store.ensure_schema().await.unwrap();
    assert_eq!(store.kind(), "influxdb");
    let policies = client
        .get(format!("{}/query", server.url))
        .query(&[("q", "SHOW RETENTION POLICIES ON tidemark")])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(policies.contains(r#"["hourly","9600h0m0s""#), "{policies}");
    assert!(policies.contains(r#"["rt","168h0m0s""#), "{policies}");
    assert!(policies.contains(r#"["daily","43800h0m0s""#), "{policies}");
    // Every tier is writable.
    let t0 = base();
    for tier in Tier::ALL {
        store
            .write(&[point(tier, "de", "ios", t0, 1, 0.5)])
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn round_trip_with_groups_filters_and_overwrites() {
    let Some(server) = server() else { return };
    let store = store(&server);
    store.ensure_schema().await.unwrap();
    let t0 = base();
    let t1 = t0 + 60_000;
    store
        .write(&[
            point(Tier::Rt, "de", "ios", t0, 1, 0.5),
            point(Tier::Rt, "de", "android", t0, 2, 0.25),
            point(Tier::Rt, "fr", "ios", t0, 4, 1.0),
            point(Tier::Rt, "fr", "ios", t1, 8, 0.0),
            point(Tier::Hourly, "de", "ios", t0, 100, 9.0),
            point(Tier::Rt, "o'ne\"il", "ios", t0 + 600_000, 100, 9.0),
        ])
        .await
        .unwrap();

    let all = store
        .query(&query(t0, "events", Aggregate::Sum))
        .await
        .unwrap();
    assert_eq!(
        all,
        vec![Series {
            tags: tags(&[]),
            points: vec![(EventTime(t0), 7.0), (EventTime(t1), 8.0)]
        }]
    );

    let mean = store
        .query(&query(t0, "ratio", Aggregate::Mean))
        .await
        .unwrap();
    assert_eq!(
        mean[0].points,
        vec![(EventTime(t0), 1.75 / 3.0), (EventTime(t1), 0.0)]
    );
    let max = store
        .query(&query(t0, "events", Aggregate::Max))
        .await
        .unwrap();
    assert_eq!(
        max[0].points,
        vec![(EventTime(t0), 4.0), (EventTime(t1), 8.0)]
    );

    let mut q = query(t0, "events", Aggregate::Sum);
    q.group_by = vec!["country".into()];
    assert_eq!(
        store.query(&q).await.unwrap(),
        vec![
            Series {
                tags: tags(&[("country", "de")]),
                points: vec![(EventTime(t0), 3.0)]
            },
            Series {
                tags: tags(&[("country", "fr")]),
                points: vec![(EventTime(t0), 4.0), (EventTime(t1), 8.0)]
            },
        ]
    );

    q.group_by = vec!["country".into(), "device".into()];
    q.filters = vec![("device".into(), "ios".into())];
    let got = store.query(&q).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].tags, tags(&[("country", "de"), ("device", "ios")]));
    assert_eq!(got[0].points, vec![(EventTime(t0), 1.0)]);

    // Quotes in values are escaped, not interpreted.
    let mut odd = query(t0, "events", Aggregate::Sum);
    odd.to = EventTime(t0 + 1_200_000);
    odd.filters = vec![("country".into(), "o'ne\"il".into())];
    let got = store.query(&odd).await.unwrap();
    assert_eq!(got[0].points, vec![(EventTime(t0 + 600_000), 100.0)]);

    // Same identity: replaced, not added.
    store
        .write(&[point(Tier::Rt, "fr", "ios", t0, 40, 1.0)])
        .await
        .unwrap();
    let mut fr = query(t0, "events", Aggregate::Sum);
    fr.filters = vec![("country".into(), "fr".into())];
    assert_eq!(
        store.query(&fr).await.unwrap()[0].points,
        vec![(EventTime(t0), 40.0), (EventTime(t1), 8.0)]
    );

    let mut hourly = query(t0, "events", Aggregate::Sum);
    hourly.tier = Tier::Hourly;
    assert_eq!(
        store.query(&hourly).await.unwrap()[0].points,
        vec![(EventTime(t0), 100.0)]
    );
}

#[tokio::test]
async fn bad_writes_are_rejected() {
    let Some(server) = server() else { return };
    let store = store(&server);
    store.ensure_schema().await.unwrap();
    let t0 = base();
    store
        .write(&[point(Tier::Rt, "de", "ios", t0, 1, 0.5)])
        .await
        .unwrap();
    // `events` is an integer field; a float now is a type conflict.
    let conflict = Point::new(
        "traffic",
        Tier::Rt,
        EventTime(t0 + 60_000),
        vec![],
        vec![("events".into(), FieldValue::Float(1.5))],
    );
    let err = store.write(&[conflict]).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
}

#[tokio::test]
async fn stopped_server_is_retryable_and_the_writer_catches_up() {
    let Some(mut server) = server() else { return };
    let influx = store(&server);
    influx.ensure_schema().await.unwrap();
    server.stop();
    let t0 = base();
    let err = influx
        .write(&[point(Tier::Rt, "de", "ios", t0, 1, 0.5)])
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let err = influx
        .query(&query(t0, "events", Aggregate::Sum))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");

    let registry = prometheus::Registry::new();
    let metrics = WriterMetrics::new(&registry).unwrap();
    let config = WriterConfig {
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        ..Default::default()
    };
    let (handle, _task) = BatchingWriter::spawn(Arc::new(influx.clone()), config, metrics.clone());
    handle
        .send(vec![point(Tier::Rt, "de", "ios", t0, 5, 0.5)])
        .await
        .unwrap();
    let flusher = tokio::spawn({
        let handle = handle.clone();
        async move { handle.flush().await }
    });
    assert_eq!(metrics.store_up.get(), 1, "up before the first failure");
    while metrics.retries.get() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metrics.store_up.get(), 0, "down while retrying");
    let server = tokio::task::spawn_blocking(move || {
        server.restart().unwrap();
        server
    })
    .await
    .unwrap();
    flusher.await.unwrap().unwrap();
    let got = influx
        .query(&query(t0, "events", Aggregate::Sum))
        .await
        .unwrap();
    assert_eq!(got[0].points, vec![(EventTime(t0), 5.0)]);
    assert_eq!(metrics.points.get(), 1);
    assert_eq!(metrics.store_up.get(), 1, "up again after the write");
    drop(server);
}

#[tokio::test]
async fn lists_points_as_written() {
    let Some(server) = server() else { return };
    let store = store(&server);
    store.ensure_schema().await.unwrap();
    let t0 = base();
    let written = vec![
        point(Tier::Rt, "de", "ios", t0, 1, 0.5),
        point(Tier::Rt, "fr", "ios", t0 + 60_000, 8, 0.125),
        point(Tier::Hourly, "de", "ios", t0, 100, 9.5),
    ];
    store.write(&written).await.unwrap();
    let mut got = store
        .points(Tier::Rt, "traffic", EventTime(t0), EventTime(t0 + 600_000))
        .await
        .unwrap();
    got.sort_by_key(|p| (p.time, p.series_key()));
    assert_eq!(got, written[..2].to_vec());
    let none = store
        .points(Tier::Rt, "nothing", EventTime(t0), EventTime(t0 + 600_000))
        .await
        .unwrap();
    assert!(none.is_empty());
}

/// A point older than its tier keeps is refused by InfluxDB with a 400
/// "partial write": the rest of the batch, other tiers included, is still
/// written, and the refusal is counted rather than taken for a failure.
#[tokio::test]
async fn points_beyond_retention_are_counted_and_the_rest_is_written() {
    let Some(server) = server() else { return };
    let store = store(&server);
    store.ensure_schema().await.unwrap();
    let t0 = base();
    let eight_days_ago = t0 - 8 * 24 * 3_600_000;
    let batch = vec![
        point(Tier::Rt, "de", "ios", eight_days_ago, 7, 0.5),
        point(Tier::Rt, "de", "ios", t0, 1, 0.5),
        point(Tier::Hourly, "de", "ios", eight_days_ago, 70, 5.0),
    ];
    let registry = prometheus::Registry::new();
    let metrics = WriterMetrics::new(&registry).unwrap();
    let (handle, _task) = BatchingWriter::spawn(
        Arc::new(store.clone()),
        WriterConfig::default(),
        metrics.clone(),
    );
    handle.send(batch).await.unwrap();
    handle
        .flush()
        .await
        .expect("a refusal beyond retention is no failure");
    assert_eq!(store.points_beyond_retention(), 1);
    assert_eq!(metrics.beyond_retention.get(), 1);
    assert_eq!(metrics.failures.get(), 0);
    assert_eq!(metrics.store_up.get(), 1);
    let rt = store
        .points(
            Tier::Rt,
            "traffic",
            EventTime(eight_days_ago),
            EventTime(t0 + 60_000),
        )
        .await
        .unwrap();
    assert_eq!(rt.len(), 1, "the fresh rt point is written: {rt:?}");
    assert_eq!(rt[0].time, EventTime(t0));
    let hourly = store
        .points(
            Tier::Hourly,
            "traffic",
            EventTime(eight_days_ago),
            EventTime(eight_days_ago + 60_000),
        )
        .await
        .unwrap();
    assert_eq!(
        hourly.len(),
        1,
        "the hourly tier keeps 400 days: {hourly:?}"
    );
}

#[tokio::test]
async fn https_with_a_private_ca() {
    if std::env::var("TIDEMARK_SKIP_INFLUX").as_deref() == Ok("1") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCertificates::write(dir.path()).unwrap();
    let server = InfluxServer::start_tls(&certs.cert, &certs.key).unwrap();
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let config = InfluxConfig {
        url: server.url.clone(),
        timeout: Duration::from_secs(5),
        ..Default::default()
    };

    // The system's roots do not know the private CA: the certificate is checked.
    let untrusting = InfluxStore::new(config.clone()).unwrap();
    assert!(untrusting.ensure_schema().await.is_err());

    let store = InfluxStore::new(InfluxConfig {
        ca: Some(certs.ca.clone()),
        ..config.clone()
    })
    .unwrap();
    store.ensure_schema().await.unwrap();
    let t0 = base();
    store
        .write(&[point(Tier::Rt, "de", "ios", t0, 3, 0.5)])
        .await
        .unwrap();
    let series = store
        .query(&query(t0, "events", Aggregate::Sum))
        .await
        .unwrap();
    assert_eq!(series[0].points, vec![(EventTime(t0), 3.0)]);

    // A file that is no CA is named in the error.
    let error = InfluxStore::new(InfluxConfig {
        ca: Some(certs.key.clone()),
        ..config
    })
    .unwrap_err();
    assert!(error.to_string().contains("server.key"), "{error}");
}
