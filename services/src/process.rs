//! `tidemark process`: both processor stages over Kafka, into InfluxDB and
//! the `tidemark-updates` topic.
//!
//! Several instances share the work through two Kafka consumer groups:
//! - **Shards** (stage 1, see [`tidemark_processor::shards`]): the input is
//!   cut into `--workers` shards, one per partition of
//!   [`PROCESSOR_SHARDS_TOPIC`]; the group `<client-id>-process-shards`
//!   spreads them over the instances. Each runs its shards' workers and
//!   sends their partials through [`PARTIALS_TOPIC`].
//! - **Combiner** (stage 2): the instance assigned the one partition of
//!   [`PROCESSOR_LEASE_TOPIC`] (group `<client-id>-process`) merges the
//!   partials, writes final windows to InfluxDB and publishes live updates.
//!
//! On revoke a role stops at a barrier and writes its checkpoint before its
//! partitions are handed on; on assign the new owner restores the newest
//! checkpoint from the shared `--data-dir` and reads on from its offsets. A
//! killed instance leaves its groups after the session timeout (6 s); the
//! survivors replay from the last checkpoints, and since processing is
//! deterministic and the store overwrites points with the same identity,
//! the windows end up exactly as without the failure.
//!
//! Offsets live in the checkpoints; they are also committed to the group
//! `<client-id>-process-offsets`, for lag monitoring by Kafka tools only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde_json::json;
use tidemark_log::kafka::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use tidemark_log::kafka::rdkafka::{Offset, TopicPartitionList};
use tidemark_log::{Log, Record};
use tidemark_model::{topic, EventTime, Update};
use tidemark_processor::driver::{DriverConfig, ProcessorMetrics};
use tidemark_processor::shards::{
    run_combiner, run_shards, shard_count, shard_offsets, ShardedConfig,
};
use tidemark_processor::PipelineSet;
use tidemark_tsdb_writer::writer::{BatchingWriter, WriterConfig, WriterMetrics};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::kafka::{connect_and_provision, BrokerHealth};
use super::{
    service_router, KafkaArgs, PARTIALS_TOPIC, PROCESSOR_LEASE_TOPIC, PROCESSOR_SHARDS_TOPIC,
    UPDATES_TOPIC,
};
use tidemark_log::kafka::group::{GroupEvent, Membership};
use tidemark_log::metered::{MeteredLog, ProduceMetrics};
use tidemark_standalone::WriterSink;
use tidemark_tsdb_writer::target::InfluxArgs;

pub const ACTIVE: &str = "tidemark_processor_active";
pub const SHARDS_OWNED: &str = "tidemark_processor_shards_owned";
pub const REBALANCES_TOTAL: &str = "tidemark_processor_rebalances_total";
pub const PARTITION_LAG: &str = "tidemark_processor_partition_lag_records";
pub const UPDATES_DROPPED_TOTAL: &str = "tidemark_processor_updates_dropped_total";

/// Folder in `--data-dir` where group members write the time every second,
/// so the others can tell a dead holder from a live one (see
/// [`tidemark_log::kafka::group`]).
const ALIVE_DIR: &str = "alive";

