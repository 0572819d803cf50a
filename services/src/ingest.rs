//! `tidemark ingest`: the HTTP collector in front of Kafka.
//!
//! The same collector as the embedded deployment (`tidemark_ingest`), over a
//! [`KafkaLog`](tidemark_log::kafka::KafkaLog): a request is answered 202
//! only once the brokers confirmed every accepted event (`acks=all`,
//! idempotent producer); when they do not within `--produce-timeout`, the
//! answer is 503 with `Retry-After` and nothing is marked as seen, so the
//! client's resend is not taken for a duplicate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use serde_json::json;
use tidemark_ingest::{CorsOrigins, IngestConfig, IngestMetrics, IngestState};
use tidemark_log::Log;
use tidemark_model::topic;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::kafka::{connect_and_provision, BrokerHealth};
use super::{service_router, KafkaArgs};
use tidemark_ingest::RateLimitArgs;
use tidemark_log::metered::{MeteredLog, ProduceMetrics};

#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Address of the HTTP listener: `POST /v1/events`, `/api/v1/health`, `/metrics`.
    #[arg(long, env = "TIDEMARK_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub tls: tidemark_ws_server::tls::TlsArgs,
    /// API key accepted by ingest (repeatable; at least one).
    #[arg(
        long = "api-key",
        env = "TIDEMARK_API_KEYS",
        value_delimiter = ',',
        required = true
    )]
    pub api_keys: Vec<String>,
    /// Foreign origin whose web pages may post events, e.g.
    /// `https://app.example.com` (repeatable; `*` for any). The collector's
    /// own origin always may.
    #[arg(
        long = "cors-origin",
        env = "TIDEMARK_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    #[command(flatten)]
    pub rate_limit: RateLimitArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// TOML file with defaults for these flags (see docs/operations.md).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Binds `--listen` and runs until `cancel`.
pub async fn main(args: IngestArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let listener = super::bind(args.listen).await?;
    run(args, listener, cancel).await
}

/// Runs ingest on `listener` until `cancel`.
pub async fn run(
    args: IngestArgs,
    listener: TcpListener,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let listener = args.tls.listener(listener)?;
    let registry = prometheus::Registry::new();
    let kafka = connect_and_provision(&args.kafka, "ingest", |_| {}, &cancel).await?;
    let log: Arc<dyn Log> = Arc::new(MeteredLog::new(
        kafka.clone(),
        ProduceMetrics::new(&registry)?,
    ));
    let health = BrokerHealth::new(&registry)?;
    let monitor = tokio::spawn(health.clone().monitor(
        log.clone(),
        topic::DEAD_LETTER,
        cancel.clone(),
    ));

    let api_keys: Vec<String> = args
        .api_keys
        .into_iter()
        .filter(|k| !k.is_empty())
        .collect();
    anyhow::ensure!(!api_keys.is_empty(), "ingest needs at least one --api-key");
    let state = IngestState::new(
        IngestConfig {
            api_keys,
            cors_origins: CorsOrigins::new(args.cors_origins),
            rate_limit: args.rate_limit.limit().map_err(anyhow::Error::msg)?,
            ..IngestConfig::default()
        },
        log,
        IngestMetrics::new(&registry)?,
    );
    let probe = {
        let health = health.clone();
        Arc::new(move || {
            json!({
                "status": "ok",
                "service": "ingest",
                "kafka": if health.is_up() { "up" } else { "down" },
            })
        })
    };
    let router = tidemark_ingest::router(Arc::new(state)).merge(service_router(registry, probe));
    tracing::info!(listen = %listener.url()?, "Ingest is running");
    let http_cancel = cancel.clone();
    let served =
        tidemark_ws_server::serve(
            listener,
            router,
            async move { http_cancel.cancelled().await },
        )
        .await;
    cancel.cancel();
    let _ = monitor.await;
    served.context("HTTP server failed")
}
