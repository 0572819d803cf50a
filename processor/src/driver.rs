//! The one async driver: log in, points and live updates out.
//!
//! [`Engine`] holds the synchronous core (dedup, lateness, watermarks,
//! pipelines) so tests and replay drive it without a runtime; [`run_driver`]
//! wraps it in the read / send / checkpoint loop.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntGaugeVec, Opts, Registry};
use tidemark_log::{Log, LogError, Record};
use tidemark_model::topic::{default_partitions, DEAD_LETTER};
use tidemark_model::wire::{self, WireError};
use tidemark_model::{Event, EventTime, Point, Tier, Update, Watermark};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{self, Checkpoint};
use crate::dedup::{PartitionDedup, DEFAULT_HORIZON};
use crate::traffic::DEFAULT_ALLOWED_LATENESS;
use crate::watermark::{PartitionWatermarks, DEFAULT_IDLE_TIMEOUT, DEFAULT_OUT_OF_ORDERNESS};
use crate::{Pipeline, ProcessorError};

/// A boxed, sendable future (what [`PointSink`] methods return).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where final and corrected points go (the store writer).
pub trait PointSink: Send + Sync {
    /// Hands points over; may wait when the store is slow (backpressure).
    fn send(&self, points: Vec<Point>) -> BoxFuture<'_, Result<(), ProcessorError>>;
    /// Returns once every point sent before is durably stored.
    fn flush(&self) -> BoxFuture<'_, Result<(), ProcessorError>>;
}

/// How records are turned into events and too-late events into dead letters.
#[derive(Debug, Clone, Copy)]
pub struct EventCodec {
    pub decode: fn(&[u8]) -> Result<Event, WireError>,
    pub to_json: fn(&Event) -> String,
}

impl Default for EventCodec {
    fn default() -> Self {
        EventCodec {
            decode: wire::decode,
            to_json: Event::to_json,
        }
    }
}

/// Settings of the driver.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub topics: Vec<String>,
    pub out_of_orderness: Duration,
    /// Must match the lateness the pipelines were built with.
    pub allowed_lateness: Duration,
    pub idle_timeout: Duration,
    /// Duplicates are detected within this event-time horizon (at least the lateness).
    pub dedup_horizon: Duration,
    pub early_interval: Duration,
    pub checkpoint_interval: Duration,
    /// `None`: no checkpoints, always start at the log's start offsets.
    pub checkpoint_dir: Option<PathBuf>,
    /// Records read from one partition at a time.
    pub max_batch: usize,
    /// Pause when no partition had new records.
    pub idle_sleep: Duration,
    pub codec: EventCodec,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            topics: tidemark_model::topic::INPUT_TOPICS
                .iter()
                .map(|t| t.to_string())
                .collect(),
            out_of_orderness: DEFAULT_OUT_OF_ORDERNESS,
            allowed_lateness: DEFAULT_ALLOWED_LATENESS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            dedup_horizon: DEFAULT_HORIZON,
            early_interval: Duration::from_millis(500),
            checkpoint_interval: Duration::from_secs(2),
            checkpoint_dir: None,
            max_batch: 2000,
            idle_sleep: Duration::from_millis(25),
            codec: EventCodec::default(),
        }
    }
}

/// The processor's metrics; clones share the same series.
#[derive(Debug, Clone)]
pub struct ProcessorMetrics {
    pub events_processed: IntCounter,
    pub late_events: IntCounter,
    pub duplicates: IntCounter,
    pub decode_errors: IntCounter,
    pub watermark_delay_seconds: Gauge,
    pub lag_records: IntGaugeVec,
    pub windows_fired: IntCounter,
    pub checkpoint_duration_seconds: Histogram,
}

