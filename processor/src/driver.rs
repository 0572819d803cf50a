//! The one async driver: log in, points and live updates out.
//!
//! [`run_driver`] runs one thread per stage-1 [`Worker`] (reading its
//! partitions) and the [`Combiner`] on the calling task, joined by a bounded
//! channel, and owns everything with I/O: the store sink, live updates, dead
//! letters and checkpoints. The stages themselves stay synchronous and pure.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
};
use tidemark_log::{Log, Record};
use tidemark_model::topic::{default_partitions, DEAD_LETTER};
use tidemark_model::wire::{self, WireError};
use tidemark_model::{DeadLetter, Event, EventTime, KeyRing, Point, Tier, Update, Watermark};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::alerts::AlertRules;
use crate::checkpoint::{self, Checkpoint, NextOffsets};
use crate::combiner::Combiner;
use crate::dedup::DEFAULT_HORIZON;
use crate::error::ProcessorError;
use crate::partial::Partial;
use crate::read_loop::{self, LogSource, Mode, Round, Rounds};
use crate::registry::PipelineSet;
use crate::runner::{parts_of, resume, usable_workers, Counts, ProcessorCheckpoint};

pub(crate) use crate::read_loop::Part;
use crate::traffic::DEFAULT_ALLOWED_LATENESS;
use crate::watermark::{DEFAULT_IDLE_TIMEOUT, DEFAULT_OUT_OF_ORDERNESS};
use crate::worker::{Worker, WorkerConfig};

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
    /// Decodes a record into an event whose buffers it may reuse.
    pub decode: fn(&[u8], &mut Event) -> Result<(), WireError>,
    pub to_json: fn(&Event) -> String,
}

impl Default for EventCodec {
    fn default() -> Self {
        EventCodec {
            decode: wire::decode_into,
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
    /// Seals checkpoints with AES-256-GCM and opens sealed ones
    /// (`--encryption-key-file`); `None` writes them in the clear.
    pub checkpoint_keys: Option<Arc<KeyRing>>,
    /// Records read from one partition at a time.
    pub max_batch: usize,
    /// Pause when no partition had new records.
    pub idle_sleep: Duration,
    pub codec: EventCodec,
    /// Stage-1 workers (partition `p` goes to worker `p % workers`).
    pub workers: usize,
    /// Changes of the business alert rules (the rules API's): the combiner
    /// evaluates the new rules from the next closed window on.
    pub alert_rules: Option<tokio::sync::watch::Receiver<Arc<AlertRules>>>,
}

impl DriverConfig {
    /// What the stage-1 core needs of these settings.
    pub fn worker(&self) -> WorkerConfig {
        WorkerConfig {
            out_of_orderness: self.out_of_orderness,
            allowed_lateness: self.allowed_lateness,
            idle_timeout: self.idle_timeout,
            dedup_horizon: self.dedup_horizon,
        }
    }
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
            checkpoint_keys: None,
            max_batch: 2000,
            idle_sleep: Duration::from_millis(25),
            codec: EventCodec::default(),
            workers: 2,
            alert_rules: None,
        }
    }
}

/// The next change of the rules; never, without a source of changes.
async fn rules_changed(
    rules: &mut Option<tokio::sync::watch::Receiver<Arc<AlertRules>>>,
) -> Arc<AlertRules> {
    if let Some(rx) = rules {
        if rx.changed().await.is_ok() {
            return rx.borrow_and_update().clone();
        }
    }
    // No source, or it is gone: nothing will change.
    *rules = None;
    std::future::pending().await
}

