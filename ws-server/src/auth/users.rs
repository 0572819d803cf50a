//! The users file: users with argon2id password hashes, and service tokens
//! stored as SHA-256 hashes.
//!
//! ```toml
//! [users.alice]
//! role = "analyst"
//! password = "$argon2id$v=19$m=19456,t=2,p=1$..."
//!
//! [tokens.3f9a1c2e]
//! role = "analyst"
//! sha256 = "..."
//! name = "grafana"
//! created = "2026-12-03T10:00:00.000Z"
//! ```
//!
//! Changes go through [`UsersFile::edit`]: under a lock file, read, change,
//! write a temporary file and rename it over the old one, so a reader sees
//! the old or the new file whole and two writers never lose each other's
//! change. Comments and order of a hand-edited file are kept.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::Argon2;
use sha2::{Digest as _, Sha256};
use toml_edit::{value, DocumentMut, Item, Table};

use super::{constant_time_eq, Role};

/// How a service token starts, so a leaked one is easy to recognise.
pub(crate) const TOKEN_PREFIX: &str = "tmk_";

/// Errors of the users file.
#[derive(Debug, thiserror::Error)]
pub enum UsersFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Rejected(String),
}

/// A user of the users file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    pub role: Role,
    /// The PHC string of the password's argon2id hash.
    pub password: String,
}

/// A service token of the users file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub role: Role,
    /// Hex SHA-256 of the token's secret part.
    pub sha256: String,
    /// What it is for (free text).
    pub name: String,
    /// When it was created (RFC 3339).
    pub created: String,
}

/// What the users file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Users {
    pub users: BTreeMap<String, UserEntry>,
    /// By token id.
    pub tokens: BTreeMap<String, TokenEntry>,
}

impl Users {
    /// Parses a users file's text.
    pub fn parse(text: &str) -> Result<Users, String> {
        let doc: DocumentMut = text.parse().map_err(|e| format!("{e}"))?;
        let mut users = Users::default();
        let table = |key: &str| -> Result<Option<&Table>, String> {
            match doc.get(key) {
                None => Ok(None),
                Some(item) => item
                    .as_table()
                    .map(Some)
                    .ok_or_else(|| format!("[{key}] must be a table")),
            }
        };
        let text_of = |entry: &Table, section: &str, name: &str, key: &str| {
            entry
                .get(key)
                .and_then(Item::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("{section}.{name} needs a string {key}"))
        };
        let role_of = |entry: &Table, section: &str, name: &str| {
            let role = text_of(entry, section, name, "role")?;
            Role::parse(&role).ok_or_else(|| {
                format!("{section}.{name}: unknown role {role:?} (analyst, manager or admin)")
            })
        };
        if let Some(section) = table("users")? {
            for (name, item) in section.iter() {
                let entry = item
                    .as_table()
                    .ok_or_else(|| format!("users.{name} must be a table"))?;
                users.users.insert(
                    name.to_string(),
                    UserEntry {
                        role: role_of(entry, "users", name)?,
                        password: text_of(entry, "users", name, "password")?,
                    },
                );
            }
        }
        if let Some(section) = table("tokens")? {
            for (id, item) in section.iter() {
                let entry = item
                    .as_table()
                    .ok_or_else(|| format!("tokens.{id} must be a table"))?;
                users.tokens.insert(
                    id.to_string(),
                    TokenEntry {
                        role: role_of(entry, "tokens", id)?,
                        sha256: text_of(entry, "tokens", id, "sha256")?,
                        name: entry
                            .get("name")
                            .and_then(Item::as_str)
                            .unwrap_or_default()
                            .to_string(),
                        created: entry
                            .get("created")
                            .and_then(Item::as_str)
                            .unwrap_or_default()
                            .to_string(),
                    },
                );
            }
        }
        Ok(users)
    }

    /// The token whose `<id>_<secret>` is `rest`, if it exists.
    pub(crate) fn service_token(&self, rest: &str) -> Option<(&str, &TokenEntry)> {
        let (id, secret) = rest.split_once('_')?;
        let (id, entry) = self.tokens.get_key_value(id)?;
        let hash = sha256_hex(secret.as_bytes());
        constant_time_eq(hash.as_bytes(), entry.sha256.as_bytes()).then_some((id.as_str(), entry))
    }

