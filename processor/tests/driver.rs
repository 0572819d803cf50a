//! The async driver against an in-memory log and point sink: store path,
//! live updates, dead letters, metrics, checkpoint and restart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tidemark_log::{Log, LogError, Position, Record, StoredRecord};
use tidemark_model::topic::DEAD_LETTER;
use tidemark_model::wire::WireError;
use tidemark_model::{Event, EventTime, EventType, FieldValue, Point, Tier, Update};
use tidemark_processor::runner::ProcessorCheckpoint;
use tidemark_processor::{
    checkpoint, run_driver, BoxFuture, DriverConfig, EventCodec, PipelineSet, PointSink,
    ProcessorError, ProcessorMetrics,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
struct MemLog {
    topics: Mutex<BTreeMap<String, Vec<Vec<StoredRecord>>>>,
    /// This topic's end offsets never answer, like a broker too busy for them.
    end_offsets_hang: Option<&'static str>,
}

impl MemLog {
    fn create(&self, topic: &str, partitions: u32) {
        self.topics
            .lock()
            .unwrap()
            .entry(topic.to_string())
            .or_insert_with(|| vec![Vec::new(); partitions as usize]);
    }

    fn push(&self, topic: &str, partition: u32, value: Vec<u8>) {
        let mut t = self.topics.lock().unwrap();
        let part = &mut t.get_mut(topic).unwrap()[partition as usize];
        let offset = part.len() as u64;
        part.push(StoredRecord {
            offset,
            key: Bytes::new(),
            value: value.into(),
            timestamp: EventTime(0),
        });
    }

    fn values(&self, topic: &str) -> Vec<String> {
        let t = self.topics.lock().unwrap();
        t.get(topic)
            .map(|ps| {
                ps.iter()
                    .flatten()
                    .map(|r| String::from_utf8_lossy(&r.value).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn with_partition<T>(
        &self,
        topic: &str,
        partition: u32,
        f: impl FnOnce(&Vec<StoredRecord>) -> T,
    ) -> Result<T, LogError> {
        let t = self.topics.lock().unwrap();
        let parts = t
            .get(topic)
            .ok_or_else(|| LogError::UnknownTopic(topic.into()))?;
        let p = parts
            .get(partition as usize)
            .ok_or_else(|| LogError::UnknownPartition {
                topic: topic.into(),
                partition,
            })?;
        Ok(f(p))
    }
}

#[async_trait]
impl Log for MemLog {
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), LogError> {
        self.create(topic, partitions);
        Ok(())
    }

    async fn partition_count(&self, topic: &str) -> Result<u32, LogError> {
        let t = self.topics.lock().unwrap();
        t.get(topic)
            .map(|p| p.len() as u32)
            .ok_or_else(|| LogError::UnknownTopic(topic.into()))
    }

    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        let mut out = Vec::new();
        for r in records {
            self.push(topic, 0, r.value.to_vec());
            out.push(Position {
                partition: 0,
                offset: 0,
            });
        }
        Ok(out)
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        self.with_partition(topic, partition, |p| {
            p.iter().skip(offset as usize).take(max).cloned().collect()
        })
    }

    async fn offset_for_time(&self, _: &str, _: u32, _: EventTime) -> Result<u64, LogError> {
        Ok(0)
    }

    async fn start_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.with_partition(topic, partition, |_| 0)
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        if self.end_offsets_hang == Some(topic) {
            std::future::pending::<()>().await;
        }
        self.with_partition(topic, partition, |p| p.len() as u64)
    }
}

type Identity = (Tier, String, Vec<(String, String)>, EventTime);

/// Keeps the last value per point identity, like a store.
#[derive(Debug, Default)]
struct MemSink {
    points: Mutex<BTreeMap<Identity, Vec<(String, FieldValue)>>>,
    flushes: Mutex<u32>,
}

impl PointSink for MemSink {
    fn send(&self, points: Vec<Point>) -> BoxFuture<'_, Result<(), ProcessorError>> {
        Box::pin(async move {
            let mut m = self.points.lock().unwrap();
            for p in points {
                m.insert((p.tier, p.measurement, p.tags, p.time), p.fields);
            }
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ProcessorError>> {
        Box::pin(async move {
            *self.flushes.lock().unwrap() += 1;
            Ok(())
        })
    }
}

impl MemSink {
    fn events(&self, start: i64) -> Option<FieldValue> {
        let m = self.points.lock().unwrap();
        m.iter()
            .find(|((tier, meas, _, t), _)| {
                *tier == Tier::Rt && meas == "traffic" && *t == EventTime(start)
            })
            .map(|(_, f)| f[0].1)
    }
}

/// A test encoding: `id|user|timestamp`; `garbage` does not decode.
fn enc(id: &str, user: &str, ts: i64) -> Vec<u8> {
    format!("{id}|{user}|{ts}").into_bytes()
}

fn decode(buf: &[u8], into: &mut Event) -> Result<(), WireError> {
    let text = std::str::from_utf8(buf).map_err(|_| WireError::Corrupt("utf8"))?;
    let mut it = text.split('|');
    let (Some(id), Some(user), Some(ts)) = (it.next(), it.next(), it.next()) else {
        return Err(WireError::Truncated);
    };
    *into = Event {
        event_id: id.into(),
        user_id: user.into(),
        event_type: EventType::Login,
        timestamp: EventTime(ts.parse().map_err(|_| WireError::Corrupt("ts"))?),
        ..Event::default()
    };
    Ok(())
}

fn to_json(ev: &Event) -> String {
    format!(r#"{{"event_id":"{}"}}"#, ev.event_id)
}

fn config(dir: &std::path::Path) -> DriverConfig {
    DriverConfig {
        topics: vec!["user-events".into()],
        idle_timeout: Duration::from_millis(50),
        early_interval: Duration::from_millis(20),
        checkpoint_interval: Duration::from_millis(100),
        checkpoint_dir: Some(dir.to_path_buf()),
        idle_sleep: Duration::from_millis(5),
        codec: EventCodec { decode, to_json },
        ..DriverConfig::default()
    }
}

/// Two shards over [`config`], reporting through `tidemark-partials`.
fn two_shards(dir: &std::path::Path) -> tidemark_processor::shards::ShardedConfig {
    tidemark_processor::shards::ShardedConfig {
        driver: DriverConfig {
            workers: 2,
            ..config(dir)
        },
        partials_topic: "tidemark-partials".to_string(),
    }
}

/// Waits for a final update of the 1-minute window at `start` with `n` events.
async fn await_final(rx: &mut broadcast::Receiver<Update>, start: i64, n: i64) {
    let wait = async {
        loop {
            let u = rx.recv().await.expect("updates channel open");
            let hit = u.is_final
                && u.window_start == EventTime(start)
                && u.points.iter().any(|p| {
                    p.tier == Tier::Rt
                        && p.measurement == "traffic"
                        && p.field("events") == Some(FieldValue::Int(n))
                });
            if hit {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("final update in time");
}

#[tokio::test]
async fn processes_checkpoints_and_resumes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(MemLog::default());
    log.create("user-events", 2);
    // Partition 1: minute 0, out of order within 5 s.
    for (id, ts) in [
        ("b1", 30_000),
        ("b2", 26_000),
        ("b3", 59_000),
        ("b4", 58_000),
    ] {
        log.push("user-events", 1, enc(id, "u9", ts));
    }
    // Partition 0: a duplicate, an undecodable record, a too-late and a late-but-accepted event.
    for (id, ts) in [
        ("a1", 10_000),
        ("a1", 10_000),
        ("a2", 70_000),
        ("a3", 185_000),
        ("a4", 100_000),
        ("a5", 130_000),
    ] {
        log.push("user-events", 0, enc(id, "u1", ts));
    }
    log.push("user-events", 0, b"garbage".to_vec());

    let registry = prometheus::Registry::new();
    let metrics = ProcessorMetrics::new(&registry);
    let sink = Arc::new(MemSink::default());
    let (tx, mut rx) = broadcast::channel(1024);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_driver(
        config(dir.path()),
        log.clone(),
        PipelineSet::default(),
        sink.clone(),
        tx.clone(),
        metrics.clone(),
        cancel.clone(),
    ));
    // Both partitions go idle, so the watermark reaches 180 s and minutes 0-2 fire.
    await_final(&mut rx, 120_000, 1).await;
    cancel.cancel();
    task.await.unwrap().unwrap();

    assert_eq!(sink.events(0), Some(FieldValue::Int(5)));
    assert_eq!(sink.events(60_000), Some(FieldValue::Int(1)));
    assert_eq!(sink.events(120_000), Some(FieldValue::Int(1)));
    assert_eq!(sink.events(180_000), None, "minute 3 is still open");
    assert_eq!(metrics.events_processed.get(), 8);
    assert_eq!(metrics.duplicates.get(), 1);
    assert_eq!(metrics.late_events.get(), 1);
    assert_eq!(metrics.decode_errors.get(), 1);
    assert!(metrics.windows_fired.get() >= 3);
    // The newest event read is a3 at 185 s; the watermark passed 120 s.
    assert_eq!(metrics.newest_event_timestamp_seconds.get(), 185.0);
    assert!(metrics.watermark_timestamp_seconds.get() >= 120.0);
    let started = tidemark_model::EventTime::now().millis() as f64 / 1000.0 - 60.0;
    assert!(
        metrics.checkpoint_timestamp_seconds.get() > started,
        "the last checkpoint was saved by this run"
    );
    assert_eq!(
        log.values(DEAD_LETTER),
        vec![r#"{"reason":"too_late","error":"event is too late for its window","stage":"processor","raw":"{\"event_id\":\"a4\"}"}"#.to_string()]
    );
    assert!(*sink.flushes.lock().unwrap() >= 1);
    let cp: ProcessorCheckpoint = checkpoint::load(dir.path())
        .unwrap()
        .expect("checkpoint written");
    assert_eq!(cp.offsets()[&("user-events".to_string(), 0)], 7);
    assert_eq!(cp.offsets()[&("user-events".to_string(), 1)], 4);

    // Restart: minute 3 keeps its event from before, the replayed duplicate is dropped.
    log.push("user-events", 0, enc("a3", "u1", 185_000));
    log.push("user-events", 0, enc("a6", "u2", 190_000));
    log.push("user-events", 0, enc("a7", "u2", 250_000));
    let metrics = ProcessorMetrics::new(&prometheus::Registry::new());
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_driver(
        config(dir.path()),
        log.clone(),
        PipelineSet::default(),
        sink.clone(),
        tx,
        metrics.clone(),
        cancel.clone(),
    ));
    await_final(&mut rx, 180_000, 2).await;
    cancel.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(sink.events(180_000), Some(FieldValue::Int(2)));
    assert_eq!(metrics.duplicates.get(), 1);
    assert_eq!(metrics.events_processed.get(), 2);
    assert_eq!(
        sink.events(0),
        Some(FieldValue::Int(5)),
        "earlier results untouched"
    );
}

#[tokio::test]
async fn early_updates_are_broadcast_for_open_windows() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(MemLog::default());
    log.create("user-events", 1);
    log.push("user-events", 0, enc("x", "u1", 5_000));
    let (tx, mut rx) = broadcast::channel(64);
    let cancel = CancellationToken::new();
    let mut cfg = config(dir.path());
    cfg.idle_timeout = Duration::from_secs(3600);
    let task = tokio::spawn(run_driver(
        cfg,
        log,
        PipelineSet::default(),
        Arc::new(MemSink::default()),
        tx,
        ProcessorMetrics::new(&prometheus::Registry::new()),
        cancel.clone(),
    ));
    let u = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let u = rx.recv().await.unwrap();
            if !u.is_final && u.window_start == EventTime(0) {
                return u;
            }
        }
    })
    .await
    .unwrap();
    assert!(u
        .points
        .iter()
        .any(|p| p.tier == Tier::Rt && p.field("events") == Some(FieldValue::Int(1))));
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Stage 1 as two shards and stage 2 apart, joined by a partials topic, as
/// in `tidemark process`: exact windows, also when a shard dies and comes
/// back from a checkpoint older than what it already reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_stages_give_exact_windows_across_a_shard_crash() {
    use tidemark_processor::shards::{run_combiner, run_shards};

    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(MemLog::default());
    log.create("user-events", 2);
    log.create("tidemark-partials", 1);
    for (id, ts) in [("a1", 10_000), ("a2", 20_000), ("a3", 70_000)] {
        log.push("user-events", 0, enc(id, "u1", ts));
    }
    for (id, ts) in [("b1", 30_000), ("b2", 65_000)] {
        log.push("user-events", 1, enc(id, "u9", ts));
    }
    let sharded = two_shards(dir.path());
    let metrics = ProcessorMetrics::new(&prometheus::Registry::new());
    let shard = |n: usize, cancel: &CancellationToken| {
        let (sharded, log, metrics, cancel) = (
            sharded.clone(),
            log.clone(),
            metrics.clone(),
            cancel.clone(),
        );
        tokio::spawn(async move {
            run_shards(sharded, &[n], log, PipelineSet::default(), metrics, cancel).await
        })
    };
    let sink = Arc::new(MemSink::default());
    let (tx, mut rx) = broadcast::channel(4096);
    let stop_combiner = CancellationToken::new();
    let combiner = tokio::spawn(run_combiner(
        sharded.clone(),
        log.clone(),
        PipelineSet::default(),
        sink.clone(),
        tx,
        metrics.clone(),
        stop_combiner.clone(),
    ));
    let (stop_0, stop_1) = (CancellationToken::new(), CancellationToken::new());
    let shard_0 = shard(0, &stop_0);
    let first_1 = shard(1, &stop_1);
    await_final(&mut rx, 0, 3).await;

    // Shard 1's checkpoint now, then more work it reports, then it dies and
    // comes back from that older checkpoint.
    let shard_1_dir = dir.path().join("shard-1");
    let older = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(bytes) = std::fs::read(checkpoint::path(&shard_1_dir)) {
                return bytes;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("shard 1 checkpoints");
    for (id, ts) in [("b3", 130_000), ("b4", 140_000)] {
        log.push("user-events", 1, enc(id, "u9", ts));
    }
    log.push("user-events", 0, enc("a4", "u1", 150_000));
    await_final(&mut rx, 60_000, 2).await;
    stop_1.cancel();
    first_1.await.unwrap().unwrap();
    std::fs::write(checkpoint::path(&shard_1_dir), older).unwrap();
    let stop_1 = CancellationToken::new();
    let second_1 = shard(1, &stop_1);
    log.push("user-events", 1, enc("b5", "u9", 250_000));
    log.push("user-events", 0, enc("a5", "u1", 250_000));
    await_final(&mut rx, 120_000, 3).await;

    for stop in [&stop_0, &stop_1] {
        stop.cancel();
    }
    shard_0.await.unwrap().unwrap();
    second_1.await.unwrap().unwrap();
    stop_combiner.cancel();
    combiner.await.unwrap().unwrap();
    assert_eq!(sink.events(0), Some(FieldValue::Int(3)));
    assert_eq!(sink.events(60_000), Some(FieldValue::Int(2)));
    assert_eq!(
        sink.events(120_000),
        Some(FieldValue::Int(3)),
        "replayed events are not counted twice"
    );
    assert!(checkpoint::path(&dir.path().join("combiner")).exists());
}

/// Reading never waits for the end offsets (the lag metric's): on a busy
/// broker each takes a round trip, and shards that asked for them between
/// their reads once reported their last windows minutes late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_report_their_progress_while_the_log_does_not_answer_end_offsets() {
    use tidemark_processor::shards::{run_combiner, run_shards};

    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(MemLog {
        end_offsets_hang: Some("user-events"),
        ..MemLog::default()
    });
    log.create("user-events", 2);
    log.create("tidemark-partials", 1);
    log.push("user-events", 0, enc("a1", "u1", 10_000));
    log.push("user-events", 1, enc("b1", "u2", 20_000));
    let sharded = two_shards(dir.path());
    let metrics = ProcessorMetrics::new(&prometheus::Registry::new());
    let cancel = CancellationToken::new();
    let shards = tokio::spawn(run_shards(
        sharded.clone(),
        &[0, 1],
        log.clone(),
        PipelineSet::default(),
        metrics.clone(),
        cancel.clone(),
    ));
    let sink = Arc::new(MemSink::default());
    let (tx, mut rx) = broadcast::channel(4096);
    let combiner = tokio::spawn(run_combiner(
        sharded,
        log.clone(),
        PipelineSet::default(),
        sink.clone(),
        tx,
        metrics,
        cancel.clone(),
    ));
    // Both shards have read the first minute and sent an early report.
    let early = async {
        loop {
            let u = rx.recv().await.expect("updates channel open");
            if !u.is_final
                && u.window_start == EventTime(0)
                && u.points.iter().any(|p| {
                    p.measurement == "traffic" && p.field("events") == Some(FieldValue::Int(2))
                })
            {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), early)
        .await
        .expect("early result of both shards");
    // Later events on both partitions close the minute.
    log.push("user-events", 0, enc("a2", "u1", 80_000));
    log.push("user-events", 1, enc("b2", "u2", 80_000));
    await_final(&mut rx, 0, 2).await;

    cancel.cancel();
    shards.await.unwrap().unwrap();
    combiner.await.unwrap().unwrap();
    assert_eq!(sink.events(0), Some(FieldValue::Int(2)));
}