/// The processor's metrics; clones share the same series.
#[derive(Debug, Clone)]
pub struct ProcessorMetrics {
    pub events_processed: IntCounter,
    pub late_events: IntCounter,
    pub duplicates: IntCounter,
    pub decode_errors: IntCounter,
    pub watermark_delay_seconds: Gauge,
    /// The combined watermark as a Unix time: an alert sees it stand still
    /// even when no report comes to refresh the delay.
    pub watermark_timestamp_seconds: Gauge,
    /// The newest event time this instance's workers read, as a Unix time;
    /// ingest's counterpart minus this is the lag in event time.
    pub newest_event_timestamp_seconds: Gauge,
    /// When the last checkpoint was saved (the start, before the first).
    pub checkpoint_timestamp_seconds: Gauge,
    pub lag_records: IntGaugeVec,
    pub windows_fired: IntCounter,
    pub checkpoint_duration_seconds: Histogram,
    /// Shard reports the combiner read (sharded processing only).
    pub shard_reports: IntCounter,
    /// The state's size in the newest checkpoint saved (before compression).
    pub state_bytes: IntGauge,
    /// Series firing now, per business alert rule.
    pub alerts_firing: IntGaugeVec,
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
        fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
            let g = Gauge::new(name, help).unwrap_or_else(|_| unreachable_metric());
            register(registry, Box::new(g.clone()));
            g
        }
        let watermark_delay_seconds = gauge(
            registry,
            "tidemark_processor_watermark_delay_seconds",
            "Wall-clock time minus the combined watermark",
        );
        let checkpoint_timestamp_seconds = gauge(
            registry,
            "tidemark_processor_checkpoint_timestamp_seconds",
            "Unix time of the last checkpoint saved (of the start before the first)",
        );
        checkpoint_timestamp_seconds.set(unix_seconds_now());
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
            watermark_timestamp_seconds: gauge(
                registry,
                "tidemark_processor_watermark_timestamp_seconds",
                "The combined watermark, as a Unix time",
            ),
            newest_event_timestamp_seconds: gauge(
                registry,
                "tidemark_processor_newest_event_timestamp_seconds",
                "The newest event time read by this instance, as a Unix time",
            ),
            checkpoint_timestamp_seconds,
            lag_records,
            windows_fired: counter(
                registry,
                "tidemark_processor_windows_fired_total",
                "Window results emitted (final or corrected)",
            ),
            checkpoint_duration_seconds,
            shard_reports: counter(
                registry,
                "tidemark_processor_shard_reports_total",
                "Records of the partials topic the combiner read",
            ),
            state_bytes: {
                let g = IntGauge::new(
                    "tidemark_processor_state_bytes",
                    "State in the newest checkpoint saved, bytes before compression",
                )
                .unwrap_or_else(|_| unreachable_metric());
                register(registry, Box::new(g.clone()));
                g
            },
            alerts_firing: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "tidemark_alerts_firing",
                        "Series of a business alert rule firing now",
                    ),
                    &["rule"],
                )
                .unwrap_or_else(|_| unreachable_metric());
                register(registry, Box::new(g.clone()));
                g
            },
        }
    }
}

impl ProcessorMetrics {
    /// Sets the firing gauge of every rule the combiner evaluates.
    pub(crate) fn observe_alerts(&self, combiner: &Combiner) {
        for (rule, firing) in combiner.alerts_firing() {
            self.alerts_firing
                .with_label_values(&[rule])
                .set(firing as i64);
        }
    }

    /// Counts what happened to a batch of records.
    pub(crate) fn count(&self, counts: Counts, decode_errors: u64) {
        self.events_processed.inc_by(counts.accepted);
        self.late_events.inc_by(counts.too_late);
        self.duplicates.inc_by(counts.duplicates);
        self.decode_errors.inc_by(decode_errors);
    }

    /// Raises the newest event time read to `newest` (reports of several
    /// workers arrive in any order).
    pub(crate) fn observe_newest_event(&self, newest: EventTime) {
        let seconds = unix_seconds(newest);
        if newest != EventTime::MIN && seconds > self.newest_event_timestamp_seconds.get() {
            self.newest_event_timestamp_seconds.set(seconds);
        }
    }

    /// Records the combined watermark `wm`.
    pub(crate) fn observe_watermark(&self, wm: Watermark) {
        if wm != EventTime::MIN && wm != EventTime::MAX {
            let delay = (EventTime::now().0.saturating_sub(wm.0)) as f64 / 1000.0;
            self.watermark_delay_seconds.set(delay);
            self.watermark_timestamp_seconds.set(unix_seconds(wm));
        }
    }

    /// Records a checkpoint of `state_bytes` saved now.
    pub(crate) fn checkpoint_saved(&self, state_bytes: u64) {
        self.checkpoint_timestamp_seconds.set(unix_seconds_now());
        self.state_bytes.set(state_bytes as i64);
    }
}

fn unix_seconds(t: EventTime) -> f64 {
    t.0 as f64 / 1000.0
}

