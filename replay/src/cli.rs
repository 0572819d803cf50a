//! `tidemark replay`: flags to [`ReplayOptions`](crate::ReplayOptions), the
//! source opened, the report printed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::archive::{archive_topic_with_keys, ArchiveLog, Stitched};
use crate::verify::counts;
use crate::{run_replay, ReplayError, ReplayOptions, Source};
use anyhow::Context as _;
use clap::{Args, ValueEnum};
use serde_json::json;
use tidemark_log::segment::SegmentLog;
use tidemark_log::Log;
use tidemark_model::keyring::EncryptionArgs;
use tidemark_model::{EventTime, KeyRing};
use tidemark_processor::driver::DriverConfig;
use tidemark_processor::engagement::ActionWeights;
use tidemark_processor::{PipelineConfigs, Registry};

use tidemark_tsdb_writer::target::InfluxArgs;
use tokio_util::sync::CancellationToken;

/// Where `replay` reads the log from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// The embedded log in `--data-dir`.
    Local,
    /// Kafka (`--kafka-brokers`).
    Kafka,
    /// The archive in `--archive-dir` (`tidemark archive`), in front of the
    /// embedded log in `--data-dir` when there is one.
    Archive,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Rebuild windows starting at or after this time (RFC 3339 or epoch ms).
    #[arg(long, env = "TIDEMARK_REPLAY_FROM", value_parser = parse_time)]
    pub from: EventTime,
    /// Rebuild windows ending at or before this time (RFC 3339 or epoch ms).
    #[arg(long, env = "TIDEMARK_REPLAY_TO", value_parser = parse_time)]
    pub to: EventTime,
    /// Where the log is read from.
    #[arg(
        long,
        value_enum,
        env = "TIDEMARK_REPLAY_SOURCE",
        default_value = "local"
    )]
    pub source: SourceKind,
    /// Pipelines to rebuild, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        env = "TIDEMARK_REPLAY_PIPELINES",
        default_value = "traffic,engagement,trending,ads,patterns"
    )]
    pub pipelines: Vec<String>,
    /// Target database (default: a new `tidemark_replay_<UTC date>_<time>`).
    #[arg(long, env = "TIDEMARK_REPLAY_INTO", conflicts_with = "in_place")]
    pub into: Option<String>,
    /// Write over the live database (safe: writes are idempotent).
    #[arg(long, env = "TIDEMARK_REPLAY_IN_PLACE")]
    pub in_place: bool,
    /// Compare the rebuilt points with the target's existing points (or the
    /// live database's, when writing a new one); exit non-zero on any difference.
    #[arg(long, env = "TIDEMARK_REPLAY_VERIFY")]
    pub verify: bool,
    /// Folder of the embedded log and store.
    #[arg(long, env = "TIDEMARK_DATA_DIR", default_value = "tidemark-data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub influx: InfluxArgs,
    /// Archive folder for `--source archive` (default: `DATA_DIR/archive`).
    #[arg(long, env = "TIDEMARK_ARCHIVE_DIR")]
    pub archive_dir: Option<PathBuf>,
    /// Kafka bootstrap servers, for `--source kafka`.
    #[arg(long, env = "TIDEMARK_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// Stage-1 worker threads (default: one per core).
    #[arg(long, env = "TIDEMARK_REPLAY_THREADS")]
    pub threads: Option<usize>,
    /// Business alert rules (TOML) to rebuild the `alerts` measurement with,
    /// as live evaluates them.
    #[arg(long, env = "TIDEMARK_ALERT_RULES")]
    pub alert_rules: Option<std::path::PathBuf>,
    /// Engagement score weights, e.g. `view=1,like=3` (others keep their defaults).
    #[arg(long, env = "TIDEMARK_ENGAGEMENT_WEIGHTS", value_parser = parse_weights)]
    pub engagement_weights: Option<ActionWeights>,
    /// How far before --from to start reading (default: from the pipelines'
    /// longest window, session gap or attribution window).
    #[arg(long, env = "TIDEMARK_REPLAY_LOOKBACK", value_parser = humantime::parse_duration)]
    pub lookback: Option<Duration>,
    /// Keep running after the range: follow the log into the target database
    /// as live does (checkpoints in `DATA_DIR/replay/<DB>`), until Ctrl-C or SIGTERM.
    #[arg(long, env = "TIDEMARK_REPLAY_FOLLOW", conflicts_with = "in_place")]
    pub follow: bool,
    /// No progress bar (it is hidden anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Opens a sealed log and archive; `--follow` seals its checkpoints.
    #[command(flatten)]
    pub encryption: EncryptionArgs,
}

