//! Where databases live: by name, in the embedded store or in InfluxDB. The
//! live database and every replay's target are opened through one
//! [`StoreTarget`].
//!
//! InfluxDB: a database of that name with the retention policies of the
//! live one (`rt`, `hourly`, `daily`). Embedded store: the live database
//! `tidemark` is `DATA_DIR/store.sqlite`; any other database `NAME` is the
//! SQLite file `DATA_DIR/NAME.sqlite` beside it, with the same tiers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::influx::{InfluxConfig, InfluxStore};
use crate::sqlite::SqliteStore;
use crate::{Store, StoreError, DEFAULT_DATABASE};

/// The store kind and location databases are opened in.
#[derive(Debug, Clone)]
pub enum StoreTarget {
    /// The embedded store's folder (the `run` data folder).
    Sqlite { data_dir: PathBuf },
    /// An InfluxDB server; `config.database` is the live database, and is
    /// replaced by the name opened.
    Influx { config: InfluxConfig },
}

impl StoreTarget {
    /// The database the live processor writes.
    pub fn live_database(&self) -> &str {
        match self {
            StoreTarget::Sqlite { .. } => DEFAULT_DATABASE,
            StoreTarget::Influx { config } => &config.database,
        }
    }

    /// Opens database `name` without creating anything.
    pub fn open(&self, name: &str) -> Result<Arc<dyn Store>, StoreError> {
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
    pub async fn create(&self, name: &str) -> Result<Arc<dyn Store>, StoreError> {
        check_name(name)?;
        let store: Arc<dyn Store> = match self {
            StoreTarget::Sqlite { data_dir } => {
                std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Io(e.to_string()))?;
                Arc::new(SqliteStore::open(sqlite_path(data_dir, name))?)
            }
            StoreTarget::Influx { .. } => self.open(name)?,
        };
        store.ensure_schema().await?;
        Ok(store)
    }

    /// Whether database `name` exists.
    pub async fn exists(&self, name: &str) -> Result<bool, StoreError> {
        check_name(name)?;
        match self {
            StoreTarget::Sqlite { data_dir } => Ok(sqlite_path(data_dir, name).exists()),
            StoreTarget::Influx { config } => {
                let databases = InfluxStore::new(config.clone())?.databases().await?;
                Ok(databases.iter().any(|d| d == name))
            }
        }
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

/// Database names are identifiers: letters, digits and `_`, at most 64.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName(format!(
            "invalid database name {name:?}: use letters, digits and _ (at most 64)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_files() {
        assert!(check_name("tidemark_replay_1").is_ok());
        assert!(check_name("../etc").is_err());
        assert!(check_name("").is_err());
        let dir = Path::new("data");
        assert_eq!(sqlite_path(dir, "tidemark"), dir.join("store.sqlite"));
        assert_eq!(sqlite_path(dir, "v2"), dir.join("v2.sqlite"));
    }

    #[tokio::test]
    async fn an_embedded_database_exists_once_created() {
        let dir = tempfile::tempdir().unwrap();
        let target = StoreTarget::Sqlite {
            data_dir: dir.path().to_path_buf(),
        };
        assert_eq!(target.live_database(), DEFAULT_DATABASE);
        assert!(!target.exists("v2").await.unwrap());
        target.create("v2").await.unwrap();
        assert!(target.exists("v2").await.unwrap());
        assert!(target.exists("../v2").await.is_err());
    }
}

/// Timeout of each InfluxDB request: long enough for `replay --verify`'s
/// reads of a whole range on a busy machine.
const INFLUX_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// InfluxDB connection; without `--influx-url` the embedded SQLite store is used.
#[derive(Debug, Clone, clap::Args)]
pub struct InfluxArgs {
    /// InfluxDB 1.x base URL, e.g. `http://127.0.0.1:8086`.
    #[arg(long, env = "TIDEMARK_INFLUX_URL")]
    pub influx_url: Option<String>,
    /// Database holding the tiers.
    #[arg(long, env = "TIDEMARK_INFLUX_DB", default_value = "tidemark")]
    pub influx_db: String,
    #[arg(long, env = "TIDEMARK_INFLUX_USER")]
    pub influx_user: Option<String>,
    #[arg(long, env = "TIDEMARK_INFLUX_PASSWORD", hide_env_values = true)]
    pub influx_password: Option<String>,
    /// PEM file of the CA that signed InfluxDB's certificate, for an
    /// `https://` `--influx-url` the system does not trust already.
    #[arg(long, env = "TIDEMARK_INFLUX_CA")]
    pub influx_ca: Option<std::path::PathBuf>,
}

impl InfluxArgs {
    /// Where databases live: InfluxDB with `--influx-url` (its database the
    /// live one), else the embedded store in `data_dir`.
    pub fn target(&self, data_dir: &std::path::Path) -> StoreTarget {
        match &self.influx_url {
            Some(url) => StoreTarget::Influx {
                config: InfluxConfig {
                    url: url.clone(),
                    database: self.influx_db.clone(),
                    username: self.influx_user.clone(),
                    password: self.influx_password.clone(),
                    timeout: INFLUX_REQUEST_TIMEOUT,
                    ca: self.influx_ca.clone(),
                },
            },
            None => StoreTarget::Sqlite {
                data_dir: data_dir.to_path_buf(),
            },
        }
    }
}
