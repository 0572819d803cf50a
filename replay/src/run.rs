//! Driving both stages over a [`Plan`], by event time alone.
//!
//! [`execute`] hands the plan's ranges to the processor's own parallel runner
//! (one thread per stage-1 worker, the combiner on the calling thread): the
//! watermarks come from the data, and at the end every window is fired.
//! Points outside `[from, to]` are dropped ([`window::inside`]); the rest go
//! to `emit` in the order the combiner fired them, so a corrected window
//! follows its first version and overwrites it.
//!
//! Reading goes through [`Prefetch`]: per partition, the next batch is read
//! and decompressed on the rayon pool while the worker runs the pipelines
//! over the current one, so decoding the log overlaps with processing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tidemark_log::{LogError, StoredRecord};
use tidemark_model::{wire, EventTime, Point};
use tidemark_processor::driver::DriverConfig;
use tidemark_processor::runner::{run_parallel, RecordSource};
use tidemark_processor::{PipelineSet, ProcessorError};

use crate::plan::Plan;
use crate::{window, ReplayError};

/// What a replay did, printed as its summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplaySummary {
    /// Records read from the log (the range plus lookback and lookahead).
    pub events: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub too_late: u64,
    pub decode_errors: u64,
    /// Distinct windows (tier, start, length) among the points written.
    pub windows: u64,
    /// Points inside the range, written (or compared).
    pub points: u64,
    /// Points per measurement.
    pub measurements: BTreeMap<String, u64>,
    pub workers: usize,
    pub seconds: f64,
    pub events_per_sec: f64,
}

/// Counters the reading threads update and the progress bar shows.
#[derive(Debug, Default)]
pub struct Progress {
    pub records: AtomicU64,
    /// Newest event time read so far (ms).
    pub position: AtomicI64,
}

/// A [`RecordSource`] that counts what it reads.
struct Counting<S> {
    inner: S,
    progress: Arc<Progress>,
}

impl<S: RecordSource> RecordSource for Counting<S> {
    fn read(
        &mut self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        let records = self.inner.read(topic, partition, offset, max)?;
        self.progress
            .records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        if let Some(newest) = records.iter().map(|r| r.timestamp.0).max() {
            self.progress.position.fetch_max(newest, Ordering::Relaxed);
        }
        Ok(records)
    }
}

/// A blocking read of one partition, shareable with the rayon pool.
pub type ReadFn =
    Arc<dyn Fn(&str, u32, u64, usize) -> Result<Vec<StoredRecord>, LogError> + Send + Sync>;

type Pending = mpsc::Receiver<(u64, usize, Result<Vec<StoredRecord>, LogError>)>;

/// Reads one batch ahead per partition on the rayon pool, never past the
/// partition's range; dropping it waits for the reads in flight, so none
/// outlives the run (and the runtime a remote read needs).
pub struct Prefetch {
    read: ReadFn,
    ends: Arc<HashMap<(String, u32), u64>>,
    pending: HashMap<(String, u32), Pending>,
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        for (_, rx) in self.pending.drain() {
            let _ = rx.recv();
        }
    }
}