fn unix_seconds_now() -> f64 {
    unix_seconds(EventTime::now())
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

pub(crate) fn next_backoff(b: Duration) -> Duration {
    (b * 2).min(MAX_BACKOFF)
}

/// Sleeps for `d`; `false` if cancelled first.
pub(crate) async fn pause(d: Duration, cancel: &CancellationToken) -> bool {
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

/// What a live worker thread tells the driver.
#[derive(Debug)]
pub(crate) enum FromWorker {
    Progress {
        worker: usize,
        partials: Vec<Partial>,
        wm: Watermark,
        /// Every partition of the worker is idle.
        idle: bool,
        counts: Counts,
        decode_errors: u64,
        dead_letters: Vec<Record>,
        newest_received_at: EventTime,
        /// The newest event time the worker read (MIN where not known).
        newest_event_time: EventTime,
        /// Where the worker is after this batch (empty unless asked for).
        offsets: NextOffsets,
        /// Replaying what was reported before a restart: nothing to report.
        catching_up: bool,
    },
    Early {
        worker: usize,
        partials: Vec<Partial>,
        /// Where the worker is (for its lag; see [`LagProbe`]).
        offsets: NextOffsets,
    },
    /// The worker's state at a batch boundary; it waits for the next command.
    Barrier {
        worker: usize,
        checkpoint: Checkpoint,
    },
    Failed(ProcessorError),
}

/// What the driver tells a live worker thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ToWorker {
    /// Send a barrier with the state, then wait.
    Checkpoint,
    /// Go on after a barrier.
    Resume,
    /// Stop (after a barrier: without reading further).
    Stop,
    /// The checkpoint of the last barrier is durable.
    Saved,
}

/// Runs the processor until `cancel`: one thread per stage-1 worker reads its
/// partitions of `config.topics` (partition `p` goes to worker
/// `p % workers`) and feeds its pipelines; this task runs the combiner, sends
/// final and corrected points to `sink`, broadcasts early and final results
/// on `updates`, and checkpoints every `checkpoint_interval` and on cancel:
/// the workers stop at a batch boundary (a barrier), the sink is flushed, and
/// every worker's state, offsets and the combiner's state are saved together.
pub async fn run_driver(
    config: DriverConfig,
    log: Arc<dyn Log>,
    pipelines: PipelineSet,
    sink: Arc<dyn PointSink>,
    updates: broadcast::Sender<Update>,
    metrics: ProcessorMetrics,
    cancel: CancellationToken,
) -> Result<(), ProcessorError> {
    let mut counts = Vec::new();
    for topic in &config.topics {
        counts.push(log.partition_count(topic).await?);
    }
    let workers = usable_workers(config.workers, counts.iter().copied().min().unwrap_or(1));
    let mut engines: Vec<Worker> = (0..workers)
        .map(|_| Worker::new(&config.worker(), pipelines.stage1()))
        .collect();
    let mut parts = Vec::with_capacity(workers);
    for (index, engine) in engines.iter_mut().enumerate() {
        parts.push(parts_of(log.as_ref(), &config.topics, index, workers, engine).await?);
    }
    let mut combiner = pipelines.combiner(workers);
    if let Some(dir) = &config.checkpoint_dir {
        for (index, engine) in engines.iter_mut().enumerate() {
            let spill = dir.join("spill").join(format!("worker-{index}"));
            engine.spill_to(&spill, config.checkpoint_keys.clone())?;
        }
        if let Some(cp) =
            checkpoint::load_keyed::<ProcessorCheckpoint>(dir, config.checkpoint_keys.as_deref())?
        {
            crate::checkpoint::check_worker_count(cp.workers.len(), workers)?;
            for ((engine, wc), ps) in engines.iter_mut().zip(&cp.workers).zip(&mut parts) {
                engine.restore(wc)?;
                resume(ps, &wc.offsets);
            }
            combiner.restore(&cp.combiner)?;
            metrics.observe_alerts(&combiner);
            tracing::info!(workers, "Restored processor checkpoint");
        }
    }
    if let Err(e) = log
        .ensure_topic(DEAD_LETTER, default_partitions(DEAD_LETTER))
        .await
    {
        tracing::warn!(error = %e, "Could not create the dead-letter topic");
    }

    // A few batches in flight per worker: enough to overlap reading with
    // combining, small enough that a slow store stops the readers.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<FromWorker>(4 * workers);
    let mut commands = Vec::new();
    let mut threads = Vec::new();
    let runtime = tokio::runtime::Handle::current();
    let global_wm = Arc::new(AtomicI64::new(combiner.target().0));
    for (index, (engine, ps)) in engines.into_iter().zip(parts).enumerate() {
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<ToWorker>();
        commands.push(cmd_tx);
        let live = LiveWorker {
            index,
            engine,
            parts: ps,
            log: log.clone(),
            runtime: runtime.clone(),
            tx: tx.clone(),
            commands: cmd_rx,
            config: config.clone(),
            global_wm: global_wm.clone(),
            report_offsets: false,
        };
        threads.push(live.spawn()?);
    }
    drop(tx);

    let mut driver = Combining::new(combiner, sink, updates, metrics, log, global_wm);
    let result = driver.run(&config, &mut rx, &commands, &cancel).await;
    stop_workers(commands, rx, threads).await;
    result
}

/// Tells every worker thread to stop and waits until they have.
pub(crate) async fn stop_workers(
    commands: impl IntoIterator<Item = std::sync::mpsc::Sender<ToWorker>>,
    mut rx: tokio::sync::mpsc::Receiver<FromWorker>,
    threads: Vec<std::thread::JoinHandle<()>>,
) {
    for c in commands {
        let _ = c.send(ToWorker::Stop);
    }
    // Unblock workers waiting to send, then wait for them to end.
    rx.close();
    while rx.recv().await.is_some() {}
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await;
}

/// The driver's side: the combiner, the sink, live updates and checkpoints.
pub(crate) struct Combining {
    pub(crate) combiner: Combiner,
    pub(crate) sink: Arc<dyn PointSink>,
    updates: broadcast::Sender<Update>,
    pub(crate) metrics: ProcessorMetrics,
    log: Arc<dyn Log>,
    newest_received_at: EventTime,
    lag: LagProbe,
    global_wm: Arc<AtomicI64>,
    /// The checkpoint being written, while the workers go on.
    saving: Option<tokio::task::JoinHandle<Result<bool, ProcessorError>>>,
}

/// Whether to go on after handling a message.
pub(crate) enum Flow {
    Continue,
    /// Cancelled while points could not be sent: stop without a checkpoint.
    Abandon,
}

impl Combining {
    pub(crate) fn new(
        combiner: Combiner,
        sink: Arc<dyn PointSink>,
        updates: broadcast::Sender<Update>,
        metrics: ProcessorMetrics,
        log: Arc<dyn Log>,
        global_wm: Arc<AtomicI64>,
    ) -> Self {
        Combining {
            combiner,
            sink,
            updates,
            lag: LagProbe::new(log.clone(), metrics.lag_records.clone()),
            metrics,
            log,
            newest_received_at: EventTime::MIN,
            global_wm,
            saving: None,
        }
    }

    async fn run(
        &mut self,
        config: &DriverConfig,
        rx: &mut tokio::sync::mpsc::Receiver<FromWorker>,
        commands: &[std::sync::mpsc::Sender<ToWorker>],
        cancel: &CancellationToken,
    ) -> Result<(), ProcessorError> {
        let mut early_tick = tokio::time::interval(config.early_interval);
        early_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut checkpoint_tick = tokio::time::interval(config.checkpoint_interval);
        checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        checkpoint_tick.reset();
        let mut rules = config.alert_rules.clone();
        if let Some(rx) = &mut rules {
            // The rules at the start are the set's; only changes count.
            rx.mark_unchanged();
        }
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                changed = rules_changed(&mut rules) => {
                    tracing::info!(rules = changed.rules().len(), "Alert rules changed");
                    self.combiner.set_alert_rules(changed);
                    // Rules removed leave no series behind.
                    self.metrics.alerts_firing.reset();
                    self.metrics.observe_alerts(&self.combiner);
                }
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    match self.handle(msg, cancel).await? {
                        Flow::Continue => {}
                        Flow::Abandon => return Ok(()),
                    }
                }
                _ = early_tick.tick() => self.publish_early(),
                _ = checkpoint_tick.tick() => {
                    if let Flow::Abandon = self.checkpoint(config, rx, commands, ToWorker::Resume, cancel).await? {
                        return Ok(());
                    }
                }
            }
        }
        // Cancelled: a last checkpoint; the workers stop after their barrier.
        let never = CancellationToken::new();
        self.checkpoint(config, rx, commands, ToWorker::Stop, &never)
            .await
            .map(|_| ())
    }

    pub(crate) async fn handle(
        &mut self,
        msg: FromWorker,
        cancel: &CancellationToken,
    ) -> Result<Flow, ProcessorError> {
        match msg {
            FromWorker::Progress {
                worker,
                partials,
                wm,
                idle,
                counts,
                decode_errors,
                dead_letters,
                newest_received_at,
                newest_event_time,
                offsets: _,
                catching_up: _,
            } => {
                self.metrics.count(counts, decode_errors);
                self.metrics.observe_newest_event(newest_event_time);
                self.newest_received_at = self.newest_received_at.max(newest_received_at);
                let mut out = Vec::new();
                for p in partials {
                    self.combiner.on_partial(worker, p)?;
                }
                self.combiner.set_idle(worker, idle);
                self.combiner.on_watermark(worker, wm, &mut out);
                self.metrics.observe_alerts(&self.combiner);
                self.global_wm
                    .store(self.combiner.target().0, Ordering::Release);
                self.metrics.observe_watermark(self.combiner.watermark());
                if !out.is_empty() {
                    if !send_points(self.sink.as_ref(), &out, cancel).await? {
                        return Ok(Flow::Abandon);
                    }
                    self.metrics.windows_fired.inc_by(windows_in(&out));
                    for u in updates_of(&out, true, self.newest_received_at) {
                        // No subscribers is fine.
                        let _ = self.updates.send(u);
                    }
                }
                if !dead_letters.is_empty() {
                    append_dead_letters(self.log.as_ref(), dead_letters, cancel).await;
                }
                Ok(Flow::Continue)
            }
            FromWorker::Early {
                worker,
                partials,
                offsets,
            } => {
                self.combiner.on_early(worker, partials)?;
                self.lag.update(worker, offsets);
                Ok(Flow::Continue)
            }
            FromWorker::Barrier { worker, .. } => {
                tracing::warn!(worker, "Unexpected barrier outside a checkpoint");
                Ok(Flow::Continue)
            }
            FromWorker::Failed(e) => Err(e),
        }
    }

    pub(crate) fn publish_early(&mut self) {
        let mut early = Vec::new();
        self.combiner.early(&mut early);
        for u in updates_of(&early, false, self.newest_received_at) {
            let _ = self.updates.send(u);
        }
    }

    /// Asks every worker for a barrier, handles what they sent before it,
    /// then flushes the sink and saves everything; `then` tells the workers
    /// what to do next. Resumed, they go on at once and the flush and the
    /// write run on a task of their own (one at a time); stopped, the write
    /// is done before this returns.
    async fn checkpoint(
        &mut self,
        config: &DriverConfig,
        rx: &mut tokio::sync::mpsc::Receiver<FromWorker>,
        commands: &[std::sync::mpsc::Sender<ToWorker>],
        then: ToWorker,
        cancel: &CancellationToken,
    ) -> Result<Flow, ProcessorError> {
        let stopping = matches!(then, ToWorker::Stop);
        if let Some(saving) = self.saving.take() {
            if !saving.is_finished() && !stopping {
                // Still writing the last one: this tick is skipped, so the
                // interval stretches to what a write takes instead of
                // writes piling up behind each other.
                self.saving = Some(saving);
                return Ok(Flow::Continue);
            }
            let saved = saving
                .await
                .map_err(|e| ProcessorError::Io(std::io::Error::other(e)))??;
            if saved {
                // Before the next barrier: what that checkpoint no longer
                // refers to may go.
                for c in commands {
                    let _ = c.send(ToWorker::Saved);
                }
            }
        }
        let mut barriers: Vec<Option<Checkpoint>> = vec![None; commands.len()];
        let mut asked = 0;
        for c in commands {
            if c.send(ToWorker::Checkpoint).is_ok() {
                asked += 1;
            }
        }
        let mut received = 0;
        while received < asked {
            let Some(msg) = rx.recv().await else { break };
            match msg {
                FromWorker::Barrier { worker, checkpoint } => {
                    if let Some(b) = barriers.get_mut(worker) {
                        *b = Some(checkpoint);
                        received += 1;
                    }
                }
                other => {
                    if let Flow::Abandon = self.handle(other, cancel).await? {
                        return Ok(Flow::Abandon);
                    }
                }
            }
        }
        let complete = received == commands.len();
        let cp = match complete {
            true => Some(ProcessorCheckpoint {
                workers: barriers.into_iter().flatten().collect(),
                combiner: self.combiner.snapshot()?,
            }),
            false => None,
        };
        if !stopping {
            // The state and offsets are taken: the workers go on while
            // the sink flushes what came before the barrier and the state
            // is written.
            for c in commands {
                let _ = c.send(then);
            }
            let (dir, keys, sink, metrics) = (
                config.checkpoint_dir.clone(),
                config.checkpoint_keys.clone(),
                self.sink.clone(),
                self.metrics.clone(),
            );
            self.saving = Some(tokio::spawn(async move {
                write_checkpoint(dir, keys, cp, sink.as_ref(), &metrics).await
            }));
            return Ok(Flow::Continue);
        }
        let saved = write_checkpoint(
            config.checkpoint_dir.clone(),
            config.checkpoint_keys.clone(),
            cp,
            self.sink.as_ref(),
            &self.metrics,
        )
        .await;
        for c in commands {
            let _ = c.send(then);
        }
        saved.map(|_| Flow::Continue)
    }
}

