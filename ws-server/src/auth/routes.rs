//! Login and refresh, and the admin routes for users, service tokens, the
//! audit log and the serving state.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Extension, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tidemark_model::EventTime;

use super::jwt::Kind;
use super::{client_ip, Principal, Role, ACCESS_LIFETIME, REFRESH_LIFETIME};
use crate::{PathSegment, ServerError, ServerState};

#[derive(Debug, Deserialize)]
pub(crate) struct Login {
    name: String,
    password: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Refresh {
    refresh_token: String,
}

fn body<T>(payload: Result<Json<T>, JsonRejection>) -> Result<T, ServerError> {
    payload
        .map(|Json(v)| v)
        .map_err(|e| ServerError::BadRequest(e.body_text()))
}

fn tokens(state: &ServerState, name: &str, role: Role) -> Result<Value, ServerError> {
    let keys = &state.access.keys;
    Ok(json!({
        "access_token": keys.issue(name, role, Kind::Access)?,
        "token_type": "Bearer",
        "expires_in": ACCESS_LIFETIME.as_secs(),
        "refresh_token": keys.issue(name, role, Kind::Refresh)?,
        "refresh_expires_in": REFRESH_LIFETIME.as_secs(),
        "name": name,
        "role": role.name(),
    }))
}

/// `POST /api/v1/auth/login`.
pub(crate) async fn login(
    State(state): State<Arc<ServerState>>,
    request: Request,
) -> Result<Json<Value>, ServerError> {
    let client = client_ip(request.extensions());
    let payload = <Json<Login> as axum::extract::FromRequest<()>>::from_request(request, &()).await;
    let Login { name, password } = body(payload)?;
    let access = &state.access;
    if let Err(wait) = access.limiter.check(&name, client) {
        access.audit.record(
            &format!("user:{name}"),
            "login_refused",
            client,
            json!({ "reason": "too many failed logins" }),
        );
        return Err(ServerError::TooManyAttempts(wait));
    }
    let users = access.users.current()?;
    let checked = {
        let (users, name) = (users.clone(), name.clone());
        // Hashing takes tens of milliseconds of CPU: off the async threads.
        tokio::task::spawn_blocking(move || users.check_password(&name, &password))
            .await
            .map_err(|e| ServerError::Internal(format!("password check failed: {e}")))?
    };
    match checked {
        Some(role) => {
            access.limiter.succeeded(&name);
            access.audit.record(
                &format!("user:{name}"),
                "login",
                client,
                json!({ "role": role.name() }),
            );
            tokens(&state, &name, role).map(Json)
        }
        None => {
            access.limiter.failed(&name, client);
            access
                .audit
                .record(&format!("user:{name}"), "login_failed", client, json!({}));
            Err(ServerError::InvalidCredentials)
        }
    }
}

/// `POST /api/v1/auth/refresh`: new tokens for a valid refresh token, with
/// the role the users file gives now.
pub(crate) async fn refresh(
    State(state): State<Arc<ServerState>>,
    payload: Result<Json<Refresh>, JsonRejection>,
) -> Result<Json<Value>, ServerError> {
    let Refresh { refresh_token } = body(payload)?;
    let claims = state.access.keys.verify(&refresh_token, Kind::Refresh)?;
    let users = state.access.users.current()?;
    let user = users
        .users
        .get(&claims.sub)
        .ok_or_else(|| ServerError::Unauthorized("the user no longer exists".into()))?;
    tokens(&state, &claims.sub, user.role).map(Json)
}

/// `GET /api/v1/auth/me`: who the credential belongs to.
pub(crate) async fn me(Extension(principal): Extension<Principal>) -> Json<Value> {
    let (kind, name) = match &principal {
        Principal::User { name, .. } => ("user", name.clone()),
        Principal::Service { id, .. } => ("service_token", id.clone()),
        Principal::IngestKey => ("ingest_key", String::new()),
    };
    Json(json!({
        "kind": kind,
        "name": name,
        "role": principal.role().map(Role::name),
        "permissions": super::Permission::ALL
            .iter()
            .filter(|p| principal.allows(**p))
            .map(|p| p.name())
            .collect::<Vec<_>>(),
    }))
}

fn admin_action(
    state: &ServerState,
    principal: &Principal,
    action: &str,
    detail: Value,
) -> Result<(), ServerError> {
    // An admin action that cannot be recorded is not done.
    state
        .access
        .audit
        .append(&principal.actor(), action, None, detail)
        .map_err(|e| ServerError::Unavailable(format!("cannot write the audit log: {e}")))
}

/// `GET /api/v1/users`.
pub(crate) async fn list_users(
    State(state): State<Arc<ServerState>>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Value>, ServerError> {
    admin_action(&state, &principal, "users_list", json!({}))?;
    let users = state.access.users.current()?;
    let list: Vec<Value> = users
        .users
        .iter()
        .map(|(name, u)| json!({ "name": name, "role": u.role.name() }))
        .collect();
    Ok(Json(json!({ "users": list })))
}

#[derive(Debug, Deserialize)]
pub(crate) struct PutUser {
    role: String,
    password: String,
}

fn role_param(role: &str) -> Result<Role, ServerError> {
    Role::parse(role).ok_or_else(|| {
        ServerError::BadRequest(format!(
            "role must be analyst, manager or admin, got {role:?}"
        ))
    })
}

/// `PUT /api/v1/users/{name}`: adds a user or sets its role and password.
pub(crate) async fn put_user(
    State(state): State<Arc<ServerState>>,
    Extension(principal): Extension<Principal>,
    PathSegment(name): PathSegment,
    payload: Result<Json<PutUser>, JsonRejection>,
) -> Result<Json<Value>, ServerError> {
    let PutUser { role, password } = body(payload)?;
    let role = role_param(&role)?;
    let file_state = state.clone();
    let user = name.clone();
    tokio::task::spawn_blocking(move || file_state.access.users.put_user(&user, role, &password))
        .await
        .map_err(|e| ServerError::Internal(format!("users file update failed: {e}")))??;
    admin_action(
        &state,
        &principal,
        "user_put",
        json!({ "name": name, "role": role.name() }),
    )?;
    Ok(Json(json!({ "name": name, "role": role.name() })))
}

/// `DELETE /api/v1/users/{name}`.
pub(crate) async fn delete_user(
    State(state): State<Arc<ServerState>>,
    Extension(principal): Extension<Principal>,
    PathSegment(name): PathSegment,
) -> Result<Response, ServerError> {
    if !state.access.users.current()?.users.contains_key(&name) {
        return Err(ServerError::NotFound(format!("no user {name:?}")));
    }
    state.access.users.remove_user(&name)?;
    admin_action(&state, &principal, "user_remove", json!({ "name": name }))?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}

/// `GET /api/v1/tokens`: the service tokens, without their secrets.
pub(crate) async fn list_tokens(
    State(state): State<Arc<ServerState>>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Value>, ServerError> {
    admin_action(&state, &principal, "tokens_list", json!({}))?;
    let users = state.access.users.current()?;
    let list: Vec<Value> = users
        .tokens
        .iter()
        .map(|(id, t)| {
            json!({ "id": id, "role": t.role.name(), "name": t.name, "created": t.created })
        })
        .collect();
    Ok(Json(json!({ "tokens": list })))
}

#[derive(Debug, Deserialize)]
pub(crate) struct NewToken {
    role: String,
    #[serde(default)]
    name: String,
}

/// `POST /api/v1/tokens`: the token is in this answer only.
pub(crate) async fn create_token(
    State(state): State<Arc<ServerState>>,
    Extension(principal): Extension<Principal>,
    payload: Result<Json<NewToken>, JsonRejection>,
) -> Result<Response, ServerError> {
    let NewToken { role, name } = body(payload)?;
    let role = role_param(&role)?;
    let (token, id) = state.access.users.create_token(role, &name)?;
    admin_action(
        &state,
        &principal,
        "token_create",
        json!({ "id": id, "role": role.name(), "name": name }),
    )?;
    let answer = json!({ "token": token, "id": id, "role": role.name(), "name": name });
    Ok((axum::http::StatusCode::CREATED, Json(answer)).into_response())
}

/// `DELETE /api/v1/tokens/{id}`.
pub(crate) async fn revoke_token(
    State(state): State<Arc<ServerState>>,
    Extension(principal): Extension<Principal>,
    PathSegment(id): PathSegment,
) -> Result<Response, ServerError> {
    if !state.access.users.current()?.tokens.contains_key(&id) {
        return Err(ServerError::NotFound(format!("no token {id:?}")));
    }
    state.access.users.revoke_token(&id)?;
    admin_action(&state, &principal, "token_revoke", json!({ "id": id }))?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct Range {
    from: Option<String>,
    to: Option<String>,
}

/// `GET /api/v1/audit?from=T&to=T` (default: the last 24 hours).
pub(crate) async fn audit(
    State(state): State<Arc<ServerState>>,
    Extension(principal): Extension<Principal>,
    range: Result<Query<Range>, QueryRejection>,
) -> Result<Json<Value>, ServerError> {
    let Query(range) = range.map_err(|e| ServerError::BadRequest(e.body_text()))?;
    let (from, to) = crate::pipelines::range(
        range.from.as_deref(),
        range.to.as_deref(),
        std::time::Duration::from_secs(24 * 3600),
        // Up to a moment from now: this read's own entry is in the answer.
        EventTime::now().plus(std::time::Duration::from_secs(1)),
    )?;
    admin_action(
        &state,
        &principal,
        "audit_read",
        json!({ "from": from.to_rfc3339(), "to": to.to_rfc3339() }),
    )?;
    let log = state.access.audit.clone();
    let (entries, truncated) = tokio::task::spawn_blocking(move || log.read(from, to))
        .await
        .map_err(|e| ServerError::Internal(format!("audit read failed: {e}")))?
        .map_err(|e| ServerError::Unavailable(format!("cannot read the audit log: {e}")))?;
    Ok(Json(json!({ "entries": entries, "truncated": truncated })))
}

/// `GET /api/v1/serving`: the database served and the live one (what
/// `tidemark promote` switches).
pub(crate) async fn serving(
    State(state): State<Arc<ServerState>>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Value>, ServerError> {
    admin_action(&state, &principal, "serving_read", json!({}))?;
    Ok(Json(json!({
        "database": state.store.name(),
        "live_database": state.live_database(),
        "store": state.store.get().kind(),
    })))
}

/// `GET /api/v1/serving/history`: the served database and every promote
/// and rollback recorded in the serving file, newest first.
pub(crate) async fn serving_history(
    State(state): State<Arc<ServerState>>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Value>, ServerError> {
    admin_action(&state, &principal, "serving_history_read", json!({}))?;
    let recorded = match state.serving_dir() {
        Some(dir) => {
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || crate::serving_file::read_serving(&dir))
                .await
                .map_err(|e| ServerError::Internal(format!("serving file read failed: {e}")))?
                .map_err(|e| {
                    ServerError::Unavailable(format!("cannot read the serving file: {e}"))
                })?
        }
        None => None,
    };
    let mut history = recorded.map(|s| s.history).unwrap_or_default();
    history.reverse();
    Ok(Json(json!({
        "database": state.store.name(),
        "live_database": state.live_database(),
        "history": history,
    })))
}
