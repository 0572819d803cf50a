//! `KafkaLog` against a real Kafka-compatible broker (tansu, see
//! `tidemark_log::kafka::testing`) and against librdkafka's mock cluster for
//! fault injection. Run with `cargo test -p tidemark-log --features kafka --test kafka`.
#![cfg(feature = "kafka")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidemark_log::kafka::rdkafka::mocking::MockCluster;
use tidemark_log::kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tidemark_log::kafka::testing::TansuServer;
use tidemark_log::kafka::{KafkaConfig, KafkaLog};
use tidemark_log::{Log, LogError, Record, StoredRecord};
use tidemark_model::topic::partition_for_key;
use tidemark_model::EventTime;

const T0: i64 = 1_795_420_800_000; // 2026-11-23T08:00:00Z

fn config(brokers: &str) -> KafkaConfig {
    let mut c = KafkaConfig::new(brokers);
    c.client_id = "tidemark-test".to_string();
    c.replication_factor = Some(1);
    c.produce_timeout = Duration::from_secs(10);
    c
}

async fn connect(server: &TansuServer) -> KafkaLog {
    KafkaLog::connect(config(&server.brokers))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", server.output()))
}

fn record(key: &str, value: &str, ts: i64) -> Record {
    Record {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        timestamp: EventTime(ts),
    }
}

/// Reads `partition` from `from` until `count` records arrived (reads may
/// return fewer than asked while the consumer is still fetching).
async fn read_n(
    log: &KafkaLog,
    topic: &str,
    partition: u32,
    from: u64,
    count: usize,
) -> Vec<StoredRecord> {
    let mut out: Vec<StoredRecord> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < count {
        let next = out.last().map_or(from, |r| r.offset + 1);
        let batch = log.read(topic, partition, next, 1000).await.unwrap();
        out.extend(batch);
        assert!(
            Instant::now() < deadline,
            "read {} of {count} records of {topic}/{partition}",
            out.len()
        );
    }
    out
}