impl ProcessorMetrics {
    /// Creates the metrics and registers them in `registry` (a metric that
    /// cannot be registered, e.g. twice, still counts but is not exported).
    pub fn new(registry: &Registry) -> Self {
        fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
            let c = IntCounter::new(name, help).unwrap_or_else(|_| unreachable_metric());
            register(registry, Box::new(c.clone()));
            c
        }
        let watermark_delay_seconds = Gauge::new(
            "tidemark_processor_watermark_delay_seconds",
            "Wall-clock time minus the combined watermark",
        )
        .unwrap_or_else(|_| unreachable_metric());
        register(registry, Box::new(watermark_delay_seconds.clone()));
        let lag_records = IntGaugeVec::new(
            Opts::new(
                "tidemark_processor_lag_records",
                "Records behind the end of the log, per topic",
            ),
            &["topic"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        register(registry, Box::new(lag_records.clone()));
        let checkpoint_duration_seconds = Histogram::with_opts(HistogramOpts::new(
            "tidemark_processor_checkpoint_duration_seconds",
            "Time to flush the sink and write a checkpoint",
        ))
        .unwrap_or_else(|_| unreachable_metric());
        register(registry, Box::new(checkpoint_duration_seconds.clone()));
        ProcessorMetrics {
            events_processed: counter(
                registry,
                "tidemark_processor_events_total",
                "Events fed to the pipelines",
            ),
            late_events: counter(
                registry,
                "tidemark_processor_late_events_total",
                "Events too late for their window, sent to the dead-letter topic",
            ),
            duplicates: counter(
                registry,
                "tidemark_processor_duplicate_events_total",
                "Duplicate events dropped",
            ),
            decode_errors: counter(
                registry,
                "tidemark_processor_decode_errors_total",
                "Log records that could not be decoded",
            ),
            watermark_delay_seconds,
            lag_records,
            windows_fired: counter(
                registry,
                "tidemark_processor_windows_fired_total",
                "Window results emitted (final or corrected)",
            ),
            checkpoint_duration_seconds,
        }
    }
}

fn unreachable_metric() -> ! {
    // Names and help texts above are constant and valid.
    panic!("invalid constant metric definition")
}

fn register(registry: &Registry, c: Box<dyn prometheus::core::Collector>) {
    if let Err(e) = registry.register(c) {
        tracing::warn!(error = %e, "Could not register a processor metric");
    }
}

/// What happened to one event offered to the [`Engine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Duplicate,
    TooLate,
}

/// The synchronous core: dedup, lateness, watermarks and pipelines.
#[derive(Debug)]
pub struct Engine {
    wms: PartitionWatermarks,
    dedup: Vec<PartitionDedup>,
    pipelines: Vec<Box<dyn Pipeline>>,
    allowed_lateness: Duration,
    dedup_horizon: Duration,
    last_combined: Watermark,
    newest_received_at: EventTime,
}

impl std::fmt::Debug for dyn Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pipeline({})", self.name())
    }
}

impl Engine {
    pub fn new(config: &DriverConfig, pipelines: Vec<Box<dyn Pipeline>>) -> Self {
        Engine {
            wms: PartitionWatermarks::new(config.out_of_orderness, config.idle_timeout),
            dedup: Vec::new(),
            pipelines,
            allowed_lateness: config.allowed_lateness,
            dedup_horizon: config.dedup_horizon.max(config.allowed_lateness),
            last_combined: EventTime::MIN,
            newest_received_at: EventTime::MIN,
        }
    }

    /// Adds a partition and returns its slot.
    pub fn register(&mut self, topic: &str, partition: u32) -> usize {
        let slot = self.wms.register(topic, partition);
        if self.dedup.len() <= slot {
            self.dedup.resize_with(slot + 1, PartitionDedup::new);
        }
        slot
    }

    /// The watermarks (for inspection and lag reporting).
    pub fn watermarks(&self) -> &PartitionWatermarks {
        &self.wms
    }

    /// The last combined watermark passed to the pipelines.
    pub fn combined_watermark(&self) -> Watermark {
        self.last_combined
    }

    /// The newest receipt time among accepted events.
    pub fn newest_received_at(&self) -> EventTime {
        self.newest_received_at
    }

    /// Offers one event read from the partition in `slot`. An event is too
    /// late when it is older than its partition's watermark minus the allowed
    /// lateness (or than the combined watermark minus it, which only differs
    /// after a partition came back from idle and whose windows are gone).
    #[inline]
    pub fn process(&mut self, slot: usize, ev: &Event, out: &mut Vec<Point>) -> Outcome {
        let Some(dedup) = self.dedup.get_mut(slot) else {
            return Outcome::TooLate;
        };
        if !dedup.check_and_insert(&ev.event_id, ev.timestamp) {
            return Outcome::Duplicate;
        }
        let wm = self.wms.partition_watermark(slot).max(self.last_combined);
        if ev.timestamp < wm.minus(self.allowed_lateness) {
            return Outcome::TooLate;
        }
        for p in &mut self.pipelines {
            p.on_event(ev, out);
        }
        self.wms.observe(slot, ev.timestamp);
        self.newest_received_at = self.newest_received_at.max(ev.received_at);
        Outcome::Accepted
    }

