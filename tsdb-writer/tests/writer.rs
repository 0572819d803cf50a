//! The batching writer: batching by size and time, the flush barrier, retries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tidemark_model::{EventTime, FieldValue, Point, Tier};
use tidemark_tsdb_writer::writer::{BatchingWriter, WriterConfig, WriterMetrics};
use tidemark_tsdb_writer::{MetricQuery, Series, Store, StoreError};

/// Records every batch; fails the first `fail_times` writes with `error`.
#[derive(Debug, Default)]
struct FakeStore {
    state: Mutex<FakeState>,
}

#[derive(Debug, Default)]
struct FakeState {
    fail_times: usize,
    retryable: bool,
    attempts: usize,
    batches: Vec<Vec<Point>>,
}

impl FakeStore {
    fn failing(times: usize, retryable: bool) -> Arc<FakeStore> {
        Arc::new(FakeStore {
            state: Mutex::new(FakeState {
                fail_times: times,
                retryable,
                ..Default::default()
            }),
        })
    }
    fn batches(&self) -> Vec<Vec<Point>> {
        self.state.lock().unwrap().batches.clone()
    }
}

#[async_trait]
impl Store for FakeStore {
    async fn ensure_schema(&self) -> Result<(), StoreError> {
        Ok(())
    }
    async fn write(&self, points: &[Point]) -> Result<(), StoreError> {
        let mut s = self.state.lock().unwrap();
        s.attempts += 1;
        if s.fail_times > 0 {
            s.fail_times -= 1;
            return Err(if s.retryable {
                StoreError::Unavailable("down".into())
            } else {
                StoreError::Rejected("bad".into())
            });
        }
        s.batches.push(points.to_vec());
        Ok(())
    }
    async fn query(&self, _query: &MetricQuery) -> Result<Vec<Series>, StoreError> {
        Ok(vec![])
    }
    fn kind(&self) -> &'static str {
        "fake"
    }
}

fn points(range: std::ops::Range<i64>) -> Vec<Point> {
    range
        .map(|i| {
            Point::new(
                "m",
                Tier::Rt,
                EventTime(i * 60_000),
                vec![],
                vec![("v".into(), FieldValue::Int(i))],
            )
        })
        .collect()
}

fn config(max_batch_points: usize, max_delay: Duration) -> WriterConfig {
    WriterConfig {
        max_batch_points,
        max_delay,
        channel_capacity: 4,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
    }
}

fn metrics() -> (prometheus::Registry, WriterMetrics) {
    let registry = prometheus::Registry::new();
    let metrics = WriterMetrics::new(&registry).unwrap();
    (registry, metrics)
}

#[tokio::test]
async fn batches_by_size_and_flushes_the_rest() {
    let store = FakeStore::failing(0, true);
    let (registry, m) = metrics();
    let (handle, task) = BatchingWriter::spawn(
        store.clone(),
        config(4, Duration::from_secs(3600)),
        m.clone(),
    );
    handle.send(points(0..3)).await.unwrap();
    handle.send(points(3..10)).await.unwrap();
    handle.flush().await.unwrap();
    let sizes: Vec<usize> = store.batches().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![4, 4, 2]);
    let written: Vec<Point> = store.batches().concat();
    assert_eq!(written, points(0..10));
    assert_eq!(m.batches.get(), 3);
    assert_eq!(m.points.get(), 10);
    assert_eq!(m.batch_size.get_sample_count(), 3);
    let names: Vec<String> = registry
        .gather()
        .iter()
        .map(|f| f.get_name().to_string())
        .collect();
    assert!(
        names.contains(&"tidemark_writer_batch_latency_seconds".to_string()),
        "{names:?}"
    );
    drop(handle);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn writes_after_max_delay_without_flush() {
    let store = FakeStore::failing(0, true);
    let (_registry, m) = metrics();
    let (handle, _task) =
        BatchingWriter::spawn(store.clone(), config(100, Duration::from_millis(200)), m);
    handle.send(points(0..2)).await.unwrap();
    // With paused time, the runtime jumps the clock to the writer's deadline
    // once every task is idle; poll until the timer-driven write happened.
    for _ in 0..100 {
        if !store.batches().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.batches(), vec![points(0..2)]);
}

#[tokio::test]
async fn retries_retryable_errors_until_written_once() {
    let store = FakeStore::failing(3, true);
    let (_registry, m) = metrics();
    let (handle, task) = BatchingWriter::spawn(
        store.clone(),
        config(5, Duration::from_secs(3600)),
        m.clone(),
    );
    handle.send(points(0..12)).await.unwrap();
    handle.flush().await.unwrap();
    let written: Vec<Point> = store.batches().concat();
    assert_eq!(written, points(0..12));
    let mut seen: HashMap<(String, i64), usize> = HashMap::new();
    for p in &written {
        *seen.entry((p.series_key(), p.time.millis())).or_default() += 1;
    }
    assert!(seen.values().all(|&n| n == 1));
    assert_eq!(m.retries.get(), 3);
    assert_eq!(m.failures.get(), 0);
    assert_eq!(store.state.lock().unwrap().attempts, 3 + 3);
    drop(handle);
    task.await.unwrap();
}

#[tokio::test]
async fn drops_rejected_batches_and_reports_them_to_flush() {
    let store = FakeStore::failing(1, false);
    let (_registry, m) = metrics();
    let (handle, _task) = BatchingWriter::spawn(
        store.clone(),
        config(5, Duration::from_secs(3600)),
        m.clone(),
    );
    handle.send(points(0..7)).await.unwrap();
    let err = handle.flush().await.unwrap_err();
    assert!(!err.is_retryable());
    assert_eq!(store.batches(), vec![points(5..7)]);
    assert_eq!(m.failures.get(), 1);
    assert_eq!(m.retries.get(), 0);
    // The rejection is reported once; later flushes are clean.
    handle.send(points(7..8)).await.unwrap();
    handle.flush().await.unwrap();
    assert_eq!(store.batches().concat(), points(5..8));
}

#[tokio::test]
async fn closing_all_handles_writes_the_buffer() {
    let store = FakeStore::failing(0, true);
    let (_registry, m) = metrics();
    let (handle, task) =
        BatchingWriter::spawn(store.clone(), config(100, Duration::from_secs(3600)), m);
    let other = handle.clone();
    handle.send(points(0..3)).await.unwrap();
    other.send(points(3..4)).await.unwrap();
    drop(handle);
    drop(other);
    task.await.unwrap();
    assert_eq!(store.batches().concat(), points(0..4));
}

#[tokio::test]
async fn send_fails_when_the_writer_is_gone() {
    let store = FakeStore::failing(0, true);
    let (_registry, m) = metrics();
    let (handle, task) = BatchingWriter::spawn(store, config(100, Duration::from_secs(3600)), m);
    task.abort();
    let _ = task.await;
    let err = handle.send(points(0..1)).await.unwrap_err();
    assert!(err.is_retryable());
    assert!(handle.flush().await.is_err());
}
