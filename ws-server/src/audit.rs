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
//!
//! With a key ring (`--encryption-key-file`) each entry is sealed with
//! AES-256-GCM and stored as `{"prev":"<64 hex>","sealed":"<hex of key id |
//! nonce | ciphertext | tag>"}`: the chain still runs over the stored lines,
//! so [`verify`] needs no key, and the seal is bound to its `prev`.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use serde_json::{json, Value};
use tidemark_model::keyring::{sealed_key_id, OpenError};
use tidemark_model::{EventTime, KeyRing};

use crate::auth::{Permission, Principal};

/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The newest entries `GET /api/v1/audit` answers with at most.
pub const READ_LIMIT: usize = 10_000;

/// The audit log file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    keys: Option<Arc<KeyRing>>,
}

const AAD_PREFIX: &[u8] = b"tidemark audit ";

impl AuditLog {
    /// The log at `path`, created if missing.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        Self::open_with_keys(path, None)
    }

    /// [`AuditLog::open`], sealing new entries with the current key of `keys`
    /// and opening sealed ones by their key id. Every sealed entry's key id
    /// must be in the ring, and one entry per id must open: a missing or
    /// wrong key is an error here, not at the first read.
    pub fn open_with_keys(path: &Path, keys: Option<Arc<KeyRing>>) -> std::io::Result<AuditLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        append_file(path)?;
        let log = AuditLog {
            path: path.to_path_buf(),
            keys,
        };
        log.check_keys()?;
        Ok(log)
    }

    fn check_keys(&self) -> std::io::Result<()> {
        let mut proven = std::collections::HashSet::new();
        for (i, line) in BufReader::new(File::open(&self.path)?).lines().enumerate() {
            let line = line?;
            let Ok(stored) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let Some(sealed) = stored.get("sealed").and_then(Value::as_str) else {
                continue;
            };
            let id = decode_hex(sealed)
                .as_deref()
                .and_then(sealed_key_id)
                .unwrap_or_default();
            if !proven.contains(&id) {
                self.unseal(&stored, i + 1)?;
                proven.insert(id);
            }
        }
        Ok(())
    }

    /// The entry a stored line holds: itself, or what its seal opens to.
    fn unseal(&self, stored: &Value, line: usize) -> std::io::Result<Value> {
        let Some(sealed) = stored.get("sealed").and_then(Value::as_str) else {
            return Ok(stored.clone());
        };
        let at = || format!("{} line {line}", self.path.display());
        let bytes = decode_hex(sealed).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: the sealed entry is not hex", at()),
            )
        })?;
        let id = sealed_key_id(&bytes).unwrap_or_default();
        let Some(keys) = &self.keys else {
            return Err(std::io::Error::other(format!(
                "{} is encrypted with key id {id}, and no encryption key file was given \
                 (--encryption-key-file)",
                at()
            )));
        };
        let prev = stored.get("prev").and_then(Value::as_str).unwrap_or("");
        let aad = [AAD_PREFIX, prev.as_bytes()].concat();
        let plain = keys.open(&bytes, &aad).map_err(|e| {
            let detail = match e {
                OpenError::UnknownKey(id) => format!(
                    "{} is encrypted with key id {id}, which the key file {} does not hold",
                    at(),
                    keys.source().display()
                ),
                e => format!("{}: {e} (key file {})", at(), keys.source().display()),
            };
            std::io::Error::new(std::io::ErrorKind::InvalidData, detail)
        })?;
        serde_json::from_slice(&plain).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: the sealed entry is not JSON: {e}", at()),
            )
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
        let mut line = match &self.keys {
            None => entry.to_string().into_bytes(),
            Some(keys) => {
                let aad = [AAD_PREFIX, prev.as_bytes()].concat();
                let sealed = keys.seal(entry.to_string().as_bytes(), &aad);
                json!({ "prev": prev, "sealed": encode_hex(&sealed) })
                    .to_string()
                    .into_bytes()
            }
        };
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
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line?;
            let Ok(stored) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let entry = self.unseal(&stored, i + 1)?;
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

fn encode_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
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
    fn sealed_entries_chain_read_after_a_rotation_and_refuse_wrong_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.ndjson");
        let k1 = Arc::new(KeyRing::from_keys(&[(1, [1; 32])], Path::new("keys")));
        let log = AuditLog::open_with_keys(&path, Some(k1.clone())).unwrap();
        log.append(
            "user:alice",
            "query",
            None,
            json!({ "sql": "SELECT secret" }),
        )
        .unwrap();
        let rotated = Arc::new(KeyRing::from_keys(
            &[(1, [1; 32]), (2, [2; 32])],
            Path::new("keys"),
        ));
        let log = AuditLog::open_with_keys(&path, Some(rotated)).unwrap();
        log.append("user:bob", "login", None, json!({})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("alice") && !text.contains("secret") && !text.contains("bob"));
        assert_eq!(verify(&path).unwrap(), Ok(2));
        let (entries, _) = log
            .read(
                EventTime(0),
                EventTime::now().plus(std::time::Duration::from_secs(1)),
            )
            .unwrap();
        assert_eq!(entries[0]["actor"], "user:alice");
        assert_eq!(entries[1]["actor"], "user:bob");

        let file = path.display().to_string();
        let err = |keys: Option<Arc<KeyRing>>| {
            AuditLog::open_with_keys(&path, keys)
                .unwrap_err()
                .to_string()
        };
        let none = err(None);
        assert!(none.contains(&file) && none.contains("key id 1"), "{none}");
        assert!(err(Some(k1.clone())).contains("key id 2"));
        let wrong = Arc::new(KeyRing::from_keys(
            &[(1, [9; 32]), (2, [2; 32])],
            Path::new("keys"),
        ));
        let msg = err(Some(wrong));
        assert!(msg.contains(&file) && msg.contains("key id 1"), "{msg}");

        // A damaged entry in the middle is an error naming the file and line.
        let first_len = text.find('\n').unwrap();
        let mut bytes = text.into_bytes();
        let at = first_len / 2 + 40;
        bytes[at] = if bytes[at] == b'a' { b'b' } else { b'a' };
        std::fs::write(&path, bytes).unwrap();
        let k12 = Arc::new(KeyRing::from_keys(
            &[(1, [1; 32]), (2, [2; 32])],
            Path::new("keys"),
        ));
        let msg = err(Some(k12));
        assert!(msg.contains(&format!("{file} line 1")), "{msg}");
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
