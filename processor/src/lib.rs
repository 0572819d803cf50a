//! The stream processor: turns the log's events into window results.
//!
//! Pipelines ([`Pipeline`]) are pure: no I/O, no clock. They see events and
//! watermarks and emit [`Point`]s. The one async driver ([`driver`]) reads the
//! log, tracks per-partition watermarks, drops duplicates and too-late events,
//! feeds the pipelines, sends final points to the store writer and early
//! results to the live updates channel, and checkpoints. The same code runs
//! live, in crash recovery and in replay.

pub mod ads;
pub mod checkpoint;
pub mod dedup;
pub mod driver;
pub mod engagement;
pub mod hll;
pub mod traffic;
pub mod trending;
pub mod watermark;

use std::time::Duration;

use tidemark_model::{Event, Point, Watermark};

pub use ads::{AdsConfig, AdsPipeline};
pub use checkpoint::Checkpoint;
pub use driver::{
    run_driver, BoxFuture, DriverConfig, Engine, EventCodec, Outcome, PointSink, ProcessorMetrics,
};
pub use engagement::{EngagementConfig, EngagementPipeline};
pub use hll::Hll;
pub use traffic::TrafficPipeline;
pub use trending::{TrendingConfig, TrendingPipeline};
pub use watermark::PartitionWatermarks;

/// The pipelines tidemark runs, with the default allowed lateness.
pub fn default_pipelines() -> Vec<Box<dyn Pipeline>> {
    pipelines_with_lateness(traffic::DEFAULT_ALLOWED_LATENESS)
}

/// Names of every pipeline, in the order they run.
pub const PIPELINE_NAMES: [&str; 4] = ["traffic", "engagement", "trending", "ads"];

/// The pipelines tidemark runs; `allowed_lateness` must match [`DriverConfig::allowed_lateness`].
pub fn pipelines_with_lateness(allowed_lateness: Duration) -> Vec<Box<dyn Pipeline>> {
    PIPELINE_NAMES
        .iter()
        .filter_map(|name| pipeline_named(name, allowed_lateness))
        .collect()
}

/// One pipeline by its name (see [`PIPELINE_NAMES`]); `None` for an unknown name.
pub fn pipeline_named(name: &str, allowed_lateness: Duration) -> Option<Box<dyn Pipeline>> {
    let pipeline: Box<dyn Pipeline> = match name {
        "traffic" => Box::new(TrafficPipeline::new(allowed_lateness)),
        "engagement" => Box::new(EngagementPipeline::new(EngagementConfig {
            allowed_lateness,
            ..EngagementConfig::default()
        })),
        "trending" => Box::new(TrendingPipeline::new(TrendingConfig {
            allowed_lateness,
            ..TrendingConfig::default()
        })),
        "ads" => Box::new(AdsPipeline::new(AdsConfig {
            allowed_lateness,
            ..AdsConfig::default()
        })),
        _ => return None,
    };
    Some(pipeline)
}

/// A stateful, deterministic computation over events in event time.
pub trait Pipeline: Send {
    /// A short stable name (`traffic`, ...), used in checkpoints and flags.
    fn name(&self) -> &'static str;

    /// Adds one accepted event. May emit corrected points for windows that
    /// already fired (late events within the allowed lateness).
    fn on_event(&mut self, ev: &Event, out: &mut Vec<Point>);

    /// Fires every window whose end is at or before `wm`, and forgets windows
    /// that can no longer receive events.
    fn on_watermark(&mut self, wm: Watermark, out: &mut Vec<Point>);

    /// The current values of windows that are still open (early results for
    /// the live updates channel; never written to the store).
    fn early(&self, out: &mut Vec<Point>);

    /// The pipeline's whole state, for a checkpoint.
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the state with one taken by [`Pipeline::snapshot`].
    fn restore(&mut self, state: &[u8]) -> Result<(), ProcessorError>;
}

/// Errors of the processor.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("corrupt checkpoint: {0}")]
    CorruptCheckpoint(String),
    #[error("checkpoint I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Log(#[from] tidemark_log::LogError),
    #[error(transparent)]
    Store(#[from] tidemark_tsdb_writer::StoreError),
}

impl ProcessorError {
    /// Whether retrying may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProcessorError::CorruptCheckpoint(_) => false,
            ProcessorError::Io(_) => true,
            ProcessorError::Log(e) => e.is_retryable(),
            ProcessorError::Store(e) => e.is_retryable(),
        }
    }
}