fn parse_time(text: &str) -> Result<EventTime, String> {
    EventTime::parse(text)
        .ok_or_else(|| format!("{text:?} is neither RFC 3339 nor epoch milliseconds"))
}

fn parse_weights(text: &str) -> Result<ActionWeights, String> {
    let mut w = ActionWeights::default();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not NAME=WEIGHT"))?;
        let value: i64 = value
            .trim()
            .parse()
            .map_err(|_| format!("weight of {name} must be an integer, got {value:?}"))?;
        let slot = match name.trim() {
            "view" => &mut w.view,
            "like" => &mut w.like,
            "comment" => &mut w.comment,
            "share" => &mut w.share,
            "post_created" => &mut w.post_created,
            other => {
                return Err(format!(
                    "unknown action {other:?} (known: view, like, comment, share, post_created)"
                ))
            }
        };
        *slot = value;
    }
    Ok(w)
}

async fn open_source(args: &ReplayArgs, keys: Option<Arc<KeyRing>>) -> anyhow::Result<Source> {
    match args.source {
        SourceKind::Local => {
            let dir = args.data_dir.join("log");
            let log = SegmentLog::open_read_only_with_keys(&dir, keys)
                .with_context(|| format!("cannot open the embedded log in {}", dir.display()))?;
            Ok(Source::Segment(Arc::new(log)))
        }
        SourceKind::Kafka => kafka_source(args).await,
        SourceKind::Archive => {
            let dir = args
                .archive_dir
                .clone()
                .unwrap_or_else(|| args.data_dir.join("archive"));
            let archive = ArchiveLog::open_with_keys(&dir, keys.clone())
                .with_context(|| format!("cannot open the archive in {}", dir.display()))?;
            let log_dir = args.data_dir.join("log");
            let log = match log_dir.is_dir() {
                true => Some(
                    Arc::new(SegmentLog::open_read_only_with_keys(&log_dir, keys)?) as Arc<dyn Log>,
                ),
                false => None,
            };
            Ok(Source::Log(Arc::new(Stitched { archive, log })))
        }
    }
}

#[cfg(feature = "kafka")]
async fn kafka_source(args: &ReplayArgs) -> anyhow::Result<Source> {
    use tidemark_log::kafka::{KafkaConfig, KafkaLog};
    let brokers = args
        .kafka_brokers
        .clone()
        .context("--source kafka needs --kafka-brokers")?;
    let log = KafkaLog::connect(KafkaConfig::new(brokers.clone()))
        .await
        .with_context(|| format!("cannot reach the Kafka brokers {brokers}"))?;
    Ok(Source::Log(Arc::new(log)))
}

#[cfg(not(feature = "kafka"))]
async fn kafka_source(_args: &ReplayArgs) -> anyhow::Result<Source> {
    anyhow::bail!("this tidemark was built without Kafka support (cargo feature `kafka`)")
}

