//! Both stages composed: partitions assigned to workers, workers feeding the
//! combiner.
//!
//! [`Stages`] runs them on the calling thread (tests, golden files, the
//! live driver's core); [`run_parallel`] runs one thread per worker plus the
//! combiner on the calling thread, joined by bounded channels, over a bounded
//! input (benchmarks, replay). Both give the same points: a worker's output
//! depends only on its partitions, and the combiner's merges are exact.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tidemark_log::Log;
use tidemark_model::wire::WireError;
use tidemark_model::{Event, Point, Watermark};

use crate::checkpoint::{Checkpoint, NextOffsets};
use crate::combiner::Combiner;
use crate::error::ProcessorError;
use crate::partial::Partial;
use crate::read_loop::{self, Mode, Part, Round, Rounds};
use crate::registry::PipelineSet;
use crate::worker::{Outcome, Worker, WorkerConfig};

pub use crate::worker::Counts;

pub use crate::read_loop::RecordSource;

/// The worker that owns partition `partition` of every topic.
///
/// Input topics are keyed by `user_id` and their partition counts are
/// multiples of each other (Kafka's murmur2 modulo the count), so a user's
/// partitions of every topic share `partition % workers` whenever `workers`
/// divides the smallest count: one worker sees all of a user's events, which
/// sessions and ad joins need.
pub fn worker_of(partition: u32, workers: usize) -> usize {
    partition as usize % workers.max(1)
}

/// The largest usable worker count up to `wanted`: one that divides the
/// smallest partition count, so [`worker_of`] keeps users whole.
pub fn usable_workers(wanted: usize, min_partitions: u32) -> usize {
    let min_partitions = min_partitions.max(1) as usize;
    (1..=wanted.clamp(1, min_partitions))
        .rev()
        .find(|w| min_partitions / w * w == min_partitions)
        .unwrap_or(1)
}

/// What a whole processor checkpoints: every worker and the combiner.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessorCheckpoint {
    pub workers: Vec<Checkpoint>,
    pub combiner: Vec<u8>,
}

impl ProcessorCheckpoint {
    /// The next offset to read of every partition.
    pub fn offsets(&self) -> BTreeMap<(String, u32), u64> {
        self.workers
            .iter()
            .flat_map(|w| w.offsets.iter().map(|(k, v)| (k.clone(), *v)))
            .collect()
    }
}

/// Why in-process stages cannot send a combiner a stray partial: both
/// are built from one pipeline set with one worker count.
pub(crate) const SAME_SHAPE: &str = "workers and combiner are built from one pipeline set";

/// Both stages on the calling thread.
#[derive(Debug)]
pub struct Stages {
    workers: Vec<Worker>,
    /// (topic, partition) -> (worker, slot in that worker).
    slots: BTreeMap<(String, u32), (usize, usize)>,
    combiner: Combiner,
    partials: Vec<Partial>,
}

impl Stages {
    /// `workers` stage-1 workers running `set`, and the combiner.
    pub fn new(config: &WorkerConfig, set: &PipelineSet, workers: usize) -> Self {
        let n = workers.max(1);
        Stages {
            workers: (0..n).map(|_| Worker::new(config, set.stage1())).collect(),
            slots: BTreeMap::new(),
            combiner: set.combiner(n),
            partials: Vec::new(),
        }
    }

    /// Number of workers.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// The workers (for inspection).
    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    /// The combiner (for inspection).
    pub fn combiner(&self) -> &Combiner {
        &self.combiner
    }

    /// Adds a partition to its worker; returns (worker, slot).
    pub fn register(&mut self, topic: &str, partition: u32) -> (usize, usize) {
        if let Some(&ws) = self.slots.get(&(topic.to_string(), partition)) {
            return ws;
        }
        let w = worker_of(partition, self.workers.len());
        let slot = self.workers[w].register(topic, partition);
        self.slots.insert((topic.to_string(), partition), (w, slot));
        (w, slot)
    }

    /// Offers one event read from `topic`/`partition`.
    pub fn process(&mut self, topic: &str, partition: u32, ev: &Event) -> Outcome {
        let (w, slot) = self.register(topic, partition);
        self.workers[w]
            .process(slot, ev)
            .expect("the partition was registered above")
    }