/// How often [`LagProbe`] asks the log for its end offsets.
const LAG_INTERVAL: Duration = Duration::from_secs(5);
/// End offsets asked for at once by [`LagProbe`].
const LAG_QUERIES: usize = 4;

/// Sets `tidemark_processor_lag_records` from the offsets the workers
/// report, on a task of its own: asking a broker for the end offsets of
/// dozens of partitions takes a round trip each, which must never hold up
/// reading them (on the worker threads it once slowed every pass over the
/// partitions to seconds).
pub(crate) struct LagProbe {
    log: Arc<dyn Log>,
    gauge: IntGaugeVec,
    /// Each worker's next offsets, as last reported.
    offsets: Arc<std::sync::Mutex<BTreeMap<usize, NextOffsets>>>,
    /// Started with the first report.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LagProbe {
    pub(crate) fn new(log: Arc<dyn Log>, gauge: IntGaugeVec) -> Self {
        LagProbe {
            log,
            gauge,
            offsets: Arc::default(),
            task: None,
        }
    }

    /// Takes a worker's next offsets.
    pub(crate) fn update(&mut self, worker: usize, offsets: NextOffsets) {
        if offsets.is_empty() {
            return;
        }
        self.offsets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(worker, offsets);
        if self.task.is_none() {
            let (log, gauge, offsets) =
                (self.log.clone(), self.gauge.clone(), self.offsets.clone());
            self.task = Some(tokio::spawn(Self::watch(log, gauge, offsets)));
        }
    }