    /// Records read progress of a partition (see [`PartitionWatermarks::set_progress`]).
    pub fn set_progress(&mut self, slot: usize, caught_up: bool, now: Instant) {
        self.wms.set_progress(slot, caught_up, now);
    }

    /// Computes the combined watermark at processing time `now`, fires the
    /// pipelines' windows up to it and evicts old dedup entries.
    pub fn advance(&mut self, now: Instant, out: &mut Vec<Point>) -> Watermark {
        let wm = self.wms.combined(now).max(self.last_combined);
        self.last_combined = wm;
        for p in &mut self.pipelines {
            p.on_watermark(wm, out);
        }
        for (slot, d) in self.dedup.iter_mut().enumerate() {
            d.evict(self.wms.partition_watermark(slot), self.dedup_horizon);
        }
        wm
    }

    /// Fires everything: the end of a bounded input (replay, tests).
    pub fn finish(&mut self, out: &mut Vec<Point>) {
        for p in &mut self.pipelines {
            p.on_watermark(EventTime::MAX, out);
        }
    }

    /// Early results of all pipelines.
    pub fn early(&self, out: &mut Vec<Point>) {
        for p in &self.pipelines {
            p.early(out);
        }
    }

    /// The state to checkpoint, with the given next offsets.
    pub fn checkpoint(&self, offsets: BTreeMap<(String, u32), u64>) -> Checkpoint {
        let dedup = (0..self.wms.len())
            .filter_map(|slot| Some((self.wms.key(slot)?.clone(), self.dedup.get(slot)?.clone())))
            .collect();
        Checkpoint {
            offsets,
            watermarks: self.wms.state(),
            dedup,
            pipelines: self
                .pipelines
                .iter()
                .map(|p| (p.name().to_string(), p.snapshot()))
                .collect(),
        }
    }

    /// Restores state from a checkpoint into registered partitions and the pipelines.
    pub fn restore(&mut self, cp: &Checkpoint) -> Result<(), ProcessorError> {
        self.wms.restore(&cp.watermarks);
        for slot in 0..self.wms.len() {
            if let (Some(key), Some(d)) = (self.wms.key(slot), self.dedup.get_mut(slot)) {
                *d = cp.dedup.get(key).cloned().unwrap_or_default();
            }
        }
        for p in &mut self.pipelines {
            match cp.pipelines.iter().find(|(n, _)| n == p.name()) {
                Some((_, state)) => p.restore(state)?,
                None => tracing::warn!(
                    pipeline = p.name(),
                    "Checkpoint has no state for pipeline; starting empty"
                ),
            }
        }
        Ok(())
    }
}

/// Groups points into one update per window start.
fn updates_of(points: &[Point], is_final: bool, newest_received_at: EventTime) -> Vec<Update> {
    let mut by_start: BTreeMap<EventTime, Vec<Point>> = BTreeMap::new();
    for p in points {
        by_start.entry(p.time).or_default().push(p.clone());
    }
    by_start
        .into_iter()
        .map(|(window_start, points)| Update {
            window_start,
            is_final,
            newest_received_at,
            points,
        })
        .collect()
}

fn windows_in(points: &[Point]) -> u64 {
    let mut w: Vec<(Tier, EventTime)> = points.iter().map(|p| (p.tier, p.time)).collect();
    w.sort_unstable();
    w.dedup();
    w.len() as u64
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

fn next_backoff(b: Duration) -> Duration {
    (b * 2).min(MAX_BACKOFF)
}

/// Sleeps for `d`; `false` if cancelled first.
async fn pause(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Sends points, retrying transient failures; `Ok(false)` when cancelled first.
async fn send_points(
    sink: &dyn PointSink,
    points: &[Point],
    cancel: &CancellationToken,
) -> Result<bool, ProcessorError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match sink.send(points.to_vec()).await {
            Ok(()) => return Ok(true),
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "Sending points failed; retrying");
                if !pause(backoff, cancel).await {
                    return Ok(false);
                }
                backoff = next_backoff(backoff);
            }
            Err(e) => return Err(e),
        }
    }
}

struct Part {
    topic: String,
    partition: u32,
    slot: usize,
    offset: u64,
}

