//! Business alert rules end to end: a real `tidemark run` with
//! `--alert-rules` evaluates its rules over closed windows, stores the
//! `alerts` points in the windows they fired and resolved in, shows them on
//! the `alerts` channel and sends the firing and the resolved alerts to a
//! real Alertmanager, which notifies the webhook receiver; the built-in
//! patterns find their matches and none of the near misses; `tidemark replay
//! --verify` rebuilds the same alerts and detections.

use std::time::Duration;

use serde_json::{json, Value};
use tidemark_model::EventTime;
use tidemark_tests::observability::{AlertReceiver, AlertmanagerServer};
use tidemark_tests::{replay, replay_summary, settle_at, wait_until, wait_until_else, Tidemark};

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

/// A `tidemark run` with `rules`, sending to a real Alertmanager, and the
/// hour (three hours ago) its test's events are in.
struct AlertRun {
    receiver: AlertReceiver,
    am: AlertmanagerServer,
    data: tempfile::TempDir,
    rules: std::path::PathBuf,
    t: Tidemark,
    base: i64,
}

impl AlertRun {
    async fn start(rules_text: &str) -> AlertRun {
        let receiver = AlertReceiver::start().await;
        let am = AlertmanagerServer::start(&routes(&receiver.url)).await;
        let data = tempfile::tempdir().unwrap();
        let rules = data.path().join("rules.toml");
        std::fs::write(&rules, rules_text).unwrap();
        let rules_arg = rules.display().to_string();
        let t = Tidemark::start(
            data.path(),
            &["--alert-rules", &rules_arg, "--alertmanager-url", &am.url],
        )
        .await;
        let hour = 3_600_000;
        let base = (EventTime::now().0 / hour - 3) * hour;
        AlertRun {
            receiver,
            am,
            data,
            rules,
            t,
            base,
        }
    }
}

/// `tidemark replay --verify` of `from..to` into `into` finds no difference:
/// it rebuilds the alerts and detections from the log alone, equal to live's.
fn replay_verifies(
    data_dir: &std::path::Path,
    rules: &std::path::Path,
    from: i64,
    to: i64,
    into: &str,
) {
    let (from, to, rules) = (
        from.to_string(),
        to.to_string(),
        rules.display().to_string(),
    );
    let out = replay(
        data_dir,
        &[
            "--from",
            &from,
            "--to",
            &to,
            "--into",
            into,
            "--verify",
            "--alert-rules",
            &rules,
        ],
    );
    let summary = replay_summary(&out);
    assert!(
        out.status.success(),
        "{summary}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for difference in ["changed", "missing", "extra"] {
        assert_eq!(summary["verify"][difference], 0, "{summary}");
    }
}

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

