//! Planning refuses what it cannot replay exactly, before anything is
//! written: an empty range, a range the log's retention already deleted
//! from, a range without events.

use std::time::Duration;

use bytes::Bytes;
use tidemark_log::segment::{SegmentLog, SegmentLogConfig};
use tidemark_log::Record;
use tidemark_model::EventTime;
use tidemark_replay::{plan, Reach, ReplayError};

const TOPIC: &str = "user-events";
const DAY: i64 = 86_400_000;

#[tokio::test]
async fn refuses_ranges_it_cannot_replay() {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(
        dir.path(),
        SegmentLogConfig {
            segment_bytes: 512,
            retention_age: Some(Duration::from_secs(7 * 86_400)),
            ..SegmentLogConfig::default()
        },
    )
    .unwrap();
    log.ensure_topic_blocking(TOPIC, 1).unwrap();
    let now = EventTime::now().millis();
    // One event per hour over the last 10 days; retention keeps 7.
    for h in (0..240).rev() {
        let ts = now - h * 3_600_000;
        let record = Record {
            key: Bytes::from("u1"),
            value: Bytes::from(vec![b'x'; 300]),
            timestamp: EventTime(ts),
        };
        log.append_blocking(TOPIC, &[record]).unwrap();
    }
    assert!(log.enforce_retention(EventTime(now)).unwrap() > 0);
    let topics = vec![TOPIC.to_string()];
    let reach = Reach {
        lookback: Duration::from_secs(600),
        lookahead: Duration::from_secs(600),
    };
    let at = |days_ago: i64| EventTime(now - days_ago * DAY);

    let ok = plan(&log, &topics, at(2), at(1), reach).await.unwrap();
    // Hourly events from 2 days ago to 1 day ago, both ends included.
    assert_eq!(ok.records(), 25);

    let err = plan(&log, &topics, at(1), at(2), reach).await.unwrap_err();
    assert!(matches!(err, ReplayError::EmptyRange { .. }), "{err}");

    let err = plan(&log, &topics, at(9), at(8), reach).await.unwrap_err();
    assert!(matches!(err, ReplayError::OutsideRetention { .. }), "{err}");
    assert!(
        err.to_string().contains("outside the log's retention"),
        "{err}"
    );

    let err = plan(&log, &topics, at(-2), at(-3), reach)
        .await
        .unwrap_err();
    assert!(matches!(err, ReplayError::NothingInRange { .. }), "{err}");
}