#[tokio::test]
async fn connect_to_unreachable_brokers_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let brokers = format!("127.0.0.1:{port}");
    let mut c = config(&brokers);
    c.request_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let err = KafkaLog::connect(c).await.unwrap_err();
    assert!(matches!(err, LogError::Unavailable(_)), "{err:?}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains(&brokers), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn invalid_property_is_a_config_error() {
    let mut c = config("127.0.0.1:1");
    c.properties
        .push(("no.such.property".to_string(), "1".to_string()));
    let err = KafkaLog::connect(c).await.unwrap_err();
    assert!(matches!(err, LogError::Config(_)), "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn ensure_topic_is_idempotent() {
    let server = TansuServer::start();
    let log = connect(&server).await;
    log.ensure_topic("idem", 3).await.unwrap();
    log.ensure_topic("idem", 3).await.unwrap();
    // An existing topic keeps its partition count.
    log.ensure_topic("idem", 5).await.unwrap();
    assert_eq!(log.partition_count("idem").await.unwrap(), 3);
    // A second client sees the same.
    let other = connect(&server).await;
    other.ensure_topic("idem", 3).await.unwrap();
    assert_eq!(other.partition_count("idem").await.unwrap(), 3);
    other
        .provision(&[("idem", 3, false), ("profiles", 2, true)])
        .await
        .unwrap();
    assert_eq!(other.partition_count("profiles").await.unwrap(), 2);
}

/// (tansu accepts any name and configuration, so a refusal by the broker
/// itself cannot be provoked here.)
#[tokio::test]
async fn invalid_topic_creation_is_a_config_error() {
    let server = TansuServer::start();
    let log = connect(&server).await;
    let err = log.ensure_topic("zero", 0).await.unwrap_err();
    assert!(matches!(err, LogError::Config(_)), "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn unknown_topic_and_partition() {
    let server = TansuServer::start();
    let log = connect(&server).await;
    let err = log.partition_count("nope").await.unwrap_err();
    assert!(matches!(err, LogError::UnknownTopic(_)), "{err:?}");
    log.ensure_topic("small", 2).await.unwrap();
    let err = log.read("small", 2, 0, 10).await.unwrap_err();
    assert!(
        matches!(err, LogError::UnknownPartition { partition: 2, .. }),
        "{err:?}"
    );
    let err = log.end_offset("small", 7).await.unwrap_err();
    assert!(matches!(err, LogError::UnknownPartition { .. }), "{err:?}");
}

#[tokio::test]
async fn append_then_read_back_in_order_per_partition() {
    let server = TansuServer::start();
    let log = connect(&server).await;
    let partitions = 4;
    log.ensure_topic("events", partitions).await.unwrap();

    let records: Vec<Record> = (0..300)
        .map(|i| record(&format!("user-{}", i % 23), &format!("event-{i}"), T0 + i))
        .collect();
    // Two appends, so offsets continue across calls.
    let mut positions = log.append("events", records[..120].to_vec()).await.unwrap();
    positions.extend(log.append("events", records[120..].to_vec()).await.unwrap());
    assert_eq!(positions.len(), records.len());

    // Keys are routed by murmur2, and offsets are dense per partition in input order.
    let mut expected: BTreeMap<u32, Vec<(u64, &Record)>> = BTreeMap::new();
    for (rec, pos) in records.iter().zip(&positions) {
        assert_eq!(pos.partition, partition_for_key(&rec.key, partitions));
        let list = expected.entry(pos.partition).or_default();
        assert_eq!(pos.offset, list.len() as u64, "offsets in input order");
        list.push((pos.offset, rec));
    }
    assert!(expected.len() > 1, "keys spread over partitions");

    for p in 0..partitions {
        let want = expected.remove(&p).unwrap_or_default();
        assert_eq!(log.start_offset("events", p).await.unwrap(), 0);
        assert_eq!(
            log.end_offset("events", p).await.unwrap(),
            want.len() as u64
        );
        let got = read_n(&log, "events", p, 0, want.len()).await;
        assert_eq!(got.len(), want.len());
        for (g, (off, w)) in got.iter().zip(&want) {
            assert_eq!(g.offset, *off);
            assert_eq!(g.key, w.key);
            assert_eq!(g.value, w.value);
            assert_eq!(g.timestamp, w.timestamp);
        }
        // At the end: empty.
        let at_end = log.read("events", p, want.len() as u64, 10).await.unwrap();
        assert!(at_end.is_empty());
        // Jumping back re-seeks.
        if want.len() > 3 {
            let again = read_n(&log, "events", p, 2, 1).await;
            assert_eq!(again[0].offset, 2);
            assert_eq!(again[0].value, want[2].1.value);
        }
    }
}

#[tokio::test]
async fn start_and_end_offsets() {
    let server = TansuServer::start();
    let log = connect(&server).await;
    log.ensure_topic("offsets", 1).await.unwrap();
    assert_eq!(log.start_offset("offsets", 0).await.unwrap(), 0);
    assert_eq!(log.end_offset("offsets", 0).await.unwrap(), 0);
    assert!(log.read("offsets", 0, 0, 10).await.unwrap().is_empty());
    let recs: Vec<Record> = (0..7)
        .map(|i| record("k", &i.to_string(), T0 + i))
        .collect();
    let pos = log.append("offsets", recs).await.unwrap();
    assert_eq!(pos.last().unwrap().offset, 6);
    assert_eq!(log.start_offset("offsets", 0).await.unwrap(), 0);
    assert_eq!(log.end_offset("offsets", 0).await.unwrap(), 7);
    // Past the end: empty, as the embedded log.
    assert!(log.read("offsets", 0, 100, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn offset_for_time_finds_first_record_at_or_after() {
    let server = TansuServer::start();
    let log = connect(&server).await;
    log.ensure_topic("times", 1).await.unwrap();
    // Event times 10 ms apart, appended in a few batches.
    let recs: Vec<Record> = (0..50)
        .map(|i| record("user", &i.to_string(), T0 + 10 * i))
        .collect();
    for chunk in recs.chunks(13) {
        log.append("times", chunk.to_vec()).await.unwrap();
    }
    let at = |ms: i64| log.offset_for_time("times", 0, EventTime(ms));
    assert_eq!(at(T0 - 60_000).await.unwrap(), 0);
    assert_eq!(at(T0).await.unwrap(), 0);
    assert_eq!(at(T0 + 1).await.unwrap(), 1);
    assert_eq!(at(T0 + 15).await.unwrap(), 2);
    assert_eq!(at(T0 + 250).await.unwrap(), 25);
    assert_eq!(at(T0 + 490).await.unwrap(), 49);
    // Past the last record: the end offset.
    assert_eq!(at(T0 + 491).await.unwrap(), 50);
    assert_eq!(at(T0 + 3_600_000).await.unwrap(), 50);
    assert_eq!(at(0).await.unwrap(), 0);
}

/// Throughput of `append` to tansu; prints events/s.
/// `cargo test -p tidemark-log --features kafka --release --test kafka -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn append_throughput_to_tansu() {
    let server = TansuServer::start();
    let log = connect(&server).await;
    log.ensure_topic("bench", 8).await.unwrap();
    let total = 100_000usize;
    let batch = 5_000usize;
    let value = "x".repeat(200);
    let records: Vec<Record> = (0..total)
        .map(|i| record(&format!("user-{}", i % 10_000), &value, T0 + i as i64))
        .collect();
    let started = Instant::now();
    for chunk in records.chunks(batch) {
        log.append("bench", chunk.to_vec()).await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "appended {total} records of ~{} bytes in batches of {batch}, one append at a time, \
         in {secs:.2} s: {:.0} events/s",
        value.len(),
        total as f64 / secs
    );

    // Four appenders at once, as several ingest requests would be.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for part in records.chunks(total / 4) {
        let (log, part) = (log.clone(), part.to_vec());
        tasks.push(tokio::spawn(async move {
            for chunk in part.chunks(batch) {
                log.append("bench", chunk.to_vec()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "appended {total} records with 4 concurrent appenders in {secs:.2} s: {:.0} events/s",
        total as f64 / secs
    );
    let mut stored = 0;
    for p in 0..8 {
        stored += log.end_offset("bench", p).await.unwrap();
    }
    assert_eq!(stored, 2 * total as u64);
}

// ---- librdkafka's mock cluster: fault injection ----

fn mock_config(
    cluster: &MockCluster<'_, impl tidemark_log::kafka::rdkafka::ClientContext>,
) -> KafkaConfig {
    let mut c = KafkaConfig::new(cluster.bootstrap_servers());
    c.client_id = "tidemark-mock".to_string();
    c.produce_timeout = Duration::from_secs(2);
    c.request_timeout = Duration::from_secs(5);
    c
}

/// Appends until one succeeds (a client reconnects with backoff once brokers return).
async fn append_eventually(log: &KafkaLog, topic: &str, records: Vec<Record>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match log.append(topic, records.clone()).await {
            Ok(pos) => {
                assert_eq!(pos.len(), records.len());
                return;
            }
            Err(e) => {
                assert!(e.is_retryable(), "{e:?}");
                assert!(Instant::now() < deadline, "append never recovered: {e}");
            }
        }
    }
}

#[tokio::test]
async fn append_fails_retryably_while_brokers_are_down_then_recovers() {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("mock", 4, 3).unwrap();
    let config = mock_config(&cluster);
    let produce_timeout = config.produce_timeout;
    let log = KafkaLog::connect(config).await.unwrap();
    let batch: Vec<Record> = (0..20)
        .map(|i| record(&format!("u{i}"), "v", T0 + i))
        .collect();
    log.append("mock", batch.clone()).await.unwrap();

    for id in 1..=3 {
        cluster.broker_down(id).unwrap();
    }
    let started = Instant::now();
    let err = log.append("mock", batch.clone()).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, LogError::Unavailable(_)), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        took <= produce_timeout + Duration::from_secs(2),
        "failed after {took:?}"
    );

    for id in 1..=3 {
        cluster.broker_up(id).unwrap();
    }
    append_eventually(&log, "mock", batch).await;
}

#[tokio::test]
async fn append_fails_retryably_when_produce_requests_fail() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("mock", 2, 1).unwrap();
    let config = mock_config(&cluster);
    let log = KafkaLog::connect(config).await.unwrap();
    log.append("mock", vec![record("a", "1", T0)])
        .await
        .unwrap();

    // Every produce request fails with a retriable broker error until the
    // message timeout: the append must fail, not report success.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 1000],
    );
    let err = log
        .append(
            "mock",
            vec![record("a", "2", T0 + 1), record("b", "3", T0 + 2)],
        )
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");

    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    append_eventually(&log, "mock", vec![record("a", "4", T0 + 3)]).await;
    // The record that made it is readable; nothing reported as failed is
    // required to be absent (at-least-once), but what we read is in order.
    let p = partition_for_key(b"a", 2);
    let end = log.end_offset("mock", p).await.unwrap();
    let got = read_n(&log, "mock", p, 0, end as usize).await;
    assert_eq!(got.first().unwrap().value, Bytes::from_static(b"1"));
    assert_eq!(got.last().unwrap().value, Bytes::from_static(b"4"));
}

#[tokio::test]
async fn mock_cluster_round_trip() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("mock", 3, 1).unwrap();
    let log = KafkaLog::connect(mock_config(&cluster)).await.unwrap();
    assert_eq!(log.partition_count("mock").await.unwrap(), 3);
    let recs: Vec<Record> = (0..30)
        .map(|i| record(&format!("k{}", i % 5), &i.to_string(), T0 + i))
        .collect();
    let positions = log.append("mock", recs.clone()).await.unwrap();
    for p in 0..3 {
        let want: Vec<&Record> = recs
            .iter()
            .zip(&positions)
            .filter(|(_, pos)| pos.partition == p)
            .map(|(r, _)| r)
            .collect();
        let got = read_n(&log, "mock", p, 0, want.len()).await;
        let got_values: Vec<&Bytes> = got.iter().map(|r| &r.value).collect();
        let want_values: Vec<&Bytes> = want.iter().map(|r| &r.value).collect();
        assert_eq!(got_values, want_values);
    }
}

/// Neither tansu nor the mock cluster can delete records (DeleteRecords), so
/// `LogError::OffsetOutOfRange` itself cannot be provoked here; this checks
/// the path around it: a fetch the broker answers with OFFSET_OUT_OF_RANGE
/// for an offset it does hold is a retryable error, and the next read
/// (re-assigning the consumer) gets the records.
#[tokio::test]
async fn broker_offset_out_of_range_is_retryable_and_recovers() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("mock", 1, 1).unwrap();
    let log = KafkaLog::connect(mock_config(&cluster)).await.unwrap();
    let recs: Vec<Record> = (0..10)
        .map(|i| record("k", &i.to_string(), T0 + i))
        .collect();
    log.append("mock", recs).await.unwrap();
    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE],
    );
    let mut saw_error = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        match log.read("mock", 0, 2, 100).await {
            Ok(batch) if !batch.is_empty() => break batch,
            Ok(_) => {}
            Err(e) => {
                assert!(e.is_retryable(), "{e:?}");
                saw_error = true;
            }
        }
        assert!(Instant::now() < deadline, "never recovered");
    };
    assert!(saw_error, "the injected error was not reported");
    assert_eq!(got[0].offset, 2);
}