    /// Offers a run of one partition's events; see [`Worker::process_batch`].
    pub fn process_batch(
        &mut self,
        topic: &str,
        partition: u32,
        events: &[Event],
        outcomes: &mut Vec<Outcome>,
    ) {
        let (w, slot) = self.register(topic, partition);
        self.workers[w]
            .process_batch(slot, events, outcomes)
            .expect("the partition was registered above");
    }

    /// Records read progress of a registered partition.
    pub fn set_progress(&mut self, worker: usize, slot: usize, caught_up: bool, now: Instant) {
        self.workers[worker].set_progress(slot, caught_up, now);
    }

    /// Advances every worker at processing time `now` and fires in the
    /// combiner what all of them passed. Returns the combiner's watermark.
    pub fn advance(&mut self, now: Instant, out: &mut Vec<Point>) -> Watermark {
        for w in 0..self.workers.len() {
            let target = self.combiner.target();
            self.workers[w].observe_global(target);
            let wm = self.workers[w].advance(now, &mut self.partials);
            for p in self.partials.drain(..) {
                self.combiner.on_partial(w, p).expect(SAME_SHAPE);
            }
            let idle = self.workers[w].is_idle(now);
            self.combiner.set_idle(w, idle);
            self.combiner.on_watermark(w, wm, out);
        }
        self.combiner.watermark()
    }

    /// Fires everything: the end of a bounded input.
    pub fn finish(&mut self, out: &mut Vec<Point>) {
        for w in 0..self.workers.len() {
            self.workers[w].finish(&mut self.partials);
            for p in self.partials.drain(..) {
                self.combiner.on_partial(w, p).expect(SAME_SHAPE);
            }
        }
        self.combiner.finish(out);
    }

    /// Early points of open windows.
    pub fn early(&mut self, out: &mut Vec<Point>) {
        for w in 0..self.workers.len() {
            self.workers[w].early(&mut self.partials);
            self.combiner
                .on_early(w, std::mem::take(&mut self.partials))
                .expect(SAME_SHAPE);
        }
        self.combiner.early(out);
    }

    /// The newest receipt time among accepted events.
    pub fn newest_received_at(&self) -> tidemark_model::EventTime {
        self.workers
            .iter()
            .map(Worker::newest_received_at)
            .max()
            .unwrap_or(tidemark_model::EventTime::MIN)
    }

    /// The whole state, with the next offset of every partition.
    pub fn checkpoint(
        &self,
        offsets: &BTreeMap<(String, u32), u64>,
    ) -> Result<ProcessorCheckpoint, ProcessorError> {
        let mut per_worker: Vec<BTreeMap<(String, u32), u64>> =
            vec![BTreeMap::new(); self.workers.len()];
        for (key, &(w, _)) in &self.slots {
            if let Some(&o) = offsets.get(key) {
                per_worker[w].insert(key.clone(), o);
            }
        }
        Ok(ProcessorCheckpoint {
            workers: (self.workers.iter().zip(per_worker))
                .map(|(w, o)| w.checkpoint(o))
                .collect::<Result<_, _>>()?,
            combiner: self.combiner.snapshot()?,
        })
    }

    /// Restores a checkpoint taken with the same worker count (register the
    /// partitions first).
    pub fn restore(&mut self, cp: &ProcessorCheckpoint) -> Result<(), ProcessorError> {
        crate::checkpoint::check_worker_count(cp.workers.len(), self.workers.len())?;
        for (w, c) in self.workers.iter_mut().zip(&cp.workers) {
            w.restore(c)?;
        }
        self.combiner.restore(&cp.combiner)
    }
}

/// The partitions of `topics` that worker `index` of `workers` owns, each
/// registered with `engine`, from the start of what `log` retains.
pub(crate) async fn parts_of(
    log: &dyn Log,
    topics: &[String],
    index: usize,
    workers: usize,
    engine: &mut Worker,
) -> Result<Vec<Part>, ProcessorError> {
    let mut parts = Vec::new();
    for topic in topics {
        for partition in 0..log.partition_count(topic).await? {
            if worker_of(partition, workers) != index {
                continue;
            }
            parts.push(Part {
                topic: topic.clone(),
                partition,
                slot: engine.register(topic, partition),
                offset: log.start_offset(topic, partition).await?,
                stop_at: None,
            });
        }
    }
    Ok(parts)
}

