//! Who may do what: the three kinds of credential, the roles and their
//! permissions, and the guard every protected route passes.
//!
//! - Ingest keys may only post events: on a read route they get 403.
//! - Users log in with a name and password from the users file and get a
//!   short-lived JWT ([`ACCESS_LIFETIME`]) plus a refresh token.
//! - Service tokens (`tmk_<id>_<secret>`) are long-lived keys with a role for
//!   Grafana and scripts; the users file keeps only their SHA-256.
//!
//! The users file is read again whenever it changes on disk, so
//! `tidemark user add` and `tidemark token create` take effect on a running
//! server without a restart.

mod jwt;
mod limiter;
pub(crate) mod routes;
mod users;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

pub use jwt::{ACCESS_LIFETIME, REFRESH_LIFETIME};
pub(crate) use users::sha256_hex;
pub use users::{
    hash_password, new_service_token, valid_user_name, TokenEntry, UserEntry, Users, UsersFile,
    UsersFileError,
};

use crate::audit::AuditLog;
use crate::{ServerError, ServerState};

/// A role, from least to most allowed: each can do everything the ones
/// before it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads every metric, trending, campaign and engagement view and runs
    /// ad-hoc queries.
    Analyst,
    /// An analyst who may also change alert rules.
    Manager,
    /// A manager who also manages users and tokens, reads the audit log and
    /// sees replay and promote state.
    Admin,
}

impl Role {
    /// Every role, least allowed first.
    pub const ALL: [Role; 3] = [Role::Analyst, Role::Manager, Role::Admin];

    /// The role's name as in the users file and the API.
    pub fn name(self) -> &'static str {
        match self {
            Role::Analyst => "analyst",
            Role::Manager => "manager",
            Role::Admin => "admin",
        }
    }

    /// The role named `name`.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Whether this role holds `permission`.
    pub fn allows(self, permission: Permission) -> bool {
        self >= permission.least_role()
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a route needs. A 403 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Metrics, trending, campaigns, engagement, the WebSocket channels and
    /// `/metrics`.
    ReadMetrics,
    /// Ad-hoc queries.
    RunQueries,
    /// Changing alert rules.
    WriteAlerts,
    /// Users and service tokens.
    ManageUsers,
    /// The audit log.
    ReadAudit,
    /// Replay and promote state.
    ReadOperations,
}

impl Permission {
    /// Every permission.
    pub const ALL: [Permission; 6] = [
        Permission::ReadMetrics,
        Permission::RunQueries,
        Permission::WriteAlerts,
        Permission::ManageUsers,
        Permission::ReadAudit,
        Permission::ReadOperations,
    ];

    /// The permission's name in 403 answers and the documentation.
    pub fn name(self) -> &'static str {
        match self {
            Permission::ReadMetrics => "metrics:read",
            Permission::RunQueries => "query:run",
            Permission::WriteAlerts => "alerts:write",
            Permission::ManageUsers => "users:manage",
            Permission::ReadAudit => "audit:read",
            Permission::ReadOperations => "operations:read",
        }
    }

    /// The least role holding it.
    pub fn least_role(self) -> Role {
        match self {
            Permission::ReadMetrics | Permission::RunQueries => Role::Analyst,
            Permission::WriteAlerts => Role::Manager,
            Permission::ManageUsers | Permission::ReadAudit | Permission::ReadOperations => {
                Role::Admin
            }
        }
    }
}

/// Who a request comes from, once its credential was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A user logged in with a password.
    User { name: String, role: Role },
    /// A service token, by its public id.
    Service { id: String, role: Role },
    /// An ingest key: it may post events and nothing else.
    IngestKey,
}

impl Principal {
    /// The role, or `None` for an ingest key.
    pub fn role(&self) -> Option<Role> {
        match self {
            Principal::User { role, .. } | Principal::Service { role, .. } => Some(*role),
            Principal::IngestKey => None,
        }
    }

    /// Whether the principal holds `permission`.
    pub fn allows(&self, permission: Permission) -> bool {
        self.role().is_some_and(|r| r.allows(permission))
    }

    /// How the audit log names it: `user:NAME`, `token:ID` or `ingest-key`.
    pub fn actor(&self) -> String {
        match self {
            Principal::User { name, .. } => format!("user:{name}"),
            Principal::Service { id, .. } => format!("token:{id}"),
            Principal::IngestKey => "ingest-key".to_string(),
        }
    }
}

/// Where the serving layer finds its credentials and writes its audit log.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    /// The users file (`users.toml`): users and service tokens.
    pub users_file: PathBuf,
    /// The key users' tokens are signed with (HS256).
    pub jwt_secret: Vec<u8>,
    /// Ingest keys, recognised so that using one on a read route is a 403
    /// rather than a 401.
    pub ingest_keys: Vec<String>,
    /// The append-only audit log (NDJSON, hash-chained).
    pub audit_log: PathBuf,
}

