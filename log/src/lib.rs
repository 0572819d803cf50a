//! The log: the durable, partitioned, ordered record of every accepted event.
//!
//! Ingest appends to it; processors and replay read from it by partition and
//! offset. [`Log`] is the one abstraction; [`segment::SegmentLog`] is the
//! embedded implementation (files on local disk), and the Kafka implementation
//! sits behind the same trait.
//!
//! Cargo feature `kafka` adds `kafka::KafkaLog` (rdkafka, librdkafka built
//! from source) and `kafka::testing`, a throwaway tansu broker for tests.

#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metered;
pub mod segment;

use async_trait::async_trait;
use bytes::Bytes;
use tidemark_model::EventTime;

/// One record to append. The partition is chosen from `key` (see
/// [`tidemark_model::topic::partition_for_key`]), so one key keeps its order.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub key: Bytes,
    pub value: Bytes,
    /// Event time of the record; what [`Log::offset_for_time`] searches.
    pub timestamp: EventTime,
}

/// A record as read back, with its place in its partition.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    pub offset: u64,
    pub key: Bytes,
    pub value: Bytes,
    pub timestamp: EventTime,
}

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
}

/// Errors of the log. [`LogError::is_retryable`] tells a caller whether the same
/// call may succeed later (a broker away, a full disk) or never will.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("unknown topic `{0}`")]
    UnknownTopic(String),
    #[error("topic `{topic}` has no partition {partition}")]
    UnknownPartition { topic: String, partition: u32 },
    #[error(
        "offset {offset} of {topic}/{partition} is no longer retained (earliest is {earliest})"
    )]
    OffsetOutOfRange {
        topic: String,
        partition: u32,
        offset: u64,
        earliest: u64,
    },
    #[error("corrupt log data in {path}: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("log I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("log unavailable: {0}")]
    Unavailable(String),
    #[error("invalid log configuration: {0}")]
    Config(String),
    /// A sealed batch no key of the key ring opens (its id is missing, or the
    /// key under that id is wrong); retrying cannot help.
    #[error("log encryption: {0}")]
    Encryption(String),
}

impl LogError {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LogError::Io(_) | LogError::Unavailable(_))
    }
}

/// A partitioned, append-only, durable log of records.
#[async_trait]
pub trait Log: Send + Sync + std::fmt::Debug + 'static {
    /// Creates `topic` with `partitions` partitions if it does not exist (idempotent;
    /// an existing topic keeps its partition count).
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), LogError>;

    /// Number of partitions of `topic`.
    async fn partition_count(&self, topic: &str) -> Result<u32, LogError>;

    /// Appends `records` to `topic`, each to the partition of its key, keeping
    /// their relative order per partition. Returns once every record is durable
    /// (per the log's sync policy), with each record's position in input order.
    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError>;

    /// Reads up to `max_records` records of one partition, starting at `offset`.
    /// Empty when `offset` is the end of the partition.
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, LogError>;

    /// The same read on the calling thread, for a log whose reads are
    /// synchronous underneath (the embedded one): a worker thread then
    /// skips two hops through the async runtime per batch. `None` when the
    /// read must be awaited.
    fn read_now(
        &self,
        _topic: &str,
        _partition: u32,
        _offset: u64,
        _max_records: usize,
    ) -> Option<Result<Vec<StoredRecord>, LogError>> {
        None
    }

    /// The first offset whose record timestamp is at or after `time`
    /// (the end offset if there is none).
    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        time: EventTime,
    ) -> Result<u64, LogError>;

    /// The earliest offset still retained.
    async fn start_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError>;

    /// The offset the next appended record will get.
    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError>;
}
