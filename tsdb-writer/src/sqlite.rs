//! The embedded store: SQLite, with the same tiers as InfluxDB.
//!
//! Points are kept by window: one row per (tier, measurement, time) holds
//! the fields of every series at that time in a compact binary block (see
//! [`block`]), and each series' tags are stored once, under a number. A day
//! of one-minute data is then 1,440 rows read in key order, not one row and
//! two JSON documents per point, which is what lets a dashboard ask for a
//! day of a measurement in milliseconds. Writing a point replaces the one
//! with the same tier, measurement, tags and time, as in InfluxDB.
//! Retention is not automatic: the run loop calls [`SqliteStore::prune`]
//! periodically to drop points older than their tier's retention.
//!
//! A database written by an earlier version (one `points` row per point) is
//! converted when it is opened.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::{Map, Value};
use tidemark_model::crash::{self, Place};
use tidemark_model::{EventTime, FieldValue, Point, Tier};

use crate::{Aggregator, GroupId, MetricQuery, Series, Store, StoreError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    measurement TEXT NOT NULL,
    key TEXT NOT NULL,
    tags TEXT NOT NULL,
    UNIQUE (measurement, key)
);
CREATE TABLE IF NOT EXISTS blocks (
    tier TEXT NOT NULL,
    measurement TEXT NOT NULL,
    time INTEGER NOT NULL,
    entries INTEGER NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (tier, measurement, time)
);
";

const SELECT_BLOCKS: &str = "SELECT time, body FROM blocks \
     WHERE tier = ?1 AND measurement = ?2 AND time >= ?3 AND time < ?4 ORDER BY time";

const SELECT_BLOCK: &str =
    "SELECT body FROM blocks WHERE tier = ?1 AND measurement = ?2 AND time = ?3";

const UPSERT_BLOCK: &str = "INSERT INTO blocks (tier, measurement, time, entries, body) \
     VALUES (?1, ?2, ?3, ?4, ?5) \
     ON CONFLICT (tier, measurement, time) DO UPDATE SET entries = ?4, body = ?5";

/// The embedded SQLite store. Cloning shares the connection.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    conn: Connection,
    series: SeriesCache,
}

/// The series table in memory: numbers by (measurement, series key) and
/// tags by number.
#[derive(Debug, Default)]
struct SeriesCache {
    ids: HashMap<(String, String), u32>,
    tags: HashMap<u32, Vec<(String, String)>>,
    newest: u32,
}

impl SeriesCache {
    /// Adds the series numbered above the newest known, which another
    /// process sharing the file may have written.
    fn load_newer(&mut self, conn: &Connection) -> Result<(), StoreError> {
        let mut stmt = conn
            .prepare_cached("SELECT id, measurement, key, tags FROM series WHERE id > ?1")
            .map_err(io_error)?;
        let mut rows = stmt.query(params![self.newest]).map_err(io_error)?;
        while let Some(row) = rows.next().map_err(io_error)? {
            let id: u32 = row.get(0).map_err(io_error)?;
            let tags: String = row.get(3).map_err(io_error)?;
            let tags: BTreeMap<String, String> = serde_json::from_str(&tags)
                .map_err(|e| StoreError::Io(format!("corrupt tags in store: {e}")))?;
            self.ids.insert(
                (row.get(1).map_err(io_error)?, row.get(2).map_err(io_error)?),
                id,
            );
            self.tags.insert(id, tags.into_iter().collect());
            self.newest = self.newest.max(id);
        }
        Ok(())
    }