/// Errors of setting up access.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    UsersFile(#[from] UsersFileError),
    #[error("the JWT signing key must be at least {min} bytes, got {got}")]
    WeakSecret { min: usize, got: usize },
    #[error("the JWT signing key cannot be used: {0}")]
    Key(String),
    #[error("cannot open the audit log {path}: {source}")]
    Audit {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Checks credentials and keeps the audit log: the serving layer's access.
#[derive(Debug)]
pub struct Access {
    users: UsersFile,
    keys: jwt::Keys,
    ingest_keys: Vec<String>,
    limiter: limiter::LoginLimiter,
    pub(crate) audit: Arc<AuditLog>,
}

impl Access {
    /// Opens the users file (a missing one means no users yet) and the audit
    /// log.
    pub fn open(config: AccessConfig) -> Result<Access, AccessError> {
        Self::open_with_keys(config, None)
    }

    /// [`Access::open`] with an audit log sealed by `audit_keys`
    /// (`--encryption-key-file`).
    pub fn open_with_keys(
        config: AccessConfig,
        audit_keys: Option<std::sync::Arc<tidemark_model::KeyRing>>,
    ) -> Result<Access, AccessError> {
        let users = UsersFile::new(config.users_file);
        users.current()?;
        let keys = jwt::Keys::new(&config.jwt_secret)?;
        let audit = AuditLog::open_with_keys(&config.audit_log, audit_keys).map_err(|source| {
            AccessError::Audit {
                path: config.audit_log.clone(),
                source,
            }
        })?;
        Ok(Access {
            users,
            keys,
            ingest_keys: config.ingest_keys,
            limiter: limiter::LoginLimiter::default(),
            audit: Arc::new(audit),
        })
    }

    /// The users file.
    pub fn users(&self) -> &UsersFile {
        &self.users
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Who `credential` (a bearer token, a service token or an ingest key)
    /// belongs to.
    pub fn authenticate(&self, credential: &str) -> Result<Principal, ServerError> {
        if let Some(rest) = credential.strip_prefix(users::TOKEN_PREFIX) {
            let users = self.users.current()?;
            return users
                .service_token(rest)
                .map(|(id, entry)| Principal::Service {
                    id: id.to_string(),
                    role: entry.role,
                })
                .ok_or_else(|| {
                    ServerError::Unauthorized("unknown or revoked service token".into())
                });
        }
        if credential.bytes().filter(|b| *b == b'.').count() == 2 {
            let claims = self.keys.verify(credential, jwt::Kind::Access)?;
            let users = self.users.current()?;
            // The file's role counts, so a changed or removed user loses
            // access at once rather than when the token expires.
            return match users.users.get(&claims.sub) {
                Some(user) => Ok(Principal::User {
                    name: claims.sub,
                    role: user.role,
                }),
                None => Err(ServerError::Unauthorized(
                    "the user no longer exists".into(),
                )),
            };
        }
        if self
            .ingest_keys
            .iter()
            .any(|k| constant_time_eq(k.as_bytes(), credential.as_bytes()))
        {
            return Ok(Principal::IngestKey);
        }
        Err(ServerError::Unauthorized("unknown credential".into()))
    }
}

/// Compares without stopping at the first difference, so the time taken does
/// not tell how much of a guess was right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer credential of a request: `Authorization: Bearer <token>`.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The client's address, when the server was started with connect info.
pub(crate) fn client_ip(request_extensions: &axum::http::Extensions) -> Option<IpAddr> {
    request_extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

/// The guard of a protected route: 401 without a valid credential, 403
/// (recorded in the audit log) when the role lacks `permission`; otherwise
/// the request goes on with its [`Principal`] in its extensions.
pub(crate) async fn guard(
    State((state, permission)): State<(Arc<ServerState>, Permission)>,
    mut request: Request,
    next: Next,
) -> Response {
    let principal = match bearer(request.headers()) {
        None => {
            return ServerError::Unauthorized("missing bearer token".into()).into_response();
        }
        Some(credential) => match state.access.authenticate(credential) {
            Ok(p) => p,
            Err(e) => return e.into_response(),
        },
    };
    if !principal.allows(permission) {
        let client = client_ip(request.extensions());
        state.access.audit.record_forbidden(
            &principal,
            permission,
            &format!("{} {}", request.method(), request.uri().path()),
            client,
        );
        return ServerError::Forbidden(permission).into_response();
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// How long a client is told to wait after too many failed logins.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_holds_what_the_ones_before_it_hold() {
        for p in Permission::ALL {
            let holders: Vec<Role> = Role::ALL.into_iter().filter(|r| r.allows(p)).collect();
            assert_eq!(holders.first(), Some(&p.least_role()), "{p:?}");
            assert!(holders.contains(&Role::Admin), "{p:?}");
        }
        assert!(Role::Analyst.allows(Permission::RunQueries));
        assert!(!Role::Analyst.allows(Permission::WriteAlerts));
        assert!(Role::Manager.allows(Permission::WriteAlerts));
        assert!(!Role::Manager.allows(Permission::ReadAudit));
        assert!(!Principal::IngestKey.allows(Permission::ReadMetrics));
    }

    #[test]
    fn bearer_needs_the_scheme_and_a_token() {
        let mut headers = axum::http::HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }
}
