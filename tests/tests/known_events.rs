//! A known event set through the whole single-process path, read back through
//! the REST API (traffic, trending, campaigns, engagement and ad-hoc SQL),
//! from the embedded store and from a real InfluxDB server.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_tests::known::{point_time, AdCounts, EngagementCounts, TrendingRow};
use tidemark_tests::{InfluxServer, JsonApi, KnownEvents, Tidemark};

/// Polls `read` until it answers `expected` (the store may still be taking
/// the last windows), then asserts it does.
async fn eventually<T, F, Fut>(what: &str, expected: &T, mut read: F)
where
    T: PartialEq + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = read().await;
    while seen != *expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        seen = read().await;
    }
    assert_eq!(seen, *expected, "{what}");
}

/// A float as an integer count of `1/scale`: exact where the inputs are, and
/// immune to the last bit of a different order of operations.
fn fixed(v: Option<f64>, scale: f64) -> Option<i64> {
    v.map(|v| (v * scale).round() as i64)
}

/// A trending window's rows as (tag, rank, users, events, score in 1e-6).
type Ranking = Vec<(String, u64, u64, u64, Option<i64>)>;

fn ranking_of(rows: &[TrendingRow]) -> Ranking {
    rows.iter()
        .map(|r| {
            let score = fixed(Some(r.score), 1e6);
            (r.tag.clone(), r.rank, r.users, r.events, score)
        })
        .collect()
}

fn ranking_from(tags: &Value) -> Ranking {
    tags.as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let n = |k: &str| t[k].as_u64().unwrap_or(0);
            let tag = t["tag"].as_str().unwrap_or_default().to_string();
            (
                tag,
                n("rank"),
                n("users"),
                n("events"),
                fixed(t["score"].as_f64(), 1e6),
            )
        })
        .collect()
}

/// Every trending window of 1, 5 and 15 minutes ending within the three
/// minutes ranks exactly the expected tags, and one tag's history matches.
async fn assert_trending(t: &Tidemark, known: &KnownEvents) {
    for (label, minutes) in [("1m", 1), ("5m", 5), ("15m", 15)] {
        for end in (1..=3).map(|i| known.base + i * 60_000) {
            let expected = ranking_of(&known.trending(minutes, end));
            assert!(!expected.is_empty());
            let start = end - minutes * 60_000;
            eventually(
                &format!("trending {label} from {start}"),
                &expected,
                || async {
                    let reply = t
                        .get_json(&format!("/api/v1/trending?window={label}&at={start}"))
                        .await;
                    assert_eq!(reply["final"], json!(true), "{reply}");
                    ranking_from(&reply["tags"])
                },
            )
            .await;
        }
    }
    let expected: Vec<(i64, Ranking)> = (0..3)
        .map(|i| {
            let start = known.base + i * 60_000;
            let rows = known.trending(1, start + 60_000);
            let row = rows.iter().find(|r| r.tag == "kafka").cloned();
            (start, ranking_of(&Vec::from_iter(row)))
        })
        .collect();
    let (from, to) = (known.base, known.base + 3 * 60_000);
    eventually("kafka's 1m history", &expected, || async {
        let reply = t
            .get_json(&format!(
                "/api/v1/trending/kafka?window=1m&from={from}&to={to}"
            ))
            .await;
        reply["points"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let mut row = p.clone();
                row["tag"] = json!("kafka");
                (point_time(p), ranking_from(&json!([row])))
            })
            .collect()
    })
    .await;
}

/// Funnel counts and money as exact integers, ratios in 1e-9.
type Funnel = (u64, u64, u64, Option<i64>, Option<i64>, [Option<i64>; 4]);

fn funnel_of(c: &AdCounts) -> Funnel {
    let ratio = |n: f64, d: f64| (d != 0.0).then(|| n / d);
    let (spend, revenue) = (c.spend_micros as f64 / 1e6, c.revenue_micros as f64 / 1e6);
    let (imps, clicks, convs) = (c.impressions as f64, c.clicks as f64, c.conversions as f64);
    (
        c.impressions,
        c.clicks,
        c.conversions,
        Some(c.spend_micros),
        Some(c.revenue_micros),
        [
            fixed(ratio(clicks, imps), 1e9),
            fixed(ratio(convs, clicks), 1e9),
            fixed(ratio(spend, convs), 1e9),
            fixed(ratio(revenue, spend), 1e9),
        ],
    )
}

fn funnel_from(v: &Value) -> Funnel {
    let n = |k: &str| v[k].as_u64().unwrap_or(u64::MAX);
    let ratio = |k: &str| fixed(v[k].as_f64(), 1e9);
    (
        n("impressions"),
        n("clicks"),
        n("conversions"),
        fixed(v["spend"].as_f64(), 1e6),
        fixed(v["revenue"].as_f64(), 1e6),
        [ratio("ctr"), ratio("cvr"), ratio("cpa"), ratio("roas")],
    )
}

