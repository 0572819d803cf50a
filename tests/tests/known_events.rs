//! A known event set through the whole single-process path, read back through
//! the REST API, from the embedded store and from a real InfluxDB server.

use std::collections::BTreeMap;

use tidemark_tests::{InfluxServer, KnownEvents, Tidemark};

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
    let health = t.get_json("/api/v1/health").await;
    assert_eq!(health["store"], "influxdb");
}
