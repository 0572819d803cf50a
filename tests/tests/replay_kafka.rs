//! Replay from Kafka (a real broker: tansu) equals live. Live runs on the
//! embedded log; its records are then copied, partition by partition and in
//! order, into Kafka topics with the same partition counts (the same
//! murmur2 placement, so the same offsets), and `tidemark replay --source
//! kafka --verify` rebuilds a whole hour from Kafka. Needs the `kafka`
//! feature here and in `tidemark`.
#![cfg(feature = "kafka")]

use std::path::Path;
use std::time::Duration;

use tidemark_log::kafka::testing::TansuServer;
use tidemark_log::kafka::{KafkaConfig, KafkaLog};
use tidemark_log::segment::SegmentLog;
use tidemark_log::{Log, Record};
use tidemark_model::topic::INPUT_TOPICS;
use tidemark_tests::workload::Workload;
use tidemark_tests::{free_port, replay, replay_summary, Tidemark};

const HOUR: i64 = 3_600_000;

/// Copies every input topic of the embedded log into Kafka.
async fn copy_to_kafka(data_dir: &Path, kafka: &KafkaLog) -> u64 {
    let log = SegmentLog::open_read_only(data_dir.join("log")).unwrap();
    let mut copied = 0;
    for topic in INPUT_TOPICS {
        for partition in 0..log.partition_count_blocking(topic).unwrap() {
            let mut offset = 0;
            loop {
                let batch = log.read_blocking(topic, partition, offset, 5_000).unwrap();
                let Some(last) = batch.last() else { break };
                offset = last.offset + 1;
                let records: Vec<Record> = batch
                    .into_iter()
                    .map(|r| Record {
                        key: r.key,
                        value: r.value,
                        timestamp: r.timestamp,
                    })
                    .collect();
                copied += records.len() as u64;
                let positions = kafka.append(topic, records).await.unwrap();
                assert!(positions.iter().all(|p| p.partition == partition));
                assert_eq!(positions.last().unwrap().offset, offset - 1, "same offsets");
            }
        }
    }
    copied
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_kafka_equals_live() {
    let dir = tempfile::tempdir().unwrap();
    let hour = (tidemark_model::EventTime::now().millis() / HOUR - 3) * HOUR;
    let workload = Workload::new(hour, 5);
    let mut live = Tidemark::start(dir.path(), &[]).await;
    tidemark_tests::post_and_settle(&live, &workload).await;
    assert!(live.terminate().success());

    let tansu = TansuServer::start();
    let mut config = KafkaConfig::new(tansu.brokers.clone());
    config.replication_factor = Some(1);
    let embedded = SegmentLog::open_read_only(dir.path().join("log")).unwrap();
    for topic in INPUT_TOPICS {
        config.partitions.insert(
            topic.to_string(),
            embedded.partition_count_blocking(topic).unwrap(),
        );
    }
    let kafka = KafkaLog::connect(config)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", tansu.output()));
    kafka.provision_defaults().await.unwrap();
    assert!(copy_to_kafka(dir.path(), &kafka).await > 40_000);

    let (from, to) = (hour.to_string(), (hour + HOUR).to_string());
    let out = replay(
        dir.path(),
        &[
            "--from",
            &from,
            "--to",
            &to,
            "--source",
            "kafka",
            "--kafka-brokers",
            &tansu.brokers,
            "--into",
            "from_kafka",
            "--verify",
        ],
    );
    let s = replay_summary(&out);
    assert!(
        out.status.success(),
        "{s}\n{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "replay from Kafka: {} events in {} s, {} events/s",
        s["events"], s["seconds"], s["events_per_sec"]
    );
    assert_eq!(s["verify"]["missing"], 0, "{s}");
    assert_eq!(s["verify"]["extra"], 0, "{s}");
    assert_eq!(s["verify"]["changed"], 0, "{s}");
    assert!(
        s["verify"]["reference_points"].as_u64().unwrap() > 1_000,
        "{s}"
    );
    for m in ["traffic", "active_users", "engagement", "trending", "ads"] {
        assert!(s["measurements"][m].as_u64().unwrap_or(0) > 0, "{m}: {s}");
    }

    // An unreachable broker: a clear message, a non-zero exit, nothing written.
    let nobody = format!("127.0.0.1:{}", free_port());
    let started = std::time::Instant::now();
    let out = replay(
        dir.path(),
        &[
            "--from",
            &from,
            "--to",
            &to,
            "--source",
            "kafka",
            "--kafka-brokers",
            &nobody,
            "--into",
            "never",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the Kafka brokers"),
        "{stderr}"
    );
    assert!(!dir.path().join("never.sqlite").exists());
    assert!(started.elapsed() < Duration::from_secs(60));
}
