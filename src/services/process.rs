//! `tidemark process`: both processor stages over Kafka, into InfluxDB and
//! the `tidemark-updates` topic.
//!
//! Several instances may run; one is active at a time. Which one is decided
//! by Kafka's group protocol: every instance joins the consumer group
//! `<client-id>-process` on the one-partition [`PROCESSOR_LEASE_TOPIC`], and
//! the instance assigned that partition runs the processor over every input
//! partition. On revoke it stops at a barrier and writes its checkpoint
//! before the partition is handed on; on assign the new owner restores the
//! newest checkpoint from the shared `--data-dir` and reads on from its
//! offsets. A killed owner leaves the group after the session timeout (6 s);
//! the survivor then replays from the last checkpoint, and since processing
//! is deterministic and the store overwrites points with the same identity,
//! the windows end up exactly as without the failure.
//!
//! Offsets live in the checkpoint; they are also committed to the group
//! `<client-id>-process-offsets`, for lag monitoring by Kafka tools only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde_json::json;
use tidemark_log::kafka::rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance,
};
use tidemark_log::kafka::rdkafka::{ClientContext, Offset, TopicPartitionList};
use tidemark_log::{Log, Record};
use tidemark_model::{topic, EventTime, Update};
use tidemark_processor::checkpoint;
use tidemark_processor::driver::{run_driver, DriverConfig, ProcessorMetrics};
use tidemark_processor::runner::ProcessorCheckpoint;
use tidemark_processor::PipelineSet;
use tidemark_tsdb_writer::writer::{BatchingWriter, WriterConfig, WriterMetrics};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::kafka::{connect_and_provision, BrokerHealth, ProduceMetrics};
use super::{service_router, KafkaArgs, MeteredLog, PROCESSOR_LEASE_TOPIC, UPDATES_TOPIC};
use crate::app::WriterSink;
use crate::cli::InfluxArgs;

pub const ACTIVE: &str = "tidemark_processor_active";
pub const REBALANCES_TOTAL: &str = "tidemark_processor_rebalances_total";
pub const PARTITION_LAG: &str = "tidemark_processor_partition_lag_records";
pub const UPDATES_DROPPED_TOTAL: &str = "tidemark_processor_updates_dropped_total";

/// Session timeout of the lease group: how long a dead instance keeps the
/// lease (Kafka's smallest default `group.min.session.timeout.ms`).
const LEASE_SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// Longest wait for the processor's final checkpoint before a revoked lease
/// is handed on anyway.
const REVOKE_WAIT: Duration = Duration::from_secs(60);
/// File in `--data-dir` where the active instance writes the time every
/// second, so the standby can tell a dead owner from a live one.
const ALIVE_FILE: &str = "process-alive";
/// How old the alive time may get before a standby rejoins the group.
const ALIVE_STALE: Duration = Duration::from_secs(12);
/// Points of one measurement per update record at most, so a record stays
/// well below the brokers' message size limit.
const POINTS_PER_UPDATE: usize = 2_000;