/// Moves each part on to its checkpointed offset, never back before what
/// the log still retains.
pub(crate) fn resume(parts: &mut [Part], offsets: &NextOffsets) {
    for p in parts {
        if let Some(&o) = offsets.get(&(p.topic.clone(), p.partition)) {
            p.offset = o.max(p.offset);
        }
    }
}

/// One partition to read, from `from` up to (not including) `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRange {
    pub topic: String,
    pub partition: u32,
    pub from: u64,
    /// `None`: to the end of what the source returns.
    pub to: Option<u64>,
}

/// What a bounded parallel run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub counts: Counts,
    pub decode_errors: u64,
    pub points: u64,
    /// Events that were too late, for the dead-letter topic.
    pub too_late: Vec<Event>,
    /// Size of the stage-1 state (bincode, every worker) after the last
    /// event and before the final flush: what a checkpoint would hold (0
    /// unless asked for: measuring it serialises the whole state).
    pub state_bytes: u64,
}

enum Msg {
    Progress {
        worker: usize,
        partials: Vec<Partial>,
        wm: Watermark,
    },
    Done {
        worker: usize,
        partials: Vec<Partial>,
        /// The worker's watermark with every partition read to its end.
        wm: Watermark,
        counts: Counts,
        decode_errors: u64,
        too_late: Vec<Event>,
        state_bytes: u64,
    },
    Failed(ProcessorError),
}