    async fn watch(
        log: Arc<dyn Log>,
        gauge: IntGaugeVec,
        offsets: Arc<std::sync::Mutex<BTreeMap<usize, NextOffsets>>>,
    ) {
        use futures::StreamExt as _;
        let mut tick = tokio::time::interval(LAG_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let positions: Vec<((String, u32), u64)> = offsets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .flat_map(|o| o.iter().map(|(k, &v)| (k.clone(), v)))
                .collect();
            let behind: Vec<Option<(String, i64)>> = futures::stream::iter(positions)
                .map(|((topic, partition), next)| {
                    let log = log.clone();
                    async move {
                        let end = log.end_offset(&topic, partition).await.ok()?;
                        Some((topic, end.saturating_sub(next) as i64))
                    }
                })
                .buffer_unordered(LAG_QUERIES)
                .collect()
                .await;
            let mut by_topic: BTreeMap<String, i64> = BTreeMap::new();
            for (topic, n) in behind.into_iter().flatten() {
                *by_topic.entry(topic).or_insert(0) += n;
            }
            for (topic, n) in by_topic {
                gauge.with_label_values(&[&topic]).set(n);
            }
        }
    }
}

impl Drop for LagProbe {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A stage-1 worker on its own thread, reading its partitions from the log.
pub(crate) struct LiveWorker {
    pub(crate) index: usize,
    pub(crate) engine: Worker,
    pub(crate) parts: Vec<Part>,
    pub(crate) log: Arc<dyn Log>,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) tx: tokio::sync::mpsc::Sender<FromWorker>,
    pub(crate) commands: std::sync::mpsc::Receiver<ToWorker>,
    pub(crate) config: DriverConfig,
    /// The combiner's [`Combiner::target`], published by the driver.
    pub(crate) global_wm: Arc<AtomicI64>,
    /// Whether progress reports carry the partitions' offsets.
    pub(crate) report_offsets: bool,
}

