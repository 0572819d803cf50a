//! Stage 1 and stage 2 in separate processes, joined by a log topic.
//!
//! Where one machine is not enough, the stage-1 workers are spread over
//! several processes as *shards*: shard `w` of `n` is the worker that owns
//! partition `p` of every input topic with `p % n == w` (see
//! [`worker_of`]), so a user's events still meet in one place. A process
//! runs the shards it is given with [`run_shards`]; each shard writes what
//! the in-process driver would hand its combiner, as [`ShardMessage`]s, to
//! the partials topic. One process runs [`run_combiner`], which reads those
//! messages and does what the in-process driver does with them: fire
//! windows, write points, publish live updates.
//!
//! Nothing is lost or counted twice across restarts and hand-overs:
//! - a shard checkpoints on its own (`<dir>/shard-<w>`), and only once every
//!   message it wrote before is durable in the log;
//! - a restarted shard replays from its checkpoint and reports nothing until
//!   it has read exactly as far as its last progress message said (its
//!   *catch-up*), so the combiner never sees a shard go back in time;
//! - the combiner saves its state with its read offsets in the partials
//!   topic (`<dir>/combiner`) after flushing the store, and reads on from
//!   there after a restart.
//!
//! The combiner's target watermark (see [`Combiner::target`]) goes back to
//! the shards through the file `<dir>/combiner-target`, so every process
//! shares the checkpoint folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tidemark_log::{Log, Record};
use tidemark_model::topic::partition_for_key;
use tidemark_model::{EventTime, KeyRing, Update, Watermark};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{self, Checkpoint, NextOffsets};
use crate::driver::{
    append_dead_letters, next_backoff, pause, stop_workers, write_checkpoint, Combining,
    DriverConfig, Flow, FromWorker, LagProbe, LiveWorker, PointSink, ProcessorMetrics, ToWorker,
};
use crate::error::ProcessorError;
use crate::partial::Partial;
use crate::registry::PipelineSet;
use crate::runner::{parts_of, resume, usable_workers, Counts};
use crate::worker::Worker;

/// Largest encoded message: more partials go into several messages, well
/// below Kafka's default 1 MB limit.
const MAX_MESSAGE_BYTES: u64 = 512 * 1024;
/// File in the checkpoint folder holding the combiner's target watermark.
const TARGET_FILE: &str = "combiner-target";
/// How often shards look at the target watermark.
const TARGET_POLL: Duration = Duration::from_millis(200);
/// Records read from one partials partition at a time.
const READ_BATCH: usize = 500;
/// How long a stopping process tries to write its last messages and
/// checkpoints before it gives up (the next owner replays instead).
const STOP_WAIT: Duration = Duration::from_secs(30);

/// Where sharded processing keeps its state and sends its partials.
#[derive(Debug, Clone)]
pub struct ShardedConfig {
    /// Every process's settings; `checkpoint_dir` is required and shared.
    pub driver: DriverConfig,
    /// The topic that takes shard reports to the combiner.
    pub partials_topic: String,
}

/// One record of the partials topic: what a shard reports to the combiner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardMessage {
    pub shard: u32,
    /// The shard's next offset of each of its partitions after this report.
    pub offsets: NextOffsets,
    pub body: ShardBody,
}

/// What a [`ShardMessage`] carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ShardBody {
    /// Partials of a report too large for one message; its `Progress` follows.
    Partials(Vec<Partial>),
    /// The end of a progress report: the shard's watermark after it.
    Progress {
        partials: Vec<Partial>,
        wm: Watermark,
        idle: bool,
        newest_received_at: EventTime,
    },
    /// Early partials of the shard's open windows, in one or more messages;
    /// the set replaces the previous one once `last` arrives.
    Early {
        partials: Vec<Partial>,
        first: bool,
        last: bool,
    },
}

/// A shard's checkpoint, with the shard count it belongs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardCheckpoint {
    shards: usize,
    worker: Checkpoint,
}

/// The combiner's checkpoint: its state and where it reads the partials topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CombinerCheckpoint {
    shards: usize,
    combiner: Vec<u8>,
    read_offsets: BTreeMap<u32, u64>,
}

