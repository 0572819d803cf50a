//! Arguments and process plumbing shared by several commands, in a leaf
//! module so that the commands do not import each other.

use clap::Args;
use tokio_util::sync::CancellationToken;

/// InfluxDB connection; without `--influx-url` the embedded SQLite store is used.
#[derive(Debug, Clone, Args)]
pub struct InfluxArgs {
    /// InfluxDB 1.x base URL, e.g. `http://127.0.0.1:8086`.
    #[arg(long, env = "TIDEMARK_INFLUX_URL")]
    pub influx_url: Option<String>,
    /// Database holding the tiers.
    #[arg(long, env = "TIDEMARK_INFLUX_DB", default_value = "tidemark")]
    pub influx_db: String,
    #[arg(long, env = "TIDEMARK_INFLUX_USER")]
    pub influx_user: Option<String>,
    #[arg(long, env = "TIDEMARK_INFLUX_PASSWORD", hide_env_values = true)]
    pub influx_password: Option<String>,
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
