//! Business alert rules end to end: a real `tidemark run` with
//! `--alert-rules` evaluates a threshold over closed windows, stores the
//! `alerts` points in the windows it fired and resolved in, and sends the
//! firing and the resolved alert to a real Alertmanager, which notifies the
//! webhook receiver; `tidemark replay --verify` rebuilds the same alerts.

use std::time::Duration;

use serde_json::{json, Value};
use tidemark_model::{EventTime, FieldValue};
use tidemark_tests::observability::{AlertReceiver, AlertmanagerServer};
use tidemark_tests::{replay, replay_summary, settle_at, wait_until, Tidemark};

const MINUTE: i64 = 60_000;

const RULES: &str = r#"
[[rule]]
name = "likes_low"
kind = "threshold"
measurement = "traffic"
field = "events"
where = { event_type = "like" }
op = "<"
value = 5
for = 2
summary = "Fewer than 5 likes a minute"
labels = { severity = "critical" }
"#;

fn routes(receiver: &str) -> String {
    format!(
        "route:\n  receiver: business\n  group_by: [alertname]\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n  - name: business\n    webhook_configs:\n      - url: {receiver}/business\n        send_resolved: true\n"
    )
}

/// `likes` likes and one view in the minute starting at `start`.
fn minute(start: i64, likes: usize, tag: &str) -> Vec<Value> {
    let view = json!({
        "event_id": format!("{tag}-view-{start}"), "event_type": "view",
        "user_id": "u0", "timestamp": start + 1_000, "country": "de", "device": "ios",
        "post_id": "p1",
    });
    let likes = (0..likes).map(|i| {
        json!({
            "event_id": format!("{tag}-like-{start}-{i}"), "event_type": "like",
            "user_id": format!("u{i}"), "timestamp": start + 2_000 + i as i64 * 100,
            "country": "de", "device": "ios", "post_id": "p1",
        })
    });
    std::iter::once(view).chain(likes).collect()
}

