//! The single-process deployment: every stage in one process over the
//! embedded segment log and the embedded (or an InfluxDB) store, behind one
//! HTTP listener.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tidemark_ingest::{CorsOrigins, IngestConfig, IngestMetrics, IngestState};
use tidemark_log::segment::{SegmentLog, SegmentLogConfig};
use tidemark_log::Log;
use tidemark_model::{topic, EventTime, KeyRing, Point, Update};
use tidemark_processor::driver::{
    run_driver, BoxFuture, DriverConfig, PointSink, ProcessorMetrics,
};
use tidemark_processor::ProcessorError;
use tidemark_tsdb_writer::sqlite::SqliteStore;
use tidemark_tsdb_writer::target::sqlite_path;
use tidemark_tsdb_writer::writer::{BatchingWriter, WriterConfig, WriterHandle, WriterMetrics};
use tidemark_tsdb_writer::Store;
use tidemark_tsdb_writer::StoreTarget;
use tidemark_ws_server::ServerState;

use tokio_util::sync::CancellationToken;

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub data_dir: PathBuf,
    pub api_keys: Vec<String>,
    /// Foreign origins allowed to post to ingest (`--cors-origin`).
    pub cors_origins: Vec<String>,
    /// Events a second (and burst) each ingest key may post (`--rate-limit`).
    pub rate_limit: Option<tidemark_ingest::RateLimit>,
    /// Where the live database and replays' databases live.
    pub store: StoreTarget,
    pub web_dir: Option<PathBuf>,
    /// Stage-1 processor workers.
    pub workers: usize,
    /// How often early results of open windows are published.
    pub early_interval: Duration,
    /// Where the users file, the JWT key and the audit log are (defaults
    /// in `data_dir`).
    pub access: tidemark_ws_server::credentials::AccessArgs,
    /// Seals the log, the checkpoints and the audit log
    /// (`--encryption-key-file`); `None` writes them in the clear.
    pub keys: Option<Arc<KeyRing>>,
    /// Business alert rules (`--alert-rules`) and where alerts go
    /// (`--alertmanager-url`).
    pub alerts: tidemark_ws_server::alerting::AlertArgs,
}

/// Partitions per topic of the embedded log. One process on one machine gains
/// nothing from Kafka's 32/32/16 (the reference design's counts, kept for the
/// Kafka deployment), while every partition a request touches costs an fsync
/// before ingest may acknowledge it.
pub const EMBEDDED_PARTITIONS: u32 = 4;

/// Opens the embedded log under `data_dir/log` with every topic provisioned
/// (a topic that exists keeps its partition count).
pub async fn open_log(data_dir: &std::path::Path) -> anyhow::Result<Arc<SegmentLog>> {
    open_log_with_keys(data_dir, None).await
}

/// [`open_log`] with batches sealed by `keys`.
pub async fn open_log_with_keys(
    data_dir: &std::path::Path,
    keys: Option<Arc<KeyRing>>,
) -> anyhow::Result<Arc<SegmentLog>> {
    let log = SegmentLog::open_with_keys(data_dir.join("log"), SegmentLogConfig::default(), keys)
        .with_context(|| format!("cannot open the log in {}", data_dir.display()))?;
    for t in topic::INPUT_TOPICS.iter().chain([&topic::DEAD_LETTER]) {
        log.ensure_topic(t, topic::default_partitions(t).min(EMBEDDED_PARTITIONS))
            .await?;
    }
    Ok(Arc::new(log))
}

