//! The stream processor: turns the log's events into window results.
//!
//! Two stages, both pure (no I/O, no clock). Stage 1 ([`Worker`]): each
//! worker owns some partitions, drops duplicates and too-late events, tracks
//! watermarks and runs the stage-1 half of every pipeline ([`Pipeline`]),
//! which keeps the keyed state (sessions, ad joins, distinct users) and emits
//! [`Partial`] aggregates per window. Stage 2 ([`Combiner`]): merges the
//! workers' partials once every worker's watermark passed a window and lets
//! each pipeline's [`Finisher`] turn the merge into [`Point`]s (top-K,
//! ratios). Each pipeline describes itself once, to the [`registry`].
//! [`runner`] joins the stages with one thread per worker; the async
//! [`driver`] wraps that for live runs with the store, live updates and
//! checkpoints. The same code runs live, in crash recovery and in replay.

pub mod ads;
pub mod checkpoint;
pub mod combiner;
pub mod dedup;
pub mod driver;
pub mod engagement;
pub mod hll;
mod intern;
pub mod partial;
pub mod registry;
pub mod runner;
pub mod shards;
#[cfg(test)]
mod solo;
pub mod traffic;
pub mod trending;
pub mod watermark;
pub mod window;
pub mod worker;

use std::time::Duration;

use tidemark_model::{Event, Point, Watermark};

pub use ads::{AdsConfig, AdsPipeline};
pub use checkpoint::Checkpoint;
pub use combiner::Combiner;
pub use driver::{run_driver, BoxFuture, DriverConfig, EventCodec, PointSink, ProcessorMetrics};
pub use engagement::{EngagementConfig, EngagementPipeline};
pub use hll::Hll;
pub use partial::{Partial, WindowId};
pub use registry::{
    Measurement, PipelineConfigs, PipelineSet, PipelineSpec, Registry, StateReach, UnknownPipeline,
};
pub use traffic::TrafficPipeline;
pub use trending::{TrendingConfig, TrendingPipeline};
pub use watermark::PartitionWatermarks;
pub use worker::{Outcome, Worker};

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

/// Errors of the processor.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("corrupt checkpoint: {0}")]
    CorruptCheckpoint(String),
    /// A checkpoint of another worker count: keyed state belongs to
    /// other workers.
    #[error(
        "the checkpoint was taken with {taken_with} workers, this processor runs {runs}; \
         restart with the same worker count or rebuild with replay"
    )]
    WorkerCount { taken_with: usize, runs: usize },
    /// State that cannot be encoded; no checkpoint is written.
    #[error("cannot encode the state for a checkpoint: {0}")]
    Snapshot(String),
    /// A partial from a worker or pipeline the combiner does not run.
    #[error(
        "a partial from worker {worker} of pipeline {pipeline}, but the combiner runs \
         {workers} workers and {pipelines} pipelines; start every part with the same \
         pipelines and worker count"
    )]
    StrayPartial {
        worker: usize,
        pipeline: u8,
        workers: usize,
        pipelines: usize,
    },
    /// A partition slot that was never registered with the worker.
    #[error("partition slot {0} was never registered with this worker")]
    UnknownSlot(usize),
    #[error("checkpoint I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Log(#[from] tidemark_log::LogError),
    #[error(transparent)]
    Store(#[from] tidemark_tsdb_writer::StoreError),
    #[error("invalid processor setup: {0}")]
    Setup(String),
}

impl ProcessorError {
    /// Whether retrying may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProcessorError::CorruptCheckpoint(_)
            | ProcessorError::Snapshot(_)
            | ProcessorError::WorkerCount { .. }
            | ProcessorError::StrayPartial { .. }
            | ProcessorError::UnknownSlot(_)
            | ProcessorError::Setup(_) => false,
            ProcessorError::Io(_) => true,
            ProcessorError::Log(e) => e.is_retryable(),
            ProcessorError::Store(e) => e.is_retryable(),
        }
    }
}
