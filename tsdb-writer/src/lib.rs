//! The store: where final and late-corrected window results are kept, by tier.
//!
//! The processor hands points to a [`writer::BatchingWriter`], which batches them
//! by size or time, retries transient failures with backoff and pushes back when
//! the store is slow. Behind it, one [`Store`] trait with two backends:
//! [`influx::InfluxStore`] (InfluxDB 1.x HTTP API) and [`sqlite::SqliteStore`]
//! (the embedded default). The serving layer queries the same trait.

pub mod influx;
pub mod sqlite;
pub mod writer;

use std::collections::BTreeMap;

use async_trait::async_trait;
use tidemark_model::{EventTime, Point, Tier};

/// The database every tier lives in unless configured otherwise.
pub const DEFAULT_DATABASE: &str = "tidemark";

/// Errors of a store. [`StoreError::is_retryable`] separates "try again later"
/// (store down, overloaded) from "this request can never succeed".
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store rejected the request: {0}")]
    Rejected(String),
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    #[error("store I/O failed: {0}")]
    Io(String),
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Io(_))
    }
}

/// How values of series that are merged together are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregate {
    /// Sum (counts).
    #[default]
    Sum,
    /// Mean (ratios and averages).
    Mean,
    /// Maximum.
    Max,
}

/// A read of one field of one measurement in one tier over a time range.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricQuery {
    pub measurement: String,
    pub field: String,
    pub tier: Tier,
    /// Inclusive.
    pub from: EventTime,
    /// Exclusive.
    pub to: EventTime,
    /// Only points whose tags have these values.
    pub filters: Vec<(String, String)>,
    /// One series per distinct combination of these tags; other tags are merged.
    pub group_by: Vec<String>,
    pub aggregate: Aggregate,
}

/// One series of a query answer: its group-by tags and points in time order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub tags: BTreeMap<String, String>,
    pub points: Vec<(EventTime, f64)>,
}

/// A time-series store with the retention tiers `rt`, `hourly` and `daily`.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Creates the database and its retention tiers if missing (idempotent).
    async fn ensure_schema(&self) -> Result<(), StoreError>;

    /// Writes points; a point with the same tier, measurement, tags and time
    /// as a stored one replaces it.
    async fn write(&self, points: &[Point]) -> Result<(), StoreError>;

    /// Answers a metric query, series sorted by tags.
    async fn query(&self, query: &MetricQuery) -> Result<Vec<Series>, StoreError>;

    /// Every stored point of `measurement` in `tier` with a time in
    /// `from..to`, as written (what replay's `--verify` compares). Integer
    /// and float fields may come back as either kind where the store does
    /// not keep the difference (InfluxDB's JSON); compare values as `f64`.
    async fn points(
        &self,
        tier: Tier,
        measurement: &str,
        from: EventTime,
        to: EventTime,
    ) -> Result<Vec<Point>, StoreError> {
        let _ = (tier, measurement, from, to);
        Err(StoreError::Rejected(format!(
            "the {} store cannot list its points",
            self.kind()
        )))
    }

    /// A short description for logs and `/api/v1/health`, e.g. `sqlite` or `influxdb`.
    fn kind(&self) -> &'static str;
}

#[cfg(feature = "testing")]
pub mod testing;
