//! A pipeline defined here, and nowhere in the crates, runs live, in replay
//! and through `--verify` once it is registered: nothing else names it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tidemark_log::segment::{SegmentLog, SegmentLogConfig};
use tidemark_log::Record;
use tidemark_model::topic::INPUT_TOPICS;
use tidemark_model::{
    wire, Country, Event, EventTime, EventType, FieldValue, Point, Tier, Watermark,
};
use tidemark_processor::driver::{run_driver, BoxFuture, DriverConfig, PointSink};
use tidemark_processor::partial::row_key;
use tidemark_processor::window::{millis, Slot, Tumbling};
use tidemark_processor::{
    Finisher, Measurement, Partial, Pipeline, PipelineSpec, ProcessorError, ProcessorMetrics,
    Registry, StateReach, WindowId,
};
use tidemark_replay::{run_replay, ReplayOptions, Source, StoreTarget};
use tidemark_tsdb_writer::writer::{BatchingWriter, WriterConfig, WriterHandle, WriterMetrics};
use tidemark_tsdb_writer::Store;
use tokio_util::sync::CancellationToken;

const MINUTE: i64 = 60_000;
/// A minute boundary well in the past.
const BASE: i64 = 1_780_000_020_000;
const MINUTES: i64 = 8;

/// Likes per minute and country, each counted `weight` times.
#[derive(Debug)]
struct LikesSpec {
    weight: i64,
}

impl PipelineSpec for LikesSpec {
    fn name(&self) -> &'static str {
        "likes"
    }

    fn measurements(&self) -> &'static [Measurement] {
        &[Measurement {
            name: "likes",
            tiers: &[Tier::Rt],
        }]
    }

    fn reach(&self) -> StateReach {
        StateReach::default()
    }

    fn stage1(&self, allowed_lateness: Duration) -> Box<dyn Pipeline> {
        Box::new(Likes {
            weight: self.weight,
            lateness_ms: millis(allowed_lateness),
            minutes: Tumbling::new(0, Tier::Rt),
        })
    }

    fn stage2(&self, _allowed_lateness: Duration) -> Box<dyn Finisher> {
        Box::new(LikesFinisher)
    }
}

/// Likes per country, in one minute.
type ByCountry = BTreeMap<String, i64>;

struct Likes {
    weight: i64,
    lateness_ms: i64,
    minutes: Tumbling<ByCountry>,
}

fn partial(id: WindowId, by_country: &ByCountry) -> Partial {
    let rows = by_country
        .iter()
        .map(|(c, &n)| (row_key([c.as_str()]), [n].into_iter().collect()))
        .collect();
    Partial::new(id, rows, None)
}