    /// The tags of series `id`, looking for series written elsewhere first.
    fn tags_of(&mut self, conn: &Connection, id: u32) -> Result<&[(String, String)], StoreError> {
        if !self.tags.contains_key(&id) {
            self.load_newer(conn)?;
        }
        self.tags
            .get(&id)
            .map(Vec::as_slice)
            .ok_or_else(|| StoreError::Io(format!("corrupt store: no series {id}")))
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, in WAL mode.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path.as_ref()).map_err(io_error)?;
        Self::init(conn, true)
    }

    /// A private in-memory database, for tests and throwaway runs.
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        let conn = Connection::open_in_memory().map_err(io_error)?;
        Self::init(conn, false)
    }

    fn init(mut conn: Connection, wal: bool) -> Result<SqliteStore, StoreError> {
        if wal {
            // The journal mode pragma answers with a row, so it is queried, not executed.
            let _mode: String = conn
                .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
                .map_err(io_error)?;
        }
        // In WAL mode NORMAL survives process crashes; only power loss can lose
        // the last transactions, which replay re-creates.
        conn.execute_batch("PRAGMA synchronous = NORMAL;")
            .map_err(io_error)?;
        conn.execute_batch(SCHEMA).map_err(io_error)?;
        let mut series = SeriesCache::default();
        convert_point_rows(&mut conn, &mut series)?;
        series.load_newer(&conn)?;
        Ok(SqliteStore {
            inner: Arc::new(Mutex::new(Inner { conn, series })),
        })
    }

    /// Deletes points older than their tier's retention as seen from `now`,
    /// returning how many were removed. The run loop calls this periodically
    /// (SQLite has no retention policies of its own).
    pub async fn prune(&self, now: EventTime) -> Result<usize, StoreError> {
        self.with_inner(move |inner| {
            let tx = inner.conn.transaction().map_err(io_error)?;
            let mut removed = 0;
            for tier in Tier::ALL {
                let cutoff = now.minus(tier.retention()).millis();
                let entries: i64 = tx
                    .query_row(
                        "SELECT COALESCE(SUM(entries), 0) FROM blocks WHERE tier = ?1 AND time < ?2",
                        params![tier.name(), cutoff],
                        |row| row.get(0),
                    )
                    .map_err(io_error)?;
                tx.execute(
                    "DELETE FROM blocks WHERE tier = ?1 AND time < ?2",
                    params![tier.name(), cutoff],
                )
                .map_err(io_error)?;
                removed += entries as usize;
            }
            tx.commit().map_err(io_error)?;
            Ok(removed)
        })
        .await
    }

    async fn with_inner<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave SQLite inconsistent
            // (the transaction rolls back, and the series cache only learns
            // of series after their commit), so a poisoned lock is still usable.
            let mut guard = inner.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Io(format!("store task failed: {e}")))?
    }
}

fn io_error(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(code, _)
            if matches!(
                code.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Io(e.to_string()),
    }
}

fn encode_tags(point: &Point) -> String {
    let map: Map<String, Value> = point
        .tags
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    Value::Object(map).to_string()
}

/// Series first seen in a transaction, for the cache once it commits.
#[derive(Default)]
struct NewSeries {
    ids: HashMap<(String, String), u32>,
    tags: Vec<(u32, Vec<(String, String)>)>,
}

impl NewSeries {
    fn commit_into(self, cache: &mut SeriesCache) {
        for (id, tags) in self.tags {
            cache.newest = cache.newest.max(id);
            cache.tags.insert(id, tags);
        }
        cache.ids.extend(self.ids);
    }
}

/// The number of the point's series, adding the series if it is new.
fn series_id(
    tx: &Transaction,
    cache: &SeriesCache,
    fresh: &mut NewSeries,
    point: &Point,
) -> Result<u32, StoreError> {
    let key = (point.measurement.clone(), point.series_key());
    if let Some(&id) = cache.ids.get(&key).or_else(|| fresh.ids.get(&key)) {
        return Ok(id);
    }
    // Another process sharing the file may have added it since it was read.
    let existing: Option<u32> = tx
        .query_row(
            "SELECT id FROM series WHERE measurement = ?1 AND key = ?2",
            params![key.0, key.1],
            |row| row.get(0),
        )
        .optional()
        .map_err(io_error)?;
    let id = match existing {
        Some(id) => id,
        None => {
            tx.execute(
                "INSERT INTO series (measurement, key, tags) VALUES (?1, ?2, ?3)",
                params![key.0, key.1, encode_tags(point)],
            )
            .map_err(io_error)?;
            u32::try_from(tx.last_insert_rowid())
                .map_err(|_| StoreError::Rejected("too many series".into()))?
        }
    };
    fresh.tags.push((id, point.tags.clone()));
    fresh.ids.insert(key, id);
    Ok(id)
}

