//! Stage 1: a worker's synchronous core.
//!
//! A [`Worker`] owns some partitions. It drops duplicates, decides lateness,
//! tracks the partitions' watermarks and feeds its stage-1 pipelines, which
//! emit [`Partial`]s for the combiner. No I/O, no clock: the caller passes
//! processing time in, so tests, replay and the threaded runner drive the
//! same code.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tidemark_model::{Event, EventTime, Watermark};

use crate::checkpoint::Checkpoint;
use crate::dedup::PartitionDedup;
use crate::dedup::DEFAULT_HORIZON;
use crate::error::ProcessorError;
use crate::partial::Partial;
use crate::pipeline::Pipeline;
use crate::watermark::{
    PartitionWatermarks, DEFAULT_ALLOWED_LATENESS, DEFAULT_IDLE_TIMEOUT, DEFAULT_OUT_OF_ORDERNESS,
};

/// What happened to one event offered to a [`Worker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Duplicate,
    TooLate,
}

/// What the stage-1 core needs to know of the settings; every runtime's
/// settings give one (`DriverConfig::worker`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerConfig {
    /// How far behind the newest event a partition's watermark trails.
    pub out_of_orderness: Duration,
    /// Must match the lateness the pipelines were built with.
    pub allowed_lateness: Duration,
    /// Processing time without records after which a partition is idle.
    pub idle_timeout: Duration,
    /// Duplicates are detected within this event-time horizon (at least the lateness).
    pub dedup_horizon: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            out_of_orderness: DEFAULT_OUT_OF_ORDERNESS,
            allowed_lateness: DEFAULT_ALLOWED_LATENESS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            dedup_horizon: DEFAULT_HORIZON,
        }
    }
}

/// The stage-1 core of one worker: dedup, lateness, watermarks and pipelines.
#[derive(Debug)]
pub struct Worker {
    wms: PartitionWatermarks,
    dedup: Vec<PartitionDedup>,
    pipelines: Vec<Box<dyn Pipeline>>,
    allowed_lateness: Duration,
    dedup_horizon: Duration,
    last_combined: Watermark,
    newest_received_at: EventTime,
    /// The newest event time read, whatever became of the event: what the
    /// lag in event time is measured against.
    newest_event_time: EventTime,
    /// Event-id hashes of the batch being admitted (kept for its allocation).
    id_hashes: Vec<u64>,
    /// Reused per batch: the partition's watermark after each accepted event.
    accepted_watermarks: Vec<Watermark>,
}

impl std::fmt::Debug for dyn Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pipeline({})", self.name())
    }
}

impl Worker {
    pub fn new(config: &WorkerConfig, pipelines: Vec<Box<dyn Pipeline>>) -> Self {
        Worker {
            wms: PartitionWatermarks::new(config.out_of_orderness, config.idle_timeout),
            dedup: Vec::new(),
            pipelines,
            allowed_lateness: config.allowed_lateness,
            dedup_horizon: config.dedup_horizon.max(config.allowed_lateness),
            last_combined: EventTime::MIN,
            newest_received_at: EventTime::MIN,
            newest_event_time: EventTime::MIN,
            id_hashes: Vec::new(),
            accepted_watermarks: Vec::new(),
        }
    }

    /// Adds a partition and returns its slot.
    pub fn register(&mut self, topic: &str, partition: u32) -> usize {
        let slot = self.wms.register(topic, partition);
        if self.dedup.len() <= slot {
            self.dedup.resize_with(slot + 1, PartitionDedup::new);
        }
        slot
    }

    /// The watermarks (for inspection and lag reporting).
    pub fn watermarks(&self) -> &PartitionWatermarks {
        &self.wms
    }

    /// The last watermark over this worker's partitions passed to the pipelines.
    pub fn combined_watermark(&self) -> Watermark {
        self.last_combined
    }

    /// The newest receipt time among accepted events.
    pub fn newest_received_at(&self) -> EventTime {
        self.newest_received_at
    }

    /// The newest event time among the events offered, duplicates and
    /// late ones included.
    pub fn newest_event_time(&self) -> EventTime {
        self.newest_event_time
    }

    /// Offers one event read from the partition in `slot`. An event is too
    /// late when it is older than its partition's watermark minus the allowed
    /// lateness (or than the worker's watermark minus it, which only differs
    /// after a partition came back from idle and whose windows are gone).
    #[inline]
    pub fn process(&mut self, slot: usize, ev: &Event) -> Result<Outcome, ProcessorError> {
        self.check_slot(slot)?;
        let outcome = self.admit(slot, ev, PartitionDedup::hash(&ev.event_id));
        if outcome == Outcome::Accepted {
            let watermark = [self.wms.partition_watermark(slot)];
            for p in &mut self.pipelines {
                p.on_partition_events(slot, &[ev], &watermark);
            }
        }
        Ok(outcome)
    }

