//! The scale-out deployment: `tidemark ingest`, `process` and `serve` as
//! separate processes over a real Kafka-compatible broker (tansu) and a real
//! InfluxDB, with the known event set and its exact answers.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tidemark_log::kafka::rdkafka::mocking::MockCluster;
use tidemark_log::kafka::{KafkaConfig, KafkaLog};
use tidemark_log::Log;
use tidemark_model::{topic, wire};
use tidemark_tests::services::{
    ingest_args, process_args, serve_args, OverviewClient, Service, TansuServer,
};
use tidemark_tests::{metric_value, wait_until, InfluxServer, JsonApi, KnownEvents};

/// Windows close 10 s after the last event (idle partitions), and tansu is
/// not fast: generous, but bounded.
const RESULTS_TIMEOUT: Duration = Duration::from_secs(120);
/// From the last post until the workload's last minute is in the store,
/// when nothing but later events follow it.
const LAST_MINUTE_TIMEOUT: Duration = Duration::from_secs(30);

/// The `event_id`s a 202 reply acknowledged: every event not rejected.
fn acknowledged(batch: &[Value], reply: &Value) -> Vec<String> {
    let rejected: BTreeSet<u64> = reply["rejected"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["index"].as_u64())
        .collect();
    batch
        .iter()
        .enumerate()
        .filter(|(i, _)| !rejected.contains(&(*i as u64)))
        .filter_map(|(_, e)| e["event_id"].as_str().map(str::to_string))
        .collect()
}

/// How long a batch is sent again while ingest answers 503 (the brokers
/// slower than the produce timeout, as on a busy 2-core machine).
const RESEND_FOR: Duration = Duration::from_secs(120);

/// Posts a batch until ingest takes it, sending it again after a 503: what
/// a client does, and safe, since the processor drops the events it
/// already has by their `event_id`. Returns the 202 reply.
async fn post_accepted(ingest: &Service, batch: &[Value]) -> Value {
    let deadline = Instant::now() + RESEND_FOR;
    loop {
        let (status, _, reply) = ingest.post(batch).await;
        if status == 503 && Instant::now() < deadline {
            continue;
        }
        assert_eq!(status, 202, "batch accepted: {reply}");
        return reply;
    }
}

async fn post_all(ingest: &Service, batches: &[Vec<Value>]) {
    for batch in batches {
        post_accepted(ingest, batch).await;
    }
}

