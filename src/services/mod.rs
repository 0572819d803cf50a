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
//! `TIDEMARK_*` variables and an optional TOML file ([`config_file`]).

pub mod config_file;
pub mod ingest;
mod kafka;
pub mod process;
pub mod serve;

pub use kafka::{KafkaArgs, MeteredLog, TopicArgs};

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::Registry;
use serde_json::Value;

/// Topic of live updates, from `process` to every `serve`.
pub const UPDATES_TOPIC: &str = "tidemark-updates";
/// Topic of stage-1 partials on their way to the combiner, which may run in
/// another `process` instance (see [`tidemark_processor::shards`]).
pub const PARTIALS_TOPIC: &str = tidemark_model::topic::PARTIALS;
/// One-partition topic whose consumer-group assignment decides which
/// `process` instance runs the combiner.
pub const PROCESSOR_LEASE_TOPIC: &str = "tidemark-processor-lease";
/// Topic with one partition per stage-1 shard, whose consumer-group
/// assignment spreads the shards over the `process` instances (created by
/// `process` with `--workers` partitions).
pub const PROCESSOR_SHARDS_TOPIC: &str = "tidemark-processor-shards";

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
    influx: &crate::cli::InfluxArgs,
    service: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Arc<dyn tidemark_tsdb_writer::Store>> {
    use anyhow::Context as _;
    let url = influx
        .influx_url
        .clone()
        .with_context(|| format!("{service} needs --influx-url (TIDEMARK_INFLUX_URL)"))?;
    let config = crate::app::RunConfig {
        data_dir: std::path::PathBuf::new(),
        api_keys: Vec::new(),
        cors_origins: Vec::new(),
        store: crate::app::StoreChoice::Influx {
            url,
            database: influx.influx_db.clone(),
            username: influx.influx_user.clone(),
            password: influx.influx_password.clone(),
        },
        web_dir: None,
        workers: 1,
        early_interval: tidemark_processor::driver::DriverConfig::default().early_interval,
        access: Default::default(),
    };
    let (store, _) = crate::app::open_store(&config, cancel).await?;
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
                async move { prometheus_text(&registry) }
            }),
        )
}

/// A [`KafkaLog`](tidemark_log::kafka::KafkaLog) at `brokers` with every
/// topic provisioned, tuned as `process` reads, for `tidemark bench`.
pub async fn bench_log(brokers: &str) -> anyhow::Result<Arc<dyn tidemark_log::Log>> {
    let mut config = tidemark_log::kafka::KafkaConfig::new(brokers);
    config.client_id = "tidemark-bench".to_string();
    config.read_wait = std::time::Duration::from_millis(5);
    let log = tidemark_log::kafka::KafkaLog::connect(config).await?;
    log.provision(&kafka::all_topics(log.config())).await?;
    Ok(Arc::new(log))
}

fn prometheus_text(registry: &Registry) -> Response {
    use prometheus::Encoder as _;
    let encoder = prometheus::TextEncoder::new();
    let mut out = Vec::new();
    match encoder.encode(&registry.gather(), &mut out) {
        Ok(()) => (
            [(header::CONTENT_TYPE, encoder.format_type().to_string())],
            out,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