/// The next offsets in shard `shard`'s checkpoint in `dir`, if it has one.
pub fn shard_offsets(
    dir: &Path,
    shard: usize,
    keys: Option<&KeyRing>,
) -> Result<Option<NextOffsets>, ProcessorError> {
    Ok(
        checkpoint::load_keyed::<ShardCheckpoint>(&shard_dir(dir, shard), keys)?
            .map(|cp| cp.worker.offsets),
    )
}

/// The number of shards: `config.workers`, lowered to a count that divides
/// every input topic's partitions (see [`usable_workers`]). Every process
/// must come to the same number.
pub async fn shard_count(config: &DriverConfig, log: &dyn Log) -> Result<usize, ProcessorError> {
    let mut smallest = u32::MAX;
    for topic in &config.topics {
        smallest = smallest.min(log.partition_count(topic).await?);
    }
    Ok(usable_workers(config.workers, smallest))
}

impl ShardedConfig {
    /// The settings, the partials topic, the checkpoint folder and the shard count.
    async fn open(
        self,
        log: &dyn Log,
    ) -> Result<(DriverConfig, String, PathBuf, usize), ProcessorError> {
        let dir = self.driver.checkpoint_dir.clone().ok_or_else(|| {
            ProcessorError::Setup("sharded processing needs a checkpoint folder".to_string())
        })?;
        let count = shard_count(&self.driver, log).await?;
        Ok((self.driver, self.partials_topic, dir, count))
    }
}

fn shard_dir(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("shard-{shard}"))
}

/// The key of a shard's messages: one that lands in partition
/// `shard % partitions`, so shards spread over the partials topic.
fn shard_key(shard: usize, partitions: u32) -> String {
    let wanted = shard as u32 % partitions.max(1);
    (0..)
        .map(|i| format!("shard-{shard}.{i}"))
        .find(|k| partition_for_key(k.as_bytes(), partitions) == wanted)
        .unwrap_or_default()
}

/// The combiner's last published target watermark (`MIN` when none).
fn read_target(dir: &Path) -> Watermark {
    std::fs::read_to_string(dir.join(TARGET_FILE))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .map_or(EventTime::MIN, EventTime)
}

async fn write_target(dir: &Path, target: Watermark) -> std::io::Result<()> {
    let tmp = dir.join(format!("{TARGET_FILE}.tmp"));
    tokio::fs::write(&tmp, target.0.to_string()).await?;
    tokio::fs::rename(&tmp, dir.join(TARGET_FILE)).await
}

/// Splits `partials` into groups whose encoding stays below [`MAX_MESSAGE_BYTES`].
fn chunks(partials: Vec<Partial>) -> Vec<Vec<Partial>> {
    let mut out = vec![Vec::new()];
    let mut size = 0;
    for p in partials {
        let n = bincode::serialized_size(&p).unwrap_or(MAX_MESSAGE_BYTES);
        if size + n > MAX_MESSAGE_BYTES && out.last().is_some_and(|c| !c.is_empty()) {
            out.push(Vec::new());
            size = 0;
        }
        size += n;
        if let Some(last) = out.last_mut() {
            last.push(p);
        }
    }
    out
}

fn encode(key: &str, message: &ShardMessage) -> Result<Record, ProcessorError> {
    let value =
        bincode::serialize(message).map_err(|e| ProcessorError::Io(std::io::Error::other(e)))?;
    Ok(Record {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::from(value),
        timestamp: EventTime::now(),
    })
}

/// The offsets of the shard's last progress report in `topic`, if any:
/// where a restarted shard must have read to before it reports again.
async fn last_reported(
    log: &dyn Log,
    topic: &str,
    shard: usize,
) -> Result<Option<NextOffsets>, ProcessorError> {
    let partitions = log.partition_count(topic).await?;
    let partition = shard as u32 % partitions.max(1);
    let start = log.start_offset(topic, partition).await?;
    let mut end = log.end_offset(topic, partition).await?;
    while end > start {
        let from = end.saturating_sub(READ_BATCH as u64).max(start);
        let mut records = Vec::new();
        let mut at = from;
        // A read may return fewer records than asked: read the whole span.
        while at < end {
            let batch = log.read(topic, partition, at, (end - at) as usize).await?;
            let Some(last) = batch.last() else { break };
            at = last.offset + 1;
            records.extend(batch.into_iter().filter(|r| r.offset < end));
        }
        for r in records.iter().rev() {
            let Ok(m) = bincode::deserialize::<ShardMessage>(&r.value) else {
                continue;
            };
            if m.shard as usize == shard && matches!(m.body, ShardBody::Progress { .. }) {
                return Ok(Some(m.offsets));
            }
        }
        end = from;
    }
    Ok(None)
}

