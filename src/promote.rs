//! `tidemark promote DB` / `--rollback`: which database the serving layer
//! answers from.
//!
//! The choice lives in `DATA_DIR/serving.json` (`{"database": ..,
//! "previous": ..}`), replaced atomically (write, fsync, rename), so it
//! survives restarts. A running `tidemark run` reads it every
//! [`POLL`] and switches its REST API over in one step
//! ([`tidemark_ws_server::ServingStore::switch`]); the live processor keeps
//! writing the live database either way.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::{Deserialize, Serialize};
use tidemark_replay::target::{check_name, sqlite_path};
use tidemark_replay::StoreTarget;
use tidemark_tsdb_writer::Store;
use tidemark_ws_server::ServerState;
use tokio_util::sync::CancellationToken;

use crate::args::InfluxArgs;

/// The file holding the served database.
pub const SERVING_FILE: &str = "serving.json";

/// How often a running server looks at [`SERVING_FILE`].
pub const POLL: Duration = Duration::from_millis(200);

/// What `serving.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serving {
    /// The database the REST API answers from.
    pub database: String,
    /// The one served before, for `--rollback`.
    pub previous: Option<String>,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// Database to serve (a replay's target).
    #[arg(required_unless_present = "rollback", conflicts_with = "rollback")]
    pub database: Option<String>,
    /// Serve the database served before the last promote again.
    #[arg(long)]
    pub rollback: bool,
    /// The `run` data folder.
    #[arg(long, env = "TIDEMARK_DATA_DIR", default_value = "tidemark-data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub influx: InfluxArgs,
}

fn serving_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SERVING_FILE)
}

/// The served database recorded in `data_dir`, if any.
pub fn read_serving(data_dir: &Path) -> anyhow::Result<Option<Serving>> {
    let path = serving_path(data_dir);
    match std::fs::read(&path) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("unreadable {}", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_serving(data_dir: &Path, serving: &Serving) -> anyhow::Result<()> {
    use std::io::Write as _;
    let tmp = data_dir.join(format!("{SERVING_FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec(serving)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, serving_path(data_dir))?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(())
}

/// Whether database `name` exists (promoting a typo would serve nothing).
async fn exists(target: &StoreTarget, name: &str) -> anyhow::Result<bool> {
    match target {
        StoreTarget::Sqlite { data_dir } => Ok(sqlite_path(data_dir, name).exists()),
        StoreTarget::Influx { config } => {
            let mut request = reqwest::Client::new()
                .get(format!("{}/query", config.url.trim_end_matches('/')))
                .query(&[("q", "SHOW DATABASES")]);
            if let Some(user) = &config.username {
                request = request.basic_auth(user, config.password.as_ref());
            }
            let reply: serde_json::Value = request
                .send()
                .await
                .with_context(|| format!("cannot reach InfluxDB at {}", config.url))?
                .json()
                .await?;
            let names = &reply["results"][0]["series"][0]["values"];
            Ok(names
                .as_array()
                .into_iter()
                .flatten()
                .any(|row| row[0].as_str() == Some(name)))
        }
    }
}

/// Runs `tidemark promote`: records the new served database and prints it.
pub async fn run(args: PromoteArgs) -> anyhow::Result<()> {
    let (target, live) = crate::replay_cmd::store_target(&args.data_dir, &args.influx);
    let current = read_serving(&args.data_dir)?;
    let serving_now = current
        .as_ref()
        .map_or_else(|| live.clone(), |s| s.database.clone());
    let next = if args.rollback {
        let previous = current
            .and_then(|s| s.previous)
            .context("nothing to roll back: no database was promoted")?;
        Serving {
            database: previous,
            previous: Some(serving_now),
        }
    } else {
        let database = args.database.unwrap_or_default();
        check_name(&database)?;
        anyhow::ensure!(
            exists(&target, &database).await?,
            "no database {database} ({})",
            target.describe(&database)
        );
        Serving {
            database,
            previous: Some(serving_now),
        }
    };
    write_serving(&args.data_dir, &next)?;
    println!("{}", serde_json::to_string(&next)?);
    Ok(())
}

/// Makes `server` answer from the database named in `data_dir`'s
/// [`SERVING_FILE`] (the live one, `live`, when there is none).
pub fn sync_serving(
    data_dir: &Path,
    target: &StoreTarget,
    live: &(String, Arc<dyn Store>),
    server: &ServerState,
) {
    let wanted = match read_serving(data_dir) {
        Ok(s) => s.map_or_else(|| live.0.clone(), |s| s.database),
        Err(error) => {
            tracing::warn!(error = %error, "Ignoring the serving file");
            return;
        }
    };
    if wanted == server.serving().name() {
        return;
    }
    let store = if wanted == live.0 {
        Ok(live.1.clone())
    } else {
        target.open(&wanted)
    };
    match store {
        Ok(store) => {
            server.serving().switch(&wanted, store);
            tracing::info!(database = %wanted, "Serving database switched");
        }
        Err(error) => tracing::warn!(error = %error, database = %wanted, "Cannot serve database"),
    }
}

/// Runs [`sync_serving`] every [`POLL`] until `cancel`.
pub async fn follow_serving(
    data_dir: PathBuf,
    target: StoreTarget,
    live: (String, Arc<dyn Store>),
    server: Arc<ServerState>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => sync_serving(&data_dir, &target, &live, &server),
        }
    }
}