    /// Whether `password` is `name`'s. An unknown name costs as much time
    /// as a wrong password, so the answer's time does not tell names apart.
    pub fn check_password(&self, name: &str, password: &str) -> Option<Role> {
        static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let (stored, role) = match self.users.get(name) {
            Some(u) => (u.password.as_str(), Some(u.role)),
            None => (
                DUMMY
                    .get_or_init(|| hash_password("not a password").unwrap_or_default())
                    .as_str(),
                None,
            ),
        };
        let parsed = PasswordHash::new(stored).ok()?;
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        role.filter(|_| ok)
    }
}

/// The argon2id hash of `password` as a PHC string.
pub fn hash_password(password: &str) -> Result<String, UsersFileError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UsersFileError::Rejected(format!("cannot hash the password: {e}")))
}

/// A new service token: what to give the client (`tmk_<id>_<secret>`), its
/// id and the hash to store.
pub fn new_service_token() -> (String, String, String) {
    use rand::Rng as _;
    let mut rng = rand::rngs::OsRng;
    let id: [u8; 4] = rng.gen();
    let secret: [u8; 16] = rng.gen();
    let (id, secret) = (hex(&id), hex(&secret));
    let hash = sha256_hex(secret.as_bytes());
    (format!("{TOKEN_PREFIX}{id}_{secret}"), id, hash)
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A user name: letters, digits, `.`, `_`, `-` and `@`, up to 64.
pub fn valid_user_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// The users file, read again when it changes on disk.
#[derive(Debug)]
pub struct UsersFile {
    path: PathBuf,
    cached: Mutex<Option<(FileStamp, Arc<Users>)>>,
}

/// What tells a changed file: its modification time and length.
type FileStamp = (SystemTime, u64);

impl UsersFile {
    /// The users file at `path` (it need not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> UsersFile {
        UsersFile {
            path: path.into(),
            cached: Mutex::new(None),
        }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the file holds now. A missing file holds nobody; a file that
    /// became invalid is an error, so a typo never locks everyone out
    /// silently (the server answers 503 until it is fixed).
    pub fn current(&self) -> Result<Arc<Users>, UsersFileError> {
        let stamp = match std::fs::metadata(&self.path) {
            Ok(m) => Some((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(UsersFileError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let Some(stamp) = stamp else {
            return Ok(Arc::new(Users::default()));
        };
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, users)) = cached.as_ref() {
            if *seen == stamp {
                return Ok(users.clone());
            }
        }
        let users = Arc::new(self.read()?);
        *cached = Some((stamp, users.clone()));
        Ok(users)
    }

    fn read(&self) -> Result<Users, UsersFileError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| UsersFileError::Read {
            path: self.path.clone(),
            source,
        })?;
        Users::parse(&text).map_err(|message| UsersFileError::Invalid {
            path: self.path.clone(),
            message,
        })
    }

    /// Adds or replaces user `name`.
    pub fn put_user(&self, name: &str, role: Role, password: &str) -> Result<(), UsersFileError> {
        if !valid_user_name(name) {
            return Err(UsersFileError::Rejected(format!(
                "user name {name:?} must be 1 to 64 letters, digits, '.', '_', '-' or '@'"
            )));
        }
        if password.chars().count() < 8 {
            return Err(UsersFileError::Rejected(
                "the password must have at least 8 characters".into(),
            ));
        }
        let hash = hash_password(password)?;
        self.edit(|doc| {
            let users = section(doc, "users");
            let mut entry = Table::new();
            entry["role"] = value(role.name());
            entry["password"] = value(hash);
            users[name] = Item::Table(entry);
            Ok(())
        })
    }

    /// Removes user `name`; an error if there is none.
    pub fn remove_user(&self, name: &str) -> Result<(), UsersFileError> {
        self.edit(|doc| {
            section(doc, "users")
                .remove(name)
                .map(|_| ())
                .ok_or_else(|| UsersFileError::Rejected(format!("no user {name:?}")))
        })
    }

    /// Creates a service token and returns it (the only time it is shown)
    /// with its id.
    pub fn create_token(&self, role: Role, name: &str) -> Result<(String, String), UsersFileError> {
        let (token, id, hash) = new_service_token();
        let created = crate::audit::now_rfc3339();
        self.edit(|doc| {
            let mut entry = Table::new();
            entry["role"] = value(role.name());
            entry["sha256"] = value(hash.as_str());
            entry["name"] = value(name);
            entry["created"] = value(created.as_str());
            section(doc, "tokens")[id.as_str()] = Item::Table(entry);
            Ok(())
        })?;
        Ok((token, id))
    }

    /// Revokes the service token `id`; an error if there is none.
    pub fn revoke_token(&self, id: &str) -> Result<(), UsersFileError> {
        self.edit(|doc| {
            section(doc, "tokens")
                .remove(id)
                .map(|_| ())
                .ok_or_else(|| UsersFileError::Rejected(format!("no token {id:?}")))
        })
    }

    /// Reads the file under its lock, applies `change` and replaces the file.
    fn edit(
        &self,
        change: impl FnOnce(&mut DocumentMut) -> Result<(), UsersFileError>,
    ) -> Result<(), UsersFileError> {
        let write_error = |source| UsersFileError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(write_error)?;
        }
        let lock_path = sibling(&self.path, ".lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(write_error)?;
        lock.lock().map_err(write_error)?;
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HEADER.to_string(),
            Err(source) => {
                return Err(UsersFileError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let mut doc: DocumentMut = text.parse().map_err(|e| UsersFileError::Invalid {
            path: self.path.clone(),
            message: format!("{e}"),
        })?;
        change(&mut doc)?;
        let text = doc.to_string();
        // Whatever is written must load again.
        Users::parse(&text).map_err(UsersFileError::Rejected)?;
        let tmp = sibling(&self.path, ".tmp");
        let mut file = private_file(&tmp).map_err(write_error)?;
        file.write_all(text.as_bytes()).map_err(write_error)?;
        file.sync_all().map_err(write_error)?;
        std::fs::rename(&tmp, &self.path).map_err(write_error)?;
        Ok(())
    }
}

const HEADER: &str = "# tidemark users and service tokens, written by `tidemark user` and `tidemark token`.\n# Passwords are argon2id hashes; tokens are kept only as SHA-256 hashes.\n";

fn section<'a>(doc: &'a mut DocumentMut, key: &str) -> &'a mut Table {
    if !doc.contains_table(key) {
        let mut table = Table::new();
        table.set_implicit(true);
        doc[key] = Item::Table(table);
    }
    doc[key].as_table_mut().expect("just made a table")
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// A file only its owner can read: it holds password hashes.
pub(crate) fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_tokens_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = UsersFile::new(dir.path().join("users.toml"));
        assert!(file.current().unwrap().users.is_empty());
        file.put_user("alice", Role::Analyst, "correct horse")
            .unwrap();
        let (token, id) = file.create_token(Role::Manager, "grafana").unwrap();
        let users = file.current().unwrap();
        assert_eq!(
            users.check_password("alice", "correct horse"),
            Some(Role::Analyst)
        );
        assert_eq!(users.check_password("alice", "wrong horse"), None);
        assert_eq!(users.check_password("bob", "correct horse"), None);
        let rest = token.strip_prefix(TOKEN_PREFIX).unwrap();
        let (found, entry) = users.service_token(rest).unwrap();
        assert_eq!((found, entry.role), (id.as_str(), Role::Manager));
        assert!(!std::fs::read_to_string(file.path()).unwrap().contains(rest));
        let forged = format!("{id}_{}", "0".repeat(32));
        assert!(users.service_token(&forged).is_none());

        file.revoke_token(&id).unwrap();
        file.remove_user("alice").unwrap();
        let users = file.current().unwrap();
        assert!(users.users.is_empty() && users.tokens.is_empty());
        assert!(file.remove_user("alice").is_err());
    }

    #[test]
    fn a_hand_edited_file_keeps_its_comments_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        std::fs::write(&path, "# ours\n[users]\n").unwrap();
        let file = UsersFile::new(&path);
        file.put_user("ops", Role::Admin, "long enough").unwrap();
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .starts_with("# ours\n"));

        std::fs::write(&path, "[users.x]\nrole = \"owner\"\npassword = \"\"\n").unwrap();
        let err = file.current().unwrap_err().to_string();
        assert!(err.contains("unknown role"), "{err}");
        assert!(file
            .put_user("bad name", Role::Admin, "long enough")
            .is_err());
    }
}