/// Runs the stage-1 `shards` of this process until `cancel`, each on its own
/// thread reading its partitions from `log`, reporting to the partials
/// topic and checkpointing into the checkpoint folder (see the module
/// documentation). On cancel every shard writes a last checkpoint.
pub async fn run_shards(
    sharded: ShardedConfig,
    shards: &[usize],
    log: Arc<dyn Log>,
    pipelines: PipelineSet,
    metrics: ProcessorMetrics,
    cancel: CancellationToken,
) -> Result<(), ProcessorError> {
    let (config, partials_topic, dir, count) = sharded.open(log.as_ref()).await?;
    let partials_topic = partials_topic.as_str();
    let partials_partitions = log.partition_count(partials_topic).await?;
    let global_wm = Arc::new(AtomicI64::new(read_target(&dir).0));
    let (tx, mut rx) = mpsc::channel::<FromWorker>(4 * shards.len().max(1));
    let mut commands = BTreeMap::new();
    let mut threads = Vec::new();
    for &shard in shards {
        if shard >= count {
            return Err(ProcessorError::Setup(format!(
                "shard {shard} does not exist: there are {count}"
            )));
        }
        let mut engine = Worker::new(&config.worker(), pipelines.stage1());
        let mut parts = parts_of(log.as_ref(), &config.topics, shard, count, &mut engine).await?;
        if let Some(cp) = checkpoint::load_keyed::<ShardCheckpoint>(
            &shard_dir(&dir, shard),
            config.checkpoint_keys.as_deref(),
        )? {
            crate::checkpoint::check_worker_count(cp.shards, count)?;
            engine.restore(&cp.worker)?;
            resume(&mut parts, &cp.worker.offsets);
        }
        if let Some(reported) = last_reported(log.as_ref(), partials_topic, shard).await? {
            for p in &mut parts {
                if let Some(&to) = reported.get(&(p.topic.clone(), p.partition)) {
                    p.stop_at = (to > p.offset).then_some(to);
                }
            }
        }
        tracing::info!(shard, shards = count, "Starting shard");
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<ToWorker>();
        commands.insert(shard, cmd_tx);
        let live = LiveWorker {
            index: shard,
            engine,
            parts,
            log: log.clone(),
            runtime: tokio::runtime::Handle::current(),
            tx: tx.clone(),
            commands: cmd_rx,
            config: config.clone(),
            global_wm: global_wm.clone(),
            report_offsets: true,
        };
        threads.push(live.spawn()?);
    }
    drop(tx);

    let lag_log = log.clone();
    let mut host = ShardHost {
        log,
        topic: partials_topic.to_string(),
        keys: shards
            .iter()
            .map(|&s| (s, shard_key(s, partials_partitions)))
            .collect(),
        reported: BTreeMap::new(),
        lag: LagProbe::new(lag_log, metrics.lag_records.clone()),
        metrics,
        dir: dir.clone(),
        checkpoint_keys: config.checkpoint_keys.clone(),
        count,
    };
    let result = host
        .run(&config, &mut rx, &commands, &global_wm, &cancel)
        .await;
    stop_workers(commands.into_values(), rx, threads).await;
    result
}

/// The async side of [`run_shards`]: writes reports, dead letters and checkpoints.
struct ShardHost {
    log: Arc<dyn Log>,
    topic: String,
    keys: BTreeMap<usize, String>,
    /// Per shard, the watermark and idleness last reported.
    reported: BTreeMap<usize, (Watermark, bool)>,
    lag: LagProbe,
    metrics: ProcessorMetrics,
    dir: PathBuf,
    checkpoint_keys: Option<Arc<KeyRing>>,
    count: usize,
}