/// Writes points into their blocks, replacing stored points of the same
/// series and time; series it has to add go to `fresh`.
fn write_points<'p>(
    tx: &Transaction,
    cache: &SeriesCache,
    fresh: &mut NewSeries,
    points: impl IntoIterator<Item = &'p Point>,
) -> Result<(), StoreError> {
    let mut by_block: BTreeMap<(&'static str, &str, i64), Vec<&Point>> = BTreeMap::new();
    for point in points {
        by_block
            .entry((
                point.tier.name(),
                point.measurement.as_str(),
                point.time.millis(),
            ))
            .or_default()
            .push(point);
    }
    let mut select = tx.prepare_cached(SELECT_BLOCK).map_err(io_error)?;
    let mut upsert = tx.prepare_cached(UPSERT_BLOCK).map_err(io_error)?;
    for ((tier, measurement, time), points) in by_block {
        let stored: Option<Vec<u8>> = select
            .query_row(params![tier, measurement, time], |row| row.get(0))
            .optional()
            .map_err(io_error)?;
        let mut entries = match stored {
            Some(body) => block::decode(&body)?,
            None => BTreeMap::new(),
        };
        for point in points {
            let id = series_id(tx, cache, fresh, point)?;
            entries.insert(id, point.fields.clone());
        }
        upsert
            .execute(params![
                tier,
                measurement,
                time,
                entries.len() as i64,
                block::encode(&entries)
            ])
            .map_err(io_error)?;
    }
    Ok(())
}

/// Converts the one-row-per-point table of earlier versions into blocks, in
/// one transaction, and drops it.
fn convert_point_rows(conn: &mut Connection, cache: &mut SeriesCache) -> Result<(), StoreError> {
    let old: Option<String> = conn
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'points'",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(io_error)?;
    if old.is_none() {
        return Ok(());
    }
    tracing::info!("converting the store to blocks of a window each");
    let tx = conn.transaction().map_err(io_error)?;
    let fresh = {
        let mut stmt = tx
            .prepare("SELECT tier, measurement, time, tags, fields FROM points ORDER BY tier, measurement, time")
            .map_err(io_error)?;
        let mut rows = stmt.query([]).map_err(io_error)?;
        let mut fresh = NewSeries::default();
        let mut pending: Vec<Point> = Vec::new();
        let flush = |pending: &mut Vec<Point>, fresh: &mut NewSeries| {
            write_points(&tx, cache, fresh, pending.iter())?;
            pending.clear();
            Ok::<_, StoreError>(())
        };
        while let Some(row) = rows.next().map_err(io_error)? {
            let tier: String = row.get(0).map_err(io_error)?;
            let tier = Tier::from_name(&tier)
                .ok_or_else(|| StoreError::Io(format!("corrupt tier {tier:?} in store")))?;
            let measurement: String = row.get(1).map_err(io_error)?;
            let time: i64 = row.get(2).map_err(io_error)?;
            let tags: String = row.get(3).map_err(io_error)?;
            let fields: String = row.get(4).map_err(io_error)?;
            let point = json_row_point(&measurement, tier, time, &tags, &fields)?;
            // A window's points arrive together; written once it is complete.
            if pending.first().is_some_and(|p: &Point| {
                (p.tier, &p.measurement, p.time) != (point.tier, &point.measurement, point.time)
            }) {
                flush(&mut pending, &mut fresh)?;
            }
            pending.push(point);
        }
        flush(&mut pending, &mut fresh)?;
        fresh
    };
    tx.execute_batch("DROP TABLE points").map_err(io_error)?;
    tx.commit().map_err(io_error)?;
    fresh.commit_into(cache);
    Ok(())
}

/// A point of the earlier one-row-per-point layout: tags and fields as JSON.
fn json_row_point(
    measurement: &str,
    tier: Tier,
    time: i64,
    tags: &str,
    fields: &str,
) -> Result<Point, StoreError> {
    let tags: BTreeMap<String, String> = serde_json::from_str(tags)
        .map_err(|e| StoreError::Io(format!("corrupt tags in store: {e}")))?;
    let fields: Map<String, Value> = serde_json::from_str(fields)
        .map_err(|e| StoreError::Io(format!("corrupt fields in store: {e}")))?;
    let fields = fields
        .into_iter()
        .filter_map(|(k, v)| {
            let value = match v.as_i64() {
                Some(i) if !v.is_f64() => FieldValue::Int(i),
                _ => FieldValue::Float(v.as_f64()?),
            };
            Some((k, value))
        })
        .collect();
    Ok(Point::new(
        measurement,
        tier,
        EventTime(time),
        tags.into_iter().collect(),
        fields,
    ))
}

#[async_trait]
impl Store for SqliteStore {
    async fn ensure_schema(&self) -> Result<(), StoreError> {
        self.with_inner(|inner| inner.conn.execute_batch(SCHEMA).map_err(io_error))
            .await
    }

    async fn write(&self, points: &[Point]) -> Result<(), StoreError> {
        if points.is_empty() {
            return Ok(());
        }
        let points = points.to_vec();
        self.with_inner(move |inner| {
            let tx = inner.conn.transaction().map_err(io_error)?;
            let mut fresh = NewSeries::default();
            write_points(&tx, &inner.series, &mut fresh, &points)?;
            crash::point(Place::StoreWrite);
            tx.commit().map_err(io_error)?;
            fresh.commit_into(&mut inner.series);
            Ok(())
        })
        .await
    }

    async fn query(&self, query: &MetricQuery) -> Result<Vec<Series>, StoreError> {
        if query.measurement.is_empty() || query.field.is_empty() {
            return Err(StoreError::InvalidQuery(
                "measurement and field must not be empty".into(),
            ));
        }
        let query = query.clone();
        self.with_inner(move |inner| {
            let Inner { conn, series } = inner;
            let mut aggregator = Aggregator::new(&query);
            // Per series number: not yet looked at, left out by the
            // filters, or its group.
            let mut groups: Vec<Option<Option<GroupId>>> = Vec::new();
            let mut stmt = conn.prepare_cached(SELECT_BLOCKS).map_err(io_error)?;
            let mut rows = stmt
                .query(params![
                    query.tier.name(),
                    query.measurement,
                    query.from.millis(),
                    query.to.millis()
                ])
                .map_err(io_error)?;
            while let Some(row) = rows.next().map_err(io_error)? {
                let time = EventTime(row.get(0).map_err(io_error)?);
                let body = row.get_ref(1).map_err(io_error)?;
                let reader = block::Reader::new(body.as_blob().map_err(|e| io_error(e.into()))?)?;
                let Some(field) = reader.field_index(&query.field) else {
                    continue;
                };
                for entry in reader.entries() {
                    let id = entry.series as usize;
                    if groups.len() <= id {
                        groups.resize(id + 1, None);
                    }
                    let group = match groups[id] {
                        Some(group) => group,
                        None => {
                            let tags = series.tags_of(conn, entry.series)?;
                            let tag = |k: &str| {
                                tags.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
                            };
                            let group = aggregator.selects(tag).then(|| aggregator.group(tag));
                            groups[id] = Some(group);
                            group
                        }
                    };
                    let (Some(group), Some(value)) = (group, entry.value(field)) else {
                        continue;
                    };
                    aggregator.add_to(group, time, value.as_f64());
                }
            }
            Ok(aggregator.finish())
        })
        .await
    }

    async fn points(
        &self,
        tier: Tier,
        measurement: &str,
        from: EventTime,
        to: EventTime,
    ) -> Result<Vec<Point>, StoreError> {
        let measurement = measurement.to_string();
        self.with_inner(move |inner| {
            let Inner { conn, series } = inner;
            let mut stmt = conn.prepare_cached(SELECT_BLOCKS).map_err(io_error)?;
            let mut rows = stmt
                .query(params![
                    tier.name(),
                    measurement,
                    from.millis(),
                    to.millis()
                ])
                .map_err(io_error)?;
            let mut points = Vec::new();
            while let Some(row) = rows.next().map_err(io_error)? {
                let time = EventTime(row.get(0).map_err(io_error)?);
                let body = row.get_ref(1).map_err(io_error)?;
                let reader = block::Reader::new(body.as_blob().map_err(|e| io_error(e.into()))?)?;
                for entry in reader.entries() {
                    let fields: Vec<(String, FieldValue)> = reader
                        .names()
                        .enumerate()
                        .filter_map(|(i, name)| Some((name.to_string(), entry.value(i)?)))
                        .collect();
                    let tags = series.tags_of(conn, entry.series)?.to_vec();
                    points.push(Point::new(&measurement, tier, time, tags, fields));
                }
            }
            Ok(points)
        })
        .await
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }
}

/// The binary form of a block: the fields of every series at one time.
///
/// ```text
/// u16 field count, then per field: u16 name length, name (UTF-8)
/// u32 entry count, then per entry (by series number):
///     u32 series number, then per field: u8 kind (0 absent, 1 integer,
///     2 float) and 8 bytes of value
/// ```
///
/// Little-endian. Entries have one width, so reading a field is an offset.
mod block {
    use std::collections::BTreeMap;

    use tidemark_model::FieldValue;

    use crate::StoreError;

    const ABSENT: u8 = 0;
    const INT: u8 = 1;
    const FLOAT: u8 = 2;
    const VALUE_WIDTH: usize = 9;

    fn corrupt(what: &str) -> StoreError {
        StoreError::Io(format!("corrupt block in store: {what}"))
    }

    pub fn encode(entries: &BTreeMap<u32, Vec<(String, FieldValue)>>) -> Vec<u8> {
        let mut names: Vec<&str> = entries
            .values()
            .flatten()
            .map(|(name, _)| name.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        let mut out = Vec::with_capacity(
            8 + names.iter().map(|n| n.len() + 2).sum::<usize>()
                + entries.len() * (4 + names.len() * VALUE_WIDTH),
        );
        out.extend_from_slice(&(names.len() as u16).to_le_bytes());
        for name in &names {
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for (series, fields) in entries {
            out.extend_from_slice(&series.to_le_bytes());
            for name in &names {
                match fields.iter().find(|(n, _)| n == name).map(|(_, v)| *v) {
                    Some(FieldValue::Int(i)) => {
                        out.push(INT);
                        out.extend_from_slice(&i.to_le_bytes());
                    }
                    // Non-finite floats have no place in a time series; they
                    // read back as absent, as they do from InfluxDB.
                    Some(FieldValue::Float(f)) if f.is_finite() => {
                        out.push(FLOAT);
                        out.extend_from_slice(&f.to_le_bytes());
                    }
                    _ => {
                        out.push(ABSENT);
                        out.extend_from_slice(&[0; 8]);
                    }
                }
            }
        }
        out
    }

    pub fn decode(body: &[u8]) -> Result<BTreeMap<u32, Vec<(String, FieldValue)>>, StoreError> {
        let reader = Reader::new(body)?;
        Ok(reader
            .entries()
            .map(|entry| {
                let fields = reader
                    .names()
                    .enumerate()
                    .filter_map(|(i, name)| Some((name.to_string(), entry.value(i)?)))
                    .collect();
                (entry.series, fields)
            })
            .collect())
    }

    /// A block read in place.
    pub struct Reader<'a> {
        names: Vec<&'a str>,
        entries: &'a [u8],
        width: usize,
    }

    impl<'a> Reader<'a> {
        pub fn new(body: &'a [u8]) -> Result<Reader<'a>, StoreError> {
            let mut rest = body;
            let mut take = |n: usize| {
                if rest.len() < n {
                    return Err(corrupt("cut short"));
                }
                let (head, tail) = rest.split_at(n);
                rest = tail;
                Ok(head)
            };
            let count = u16::from_le_bytes(take(2)?.try_into().expect("two bytes")) as usize;
            let mut names = Vec::with_capacity(count);
            for _ in 0..count {
                let len = u16::from_le_bytes(take(2)?.try_into().expect("two bytes")) as usize;
                names.push(std::str::from_utf8(take(len)?).map_err(|_| corrupt("field name"))?);
            }
            let entries = u32::from_le_bytes(take(4)?.try_into().expect("four bytes")) as usize;
            let width = 4 + names.len() * VALUE_WIDTH;
            let entries = take(entries * width)?;
            Ok(Reader {
                names,
                entries,
                width,
            })
        }

        pub fn names(&self) -> impl Iterator<Item = &'a str> + '_ {
            self.names.iter().copied()
        }

        pub fn field_index(&self, name: &str) -> Option<usize> {
            self.names.iter().position(|n| *n == name)
        }

        pub fn entries(&self) -> impl Iterator<Item = Entry<'a>> + '_ {
            self.entries.chunks_exact(self.width).map(|bytes| Entry {
                series: u32::from_le_bytes(bytes[..4].try_into().expect("four bytes")),
                values: &bytes[4..],
            })
        }
    }

    /// One series' fields in a block.
    pub struct Entry<'a> {
        pub series: u32,
        values: &'a [u8],
    }

    impl Entry<'_> {
        /// The value of field number `field`, if the series has it.
        pub fn value(&self, field: usize) -> Option<FieldValue> {
            let at = field * VALUE_WIDTH;
            let bytes: [u8; 8] = self.values[at + 1..at + VALUE_WIDTH].try_into().ok()?;
            match self.values[at] {
                INT => Some(FieldValue::Int(i64::from_le_bytes(bytes))),
                FLOAT => Some(FieldValue::Float(f64::from_le_bytes(bytes))),
                _ => None,
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_block_reads_back_as_written() {
            let mut entries = BTreeMap::new();
            entries.insert(
                3,
                vec![
                    ("events".to_string(), FieldValue::Int(-7)),
                    ("ratio".to_string(), FieldValue::Float(0.25)),
                ],
            );
            entries.insert(9, vec![("other".to_string(), FieldValue::Float(1.5))]);
            entries.insert(11, vec![("ratio".to_string(), FieldValue::Float(f64::NAN))]);
            let body = encode(&entries);
            let mut expected = entries.clone();
            expected.insert(11, vec![]);
            assert_eq!(decode(&body).unwrap(), expected);
        }

        #[test]
        fn a_cut_block_is_an_error() {
            let mut entries = BTreeMap::new();
            entries.insert(1, vec![("events".to_string(), FieldValue::Int(1))]);
            let body = encode(&entries);
            for len in 0..body.len() {
                assert!(Reader::new(&body[..len]).is_err(), "cut at {len}");
            }
        }
    }
}