#[derive(Debug, Clone, Args)]
pub struct ProcessArgs {
    /// Address of the HTTP listener: `/api/v1/health`, `/metrics`.
    #[arg(long, env = "TIDEMARK_LISTEN", default_value = "127.0.0.1:8082")]
    pub listen: SocketAddr,
    /// Folder of the checkpoints; shared by every `process` instance (a
    /// takeover restores the previous owner's newest checkpoint).
    #[arg(long, env = "TIDEMARK_DATA_DIR", default_value = "tidemark-data")]
    pub data_dir: PathBuf,
    /// Stage-1 worker threads; every instance sharing `--data-dir` needs the same count.
    #[arg(long, env = "TIDEMARK_WORKERS", default_value_t = 2)]
    pub workers: usize,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub influx: InfluxArgs,
    /// TOML file with defaults for these flags (see the README).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The service's own metrics (the processor's and the writer's come on top).
#[derive(Debug, Clone)]
struct ServiceMetrics {
    active: IntGauge,
    rebalances: IntCounterVec,
    partition_lag: IntGaugeVec,
    updates_dropped: IntCounter,
}

impl ServiceMetrics {
    fn new(registry: &Registry) -> anyhow::Result<ServiceMetrics> {
        let active = IntGauge::new(
            ACTIVE,
            "1 while this instance holds the lease and runs the processor.",
        )?;
        let rebalances = IntCounterVec::new(
            Opts::new(
                REBALANCES_TOTAL,
                "Lease rebalances seen by this instance, by kind (assign, revoke).",
            ),
            &["kind"],
        )?;
        let partition_lag = IntGaugeVec::new(
            Opts::new(
                PARTITION_LAG,
                "Records between the last checkpoint's offset and the end of the partition.",
            ),
            &["topic", "partition"],
        )?;
        let updates_dropped = IntCounter::new(
            UPDATES_DROPPED_TOTAL,
            "Live updates not published (the store still gets every final window).",
        )?;
        registry.register(Box::new(active.clone()))?;
        registry.register(Box::new(rebalances.clone()))?;
        registry.register(Box::new(partition_lag.clone()))?;
        registry.register(Box::new(updates_dropped.clone()))?;
        Ok(ServiceMetrics {
            active,
            rebalances,
            partition_lag,
            updates_dropped,
        })
    }
}

/// Binds `--listen` and runs until `cancel`.
pub async fn main(args: ProcessArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let listener = super::bind(args.listen).await?;
    run(args, listener, cancel).await
}

/// Runs the processor service on `listener` until `cancel`.
pub async fn run(
    args: ProcessArgs,
    listener: TcpListener,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let store = super::open_influx(&args.influx, "process", &cancel).await?;
    let registry = Registry::new();
    // Each worker reads dozens of partitions in turn; an empty one must not
    // hold up the others for long.
    let kafka = connect_and_provision(
        &args.kafka,
        "process",
        |c| c.read_wait = Duration::from_millis(5),
        &cancel,
    )
    .await?;
    let log: Arc<dyn Log> = Arc::new(MeteredLog::new(
        kafka.clone(),
        ProduceMetrics::new(&registry)?,
        args.kafka.produce_timeout,
    ));
    let health = BrokerHealth::new(&registry)?;
    let metrics = ServiceMetrics::new(&registry)?;

    let (writer, writer_task) = BatchingWriter::spawn(
        store,
        WriterConfig::default(),
        WriterMetrics::new(&registry)?,
    );
    let (updates, updates_rx) = broadcast::channel::<Update>(4096);
    let publisher = tokio::spawn(publish_updates(
        updates_rx,
        log.clone(),
        metrics.updates_dropped.clone(),
    ));

    let background = CancellationToken::new();
    let monitor = tokio::spawn(health.clone().monitor(
        log.clone(),
        topic::DEAD_LETTER,
        background.clone(),
    ));
    let checkpoint_dir = args.data_dir.join("checkpoints");
    let lag = tokio::spawn(watch_lag(
        log.clone(),
        args.kafka.clone(),
        checkpoint_dir.clone(),
        metrics.clone(),
        background.clone(),
    ));

    let probe = {
        let (health, active) = (health.clone(), metrics.active.clone());
        Arc::new(move || {
            json!({
                "status": "ok",
                "service": "process",
                "role": if active.get() == 1 { "active" } else { "standby" },
                "kafka": if health.is_up() { "up" } else { "down" },
            })
        })
    };
    let http_cancel = background.clone();
    let http = tokio::spawn(tidemark_ws_server::serve(
        listener,
        service_router(registry.clone(), probe),
        async move { http_cancel.cancelled().await },
    ));

    let driver = Driving {
        config: DriverConfig {
            checkpoint_dir: Some(checkpoint_dir),
            workers: args.workers,
            ..DriverConfig::default()
        },
        log: log.clone(),
        sink: Arc::new(WriterSink(writer.clone())),
        updates: updates.clone(),
        processor_metrics: ProcessorMetrics::new(&registry),
        metrics: metrics.clone(),
        running: None,
    };
    let alive_file = args.data_dir.join(ALIVE_FILE);
    let (lease, events) = Lease::join(&args.kafka, metrics.rebalances.clone(), alive_file.clone())?;
    let alive = tokio::spawn(keep_alive(
        alive_file,
        metrics.active.clone(),
        background.clone(),
    ));
    tracing::info!("Process is running; waiting for the processor lease");
    let result = driver.follow_lease(events, &cancel).await;

    background.cancel();
    lease.leave().await;
    drop(updates);
    let _ = publisher.await;
    drop(writer);
    let _ = writer_task.await;
    let _ = tokio::join!(monitor, lag, alive);
    if let Ok(Err(e)) = http.await {
        tracing::warn!(error = %e, "HTTP server failed");
    }
    result
}

/// What the lease consumer tells the service.
#[derive(Debug)]
enum LeaseEvent {
    Acquired,
    /// Stop processing, then answer on the channel (the lease is handed on then).
    Revoked(std::sync::mpsc::SyncSender<()>),
}

/// The processor runs while the lease is held.
struct Driving {
    config: DriverConfig,
    log: Arc<dyn Log>,
    sink: Arc<WriterSink>,
    updates: broadcast::Sender<Update>,
    processor_metrics: ProcessorMetrics,
    metrics: ServiceMetrics,
    running: Option<(
        CancellationToken,
        JoinHandle<Result<(), tidemark_processor::ProcessorError>>,
    )>,
}

impl Driving {
    async fn follow_lease(
        mut self,
        mut events: mpsc::UnboundedReceiver<LeaseEvent>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let result = loop {
            let finished = async {
                match &mut self.running {
                    Some((_, handle)) => handle.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                joined = finished => {
                    self.running = None;
                    self.metrics.active.set(0);
                    // The processor never stops by itself: this is a failure.
                    // Exiting leaves the group, so another instance takes over.
                    break match joined {
                        Ok(Ok(())) => Err(anyhow::anyhow!("the processor stopped unexpectedly")),
                        Ok(Err(e)) => Err(anyhow::Error::new(e).context("the processor failed")),
                        Err(e) => Err(anyhow::Error::new(e).context("the processor panicked")),
                    };
                }
                event = events.recv() => match event {
                    Some(LeaseEvent::Acquired) => self.start(),
                    Some(LeaseEvent::Revoked(done)) => {
                        let stopped = self.stop().await;
                        let _ = done.send(());
                        if let Err(e) = stopped {
                            break Err(e);
                        }
                    }
                    None => break Err(anyhow::anyhow!("the lease consumer stopped")),
                },
            }
        };
        let stopped = self.stop().await;
        // Answer revokes that arrive while the consumer leaves the group.
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let LeaseEvent::Revoked(done) = event {
                    let _ = done.send(());
                }
            }
        });
        result.and(stopped)
    }

    fn start(&mut self) {
        if self.running.is_some() {
            return;
        }
        tracing::info!("Acquired the processor lease; restoring the newest checkpoint");
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(run_driver(
            self.config.clone(),
            self.log.clone(),
            PipelineSet::default(),
            self.sink.clone(),
            self.updates.clone(),
            self.processor_metrics.clone(),
            cancel.clone(),
        ));
        self.running = Some((cancel, handle));
        self.metrics.active.set(1);
    }

    /// Stops the processor, which writes a last checkpoint.
    async fn stop(&mut self) -> anyhow::Result<()> {
        let Some((cancel, handle)) = self.running.take() else {
            return Ok(());
        };
        tracing::info!("Releasing the processor lease: checkpointing");
        cancel.cancel();
        let joined = handle.await;
        self.metrics.active.set(0);
        match joined {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("the processor failed")),
            Err(e) => Err(anyhow::Error::new(e).context("the processor panicked")),
        }
    }
}

