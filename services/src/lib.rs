//! The scale-out deployment: ingest, processing and serving as separate
//! processes over Kafka and InfluxDB.
//!
//! - `tidemark ingest` ([`ingest`]): HTTP → Kafka input topics.
//! - `tidemark process` ([`process`]): Kafka input topics → both processor
//!   stages → InfluxDB, and live updates → the `tidemark-updates` topic.
//! - `tidemark serve` ([`serve`]): `tidemark-updates` + InfluxDB → REST,
//!   WebSocket and the dashboard.
//!
//! Each provisions every tidemark topic on start (idempotently) and serves
//! `/api/v1/health` and `/metrics` on its `--listen` address. Flags read
//! `TIDEMARK_*` variables and an optional TOML file, which the `tidemark`
//! binary applies before parsing them.

pub mod ingest;
mod kafka;
pub mod process;
pub mod serve;
mod topics;

pub use kafka::{KafkaArgs, TopicArgs};
pub use topics::{PARTIALS_TOPIC, PROCESSOR_LEASE_TOPIC, PROCESSOR_SHARDS_TOPIC, UPDATES_TOPIC};

use std::sync::Arc;

use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use prometheus::Registry;
use serde_json::Value;

/// Binds a service's `--listen` address.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// The InfluxDB store of `influx` with its tiers created, waiting for the
/// server to come up; `service` names who needs it in the error.
pub async fn open_influx(
    influx: &tidemark_tsdb_writer::target::InfluxArgs,
    service: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Arc<dyn tidemark_tsdb_writer::Store>> {
    use anyhow::Context as _;
    influx
        .influx_url
        .as_ref()
        .with_context(|| format!("{service} needs --influx-url (TIDEMARK_INFLUX_URL)"))?;
    let target = influx.target(std::path::Path::new(""));
    let (store, _) = tidemark_standalone::open_store(&target, cancel).await?;
    Ok(store)
}

/// What a service reports on `/api/v1/health`, computed per request.
pub type HealthProbe = Arc<dyn Fn() -> Value + Send + Sync>;

/// `/api/v1/health` (from `probe`) and `/metrics` (from `registry`), for the
/// services that have no other router providing them.
pub fn service_router(registry: Registry, probe: HealthProbe) -> Router {
    Router::new()
        .route(
            "/api/v1/health",
            get(move || {
                let probe = probe.clone();
                async move { Json(probe()) }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { tidemark_ws_server::prometheus_text(&registry) }
            }),
        )
}

/// A [`KafkaLog`](tidemark_log::kafka::KafkaLog) at `brokers` with every
/// topic provisioned, tuned as `process` reads, for `tidemark bench`.
pub fn bench_log(brokers: &str) -> BoxFuture<'_, anyhow::Result<Arc<dyn tidemark_log::Log>>> {
    Box::pin(open_bench_log(brokers))
}

async fn open_bench_log(brokers: &str) -> anyhow::Result<Arc<dyn tidemark_log::Log>> {
    let mut config = tidemark_log::kafka::KafkaConfig::new(brokers);
    config.client_id = "tidemark-bench".to_string();
    config.read_wait = std::time::Duration::from_millis(5);
    let log = tidemark_log::kafka::KafkaLog::connect(config).await?;
    log.provision(&kafka::all_topics(log.config())).await?;
    Ok(Arc::new(log))
}
