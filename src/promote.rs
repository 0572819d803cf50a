//! `tidemark promote DB` / `--rollback`: which database the serving layer
//! answers from.
//!
//! The choice lives in `DATA_DIR/serving.json`
//! ([`tidemark_ws_server::serving_file`]), which every running server
//! follows; the live processor keeps writing the live database either way.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use tidemark_model::EventTime;
use tidemark_tsdb_writer::target::check_name;
use tidemark_ws_server::serving_file::{
    read_serving, write_serving, Serving, ServingAction, ServingChange,
};

use crate::args::InfluxArgs;

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

/// Runs `tidemark promote`: records the new served database and prints it.
pub async fn run(args: PromoteArgs) -> anyhow::Result<()> {
    let target = args.influx.target(&args.data_dir);
    let live = target.live_database().to_string();
    let current = read_serving(&args.data_dir)?;
    let serving_now = current
        .as_ref()
        .map_or_else(|| live.clone(), |s| s.database.clone());
    let (action, database) = if args.rollback {
        let previous = current
            .as_ref()
            .and_then(|s| s.previous.clone())
            .context("nothing to roll back: no database was promoted")?;
        (ServingAction::Rollback, previous)
    } else {
        let database = args.database.unwrap_or_default();
        check_name(&database)?;
        anyhow::ensure!(
            // Promoting a typo would serve nothing.
            target
                .exists(&database)
                .await
                .with_context(|| format!("cannot look up {}", target.describe(&database)))?,
            "no database {database} ({})",
            target.describe(&database)
        );
        (ServingAction::Promote, database)
    };
    let change = ServingChange {
        time: EventTime::now().to_rfc3339(),
        action,
        database,
        previous: serving_now,
        // Named as the audit log names command-line actors.
        by: format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        ),
    };
    let next = Serving::switched(current, change);
    write_serving(&args.data_dir, &next).with_context(|| {
        format!(
            "cannot record the served database in {}",
            args.data_dir.display()
        )
    })?;
    println!("{}", serde_json::to_string(&next)?);
    Ok(())
}