#[tokio::test(flavor = "multi_thread")]
async fn a_threshold_fires_and_resolves_in_its_windows_in_the_store_in_alertmanager_and_in_replay()
{
    let AlertRun {
        receiver,
        am,
        data,
        rules,
        t,
        base,
    } = AlertRun::start(RULES).await;
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
    // State 1 pending, 2 firing, 0 resolved.
    let alerts = [
        (1, "state=1,threshold=5,value=2"),
        (2, "state=2,threshold=5,value=1"),
        (3, "state=2,threshold=5,value=0"),
        (5, "state=2,threshold=5,value=0"),
        (6, "state=0,threshold=5,value=10"),
    ];
    assert_eq!(
        stored(data.path(), "alerts", base).await,
        alerts.map(|(m, fields)| (m, "rule=likes_low".to_string(), fields.to_string()))
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
    replay_verifies(data.path(), &rules, base, at(8), "alerts_check");

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

/// One rule of each other kind, and a threshold over the detections, each
/// written to fire in one window and resolve in the next.
const EVERY_KIND: &str = r#"
[[rule]]
name = "views_spike"
kind = "change"
measurement = "traffic"
field = "events"
where = { event_type = "view", country = "FR" }
direction = "spike"
percent = 100
baseline = 2
min_volume = 5

[[rule]]
name = "launch_on_top"
kind = "trending"
window = "1m"
metric = "rank"
op = "<="
value = 1
tag = "launch"

[[rule]]
name = "ctr_low"
kind = "campaign"
metric = "ctr"
op = "<"
value = 0.1
min_impressions = 10
campaign_id = "c1"

[[rule]]
name = "click_fraud_seen"
kind = "threshold"
measurement = "detections"
field = "matches"
where = { pattern = "click_fraud" }
op = ">="
value = 1
"#;

/// An event of `event_type` by `user` at `time`, with `extra` fields.
fn event(id: String, event_type: &str, user: &str, time: i64, extra: Value) -> Value {
    let mut event = json!({
        "event_id": id, "event_type": event_type, "user_id": user, "timestamp": time,
        "country": "de", "device": "ios",
    });
    let fields = event.as_object_mut().expect("an object");
    fields.extend(extra.as_object().expect("an object").clone());
    event
}

/// `count` views in `country` from `start`: by one `user` half a second
/// apart, or (`None`) by as many users 100 ms apart.
fn views(start: i64, count: usize, country: &str, user: Option<&str>) -> Vec<Value> {
    let step = if user.is_some() { 500 } else { 100 };
    (0..count)
        .map(|i| {
            let viewer = user.map_or_else(|| format!("{country}-viewer{i}"), str::to_string);
            event(
                format!("view-{viewer}-{start}-{i}"),
                "view",
                &viewer,
                start + 1_000 + i as i64 * step,
                json!({"country": country, "post_id": "p1"}),
            )
        })
        .collect()
}

fn posts(start: i64, tag: &str, users: usize) -> Vec<Value> {
    (0..users)
        .map(|i| {
            event(
                format!("post-{tag}-{start}-{i}"),
                "post_created",
                &format!("poster{i}"),
                start + 3_000 + i as i64 * 100,
                json!({"post_id": format!("p-{tag}-{i}"), "hashtags": [tag]}),
            )
        })
        .collect()
}

/// `impressions` impressions on `campaign` by as many users, the first
/// `clicks` of them clicked 20 s later.
fn campaign(start: i64, campaign: &str, impressions: usize, clicks: usize) -> Vec<Value> {
    let mut events = Vec::new();
    for i in 0..impressions {
        let (user, shown) = (
            format!("{campaign}-u{i}"),
            format!("{campaign}-{start}-{i}"),
        );
        let ad = json!({"campaign_id": campaign, "ad_id": "ad1", "impression_id": shown});
        events.push(event(
            format!("imp-{shown}"),
            "ad_impression",
            &user,
            start + 1_000 + i as i64 * 100,
            ad.clone(),
        ));
        if i < clicks {
            events.push(event(
                format!("click-{shown}"),
                "ad_click",
                &user,
                start + 21_000 + i as i64 * 100,
                ad,
            ));
        }
    }
    events
}

/// `count` clicks by `user` on `campaign`, a second apart, on impressions
/// the user was never shown.
fn unseen_clicks(start: i64, user: &str, campaign: &str, count: usize) -> Vec<Value> {
    (0..count)
        .map(|i| {
            event(
                format!("fraud-{user}-{i}"),
                "ad_click",
                user,
                start + 1_000 + i as i64 * 1_000,
                json!({"campaign_id": campaign, "impression_id": format!("never-{user}-{i}")}),
            )
        })
        .collect()
}

fn login(time: i64, user: &str, country: &str) -> Value {
    event(
        format!("login-{user}-{time}"),
        "login",
        user,
        time,
        json!({"country": country}),
    )
}

/// The stored points of `measurement` in the hour from `base`, as (minute,
/// tags, fields), sorted.
async fn stored(
    data_dir: &std::path::Path,
    measurement: &str,
    base: i64,
) -> Vec<(i64, String, String)> {
    let store =
        tidemark_tsdb_writer::sqlite::SqliteStore::open(data_dir.join("store.sqlite")).unwrap();
    let points = tidemark_replay::verify::stored_points(
        &store,
        &[measurement],
        EventTime(base),
        EventTime(base + 60 * MINUTE),
    )
    .await
    .unwrap();
    let mut rows: Vec<(i64, String, String)> = points
        .iter()
        .map(|p| {
            let tags = p.tags.iter().map(|(k, v)| format!("{k}={v}"));
            let fields = p.fields.iter().map(|(k, v)| format!("{k}={}", v.as_f64()));
            (
                (p.time.0 - base) / MINUTE,
                tags.collect::<Vec<_>>().join(","),
                fields.collect::<Vec<_>>().join(","),
            )
        })
        .collect();
    rows.sort();
    rows
}

/// Every message of the `alerts` channel, in the order they came.
async fn alerts_channel(t: &Tidemark) -> std::sync::Arc<std::sync::Mutex<Vec<Value>>> {
    use futures::StreamExt as _;
    let mut ws = tidemark_tests::services::subscribe(&t.base, &t.token, "alerts").await;
    let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = messages.clone();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            let Ok(text) = msg.into_text() else { continue };
            if let Ok(value) = serde_json::from_str::<Value>(&text) {
                if value["channel"] == "alerts" {
                    sink.lock().unwrap().push(value);
                }
            }
        }
    });
    messages
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rule_kind_and_built_in_pattern_fires_and_resolves_in_its_windows_and_in_replay() {
    let AlertRun {
        receiver,
        data,
        rules,
        t,
        base,
        am,
    } = AlertRun::start(EVERY_KIND).await;
    let channel = alerts_channel(&t).await;
    let at = |m: i64| base + m * MINUTE;

    // Minute 0: c1 shown 20 times, never clicked (CTR 0 fires); `launch` by
    // 3 posters, alone (rank 1 fires). Minute 1: 10 of 20 clicked (CTR 0.5
    // resolves); `other` by 3 posters outranks `launch` by 1 (resolves).
    // French views 2, 2, then 10 (a spike on the mean of 2) and 2 (not one
    // on the mean of 6: resolves).
    let mut minutes: Vec<Vec<Value>> = vec![
        [campaign(at(0), "c1", 20, 0), posts(at(0), "launch", 3)].concat(),
        [campaign(at(1), "c1", 20, 10), posts(at(1), "other", 3)].concat(),
        vec![],
        vec![],
    ];
    minutes[1].extend(posts(at(1) + 20_000, "launch", 1));
    for (m, count) in [(0, 2), (1, 2), (2, 10), (3, 2)] {
        minutes[m].extend(views(at(m as i64), count, "fr", None));
    }
    // Minute 4: 5 unseen clicks on c2 within 10 s (click fraud); near
    // misses: 4 on c3, and 5 on c4 each on an impression shown.
    let mut fraud = unseen_clicks(at(4), "cf1", "c2", 5);
    fraud.extend(unseen_clicks(at(4), "cf2", "c3", 4));
    fraud.extend(campaign(at(4), "c4", 5, 5));
    // Minute 5: 101 views by one user within a minute (a bot, in the US);
    // near miss: 100 in Britain.
    let mut bots = views(at(5), 101, "us", Some("bot-us"));
    bots.extend(views(at(5), 100, "gb", Some("bot-gb")));
    // Logins of one user from Germany (4), France (5) and Italy (6) within
    // 10 minutes: an account takeover; near miss: Germany, France, Germany.
    let mut takeover = Vec::new();
    for (m, country, again) in [(4, "de", "de"), (5, "fr", "fr"), (6, "it", "de")] {
        takeover.push(login(at(m) + 30_000, "at1", country));
        takeover.push(login(at(m) + 31_000, "at2", again));
    }
    minutes.push(fraud);
    minutes.push(bots);
    minutes.push(vec![]);
    for event in takeover {
        let m = ((event["timestamp"].as_i64().unwrap() - base) / MINUTE) as usize;
        minutes[m].push(event);
    }
    // What Alertmanager notifies once each minute closes. It notifies a
    // resolution only of an alert it notified firing, so each minute is
    // closed only once the one before was notified. The patterns pipeline's
    // minutes are final a minute later than the others' (docs/alerts.md), so
    // the rule over `detections` fires on minute 4 when minute 5 closes.
    let notified_after: [&[(&str, &str)]; 6] = [
        &[("ctr_low", "firing"), ("launch_on_top", "firing")],
        &[("ctr_low", "resolved"), ("launch_on_top", "resolved")],
        &[("views_spike", "firing")],
        &[("views_spike", "resolved")],
        &[],
        &[("click_fraud_seen", "firing")],
    ];
    for (m, events) in minutes.iter().enumerate() {
        if !events.is_empty() {
            let (status, reply) = t.post(events).await;
            assert_eq!(status, 202, "{reply}");
        }
        let Some(closed) = m.checked_sub(1) else {
            continue;
        };
        // A view 10 s into the next minute closes the minute before this
        // one (its end plus the minute of lateness, and the 5 s
        // out-of-orderness), and leaves this one open to its events.
        t.post(&views(at(m as i64 + 1) + 9_000, 1, "xx", None))
            .await;
        let expected = notified_after[closed];
        wait_until_else(
            &format!("Alertmanager to notify {expected:?} once minute {closed} closed"),
            Duration::from_secs(60),
            || async {
                let notified = receiver.notifications();
                expected.iter().all(|(name, status)| {
                    (notified.iter()).any(|n| n["alertname"] == *name && n["status"] == *status)
                })
            },
            || async {
                format!(
                    "notified: {:#?}\nAlertmanager holds: {:#?}\nits log: {}\n\
                     stored alerts: {:#?}\ndetections: {:#?}",
                    receiver.notifications(),
                    am.alerts().await,
                    am.output(),
                    stored(data.path(), "alerts", base).await,
                    stored(data.path(), "detections", base).await,
                )
            },
        )
        .await;
    }
    // Closes every minute above, the one click_fraud_seen resolves on too.
    t.post(&views(at(20), 1, "xx", None)).await;
    wait_until_else(
        "Alertmanager to notify click_fraud_seen resolved",
        Duration::from_secs(60),
        || async {
            (receiver.notifications().iter())
                .any(|n| n["alertname"] == "click_fraud_seen" && n["status"] == "resolved")
        },
        || async { format!("notified: {:#?}", receiver.notifications()) },
    )
    .await;
    let names = [
        "views_spike",
        "launch_on_top",
        "ctr_low",
        "click_fraud_seen",
    ];
    settle_at(&t, at(20) - 5_000).await;

    assert_eq!(
        stored(data.path(), "detections", base).await,
        [
            (
                4,
                "campaign_id=c2,pattern=click_fraud".into(),
                "matches=1,users=1".into()
            ),
            (
                5,
                "country=US,pattern=bot_browsing".into(),
                "matches=1,users=1".into()
            ),
            (
                6,
                "country=IT,pattern=account_takeover".into(),
                "matches=1,users=1".into()
            ),
        ]
    );
    // Tags the series, fields state (2 firing, 0 resolved), value and
    // threshold.
    let alerts = [
        (
            0,
            "campaign_id=c1,rule=ctr_low",
            "state=2,threshold=0.1,value=0",
        ),
        (
            0,
            "rule=launch_on_top,tag=launch",
            "state=2,threshold=1,value=1",
        ),
        (
            1,
            "campaign_id=c1,rule=ctr_low",
            "state=0,threshold=0.1,value=0.5",
        ),
        (
            1,
            "rule=launch_on_top,tag=launch",
            "state=0,threshold=1,value=2",
        ),
        (2, "rule=views_spike", "state=2,threshold=4,value=10"),
        (3, "rule=views_spike", "state=0,threshold=12,value=2"),
        (4, "rule=click_fraud_seen", "state=2,threshold=1,value=1"),
        (5, "rule=click_fraud_seen", "state=0,threshold=1,value=0"),
    ];
    assert_eq!(
        stored(data.path(), "alerts", base).await,
        alerts.map(|(m, tags, fields)| (m, tags.to_string(), fields.to_string()))
    );

    // The channel showed each rule's alert firing, then removed it.
    let messages = channel.lock().unwrap().clone();
    for name in names {
        let mut seen = messages.iter().flat_map(|m| {
            let entries = m["data"]["alerts"].as_object().cloned().unwrap_or_default();
            entries
                .into_iter()
                .filter(|(key, _)| key == name || key.starts_with(&format!("{name}{{")))
                .map(|(_, entry)| entry["state"].as_str().unwrap_or("removed").to_string())
                .collect::<Vec<_>>()
        });
        assert_eq!(
            (seen.next(), seen.last()),
            (Some("firing".into()), Some("removed".into())),
            "{name} on the alerts channel: {messages:#?}"
        );
    }

    // Replay rebuilds the alerts and detections from the log alone.
    replay_verifies(data.path(), &rules, base, at(10), "every_kind_check");
}