/// Opens the configured store and creates its tiers, waiting for InfluxDB to come up.
/// The embedded store is returned a second time, typed, for its retention pruning.
pub async fn open_store(
    target: &StoreTarget,
    cancel: &CancellationToken,
) -> anyhow::Result<(Arc<dyn Store>, Option<Arc<SqliteStore>>)> {
    let live = target.live_database();
    let (store, sqlite): (Arc<dyn Store>, _) = match target {
        StoreTarget::Sqlite { data_dir } => {
            let sqlite = Arc::new(SqliteStore::open(sqlite_path(data_dir, live))?);
            (sqlite.clone(), Some(sqlite))
        }
        StoreTarget::Influx { .. } => (target.open(live)?, None),
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        match store.ensure_schema().await {
            Ok(()) => return Ok((store, sqlite)),
            Err(error) if error.is_retryable() && !cancel.is_cancelled() => {
                tracing::warn!(error = %error, "Store not ready; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(error) => return Err(error).context("cannot prepare the store"),
        }
    }
}

/// Runs every stage until `cancel`; then stops the front end first and lets the
/// back end drain (processor checkpoint, writer flush).
pub async fn run(
    config: RunConfig,
    listener: impl Into<tidemark_ws_server::tls::HttpListener>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    let registry = prometheus::Registry::new();
    let log = open_log_with_keys(&config.data_dir, config.keys.clone()).await?;
    let checkpoints = config.data_dir.join("checkpoints");
    tidemark_processor::checkpoint::check_keyed(&checkpoints, config.keys.as_deref())
        .context("cannot restore the processor checkpoint")?;
    let (store, sqlite) = open_store(&config.store, &cancel).await?;

    let (writer, writer_task) = BatchingWriter::spawn(
        store.clone(),
        WriterConfig::default(),
        WriterMetrics::new(&registry)?,
    );
    let (updates, _) = tokio::sync::broadcast::channel::<Update>(1024);

    // The rules file the rules API edits: `--alert-rules`, or one in the
    // data folder.
    let rules_book = Arc::new(
        (config.alerts).book(
            config
                .data_dir
                .join(tidemark_ws_server::alerting::RULES_FILE),
        )?,
    );
    let alert_rules = rules_book.rules();
    let processor_cancel = CancellationToken::new();
    let driver_config = DriverConfig {
        checkpoint_dir: Some(checkpoints),
        checkpoint_keys: config.keys.clone(),
        workers: config.workers,
        early_interval: config.early_interval,
        alert_rules: Some(rules_book.subscribe()),
        ..DriverConfig::default()
    };
    let processor = tokio::spawn(run_driver(
        driver_config,
        log.clone() as Arc<dyn Log>,
        tidemark_processor::PipelineSet::default().with_alert_rules(alert_rules.clone()),
        Arc::new(WriterSink(writer.clone())),
        updates.clone(),
        ProcessorMetrics::new(&registry),
        processor_cancel.clone(),
    ));

    let ingest = IngestState::new(
        IngestConfig {
            api_keys: config.api_keys.clone(),
            cors_origins: CorsOrigins::new(config.cors_origins.clone()),
            rate_limit: config.rate_limit,
            ..IngestConfig::default()
        },
        log.clone() as Arc<dyn Log>,
        IngestMetrics::new(&registry)?,
    );
    let access = config
        .access
        .config(&config.data_dir, config.api_keys.clone())?;
    let access = tidemark_ws_server::Access::open_with_keys(access, config.keys.clone())?;
    let server = Arc::new(ServerState::new(
        store.clone(),
        updates.clone(),
        registry.clone(),
        config.web_dir.clone(),
        access,
    ));
    if let Some(key) = config.api_keys.first() {
        server.set_dashboard_ingest_key(key.clone());
    }
    server.set_alert_rules(rules_book.clone());
    let target = config.store.clone();
    let live = (target.live_database().to_string(), store.clone());
    server.set_live_database(&live.0);
    server.set_serving_dir(config.data_dir.clone());
    tidemark_ws_server::serving_file::sync_serving(&config.data_dir, &target, &live, &server);
    tokio::spawn(tidemark_ws_server::serving_file::follow_serving(
        config.data_dir.clone(),
        target,
        live,
        server.clone(),
        cancel.clone(),
    ));
    let router =
        tidemark_ingest::router(Arc::new(ingest)).merge(tidemark_ws_server::router(server));

    let housekeeping = tokio::spawn(housekeeping(log.clone(), sqlite, cancel.clone()));
    let alert_sender = (config.alerts).spawn_sender(
        rules_book.subscribe(),
        updates.subscribe(),
        processor_cancel.clone(),
    );
    let http_cancel = cancel.clone();
    tidemark_ws_server::serve(
        listener,
        router,
        async move { http_cancel.cancelled().await },
    )
    .await
    .context("HTTP server failed")?;

    processor_cancel.cancel();
    let processed = processor.await.context("processor task panicked")?;
    if let Some(sender) = alert_sender {
        let _ = sender.await;
    }
    drop(writer);
    let _ = writer_task.await;
    housekeeping.abort();
    processed.context("processor failed")?;
    Ok(())
}

/// Retention of the log and the embedded store, once a minute.
async fn housekeeping(
    log: Arc<SegmentLog>,
    sqlite: Option<Arc<SqliteStore>>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = EventTime::now();
        let retention_log = log.clone();
        match tokio::task::spawn_blocking(move || retention_log.enforce_retention(now)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(error = %error, "Log retention failed"),
            Err(error) => tracing::warn!(error = %error, "Log retention task failed"),
        }
        if let Some(sqlite) = &sqlite {
            if let Err(error) = sqlite.prune(now).await {
                tracing::warn!(error = %error, "Store retention failed");
            }
        }
    }
}

/// The store writer as the processor's point sink.
#[derive(Debug, Clone)]
pub struct WriterSink(pub WriterHandle);

impl PointSink for WriterSink {
    fn send(&self, points: Vec<Point>) -> BoxFuture<'_, Result<(), ProcessorError>> {
        Box::pin(async move { Ok(self.0.send(points).await?) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ProcessorError>> {
        Box::pin(async move { Ok(self.0.flush().await?) })
    }
}