/// What handling a worker's message asks of the host.
enum Next {
    Continue,
    /// A shard reached a barrier with this state.
    Barrier(usize, Checkpoint),
    /// A report could not be written before cancel: stop, and checkpoint
    /// nothing after it.
    Abandon,
}

impl ShardHost {
    async fn run(
        &mut self,
        config: &DriverConfig,
        rx: &mut mpsc::Receiver<FromWorker>,
        commands: &BTreeMap<usize, std::sync::mpsc::Sender<ToWorker>>,
        global_wm: &AtomicI64,
        cancel: &CancellationToken,
    ) -> Result<(), ProcessorError> {
        let mut checkpoint_tick = tokio::time::interval(config.checkpoint_interval);
        checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        checkpoint_tick.reset();
        let mut target_tick = tokio::time::interval(TARGET_POLL);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                msg = rx.recv() => {
                    let Some(msg) = msg else { return Ok(()) };
                    match self.handle(msg, cancel).await? {
                        Next::Continue => {}
                        Next::Barrier(shard, cp) => {
                            // A failed save is logged; the next interval tries again.
                            self.save(shard, cp).await;
                            if let Some(c) = commands.get(&shard) {
                                let _ = c.send(ToWorker::Resume);
                            }
                        }
                        Next::Abandon => return Ok(()),
                    }
                }
                _ = checkpoint_tick.tick() => {
                    for c in commands.values() {
                        let _ = c.send(ToWorker::Checkpoint);
                    }
                }
                _ = target_tick.tick() => {
                    global_wm.fetch_max(read_target(&self.dir).0, Ordering::AcqRel);
                }
            }
        }
        // Cancelled: every shard stops at a barrier and saves it, unless its
        // reports cannot be written in time.
        let stopping = CancellationToken::new();
        let deadline = stopping.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(STOP_WAIT).await;
            deadline.cancel();
        });
        for c in commands.values() {
            let _ = c.send(ToWorker::Checkpoint);
        }
        let mut pending = commands.len();
        while pending > 0 {
            let Some(msg) = rx.recv().await else { break };
            match self.handle(msg, &stopping).await? {
                Next::Continue => {}
                Next::Barrier(shard, cp) => {
                    self.save(shard, cp).await;
                    if let Some(c) = commands.get(&shard) {
                        let _ = c.send(ToWorker::Stop);
                    }
                    pending -= 1;
                }
                Next::Abandon => break,
            }
        }
        timer.abort();
        Ok(())
    }

    async fn handle(
        &mut self,
        msg: FromWorker,
        cancel: &CancellationToken,
    ) -> Result<Next, ProcessorError> {
        let records = match msg {
            FromWorker::Progress {
                worker,
                partials,
                wm,
                idle,
                counts,
                decode_errors,
                dead_letters,
                newest_received_at,
                newest_event_time,
                offsets,
                catching_up,
            } => {
                self.metrics.count(counts, decode_errors);
                self.metrics.observe_newest_event(newest_event_time);
                if !dead_letters.is_empty() {
                    append_dead_letters(self.log.as_ref(), dead_letters, cancel).await;
                }
                if catching_up
                    || (partials.is_empty() && self.reported.get(&worker) == Some(&(wm, idle)))
                {
                    return Ok(Next::Continue);
                }
                self.reported.insert(worker, (wm, idle));
                tracing::debug!(
                    shard = worker,
                    wm = wm.0,
                    idle,
                    partials = partials.len(),
                    "Reporting shard progress"
                );
                let mut groups = chunks(partials);
                let last = groups.pop().unwrap_or_default();
                let mut messages: Vec<ShardMessage> = groups
                    .into_iter()
                    .map(|g| ShardMessage {
                        shard: worker as u32,
                        offsets: offsets.clone(),
                        body: ShardBody::Partials(g),
                    })
                    .collect();
                messages.push(ShardMessage {
                    shard: worker as u32,
                    offsets,
                    body: ShardBody::Progress {
                        partials: last,
                        wm,
                        idle,
                        newest_received_at,
                    },
                });
                self.records(worker, &messages)?
            }
            FromWorker::Early {
                worker,
                partials,
                offsets,
            } => {
                self.lag.update(worker, offsets.clone());
                let groups = chunks(partials);
                let n = groups.len();
                let messages: Vec<ShardMessage> = groups
                    .into_iter()
                    .enumerate()
                    .map(|(i, g)| ShardMessage {
                        shard: worker as u32,
                        offsets: offsets.clone(),
                        body: ShardBody::Early {
                            partials: g,
                            first: i == 0,
                            last: i + 1 == n,
                        },
                    })
                    .collect();
                self.records(worker, &messages)?
            }
            FromWorker::Barrier { worker, checkpoint } => {
                return Ok(Next::Barrier(worker, checkpoint))
            }
            FromWorker::Failed(e) => return Err(e),
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.log.append(&self.topic, records.clone()).await {
                Ok(_) => return Ok(Next::Continue),
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "Writing shard reports failed; retrying");
                    if !pause(backoff, cancel).await {
                        return Ok(Next::Abandon);
                    }
                    backoff = next_backoff(backoff);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn records(
        &self,
        shard: usize,
        messages: &[ShardMessage],
    ) -> Result<Vec<Record>, ProcessorError> {
        let key = self.keys.get(&shard).map_or("", String::as_str);
        messages.iter().map(|m| encode(key, m)).collect()
    }

    /// Saves a shard's checkpoint, logging a failure.
    async fn save(&self, shard: usize, worker: Checkpoint) {
        let timer = self.metrics.checkpoint_duration_seconds.start_timer();
        let dir = shard_dir(&self.dir, shard);
        let cp = ShardCheckpoint {
            shards: self.count,
            worker,
        };
        let keys = self.checkpoint_keys.clone();
        let saved =
            tokio::task::spawn_blocking(move || checkpoint::save_keyed(&dir, &cp, keys.as_deref()))
                .await
                .map_err(|e| ProcessorError::Io(std::io::Error::other(e)))
                .and_then(|r| r);
        match saved {
            Ok(state_bytes) => {
                timer.observe_duration();
                self.metrics.checkpoint_saved(state_bytes);
            }
            Err(e) => {
                tracing::warn!(error = %e, shard, "Saving a shard checkpoint failed");
                timer.stop_and_discard();
            }
        }
    }
}

/// Runs stage 2 until `cancel`: reads every shard's reports from
/// the partials topic, fires windows into `sink` and `updates`, publishes the
/// target watermark for the shards and checkpoints into
/// `config.checkpoint_dir` (see the module documentation).
pub async fn run_combiner(
    sharded: ShardedConfig,
    log: Arc<dyn Log>,
    pipelines: PipelineSet,
    sink: Arc<dyn PointSink>,
    updates: broadcast::Sender<Update>,
    metrics: ProcessorMetrics,
    cancel: CancellationToken,
) -> Result<(), ProcessorError> {
    let (config, partials_topic, dir, count) = sharded.open(log.as_ref()).await?;
    let partials_topic = partials_topic.as_str();
    let mut combiner = pipelines.combiner(count);
    let mut read_offsets = BTreeMap::new();
    for partition in 0..log.partition_count(partials_topic).await? {
        read_offsets.insert(
            partition,
            log.start_offset(partials_topic, partition).await?,
        );
    }
    let combiner_dir = dir.join("combiner");
    if let Some(cp) = checkpoint::load_keyed::<CombinerCheckpoint>(
        &combiner_dir,
        config.checkpoint_keys.as_deref(),
    )? {
        crate::checkpoint::check_worker_count(cp.shards, count)?;
        combiner.restore(&cp.combiner)?;
        for (p, o) in cp.read_offsets {
            if let Some(at) = read_offsets.get_mut(&p) {
                *at = (*at).max(o);
            }
        }
        tracing::info!(shards = count, "Restored combiner checkpoint");
    }
    let global_wm = Arc::new(AtomicI64::new(combiner.target().0));
    let mut driver = Combining::new(combiner, sink, updates, metrics, log.clone(), global_wm);
    let mut shard_states = vec![ShardState::default(); count];
    let mut published = EventTime::MIN;

    let mut backoff = Duration::from_millis(100);
    let save = |driver: &Combining, read_offsets: &BTreeMap<u32, u64>| {
        Ok::<_, ProcessorError>(CombinerCheckpoint {
            shards: count,
            combiner: driver.combiner.snapshot()?,
            read_offsets: read_offsets.clone(),
        })
    };
    // The timers are looked at between reads rather than raced against
    // them: a read they cut short is thrown away and done again, and one
    // slower than the early interval would never finish.
    let mut next_early = Instant::now() + config.early_interval;
    let mut next_checkpoint = Instant::now() + config.checkpoint_interval;
    loop {
        if Instant::now() >= next_early {
            driver.publish_early();
            next_early = Instant::now() + config.early_interval;
        }
        if Instant::now() >= next_checkpoint {
            let cp = save(&driver, &read_offsets)?;
            write_checkpoint(
                Some(combiner_dir.clone()),
                config.checkpoint_keys.clone(),
                Some(cp),
                driver.sink.as_ref(),
                &driver.metrics,
            )
            .await?;
            next_checkpoint = Instant::now() + config.checkpoint_interval;
        }
        let read = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            read = read_round(log.as_ref(), partials_topic, &read_offsets) => read,
        };
        let batches = match read {
            Ok(b) => {
                backoff = Duration::from_millis(100);
                b
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "Reading shard reports failed; retrying");
                if !pause(backoff, &cancel).await {
                    break;
                }
                backoff = next_backoff(backoff);
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut any = false;
        for (partition, from, records) in batches {
            if let Some(at) = read_offsets.get_mut(&partition) {
                *at = (*at).max(from);
            }
            for r in records {
                any = true;
                driver.metrics.shard_reports.inc();
                read_offsets.insert(partition, r.offset + 1);
                let message = match bincode::deserialize::<ShardMessage>(&r.value) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, partition, offset = r.offset, "Skipping an unreadable shard report");
                        continue;
                    }
                };
                if let ShardBody::Progress {
                    wm,
                    idle,
                    ref partials,
                    ..
                } = message.body
                {
                    tracing::debug!(
                        shard = message.shard,
                        wm = wm.0,
                        idle,
                        partials = partials.len(),
                        partition,
                        offset = r.offset,
                        "Read shard progress"
                    );
                }
                let before = driver.combiner.watermark();
                let Some(msg) = to_driver(message, &mut shard_states)? else {
                    continue;
                };
                if let Flow::Abandon = driver.handle(msg, &cancel).await? {
                    return Ok(());
                }
                if driver.combiner.watermark() != before {
                    tracing::debug!(
                        from = before.0,
                        to = driver.combiner.watermark().0,
                        target = driver.combiner.target().0,
                        "Combined watermark advanced"
                    );
                }
            }
        }
        let target = driver.combiner.target();
        if target > published {
            match write_target(&dir, target).await {
                Ok(()) => published = target,
                Err(e) => tracing::warn!(error = %e, "Cannot publish the target watermark"),
            }
        }
        if !any && !pause(config.idle_sleep, &cancel).await {
            break;
        }
    }
    // A last checkpoint; a store that stays down skips it (the next owner
    // replays the reports instead).
    let cp = save(&driver, &read_offsets)?;
    let flushed = tokio::time::timeout(
        STOP_WAIT,
        write_checkpoint(
            Some(combiner_dir),
            config.checkpoint_keys.clone(),
            Some(cp),
            driver.sink.as_ref(),
            &driver.metrics,
        ),
    )
    .await;
    match flushed {
        Ok(r) => r.map(|_| ()),
        Err(_) => {
            tracing::warn!("The store did not take the last points in time; not checkpointing");
            Ok(())
        }
    }
}