#[derive(Debug, Clone, Args)]
pub struct ProcessArgs {
    /// Address of the HTTP listener: `/api/v1/health`, `/metrics`.
    #[arg(long, env = "TIDEMARK_LISTEN", default_value = "127.0.0.1:8082")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub tls: tidemark_ws_server::tls::TlsArgs,
    /// Folder of the checkpoints; shared by every `process` instance (a
    /// takeover restores the previous owner's newest checkpoint).
    #[arg(long, env = "TIDEMARK_DATA_DIR", default_value = "tidemark-data")]
    pub data_dir: PathBuf,
    /// Stage-1 shards, spread over the instances; every instance sharing
    /// `--data-dir` needs the same count.
    #[arg(long, env = "TIDEMARK_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// How often open windows' early results go to live clients (the
    /// store gets final windows only): shorter moves dashboards sooner and
    /// costs the combiner more work. Scaled out, every shard also reports
    /// its partials over Kafka this often, hence a longer default than
    /// `run`'s.
    #[arg(long, env = "TIDEMARK_EARLY_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub early_interval: std::time::Duration,

    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub influx: InfluxArgs,
    /// Seals the checkpoints.
    #[command(flatten)]
    pub encryption: tidemark_model::keyring::EncryptionArgs,
    /// Business alert rules, evaluated by whichever instance holds the
    /// combiner, and the Alertmanager it sends them to.
    #[command(flatten)]
    pub alerts: tidemark_ws_server::alerting::AlertArgs,
    /// TOML file with defaults for these flags (see docs/operations.md).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The service's own metrics (the processor's and the writer's come on top).
#[derive(Debug, Clone)]
struct ServiceMetrics {
    active: IntGauge,
    shards: IntGauge,
    rebalances: IntCounterVec,
    partition_lag: IntGaugeVec,
    updates_dropped: IntCounter,
}

impl ServiceMetrics {
    fn new(registry: &Registry) -> anyhow::Result<ServiceMetrics> {
        let active = IntGauge::new(
            ACTIVE,
            "1 while this instance holds the lease and runs the combiner.",
        )?;
        let shards = IntGauge::new(SHARDS_OWNED, "Stage-1 shards this instance runs.")?;
        let rebalances = IntCounterVec::new(
            Opts::new(
                REBALANCES_TOTAL,
                "Shard and lease rebalances seen by this instance, by kind (assign, revoke).",
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
        registry.register(Box::new(shards.clone()))?;
        registry.register(Box::new(rebalances.clone()))?;
        registry.register(Box::new(partition_lag.clone()))?;
        registry.register(Box::new(updates_dropped.clone()))?;
        Ok(ServiceMetrics {
            active,
            shards,
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
    let listener = args.tls.listener(listener)?;
    let keys = args.encryption.keys()?;
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
    ));
    let health = BrokerHealth::new(&registry)?;
    let metrics = ServiceMetrics::new(&registry)?;

    let (writer, writer_task) = BatchingWriter::spawn(
        store,
        WriterConfig::default(),
        WriterMetrics::new(&registry)?,
    );
    let (updates, updates_rx) = broadcast::channel::<Update>(4096);
    let alert_rules = args.alerts.rules()?;
    let publisher = tokio::spawn(publish_updates(
        updates_rx,
        log.clone(),
        metrics.updates_dropped.clone(),
    ));

    let background = CancellationToken::new();
    let alert_sender = (args.alerts).spawn_sender(
        tokio::sync::watch::channel(alert_rules.clone()).1,
        updates.subscribe(),
        background.clone(),
    );
    let monitor = tokio::spawn(health.clone().monitor(
        log.clone(),
        topic::DEAD_LETTER,
        background.clone(),
    ));
    let checkpoint_dir = args.data_dir.join("checkpoints");
    let owned = Arc::new(Mutex::new(Vec::new()));
    let lag = tokio::spawn(watch_lag(
        log.clone(),
        args.kafka.clone(),
        checkpoint_dir.clone(),
        keys.clone(),
        owned.clone(),
        metrics.clone(),
        background.clone(),
    ));

    let probe = {
        let (health, active, owned) = (health.clone(), metrics.active.clone(), owned.clone());
        Arc::new(move || {
            let shards = owned.lock().map(|o| o.clone()).unwrap_or_default();
            let combiner = active.get() == 1;
            json!({
                "status": "ok",
                "service": "process",
                "role": if combiner || !shards.is_empty() { "active" } else { "standby" },
                "shards": shards,
                "combiner": combiner,
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

    let config = DriverConfig {
        checkpoint_dir: Some(checkpoint_dir.clone()),
        checkpoint_keys: keys,
        workers: args.workers,
        early_interval: args.early_interval,
        ..DriverConfig::default()
    };
    let shards = provision_shards(&config, log.as_ref()).await?;
    let roles = Roles {
        config,
        log: log.clone(),
        sink: Arc::new(WriterSink(writer.clone())),
        updates: updates.clone(),
        processor_metrics: ProcessorMetrics::new(&registry),
        metrics: metrics.clone(),
        owned: owned.clone(),
        shards: None,
        combiner: None,
        alert_rules: alert_rules.clone(),
    };
    let group = |role: &str| format!("{}-process{role}", args.kafka.kafka_client_id);
    let alive_dir = args.data_dir.join(ALIVE_DIR);
    let (shard_group, shard_events) = Membership::join(
        args.kafka.client_config(&member_client_id()),
        PROCESSOR_SHARDS_TOPIC,
        shards,
        group("-shards"),
        metrics.rebalances.clone(),
        &alive_dir,
    )?;
    let (lease, lease_events) = Membership::join(
        args.kafka.client_config(&member_client_id()),
        PROCESSOR_LEASE_TOPIC,
        1,
        group(""),
        metrics.rebalances.clone(),
        &alive_dir,
    )?;
    tracing::info!(
        shards,
        "Process is running; waiting for shards and the combiner lease"
    );
    let result = roles.follow(shard_events, lease_events, &cancel).await;

    background.cancel();
    tokio::join!(shard_group.leave(), lease.leave());
    drop(updates);
    let _ = publisher.await;
    drop(writer);
    let _ = writer_task.await;
    let _ = tokio::join!(monitor, lag);
    if let Some(sender) = alert_sender {
        let _ = sender.await;
    }
    if let Ok(Err(e)) = http.await {
        tracing::warn!(error = %e, "HTTP server failed");
    }
    result
}

/// Creates the shards topic with one partition per shard, or checks that
/// it has them: every instance must cut the input into the same shards.
async fn provision_shards(config: &DriverConfig, log: &dyn Log) -> anyhow::Result<u32> {
    let shards = shard_count(config, log).await? as u32;
    log.ensure_topic(PROCESSOR_SHARDS_TOPIC, shards)
        .await
        .with_context(|| format!("cannot create {PROCESSOR_SHARDS_TOPIC}"))?;
    let existing = log.partition_count(PROCESSOR_SHARDS_TOPIC).await?;
    anyhow::ensure!(
        existing == shards,
        "{PROCESSOR_SHARDS_TOPIC} has {existing} partitions but --workers {} makes {shards} shards: \
         every process instance needs the same --workers as when the topic was created",
        config.workers
    );
    Ok(shards)
}

/// What this instance runs: some shards, and maybe the combiner.
struct Roles {
    config: DriverConfig,
    log: Arc<dyn Log>,
    sink: Arc<WriterSink>,
    updates: broadcast::Sender<Update>,
    processor_metrics: ProcessorMetrics,
    metrics: ServiceMetrics,
    owned: Arc<Mutex<Vec<usize>>>,
    shards: Option<Running>,
    combiner: Option<Running>,
    alert_rules: Arc<tidemark_processor::alerts::AlertRules>,
}

type Running = (
    CancellationToken,
    JoinHandle<Result<(), tidemark_processor::ProcessorError>>,
);

/// How a role's task ended.
fn outcome(
    joined: Result<Result<(), tidemark_processor::ProcessorError>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match joined {
        Ok(r) => r.map_err(anyhow::Error::new),
        Err(e) => Err(anyhow::Error::new(e).context("it panicked")),
    }
}

/// Waits for a running role to end by itself (never, when there is none).
async fn ended(role: &mut Option<Running>) -> anyhow::Result<()> {
    let joined = match role {
        Some((_, handle)) => handle.await,
        None => std::future::pending().await,
    };
    *role = None;
    // A role never stops by itself: this is a failure. Exiting leaves the
    // groups, so other instances take over.
    outcome(joined).and(Err(anyhow::anyhow!("it stopped unexpectedly")))
}

/// Stops a role, which writes its last checkpoint.
async fn stop(role: &mut Option<Running>) -> anyhow::Result<()> {
    let Some((cancel, handle)) = role.take() else {
        return Ok(());
    };
    cancel.cancel();
    outcome(handle.await)
}

impl Roles {
    async fn follow(
        mut self,
        mut shard_events: mpsc::UnboundedReceiver<GroupEvent>,
        mut lease_events: mpsc::UnboundedReceiver<GroupEvent>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let result = loop {
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                e = ended(&mut self.shards) => break e.context("the shards failed"),
                e = ended(&mut self.combiner) => break e.context("the combiner failed"),
                event = shard_events.recv() => match event {
                    Some(GroupEvent::Assigned(shards)) => self.start_shards(shards),
                    Some(GroupEvent::Revoked(done)) => {
                        let stopped = self.stop_shards().await;
                        let _ = done.send(());
                        if let Err(e) = stopped {
                            break Err(e);
                        }
                    }
                    None => break Err(anyhow::anyhow!("the shard group consumer stopped")),
                },
                event = lease_events.recv() => match event {
                    Some(GroupEvent::Assigned(_)) => self.start_combiner(),
                    Some(GroupEvent::Revoked(done)) => {
                        let stopped = self.stop_combiner().await;
                        let _ = done.send(());
                        if let Err(e) = stopped {
                            break Err(e);
                        }
                    }
                    None => break Err(anyhow::anyhow!("the lease consumer stopped")),
                },
            }
        };
        let stopped = self.stop_shards().await;
        let stopped_combiner = self.stop_combiner().await;
        // Answer revokes that arrive while the consumers leave their groups.
        for mut events in [shard_events, lease_events] {
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    if let GroupEvent::Revoked(done) = event {
                        let _ = done.send(());
                    }
                }
            });
        }
        result.and(stopped).and(stopped_combiner)
    }

    fn start_shards(&mut self, mut shards: Vec<u32>) {
        if self.shards.is_some() || shards.is_empty() {
            return;
        }
        shards.sort_unstable();
        let shards: Vec<usize> = shards.into_iter().map(|s| s as usize).collect();
        tracing::info!(?shards, "Assigned shards; restoring their checkpoints");
        let cancel = CancellationToken::new();
        let (config, log, metrics) = (
            self.config.clone(),
            self.log.clone(),
            self.processor_metrics.clone(),
        );
        self.metrics.shards.set(shards.len() as i64);
        if let Ok(mut owned) = self.owned.lock() {
            owned.clone_from(&shards);
        }
        let stop = cancel.clone();
        let handle = tokio::spawn(async move {
            run_shards(
                sharded(config),
                &shards,
                log,
                PipelineSet::default(),
                metrics,
                stop,
            )
            .await
        });
        self.shards = Some((cancel, handle));
    }

    async fn stop_shards(&mut self) -> anyhow::Result<()> {
        if self.shards.is_none() {
            return Ok(());
        }
        tracing::info!("Releasing the shards: checkpointing");
        let stopped = stop(&mut self.shards).await.context("the shards failed");
        self.metrics.shards.set(0);
        if let Ok(mut owned) = self.owned.lock() {
            owned.clear();
        }
        stopped
    }

    fn start_combiner(&mut self) {
        if self.combiner.is_some() {
            return;
        }
        tracing::info!("Acquired the combiner lease; restoring its checkpoint");
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(run_combiner(
            sharded(self.config.clone()),
            self.log.clone(),
            PipelineSet::default().with_alert_rules(self.alert_rules.clone()),
            self.sink.clone(),
            self.updates.clone(),
            self.processor_metrics.clone(),
            cancel.clone(),
        ));
        self.combiner = Some((cancel, handle));
        self.metrics.active.set(1);
    }

    async fn stop_combiner(&mut self) -> anyhow::Result<()> {
        if self.combiner.is_none() {
            return Ok(());
        }
        tracing::info!("Releasing the combiner lease: checkpointing");
        let stopped = stop(&mut self.combiner)
            .await
            .context("the combiner failed");
        self.metrics.active.set(0);
        stopped
    }
}

fn sharded(driver: DriverConfig) -> ShardedConfig {
    ShardedConfig {
        driver,
        partials_topic: PARTIALS_TOPIC.to_string(),
    }
}

/// The client id of a group member: with the start time in it, as brokers
/// begin a member id with the client id and the range assignor gives the
/// first partitions to the first member id, the oldest instance keeps the
/// lease when another one joins instead of handing it over.
fn member_client_id() -> String {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("process-{started:015}")
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
    updates
        .iter()
        .flat_map(Update::to_messages)
        .map(|m| Record {
            key: Bytes::from(m.key),
            value: Bytes::from(m.value),
            timestamp: now,
        })
        .collect()
}

/// Every 5 s: per-partition lag of the owned shards behind their last
/// checkpoints, and those offsets committed to the offsets group for Kafka
/// tools.
async fn watch_lag(
    log: Arc<dyn Log>,
    kafka: KafkaArgs,
    checkpoint_dir: PathBuf,
    keys: Option<Arc<tidemark_model::KeyRing>>,
    owned: Arc<Mutex<Vec<usize>>>,
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
        let shards = owned.lock().map(|o| o.clone()).unwrap_or_default();
        if shards.is_empty() {
            metrics.partition_lag.reset();
            continue;
        }
        let dir = checkpoint_dir.clone();
        let keys = keys.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let mut offsets = std::collections::BTreeMap::new();
            for shard in shards {
                if let Ok(Some(o)) = shard_offsets(&dir, shard, keys.as_deref()) {
                    offsets.extend(o);
                }
            }
            offsets
        })
        .await;
        let Ok(offsets) = loaded else { continue };
        let mut tpl = TopicPartitionList::new();
        for ((t, p), &offset) in &offsets {
            let _ = tpl.add_partition_offset(t, *p as i32, Offset::Offset(offset as i64));
        }
        // A few at a time: one after another, a busy broker takes longer
        // than the interval for them.
        let lags: Vec<(String, String, i64)> = {
            use futures::StreamExt as _;
            futures::stream::iter(offsets.clone())
                .map(|((t, p), offset)| {
                    let log = log.clone();
                    async move {
                        let end = log.end_offset(&t, p).await.ok()?;
                        Some((t, p.to_string(), end.saturating_sub(offset) as i64))
                    }
                })
                .buffer_unordered(4)
                .filter_map(std::future::ready)
                .collect()
                .await
        };
        // Replaced in one step: shards given up drop out, scrapes never see a gap.
        metrics.partition_lag.reset();
        for (t, p, lag) in lags {
            metrics.partition_lag.with_label_values(&[&t, &p]).set(lag);
        }
        if tpl.count() == 0 {
            continue;
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
