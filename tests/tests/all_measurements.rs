//! The whole single-process path under generated traffic fills all four
//! measurements, and they agree with each other: every ad impression and
//! click counted by `traffic` is counted by `ads` in the same minute, and
//! attributed clicks never exceed the clicks seen.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tidemark_tests::{Generator, InfluxServer, Tidemark};

/// Sum of one field per minute, over every series of a measurement whose
/// `tag` (if given) has `value`.
async fn per_minute(
    t: &Tidemark,
    name: &str,
    field: &str,
    group_by: &str,
    filter: Option<(&str, &str)>,
    from: i64,
) -> BTreeMap<i64, f64> {
    let now = tidemark_model::EventTime::now().millis();
    let reply = t
        .get_json(&format!(
            "/api/v1/metrics?name={name}&field={field}&step=1m&from={from}&to={now}&group_by={group_by}"
        ))
        .await;
    let mut out = BTreeMap::new();
    for series in reply["series"].as_array().into_iter().flatten() {
        if let Some((k, v)) = filter {
            if series["tags"][k].as_str() != Some(v) {
                continue;
            }
        }
        for p in series["points"].as_array().into_iter().flatten() {
            let minute = p["t"]
                .as_str()
                .and_then(tidemark_model::EventTime::parse)
                .map_or(0, |t| t.millis());
            *out.entry(minute).or_insert(0.0) += p["v"].as_f64().unwrap_or(0.0);
        }
    }
    out
}

#[derive(Debug, Default)]
struct Seen {
    minutes_checked: usize,
    engagement: usize,
    trending: usize,
    problems: Vec<String>,
}

async fn check(t: &Tidemark, from: i64) -> Seen {
    let traffic_imps = per_minute(
        t,
        "traffic",
        "events",
        "event_type",
        Some(("event_type", "ad_impression")),
        from,
    )
    .await;
    let traffic_clicks = per_minute(
        t,
        "traffic",
        "events",
        "event_type",
        Some(("event_type", "ad_click")),
        from,
    )
    .await;
    let ads_imps = per_minute(
        t,
        "ads",
        "impressions",
        "campaign_id,country,device",
        None,
        from,
    )
    .await;
    let ads_clicks = per_minute(t, "ads", "clicks", "campaign_id,country,device", None, from).await;
    let ads_unattributed = per_minute(
        t,
        "ads",
        "clicks_unattributed",
        "campaign_id,country,device",
        None,
        from,
    )
    .await;
    let engagement = per_minute(
        t,
        "engagement",
        "active_sessions",
        "country,segment",
        None,
        from,
    )
    .await;
    let trending = per_minute(t, "trending", "users", "window,tag", None, from).await;
    let mut seen = Seen {
        engagement: engagement.values().filter(|v| **v > 0.0).count(),
        trending: trending.values().filter(|v| **v > 0.0).count(),
        ..Seen::default()
    };
    for (minute, imps) in &traffic_imps {
        let clicks = traffic_clicks.get(minute).copied().unwrap_or(0.0);
        let a_imps = ads_imps.get(minute).copied().unwrap_or(0.0);
        let a_clicks = ads_clicks.get(minute).copied().unwrap_or(0.0);
        let a_unattr = ads_unattributed.get(minute).copied().unwrap_or(0.0);
        if *imps != a_imps {
            seen.problems.push(format!(
                "{minute}: traffic ad_impression {imps} vs ads impressions {a_imps}"
            ));
        }
        if clicks != a_clicks + a_unattr {
            seen.problems.push(format!("{minute}: traffic ad_click {clicks} vs ads clicks {a_clicks} + unattributed {a_unattr}"));
        }
        if a_clicks > clicks {
            seen.problems.push(format!(
                "{minute}: attributed clicks {a_clicks} > ad_click {clicks}"
            ));
        }
        seen.minutes_checked += 1;
    }
    seen
}

async fn all_four_measurements_agree(extra_args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let t = Tidemark::start(dir.path(), extra_args).await;
    let from = tidemark_model::EventTime::now().millis() - 60_000;
    let _generator = Generator::start(&t, 2_000);
    // Minutes close a minute plus the out-of-orderness after they start.
    let deadline = Instant::now() + Duration::from_secs(200);
    let mut seen = Seen::default();
    while Instant::now() < deadline {
        seen = check(&t, from).await;
        if seen.minutes_checked >= 2
            && seen.engagement > 0
            && seen.trending > 0
            && seen.problems.is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(seen.minutes_checked >= 2, "two closed minutes: {seen:?}");
    assert!(seen.engagement > 0, "engagement points: {seen:?}");
    assert!(seen.trending > 0, "trending points: {seen:?}");
    assert!(seen.problems.is_empty(), "measurements agree: {seen:?}");
    let health: Value = t.get_json("/api/v1/health").await;
    assert_eq!(health["status"], "ok", "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_embedded_store() {
    all_four_measurements_agree(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_influxdb() {
    let influx = InfluxServer::start().expect("influxd starts");
    all_four_measurements_agree(&["--influx-url", &influx.url, "--influx-db", "tidemark"]).await;
}