/// Runs the processor until `cancel`: reads `config.topics`, feeds the
/// pipelines, sends final and corrected points to `sink`, broadcasts early and
/// final results on `updates`, and checkpoints (sink flushed first) every
/// `checkpoint_interval` and on cancel.
pub async fn run_driver(
    config: DriverConfig,
    log: Arc<dyn Log>,
    pipelines: Vec<Box<dyn Pipeline>>,
    sink: Arc<dyn PointSink>,
    updates: broadcast::Sender<Update>,
    metrics: ProcessorMetrics,
    cancel: CancellationToken,
) -> Result<(), ProcessorError> {
    let mut engine = Engine::new(&config, pipelines);
    let mut parts = Vec::new();
    for topic in &config.topics {
        let n = log.partition_count(topic).await?;
        for partition in 0..n {
            let slot = engine.register(topic, partition);
            let offset = log.start_offset(topic, partition).await?;
            parts.push(Part {
                topic: topic.clone(),
                partition,
                slot,
                offset,
            });
        }
    }
    if let Some(dir) = &config.checkpoint_dir {
        if let Some(cp) = checkpoint::load(dir)? {
            engine.restore(&cp)?;
            for p in &mut parts {
                if let Some(&o) = cp.offsets.get(&(p.topic.clone(), p.partition)) {
                    p.offset = o.max(p.offset);
                }
            }
            tracing::info!(
                partitions = cp.offsets.len(),
                "Restored processor checkpoint"
            );
        }
    }
    if let Err(e) = log
        .ensure_topic(DEAD_LETTER, default_partitions(DEAD_LETTER))
        .await
    {
        tracing::warn!(error = %e, "Could not create the dead-letter topic");
    }

    let codec = config.codec;
    let mut out: Vec<Point> = Vec::new();
    let mut dead: Vec<Record> = Vec::new();
    let mut next_early = tokio::time::Instant::now() + config.early_interval;
    let mut next_checkpoint = tokio::time::Instant::now() + config.checkpoint_interval;
    let mut read_backoff = Duration::from_millis(100);

    loop {
        if cancel.is_cancelled() {
            break;
        }
        let mut any = false;
        let (mut accepted, mut late, mut dups, mut bad) = (0u64, 0u64, 0u64, 0u64);
        for p in &mut parts {
            let recs = match log
                .read(&p.topic, p.partition, p.offset, config.max_batch)
                .await
            {
                Ok(r) => {
                    read_backoff = Duration::from_millis(100);
                    r
                }
                Err(LogError::OffsetOutOfRange { earliest, .. }) => {
                    tracing::warn!(topic = %p.topic, partition = p.partition, from = p.offset, to = earliest,
                        "Offset no longer retained; skipping ahead");
                    p.offset = earliest;
                    continue;
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, topic = %p.topic, partition = p.partition, "Log read failed; retrying");
                    if !pause(read_backoff, &cancel).await {
                        break;
                    }
                    read_backoff = next_backoff(read_backoff);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let now = Instant::now();
            let Some(last) = recs.last() else {
                engine.set_progress(p.slot, true, now);
                continue;
            };
            any = true;
            p.offset = last.offset + 1;
            engine.set_progress(p.slot, false, now);
            for rec in &recs {
                let ev = match (codec.decode)(&rec.value) {
                    Ok(ev) => ev,
                    Err(e) => {
                        bad += 1;
                        tracing::warn!(error = %e, topic = %p.topic, partition = p.partition, offset = rec.offset,
                            "Skipping undecodable record");
                        continue;
                    }
                };
                match engine.process(p.slot, &ev, &mut out) {
                    Outcome::Accepted => accepted += 1,
                    Outcome::Duplicate => dups += 1,
                    Outcome::TooLate => {
                        late += 1;
                        let json = format!(
                            r#"{{"reason":"too_late","event":{}}}"#,
                            (codec.to_json)(&ev)
                        );
                        dead.push(Record {
                            key: Bytes::copy_from_slice(ev.user_id.as_bytes()),
                            value: Bytes::from(json),
                            timestamp: ev.timestamp,
                        });
                    }
                }
            }
        }
        metrics.events_processed.inc_by(accepted);
        metrics.late_events.inc_by(late);
        metrics.duplicates.inc_by(dups);
        metrics.decode_errors.inc_by(bad);

        let wm = engine.advance(Instant::now(), &mut out);
        if wm != EventTime::MIN {
            let delay = (EventTime::now().0.saturating_sub(wm.0)) as f64 / 1000.0;
            metrics.watermark_delay_seconds.set(delay);
        }
        if !out.is_empty() {
            if !send_points(sink.as_ref(), &out, &cancel).await? {
                // Cancelled while the store was failing: do not checkpoint past unsent points.
                return Ok(());
            }
            metrics.windows_fired.inc_by(windows_in(&out));
            for u in updates_of(&out, true, engine.newest_received_at()) {
                // No subscribers is fine.
                let _ = updates.send(u);
            }
            out.clear();
        }
        if !dead.is_empty() {
            append_dead_letters(log.as_ref(), std::mem::take(&mut dead), &cancel).await;
        }

        let now = tokio::time::Instant::now();
        if now >= next_early {
            next_early = now + config.early_interval;
            let mut early = Vec::new();
            engine.early(&mut early);
            for u in updates_of(&early, false, engine.newest_received_at()) {
                let _ = updates.send(u);
            }
            report_lag(log.as_ref(), &parts, &metrics).await;
        }
        if now >= next_checkpoint {
            next_checkpoint = now + config.checkpoint_interval;
            write_checkpoint(
                &config,
                snapshot(&config, &engine, &parts),
                sink.as_ref(),
                &metrics,
            )
            .await?;
        }
        if !any && !pause(config.idle_sleep, &cancel).await {
            break;
        }
    }
    write_checkpoint(
        &config,
        snapshot(&config, &engine, &parts),
        sink.as_ref(),
        &metrics,
    )
    .await
}

/// The checkpoint of the current state. Taken before the sink is flushed:
/// the state cannot change while the driver awaits the flush.
fn snapshot(config: &DriverConfig, engine: &Engine, parts: &[Part]) -> Option<Checkpoint> {
    config.checkpoint_dir.as_ref()?;
    let offsets = parts
        .iter()
        .map(|p| ((p.topic.clone(), p.partition), p.offset))
        .collect();
    Some(engine.checkpoint(offsets))
}

async fn append_dead_letters(log: &dyn Log, records: Vec<Record>, cancel: &CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match log.append(DEAD_LETTER, records.clone()).await {
            Ok(_) => return,
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "Appending dead letters failed; retrying");
                if !pause(backoff, cancel).await {
                    return;
                }
                backoff = next_backoff(backoff);
            }
            Err(e) => {
                tracing::warn!(error = %e, dropped = records.len(), "Could not append dead letters");
                return;
            }
        }
    }
}

