//! One replay from start to end: check, plan, read the reference, write,
//! compare.
//!
//! Everything that can refuse the run (the range, the names, the log's
//! retention, the reference store) is done before the target database is
//! created, so a refused replay writes nothing.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use tidemark_log::segment::SegmentLog;
use tidemark_log::Log;
use tidemark_model::{EventTime, Point};
use tidemark_processor::driver::DriverConfig;
use tidemark_processor::runner::usable_workers;
use tidemark_processor::PipelineSet;
use tidemark_tsdb_writer::Store;

use crate::run::{self, Progress, ReadFn, ReplaySummary};
use crate::target::{check_name, default_database_name, StoreTarget};
use crate::verify::{self, Difference};
use crate::{plan, Reach, ReplayError};

/// Points per store write.
const WRITE_CHUNK: usize = 5_000;
/// Batches of points between the combiner and the store writer.
const WRITE_QUEUE: usize = 16;

/// Where a replay reads from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The embedded log, read directly on the worker threads.
    Segment(Arc<SegmentLog>),
    /// Any other log (Kafka, an archive), read through its async API.
    Log(Arc<dyn Log>),
}

impl Source {
    fn log(&self) -> &dyn Log {
        match self {
            Source::Segment(log) => log.as_ref(),
            Source::Log(log) => log.as_ref(),
        }
    }

    fn reader(&self, runtime: tokio::runtime::Handle) -> ReadFn {
        match self {
            Source::Segment(log) => {
                let log = log.clone();
                Arc::new(move |topic, partition, offset, max| {
                    log.read_blocking(topic, partition, offset, max)
                })
            }
            Source::Log(log) => {
                let log = log.clone();
                Arc::new(move |topic, partition, offset, max| {
                    runtime.block_on(read_some(log.as_ref(), topic, partition, offset, max))
                })
            }
        }
    }
}

/// How long a read may come back empty before the partition's end.
const READ_PATIENCE: Duration = Duration::from_secs(60);

