//! Kappa replay: rebuilds history by reading a range of the retained log
//! through the same processor code that runs live.
//!
//! In the data flow it sits beside the live processor: log range → the same
//! stage-1 workers and stage-2 combiner ([`tidemark_processor::runner`]) →
//! a target database. [`plan::plan`] turns `--from T1 --to T2` into exact
//! offset ranges per partition (reaching back far enough for every window,
//! session and join that can touch a window starting at `T1`, and forward
//! far enough for every late event and session close that can still change
//! a window ending at `T2`); [`run::execute`] drives both stages over them by
//! event time alone and keeps only windows inside `[T1, T2]`
//! ([`window::inside`]); [`verify::diff`] compares the rebuilt points with
//! a reference database; [`job::run_replay`] puts them together.
//! [`archive`] writes old log records to zstd files and reads them back as a
//! [`tidemark_log::Log`], so replay reaches past the log's retention. Live
//! consumer state (checkpoints, offsets) is never read or written.

pub mod archive;
pub mod cli;
pub mod follow;
pub mod job;
pub mod plan;
pub mod run;
pub mod target;
pub mod verify;
pub mod window;

use tidemark_log::LogError;
use tidemark_model::EventTime;
use tidemark_processor::ProcessorError;
use tidemark_tsdb_writer::StoreError;

pub use job::{run_replay, ReplayOptions, ReplayReport, Source};
pub use plan::{plan, Plan, Reach};
pub use run::{execute, ReplaySummary};
pub use target::{default_database_name, StoreTarget};
pub use verify::{diff, Difference};

/// Errors of a replay. Every argument error is found before anything is
/// written.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// `--to` is not after `--from`.
    #[error("--to ({to}) must be after --from ({from})")]
    EmptyRange { from: String, to: String },
    /// Events the range needs were deleted by the log's retention.
    #[error(
        "the range is outside the log's retention: {topic}/{partition} keeps events from {oldest} on, \
         the replay starts at {from} (use an archive as the source for older history)"
    )]
    OutsideRetention {
        topic: String,
        partition: u32,
        oldest: String,
        from: String,
    },
    /// The log holds no event inside the range.
    #[error("the log holds no event between {from} and {to}")]
    NothingInRange { from: String, to: String },
    /// A bad flag value (pipeline, database name, weights, ...).
    #[error("{0}")]
    Invalid(String),
    /// `--verify` found differences.
    #[error("verify found {0} difference(s)")]
    Differences(usize),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Processor(#[from] ProcessorError),
    #[error("I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

impl ReplayError {
    /// Whether running the same replay again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReplayError::Log(e) => e.is_retryable(),
            ReplayError::Store(e) => e.is_retryable(),
            ReplayError::Processor(e) => e.is_retryable(),
            ReplayError::Io(_) => true,
            _ => false,
        }
    }

    pub(crate) fn empty_range(from: EventTime, to: EventTime) -> ReplayError {
        ReplayError::EmptyRange {
            from: from.to_rfc3339(),
            to: to.to_rfc3339(),
        }
    }
}