impl LiveWorker {
    pub(crate) fn spawn(self) -> Result<std::thread::JoinHandle<()>, ProcessorError> {
        std::thread::Builder::new()
            .name(format!("tidemark-worker-{}", self.index))
            .spawn(move || self.run())
            .map_err(ProcessorError::Io)
    }

    fn run(self) {
        let LiveWorker {
            index,
            mut engine,
            mut parts,
            log,
            runtime,
            tx,
            commands,
            config,
            global_wm,
            report_offsets,
        } = self;
        let mut source = LogSource { log, runtime };
        let mut rounds = LiveRounds {
            index,
            tx,
            commands,
            codec: config.codec,
            early_interval: config.early_interval,
            idle_sleep: config.idle_sleep,
            next_early: Instant::now() + config.early_interval,
            backoff: FIRST_BACKOFF,
            global_wm,
            report_offsets,
        };
        let result = read_loop::run(
            &mut engine,
            &mut parts,
            &mut source,
            (Mode::Live, config.max_batch),
            &config.codec.decode,
            &mut rounds,
        );
        if let Err(e) = result {
            let _ = rounds.tx.blocking_send(FromWorker::Failed(e));
        }
    }
}

/// The first wait after a failed read; it doubles up to [`next_backoff`]'s cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// A live worker's side of its read loop: commands and the combined
/// watermark before a round; progress, dead letters, early results and the
/// pause when idle after it.
struct LiveRounds {
    index: usize,
    tx: tokio::sync::mpsc::Sender<FromWorker>,
    commands: std::sync::mpsc::Receiver<ToWorker>,
    codec: EventCodec,
    early_interval: Duration,
    idle_sleep: Duration,
    next_early: Instant,
    backoff: Duration,
    /// The combiner's [`Combiner::target`], published by the driver.
    global_wm: Arc<AtomicI64>,
    /// Whether progress reports carry the partitions' offsets.
    report_offsets: bool,
}