async fn report_lag(log: &dyn Log, parts: &[Part], metrics: &ProcessorMetrics) {
    let mut lag: BTreeMap<&str, i64> = BTreeMap::new();
    for p in parts {
        if let Ok(end) = log.end_offset(&p.topic, p.partition).await {
            *lag.entry(&p.topic).or_insert(0) += end.saturating_sub(p.offset) as i64;
        }
    }
    for (topic, n) in lag {
        metrics.lag_records.with_label_values(&[topic]).set(n);
    }
}

/// Flushes the sink, then saves the checkpoint. A failing sink skips the
/// checkpoint (it is retried at the next interval); a failing save is an error
/// only when it can never succeed.
async fn write_checkpoint(
    config: &DriverConfig,
    cp: Option<Checkpoint>,
    sink: &dyn PointSink,
    metrics: &ProcessorMetrics,
) -> Result<(), ProcessorError> {
    let (Some(dir), Some(cp)) = (config.checkpoint_dir.clone(), cp) else {
        if let Err(e) = sink.flush().await {
            tracing::warn!(error = %e, "Flushing points failed");
        }
        return Ok(());
    };
    let timer = metrics.checkpoint_duration_seconds.start_timer();
    if let Err(e) = sink.flush().await {
        tracing::warn!(error = %e, "Flushing points failed; not checkpointing");
        timer.stop_and_discard();
        return if e.is_retryable() { Ok(()) } else { Err(e) };
    }
    let saved = tokio::task::spawn_blocking(move || checkpoint::save(&dir, &cp))
        .await
        .map_err(|e| ProcessorError::Io(std::io::Error::other(e)))
        .and_then(|r| r);
    match saved {
        Ok(()) => {
            timer.observe_duration();
            Ok(())
        }
        Err(e) if e.is_retryable() => {
            tracing::warn!(error = %e, "Saving checkpoint failed");
            timer.stop_and_discard();
            Ok(())
        }
        Err(e) => Err(e),
    }
}
