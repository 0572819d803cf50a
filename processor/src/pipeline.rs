//! What a pipeline is: its two stages ([`Pipeline`], [`Finisher`]) and how
//! it describes itself to the rest of the system ([`PipelineSpec`]).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tidemark_model::{Event, KeyRing, Point, Tier, Watermark};

use crate::error::ProcessorError;
use crate::partial::Partial;

/// Stage 1 of a pipeline: a stateful, deterministic computation over the
/// events of the partitions one worker owns, in event time. It emits
/// [`Partial`]s, never points: the combiner merges every worker's partials
/// and hands them to the pipeline's [`Finisher`].
pub trait Pipeline: Send {
    /// A short stable name (`traffic`, ...), used in checkpoints and flags.
    fn name(&self) -> &'static str;

    /// Adds one accepted event. A late event within the allowed lateness
    /// marks its already-fired windows changed; they are emitted again at the
    /// next watermark.
    fn on_event(&mut self, ev: &Event);

    /// Adds a run of accepted events, in order: the same as `on_event` on
    /// each. Pipelines keeping per-user state override it to look a whole
    /// run's users up first, so that their cache misses overlap.
    fn on_events(&mut self, events: &[&Event]) {
        for ev in events {
            self.on_event(ev);
        }
    }

    /// Adds a run of accepted events of one partition (`slot` in the
    /// worker), each with that partition's watermark right after it: the
    /// same as `on_events`, for pipelines whose decisions do not wait for
    /// the watermark. A pipeline that holds an event until the watermark
    /// passes it decides by these, so that its outcome depends on each
    /// partition's own order only, never on how the partitions of a worker
    /// were interleaved (which differs between live, a restart and replay).
    fn on_partition_events(&mut self, slot: usize, events: &[&Event], watermarks: &[Watermark]) {
        let _ = (slot, watermarks);
        self.on_events(events);
    }

    /// Emits the partial of every window whose end is at or before `wm` and
    /// was not emitted yet or changed since, and forgets windows that can no
    /// longer receive events. `WindowId::pipeline` is set by the caller.
    fn on_watermark(&mut self, wm: Watermark, out: &mut Vec<Partial>);

    /// Partials of windows that are still open (early results for the live
    /// updates channel; never written to the store).
    fn early(&self, out: &mut Vec<Partial>);

    /// The pipeline's whole state, for a checkpoint.
    fn snapshot(&self) -> Result<Vec<u8>, ProcessorError>;

    /// Replaces the state with one taken by [`Pipeline::snapshot`].
    fn restore(&mut self, state: &[u8]) -> Result<(), ProcessorError>;

    /// Lets the pipeline keep cold state in files under `dir` (sealed with
    /// `keys` when given), referred to by its snapshots. Called before
    /// [`Pipeline::restore`], by a driver that checkpoints; the others keep
    /// everything in memory.
    fn spill_to(&mut self, dir: &Path, keys: Option<Arc<KeyRing>>) -> Result<(), ProcessorError> {
        let _ = (dir, keys);
        Ok(())
    }

    /// The last snapshot taken is durable: files only older snapshots
    /// referred to may go.
    fn checkpoint_saved(&mut self) {}
}

/// Stage 2 of a pipeline: turns one window's merged partial into points.
pub trait Finisher: Send {
    /// The points of a window, from the merge of every worker's partial.
    /// Called when the window fires, again after each correction, and for
    /// early results; the same merged partial must give the same points.
    fn finish(&self, merged: &Partial, out: &mut Vec<Point>);

    /// The window can no longer change (the watermark passed its end plus the
    /// allowed lateness). Called once per window that had data, in order of
    /// window end, and before any window ending at or after that moment
    /// fires; state derived here (trending baselines) is thus the same
    /// whatever the batch sizes or worker count.
    fn on_closed(&mut self, _merged: &Partial) {}

    /// How long after its end a window may still change, when that is longer
    /// than the allowed lateness (e.g. a session closing a gap later).
    fn horizon(&self) -> Option<Duration> {
        None
    }

    /// Stage-2 state, for a checkpoint.
    fn snapshot(&self) -> Result<Vec<u8>, ProcessorError> {
        Ok(Vec::new())
    }

    /// Replaces the state with one taken by [`Finisher::snapshot`].
    fn restore(&mut self, _state: &[u8]) -> Result<(), ProcessorError> {
        Ok(())
    }
}

/// A measurement a pipeline writes, and the tiers it writes it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    pub name: &'static str,
    pub tiers: &'static [Tier],
}

/// How far a pipeline's state reaches in event time, beyond the watermark
/// rules every pipeline shares (dedup, out-of-orderness, lateness).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateReach {
    /// How far before a window's start its result may depend on events
    /// (a session's start, an attributed impression, a trending baseline).
    pub back: Duration,
    /// How long after a window's end its result may still change (a
    /// session closing a gap later).
    pub ahead: Duration,
}

impl StateReach {
    /// The reach covering both.
    pub fn max(self, other: StateReach) -> StateReach {
        StateReach {
            back: self.back.max(other.back),
            ahead: self.ahead.max(other.ahead),
        }
    }
}

/// A pipeline as the rest of the system sees it.
pub trait PipelineSpec: Send + Sync + fmt::Debug {
    /// A short stable name, used in flags and checkpoints; the same as its
    /// stage 1's [`Pipeline::name`].
    fn name(&self) -> &'static str;

    /// What it writes.
    fn measurements(&self) -> &'static [Measurement];

    /// How far its state reaches, for replay's plan.
    fn reach(&self) -> StateReach;

    /// A fresh stage 1, for one worker.
    fn stage1(&self, allowed_lateness: Duration) -> Box<dyn Pipeline>;

    /// A fresh stage 2, for the combiner.
    fn stage2(&self, allowed_lateness: Duration) -> Box<dyn Finisher>;
}