/// The next offset of each of the worker's partitions.
fn next_offsets(parts: &[Part]) -> NextOffsets {
    parts
        .iter()
        .map(|p| ((p.topic.clone(), p.partition), p.offset))
        .collect()
}

/// Whether some partition is still short of where it was reported before a
/// restart; once none is, they read on freely.
fn catching_up(parts: &mut [Part]) -> bool {
    let behind = parts.iter().any(|p| p.stop_at.is_some() && !p.at_stop());
    if !behind {
        for p in parts {
            p.stop_at = None;
        }
    }
    behind
}

impl LiveRounds {
    /// Lateness is judged against at least the combined watermark.
    fn observe_global(&self, engine: &mut Worker) {
        engine.observe_global(EventTime(self.global_wm.load(Ordering::Acquire)));
    }

    /// Handles a command; `false` when the worker must stop.
    fn obey(&mut self, command: ToWorker, engine: &mut Worker, parts: &[Part]) -> bool {
        match command {
            ToWorker::Checkpoint => {
                let checkpoint = match engine.checkpoint(next_offsets(parts)) {
                    Ok(checkpoint) => checkpoint,
                    Err(e) => {
                        let _ = self.tx.blocking_send(FromWorker::Failed(e));
                        return false;
                    }
                };
                if self
                    .tx
                    .blocking_send(FromWorker::Barrier {
                        worker: self.index,
                        checkpoint,
                    })
                    .is_err()
                {
                    return false;
                }
                loop {
                    match self.commands.recv() {
                        Ok(ToWorker::Resume) => return true,
                        Ok(ToWorker::Checkpoint | ToWorker::Saved) => continue,
                        Ok(ToWorker::Stop) | Err(_) => return false,
                    }
                }
            }
            ToWorker::Resume => true,
            ToWorker::Saved => {
                engine.checkpoint_saved();
                true
            }
            ToWorker::Stop => false,
        }
    }
}

