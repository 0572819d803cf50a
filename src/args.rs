//! Arguments and process plumbing shared by several commands, in a leaf
//! module so that the commands do not import each other.

use tokio_util::sync::CancellationToken;

pub use tidemark_ingest::RateLimitArgs;
pub use tidemark_tsdb_writer::target::InfluxArgs;

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
