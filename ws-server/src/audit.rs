//! The audit log: an append-only NDJSON file of logins, ad-hoc queries,
//! admin actions and refusals, each line carrying the SHA-256 of the line
//! before it (`prev`), so an edited, removed or inserted line breaks the
//! chain and [`verify`] finds it.
//!
//! ```json
//! {"time":"2026-12-03T10:00:00.123Z","actor":"user:alice","action":"login","client":"127.0.0.1","detail":{},"prev":"<64 hex>"}
//! ```
//!
//! Every append takes an exclusive lock on the file and chains onto the line
//! that is last at that moment, so the server and the `tidemark` commands
//! that manage users can write the same log.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tidemark_model::EventTime;

use crate::auth::{Permission, Principal};

/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The newest entries `GET /api/v1/audit` answers with at most.
pub const READ_LIMIT: usize = 10_000;

/// The audit log file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    /// The log at `path`, created if missing.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        append_file(path)?;
        Ok(AuditLog {
            path: path.to_path_buf(),
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an entry. `detail` says what was done (an object).
    pub fn append(
        &self,
        actor: &str,
        action: &str,
        client: Option<IpAddr>,
        detail: Value,
    ) -> std::io::Result<()> {
        let mut file = append_file(&self.path)?;
        file.lock()?;
        let prev = match last_line(&mut file)? {
            Some(line) => crate::auth::sha256_hex(&line),
            None => GENESIS.to_string(),
        };
        let entry = json!({
            "time": now_rfc3339(),
            "actor": actor,
            "action": action,
            "client": client.map(|c| c.to_string()),
            "detail": detail,
            "prev": prev,
        });
        let mut line = entry.to_string().into_bytes();
        line.push(b'\n');
        // One write of the whole line: O_APPEND puts it at the end at once.
        file.write_all(&line)?;
        file.sync_data()
    }

    /// Appends, and only logs when the log cannot be written: for records
    /// of things that already happened (a refusal, a failed login).
    pub fn record(&self, actor: &str, action: &str, client: Option<IpAddr>, detail: Value) {
        if let Err(e) = self.append(actor, action, client, detail) {
            tracing::error!(error = %e, path = %self.path.display(), action, "Cannot write the audit log");
        }
    }

    /// Records a 403.
    pub(crate) fn record_forbidden(
        &self,
        principal: &Principal,
        permission: Permission,
        what: &str,
        client: Option<IpAddr>,
    ) {
        self.record(
            &principal.actor(),
            "forbidden",
            client,
            json!({ "permission": permission.name(), "request": what }),
        );
    }

    /// The entries whose time is in `[from, to)`, oldest first, at most the
    /// newest [`READ_LIMIT`]; and whether some were left out.
    pub fn read(&self, from: EventTime, to: EventTime) -> std::io::Result<(Vec<Value>, bool)> {
        let file = File::open(&self.path)?;
        let mut entries = std::collections::VecDeque::new();
        let mut truncated = false;
        for line in BufReader::new(file).lines() {
            let line = line?;
            let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let time = entry
                .get("time")
                .and_then(Value::as_str)
                .and_then(EventTime::parse);
            if time.is_some_and(|t| from <= t && t < to) {
                if entries.len() == READ_LIMIT {
                    entries.pop_front();
                    truncated = true;
                }
                entries.push_back(entry);
            }
        }
        Ok((entries.into(), truncated))
    }
}

/// What [`verify`] found wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("line {line} is not a JSON object with a \"prev\" hash")]
    Malformed { line: usize },
    #[error("line {line} does not chain onto line {}: it was edited, removed or inserted", line - 1)]
    Broken { line: usize },
    #[error("line {line} should start the chain (prev = 64 zeros)")]
    BadStart { line: usize },
}

/// Checks the chain of the log at `path`: the number of entries, or the
/// first line that breaks it.
pub fn verify(path: &Path) -> std::io::Result<Result<usize, ChainError>> {
    let mut text = Vec::new();
    File::open(path)?.read_to_end(&mut text)?;
    let mut expected = GENESIS.to_string();
    let mut count = 0;
    for (i, line) in text.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let number = i + 1;
        let prev = serde_json::from_slice::<Value>(line)
            .ok()
            .and_then(|v| v.get("prev").and_then(Value::as_str).map(str::to_string));
        let Some(prev) = prev else {
            return Ok(Err(ChainError::Malformed { line: number }));
        };
        if prev != expected {
            return Ok(Err(if count == 0 {
                ChainError::BadStart { line: number }
            } else {
                ChainError::Broken { line: number }
            }));
        }
        expected = crate::auth::sha256_hex(line);
        count += 1;
    }
    Ok(Ok(count))
}

fn append_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
}

/// The last complete line of `file`, without its newline.
fn last_line(file: &mut File) -> std::io::Result<Option<Vec<u8>>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    let mut chunk = 4096u64;
    loop {
        let start = len.saturating_sub(chunk);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::with_capacity((len - start) as usize);
        std::io::Read::by_ref(file)
            .take(len - start)
            .read_to_end(&mut tail)?;
        // A torn last line (a crash mid-write) has no newline: the chain
        // goes on from it as it is, and `verify` reports it.
        let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
        match body.iter().rposition(|b| *b == b'\n') {
            Some(i) => return Ok(Some(body[i + 1..].to_vec())),
            None if start == 0 => return Ok(Some(body.to_vec())),
            None => chunk *= 4,
        }
    }
}

/// Now as RFC 3339 with milliseconds, in UTC.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_holds_and_an_edited_line_breaks_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.ndjson");
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(verify(&path).unwrap(), Ok(0));
        for i in 0..5 {
            log.append("user:alice", "login", None, json!({ "n": i }))
                .unwrap();
        }
        assert_eq!(verify(&path).unwrap(), Ok(5));
        let (entries, truncated) = log
            .read(
                EventTime(0),
                EventTime::now().plus(std::time::Duration::from_secs(1)),
            )
            .unwrap();
        assert_eq!((entries.len(), truncated), (5, false));
        assert_eq!(entries[0]["prev"], GENESIS);

        let text = std::fs::read_to_string(&path).unwrap();
        let edited = text.replacen("\"n\":2", "\"n\":7", 1);
        std::fs::write(&path, edited).unwrap();
        assert_eq!(verify(&path).unwrap(), Err(ChainError::Broken { line: 4 }));

        let mut lines: Vec<&str> = text.lines().collect();
        lines.remove(0);
        std::fs::write(&path, lines.join("\n")).unwrap();
        assert_eq!(
            verify(&path).unwrap(),
            Err(ChainError::BadStart { line: 1 })
        );
    }

    #[test]
    fn appends_chain_onto_a_long_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.ndjson");
        let log = AuditLog::open(&path).unwrap();
        log.append(
            "user:a",
            "query",
            None,
            json!({ "sql": "x".repeat(20_000) }),
        )
        .unwrap();
        log.append("user:a", "query", None, json!({})).unwrap();
        assert_eq!(verify(&path).unwrap(), Ok(2));
    }
}