impl Rounds for LiveRounds {
    fn before(&mut self, engine: &mut Worker, parts: &[Part]) -> Result<bool, ProcessorError> {
        loop {
            match self.commands.try_recv() {
                Ok(c) => {
                    if !self.obey(c, engine, parts) {
                        return Ok(false);
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return Ok(false),
            }
        }
        self.observe_global(engine);
        Ok(true)
    }

    fn after(
        &mut self,
        engine: &mut Worker,
        parts: &mut [Part],
        round: Round,
        too_late: &mut Vec<Event>,
    ) -> Result<bool, ProcessorError> {
        if !round.retry {
            self.backoff = FIRST_BACKOFF;
        }
        let catching_up = catching_up(parts);
        if catching_up {
            // Already dead-lettered before the restart.
            too_late.clear();
        }
        let dead_letters: Vec<Record> = too_late
            .drain(..)
            .map(|ev| Record {
                key: Bytes::copy_from_slice(ev.user_id.as_bytes()),
                value: Bytes::from(DeadLetter::too_late((self.codec.to_json)(&ev)).to_json()),
                timestamp: ev.timestamp,
            })
            .collect();
        let mut partials = Vec::new();
        let now = Instant::now();
        self.observe_global(engine);
        let wm = engine.advance(now, &mut partials);
        if catching_up {
            // The combiner has these, or newer ones, from before the restart.
            partials.clear();
        }
        let progress = FromWorker::Progress {
            worker: self.index,
            partials,
            wm,
            idle: engine.is_idle(now),
            counts: round.counts,
            decode_errors: round.decode_errors,
            dead_letters,
            newest_received_at: engine.newest_received_at(),
            newest_event_time: engine.newest_event_time(),
            offsets: if self.report_offsets {
                next_offsets(parts)
            } else {
                NextOffsets::new()
            },
            catching_up,
        };
        if self.tx.blocking_send(progress).is_err() {
            return Ok(false);
        }
        let now = Instant::now();
        if now >= self.next_early && !catching_up {
            self.next_early = now + self.early_interval;
            let mut partials = Vec::new();
            engine.early(&mut partials);
            let early = FromWorker::Early {
                worker: self.index,
                partials,
                offsets: next_offsets(parts),
            };
            if self.tx.blocking_send(early).is_err() {
                return Ok(false);
            }
        }
        let pause = if round.retry {
            let b = self.backoff;
            self.backoff = next_backoff(self.backoff);
            Some(b)
        } else if !round.advanced {
            Some(self.idle_sleep)
        } else {
            None
        };
        if let Some(d) = pause {
            // Waiting on the command channel keeps checkpoints prompt.
            match self.commands.recv_timeout(d) {
                Ok(c) => return Ok(self.obey(c, engine, parts)),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(false),
            }
        }
        Ok(true)
    }
}

pub(crate) async fn append_dead_letters(
    log: &dyn Log,
    records: Vec<Record>,
    cancel: &CancellationToken,
) {
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

/// Flushes the sink, then saves the checkpoint. A failing sink skips the
/// checkpoint (it is retried at the next interval); a failing save is an error
/// only when it can never succeed. Whether the checkpoint was saved.
pub(crate) async fn write_checkpoint<T: serde::Serialize + Send + 'static>(
    dir: Option<PathBuf>,
    keys: Option<Arc<KeyRing>>,
    cp: Option<T>,
    sink: &dyn PointSink,
    metrics: &ProcessorMetrics,
) -> Result<bool, ProcessorError> {
    let (Some(dir), Some(cp)) = (dir, cp) else {
        if let Err(e) = sink.flush().await {
            tracing::warn!(error = %e, "Flushing points failed");
        }
        return Ok(false);
    };
    let timer = metrics.checkpoint_duration_seconds.start_timer();
    if let Err(e) = sink.flush().await {
        tracing::warn!(error = %e, "Flushing points failed; not checkpointing");
        timer.stop_and_discard();
        return if e.is_retryable() { Ok(false) } else { Err(e) };
    }
    let saved =
        tokio::task::spawn_blocking(move || checkpoint::save_keyed(&dir, &cp, keys.as_deref()))
            .await
            .map_err(|e| ProcessorError::Io(std::io::Error::other(e)))
            .and_then(|r| r);
    match saved {
        Ok(state_bytes) => {
            timer.observe_duration();
            metrics.checkpoint_saved(state_bytes);
            Ok(true)
        }
        Err(e) if e.is_retryable() => {
            tracing::warn!(error = %e, "Saving checkpoint failed");
            timer.stop_and_discard();
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