impl Pipeline for Likes {
    fn name(&self) -> &'static str {
        "likes"
    }

    fn on_event(&mut self, ev: &Event) {
        if ev.event_type != EventType::Like {
            return;
        }
        // The worker drops events older than the lateness allows.
        if let Some(by_country) = self.minutes.change_at(ev.timestamp.0, i64::MIN) {
            *by_country
                .entry(ev.country.as_str().to_string())
                .or_default() += self.weight;
        }
    }

    fn on_watermark(&mut self, wm: Watermark, out: &mut Vec<Partial>) {
        let keep = self.lateness_ms;
        self.minutes
            .fire(wm.0, keep, |id, w| out.push(partial(id, w)));
    }

    fn early(&self, out: &mut Vec<Partial>) {
        self.minutes.early(|id, w| out.push(partial(id, w)));
    }

    fn snapshot(&self) -> Result<Vec<u8>, ProcessorError> {
        let state: Vec<(i64, &Slot<ByCountry>)> = self.minutes.iter().collect();
        serde_json::to_vec(&state).map_err(|e| ProcessorError::Snapshot(e.to_string()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ProcessorError> {
        let state: Vec<(i64, Slot<ByCountry>)> = serde_json::from_slice(state)
            .map_err(|e| ProcessorError::CorruptCheckpoint(e.to_string()))?;
        self.minutes = Tumbling::new(0, Tier::Rt);
        for (start, slot) in state {
            self.minutes.insert(start, slot);
        }
        Ok(())
    }
}

struct LikesFinisher;

impl Finisher for LikesFinisher {
    fn finish(&self, merged: &Partial, out: &mut Vec<Point>) {
        for (key, values) in &merged.rows {
            out.push(Point::new(
                "likes",
                Tier::Rt,
                EventTime(merged.window.start),
                vec![("country".into(), key[0].to_string())],
                vec![("likes".into(), FieldValue::Int(values[0]))],
            ));
        }
    }
}

/// The store writer as the live sink.
struct StoreSink(WriterHandle);

impl PointSink for StoreSink {
    fn send(&self, points: Vec<Point>) -> BoxFuture<'_, Result<(), ProcessorError>> {
        Box::pin(async move { Ok(self.0.send(points).await?) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ProcessorError>> {
        Box::pin(async move { Ok(self.0.flush().await?) })
    }
}

/// Every 5 s for `MINUTES` minutes: a like or a view, from one of three
/// countries. Returns the expected likes per (minute start, country).
fn fill(log: &SegmentLog) -> BTreeMap<(i64, String), i64> {
    let mut expected = BTreeMap::new();
    let countries = ["DE", "FR", "US"];
    let mut buf = Vec::new();
    let records: Vec<Record> = (0..MINUTES * 12)
        .map(|i| {
            let ts = BASE + i * 5_000;
            let like = i % 4 != 3;
            let country = countries[(i % 3) as usize];
            let ev = Event {
                event_id: format!("e{i}"),
                event_type: if like {
                    EventType::Like
                } else {
                    EventType::View
                },
                user_id: format!("u{}", i % 7),
                timestamp: EventTime(ts),
                received_at: EventTime(ts),
                country: Country::parse(country).unwrap(),
                ..Event::default()
            };
            if like {
                let minute = ts - ts.rem_euclid(MINUTE);
                *expected.entry((minute, country.to_string())).or_default() += 1;
            }
            buf.clear();
            wire::encode(&ev, &mut buf);
            Record {
                key: Bytes::from(ev.user_id.clone()),
                value: Bytes::copy_from_slice(&buf),
                timestamp: EventTime(ts),
            }
        })
        .collect();
    log.append_blocking(INPUT_TOPICS[0], &records).unwrap();
    expected
}

async fn likes(store: &dyn Store, from: i64, to: i64) -> BTreeMap<(i64, String), i64> {
    let points = store
        .points(Tier::Rt, "likes", EventTime(from), EventTime(to))
        .await
        .unwrap();
    points
        .iter()
        .map(|p| {
            let Some(FieldValue::Int(n)) = p.field("likes") else {
                panic!("likes is an integer: {p:?}");
            };
            ((p.time.0, p.tag("country").unwrap().to_string()), n)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_pipeline_runs_live_in_replay_and_under_verify() {
    let dir = tempfile::tempdir().unwrap();
    let log =
        Arc::new(SegmentLog::open(dir.path().join("log"), SegmentLogConfig::default()).unwrap());
    for topic in INPUT_TOPICS {
        log.ensure_topic_blocking(topic, 2).unwrap();
    }
    let expected = fill(&log);
    let registry = Registry::default().with(Arc::new(LikesSpec { weight: 1 }));
    let lateness = DriverConfig::default().allowed_lateness;
    let pipelines = registry.select(&["traffic", "likes"], lateness).unwrap();
    assert_eq!(pipelines.names(), ["traffic", "likes"]);

    // Live: the last minute stays open (the watermark trails the newest event).
    let target = StoreTarget::Sqlite {
        data_dir: dir.path().join("data"),
    };
    let live = target.create("tidemark").await.unwrap();
    let metrics = WriterMetrics::new(&prometheus::Registry::new()).unwrap();
    let (writer, writer_task) =
        BatchingWriter::spawn(live.clone(), WriterConfig::default(), metrics);
    let (updates, _) = tokio::sync::broadcast::channel(64);
    let cancel = CancellationToken::new();
    let config = DriverConfig {
        idle_timeout: Duration::from_millis(50),
        idle_sleep: Duration::from_millis(5),
        ..DriverConfig::default()
    };
    let driver = tokio::spawn(run_driver(
        config,
        log.clone(),
        pipelines.clone(),
        Arc::new(StoreSink(writer.clone())),
        updates,
        ProcessorMetrics::new(&prometheus::Registry::new()),
        cancel.clone(),
    ));
    let (from, to) = (BASE, BASE + (MINUTES - 1) * MINUTE);
    let closed: BTreeMap<_, _> = expected
        .iter()
        .filter(|((minute, _), _)| *minute < to)
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while likes(live.as_ref(), from, to).await != closed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "live likes: {:?}",
            likes(live.as_ref(), from, to).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    driver.await.unwrap().unwrap();
    drop(writer);
    writer_task.await.unwrap();

    // Replay of the closed minutes, compared with live.
    let options = |pipelines| ReplayOptions {
        from: EventTime(from),
        to: EventTime(to),
        pipelines,
        threads: 2,
        store: target.clone(),
        live_database: "tidemark".into(),
        into: None,
        in_place: false,
        verify: true,
        lookback: None,
        progress: false,
        started_at: EventTime::now(),
    };
    let report = run_replay(options(pipelines), Source::Segment(log.clone()))
        .await
        .unwrap();
    assert_eq!(report.differences, Some(Vec::new()));
    let replayed = target.open(&report.database).unwrap();
    assert_eq!(likes(replayed.as_ref(), from, to).await, closed);
    assert!(
        report.reference_points.unwrap() > closed.len(),
        "traffic too"
    );

    // A changed registration is what `--verify` reports, point by point.
    let doubled = Registry::default()
        .with(Arc::new(LikesSpec { weight: 2 }))
        .select(&["likes"], lateness)
        .unwrap();
    let report = run_replay(
        ReplayOptions {
            into: Some("doubled".into()),
            ..options(doubled)
        },
        Source::Segment(log),
    )
    .await
    .unwrap();
    let differences = report.differences.unwrap();
    assert_eq!(differences.len(), closed.len());
    assert!(
        differences.iter().all(|d| d.kind() == "changed"),
        "{differences:?}"
    );
}
