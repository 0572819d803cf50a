//! Which database the REST API answers from, across restarts and processes:
//! `DATA_DIR/serving.json` (`{"database": .., "previous": .., "history": [..]}`),
//! written by `tidemark promote` and followed by every server sharing the
//! folder. `history` lists every promote and rollback, oldest first; files
//! written before it existed read as having none.
//!
//! The file is replaced atomically (write, fsync, rename), so a reader sees
//! the old choice or the new one. A server looks at it every [`POLL`] and
//! switches its [`ServingStore`](crate::ServingStore) in one step.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemark_tsdb_writer::{Store, StoreTarget};
use tokio_util::sync::CancellationToken;

use crate::ServerState;

/// The file holding the served database.
pub const SERVING_FILE: &str = "serving.json";

/// How often a running server looks at [`SERVING_FILE`].
pub const POLL: Duration = Duration::from_millis(200);

/// What `serving.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serving {
    /// The database the REST API answers from.
    pub database: String,
    /// The one served before, for `--rollback`.
    pub previous: Option<String>,
    /// Every switch so far, oldest first; each write appends one.
    #[serde(default)]
    pub history: Vec<ServingChange>,
}

/// One switch of the served database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServingChange {
    /// When it was recorded (RFC 3339, UTC).
    pub time: String,
    pub action: ServingAction,
    /// The database served from then on.
    pub database: String,
    /// The database served until then.
    pub previous: String,
    /// Who switched it, as the audit log names actors (`cli:alice`).
    pub by: String,
}

/// How the served database was switched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServingAction {
    /// `tidemark promote DB`.
    Promote,
    /// `tidemark promote --rollback`.
    Rollback,
}

impl Serving {
    /// What the file holds after `change`, given what it holds now
    /// (`None` when there is none): the old history with `change` appended.
    pub fn switched(current: Option<Serving>, change: ServingChange) -> Serving {
        let mut history = current.map(|s| s.history).unwrap_or_default();
        let (database, previous) = (change.database.clone(), change.previous.clone());
        history.push(change);
        Serving {
            database,
            previous: Some(previous),
            history,
        }
    }
}

fn serving_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SERVING_FILE)
}

/// The served database recorded in `data_dir`, if any.
pub fn read_serving(data_dir: &Path) -> io::Result<Option<Serving>> {
    let path = serving_path(data_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unreadable {}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}

/// Records `serving` in `data_dir`, durably.
pub fn write_serving(data_dir: &Path, serving: &Serving) -> io::Result<()> {
    let tmp = data_dir.join(format!("{SERVING_FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(serving)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, serving_path(data_dir))?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// Makes `server` answer from the database named in `data_dir`'s
/// [`SERVING_FILE`] (the live one, `live`, when there is none).
pub fn sync_serving(
    data_dir: &Path,
    target: &StoreTarget,
    live: &(String, Arc<dyn Store>),
    server: &ServerState,
) {
    let wanted = match read_serving(data_dir) {
        Ok(s) => s.map_or_else(|| live.0.clone(), |s| s.database),
        Err(error) => {
            tracing::warn!(error = %error, "Ignoring the serving file");
            return;
        }
    };
    if wanted == server.serving().name() {
        return;
    }
    let store = if wanted == live.0 {
        Ok(live.1.clone())
    } else {
        target.open(&wanted)
    };
    match store {
        Ok(store) => {
            server.serving().switch(&wanted, store);
            tracing::info!(database = %wanted, "Serving database switched");
        }
        Err(error) => tracing::warn!(error = %error, database = %wanted, "Cannot serve database"),
    }
}

/// Runs [`sync_serving`] every [`POLL`] until `cancel`.
pub async fn follow_serving(
    data_dir: PathBuf,
    target: StoreTarget,
    live: (String, Arc<dyn Store>),
    server: Arc<ServerState>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => sync_serving(&data_dir, &target, &live, &server),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_round_trips_and_its_absence_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_serving(dir.path()).unwrap(), None);
        let serving = Serving::switched(None, change(ServingAction::Promote, "v2", "tidemark"));
        write_serving(dir.path(), &serving).unwrap();
        assert_eq!(read_serving(dir.path()).unwrap(), Some(serving));
        std::fs::write(dir.path().join(SERVING_FILE), "{").unwrap();
        let err = read_serving(dir.path()).unwrap_err();
        assert!(err.to_string().contains("unreadable"), "{err}");
    }

    fn change(action: ServingAction, database: &str, previous: &str) -> ServingChange {
        ServingChange {
            time: "2026-12-03T10:00:00Z".into(),
            action,
            database: database.into(),
            previous: previous.into(),
            by: "cli:alice".into(),
        }
    }

    #[test]
    fn a_file_from_before_the_history_reads_as_having_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(SERVING_FILE),
            r#"{"database":"v2","previous":"tidemark"}"#,
        )
        .unwrap();
        let serving = read_serving(dir.path()).unwrap().unwrap();
        assert_eq!(serving.database, "v2");
        assert!(serving.history.is_empty());
    }

    #[test]
    fn every_switch_appends_to_the_history() {
        let first = Serving::switched(None, change(ServingAction::Promote, "v2", "tidemark"));
        let second = Serving::switched(
            Some(first.clone()),
            change(ServingAction::Rollback, "tidemark", "v2"),
        );
        assert_eq!(second.database, "tidemark");
        assert_eq!(second.previous.as_deref(), Some("v2"));
        assert_eq!(second.history.len(), 2);
        assert_eq!(second.history[0], first.history[0]);
        assert_eq!(second.history[1].action, ServingAction::Rollback);
        let json = serde_json::to_value(&second.history[1]).unwrap();
        assert_eq!(json["action"], "rollback");
    }
}