/// Runs both stages over bounded partition ranges with one thread per
/// worker; the combiner runs on the calling thread and hands every batch of
/// points to `emit` (in watermark order). Event time only: no idleness. The
/// run ends at the watermark its input supports, the newest event time read
/// minus the out-of-orderness, as live computes it once every partition is
/// idle: windows and sessions that watermark has not closed are not written,
/// as live has not written them either.
#[allow(clippy::too_many_arguments)]
pub fn run_parallel<S, D, E>(
    config: &WorkerConfig,
    max_batch: usize,
    set: &PipelineSet,
    workers: usize,
    measure_state: bool,
    ranges: Vec<PartitionRange>,
    make_source: impl Fn() -> S,
    decode: D,
    mut emit: E,
) -> Result<RunSummary, ProcessorError>
where
    S: RecordSource + 'static,
    D: Fn(&[u8], &mut Event) -> Result<(), WireError> + Send + Sync + Copy + 'static,
    E: FnMut(Vec<Point>) -> Result<(), ProcessorError>,
{
    let n = workers.max(1);
    let mut combiner = set.combiner(n);
    let mut per_worker: Vec<Vec<PartitionRange>> = vec![Vec::new(); n];
    for r in ranges {
        per_worker[worker_of(r.partition, n)].push(r);
    }
    // A few batches in flight per worker: enough to overlap, small enough to
    // push back when the combiner or `emit` is slow.
    let (tx, rx) = mpsc::sync_channel::<Msg>(4 * n);
    let mut handles = Vec::new();
    for (w, ranges) in per_worker.into_iter().enumerate() {
        let tx = tx.clone();
        let mut source = make_source();
        let mut worker = Worker::new(config, set.stage1());
        let spawned = std::thread::Builder::new()
            .name(format!("tidemark-worker-{w}"))
            .spawn(move || {
                let result = work(
                    w,
                    &mut worker,
                    &mut source,
                    ranges,
                    (max_batch, measure_state),
                    decode,
                    &tx,
                );
                if let Err(e) = result {
                    let _ = tx.send(Msg::Failed(e));
                }
                // Back to the combiner's thread for the end of the run.
                worker
            });
        handles.push(spawned.map_err(ProcessorError::Io)?);
    }
    drop(tx);
    let mut summary = RunSummary::default();
    let mut out = Vec::new();
    let mut failure = None;
    let mut end = tidemark_model::EventTime::MIN;
    for msg in rx {
        match msg {
            Msg::Progress {
                worker,
                partials,
                wm,
            } => {
                for p in partials {
                    combiner.on_partial(worker, p)?;
                }
                combiner.on_watermark(worker, wm, &mut out);
            }
            Msg::Done {
                worker,
                partials,
                wm,
                counts,
                decode_errors,
                too_late,
                state_bytes,
            } => {
                summary.state_bytes += state_bytes;
                for p in partials {
                    combiner.on_partial(worker, p)?;
                }
                if wm == tidemark_model::EventTime::MIN {
                    // It read nothing, so it has nothing open.
                    combiner.on_watermark(worker, tidemark_model::EventTime::MAX, &mut out);
                } else {
                    // Its open windows are still open: it holds the others
                    // back until the end.
                    combiner.on_watermark(worker, wm, &mut out);
                    end = end.max(wm);
                }
                summary.counts.merge(counts);
                summary.decode_errors += decode_errors;
                summary.too_late.extend(too_late);
            }
            Msg::Failed(e) => {
                failure.get_or_insert(e);
            }
        }
        if !out.is_empty() {
            summary.points += out.len() as u64;
            emit(std::mem::take(&mut out))?;
        }
    }
    let mut finished = Vec::with_capacity(handles.len());
    for h in handles {
        match h.join() {
            Ok(worker) => finished.push(worker),
            Err(_) => {
                failure.get_or_insert(ProcessorError::Setup("a worker thread panicked".into()));
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    // Every worker read to its end: the newest event time read, minus the
    // out-of-orderness, is the largest of their watermarks.
    if end != tidemark_model::EventTime::MIN {
        let mut partials = Vec::new();
        for (w, worker) in finished.iter_mut().enumerate() {
            if worker.newest_event_time() == tidemark_model::EventTime::MIN {
                continue;
            }
            worker.close_at(end, &mut partials);
            for p in partials.drain(..) {
                combiner.on_partial(w, p)?;
            }
            combiner.on_watermark(w, end, &mut out);
        }
    }
    if !out.is_empty() {
        summary.points += out.len() as u64;
        emit(out)?;
    }
    Ok(summary)
}

/// A bounded run's side of its workers' read loop: progress after every
/// round that read something, the worker's totals once none did.
struct BoundedRounds<'a> {
    index: usize,
    measure_state: bool,
    tx: &'a mpsc::SyncSender<Msg>,
    counts: Counts,
    decode_errors: u64,
    too_late: Vec<Event>,
}

impl Rounds for BoundedRounds<'_> {
    fn before(&mut self, _: &mut Worker, _: &[Part]) -> Result<bool, ProcessorError> {
        Ok(true)
    }

    fn after(
        &mut self,
        worker: &mut Worker,
        _: &mut [Part],
        round: Round,
        too_late: &mut Vec<Event>,
    ) -> Result<bool, ProcessorError> {
        self.counts.merge(round.counts);
        self.decode_errors += round.decode_errors;
        self.too_late.append(too_late);
        let mut partials = Vec::new();
        if round.advanced {
            // Event time only: the watermark is the minimum over this
            // worker's partitions, never advanced by idleness.
            let wm = worker.advance_event_time(&mut partials);
            let progress = Msg::Progress {
                worker: self.index,
                partials,
                wm,
            };
            return Ok(self.tx.send(progress).is_ok());
        }
        let state_bytes = if self.measure_state {
            (worker.checkpoint(BTreeMap::new()).ok())
                .and_then(|cp| bincode::serialized_size(&cp).ok())
                .unwrap_or(0)
        } else {
            0
        };
        let wm = worker.advance_event_time(&mut partials);
        let _ = self.tx.send(Msg::Done {
            worker: self.index,
            partials,
            wm,
            counts: std::mem::take(&mut self.counts),
            decode_errors: self.decode_errors,
            too_late: std::mem::take(&mut self.too_late),
            state_bytes,
        });
        Ok(false)
    }
}

fn work<S, D>(
    index: usize,
    worker: &mut Worker,
    source: &mut S,
    ranges: Vec<PartitionRange>,
    (max_batch, measure_state): (usize, bool),
    decode: D,
    tx: &mpsc::SyncSender<Msg>,
) -> Result<(), ProcessorError>
where
    S: RecordSource,
    D: Fn(&[u8], &mut Event) -> Result<(), WireError>,
{
    let mut parts: Vec<Part> = ranges
        .into_iter()
        .map(|r| Part {
            slot: worker.register(&r.topic, r.partition),
            topic: r.topic,
            partition: r.partition,
            offset: r.from,
            stop_at: r.to,
        })
        .collect();
    let mut rounds = BoundedRounds {
        index,
        measure_state,
        tx,
        counts: Counts::default(),
        decode_errors: 0,
        too_late: Vec::new(),
    };
    read_loop::run(
        worker,
        &mut parts,
        source,
        (Mode::Bounded, max_batch),
        &decode,
        &mut rounds,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::partial::Partial;
    use crate::pipeline::{Finisher, Pipeline};
    use crate::pipeline::{Measurement, PipelineSpec, StateReach};
    use crate::registry::Registry;
    use crate::traffic::TrafficFinisher;

    /// A pipeline whose state cannot be encoded.
    #[derive(Debug)]
    struct Unencodable;

    impl Pipeline for Unencodable {
        fn name(&self) -> &'static str {
            "unencodable"
        }
        fn on_event(&mut self, _ev: &Event) {}
        fn on_watermark(&mut self, _wm: Watermark, _out: &mut Vec<Partial>) {}
        fn early(&self, _out: &mut Vec<Partial>) {}
        fn snapshot(&self) -> Result<Vec<u8>, ProcessorError> {
            Err(ProcessorError::Snapshot(
                "unencodable state: a map key is not a string".into(),
            ))
        }
        fn restore(&mut self, _state: &[u8]) -> Result<(), ProcessorError> {
            Ok(())
        }
    }

    impl PipelineSpec for Unencodable {
        fn name(&self) -> &'static str {
            "unencodable"
        }
        fn measurements(&self) -> &'static [Measurement] {
            &[]
        }
        fn reach(&self) -> StateReach {
            StateReach::default()
        }
        fn stage1(&self, _allowed_lateness: Duration) -> Box<dyn Pipeline> {
            Box::new(Unencodable)
        }
        fn stage2(&self, _allowed_lateness: Duration) -> Box<dyn Finisher> {
            Box::new(TrafficFinisher)
        }
    }

    #[test]
    fn a_state_that_cannot_be_encoded_fails_the_checkpoint() {
        let config = WorkerConfig::default();
        let set = Registry::default()
            .with(Arc::new(Unencodable))
            .all(config.allowed_lateness);
        let stages = Stages::new(&config, &set, 1);
        let err = stages.checkpoint(&BTreeMap::new()).unwrap_err();
        assert!(matches!(err, ProcessorError::Snapshot(_)), "{err}");
        assert!(!err.is_retryable());
    }

    #[test]
    fn a_checkpoint_of_another_worker_count_is_its_own_error() {
        let config = WorkerConfig::default();
        let set = PipelineSet::all(config.allowed_lateness);
        let taken = Stages::new(&config, &set, 2)
            .checkpoint(&BTreeMap::new())
            .unwrap();
        let err = Stages::new(&config, &set, 1).restore(&taken).unwrap_err();
        assert!(
            matches!(
                err,
                ProcessorError::WorkerCount {
                    taken_with: 2,
                    runs: 1
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("same worker count"), "{err}");
    }

    #[test]
    fn an_event_of_a_partition_never_registered_is_an_error_not_a_late_event() {
        let config = WorkerConfig::default();
        let set = PipelineSet::all(config.allowed_lateness);
        let mut worker = Worker::new(&config, set.stage1());
        let ev = Event {
            event_id: "e1".into(),
            event_type: tidemark_model::EventType::PageView,
            user_id: "u1".into(),
            timestamp: tidemark_model::EventTime(1_000),
            ..Event::default()
        };
        assert!(matches!(
            worker.process(0, &ev),
            Err(ProcessorError::UnknownSlot(0))
        ));
        let mut outcomes = Vec::new();
        let err = worker
            .process_batch(3, std::slice::from_ref(&ev), &mut outcomes)
            .unwrap_err();
        assert!(matches!(err, ProcessorError::UnknownSlot(3)), "{err}");
        assert!(outcomes.is_empty());

        let slot = worker.register("user-events", 0);
        assert_eq!(worker.process(slot, &ev).unwrap(), Outcome::Accepted);
    }
}
