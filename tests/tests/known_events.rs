//! A known event set through the whole single-process path, read back through
//! the REST API, from the embedded store and from a real InfluxDB server.

use std::collections::BTreeMap;

use serde_json::json;
use tidemark_tests::{InfluxServer, JsonApi, KnownEvents, Tidemark};

/// The campaign routes count every known ad impression of the three minutes,
/// in total and per minute and device; no clicks, so a CTR of 0 and no CVR.
async fn assert_campaigns(t: &Tidemark, known: &KnownEvents) {
    let mut per_minute_device: BTreeMap<(i64, String), u64> = BTreeMap::new();
    for ((minute, kind, _, device), n) in &known.traffic {
        if kind == "ad_impression" {
            *per_minute_device
                .entry((*minute, device.clone()))
                .or_default() += n;
        }
    }
    let total: u64 = per_minute_device.values().sum();
    let (from, to) = (known.base, known.base + 3 * 60_000);
    let all = t
        .get_json(&format!("/api/v1/campaigns?from={from}&to={to}"))
        .await;
    let campaigns = all["campaigns"].as_array().expect("campaigns");
    assert_eq!(campaigns.len(), 1, "{all}");
    let c1 = &campaigns[0];
    assert_eq!(c1["campaign_id"], "c1");
    assert_eq!(c1["impressions"].as_u64(), Some(total), "{all}");
    assert_eq!(c1["clicks"].as_u64(), Some(0), "{all}");
    assert_eq!(
        (c1["ctr"].as_f64(), c1["cvr"].is_null()),
        (Some(0.0), true),
        "{all}"
    );

    let series = t
        .get_json(&format!(
            "/api/v1/campaigns/c1?from={from}&to={to}&step=1m&group_by=device"
        ))
        .await;
    let mut seen: BTreeMap<(i64, String), u64> = BTreeMap::new();
    for s in series["series"].as_array().expect("series") {
        let device = s["tags"]["device"].as_str().unwrap_or_default().to_string();
        for p in s["points"].as_array().into_iter().flatten() {
            let minute = p["t"]
                .as_str()
                .and_then(tidemark_model::EventTime::parse)
                .expect("a point time")
                .millis();
            seen.insert(
                (minute, device.clone()),
                p["impressions"].as_u64().unwrap_or(0),
            );
        }
    }
    assert_eq!(seen, per_minute_device, "{series}");
    // No hashtags in the set: the newest trending window has no tags.
    let trending = t
        .get_json(&format!("/api/v1/trending?window=1m&at={from}"))
        .await;
    assert_eq!(trending["tags"], serde_json::json!([]), "{trending}");
}

/// Ad-hoc SQL answers the same exact numbers whichever store serves: every
/// traffic point of the three minutes, and the impressions in total.
async fn assert_queries(t: &Tidemark, known: &KnownEvents) {
    let (from, to) = (known.base, known.base + 3 * 60_000);
    let sql = format!(
        "SELECT time, event_type, country, device, events FROM traffic \
         WHERE time >= {from} AND time < {to} ORDER BY time, event_type, country, device"
    );
    let (status, answer) = t.post_json("/api/v1/query", &json!({ "sql": sql })).await;
    assert_eq!(status, 200, "{answer}");
    let mut seen = BTreeMap::new();
    for row in answer["rows"].as_array().expect("rows") {
        let text = |i: usize| row[i].as_str().expect("a tag").to_string();
        seen.insert(
            (row[0].as_i64().expect("a time"), text(1), text(2), text(3)),
            row[4].as_u64().expect("a count"),
        );
    }
    assert_eq!(seen, known.traffic, "{answer}");
    assert_eq!(answer["truncated"], json!(false));

    let impressions: u64 = known
        .traffic
        .iter()
        .filter(|((_, kind, _, _), _)| kind == "ad_impression")
        .map(|(_, n)| n)
        .sum();
    let rfc3339 = |ms: i64| tidemark_model::EventTime(ms).to_rfc3339();
    let sql = format!(
        "SELECT campaign_id, sum(impressions), sum(clicks) FROM ads \
         WHERE time >= '{}' AND time < '{}' GROUP BY campaign_id",
        rfc3339(from),
        rfc3339(to)
    );
    let (status, answer) = t.post_json("/api/v1/query", &json!({ "sql": sql })).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["rows"], json!([["c1", impressions, 0]]), "{answer}");
}

async fn post_all(t: &Tidemark, known: &KnownEvents) {
    let mut rejected = 0;
    for batch in &known.batches {
        let (status, reply) = t.post(batch).await;
        assert_eq!(status, 202, "batch accepted: {reply}");
        rejected += reply["rejected"].as_array().map_or(0, Vec::len);
    }
    assert_eq!(
        rejected, known.invalid,
        "every invalid event rejected with a reason"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_counts_from_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tidemark::start(dir.path(), &[]).await;
    let known = KnownEvents::new(30);
    post_all(&t, &known).await;
    known.assert_results(&t).await;
    assert_campaigns(&t, &known).await;
    assert_queries(&t, &known).await;
    let health = t.get_json("/api/v1/health").await;
    assert_eq!(health["store"], "sqlite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_counts_from_influxdb() {
    let influx = InfluxServer::start().expect("influxd starts");
    let dir = tempfile::tempdir().unwrap();
    let t = Tidemark::start(
        dir.path(),
        &["--influx-url", &influx.url, "--influx-db", "tidemark"],
    )
    .await;
    let known = KnownEvents::new(30);
    post_all(&t, &known).await;
    known.assert_results(&t).await;
    assert_campaigns(&t, &known).await;
    assert_queries(&t, &known).await;
    let health = t.get_json("/api/v1/health").await;
    assert_eq!(health["store"], "influxdb");
}
