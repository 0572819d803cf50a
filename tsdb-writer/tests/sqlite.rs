//! The embedded store: overwrite semantics, queries and retention.

use tidemark_model::{EventTime, Tier};
use tidemark_tsdb_writer::sqlite::SqliteStore;
use tidemark_tsdb_writer::{Aggregate, MetricQuery, Series, Store};

mod common;
use common::{point, tags};

fn query(field: &str, aggregate: Aggregate) -> MetricQuery {
    MetricQuery {
        measurement: "traffic".into(),
        field: field.into(),
        tier: Tier::Rt,
        from: EventTime(0),
        to: EventTime(600_000),
        filters: vec![],
        group_by: vec![],
        aggregate,
    }
}

async fn sample() -> SqliteStore {
    let store = SqliteStore::open_in_memory().unwrap();
    store.ensure_schema().await.unwrap();
    store
        .write(&[
            point(Tier::Rt, "de", "ios", 0, 1, 0.5),
            point(Tier::Rt, "de", "android", 0, 2, 0.25),
            point(Tier::Rt, "fr", "ios", 0, 4, 1.0),
            point(Tier::Rt, "fr", "ios", 60_000, 8, 0.0),
            // Other tier and out of range: never in the answers below.
            point(Tier::Hourly, "de", "ios", 0, 100, 9.0),
            point(Tier::Rt, "de", "ios", 600_000, 100, 9.0),
        ])
        .await
        .unwrap();
    store
}

#[tokio::test]
async fn sums_all_series_per_time() {
    let store = sample().await;
    let got = store.query(&query("events", Aggregate::Sum)).await.unwrap();
    assert_eq!(
        got,
        vec![Series {
            tags: tags(&[]),
            points: vec![(EventTime(0), 7.0), (EventTime(60_000), 8.0)]
        }]
    );
    assert_eq!(store.kind(), "sqlite");
}

#[tokio::test]
async fn mean_and_max() {
    let store = sample().await;
    let mean = store.query(&query("ratio", Aggregate::Mean)).await.unwrap();
    assert_eq!(
        mean[0].points,
        vec![(EventTime(0), 1.75 / 3.0), (EventTime(60_000), 0.0)]
    );
    let max = store.query(&query("events", Aggregate::Max)).await.unwrap();
    assert_eq!(
        max[0].points,
        vec![(EventTime(0), 4.0), (EventTime(60_000), 8.0)]
    );
}

#[tokio::test]
async fn groups_and_filters() {
    let store = sample().await;
    let mut q = query("events", Aggregate::Sum);
    q.group_by = vec!["country".into()];
    let got = store.query(&q).await.unwrap();
    assert_eq!(
        got,
        vec![
            Series {
                tags: tags(&[("country", "de")]),
                points: vec![(EventTime(0), 3.0)]
            },
            Series {
                tags: tags(&[("country", "fr")]),
                points: vec![(EventTime(0), 4.0), (EventTime(60_000), 8.0)]
            },
        ]
    );

    q.group_by = vec!["country".into(), "device".into()];
    q.filters = vec![("device".into(), "ios".into())];
    let got = store.query(&q).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].tags, tags(&[("country", "de"), ("device", "ios")]));
    assert_eq!(got[0].points, vec![(EventTime(0), 1.0)]);
    assert_eq!(got[1].tags, tags(&[("country", "fr"), ("device", "ios")]));

    q.filters = vec![("device".into(), "o'neil\"".into())];
    assert!(store.query(&q).await.unwrap().is_empty());
}