/// Both campaigns' funnels (impressions, attributed clicks, conversions,
/// spend, revenue and the ratios of the sums), in total and per minute and
/// device.
async fn assert_campaigns(t: &Tidemark, known: &KnownEvents) {
    let (from, to) = (known.base, known.base + 3 * 60_000);
    let totals = known.campaign_totals();
    assert_eq!(totals.keys().collect::<Vec<_>>(), ["c1", "c2"]);
    let expected: BTreeMap<String, Funnel> = totals
        .iter()
        .map(|(id, c)| (id.clone(), funnel_of(c)))
        .collect();
    eventually("campaign totals", &expected, || async {
        let all = t
            .get_json(&format!("/api/v1/campaigns?from={from}&to={to}"))
            .await;
        all["campaigns"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                (
                    c["campaign_id"].as_str().unwrap_or_default().to_string(),
                    funnel_from(c),
                )
            })
            .collect()
    })
    .await;

    for campaign in totals.keys() {
        let expected: BTreeMap<(i64, String), Funnel> = known
            .ads
            .iter()
            .filter(|((_, c, _), _)| c == campaign)
            .map(|((minute, _, device), counts)| ((*minute, device.clone()), funnel_of(counts)))
            .collect();
        eventually(
            &format!("{campaign} per minute and device"),
            &expected,
            || async {
                let reply = t
                    .get_json(&format!(
                        "/api/v1/campaigns/{campaign}?from={from}&to={to}&step=1m&group_by=device"
                    ))
                    .await;
                let mut seen = BTreeMap::new();
                for s in reply["series"].as_array().into_iter().flatten() {
                    let device = s["tags"]["device"].as_str().unwrap_or_default().to_string();
                    for p in s["points"].as_array().into_iter().flatten() {
                        seen.insert((point_time(p), device.clone()), funnel_from(p));
                    }
                }
                seen
            },
        )
        .await;
    }
}

/// Sessions started, active sessions and the engagement score per minute,
/// grouped by segment (from the profiles) and by country (the first
/// action's, else the profile's); no session has ended yet.
async fn assert_engagement(t: &Tidemark, known: &KnownEvents) {
    let (from, to) = (known.base, known.base + 3 * 60_000);
    for group in ["segment", "country"] {
        let expected: BTreeMap<(String, i64), EngagementCounts> = known
            .engagement
            .iter()
            .filter(|((g, _, _), _)| g == group)
            .map(|((_, value, minute), counts)| ((value.clone(), *minute), *counts))
            .collect();
        assert!(expected.len() >= 6, "{expected:?}");
        eventually(&format!("engagement by {group}"), &expected, || async {
            let reply = t
                .get_json(&format!(
                    "/api/v1/engagement?from={from}&to={to}&step=1m&group_by={group}"
                ))
                .await;
            let mut seen = BTreeMap::new();
            for s in reply["series"].as_array().into_iter().flatten() {
                let value = s["tags"][group].as_str().unwrap_or_default().to_string();
                for p in s["points"].as_array().into_iter().flatten() {
                    let n = |k: &str| p[k].as_u64().unwrap_or(u64::MAX);
                    let counts = EngagementCounts {
                        sessions_started: n("sessions_started"),
                        sessions_ended: n("sessions_ended"),
                        active_sessions: n("active_sessions"),
                        engagement_score: p["engagement_score"].as_i64().unwrap_or(i64::MIN),
                    };
                    seen.insert((value.clone(), point_time(p)), counts);
                }
            }
            seen
        })
        .await;
    }
}

/// Ad-hoc SQL answers the same exact numbers whichever store serves: every
/// traffic point of the three minutes, and each campaign's impressions and
/// clicks.
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

    let rfc3339 = |ms: i64| tidemark_model::EventTime(ms).to_rfc3339();
    let sql = format!(
        "SELECT campaign_id, sum(impressions), sum(clicks) FROM ads \
         WHERE time >= '{}' AND time < '{}' GROUP BY campaign_id ORDER BY campaign_id",
        rfc3339(from),
        rfc3339(to)
    );
    let (status, answer) = t.post_json("/api/v1/query", &json!({ "sql": sql })).await;
    assert_eq!(status, 200, "{answer}");
    let expected: Vec<Value> = known
        .campaign_totals()
        .iter()
        .map(|(id, c)| json!([id, c.impressions, c.clicks]))
        .collect();
    assert_eq!(answer["rows"], json!(expected), "{answer}");
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
    assert_trending(&t, &known).await;
    assert_campaigns(&t, &known).await;
    assert_engagement(&t, &known).await;
    assert_queries(&t, &known).await;
    let health = t.get_json("/api/v1/health").await;
    assert_eq!(health["store"], "sqlite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_counts_from_influxdb() {
    let influx = InfluxServer::start().expect("influxd starts");
    let dir = tempfile::tempdir().unwrap();
    let t = Tidemark::start_on_influx(dir.path(), &influx).await;
    let known = KnownEvents::new(30);
    post_all(&t, &known).await;
    known.assert_results(&t).await;
    assert_trending(&t, &known).await;
    assert_campaigns(&t, &known).await;
    assert_engagement(&t, &known).await;
    assert_queries(&t, &known).await;
    let health = t.get_json("/api/v1/health").await;
    assert_eq!(health["store"], "influxdb");
}
