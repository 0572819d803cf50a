//! `tidemark serve`: REST, WebSocket and the dashboard over InfluxDB and the
//! `tidemark-updates` topic.
//!
//! Every instance reads every partition of the updates topic by offset (no
//! consumer group), so each one sees every update and any number can run
//! side by side. On start it reads from an hour back, which refills the
//! overview's hot cache (the last hour of minutes) before clients connect.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use prometheus::{IntCounter, IntGaugeVec, Opts, Registry};
use tidemark_log::Log;
use tidemark_model::{EventTime, Update};
use tidemark_ws_server::ServerState;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::kafka::{connect_and_provision, BrokerHealth};
use super::{KafkaArgs, UPDATES_TOPIC};
use tidemark_tsdb_writer::target::InfluxArgs;

pub const UPDATES_RECEIVED_TOTAL: &str = "tidemark_serve_updates_received_total";
pub const UPDATES_LAG: &str = "tidemark_serve_updates_lag_records";

/// How far back the updates topic is read on start: the overview's span.
const REPLAY_SPAN: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the HTTP listener: REST `/api/v1/...`, `/ws`, the
    /// dashboard, `/metrics`.
    #[arg(long, env = "TIDEMARK_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub tls: tidemark_ws_server::tls::TlsArgs,
    /// Folder of the built web dashboard.
    #[arg(long, env = "TIDEMARK_WEB_DIR", default_value = "dashboards/web/dist")]
    pub web_dir: PathBuf,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub influx: InfluxArgs,
    /// Folder whose `serving.json` (written by `tidemark promote --data-dir`)
    /// names the database to serve; without it `--influx-db` is served.
    #[arg(long, env = "TIDEMARK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML file with defaults for these flags (see docs/operations.md).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,
    /// Ingest keys: recognised so that one used on a read route gets 403.
    #[arg(long = "api-key", env = "TIDEMARK_API_KEYS", value_delimiter = ',')]
    pub api_keys: Vec<String>,
    #[command(flatten)]
    pub access: tidemark_ws_server::credentials::AccessArgs,
}

/// Where `serve` keeps its access files when no `--data-dir` is given.
const ACCESS_DIR: &str = "tidemark-data";

/// Binds `--listen` and runs until `cancel`.
pub async fn main(args: ServeArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let listener = super::bind(args.listen).await?;
    run(args, listener, cancel).await
}

/// Runs the serving layer on `listener` until `cancel`.
pub async fn run(
    args: ServeArgs,
    listener: TcpListener,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let listener = args.tls.listener(listener)?;
    let store = super::open_influx(&args.influx, "serve", &cancel).await?;
    let registry = Registry::new();
    let kafka = connect_and_provision(
        &args.kafka,
        "serve",
        |c| c.read_wait = Duration::from_millis(200),
        &cancel,
    )
    .await?;
    let log: Arc<dyn Log> = kafka;
    let health = BrokerHealth::new(&registry)?;
    let received = IntCounter::new(
        UPDATES_RECEIVED_TOTAL,
        "Live updates read from the updates topic.",
    )?;
    let lag = IntGaugeVec::new(
        Opts::new(
            UPDATES_LAG,
            "Records of the updates topic not read yet, per partition.",
        ),
        &["partition"],
    )?;
    registry.register(Box::new(received.clone()))?;
    registry.register(Box::new(lag.clone()))?;

    let (updates, _) = broadcast::channel::<Update>(4096);

    let background = CancellationToken::new();
    let mut tasks = vec![tokio::spawn(health.clone().monitor(
        log.clone(),
        UPDATES_TOPIC,
        background.clone(),
    ))];
    let partitions = log.partition_count(UPDATES_TOPIC).await?;
    let since = EventTime::now().minus(REPLAY_SPAN);
    for partition in 0..partitions {
        tasks.push(tokio::spawn(follow_partition(
            log.clone(),
            partition,
            since,
            updates.clone(),
            received.clone(),
            lag.clone(),
            background.clone(),
        )));
    }

    let access_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(ACCESS_DIR));
    let access = args.access.config(&access_dir, args.api_keys.clone())?;
    let server = Arc::new(ServerState::new(
        store.clone(),
        updates,
        registry,
        Some(args.web_dir),
        tidemark_ws_server::Access::open_with_keys(access, args.access.encryption.keys()?)?,
    ));
    let live = (args.influx.influx_db.clone(), store);
    server.set_live_database(&live.0);
    if let Some(dir) = &args.data_dir {
        // `tidemark promote` switches every serve that shares the folder.
        let target = args.influx.target(dir);
        server.set_serving_dir(dir.clone());
        tidemark_ws_server::serving_file::sync_serving(dir, &target, &live, &server);
        tasks.push(tokio::spawn(
            tidemark_ws_server::serving_file::follow_serving(
                dir.clone(),
                target,
                live,
                server.clone(),
                background.clone(),
            ),
        ));
    }
    let router = tidemark_ws_server::router(server);
    tracing::info!(listen = %listener.url()?, "Serve is running");
    let http_cancel = cancel.clone();
    let served =
        tidemark_ws_server::serve(
            listener,
            router,
            async move { http_cancel.cancelled().await },
        )
        .await;
    background.cancel();
    for t in tasks {
        let _ = t.await;
    }
    served.context("HTTP server failed")
}

/// Reads one partition of the updates topic from `since` on, broadcasting
/// every update, until `cancel`.
async fn follow_partition(
    log: Arc<dyn Log>,
    partition: u32,
    since: EventTime,
    updates: broadcast::Sender<Update>,
    received: IntCounter,
    lag: IntGaugeVec,
    cancel: CancellationToken,
) {
    let label = partition.to_string();
    let mut backoff = Duration::from_millis(100);
    let mut offset = loop {
        match log.offset_for_time(UPDATES_TOPIC, partition, since).await {
            Ok(o) => break o,
            Err(e) => {
                tracing::warn!(error = %e, partition, "Cannot find where to read updates; retrying");
                if !pause(backoff, &cancel).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    let mut lag_checked = tokio::time::Instant::now();
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let read = tokio::select! {
            _ = cancel.cancelled() => return,
            read = log.read(UPDATES_TOPIC, partition, offset, 500) => read,
        };
        let records = match read {
            Ok(r) => {
                backoff = Duration::from_millis(100);
                r
            }
            Err(tidemark_log::LogError::OffsetOutOfRange { earliest, .. }) => {
                offset = earliest;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, partition, "Reading updates failed; retrying");
                if !pause(backoff, &cancel).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        for r in &records {
            offset = r.offset + 1;
            match Update::from_message(&r.value) {
                Ok(u) => {
                    received.inc();
                    // No subscribers yet is fine.
                    let _ = updates.send(u);
                }
                Err(e) => {
                    tracing::warn!(error = %e, partition, offset = r.offset, "Skipping an unreadable update");
                }
            }
        }
        if lag_checked.elapsed() >= Duration::from_secs(5) {
            lag_checked = tokio::time::Instant::now();
            if let Ok(end) = log.end_offset(UPDATES_TOPIC, partition).await {
                lag.with_label_values(&[&label])
                    .set(end.saturating_sub(offset) as i64);
            }
        }
    }
}

/// Sleeps for `d`; `false` if cancelled first.
async fn pause(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