#[tokio::test]
async fn missing_field_is_skipped() {
    let store = sample().await;
    assert!(store
        .query(&query("nope", Aggregate::Sum))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn same_identity_overwrites() {
    let store = sample().await;
    store
        .write(&[point(Tier::Rt, "fr", "ios", 0, 40, 1.0)])
        .await
        .unwrap();
    let mut q = query("events", Aggregate::Sum);
    q.filters = vec![("country".into(), "fr".into())];
    let got = store.query(&q).await.unwrap();
    assert_eq!(
        got[0].points,
        vec![(EventTime(0), 40.0), (EventTime(60_000), 8.0)]
    );
}

#[tokio::test]
async fn prunes_by_tier_retention() {
    let store = sample().await;
    // Eight days later: the rt points (7-day retention) go, the hourly one stays.
    let now = EventTime(8 * 24 * 3_600_000);
    assert_eq!(store.prune(now).await.unwrap(), 5);
    assert!(store
        .query(&query("events", Aggregate::Sum))
        .await
        .unwrap()
        .is_empty());
    let mut q = query("events", Aggregate::Sum);
    q.tier = Tier::Hourly;
    assert_eq!(
        store.query(&q).await.unwrap()[0].points,
        vec![(EventTime(0), 100.0)]
    );
    assert_eq!(store.prune(now).await.unwrap(), 0);
}

#[tokio::test]
async fn file_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("points.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        store
            .write(&[point(Tier::Rt, "de", "ios", 0, 3, 0.5)])
            .await
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let got = store.query(&query("events", Aggregate::Sum)).await.unwrap();
    assert_eq!(got[0].points, vec![(EventTime(0), 3.0)]);
}

#[tokio::test]
async fn lists_points_as_written() {
    let store = sample().await;
    let mut got = store
        .points(Tier::Rt, "traffic", EventTime(0), EventTime(600_000))
        .await
        .unwrap();
    got.sort_by_key(|p| (p.time, p.series_key()));
    assert_eq!(
        got,
        vec![
            point(Tier::Rt, "de", "android", 0, 2, 0.25),
            point(Tier::Rt, "de", "ios", 0, 1, 0.5),
            point(Tier::Rt, "fr", "ios", 0, 4, 1.0),
            point(Tier::Rt, "fr", "ios", 60_000, 8, 0.0),
        ]
    );
}

#[tokio::test]
async fn a_store_of_one_row_per_point_is_converted_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("points.db");
    {
        // The layout of earlier versions, as they left it.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE points (tier TEXT NOT NULL, measurement TEXT NOT NULL, \
               series TEXT NOT NULL, time INTEGER NOT NULL, tags TEXT NOT NULL, \
               fields TEXT NOT NULL, PRIMARY KEY (tier, measurement, series, time)) WITHOUT ROWID;
             INSERT INTO points VALUES
               ('rt', 'traffic', 'traffic,country=de,device=ios', 0,
                '{\"country\":\"de\",\"device\":\"ios\"}', '{\"events\":1,\"ratio\":0.5}'),
               ('rt', 'traffic', 'traffic,country=fr,device=ios', 0,
                '{\"country\":\"fr\",\"device\":\"ios\"}', '{\"events\":4,\"ratio\":1.0}'),
               ('rt', 'traffic', 'traffic,country=fr,device=ios', 60000,
                '{\"country\":\"fr\",\"device\":\"ios\"}', '{\"events\":8,\"ratio\":0.0}'),
               ('hourly', 'traffic', 'traffic,country=de,device=ios', 0,
                '{\"country\":\"de\",\"device\":\"ios\"}', '{\"events\":100,\"ratio\":9.0}');",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let mut got = store
        .points(Tier::Rt, "traffic", EventTime(0), EventTime(600_000))
        .await
        .unwrap();
    got.sort_by_key(|p| (p.time, p.series_key()));
    assert_eq!(
        got,
        vec![
            point(Tier::Rt, "de", "ios", 0, 1, 0.5),
            point(Tier::Rt, "fr", "ios", 0, 4, 1.0),
            point(Tier::Rt, "fr", "ios", 60_000, 8, 0.0),
        ]
    );
    let mut hourly = query("events", Aggregate::Sum);
    hourly.tier = Tier::Hourly;
    assert_eq!(
        store.query(&hourly).await.unwrap()[0].points,
        vec![(EventTime(0), 100.0)]
    );
    drop(store);
    // Converted once: the old table is gone and reopening keeps the points.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let old: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'points'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(old, 0);
    drop(conn);
    let store = SqliteStore::open(&path).unwrap();
    let got = store.query(&query("events", Aggregate::Sum)).await.unwrap();
    assert_eq!(
        got[0].points,
        vec![(EventTime(0), 5.0), (EventTime(60_000), 8.0)]
    );
}

#[tokio::test]
async fn a_reader_sees_series_another_handle_added_later() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("points.db");
    let writer = SqliteStore::open(&path).unwrap();
    let reader = SqliteStore::open(&path).unwrap();
    writer
        .write(&[point(Tier::Rt, "de", "ios", 0, 3, 0.5)])
        .await
        .unwrap();
    let mut q = query("events", Aggregate::Sum);
    q.group_by = vec!["country".into()];
    assert_eq!(reader.query(&q).await.unwrap().len(), 1);
    // A series the reader's handle has never seen, in a block it has read.
    writer
        .write(&[point(Tier::Rt, "fr", "ios", 0, 4, 0.5)])
        .await
        .unwrap();
    let got = reader.query(&q).await.unwrap();
    assert_eq!(
        got,
        vec![
            Series {
                tags: tags(&[("country", "de")]),
                points: vec![(EventTime(0), 3.0)]
            },
            Series {
                tags: tags(&[("country", "fr")]),
                points: vec![(EventTime(0), 4.0)]
            },
        ]
    );
}