    fn check_slot(&self, slot: usize) -> Result<(), ProcessorError> {
        if slot < self.dedup.len() {
            Ok(())
        } else {
            Err(ProcessorError::UnknownSlot(slot))
        }
    }

    /// Offers a run of events read in order from the partition in `slot`,
    /// with the same outcomes (pushed to `outcomes`) and effects as
    /// [`Worker::process`] on each in turn. Lateness and dedup are decided
    /// event by event first; the pipelines then see the accepted run at once.
    pub fn process_batch(
        &mut self,
        slot: usize,
        events: &[Event],
        outcomes: &mut Vec<Outcome>,
    ) -> Result<(), ProcessorError> {
        self.check_slot(slot)?;
        let mut hashes = std::mem::take(&mut self.id_hashes);
        hashes.clear();
        hashes.extend(events.iter().map(|ev| PartitionDedup::hash(&ev.event_id)));
        self.dedup[slot].warm(&hashes);
        let mut accepted = Vec::with_capacity(events.len());
        let mut watermarks = std::mem::take(&mut self.accepted_watermarks);
        watermarks.clear();
        for (ev, &h) in events.iter().zip(&hashes) {
            let outcome = self.admit(slot, ev, h);
            if outcome == Outcome::Accepted {
                accepted.push(ev);
                watermarks.push(self.wms.partition_watermark(slot));
            }
            outcomes.push(outcome);
        }
        self.id_hashes = hashes;
        for p in &mut self.pipelines {
            p.on_partition_events(slot, &accepted, &watermarks);
        }
        self.accepted_watermarks = watermarks;
        Ok(())
    }

    /// Decides dedup and lateness for one event and, when it is accepted,
    /// records its time; the pipelines are the caller's to feed. The slot
    /// is checked by the caller.
    #[inline]
    fn admit(&mut self, slot: usize, ev: &Event, id_hash: u64) -> Outcome {
        self.newest_event_time = self.newest_event_time.max(ev.timestamp);
        if !self.dedup[slot].check_and_insert_hash(id_hash, ev.timestamp) {
            return Outcome::Duplicate;
        }
        let wm = self.wms.partition_watermark(slot).max(self.last_combined);
        if ev.timestamp < wm.minus(self.allowed_lateness) {
            return Outcome::TooLate;
        }
        self.wms.observe(slot, ev.timestamp);
        self.newest_received_at = self.newest_received_at.max(ev.received_at);
        Outcome::Accepted
    }

    /// Records read progress of a partition (see [`PartitionWatermarks::set_progress`]).
    pub fn set_progress(&mut self, slot: usize, caught_up: bool, now: Instant) {
        self.wms.set_progress(slot, caught_up, now);
    }

    /// Computes the worker's watermark at processing time `now`, lets the
    /// pipelines emit the partials of windows it passed (and of corrected
    /// ones), and evicts old dedup entries.
    pub fn advance(&mut self, now: Instant, out: &mut Vec<Partial>) -> Watermark {
        let wm = self.wms.combined(now).max(self.last_combined);
        self.advance_to(wm, out);
        self.evict_dedup();
        wm
    }

    /// Like [`Worker::advance`] for a bounded input: the watermark ignores
    /// partitions read to their end (see [`PartitionWatermarks::combined_bounded`]).
    pub fn advance_event_time(&mut self, out: &mut Vec<Partial>) -> Watermark {
        let wm = self.wms.combined_bounded().max(self.last_combined);
        self.advance_to(wm, out);
        self.evict_dedup();
        wm
    }

    /// Forgets event ids older than each partition's watermark minus the horizon.
    fn evict_dedup(&mut self) {
        for (slot, d) in self.dedup.iter_mut().enumerate() {
            d.evict(self.wms.partition_watermark(slot), self.dedup_horizon);
        }
    }

    /// Whether every partition of this worker is idle at `now` (see
    /// [`PartitionWatermarks::is_idle`]); the combiner then leaves the
    /// worker out of the combined watermark.
    pub fn is_idle(&self, now: Instant) -> bool {
        !self.wms.is_empty() && (0..self.wms.len()).all(|slot| self.wms.is_idle(slot, now))
    }

