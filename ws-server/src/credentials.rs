//! Credentials on the command line: where the users file, the JWT signing
//! key and the audit log live, and `tidemark user`, `tidemark token` and
//! `tidemark audit`.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};

use crate::auth::UsersFile;
use crate::{audit, AccessConfig, Role};
use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use serde_json::json;

/// The users file in the data folder, by default.
pub const USERS_FILE: &str = "users.toml";
/// The JWT signing key in the data folder, by default (made on first start).
pub const JWT_SECRET_FILE: &str = "jwt-secret";
/// The audit log in the data folder, by default.
pub const AUDIT_LOG: &str = "audit.ndjson";

/// Where the serving layer's credentials and audit log are.
#[derive(Debug, Clone, Default, Args)]
pub struct AccessArgs {
    /// Users and service tokens (default: DATA_DIR/users.toml); written by
    /// `tidemark user` and `tidemark token`, read again when it changes.
    #[arg(long, env = "TIDEMARK_USERS_FILE")]
    pub users_file: Option<PathBuf>,
    /// File holding the key users' tokens are signed with, at least 32
    /// bytes (default: DATA_DIR/jwt-secret, made on first start). Instances
    /// behind one address share it.
    #[arg(long, env = "TIDEMARK_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// The append-only audit log (default: DATA_DIR/audit.ndjson).
    #[arg(long, env = "TIDEMARK_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Seals the audit log (and, in `run`, the log and checkpoints too).
    #[command(flatten)]
    pub encryption: tidemark_model::keyring::EncryptionArgs,
}

impl AccessArgs {
    /// The users file.
    pub fn users_file(&self, data_dir: &Path) -> PathBuf {
        self.users_file
            .clone()
            .unwrap_or_else(|| data_dir.join(USERS_FILE))
    }

    /// The audit log.
    pub fn audit_log(&self, data_dir: &Path) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| data_dir.join(AUDIT_LOG))
    }

    /// The serving layer's access, making the default signing key if there is
    /// none yet.
    pub fn config(
        &self,
        data_dir: &Path,
        ingest_keys: Vec<String>,
    ) -> anyhow::Result<AccessConfig> {
        let jwt_secret = match &self.jwt_secret_file {
            Some(path) => read_secret(path)?,
            None => default_secret(&data_dir.join(JWT_SECRET_FILE))?,
        };
        Ok(AccessConfig {
            users_file: self.users_file(data_dir),
            jwt_secret,
            ingest_keys,
            audit_log: self.audit_log(data_dir),
        })
    }
}

fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the JWT signing key {}", path.display()))?;
    Ok(text.trim().as_bytes().to_vec())
}

fn default_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path.exists() {
        return read_secret(path);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    use rand::Rng as _;
    let bytes: [u8; 32] = rand::rngs::OsRng.gen();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    // create_new: two processes starting at once keep one key.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            file.write_all(secret.as_bytes())?;
            file.sync_all()?;
            Ok(secret.into_bytes())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_secret(path),
        Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
    }
}

/// Flags of the commands that manage credentials.
#[derive(Debug, Clone, Args)]
pub struct ManageArgs {
    /// The data folder whose users file and audit log to use.
    #[arg(long, env = "TIDEMARK_DATA_DIR", default_value = "tidemark-data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub access: AccessArgs,
}

impl ManageArgs {
    fn users(&self) -> UsersFile {
        UsersFile::new(self.access.users_file(&self.data_dir))
    }

    fn audit(&self, action: &str, detail: serde_json::Value) -> anyhow::Result<()> {
        let path = self.access.audit_log(&self.data_dir);
        let keys = self.access.encryption.keys()?;
        let log = audit::AuditLog::open_with_keys(&path, keys)
            .with_context(|| format!("cannot open the audit log {}", path.display()))?;
        let actor = format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        );
        log.append(&actor, action, None, detail)
            .with_context(|| format!("cannot write the audit log {}", path.display()))
    }
}

fn role_arg(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("{s:?} is not a role: analyst, manager or admin"))
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Adds a user, or sets an existing user's role and password.
    Add {
        name: String,
        #[arg(long, value_parser = role_arg)]
        role: Role,
        /// Read the password from the first line of stdin instead of making
        /// a random one (which is printed).
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        manage: ManageArgs,
    },
    /// Removes a user.
    Remove {
        name: String,
        #[command(flatten)]
        manage: ManageArgs,
    },
    /// Lists the users and their roles.
    List {
        #[command(flatten)]
        manage: ManageArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Creates a service token and prints it (the only time it is shown).
    Create {
        #[arg(long, value_parser = role_arg)]
        role: Role,
        /// What it is for, e.g. `grafana`.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        manage: ManageArgs,
    },
    /// Lists the service tokens (without their secrets).
    List {
        #[command(flatten)]
        manage: ManageArgs,
    },
    /// Revokes a service token by its id.
    Revoke {
        id: String,
        #[command(flatten)]
        manage: ManageArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Checks the audit log's hash chain; exits non-zero at the first line
    /// that was edited, removed or inserted.
    Verify {
        #[command(flatten)]
        manage: ManageArgs,
    },
}

/// A random password for a user made without one.
pub fn random_password() -> String {
    use rand::Rng as _;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rngs::OsRng;
    (0..20)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

pub fn user(command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Add {
            name,
            role,
            password_stdin,
            manage,
        } => {
            let (password, made) = if password_stdin {
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                (line.trim_end_matches(['\n', '\r']).to_string(), false)
            } else {
                (random_password(), true)
            };
            let users = manage.users();
            users.put_user(&name, role, &password)?;
            manage.audit("user_put", json!({ "name": name, "role": role.name() }))?;
            println!("user {name} ({role}) in {}", users.path().display());
            if made {
                println!("password: {password}");
            }
        }
        UserCommand::Remove { name, manage } => {
            manage.users().remove_user(&name)?;
            manage.audit("user_remove", json!({ "name": name }))?;
            println!("removed user {name}");
        }
        UserCommand::List { manage } => {
            for (name, user) in &manage.users().current()?.users {
                println!("{name}\t{}", user.role);
            }
        }
    }
    Ok(())
}

pub fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { role, name, manage } => {
            let (token, id) = manage.users().create_token(role, &name)?;
            manage.audit(
                "token_create",
                json!({ "id": id, "role": role.name(), "name": name }),
            )?;
            eprintln!("service token {id} ({role}); it is shown only now:");
            println!("{token}");
        }
        TokenCommand::List { manage } => {
            for (id, t) in &manage.users().current()?.tokens {
                println!("{id}\t{}\t{}\t{}", t.role, t.created, t.name);
            }
        }
        TokenCommand::Revoke { id, manage } => {
            manage.users().revoke_token(&id)?;
            manage.audit("token_revoke", json!({ "id": id }))?;
            println!("revoked token {id}");
        }
    }
    Ok(())
}

pub fn audit(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { manage } => {
            let path = manage.access.audit_log(&manage.data_dir);
            match audit::verify(&path)
                .with_context(|| format!("cannot read the audit log {}", path.display()))?
            {
                Ok(entries) => {
                    println!("{}: {entries} entries, chain intact", path.display());
                    Ok(())
                }
                Err(broken) => bail!("{}: {broken}", path.display()),
            }
        }
    }
}
