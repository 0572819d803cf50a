//! Kappa replay end to end: live runs over a generated workload (out of
//! order, late, too late, duplicates, profiles, sessions, ad joins), then
//! `tidemark replay` rebuilds a whole hour from the log into a new database
//! and `--verify` compares it with what live stored: no difference, for all
//! four pipelines, on the embedded store and on InfluxDB. A changed
//! pipeline differs in exactly the fields it changes; bad arguments exit
//! non-zero and write nothing.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use tidemark_model::EventTime;
use tidemark_tests::services::OverviewClient;
use tidemark_tests::workload::Workload;
use tidemark_tests::{
    hour_points, post_and_settle, replay, replay_summary, settle, settle_at, tidemark_bin,
    InfluxServer, Tidemark,
};

const HOUR: i64 = 3_600_000;

/// The whole hour three hours ago: old enough for a closing batch 105
/// minutes later, young enough for ingest (7 days).
fn hour() -> i64 {
    (tidemark_model::EventTime::now().millis() / HOUR - 3) * HOUR
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs live over the workload and stops it cleanly (its last checkpoint
/// flushes the store).
async fn live(data_dir: &Path, extra: &[&str]) -> Workload {
    let workload = Workload::new(hour(), 7);
    let mut t = Tidemark::start(data_dir, extra).await;
    post_and_settle(&t, &workload).await;
    assert!(t.terminate().success());
    workload
}

/// Runs live over the workload without its closing batch, so that every
/// user active in its last 30 minutes still has an open session, and stops
/// it once its watermark reached the newest event (all partitions idle).
async fn live_ending_with_open_sessions(data_dir: &Path, extra: &[&str]) -> Workload {
    let mut workload = Workload::new(hour(), 11);
    workload.batches.pop();
    let mut t = Tidemark::start(data_dir, extra).await;
    for batch in &workload.batches {
        let (status, reply) = t.post(batch).await;
        assert_eq!(status, 202, "{reply}");
    }
    // The newest event is 100 ms before the workload's end, at 70 minutes;
    // live's watermark stops 5 s (the out-of-orderness) below it.
    settle_at(&t, newest_event(&workload) - 5_000).await;
    assert!(t.terminate().success());
    workload
}

fn newest_event(w: &Workload) -> i64 {
    w.batches
        .iter()
        .flatten()
        .filter_map(|e| e["timestamp"].as_i64())
        .max()
        .expect("events")
}

/// Replays of ranges ending at the workload's hour and at its newest event
/// equal live, whose sessions are open where the ranges end.
fn assert_replays_of_ranges_ending_near_the_newest_event_equal_live(
    data_dir: &Path,
    w: &Workload,
    store: &[&str],
) {
    let ends = [w.hour + HOUR, newest_event(w)];
    for (i, to) in ends.iter().enumerate() {
        let (from, to) = (w.hour.to_string(), to.to_string());
        let into = format!("open_sessions_{i}");
        let mut args = vec![
            "--from",
            from.as_str(),
            "--to",
            to.as_str(),
            "--into",
            into.as_str(),
            "--verify",
        ];
        args.extend(store);
        let out = replay(data_dir, &args);
        let s = replay_summary(&out);
        assert!(
            out.status.success(),
            "ending at {to}: {s}\n{}",
            stdout(&out)
        );
        assert_eq!(s["verify"]["changed"], 0, "{s}");
        assert_eq!(s["verify"]["missing"], 0, "{s}");
        assert_eq!(s["verify"]["extra"], 0, "{s}");
        assert!(
            s["measurements"]["engagement"].as_u64().unwrap_or(0) > 0,
            "{s}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_a_range_ending_at_the_newest_event_equals_live_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let w = live_ending_with_open_sessions(dir.path(), &[]).await;
    assert_replays_of_ranges_ending_near_the_newest_event_equal_live(dir.path(), &w, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_a_range_ending_at_the_newest_event_equals_live_on_influxdb() {
    let influx = InfluxServer::start().expect("influxd starts");
    let dir = tempfile::tempdir().unwrap();
    let store = influx_store(&influx);
    let w = live_ending_with_open_sessions(dir.path(), &store).await;
    assert_replays_of_ranges_ending_near_the_newest_event_equal_live(dir.path(), &w, &store);
}

/// The flags of a store in `influx`'s database `tidemark`.
fn influx_store(influx: &InfluxServer) -> [&str; 4] {
    ["--influx-url", &influx.url, "--influx-db", "tidemark"]
}

fn range(w: &Workload) -> (String, String) {
    (w.hour.to_string(), (w.hour + HOUR).to_string())
}

/// Every pipeline's measurements among the rebuilt points, and no difference.
fn assert_equivalent(out: &Output) {
    let s = replay_summary(out);
    assert!(out.status.success(), "{s}\n{}", stdout(out));
    assert_eq!(s["verify"]["missing"], 0, "{s}");
    assert_eq!(s["verify"]["extra"], 0, "{s}");
    assert_eq!(s["verify"]["changed"], 0, "{s}");
    assert!(
        s["verify"]["reference_points"].as_u64().unwrap_or(0) > 1_000,
        "live stored the range: {s}"
    );
    for m in ["traffic", "active_users", "engagement", "trending", "ads"] {
        assert!(
            s["measurements"][m].as_u64().unwrap_or(0) > 0,
            "{m} rebuilt: {s}"
        );
    }
    assert!(s["windows"].as_u64().unwrap_or(0) >= 60, "{s}");
    assert!(s["too_late"].as_u64().unwrap_or(0) > 0, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_equals_live_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let w = live(dir.path(), &[]).await;
    let (from, to) = range(&w);

    let out = replay(dir.path(), &["--from", &from, "--to", &to, "--verify"]);
    assert_equivalent(&out);
    let db = replay_summary(&out)["database"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(db.starts_with("tidemark_replay_"), "{db}");
    assert!(dir.path().join(format!("{db}.sqlite")).exists());

    // One thread gives the same points.
    let out = replay(
        dir.path(),
        &[
            "--from",
            &from,
            "--to",
            &to,
            "--into",
            "one_thread",
            "--threads",
            "1",
            "--verify",
        ],
    );
    assert_equivalent(&out);

    // Over the live database: the same points again.
    let out = replay(
        dir.path(),
        &["--from", &from, "--to", &to, "--in-place", "--verify"],
    );
    assert_equivalent(&out);
    assert_eq!(replay_summary(&out)["database"], "tidemark");

    // Other engagement weights change engagement_score and nothing else.
    let out = replay(
        dir.path(),
        &[
            "--from",
            &from,
            "--to",
            &to,
            "--into",
            "heavier_likes",
            "--engagement-weights",
            "like=5,share=1",
            "--verify",
        ],
    );
    assert!(!out.status.success(), "differences exit non-zero");
    let s = replay_summary(&out);
    assert_eq!(s["verify"]["missing"], 0, "{s}");
    assert_eq!(s["verify"]["extra"], 0, "{s}");
    let changed = s["verify"]["changed"].as_u64().unwrap();
    assert!(changed > 0, "{s}");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('{')).collect();
    assert_eq!(lines.len() as u64, changed, "one line per difference");
    for line in lines {
        assert!(line.starts_with("changed "), "{line}");
        assert!(
            line.contains(" engagement,"),
            "only engagement changes: {line}"
        );
        let (_, fields) = line.split_once("Z ").unwrap();
        assert!(
            fields.starts_with("engagement_score: ") && !fields.contains(','),
            "only engagement_score changes: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_equals_live_on_influxdb() {
    let influx = InfluxServer::start().expect("influxd starts");
    let dir = tempfile::tempdir().unwrap();
    let store = influx_store(&influx);
    let w = live(dir.path(), &store).await;
    let (from, to) = range(&w);
    let mut args = vec!["--from", from.as_str(), "--to", to.as_str(), "--verify"];
    args.extend(store);
    let out = replay(dir.path(), &args);
    assert_equivalent(&out);
    // The new database answers on its own.
    let db = replay_summary(&out)["database"]
        .as_str()
        .unwrap()
        .to_string();
    let reply: Value = reqwest::get(format!(
        "{}/query?db={db}&q=SELECT+count(*)+FROM+rt.traffic",
        influx.url
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert!(reply["results"][0]["series"].is_array(), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_exit_non_zero_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let w = live(dir.path(), &[]).await;
    let (from, to) = range(&w);
    let files = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = files();
    let cases: [(&[&str], &str); 6] = [
        (&["--from", &to, "--to", &from], "must be after"),
        (
            &[
                "--from",
                &from,
                "--to",
                &to,
                "--pipelines",
                "traffic,weather",
            ],
            "unknown pipeline",
        ),
        (
            &[
                "--from",
                "2001-01-01T00:00:00Z",
                "--to",
                "2001-01-02T00:00:00Z",
            ],
            "no event between",
        ),
        (
            &["--from", &from, "--to", &to, "--into", "tidemark"],
            "--in-place",
        ),
        (
            &["--from", &from, "--to", &to, "--into", "../x"],
            "invalid database name",
        ),
        (
            &[
                "--from",
                &from,
                "--to",
                &to,
                "--engagement-weights",
                "hug=3",
            ],
            "unknown action",
        ),
    ];
    for (args, message) in cases {
        let out = replay(dir.path(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert_eq!(files(), before, "{args:?} wrote nothing");
    }
    let missing = tempfile::tempdir().unwrap();
    let out = replay(missing.path(), &["--from", &from, "--to", &to]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open the embedded log"));
}

/// The hour's total engagement score as the REST API answers it.
async fn engagement_score(client: &reqwest::Client, base: &str, hour: i64) -> Result<f64, String> {
    let url = format!(
        "{base}/api/v1/metrics?name=engagement&field=engagement_score&step=1h&from={hour}&to={}",
        hour + HOUR
    );
    let reply = client.get(url).send().await.map_err(|e| e.to_string())?;
    if !reply.status().is_success() {
        return Err(format!("status {}", reply.status()));
    }
    let body: Value = reply.json().await.map_err(|e| e.to_string())?;
    Ok(body["series"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["points"].as_array().cloned().unwrap_or_default())
        .map(|p| p["v"].as_f64().unwrap_or(0.0))
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_and_rollback_switch_the_rest_api_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let workload = Workload::new(hour(), 11);
    let t = Tidemark::start(dir.path(), &[]).await;
    post_and_settle(&t, &workload).await;
    let (from, to) = range(&workload);
    // Beside the running live process: a new version with other weights.
    let out = replay(
        dir.path(),
        &[
            "--from",
            &from,
            "--to",
            &to,
            "--into",
            "v2",
            "--engagement-weights",
            "like=5",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // And one without the traffic pipeline.
    let out = replay(
        dir.path(),
        &[
            "--from",
            &from,
            "--to",
            &to,
            "--into",
            "v3",
            "--pipelines",
            "engagement",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", t.token).parse().unwrap(),
    );
    let client = reqwest::Client::builder()
        .default_headers(auth)
        .build()
        .unwrap();
    let hour = workload.hour;
    let before = engagement_score(&client, &t.base, hour).await.unwrap();
    assert!(before > 0.0);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (client, stop, base) = (client.clone(), stop.clone(), t.base.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                answers.push(engagement_score(&client, &base, hour).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            answers
        })
    };
    let promote = |args: &[&str]| tidemark_tests::promote(dir.path(), args);
    let wait_for = |want: &'static str| {
        let (client, t) = (client.clone(), &t);
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let health = t.get_json("/api/v1/health").await;
                if health["database"] == want {
                    return engagement_score(&client, &t.base, hour).await.unwrap();
                }
                assert!(Instant::now() < deadline, "still serving {health}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // WebSocket clients follow the served database too.
    let mut overview = OverviewClient::connect(&t.base, &t.token).await;
    assert!(
        overview
            .until(Duration::from_secs(10), |w| !w.is_empty())
            .await,
        "a snapshot of the live overview"
    );
    let live_overview = overview.windows.clone();
    promote(&["v2"]);
    let promoted = wait_for("v2").await;
    assert!(
        promoted > before,
        "heavier likes score higher: {promoted} vs {before}"
    );
    promote(&["--rollback"]);
    let rolled_back = wait_for("tidemark").await;
    assert_eq!(rolled_back, before);
    // v3 has no traffic at all: its overview is empty.
    promote(&["v3"]);
    assert!(
        overview
            .until(Duration::from_secs(10), |w| w.is_empty())
            .await,
        "a snapshot of v3's empty overview: {:?}",
        overview.windows
    );
    promote(&["--rollback"]);
    let expected = live_overview.clone();
    assert!(
        overview
            .until(Duration::from_secs(10), move |w| expected
                .iter()
                .all(|(start, window)| w.get(start) == Some(window)))
            .await,
        "the live overview again: {:?}\nexpected {live_overview:?}",
        overview.windows
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = poller.await.unwrap();
    assert!(answers.len() > 20, "{} requests", answers.len());
    let mut seen = (false, false);
    for a in &answers {
        let v = a.as_ref().expect("no failed request during the switch");
        assert!(*v == before || *v == promoted, "only whole answers: {v}");
        seen.0 |= *v == before;
        seen.1 |= *v == promoted;
    }
    assert!(seen.0 && seen.1, "both databases answered");
    // Promoting a database that does not exist is refused.
    let out = Command::new(tidemark_bin())
        .args(["promote", "nope", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    // Every switch is in the history, newest first; the refused one is not.
    let history = t.get_json("/api/v1/serving/history").await;
    let switches: Vec<(String, String, String)> = history["history"]
        .as_array()
        .expect("a history")
        .iter()
        .map(|c| {
            assert!(
                c["by"].as_str().is_some_and(|by| by.starts_with("cli:")),
                "{c}"
            );
            assert!(
                EventTime::parse(c["time"].as_str().unwrap()).is_some(),
                "{c}"
            );
            let text = |k: &str| c[k].as_str().unwrap().to_string();
            (text("action"), text("database"), text("previous"))
        })
        .collect();
    let switch = |a: &str, d: &str, p: &str| (a.to_string(), d.to_string(), p.to_string());
    assert_eq!(
        switches,
        [
            switch("rollback", "tidemark", "v3"),
            switch("promote", "v3", "tidemark"),
            switch("rollback", "tidemark", "v2"),
            switch("promote", "v2", "tidemark"),
        ]
    );
}

fn archive(data_dir: &Path, topic: &str, before: &str) -> Value {
    let out = Command::new(tidemark_bin())
        .args([
            "archive",
            "--topic",
            topic,
            "--before",
            before,
            "--data-dir",
        ])
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("tidemark archive runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("archive report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_an_archive_equals_replay_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let w = live(dir.path(), &[]).await;
    let (from, to) = range(&w);
    let topics = [
        "user-events",
        "content-events",
        "ad-events",
        "user-profiles",
    ];

    // The first half archived, the rest still in the log: read as one.
    let half = (w.hour + HOUR / 2).to_string();
    for topic in topics {
        archive(dir.path(), topic, &half);
    }
    let out = replay(
        dir.path(),
        &[
            "--from", &from, "--to", &to, "--source", "archive", "--into", "half", "--verify",
        ],
    );
    assert_equivalent(&out);
    let events = replay_summary(&out)["events"].clone();

    // Everything archived (incrementally), then the log gone: the archive alone.
    let mut records = 0;
    for topic in topics {
        records += archive(dir.path(), topic, "2100-01-01T00:00:00Z")["records"]
            .as_u64()
            .unwrap();
    }
    assert!(records > 0);
    std::fs::rename(dir.path().join("log"), dir.path().join("log.gone")).unwrap();
    let out = replay(
        dir.path(),
        &[
            "--from", &from, "--to", &to, "--source", "archive", "--into", "whole", "--verify",
        ],
    );
    assert_equivalent(&out);
    assert_eq!(replay_summary(&out)["events"], events, "the same records");
}

/// A `replay --follow` process; killed on drop.
struct Follower(std::process::Child);

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_keeps_the_new_database_equal_to_live() {
    let dir = tempfile::tempdir().unwrap();
    let workload = Workload::new(hour(), 13);
    let t = Tidemark::start(dir.path(), &[]).await;
    let half = workload.batches.len() / 2;
    for batch in &workload.batches[..half] {
        assert_eq!(t.post(batch).await.0, 202);
    }
    // Started halfway through the workload, the follower keeps going.
    let (from, to) = (
        workload.hour.to_string(),
        (workload.hour + 600_000).to_string(),
    );
    let mut follower = Follower(
        Command::new(tidemark_bin())
            .args([
                "replay", "--from", &from, "--to", &to, "--into", "next", "--follow",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    for batch in &workload.batches[half..] {
        assert_eq!(t.post(batch).await.0, 202);
    }
    settle(&t, &workload).await;
    // Both stores get the last windows with their writers' next flush.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let live = hour_points(&dir.path().join("store.sqlite"), workload.hour).await;
        let stored = live.len();
        let next = hour_points(&dir.path().join("next.sqlite"), workload.hour).await;
        let differences = tidemark_replay::verify::diff(live, next);
        // Live's writer may not have flushed the hour yet either.
        if stored > 1_000 && differences.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{stored} live points, {} differences, e.g. {:?}",
            differences.len(),
            differences.first()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let child = &mut follower.0;
    assert_eq!(child.try_wait().unwrap(), None, "still following");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    assert!(child.wait().unwrap().success(), "stops cleanly");
    assert!(dir.path().join("replay/next").is_dir(), "its checkpoints");
}