impl std::fmt::Debug for Prefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetch")
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Prefetch {
    /// Reads with `read`, each partition up to its end in `ends` (exclusive).
    pub fn new(read: ReadFn, ends: Arc<HashMap<(String, u32), u64>>) -> Prefetch {
        Prefetch {
            read,
            ends,
            pending: HashMap::new(),
        }
    }

    fn spawn(&mut self, topic: &str, partition: u32, offset: u64, max: usize) {
        let key = (topic.to_string(), partition);
        if self.ends.get(&key).is_some_and(|&end| offset >= end) {
            return;
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let (read, t) = (self.read.clone(), topic.to_string());
        rayon::spawn(move || {
            let _ = tx.send((offset, max, read(&t, partition, offset, max)));
        });
        self.pending.insert(key, rx);
    }
}

impl RecordSource for Prefetch {
    fn read(
        &mut self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        let ahead = self
            .pending
            .remove(&(topic.to_string(), partition))
            .and_then(|rx| rx.recv().ok())
            .filter(|(o, m, _)| *o == offset && *m >= max);
        let mut records = match ahead {
            Some((_, _, result)) => result?,
            None => (self.read)(topic, partition, offset, max)?,
        };
        records.truncate(max);
        if let Some(last) = records.last() {
            self.spawn(topic, partition, last.offset + 1, max);
        }
        Ok(records)
    }
}

/// Runs both stages over `plan` with `workers` stage-1 threads; every point
/// inside the range goes to `emit`. `read` reads a partition (blocking).
pub fn execute(
    plan: &Plan,
    set: &PipelineSet,
    workers: usize,
    read: ReadFn,
    progress: Arc<Progress>,
    mut emit: impl FnMut(Vec<Point>) -> Result<(), ReplayError>,
) -> Result<ReplaySummary, ReplayError> {
    let config = DriverConfig {
        allowed_lateness: set.allowed_lateness,
        ..DriverConfig::default()
    };
    let started = Instant::now();
    let mut windows = BTreeSet::new();
    let mut points = 0u64;
    let mut measurements: BTreeMap<String, u64> = BTreeMap::new();
    let mut failure = None;
    let (from, to) = (plan.from, plan.to);
    let ends: Arc<HashMap<(String, u32), u64>> = Arc::new(
        plan.ranges
            .iter()
            .filter_map(|r| Some(((r.topic.clone(), r.partition), r.to?)))
            .collect(),
    );
    let run = run_parallel(
        &config.worker(),
        config.max_batch,
        set,
        workers,
        false,
        plan.ranges.clone(),
        || Counting {
            inner: Prefetch::new(read.clone(), ends.clone()),
            progress: progress.clone(),
        },
        wire::decode_into,
        |batch| {
            let kept: Vec<Point> = batch
                .into_iter()
                .filter(|p| window::inside(p, from, to))
                .collect();
            if kept.is_empty() {
                return Ok(());
            }
            for p in &kept {
                windows.insert((p.tier, p.time, window::window_length(p)));
                match measurements.get_mut(&p.measurement) {
                    Some(n) => *n += 1,
                    None => {
                        measurements.insert(p.measurement.clone(), 1);
                    }
                }
            }
            points += kept.len() as u64;
            emit(kept).map_err(|e| {
                let message = e.to_string();
                failure = Some(e);
                ProcessorError::Io(std::io::Error::other(message))
            })
        },
    );
    let run = match (run, failure) {
        (_, Some(e)) => return Err(e),
        (run, None) => run?,
    };
    let seconds = started.elapsed().as_secs_f64();
    let events = progress.records.load(Ordering::Relaxed);
    Ok(ReplaySummary {
        events,
        accepted: run.counts.accepted,
        duplicates: run.counts.duplicates,
        too_late: run.counts.too_late,
        decode_errors: run.decode_errors,
        windows: windows.len() as u64,
        points,
        measurements,
        workers,
        seconds: (seconds * 1000.0).round() / 1000.0,
        events_per_sec: (events as f64 / seconds.max(1e-9)).round(),
    })
}

/// A progress bar on stderr (hidden when stderr is not a terminal) showing
/// events read, events/s, the event-time position and the ETA; updated by a
/// ticker thread until the returned guard is dropped.
pub fn progress_bar(total: u64, progress: Arc<Progress>) -> ProgressGuard {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:30} {human_pos}/{human_len} events  {msg}  ETA {eta}")
    {
        bar.set_style(style);
    }
    let (stop, stopped) = mpsc::channel::<()>();
    let ticker = bar.clone();
    let started = Instant::now();
    let thread = std::thread::spawn(move || loop {
        let records = progress.records.load(Ordering::Relaxed);
        ticker.set_position(records);
        let rate = records as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let at = progress.position.load(Ordering::Relaxed);
        let position = if at > 0 {
            EventTime(at).to_rfc3339()
        } else {
            "-".to_string()
        };
        ticker.set_message(format!("{rate:.0} events/s  event time {position}"));
        match stopped.recv_timeout(Duration::from_millis(200)) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    });
    ProgressGuard {
        bar,
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// Stops and clears the progress bar when dropped.
#[derive(Debug)]
pub struct ProgressGuard {
    bar: ProgressBar,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.bar.finish_and_clear();
    }
}