/// Membership in the lease group, polled on its own thread (rebalance
/// callbacks run there and may block until the processor checkpointed).
struct Lease {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct LeaseContext {
    events: mpsc::UnboundedSender<LeaseEvent>,
    rebalances: IntCounterVec,
    /// Whether this member holds the lease partition.
    holding: AtomicBool,
}

impl ClientContext for LeaseContext {}

impl ConsumerContext for LeaseContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            if tpl.count() == 0 {
                return;
            }
            self.rebalances.with_label_values(&["revoke"]).inc();
            self.holding.store(false, Ordering::Release);
            let (done, wait) = std::sync::mpsc::sync_channel(1);
            if self.events.send(LeaseEvent::Revoked(done)).is_ok()
                && wait.recv_timeout(REVOKE_WAIT).is_err()
            {
                tracing::warn!(
                    "The processor did not checkpoint in time; releasing the lease anyway"
                );
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if tpl.count() == 0 {
                return;
            }
            self.rebalances.with_label_values(&["assign"]).inc();
            self.holding.store(true, Ordering::Release);
            let _ = self.events.send(LeaseEvent::Acquired);
        }
    }
}

impl Lease {
    fn join(
        kafka: &KafkaArgs,
        rebalances: IntCounterVec,
        alive_file: PathBuf,
    ) -> anyhow::Result<(Lease, mpsc::UnboundedReceiver<LeaseEvent>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        // The range assignor gives the partition to the first member in
        // member-id order, and brokers begin a member id with the client
        // id: with the start time in it, the oldest instance keeps the
        // lease when another one joins instead of handing it over.
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let mut config = kafka.client_config(&format!("process-lease-{started:015}"));
        config
            .set("group.id", format!("{}-process", kafka.kafka_client_id))
            .set(
                "session.timeout.ms",
                LEASE_SESSION_TIMEOUT.as_millis().to_string(),
            )
            .set("heartbeat.interval.ms", "1000")
            .set("partition.assignment.strategy", "range")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest");
        let consumer: BaseConsumer<LeaseContext> = config
            .create_with_context(LeaseContext {
                events: tx,
                rebalances,
                holding: AtomicBool::new(false),
            })
            .context("cannot create the lease consumer")?;
        consumer
            .subscribe(&[PROCESSOR_LEASE_TOPIC])
            .context("cannot join the lease group")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tidemark-lease".to_string())
            .spawn(move || {
                let mut last_rejoin = std::time::Instant::now();
                while !stopping.load(Ordering::Acquire) {
                    if let Some(Err(e)) = consumer.poll(Duration::from_millis(200)) {
                        tracing::warn!(error = %e, "Lease consumer error");
                    }
                    // Some brokers (tansu) drop a dead member only when
                    // another one joins: a standby that sees the owner's
                    // alive time go stale joins again.
                    if !consumer.context().holding.load(Ordering::Acquire)
                        && last_rejoin.elapsed() >= ALIVE_STALE
                        && owner_is_gone(&alive_file)
                    {
                        tracing::info!("The lease owner looks dead; rejoining the group");
                        last_rejoin = std::time::Instant::now();
                        consumer.unsubscribe();
                        if let Err(e) = consumer.subscribe(&[PROCESSOR_LEASE_TOPIC]) {
                            tracing::warn!(error = %e, "Cannot rejoin the lease group");
                        }
                    }
                }
                // Leaving the group now hands the lease on without waiting
                // for the session timeout.
                consumer.unsubscribe();
                let _ = consumer.poll(Duration::from_millis(100));
                drop(consumer);
            })
            .context("cannot start the lease thread")?;
        Ok((
            Lease {
                stop,
                thread: Some(thread),
            },
            rx,
        ))
    }