/// Reads the next records of every partials partition, each with the
/// offset it was read from (later than asked when retention removed some).
async fn read_round(
    log: &dyn Log,
    topic: &str,
    offsets: &BTreeMap<u32, u64>,
) -> Result<Vec<(u32, u64, Vec<tidemark_log::StoredRecord>)>, ProcessorError> {
    let mut out = Vec::new();
    for (&partition, &offset) in offsets {
        let records = match log.read(topic, partition, offset, READ_BATCH).await {
            Ok(r) => r,
            Err(tidemark_log::LogError::OffsetOutOfRange { earliest, .. }) => {
                tracing::warn!(
                    partition,
                    from = offset,
                    to = earliest,
                    "Shard reports no longer retained; skipping ahead"
                );
                out.push((partition, earliest, Vec::new()));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        out.push((partition, offset, records));
    }
    Ok(out)
}

/// What the combiner remembers of a shard between its messages.
#[derive(Debug, Clone, Default)]
struct ShardState {
    /// An early set still arriving.
    early: Option<Vec<Partial>>,
    /// Idleness as last reported.
    idle: bool,
}

/// Turns a report into what the in-process driver's combiner handles, or
/// `None` while an early set is still arriving. A report of a shard beyond
/// the count means the deployment disagrees on it, and skipping it would
/// leave that shard's windows out.
fn to_driver(
    message: ShardMessage,
    shards: &mut [ShardState],
) -> Result<Option<FromWorker>, ProcessorError> {
    let worker = message.shard as usize;
    let count = shards.len();
    let Some(state) = shards.get_mut(worker) else {
        return Err(ProcessorError::Setup(format!(
            "the partials topic has a report of shard {worker}, but the combiner runs \
             {count} shards; start every instance with the same --workers"
        )));
    };
    let report = |partials, wm, idle, newest_received_at| FromWorker::Progress {
        worker,
        partials,
        wm,
        idle,
        counts: Counts::default(),
        decode_errors: 0,
        dead_letters: Vec::new(),
        newest_received_at,
        // The shard's host reports what its workers read.
        newest_event_time: EventTime::MIN,
        offsets: NextOffsets::new(),
        catching_up: false,
    };
    Ok(match message.body {
        ShardBody::Partials(partials) => {
            Some(report(partials, EventTime::MIN, state.idle, EventTime::MIN))
        }
        ShardBody::Progress {
            partials,
            wm,
            idle,
            newest_received_at,
        } => {
            state.idle = idle;
            Some(report(partials, wm, idle, newest_received_at))
        }
        ShardBody::Early {
            partials,
            first,
            last,
        } => {
            if first {
                state.early = Some(Vec::new());
            }
            // The rest of a set whose start was before the checkpoint.
            let Some(early) = state.early.as_mut() else {
                return Ok(None);
            };
            early.extend(partials);
            if !last {
                return Ok(None);
            }
            Some(FromWorker::Early {
                worker,
                partials: state.early.take().unwrap_or_default(),
                offsets: NextOffsets::new(),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use smallvec::smallvec;
    use tidemark_log::segment::{SegmentLog, SegmentLogConfig};

    use super::*;
    use crate::partial::{row_key, WindowId};

    fn partial(start: i64, rows: usize) -> Partial {
        let window = WindowId {
            end: start + 60_000,
            pipeline: 0,
            kind: 0,
            start,
        };
        let rows = (0..rows)
            .map(|i| (row_key([&format!("group-{i:06}")]), smallvec![i as i64]))
            .collect();
        Partial::new(window, rows, None)
    }

    fn message(shard: u32, body: ShardBody) -> ShardMessage {
        ShardMessage {
            shard,
            offsets: NextOffsets::new(),
            body,
        }
    }

    fn early(partials: Vec<Partial>, first: bool, last: bool) -> ShardBody {
        ShardBody::Early {
            partials,
            first,
            last,
        }
    }

    #[test]
    fn every_shard_key_lands_in_its_own_partition() {
        for partitions in [1, 3, 4] {
            for shard in 0..8 {
                let key = shard_key(shard, partitions);
                assert_eq!(
                    partition_for_key(key.as_bytes(), partitions),
                    shard as u32 % partitions,
                    "shard {shard} of {partitions} partitions"
                );
            }
        }
    }

    #[test]
    fn chunks_stay_under_the_message_limit_and_keep_every_partial_in_order() {
        // About 20 KB each: a few dozen fill a message.
        let partials: Vec<Partial> = (0..100).map(|i| partial(i * 60_000, 1_000)).collect();
        let groups = chunks(partials.clone());
        assert!(groups.len() > 1, "one message cannot hold them");
        for group in &groups {
            let size: u64 = group
                .iter()
                .map(|p| bincode::serialized_size(p).unwrap())
                .sum();
            assert!(size <= MAX_MESSAGE_BYTES, "{size} bytes");
        }
        assert_eq!(groups.concat(), partials);

        let huge = partial(0, 40_000);
        assert!(bincode::serialized_size(&huge).unwrap() > MAX_MESSAGE_BYTES);
        assert_eq!(chunks(vec![huge.clone(), partial(1, 1)]).len(), 2);
        assert_eq!(chunks(Vec::new()), vec![Vec::<Partial>::new()]);
    }

    #[test]
    fn an_early_set_reaches_the_combiner_whole_once_its_last_message_arrives() {
        let mut shards = vec![ShardState::default(); 2];
        let first = to_driver(
            message(1, early(vec![partial(0, 1)], true, false)),
            &mut shards,
        );
        assert!(first.unwrap().is_none());
        let last = to_driver(
            message(1, early(vec![partial(60_000, 1)], false, true)),
            &mut shards,
        );
        match last.unwrap() {
            Some(FromWorker::Early {
                worker, partials, ..
            }) => {
                assert_eq!(worker, 1);
                assert_eq!(partials, vec![partial(0, 1), partial(60_000, 1)]);
            }
            other => panic!("expected an early set, got {other:?}"),
        }
        // The tail of a set whose start came before a restart is not a set.
        let tail = to_driver(
            message(0, early(vec![partial(0, 1)], false, true)),
            &mut shards,
        );
        assert!(tail.unwrap().is_none());
    }

    #[test]
    fn progress_carries_idleness_into_later_partials() {
        let mut shards = vec![ShardState::default(); 1];
        let progress = ShardBody::Progress {
            partials: Vec::new(),
            wm: EventTime(5),
            idle: true,
            newest_received_at: EventTime(4),
        };
        to_driver(message(0, progress), &mut shards).unwrap();
        match to_driver(
            message(0, ShardBody::Partials(vec![partial(0, 1)])),
            &mut shards,
        ) {
            Ok(Some(FromWorker::Progress { idle, wm, .. })) => {
                assert!(idle);
                assert_eq!(
                    wm,
                    EventTime::MIN,
                    "only a progress report moves the watermark"
                );
            }
            other => panic!("expected progress, got {other:?}"),
        }
    }

    #[test]
    fn a_report_of_a_shard_beyond_the_count_is_an_error() {
        let mut shards = vec![ShardState::default(); 2];
        let err = to_driver(message(2, ShardBody::Partials(Vec::new())), &mut shards).unwrap_err();
        assert!(err.to_string().contains("shard 2"), "{err}");
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn the_target_watermark_survives_in_its_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_target(dir.path()), EventTime::MIN);
        write_target(dir.path(), EventTime(42)).await.unwrap();
        assert_eq!(read_target(dir.path()), EventTime(42));
    }

    #[tokio::test]
    async fn a_restarted_shard_finds_its_last_progress_report_among_others() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path(), SegmentLogConfig::default()).unwrap();
        let topic = "partials";
        log.ensure_topic(topic, 1).await.unwrap();
        assert_eq!(last_reported(&log, topic, 0).await.unwrap(), None);

        let offsets = |at: u64| NextOffsets::from([(("events".to_string(), 0), at)]);
        let progress = |shard: u32, at: u64| ShardMessage {
            shard,
            offsets: offsets(at),
            body: ShardBody::Progress {
                partials: Vec::new(),
                wm: EventTime::MIN,
                idle: false,
                newest_received_at: EventTime::MIN,
            },
        };
        let mut records = vec![encode("k", &progress(0, 7)).unwrap()];
        // More than one read batch of other shards' reports and partials after it.
        for i in 0..READ_BATCH as u64 + 20 {
            records.push(encode("k", &progress(1, i)).unwrap());
        }
        let mut partials = progress(0, 99);
        partials.body = ShardBody::Partials(Vec::new());
        records.push(encode("k", &partials).unwrap());
        log.append(topic, records).await.unwrap();

        assert_eq!(
            last_reported(&log, topic, 0).await.unwrap(),
            Some(offsets(7))
        );
        assert_eq!(
            last_reported(&log, topic, 1).await.unwrap(),
            Some(offsets(READ_BATCH as u64 + 19))
        );
    }
}
