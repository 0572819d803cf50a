//! The archive reads back exactly what the log held: the same records at the
//! same offsets, the same timestamp-index answers, alone or stitched in
//! front of the log, and archiving again continues where it stopped.

use std::sync::Arc;

use bytes::Bytes;
use tidemark_log::segment::{SegmentLog, SegmentLogConfig};
use tidemark_log::{Log, Record, StoredRecord};
use tidemark_model::EventTime;
use tidemark_replay::archive::{archive_topic, ArchiveLog, Stitched};

const TOPIC: &str = "user-events";

/// A two-partition log of 3,000 records, timestamps slightly out of order.
fn log(dir: &std::path::Path) -> SegmentLog {
    let log = SegmentLog::open(dir, SegmentLogConfig::default()).unwrap();
    log.ensure_topic_blocking(TOPIC, 2).unwrap();
    for chunk in 0..30 {
        let records: Vec<Record> = (0..100)
            .map(|i| {
                let n = chunk * 100 + i;
                Record {
                    key: Bytes::from(format!("u{}", n % 13)),
                    value: Bytes::from(format!("v{n}")),
                    timestamp: EventTime(1_000 * n + if n % 7 == 0 { -1_500 } else { 0 }),
                }
            })
            .collect();
        log.append_blocking(TOPIC, &records).unwrap();
    }
    log
}

async fn all(log: &dyn Log, partition: u32) -> Vec<StoredRecord> {
    let mut out: Vec<StoredRecord> = Vec::new();
    loop {
        let from = out.last().map_or(0, |r| r.offset + 1);
        let batch = log.read(TOPIC, partition, from, 333).await.unwrap();
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

#[tokio::test]
async fn archive_reads_back_as_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let segments = log(&dir.path().join("log"));
    let archive_dir = dir.path().join("archive");

    let first = archive_topic(&segments, TOPIC, EventTime(1_000_000), &archive_dir)
        .await
        .unwrap();
    assert!(first.records > 0 && first.records < 3_000);
    let rest = archive_topic(&segments, TOPIC, EventTime(i64::MAX), &archive_dir)
        .await
        .unwrap();
    assert_eq!(
        first.records + rest.records,
        3_000,
        "incremental, nothing twice"
    );

    let archive = ArchiveLog::open(&archive_dir).unwrap();
    for partition in 0..2 {
        assert_eq!(
            all(&archive, partition).await,
            all(&segments, partition).await
        );
        for t in [0, 999, 1_000_000, 1_500_500, 2_999_000, 5_000_000] {
            let t = EventTime(t);
            assert_eq!(
                archive.offset_for_time(TOPIC, partition, t).await.unwrap(),
                segments.offset_for_time(TOPIC, partition, t).await.unwrap(),
                "offset for {t:?}"
            );
        }
    }
}

#[tokio::test]
async fn half_an_archive_stitched_in_front_of_the_log_is_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let segments = Arc::new(log(&dir.path().join("log")));
    let archive_dir = dir.path().join("archive");
    archive_topic(segments.as_ref(), TOPIC, EventTime(1_400_000), &archive_dir)
        .await
        .unwrap();
    let stitched = Stitched {
        archive: ArchiveLog::open(&archive_dir).unwrap(),
        log: Some(segments.clone() as Arc<dyn Log>),
    };
    for partition in 0..2 {
        assert_eq!(
            all(&stitched, partition).await,
            all(segments.as_ref(), partition).await
        );
        for t in [0, 1_399_000, 1_400_000, 2_500_000, 9_000_000] {
            let t = EventTime(t);
            assert_eq!(
                stitched.offset_for_time(TOPIC, partition, t).await.unwrap(),
                segments.offset_for_time(TOPIC, partition, t).await.unwrap(),
            );
        }
        assert_eq!(
            stitched.end_offset(TOPIC, partition).await.unwrap(),
            segments.end_offset(TOPIC, partition).await.unwrap()
        );
    }
    assert!(
        stitched.append(TOPIC, Vec::new()).await.is_err(),
        "read-only"
    );
}
