//! The processor's errors.

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
    /// A sealed checkpoint no key of the key ring opens.
    #[error("checkpoint encryption: {0}")]
    Encryption(String),
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
            | ProcessorError::Setup(_)
            | ProcessorError::Encryption(_) => false,
            ProcessorError::Io(_) => true,
            ProcessorError::Log(e) => e.is_retryable(),
            ProcessorError::Store(e) => e.is_retryable(),
        }
    }
}
