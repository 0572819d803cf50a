//! The store: where final and late-corrected window results are kept, by tier.
//!
//! The processor hands points to a [`writer::BatchingWriter`], which batches them
//! by size or time, retries transient failures with backoff and pushes back when
//! the store is slow. Behind it, one [`Store`] trait with two backends:
//! [`influx::InfluxStore`] (InfluxDB 1.x HTTP API) and [`sqlite::SqliteStore`]
//! (the embedded default). The serving layer queries the same trait.

pub mod influx;
pub mod sqlite;
pub mod target;
pub mod writer;

pub use target::StoreTarget;

use std::collections::{BTreeMap, HashMap};

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
    /// A database name that is not an identifier.
    #[error("{0}")]
    InvalidName(String),
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

/// Answers a [`MetricQuery`] from points read one by one, as the store
/// does in SQL: filter by tags, group by tags, combine per time.
#[derive(Debug)]
pub struct Aggregator<'q> {
    query: &'q MetricQuery,
    /// The group-by tags in name order, so series sort as their tag maps do.
    group_by: Vec<&'q str>,
    index: HashMap<Vec<String>, GroupId>,
    groups: Vec<Group>,
}

/// One series being combined: its tag values and its values in time order.
type Group = (Vec<String>, Vec<(EventTime, Acc)>);

/// One series of an [`Aggregator`]'s answer, for adding many values
/// without looking their tags up again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupId(usize);

/// Per group, per time: running sum, count and maximum.
#[derive(Debug, Clone, Copy)]
struct Acc {
    sum: f64,
    count: u64,
    max: f64,
}

impl Acc {
    fn of(value: f64) -> Acc {
        Acc {
            sum: value,
            count: 1,
            max: value,
        }
    }

    fn add(&mut self, value: f64) {
        self.sum += value;
        self.count += 1;
        self.max = self.max.max(value);
    }
}

impl<'q> Aggregator<'q> {
    pub fn new(query: &'q MetricQuery) -> Aggregator<'q> {
        let mut group_by: Vec<&str> = query.group_by.iter().map(String::as_str).collect();
        group_by.sort_unstable();
        group_by.dedup();
        Aggregator {
            query,
            group_by,
            index: HashMap::new(),
            groups: Vec::new(),
        }
    }

    /// Whether a point with these tags passes the query's filters. Like
    /// InfluxDB, a missing tag compares and groups as the empty string.
    pub fn selects<'a>(&self, tag: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.query
            .filters
            .iter()
            .all(|(k, v)| tag(k).unwrap_or("") == v)
    }

    /// The series that points with these tags go to.
    pub fn group<'a>(&mut self, tag: impl Fn(&str) -> Option<&'a str>) -> GroupId {
        let key: Vec<String> = self
            .group_by
            .iter()
            .map(|k| tag(k).unwrap_or("").to_string())
            .collect();
        if let Some(&id) = self.index.get(&key) {
            return id;
        }
        let id = GroupId(self.groups.len());
        self.groups.push((key.clone(), Vec::new()));
        self.index.insert(key, id);
        id
    }

    /// Adds a selected point's value of the query's field.
    pub fn add<'a>(&mut self, time: EventTime, tag: impl Fn(&str) -> Option<&'a str>, value: f64) {
        let group = self.group(tag);
        self.add_to(group, time, value);
    }

    /// Adds a value to a series. Cheapest when times come in order, as
    /// stores return them.
    pub fn add_to(&mut self, group: GroupId, time: EventTime, value: f64) {
        let times = &mut self.groups[group.0].1;
        match times.last_mut() {
            Some((last, acc)) if *last == time => acc.add(value),
            Some((last, _)) if *last > time => {
                match times.binary_search_by_key(&time, |(t, _)| *t) {
                    Ok(i) => times[i].1.add(value),
                    Err(i) => times.insert(i, (time, Acc::of(value))),
                }
            }
            _ => times.push((time, Acc::of(value))),
        }
    }

    /// The series, sorted by tags.
    pub fn finish(self) -> Vec<Series> {
        let Aggregator {
            query,
            group_by,
            mut groups,
            ..
        } = self;
        groups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        groups
            .into_iter()
            .map(|(values, times)| Series {
                tags: group_by.iter().map(|k| k.to_string()).zip(values).collect(),
                points: times
                    .into_iter()
                    .map(|(t, acc)| {
                        let v = match query.aggregate {
                            Aggregate::Sum => acc.sum,
                            Aggregate::Mean => acc.sum / acc.count as f64,
                            Aggregate::Max => acc.max,
                        };
                        (t, v)
                    })
                    .collect(),
            })
            .collect()
    }
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

    /// How many points the store has refused since it was opened because
    /// they were older than their tier keeps. Such a refusal is not an
    /// error: no retry could store them, and the rest of the write stands.
    fn points_beyond_retention(&self) -> u64 {
        0
    }
}

#[cfg(feature = "testing")]
pub mod testing;