/// Reads at least one record unless `offset` is the partition's end: a
/// remote log (Kafka) may answer empty while it is still fetching, which
/// the runner would take for the end of the range.
async fn read_some(
    log: &dyn Log,
    topic: &str,
    partition: u32,
    offset: u64,
    max: usize,
) -> Result<Vec<tidemark_log::StoredRecord>, tidemark_log::LogError> {
    let deadline = std::time::Instant::now() + READ_PATIENCE;
    loop {
        let records = log.read(topic, partition, offset, max).await?;
        if !records.is_empty() || offset >= log.end_offset(topic, partition).await? {
            return Ok(records);
        }
        if std::time::Instant::now() >= deadline {
            return Err(tidemark_log::LogError::Unavailable(format!(
                "{topic}/{partition} returned nothing at offset {offset} for {READ_PATIENCE:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What to replay and where to.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Windows starting at or after this are rebuilt.
    pub from: EventTime,
    /// Windows ending at or before this are rebuilt.
    pub to: EventTime,
    pub pipelines: PipelineSet,
    /// Stage-1 worker threads (lowered to a divisor of the smallest
    /// partition count).
    pub threads: usize,
    /// The store databases live in.
    pub store: StoreTarget,
    /// The database live processing writes (`tidemark` unless configured).
    pub live_database: String,
    /// Target database; `None`: a new one named after the run.
    pub into: Option<String>,
    /// Write over the live database.
    pub in_place: bool,
    /// Compare with the reference and report every difference.
    pub verify: bool,
    /// Overrides the computed lookback.
    pub lookback: Option<Duration>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// When the run started, for the default database name.
    pub started_at: EventTime,
}

/// What a replay did.
#[derive(Debug, Clone)]
pub struct ReplayReport {
    /// The database written.
    pub database: String,
    /// Where it lives.
    pub location: String,
    /// The database compared with, under `--verify`.
    pub compared_with: Option<String>,
    pub summary: ReplaySummary,
    pub reach: Reach,
    /// Under `--verify`: every difference (empty: identical).
    pub differences: Option<Vec<Difference>>,
    /// Under `--verify`: the reference's points inside the range.
    pub reference_points: Option<usize>,
}

/// The database the options write into.
pub fn target_database(opts: &ReplayOptions) -> Result<String, ReplayError> {
    let name = match (&opts.into, opts.in_place) {
        (Some(_), true) => {
            return Err(ReplayError::Invalid(
                "--into and --in-place exclude each other".into(),
            ))
        }
        (_, true) => opts.live_database.clone(),
        (Some(db), false) if *db == opts.live_database => {
            return Err(ReplayError::Invalid(format!(
                "{db} is the live database: pass --in-place to write over it"
            )))
        }
        (Some(db), false) => db.clone(),
        (None, false) => default_database_name(opts.started_at),
    };
    check_name(&name)?;
    Ok(name)
}

fn config_and_reach(opts: &ReplayOptions) -> (DriverConfig, Reach) {
    let config = DriverConfig {
        allowed_lateness: opts.pipelines.allowed_lateness,
        ..DriverConfig::default()
    };
    let mut reach = Reach::of(&opts.pipelines, &config);
    if let Some(lookback) = opts.lookback {
        reach.lookback = lookback;
    }
    (config, reach)
}

/// After [`run_replay`]: keeps `database` up to date from `source` as live
/// does (see [`crate::follow`]) until `cancel`, checkpointing in
/// `checkpoint_dir`.
pub async fn follow_target(
    opts: &ReplayOptions,
    source: Source,
    database: &str,
    checkpoint_dir: std::path::PathBuf,
    checkpoint_keys: Option<Arc<tidemark_model::KeyRing>>,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<(), ReplayError> {
    if opts.in_place {
        return Err(ReplayError::Invalid(
            "--follow writes a new database: it excludes --in-place".into(),
        ));
    }
    let (config, reach) = config_and_reach(opts);
    let plan = plan(source.log(), &config.topics, opts.from, opts.to, reach).await?;
    let store = opts.store.create(database).await?;
    let log: Arc<dyn Log> = match source {
        Source::Segment(log) => log,
        Source::Log(log) => log,
    };
    let workers = usable_workers(opts.threads.max(1), plan.min_partitions);
    crate::follow::follow(
        log,
        &plan,
        opts.pipelines.clone(),
        workers,
        store,
        (checkpoint_dir, checkpoint_keys),
        cancel,
    )
    .await
}

/// Runs a replay of `opts` from `source`.
pub async fn run_replay(opts: ReplayOptions, source: Source) -> Result<ReplayReport, ReplayError> {
    if opts.to <= opts.from {
        return Err(ReplayError::empty_range(opts.from, opts.to));
    }
    let database = target_database(&opts)?;
    let (config, reach) = config_and_reach(&opts);
    let plan = plan(source.log(), &config.topics, opts.from, opts.to, reach).await?;
    let measurements: Vec<&str> = opts
        .pipelines
        .measurements()
        .iter()
        .map(|m| m.name)
        .collect();
    let reference = if opts.verify {
        // In place, the reference is what the target held before this run.
        let store = opts.store.open(&opts.live_database)?;
        Some(verify::stored_points(store.as_ref(), &measurements, plan.from, plan.to).await?)
    } else {
        None
    };

    let store = opts.store.create(&database).await?;
    let runtime = tokio::runtime::Handle::current();
    let (writer, written) = spawn_writer(store, runtime.clone());
    let workers = usable_workers(opts.threads.max(1), plan.min_partitions);
    let progress = Arc::new(Progress::default());
    let read = source.reader(runtime);
    let (set, keep) = (opts.pipelines.clone(), opts.verify);
    let show = opts.progress;
    let summary = tokio::task::spawn_blocking(move || {
        let _bar = show.then(|| run::progress_bar(plan.records(), progress.clone()));
        let mut rebuilt = Vec::new();
        let summary = run::execute(&plan, &set, workers, read, progress, |points| {
            if keep {
                rebuilt.extend(points.iter().cloned());
            }
            writer
                .send(points)
                .map_err(|_| ReplayError::Invalid("the store writer stopped".into()))
        });
        drop(writer);
        summary.map(|s| (s, rebuilt))
    })
    .await
    .map_err(|e| ReplayError::Io(std::io::Error::other(e)))?;
    let written = tokio::task::spawn_blocking(move || written.join())
        .await
        .map_err(|e| ReplayError::Io(std::io::Error::other(e)))?
        .map_err(|_| ReplayError::Io(std::io::Error::other("the store writer panicked")))?;
    // A failed write explains a stopped run better than the run's own error.
    written?;
    let (summary, rebuilt) = summary?;
    let reference_points = reference.as_ref().map(Vec::len);
    let differences = reference.map(|reference| verify::diff(reference, rebuilt));
    Ok(ReplayReport {
        location: opts.store.describe(&database),
        compared_with: opts.verify.then(|| opts.live_database.clone()),
        database,
        summary,
        reach,
        differences,
        reference_points,
    })
}

/// A thread that writes batches of points in order, retrying transient
/// failures; the bounded queue makes a slow store slow the replay down.
fn spawn_writer(
    store: Arc<dyn Store>,
    runtime: tokio::runtime::Handle,
) -> (
    mpsc::SyncSender<Vec<Point>>,
    std::thread::JoinHandle<Result<(), ReplayError>>,
) {
    let (tx, rx) = mpsc::sync_channel::<Vec<Point>>(WRITE_QUEUE);
    let thread = std::thread::spawn(move || {
        for batch in rx {
            for chunk in batch.chunks(WRITE_CHUNK) {
                let mut backoff = Duration::from_millis(100);
                loop {
                    match runtime.block_on(store.write(chunk)) {
                        Ok(()) => break,
                        Err(e) if e.is_retryable() && backoff < Duration::from_secs(10) => {
                            tracing::warn!(error = %e, "Writing replayed points failed; retrying");
                            std::thread::sleep(backoff);
                            backoff *= 2;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(())
    });
    (tx, thread)
}
