//! Arguments and process plumbing shared by several commands, in a leaf
//! module so that the commands do not import each other.

use tokio_util::sync::CancellationToken;

pub use tidemark_tsdb_writer::target::InfluxArgs;

/// Per-key rate limits of ingest (`run` and `ingest`).
#[derive(Debug, Clone, clap::Args)]
pub struct RateLimitArgs {
    /// Events a second each ingest key may post (a token bucket; unlimited
    /// by default). A request over it is answered 429 with `Retry-After`
    /// and appends nothing.
    #[arg(long, env = "TIDEMARK_RATE_LIMIT", value_name = "EVENTS_PER_SECOND")]
    pub rate_limit: Option<f64>,
    /// Events a key may post at once above its rate, and the largest
    /// request it may send (default: one second's worth).
    #[arg(
        long,
        env = "TIDEMARK_RATE_LIMIT_BURST",
        value_name = "EVENTS",
        requires = "rate_limit"
    )]
    pub rate_limit_burst: Option<u64>,
}

impl RateLimitArgs {
    /// The limit the flags ask for, if any.
    pub fn limit(&self) -> anyhow::Result<Option<tidemark_ingest::RateLimit>> {
        self.rate_limit
            .map(|rate| tidemark_ingest::RateLimit::new(rate, self.rate_limit_burst))
            .transpose()
            .map_err(|e| anyhow::anyhow!("--rate-limit: {e}"))
    }
}

/// Cancelled on Ctrl-C or SIGTERM.
pub(crate) fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
        tracing::info!("Shutting down");
        trigger.cancel();
    });
    token
}
