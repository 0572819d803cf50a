//! Where a replay writes: a database by name, in the embedded store or in
//! InfluxDB.
//!
//! InfluxDB: a database of that name with the same retention policies as the
//! live one (`rt`, `hourly`, `daily`). Embedded store: the live database
//! `tidemark` is `DATA_DIR/store.sqlite`; any other database `NAME` is the
//! SQLite file `DATA_DIR/NAME.sqlite` beside it, with the same tiers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tidemark_model::EventTime;
use tidemark_tsdb_writer::influx::{InfluxConfig, InfluxStore};
use tidemark_tsdb_writer::sqlite::SqliteStore;
use tidemark_tsdb_writer::{Store, DEFAULT_DATABASE};

use crate::ReplayError;

/// The store kind and location databases are opened in.
#[derive(Debug, Clone)]
pub enum StoreTarget {
    /// The embedded store's folder (the `run` data folder).
    Sqlite { data_dir: PathBuf },
    /// An InfluxDB server; `config.database` is replaced by the name opened.
    Influx { config: InfluxConfig },
}

impl StoreTarget {
    /// Opens database `name` without creating anything.
    pub fn open(&self, name: &str) -> Result<Arc<dyn Store>, ReplayError> {
        check_name(name)?;
        match self {
            StoreTarget::Sqlite { data_dir } => {
                let path = sqlite_path(data_dir, name);
                if !path.exists() {
                    // Opening would create it: a reference that does not exist is empty.
                    return Ok(Arc::new(SqliteStore::open_in_memory()?));
                }
                Ok(Arc::new(SqliteStore::open(path)?))
            }
            StoreTarget::Influx { config } => Ok(Arc::new(InfluxStore::new(InfluxConfig {
                database: name.to_string(),
                ..config.clone()
            })?)),
        }
    }

    /// Opens database `name`, creating it and its tiers if missing.
    pub async fn create(&self, name: &str) -> Result<Arc<dyn Store>, ReplayError> {
        check_name(name)?;
        let store: Arc<dyn Store> = match self {
            StoreTarget::Sqlite { data_dir } => {
                std::fs::create_dir_all(data_dir)?;
                Arc::new(SqliteStore::open(sqlite_path(data_dir, name))?)
            }
            StoreTarget::Influx { .. } => self.open(name)?,
        };
        store.ensure_schema().await?;
        Ok(store)
    }

    /// Where database `name` lives, for messages.
    pub fn describe(&self, name: &str) -> String {
        match self {
            StoreTarget::Sqlite { data_dir } => sqlite_path(data_dir, name).display().to_string(),
            StoreTarget::Influx { config } => format!("{}/{name}", config.url),
        }
    }
}

/// The embedded store's file for database `name`.
pub fn sqlite_path(data_dir: &Path, name: &str) -> PathBuf {
    if name == DEFAULT_DATABASE {
        data_dir.join("store.sqlite")
    } else {
        data_dir.join(format!("{name}.sqlite"))
    }
}

/// The database a replay started at `now` writes into by default:
/// `tidemark_replay_<UTC date>_<UTC time>`, e.g. `tidemark_replay_20261125_170501`.
pub fn default_database_name(now: EventTime) -> String {
    let t =
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(now.millis()).unwrap_or_default();
    format!("tidemark_replay_{}", t.format("%Y%m%d_%H%M%S"))
}

/// Database names are identifiers: letters, digits and `_`, at most 64.
pub fn check_name(name: &str) -> Result<(), ReplayError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ReplayError::Invalid(format!(
            "invalid database name {name:?}: use letters, digits and _ (at most 64)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_files() {
        assert_eq!(
            default_database_name(EventTime(1_795_712_701_000)),
            "tidemark_replay_20261126_170501"
        );
        assert!(check_name("tidemark_replay_1").is_ok());
        assert!(check_name("../etc").is_err());
        assert!(check_name("").is_err());
        let dir = Path::new("data");
        assert_eq!(sqlite_path(dir, "tidemark"), dir.join("store.sqlite"));
        assert_eq!(sqlite_path(dir, "v2"), dir.join("v2.sqlite"));
    }
}
