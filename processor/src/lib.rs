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
//! checkpoints. Every worker, bounded, live or sharded, reads its partitions
//! through one synchronous read loop over a [`runner::RecordSource`]. The
//! same code runs live, in crash recovery and in replay.

pub mod ads;
pub mod alerts;
pub mod checkpoint;
pub mod combiner;
pub mod dedup;
pub mod driver;
pub mod engagement;
mod error;
pub mod hll;
mod intern;
pub mod partial;
pub mod patterns;
pub mod pipeline;
mod read_loop;
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

pub use ads::{AdsConfig, AdsPipeline};
pub use checkpoint::Checkpoint;
pub use combiner::Combiner;
pub use driver::{run_driver, BoxFuture, DriverConfig, EventCodec, PointSink, ProcessorMetrics};
pub use engagement::{EngagementConfig, EngagementPipeline};
pub use error::ProcessorError;
pub use hll::Hll;
pub use partial::{Partial, WindowId};
pub use pipeline::{Finisher, Measurement, Pipeline, PipelineSpec, StateReach};
pub use registry::{PipelineConfigs, PipelineSet, Registry, UnknownPipeline};
pub use traffic::TrafficPipeline;
pub use trending::{TrendingConfig, TrendingPipeline};
pub use watermark::PartitionWatermarks;
pub use worker::{Outcome, Worker, WorkerConfig};
