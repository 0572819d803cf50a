//! Arguments and process plumbing shared by several commands, in a leaf
//! module so that the commands do not import each other.

use std::path::Path;
use std::time::Duration;

use clap::Args;
use tidemark_tsdb_writer::influx::InfluxConfig;
use tidemark_tsdb_writer::StoreTarget;
use tokio_util::sync::CancellationToken;

/// Timeout of each InfluxDB request: long enough for `replay --verify`'s
/// reads of a whole range on a busy machine.
const INFLUX_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

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

impl InfluxArgs {
    /// Where databases live: InfluxDB with `--influx-url` (its database the
    /// live one), else the embedded store in `data_dir`.
    pub fn target(&self, data_dir: &Path) -> StoreTarget {
        match &self.influx_url {
            Some(url) => StoreTarget::Influx {
                config: InfluxConfig {
                    url: url.clone(),
                    database: self.influx_db.clone(),
                    username: self.influx_user.clone(),
                    password: self.influx_password.clone(),
                    timeout: INFLUX_REQUEST_TIMEOUT,
                },
            },
            None => StoreTarget::Sqlite {
                data_dir: data_dir.to_path_buf(),
            },
        }
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
