//! The embedded store: SQLite, with the same tiers as InfluxDB.
//!
//! One table holds every tier; the primary key is the point identity (tier,
//! measurement, series key, time), so `INSERT OR REPLACE` gives the same
//! overwrite semantics as InfluxDB. Retention is not automatic: the run loop
//! calls [`SqliteStore::prune`] periodically to drop points older than their
//! tier's retention.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection};
use serde_json::{Map, Value};
use tidemark_model::{EventTime, FieldValue, Point, Tier};

use crate::{Aggregator, MetricQuery, Series, Store, StoreError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS points (
    tier TEXT NOT NULL,
    measurement TEXT NOT NULL,
    series TEXT NOT NULL,
    time INTEGER NOT NULL,
    tags TEXT NOT NULL,
    fields TEXT NOT NULL,
    PRIMARY KEY (tier, measurement, series, time)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS points_by_time ON points (tier, measurement, time);
";

const UPSERT: &str =
    "INSERT OR REPLACE INTO points (tier, measurement, series, time, tags, fields) \
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

const SELECT: &str = "SELECT time, tags, fields FROM points \
                      WHERE tier = ?1 AND measurement = ?2 AND time >= ?3 AND time < ?4";

/// The embedded SQLite store. Cloning shares the connection.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
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

    fn init(conn: Connection, wal: bool) -> Result<SqliteStore, StoreError> {
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
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Deletes points older than their tier's retention as seen from `now`,
    /// returning how many were removed. The run loop calls this periodically
    /// (SQLite has no retention policies of its own).
    pub async fn prune(&self, now: EventTime) -> Result<usize, StoreError> {
        self.with_conn(move |conn| {
            let mut removed = 0;
            for tier in Tier::ALL {
                let cutoff = now.minus(tier.retention()).millis();
                removed += conn
                    .execute(
                        "DELETE FROM points WHERE tier = ?1 AND time < ?2",
                        params![tier.name(), cutoff],
                    )
                    .map_err(io_error)?;
            }
            Ok(removed)
        })
        .await
    }

    async fn with_conn<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave SQLite inconsistent
            // (the transaction rolls back), so a poisoned lock is still usable.
            let mut guard = conn.lock().unwrap_or_else(|e| e.into_inner());
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

fn encode_fields(point: &Point) -> String {
    let map: Map<String, Value> = point
        .fields
        .iter()
        .map(|(k, v)| {
            let value = match *v {
                FieldValue::Int(i) => Value::from(i),
                // Non-finite floats have no JSON form and become null, which reads back as absent.
                FieldValue::Float(f) => Value::from(f),
            };
            (k.clone(), value)
        })
        .collect();
    Value::Object(map).to_string()
}

#[async_trait]
impl Store for SqliteStore {
    async fn ensure_schema(&self) -> Result<(), StoreError> {
        self.with_conn(|conn| conn.execute_batch(SCHEMA).map_err(io_error))
            .await
    }

    async fn write(&self, points: &[Point]) -> Result<(), StoreError> {
        if points.is_empty() {
            return Ok(());
        }
        let rows: Vec<(&'static str, String, String, i64, String, String)> = points
            .iter()
            .map(|p| {
                (
                    p.tier.name(),
                    p.measurement.clone(),
                    p.series_key(),
                    p.time.millis(),
                    encode_tags(p),
                    encode_fields(p),
                )
            })
            .collect();
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(io_error)?;
            {
                let mut stmt = tx.prepare_cached(UPSERT).map_err(io_error)?;
                for row in &rows {
                    stmt.execute(params![row.0, row.1, row.2, row.3, row.4, row.5])
                        .map_err(io_error)?;
                }
            }
            tx.commit().map_err(io_error)
        })
        .await
    }

    async fn query(&self, query: &MetricQuery) -> Result<Vec<Series>, StoreError> {
        if query.measurement.is_empty() || query.field.is_empty() {
            return Err(StoreError::InvalidQuery(
                "measurement and field must not be empty".into(),
            ));
        }
        let q = query.clone();
        let rows: Vec<(i64, String, String)> = self
            .with_conn(move |conn| {
                let mut stmt = conn.prepare_cached(SELECT).map_err(io_error)?;
                let rows = stmt
                    .query_map(
                        params![q.tier.name(), q.measurement, q.from.millis(), q.to.millis()],
                        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                    )
                    .map_err(io_error)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(io_error)
            })
            .await?;
        aggregate_rows(query, rows)
    }

    async fn points(
        &self,
        tier: Tier,
        measurement: &str,
        from: EventTime,
        to: EventTime,
    ) -> Result<Vec<Point>, StoreError> {
        let m = measurement.to_string();
        let rows: Vec<(i64, String, String)> = self
            .with_conn(move |conn| {
                let mut stmt = conn.prepare_cached(SELECT).map_err(io_error)?;
                let rows = stmt
                    .query_map(params![tier.name(), m, from.millis(), to.millis()], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })
                    .map_err(io_error)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(io_error)
            })
            .await?;
        rows.into_iter()
            .map(|(time, tags, fields)| {
                let tags: BTreeMap<String, String> = serde_json::from_str(&tags)
                    .map_err(|e| StoreError::Io(format!("corrupt tags in store: {e}")))?;
                let fields: Map<String, Value> = serde_json::from_str(&fields)
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
            })
            .collect()
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }
}

fn aggregate_rows(
    query: &MetricQuery,
    rows: Vec<(i64, String, String)>,
) -> Result<Vec<Series>, StoreError> {
    let mut aggregator = Aggregator::new(query);
    for (time, tags, fields) in rows {
        let tags: BTreeMap<String, String> = serde_json::from_str(&tags)
            .map_err(|e| StoreError::Io(format!("corrupt tags in store: {e}")))?;
        let tag = |k: &str| tags.get(k).map(String::as_str);
        if !aggregator.selects(tag) {
            continue;
        }
        let fields: Map<String, Value> = serde_json::from_str(&fields)
            .map_err(|e| StoreError::Io(format!("corrupt fields in store: {e}")))?;
        let Some(value) = fields.get(&query.field).and_then(Value::as_f64) else {
            continue;
        };
        aggregator.add(EventTime(time), tag, value);
    }
    Ok(aggregator.finish())
}