/// The shards a `process` instance runs, and whether it runs the combiner.
async fn roles(service: &Service) -> (Vec<u64>, bool) {
    let health = service.get_json("/api/v1/health").await;
    let shards = health["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    (shards, health["combiner"] == true)
}

/// The combiner's checkpoint: it advances only once the store has the points.
fn checkpoint(data_dir: &Path) -> Option<Vec<u8>> {
    std::fs::read(
        data_dir
            .join("checkpoints")
            .join("combiner")
            .join("checkpoint.bin.zst"),
    )
    .ok()
}

async fn events_processed(service: &Service) -> f64 {
    metric_value(
        &service.metrics_text().await,
        "tidemark_processor_events_total",
        "",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_services_give_exact_counts_in_influxdb_and_on_the_websocket() {
    let tansu = TansuServer::start();
    let influx = InfluxServer::start().expect("influxd starts");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("process");
    let ingest = Service::start(&ingest_args(&tansu.brokers), dir.path()).await;
    let process = Service::start(
        &process_args(&tansu.brokers, &influx.url, &data_dir),
        dir.path(),
    )
    .await;
    // serve takes its settings from a config file.
    let serve_config = dir.path().join("serve.toml");
    let serving_dir = dir.path().join("serving");
    std::fs::create_dir_all(&serving_dir).unwrap();
    std::fs::write(
        &serve_config,
        format!(
            "kafka_brokers = \"{}\"\ninflux_url = \"{}\"\ninflux_db = \"tidemark\"\ndata_dir = \"{}\"\n",
            tansu.brokers,
            influx.url,
            serving_dir.display()
        ),
    )
    .unwrap();
    let serve_from_file = [
        "serve".to_string(),
        "--config".to_string(),
        serve_config.display().to_string(),
    ];
    let serve = Service::start(&serve_from_file, dir.path()).await;
    let mut overview = OverviewClient::connect(&serve.base, &serve.token).await;

    let known = KnownEvents::new(30);
    let mut rejected = 0;
    for batch in &known.batches {
        let reply = post_accepted(&ingest, batch).await;
        rejected += reply["rejected"].as_array().map_or(0, Vec::len);
    }
    assert_eq!(rejected, known.invalid);

    // Through serve's REST API, which reads InfluxDB.
    known.assert_results_within(&serve, RESULTS_TIMEOUT).await;
    assert_eq!(serve.get_json("/api/v1/health").await["store"], "influxdb");

    // Through the updates topic to a WebSocket client of serve.
    let expected = known.traffic_by_type();
    let complete = overview
        .until(Duration::from_secs(60), |windows| {
            expected.iter().all(|(minute, types)| {
                windows
                    .get(minute)
                    .is_some_and(|(is_final, seen)| *is_final && seen == types)
            })
        })
        .await;
    assert!(
        complete,
        "final overview windows on the WebSocket: {:?}\nexpected: {expected:?}",
        overview.windows
    );

    let ingest_metrics = ingest.metrics_text().await;
    assert!(
        metric_value(
            &ingest_metrics,
            "tidemark_kafka_produce_seconds_count",
            "content-events"
        ) > 0.0
    );
    assert_eq!(
        metric_value(&ingest_metrics, "tidemark_kafka_broker_up", ""),
        1.0
    );
    let process_metrics = process.metrics_text().await;
    assert_eq!(
        metric_value(&process_metrics, "tidemark_processor_active", ""),
        1.0
    );
    assert!(
        metric_value(
            &process_metrics,
            "tidemark_processor_rebalances_total",
            "assign"
        ) >= 1.0
    );
    let processor = &process;
    wait_until(
        "per-partition lag exported",
        Duration::from_secs(30),
        move || async move {
            processor.metrics_text().await.contains(
                "tidemark_processor_partition_lag_records{partition=\"0\",topic=\"content-events\"}",
            )
        },
    )
    .await;
    assert!(
        metric_value(
            &serve.metrics_text().await,
            "tidemark_serve_updates_received_total",
            ""
        ) > 0.0
    );

    // `tidemark promote` switches serve as well: REST and the WebSocket
    // overview (an empty database has an empty one), then back.
    let created = reqwest::Client::new()
        .post(format!("{}/query", influx.url))
        .query(&[("q", "CREATE DATABASE tidemark_v2")])
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success());
    let promote = |database: &str| {
        tidemark_tests::promote(&serving_dir, &[database, "--influx-url", &influx.url])
    };
    let serving = |want: &'static str| {
        let serve = &serve;
        move || async move { serve.get_json("/api/v1/health").await["database"] == want }
    };
    promote("tidemark_v2");
    wait_until(
        "serve to serve tidemark_v2",
        Duration::from_secs(10),
        serving("tidemark_v2"),
    )
    .await;
    assert!(
        overview
            .until(Duration::from_secs(10), |w| w.is_empty())
            .await,
        "a snapshot of the empty database: {:?}",
        overview.windows
    );
    promote("--rollback");
    wait_until(
        "serve to serve tidemark again",
        Duration::from_secs(10),
        serving("tidemark"),
    )
    .await;
    let again = overview
        .until(Duration::from_secs(10), |windows| {
            expected
                .iter()
                .all(|(minute, types)| windows.get(minute).is_some_and(|(_, seen)| seen == types))
        })
        .await;
    assert!(again, "the live overview again: {:?}", overview.windows);
}

/// The brokers are librdkafka's mock cluster, which listens on loopback
/// ports like a real cluster and can take its brokers down and up again
/// (tansu 0.6 fails an idempotent producer that outlives its restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_ingest_answers_503_and_loses_nothing_it_acknowledged() {
    let cluster = MockCluster::new(3).expect("mock cluster");
    let brokers = cluster.bootstrap_servers();
    // The mock cluster does not answer CreateTopics; ingest finds them made.
    for (t, partitions) in [
        (topic::USER_EVENTS, 32),
        (topic::CONTENT_EVENTS, 32),
        (topic::AD_EVENTS, 16),
        (topic::USER_PROFILES, 8),
        (topic::DEAD_LETTER, 4),
        ("tidemark-updates", 4),
        ("tidemark-partials", 4),
        ("tidemark-processor-lease", 1),
    ] {
        cluster.create_topic(t, partitions, 3).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let ingest = Service::start(&ingest_args(&brokers), dir.path()).await;
    let known = KnownEvents::new(20);
    let batches = &known.batches;
    let mut acked: BTreeSet<String> = BTreeSet::new();

    for batch in &batches[..2] {
        let (status, _, reply) = ingest.post(batch).await;
        assert_eq!(status, 202, "{reply}");
        acked.extend(acknowledged(batch, &reply));
    }

    for id in 1..=3 {
        cluster.broker_down(id).unwrap();
    }
    for batch in &batches[2..4] {
        let started = Instant::now();
        let (status, retry_after, reply) = ingest.post(batch).await;
        assert_eq!(status, 503, "brokers down: {reply}");
        assert!(retry_after.is_some(), "503 carries Retry-After");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "answered within the produce timeout, took {:?}",
            started.elapsed()
        );
    }
    let metrics = ingest.metrics_text().await;
    assert!(metric_value(&metrics, "tidemark_kafka_delivery_failures_total", "") > 0.0);
    let health_of = &ingest;
    wait_until(
        "ingest to see the brokers down",
        Duration::from_secs(15),
        move || async move { health_of.get_json("/api/v1/health").await["kafka"] == "down" },
    )
    .await;

    for id in 1..=3 {
        cluster.broker_up(id).unwrap();
    }
    // The client resends what was refused; ingest recovers by itself.
    let deadline = Instant::now() + Duration::from_secs(90);
    for batch in &batches[2..] {
        loop {
            let (status, retry_after, reply) = ingest.post(batch).await;
            if status == 202 {
                acked.extend(acknowledged(batch, &reply));
                break;
            }
            assert_eq!(status, 503, "{reply}");
            assert!(retry_after.is_some());
            assert!(Instant::now() < deadline, "ingest never recovered");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    wait_until(
        "ingest to see the brokers up",
        Duration::from_secs(15),
        move || async move { health_of.get_json("/api/v1/health").await["kafka"] == "up" },
    )
    .await;

    // Every acknowledged event is in the log.
    let log = KafkaLog::connect(KafkaConfig::new(&brokers))
        .await
        .expect("log connects");
    let mut stored = BTreeSet::new();
    for t in topic::INPUT_TOPICS {
        for p in 0..log.partition_count(t).await.unwrap() {
            let end = log.end_offset(t, p).await.unwrap();
            let mut offset = log.start_offset(t, p).await.unwrap();
            while offset < end {
                let records = log.read(t, p, offset, 1000).await.unwrap();
                for r in &records {
                    stored.insert(wire::decode(&r.value).expect("decodes").event_id);
                    offset = r.offset + 1;
                }
            }
        }
    }
    let lost: Vec<&String> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged but not in the log: {lost:?}");
    assert!(acked.len() > 500, "{} acknowledged", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influxdb_down_holds_the_checkpoint_and_the_windows_end_exact() {
    let tansu = TansuServer::start();
    let mut influx = InfluxServer::start().expect("influxd starts");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("process");
    let ingest = Service::start(&ingest_args(&tansu.brokers), dir.path()).await;
    let process = Service::start(
        &process_args(&tansu.brokers, &influx.url, &data_dir),
        dir.path(),
    )
    .await;
    let serve = Service::start(&serve_args(&tansu.brokers, &influx.url), dir.path()).await;
    let known = KnownEvents::new(30);
    let half = known.batches.len() / 2;
    post_all(&ingest, &known.batches[..half]).await;
    let dir_of = &data_dir;
    wait_until(
        "a first checkpoint",
        Duration::from_secs(60),
        move || async move { checkpoint(dir_of).is_some() },
    )
    .await;

    influx.stop();
    let stopped = Instant::now();
    post_all(&ingest, &known.batches[half..]).await;
    // Closed windows are now waiting for the store.
    let processor = &process;
    wait_until(
        "the writer to retry",
        Duration::from_secs(60),
        move || async move {
            metric_value(
                &processor.metrics_text().await,
                "tidemark_writer_retries_total",
                "",
            ) > 0.0
        },
    )
    .await;
    let held = checkpoint(&data_dir);
    let outage = Duration::from_secs(30);
    tokio::time::sleep(outage.saturating_sub(stopped.elapsed())).await;
    assert!(
        held == checkpoint(&data_dir),
        "the checkpoint did not advance while InfluxDB was down"
    );
    assert!(process.get_json("/api/v1/health").await["status"] == "ok");

    influx.restart().expect("influxd restarts");
    known.assert_results_within(&serve, RESULTS_TIMEOUT).await;
    assert!(
        held != checkpoint(&data_dir),
        "the checkpoint advances again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processors_share_the_shards_and_a_sigkill_moves_them_to_the_survivor() {
    let tansu = TansuServer::start();
    let influx = InfluxServer::start().expect("influxd starts");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("process");
    let ingest = Service::start(&ingest_args(&tansu.brokers), dir.path()).await;
    let args = process_args(&tansu.brokers, &influx.url, &data_dir);
    let mut first = Service::start(&args, dir.path()).await;
    let mut second = Service::start(&args, dir.path()).await;
    let serve = Service::start(&serve_args(&tansu.brokers, &influx.url), dir.path()).await;
    let (a, b) = (&first, &second);
    wait_until(
        "one shard each and one combiner",
        Duration::from_secs(60),
        move || async move {
            let (ra, rb) = (roles(a).await, roles(b).await);
            ra.0.len() == 1 && rb.0.len() == 1 && ra.0 != rb.0 && ra.1 != rb.1
        },
    )
    .await;
    // The instance with the combiner dies: both of its roles must move.
    let (victim, survivor) = if roles(&first).await.1 {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };

    let known = KnownEvents::new(40);
    let half = known.batches.len() / 2;
    post_all(&ingest, &known.batches[..half]).await;
    let (dir_of, v, s): (&Path, &Service, &Service) = (&data_dir, victim, survivor);
    wait_until(
        "both processors to work and the combiner to checkpoint",
        Duration::from_secs(60),
        move || async move {
            checkpoint(dir_of).is_some()
                && events_processed(v).await > 0.0
                && events_processed(s).await > 0.0
        },
    )
    .await;
    victim.kill();
    post_all(&ingest, &known.batches[half..]).await;
    let survivor: &Service = survivor;
    wait_until(
        "the survivor to run every shard and the combiner",
        Duration::from_secs(60),
        move || async move { roles(survivor).await == (vec![0, 1], true) },
    )
    .await;
    known.assert_results_within(&serve, RESULTS_TIMEOUT).await;
    let metrics = survivor.metrics_text().await;
    assert!(metric_value(&metrics, "tidemark_processor_rebalances_total", "assign") >= 2.0);
    assert_eq!(
        metric_value(&metrics, "tidemark_processor_shards_owned", ""),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_a_processor_checkpoints_and_hands_over_at_once() {
    let tansu = TansuServer::start();
    let influx = InfluxServer::start().expect("influxd starts");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("process");
    let ingest = Service::start(&ingest_args(&tansu.brokers), dir.path()).await;
    let args = process_args(&tansu.brokers, &influx.url, &data_dir);
    let mut first = Service::start(&args, dir.path()).await;
    let dir_of = &data_dir;
    let alone: &Service = &first;
    wait_until(
        "the first to run everything",
        Duration::from_secs(60),
        move || async move { roles(alone).await == (vec![0, 1], true) && checkpoint(dir_of).is_some() },
    )
    .await;
    let second = Service::start(&args, dir.path()).await;
    // The newcomer gets a shard; the combiner stays where it is.
    let (a, b) = (&first, &second);
    wait_until(
        "the shards to be shared",
        Duration::from_secs(60),
        move || async move {
            roles(a).await == (vec![0], true) && roles(b).await == (vec![1], false)
        },
    )
    .await;

    let known = KnownEvents::new(40);
    let half = known.batches.len() / 2;
    post_all(&ingest, &known.batches[..half]).await;
    wait_until(
        "events processed by both",
        Duration::from_secs(60),
        move || async move { events_processed(a).await > 0.0 && events_processed(b).await > 0.0 },
    )
    .await;
    let before = checkpoint(&data_dir);
    assert!(first.terminate().success(), "{}", first.output());
    let stopped = Instant::now();
    for step in [
        "Releasing the combiner lease: checkpointing",
        "Releasing the shards: checkpointing",
    ] {
        assert!(first.output().contains(step), "{}", first.output());
    }
    assert!(
        before != checkpoint(&data_dir),
        "a last checkpoint on revoke"
    );
    let survivor = &second;
    wait_until(
        "the other to take over",
        Duration::from_secs(60),
        move || async move { roles(survivor).await == (vec![0, 1], true) },
    )
    .await;
    // Leaving the groups hands everything on: sooner than a dead holder's
    // partitions could move (tansu needs the 12 s alive-file watchdog for that).
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "took over after {:?}",
        stopped.elapsed()
    );
    let serve = Service::start(&serve_args(&tansu.brokers, &influx.url), dir.path()).await;
    post_all(&ingest, &known.batches[half..]).await;
    known.assert_results_within(&serve, RESULTS_TIMEOUT).await;
}

/// Events of `users` users on every input topic at event time `ts`: nothing
/// but a push of every partition's watermark past the workload.
fn sentinels(users: usize, ts: i64) -> Vec<Vec<Value>> {
    use serde_json::json;
    let events: Vec<Value> = (0..users)
        .flat_map(|u| {
            [
                json!({"event_id": format!("s-l{u}"), "event_type": "login", "user_id": format!("s{u}"), "timestamp": ts}),
                json!({"event_id": format!("s-v{u}"), "event_type": "view", "user_id": format!("s{u}"), "post_id": "p0", "timestamp": ts}),
                json!({"event_id": format!("s-a{u}"), "event_type": "ad_impression", "user_id": format!("s{u}"),
                       "campaign_id": "c1", "ad_id": "c1-a1", "impression_id": format!("is{u}"), "timestamp": ts}),
            ]
        })
        .collect();
    events.chunks(100).map(<[Value]>::to_vec).collect()
}

/// The last minute of a workload fires once later events push every
/// partition's watermark past it, even when nothing but those events
/// follows: every shard's final advance must reach the combiner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_minute_of_a_workload_reaches_the_store_once_later_events_pass_it() {
    let tansu = TansuServer::start();
    let influx = InfluxServer::start().expect("influxd starts");
    let dir = tempfile::tempdir().unwrap();
    let ingest = Service::start(&ingest_args(&tansu.brokers), dir.path()).await;
    let _process = Service::start(
        &process_args(&tansu.brokers, &influx.url, &dir.path().join("process")),
        dir.path(),
    )
    .await;
    let serve = Service::start(&serve_args(&tansu.brokers, &influx.url), dir.path()).await;

    let known = KnownEvents::new(30);
    // The workload without its closing batch, then 3 minutes later in event
    // time only the sentinels.
    let (closing, workload) = known.batches.split_last().expect("batches");
    assert!(closing.iter().all(|e| e["event_id"]
        .as_str()
        .is_some_and(|id| id.starts_with("close-"))));
    post_all(&ingest, workload).await;
    post_all(&ingest, &sentinels(1_000, known.base + 6 * 60_000 + 10_000)).await;
    let posted = Instant::now();

    // The processor keeps up with ingest: the last minute lands soon after
    // the sentinels (it once took minutes, or never came within 150 s).
    known
        .assert_results_within(&serve, LAST_MINUTE_TIMEOUT)
        .await;
    eprintln!("exact {:?} after the last post", posted.elapsed());
}