/// (minute from `base`, state, value) of the stored `alerts` points.
async fn stored_alerts(data_dir: &std::path::Path, base: i64) -> Vec<(i64, i64, f64)> {
    let store =
        tidemark_tsdb_writer::sqlite::SqliteStore::open(data_dir.join("store.sqlite")).unwrap();
    let points = tidemark_replay::verify::stored_points(
        &store,
        &["alerts"],
        EventTime(base),
        EventTime(base + 60 * MINUTE),
    )
    .await
    .unwrap();
    points
        .iter()
        .map(|p| {
            assert_eq!(p.tag("rule"), Some("likes_low"));
            assert_eq!(p.field("threshold"), Some(FieldValue::Float(5.0)));
            let state = match p.field("state") {
                Some(FieldValue::Int(s)) => s,
                other => panic!("state is {other:?}"),
            };
            let value = p.field("value").map_or(f64::NAN, FieldValue::as_f64);
            ((p.time.0 - base) / MINUTE, state, value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_threshold_fires_and_resolves_in_its_windows_in_the_store_in_alertmanager_and_in_replay()
{
    let receiver = AlertReceiver::start().await;
    let am = AlertmanagerServer::start(&routes(&receiver.url)).await;
    let data = tempfile::tempdir().unwrap();
    let rules = data.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let rules_arg = rules.display().to_string();
    let t = Tidemark::start(
        data.path(),
        &["--alert-rules", &rules_arg, "--alertmanager-url", &am.url],
    )
    .await;
    let hour = 3_600_000;
    let base = (EventTime::now().0 / hour - 3) * hour;
    let at = |m: i64| base + m * MINUTE;

    // Likes per minute 10, 2, 1, 0: pending at 1, firing at 2 (`for = 2`)
    // and 3. A view at minute 5 closes minutes 0 to 3 (their end plus the
    // minute of lateness).
    for (m, likes) in [(0, 10), (1, 2), (2, 1), (3, 0)] {
        let (status, reply) = t.post(&minute(at(m), likes, "a")).await;
        assert_eq!(status, 202, "{reply}");
    }
    t.post(&minute(at(5) + 10_000, 0, "push")).await;
    wait_until(
        "Alertmanager to notify the firing alert",
        Duration::from_secs(90),
        || async {
            receiver.notifications().iter().any(|n| {
                n["alertname"] == "likes_low"
                    && n["status"] == "firing"
                    && n["receiver"] == "/business"
            })
        },
    )
    .await;
    let held = am.alerts().await;
    let alert = held
        .iter()
        .find(|a| a["labels"]["alertname"] == "likes_low")
        .unwrap_or_else(|| panic!("Alertmanager holds no likes_low: {held:?}"));
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(alert["labels"]["source"], "tidemark");
    assert_eq!(
        alert["annotations"]["summary"],
        "Fewer than 5 likes a minute"
    );
    assert_eq!(
        alert["startsAt"].as_str().map(|s| &s[..16]),
        Some(&EventTime(at(2)).to_rfc3339()[..16])
    );
    assert_eq!(
        metric(&t, "likes_low").await,
        1.0,
        "tidemark_alerts_firing while it fires"
    );

    // Minute 5 (the push view, 0 likes) still fires; 10 likes at minute 6
    // resolve it; minute 4 had no events, so it is no window.
    t.post(&minute(at(6), 10, "b")).await;
    t.post(&minute(at(9), 0, "push")).await;
    wait_until(
        "Alertmanager to notify the resolution",
        Duration::from_secs(90),
        || async {
            receiver
                .notifications()
                .iter()
                .any(|n| n["alertname"] == "likes_low" && n["status"] == "resolved")
        },
    )
    .await;
    settle_at(&t, at(9) - 5_000).await;
    assert_eq!(metric(&t, "likes_low").await, 0.0);
    let (pending, firing, resolved) = (1, 2, 0);
    assert_eq!(
        stored_alerts(data.path(), base).await,
        [
            (1, pending, 2.0),
            (2, firing, 1.0),
            (3, firing, 0.0),
            (5, firing, 0.0),
            (6, resolved, 10.0),
        ]
    );

    let history = t
        .get_json(&format!("/api/v1/alerts?from={base}&to={}", at(10)))
        .await;
    let states: Vec<&str> = (history["alerts"].as_array().unwrap().iter())
        .map(|a| a["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["resolved", "firing", "firing", "firing", "pending"],
        "{history}"
    );
    assert_eq!(history["alerts"][0]["time"], EventTime(at(6)).to_rfc3339());

    // Replay rebuilds the alerts from the log alone, equal to live's.
    let (from, to) = (base.to_string(), at(8).to_string());
    let out = replay(
        data.path(),
        &[
            "--from",
            &from,
            "--to",
            &to,
            "--into",
            "alerts_check",
            "--verify",
            "--alert-rules",
            &rules_arg,
        ],
    );
    let summary = replay_summary(&out);
    assert!(
        out.status.success(),
        "{summary}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(summary["verify"]["changed"], 0, "{summary}");
    assert_eq!(summary["verify"]["missing"], 0, "{summary}");
    assert_eq!(summary["verify"]["extra"], 0, "{summary}");

    // A rule added over the API is written to the file and evaluated at once.
    let added = reqwest::Client::new()
        .put(format!("{}/api/v1/alerts/rules/views_low", t.base))
        .bearer_auth(&t.token)
        .json(
            &json!({"kind": "threshold", "measurement": "traffic", "field": "events",
            "where": {"event_type": "view"}, "op": "<", "value": 1}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201);
    wait_until(
        "the processor to take the new rule",
        Duration::from_secs(10),
        || async {
            t.metrics_text()
                .await
                .contains("tidemark_alerts_firing{rule=\"views_low\"} 0")
        },
    )
    .await;
    let file = std::fs::read_to_string(&rules).unwrap();
    assert!(file.contains("name = \"views_low\""), "{file}");
}

async fn metric(t: &Tidemark, rule: &str) -> f64 {
    let text = t.metrics_text().await;
    tidemark_tests::metric_value(&text, "tidemark_alerts_firing", &format!("rule=\"{rule}\""))
}