    async fn leave(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Whether the alive time in `file` is older than [`ALIVE_STALE`] (no file:
/// no owner yet, which the group settles by itself).
fn owner_is_gone(file: &std::path::Path) -> bool {
    let Ok(text) = std::fs::read_to_string(file) else {
        return false;
    };
    let Ok(written) = text.trim().parse::<i64>() else {
        return false;
    };
    EventTime::now().millis().saturating_sub(written) > ALIVE_STALE.as_millis() as i64
}

/// Writes the time into `file` every second while this instance is active.
async fn keep_alive(file: PathBuf, active: IntGauge, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if active.get() == 1 {
            let now = EventTime::now().millis().to_string();
            let f = file.clone();
            let written = tokio::task::spawn_blocking(move || std::fs::write(f, now)).await;
            if let Ok(Err(e)) = written {
                tracing::warn!(error = %e, "Cannot write the alive file");
            }
        }
    }
}

/// Publishes live updates to [`UPDATES_TOPIC`] until the channel closes:
/// one record per window and measurement (a measurement's points replace its
/// earlier value on the dashboard, so they must stay together), keyed by the
/// window start so a window's updates stay in order.
async fn publish_updates(
    mut rx: broadcast::Receiver<Update>,
    log: Arc<dyn Log>,
    dropped: IntCounter,
) {
    loop {
        let first = match rx.recv().await {
            Ok(u) => u,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                dropped.inc_by(n);
                tracing::warn!(skipped = n, "Live updates fell behind Kafka");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let mut batch = vec![first];
        while batch.len() < 1000 {
            match rx.try_recv() {
                Ok(u) => batch.push(u),
                Err(broadcast::error::TryRecvError::Lagged(n)) => dropped.inc_by(n),
                Err(_) => break,
            }
        }
        let records = update_records(&batch);
        let n = records.len() as u64;
        if let Err(e) = log.append(UPDATES_TOPIC, records).await {
            dropped.inc_by(n);
            tracing::warn!(error = %e, "Could not publish live updates");
        }
    }
}

fn update_records(updates: &[Update]) -> Vec<Record> {
    let now = EventTime::now();
    let mut out = Vec::new();
    for u in updates {
        let mut by_measurement: std::collections::BTreeMap<&str, Vec<_>> = Default::default();
        for p in &u.points {
            by_measurement
                .entry(p.measurement.as_str())
                .or_default()
                .push(p.clone());
        }
        for (_, points) in by_measurement {
            for chunk in points.chunks(POINTS_PER_UPDATE) {
                let part = Update {
                    window_start: u.window_start,
                    is_final: u.is_final,
                    newest_received_at: u.newest_received_at,
                    points: chunk.to_vec(),
                };
                let Ok(value) = serde_json::to_vec(&part) else {
                    continue;
                };
                out.push(Record {
                    key: Bytes::from(u.window_start.millis().to_string()),
                    value: Bytes::from(value),
                    timestamp: now,
                });
            }
        }
    }
    out
}

/// Every 5 s while active: per-partition lag behind the last checkpoint, and
/// the checkpoint's offsets committed to the offsets group for Kafka tools.
async fn watch_lag(
    log: Arc<dyn Log>,
    kafka: KafkaArgs,
    checkpoint_dir: PathBuf,
    metrics: ServiceMetrics,
    cancel: CancellationToken,
) {
    let mut config = kafka.client_config("process-offsets");
    config
        .set(
            "group.id",
            format!("{}-process-offsets", kafka.kafka_client_id),
        )
        .set("enable.auto.commit", "false");
    let committer: Option<Arc<BaseConsumer>> = match config.create() {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot create the offsets committer; lag stays local");
            None
        }
    };
    let mut warned = false;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if metrics.active.get() != 1 {
            metrics.partition_lag.reset();
            continue;
        }
        let dir = checkpoint_dir.clone();
        let loaded =
            tokio::task::spawn_blocking(move || checkpoint::load::<ProcessorCheckpoint>(&dir))
                .await;
        let Ok(Ok(Some(cp))) = loaded else { continue };
        let offsets = cp.offsets();
        let mut tpl = TopicPartitionList::new();
        for ((t, p), &offset) in &offsets {
            if let Ok(end) = log.end_offset(t, *p).await {
                metrics
                    .partition_lag
                    .with_label_values(&[t, &p.to_string()])
                    .set(end.saturating_sub(offset) as i64);
            }
            let _ = tpl.add_partition_offset(t, *p as i32, Offset::Offset(offset as i64));
        }
        if let Some(c) = &committer {
            let c = c.clone();
            let committed =
                tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync)).await;
            if let Ok(Err(e)) = committed {
                if !warned {
                    tracing::warn!(error = %e, "Committing offsets for lag monitoring failed");
                    warned = true;
                }
            }
        }
    }
}