/// Runs `tidemark replay`: verify differences one per line, then the summary
/// as one JSON line, on stdout.
/// `shutdown` makes the token that stops `--follow`, only once it follows,
/// so that Ctrl-C ends a one-off replay as it ends any process.
pub async fn run(
    args: ReplayArgs,
    shutdown: impl FnOnce() -> CancellationToken,
) -> anyhow::Result<()> {
    let keys = args.encryption.keys()?;
    let lateness = DriverConfig::default().allowed_lateness;
    let mut configs = PipelineConfigs::default();
    if let Some(weights) = args.engagement_weights {
        configs.engagement.weights = weights;
    }
    let pipelines = Registry::builtin(&configs)
        .select(&args.pipelines, lateness)
        .map_err(|e| anyhow::anyhow!(ReplayError::Invalid(e.to_string())))?;
    let pipelines = match &args.alert_rules {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the alert rules {}", path.display()))?;
            let rules = tidemark_processor::alerts::AlertRules::from_toml(&text)
                .map_err(|e| anyhow::anyhow!(ReplayError::Invalid(e.to_string())))?;
            pipelines.with_alert_rules(std::sync::Arc::new(rules))
        }
        None => pipelines,
    };
    if args.to <= args.from {
        anyhow::bail!(
            "--to ({}) must be after --from ({})",
            args.to.to_rfc3339(),
            args.from.to_rfc3339()
        );
    }
    let store = args.influx.target(&args.data_dir);
    let live_database = store.live_database().to_string();
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
    });
    let options = ReplayOptions {
        from: args.from,
        to: args.to,
        pipelines,
        threads,
        store,
        live_database,
        into: args.into.clone(),
        in_place: args.in_place,
        verify: args.verify,
        lookback: args.lookback,
        progress: !args.no_progress,
        started_at: EventTime::now(),
    };
    // Names are checked before the source is opened, so a bad one never
    // waits on a broker.
    crate::job::target_database(&options)?;
    let source = open_source(&args, keys.clone()).await?;
    let report = run_replay(options.clone(), source.clone()).await?;
    let mut verify = serde_json::Value::Null;
    if let Some(differences) = &report.differences {
        for d in differences {
            println!("{d}");
        }
        let (missing, extra, changed) = counts(differences);
        verify = json!({
            "compared_with": report.compared_with,
            "reference_points": report.reference_points,
            "missing": missing,
            "extra": extra,
            "changed": changed,
        });
    }
    let s = &report.summary;
    println!(
        "{}",
        json!({
            "database": report.database,
            "location": report.location,
            "events": s.events,
            "accepted": s.accepted,
            "duplicates": s.duplicates,
            "too_late": s.too_late,
            "windows": s.windows,
            "points": s.points,
            "measurements": s.measurements,
            "workers": s.workers,
            "seconds": s.seconds,
            "events_per_sec": s.events_per_sec,
            "lookback_seconds": report.reach.lookback.as_secs(),
            "lookahead_seconds": report.reach.lookahead.as_secs(),
            "verify": verify,
        })
    );
    if let Some(d) = report.differences.as_ref().filter(|d| !d.is_empty()) {
        return Err(ReplayError::Differences(d.len()).into());
    }
    if args.follow {
        eprintln!(
            "Following the log into {} (Ctrl-C or SIGTERM stops)",
            report.database
        );
        let checkpoints = args.data_dir.join("replay").join(&report.database);
        crate::job::follow_target(
            &options,
            source,
            &report.database,
            checkpoints,
            keys,
            shutdown(),
        )
        .await?;
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ArchiveArgs {
    /// Topic to archive.
    #[arg(long, env = "TIDEMARK_ARCHIVE_TOPIC")]
    pub topic: String,
    /// Archive records before the first one at or after this time (RFC 3339 or epoch ms).
    #[arg(long, env = "TIDEMARK_ARCHIVE_BEFORE", value_parser = parse_time)]
    pub before: EventTime,
    /// Folder of the embedded log.
    #[arg(long, env = "TIDEMARK_DATA_DIR", default_value = "tidemark-data")]
    pub data_dir: PathBuf,
    /// Where the archive goes (default: `DATA_DIR/archive`).
    #[arg(long, env = "TIDEMARK_ARCHIVE_DIR")]
    pub archive_dir: Option<PathBuf>,
    /// Opens a sealed log and seals the archive files.
    #[command(flatten)]
    pub encryption: EncryptionArgs,
}

/// Runs `tidemark archive`: prints what was written as one JSON line.
pub async fn archive(args: ArchiveArgs) -> anyhow::Result<()> {
    let keys = args.encryption.keys()?;
    let log_dir = args.data_dir.join("log");
    let log = SegmentLog::open_read_only_with_keys(&log_dir, keys.clone())
        .with_context(|| format!("cannot open the embedded log in {}", log_dir.display()))?;
    let dir = args
        .archive_dir
        .unwrap_or_else(|| args.data_dir.join("archive"));
    let report =
        archive_topic_with_keys(&log, &args.topic, args.before, &dir, keys.as_deref()).await?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