    /// Raises the worker's watermark to the combiner's target (see
    /// [`crate::Combiner::target`]), so a worker that was idle judges
    /// lateness like the rest and fires what the others already passed.
    pub fn observe_global(&mut self, wm: Watermark) {
        if wm != EventTime::MAX {
            self.last_combined = self.last_combined.max(wm);
        }
    }

    /// Emits everything: the end of a bounded input (replay, tests).
    pub fn finish(&mut self, out: &mut Vec<Partial>) {
        self.advance_to(EventTime::MAX, out);
    }

    /// Ends a bounded input at `wm`, the watermark the data read supports:
    /// what it passed fires, the rest stays open as live would keep it.
    pub fn close_at(&mut self, wm: Watermark, out: &mut Vec<Partial>) {
        self.advance_to(wm.max(self.last_combined), out);
    }

    fn advance_to(&mut self, wm: Watermark, out: &mut Vec<Partial>) {
        self.last_combined = wm;
        for (i, p) in self.pipelines.iter_mut().enumerate() {
            let from = out.len();
            p.on_watermark(wm, out);
            for partial in &mut out[from..] {
                partial.window.pipeline = i as u8;
            }
        }
    }

    /// Partials of the pipelines' open windows (early results).
    pub fn early(&self, out: &mut Vec<Partial>) {
        for (i, p) in self.pipelines.iter().enumerate() {
            let from = out.len();
            p.early(out);
            for partial in &mut out[from..] {
                partial.window.pipeline = i as u8;
            }
        }
    }

    /// The state to checkpoint, with the given next offsets.
    pub fn checkpoint(
        &self,
        offsets: BTreeMap<(String, u32), u64>,
    ) -> Result<Checkpoint, ProcessorError> {
        let dedup = (0..self.wms.len())
            .filter_map(|slot| {
                Some((
                    self.wms.key(slot)?.clone(),
                    self.dedup.get(slot)?.snapshot(),
                ))
            })
            .collect();
        let pipelines = (self.pipelines.iter())
            .map(|p| Ok((p.name().to_string(), p.snapshot()?)))
            .collect::<Result<_, ProcessorError>>()?;
        Ok(Checkpoint {
            offsets,
            watermarks: self.wms.state(),
            dedup,
            last_watermark: self.last_combined,
            pipelines,
        })
    }

    /// Lets each pipeline keep cold state in its own folder under `dir`
    /// (see [`Pipeline::spill_to`]).
    pub fn spill_to(
        &mut self,
        dir: &std::path::Path,
        keys: Option<std::sync::Arc<tidemark_model::KeyRing>>,
    ) -> Result<(), ProcessorError> {
        for p in &mut self.pipelines {
            p.spill_to(&dir.join(p.name()), keys.clone())?;
        }
        Ok(())
    }

    /// The last checkpoint taken is durable (see [`Pipeline::checkpoint_saved`]).
    pub fn checkpoint_saved(&mut self) {
        for p in &mut self.pipelines {
            p.checkpoint_saved();
        }
    }

    /// Restores state from a checkpoint into registered partitions and the pipelines.
    pub fn restore(&mut self, cp: &Checkpoint) -> Result<(), ProcessorError> {
        self.wms.restore(&cp.watermarks);
        self.last_combined = cp.last_watermark;
        for slot in 0..self.wms.len() {
            if let (Some(key), Some(d)) = (self.wms.key(slot), self.dedup.get_mut(slot)) {
                *d = cp
                    .dedup
                    .get(key)
                    .cloned()
                    .map(Into::into)
                    .unwrap_or_default();
            }
        }
        for p in &mut self.pipelines {
            match cp.pipelines.iter().find(|(n, _)| n == p.name()) {
                Some((_, state)) => p.restore(state)?,
                None => tracing::warn!(
                    pipeline = p.name(),
                    "Checkpoint has no state for pipeline; starting empty"
                ),
            }
        }
        Ok(())
    }
}

/// Counts of what happened to offered events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub accepted: u64,
    pub duplicates: u64,
    pub too_late: u64,
}

impl Counts {
    /// Counts one outcome.
    pub fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Accepted => self.accepted += 1,
            Outcome::Duplicate => self.duplicates += 1,
            Outcome::TooLate => self.too_late += 1,
        }
    }

    pub(crate) fn merge(&mut self, o: Counts) {
        self.accepted += o.accepted;
        self.duplicates += o.duplicates;
        self.too_late += o.too_late;
    }
}
