//! Serving: the REST query API, WebSocket fan-out of live updates, the web
//! dashboard and `/metrics`, at the end of the data flow.
//!
//! [`ServerState`] holds the store, the live updates channel, the Prometheus
//! registry, the live channels (`channels`, fed by `served`; the overview's
//! data in `overview`) and access (`auth`, `audit`); [`router`] exposes them over
//! HTTP from one route table (`routes`) and [`serve`] runs the router until
//! shutdown.

pub mod alerting;
pub mod audit;
pub mod auth;
mod channels;
pub mod credentials;
pub mod hot;
mod live;
mod overview;
mod pipelines;
pub mod query;
mod rest;
pub mod routes;
mod served;
pub mod serving_file;
pub mod tls;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use tidemark_model::Update;
use tidemark_tsdb_writer::{Store, StoreError};
use tokio::sync::{broadcast, watch};
use tower_http::services::{ServeDir, ServeFile};

pub use auth::{Access, AccessConfig, AccessError, Permission, Principal, Role};
pub use routes::Route;

pub use live::run_session;
pub use overview::{Overview, OverviewWindow, OVERVIEW_WINDOWS};

/// Errors of the serving layer, each answered with its status and
/// `{"error": "<message>", "code": "<machine code>"}`.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A request parameter is missing or malformed.
    #[error("{0}")]
    BadRequest(String),
    /// No valid credential.
    #[error("{0}")]
    Unauthorized(String),
    /// A wrong name or password.
    #[error("wrong name or password")]
    InvalidCredentials,
    /// The credential's role lacks the permission.
    #[error("this needs the {} permission", .0.name())]
    Forbidden(Permission),
    /// Too many failed logins; try again after the duration.
    #[error("too many failed logins; try again in {} s", auth::retry_after_secs(*.0))]
    TooManyAttempts(std::time::Duration),
    /// What the path names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Something the server needs is missing for now (the users file is
    /// invalid, the audit log cannot be written).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a broken invariant.
    #[error("{0}")]
    Internal(String),
    /// The store failed to answer.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An ad-hoc query was refused or failed.
    #[error(transparent)]
    Query(#[from] query::QueryError),
}

impl From<auth::UsersFileError> for ServerError {
    fn from(e: auth::UsersFileError) -> ServerError {
        match e {
            auth::UsersFileError::Rejected(message) => ServerError::BadRequest(message),
            other => ServerError::Unavailable(other.to_string()),
        }
    }
}

impl ServerError {
    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ServerError::TooManyAttempts(_) | ServerError::Unavailable(_) => true,
            ServerError::Store(e) => e.is_retryable(),
            _ => false,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ServerError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServerError::Unauthorized(_) | ServerError::InvalidCredentials => {
                StatusCode::UNAUTHORIZED
            }
            ServerError::Forbidden(_) => StatusCode::FORBIDDEN,
            ServerError::TooManyAttempts(_) => StatusCode::TOO_MANY_REQUESTS,
            ServerError::NotFound(_) => StatusCode::NOT_FOUND,
            ServerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ServerError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ServerError::Query(e) => e.status(),
            ServerError::Store(StoreError::InvalidQuery(_)) => StatusCode::BAD_REQUEST,
            ServerError::Store(e) if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            ServerError::Store(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The machine-readable code of the answer.
    pub fn code(&self) -> &'static str {
        match self {
            ServerError::BadRequest(_) => "bad_request",
            ServerError::Unauthorized(_) => "unauthorized",
            ServerError::InvalidCredentials => "invalid_credentials",
            ServerError::Forbidden(_) => "forbidden",
            ServerError::TooManyAttempts(_) => "too_many_attempts",
            ServerError::NotFound(_) => "not_found",
            ServerError::Unavailable(_) => "unavailable",
            ServerError::Internal(_) => "internal",
            ServerError::Query(e) => e.code(),
            ServerError::Store(StoreError::InvalidQuery(_)) => "invalid_query",
            ServerError::Store(e) if e.is_retryable() => "store_unavailable",
            ServerError::Store(_) => "store_failed",
        }
    }
}

/// One path segment (`{tag}`, `{id}`, `{name}`): a bad one (not UTF-8 once
/// decoded) is a JSON 400 like every other bad request, not axum's
/// plain-text rejection.
pub(crate) struct PathSegment(pub(crate) String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PathSegment {
    type Rejection = ServerError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(segment)| PathSegment(segment))
            .map_err(|e| ServerError::BadRequest(e.body_text()))
    }
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.to_string(), "code": self.code() });
        if let ServerError::Forbidden(p) = &self {
            body["permission"] = p.name().into();
        }
        let mut response = (self.status(), Json(body)).into_response();
        match &self {
            ServerError::TooManyAttempts(wait) => {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    header::HeaderValue::from(auth::retry_after_secs(*wait)),
                );
            }
            ServerError::Unauthorized(_) | ServerError::InvalidCredentials => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"tidemark\""),
                );
            }
            _ => {}
        }
        response
    }
}

/// The serving layer's own Prometheus metrics.
#[derive(Debug, Clone)]
pub(crate) struct ServerMetrics {
    pub ws_clients: IntGauge,
    pub ws_dropped: IntCounter,
    pub ws_slow_disconnects: IntCounter,
    pub query_seconds: Histogram,
    pub event_to_update_seconds: Histogram,
}

impl ServerMetrics {
    fn new(registry: &Registry) -> ServerMetrics {
        let metrics = ServerMetrics {
            ws_clients: IntGauge::new("tidemark_ws_clients", "Connected WebSocket clients.")
                .expect("static gauge options are valid"),
            ws_dropped: IntCounter::new(
                "tidemark_ws_messages_dropped_total",
                "Live updates not delivered to slow WebSocket clients (coalesced into a snapshot).",
            )
            .expect("static counter options are valid"),
            ws_slow_disconnects: IntCounter::new(
                "tidemark_ws_slow_disconnects_total",
                "WebSocket clients closed for not reading their updates in time (code 4008).",
            )
            .expect("static counter options are valid"),
            query_seconds: Histogram::with_opts(
                HistogramOpts::new("tidemark_serve_query_seconds", "Latency of REST metric queries.")
                    .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            )
            .expect("static histogram options are valid"),
            event_to_update_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "tidemark_serve_event_to_update_seconds",
                    "Time from ingest receiving an event to a live update carrying it being pushed.",
                )
                .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]),
            )
            .expect("static histogram options are valid"),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 5] = [
            Box::new(metrics.ws_clients.clone()),
            Box::new(metrics.ws_dropped.clone()),
            Box::new(metrics.ws_slow_disconnects.clone()),
            Box::new(metrics.query_seconds.clone()),
            Box::new(metrics.event_to_update_seconds.clone()),
        ];
        for c in collectors {
            // A second server on the same registry (tests) keeps counting in its
            // own collectors rather than failing to start.
            if let Err(e) = registry.register(c) {
                tracing::warn!(error = %e, "metric not registered");
            }
        }
        metrics
    }
}

/// The database the REST API and the overview answer from, switchable
/// while serving (`tidemark promote`): a request takes the store once, so it
/// is answered wholly by the old or wholly by the new database, never fails
/// in between.
#[derive(Debug)]
pub struct ServingStore {
    current: served::Serving,
}

impl ServingStore {
    /// The store requests are answered from now.
    pub fn get(&self) -> Arc<dyn Store> {
        self.current.borrow().1.clone()
    }

    /// The name of the database served now.
    pub fn name(&self) -> String {
        self.current.borrow().0.clone()
    }

    /// Serves `name` from now on; requests already running finish on the
    /// old one, and WebSocket clients get a snapshot of the new one.
    pub fn switch(&self, name: &str, store: Arc<dyn Store>) {
        let unchanged = {
            let current = self.current.borrow();
            current.0 == name && Arc::ptr_eq(&current.1, &store)
        };
        if !unchanged {
            self.current.send_replace((name.to_string(), store));
        }
    }
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct ServerState {
    pub(crate) store: ServingStore,
    /// The database the live processor writes (see [`ServerState::set_live_database`]).
    live_database: Arc<RwLock<String>>,
    pub(crate) registry: Registry,
    pub(crate) web_dir: Option<PathBuf>,
    /// The live channels, the overview among them.
    pub(crate) hub: Arc<channels::Hub>,
    pub(crate) metrics: ServerMetrics,
    pub(crate) access: Access,
    /// Turns of ad-hoc queries (see [`query::CONCURRENT_QUERIES`]).
    pub(crate) query_turns: tokio::sync::Semaphore,
    /// The live database's newest hour (see [`hot`]).
    hot_points: Arc<hot::HotPoints>,
    /// See [`ServerState::set_dashboard_ingest_key`].
    dashboard_ingest_key: std::sync::OnceLock<String>,
    /// See [`ServerState::set_serving_dir`].
    serving_dir: std::sync::OnceLock<PathBuf>,
    /// See [`ServerState::set_alert_rules`].
    alert_rules: std::sync::OnceLock<Arc<alerting::RulesBook>>,
}

impl ServerState {
    /// Builds the state serving `store` as the live database, registers the
    /// server metrics in `registry` and starts the task that feeds the
    /// live channels from the served database and `updates` (call inside a Tokio runtime; the task ends with the
    /// state). `access` checks every protected route's credential.
    pub fn new(
        store: Arc<dyn Store>,
        updates: broadcast::Sender<Update>,
        registry: Registry,
        web_dir: Option<PathBuf>,
        access: Access,
    ) -> ServerState {
        let metrics = ServerMetrics::new(&registry);
        let hub = Arc::new(channels::Hub::default());
        let live_database = Arc::new(RwLock::new(
            tidemark_tsdb_writer::DEFAULT_DATABASE.to_string(),
        ));
        let (current, serving) =
            watch::channel((tidemark_tsdb_writer::DEFAULT_DATABASE.to_string(), store));
        let hot_points = Arc::new(hot::HotPoints::default());
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(Arc::clone(&hot_points).follow(updates.subscribe()));
                handle.spawn(served::follow_serving(
                    serving,
                    live_database.clone(),
                    updates.subscribe(),
                    Arc::clone(&hub),
                    metrics.ws_dropped.clone(),
                ));
            }
            Err(_) => tracing::warn!("no Tokio runtime: the live channels stay empty"),
        }
        ServerState {
            store: ServingStore { current },
            live_database,
            registry,
            web_dir,
            hub,
            metrics,
            access,
            query_turns: tokio::sync::Semaphore::new(query::CONCURRENT_QUERIES),
            hot_points,
            dashboard_ingest_key: std::sync::OnceLock::new(),
            serving_dir: std::sync::OnceLock::new(),
            alert_rules: std::sync::OnceLock::new(),
        }
    }

    /// The alert rules the rules API reads and changes (a server without
    /// them answers that API with 503).
    pub fn set_alert_rules(&self, book: Arc<alerting::RulesBook>) {
        let _ = self.alert_rules.set(book);
    }

    pub(crate) fn alert_rules(&self) -> Option<&Arc<alerting::RulesBook>> {
        self.alert_rules.get()
    }

    /// Credentials and the audit log.
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// The database the live processor writes.
    pub fn live_database(&self) -> String {
        self.live_database
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The store reads are answered from: the served database, its newest
    /// hour from memory while it is the live one (see [`hot`]).
    pub fn reader(&self) -> Arc<dyn Store> {
        let store = self.store.get();
        if self.store.name() == self.live_database() {
            Arc::new(hot::HotStore {
                hot: Arc::clone(&self.hot_points),
                store,
            })
        } else {
            store
        }
    }

    /// Whether the hot cache answers reads of `measurement` in `tier`
    /// from `from` on (while the live database is served).
    pub fn hot_covers(
        &self,
        tier: tidemark_model::Tier,
        measurement: &str,
        from: tidemark_model::EventTime,
    ) -> bool {
        self.hot_points.covers(tier, measurement, from)
    }

    /// The database the REST API answers from (see [`ServingStore`]).
    pub fn serving(&self) -> &ServingStore {
        &self.store
    }

    /// Names the database the live processor writes (by default
    /// `tidemark`): while it is served, live updates feed the channels;
    /// while another one is, that database does (see [`served`]). The live
    /// store, if served, is served under the new name from now on.
    /// The ingest key the dashboard's own SDK posts its views with. Set it
    /// only where ingest answers on the same listener (`tidemark run` and
    /// `demo`): the dashboard posts to its own origin. Set once; later calls
    /// are ignored.
    pub fn set_dashboard_ingest_key(&self, key: String) {
        let _ = self.dashboard_ingest_key.set(key);
    }

    /// Names the folder whose [`serving_file`] this server follows, so
    /// `GET /api/v1/serving/history` can read its promotes and rollbacks.
    /// Without one the history is empty. Set once; later calls are ignored.
    pub fn set_serving_dir(&self, dir: PathBuf) {
        let _ = self.serving_dir.set(dir);
    }

    /// See [`ServerState::set_serving_dir`].
    pub(crate) fn serving_dir(&self) -> Option<&std::path::Path> {
        self.serving_dir.get().map(PathBuf::as_path)
    }

    pub fn set_live_database(&self, name: &str) {
        let previous = std::mem::replace(
            &mut *self
                .live_database
                .write()
                .unwrap_or_else(|e| e.into_inner()),
            name.to_string(),
        );
        if self.store.name() == previous {
            self.store.switch(name, self.store.get());
        }
    }

    /// A copy of the overview channel's windows.
    pub fn overview(&self) -> Overview {
        self.hub.overview()
    }
}

/// The HTTP routes (see `docs/api.md`): health, login and the dashboard are
/// open; every other route needs a credential whose role holds the
/// route's [`Permission`].
pub fn router(state: Arc<ServerState>) -> Router {
    router_and_routes(state).0
}

/// The router and its route table (what `GET /api/v1/openapi.json`
/// describes).
pub fn router_and_routes(state: Arc<ServerState>) -> (Router, Vec<Route>) {
    use auth::routes as a;
    use routes::{route, Verb::*};
    use Permission::*;
    let web_dir = state
        .web_dir
        .clone()
        .filter(|dir| dir.join("index.html").is_file());
    let range: &[&str] = &["from", "to"];
    let (api, table) = routes::Table::new(state.clone())
        .add(
            route(
                Get,
                "/api/v1/health",
                None,
                "Liveness and the database served",
                &[],
            ),
            health,
        )
        .add(
            route(Get, "/api/v1/openapi.json", None, "This description", &[]),
            openapi,
        )
        .add(
            route(
                Get,
                "/api/v1/sdk",
                Some(ReadMetrics),
                "The ingest key the dashboard counts its own views with",
                &[],
            ),
            sdk_settings,
        )
        .add(
            route(
                Post,
                "/api/v1/auth/login",
                None,
                "Log in with name and password: tokens",
                &[],
            ),
            a::login,
        )
        .add(
            route(
                Post,
                "/api/v1/auth/refresh",
                None,
                "New tokens for a refresh token",
                &[],
            ),
            a::refresh,
        )
        .add(
            route(
                Get,
                "/api/v1/auth/me",
                Some(ReadMetrics),
                "Who the credential belongs to",
                &[],
            ),
            a::me,
        )
        .add(
            route(
                Get,
                "/api/v1/metrics",
                Some(ReadMetrics),
                "One field of one measurement over time",
                &["name", "field", "from", "to", "step", "group_by", "agg"],
            ),
            rest::metrics_query,
        )
        .add(
            route(
                Get,
                "/api/v1/trending",
                Some(ReadMetrics),
                "The top tags of a window",
                &["window", "at", "limit"],
            ),
            pipelines::trending,
        )
        .add(
            route(
                Get,
                "/api/v1/trending/{tag}",
                Some(ReadMetrics),
                "A tag's rank, score and users over time",
                &["window", "from", "to"],
            ),
            pipelines::trending_tag,
        )
        .add(
            route(
                Get,
                "/api/v1/campaigns",
                Some(ReadMetrics),
                "Every campaign's totals",
                range,
            ),
            pipelines::campaigns,
        )
        .add(
            route(
                Get,
                "/api/v1/campaigns/{id}",
                Some(ReadMetrics),
                "A campaign's fields per step",
                &["from", "to", "step", "group_by"],
            ),
            pipelines::campaign,
        )
        .add(
            route(
                Get,
                "/api/v1/engagement",
                Some(ReadMetrics),
                "Sessions and engagement per step",
                &["from", "to", "step", "group_by"],
            ),
            pipelines::engagement,
        )
        .add(
            route(
                Post,
                "/api/v1/query",
                Some(RunQueries),
                "An ad-hoc SQL query over the measurements",
                &[],
            ),
            query::query,
        )
        .add(
            route(
                Get,
                "/api/v1/query/tables",
                Some(RunQueries),
                "The tables and columns an ad-hoc query may read",
                &[],
            ),
            query::tables,
        )
        .add(
            route(
                Get,
                "/metrics",
                Some(ReadMetrics),
                "Prometheus metrics",
                &[],
            ),
            metrics_page,
        )
        .add(
            route(
                Get,
                "/api/v1/alerts",
                Some(ReadMetrics),
                "Business alerts over time: each window a rule was pending, firing or resolved in",
                &["from", "to", "rule"],
            ),
            alerting::history,
        )
        .add(
            route(
                Get,
                "/api/v1/alerts/rules",
                Some(ReadMetrics),
                "The business alert rules",
                &[],
            ),
            alerting::list_rules,
        )
        .add(
            route(
                Put,
                "/api/v1/alerts/rules/{name}",
                Some(WriteAlerts),
                "Add an alert rule or replace the rule of that name",
                &[],
            ),
            alerting::put_rule,
        )
        .add(
            route(
                Delete,
                "/api/v1/alerts/rules/{name}",
                Some(WriteAlerts),
                "Remove an alert rule",
                &[],
            ),
            alerting::delete_rule,
        )
        .add(
            route(Get, "/api/v1/users", Some(ManageUsers), "The users", &[]),
            a::list_users,
        )
        .add(
            route(
                Put,
                "/api/v1/users/{name}",
                Some(ManageUsers),
                "Add a user or set its role and password",
                &[],
            ),
            a::put_user,
        )
        .add(
            route(
                Delete,
                "/api/v1/users/{name}",
                Some(ManageUsers),
                "Remove a user",
                &[],
            ),
            a::delete_user,
        )
        .add(
            route(
                Get,
                "/api/v1/tokens",
                Some(ManageUsers),
                "The service tokens",
                &[],
            ),
            a::list_tokens,
        )
        .add(
            route(
                Post,
                "/api/v1/tokens",
                Some(ManageUsers),
                "Create a service token",
                &[],
            ),
            a::create_token,
        )
        .add(
            route(
                Delete,
                "/api/v1/tokens/{id}",
                Some(ManageUsers),
                "Revoke a service token",
                &[],
            ),
            a::revoke_token,
        )
        .add(
            route(
                Get,
                "/api/v1/audit",
                Some(ReadAudit),
                "The audit log",
                range,
            ),
            a::audit,
        )
        .add(
            route(
                Get,
                "/api/v1/serving",
                Some(ReadOperations),
                "The database served and the live one",
                &[],
            ),
            a::serving,
        )
        .add(
            route(
                Get,
                "/api/v1/serving/history",
                Some(ReadOperations),
                "Every promote and rollback of the served database, newest first",
                &[],
            ),
            a::serving_history,
        )
        // The socket authenticates in its first message or on the upgrade,
        // and each subscription by channel.
        .add(
            route(Get, "/ws", None, "WebSocket: live channels", &[]),
            live::ws_upgrade,
        )
        .finish();
    let api = api
        .route("/api/{*rest}", axum::routing::any(no_such_route))
        .with_state(state);
    let api = match web_dir {
        Some(dir) => {
            let index = dir.join("index.html");
            api.fallback_service(ServeDir::new(dir).fallback(ServeFile::new(index)))
        }
        None => api.route("/", get(not_built)),
    };
    (api, table)
}

async fn openapi(
    axum::extract::State(state): axum::extract::State<Arc<ServerState>>,
) -> Json<serde_json::Value> {
    // The table is the same for every state: described once.
    static DESCRIPTION: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    Json(
        DESCRIPTION
            .get_or_init(|| routes::openapi(&router_and_routes(state).1))
            .clone(),
    )
}

async fn no_such_route(uri: axum::http::Uri) -> ServerError {
    ServerError::NotFound(format!("no route {}", uri.path()))
}

/// Serves `router` on `listener` (plain or TLS, see [`tls`]) until
/// `shutdown` completes, then lets in-flight requests finish.
pub async fn serve(
    listener: impl Into<tls::HttpListener>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    // The client's address is kept for the login limits and the audit log.
    let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    match listener.into().into_parts() {
        (tcp, None) => {
            axum::serve(tcp, service)
                .with_graceful_shutdown(shutdown)
                .await
        }
        (tcp, Some(config)) => {
            // `tap_io` gives the TLS listener axum's client-address plumbing.
            let listener = tls::TlsListener::spawn(tcp, config)?.tap_io(|_| {});
            axum::serve(listener, service)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

async fn health(axum::extract::State(state): axum::extract::State<Arc<ServerState>>) -> Response {
    let store = state.store.get();
    Json(serde_json::json!({ "status": "ok", "store": store.kind(), "database": state.store.name() }))
        .into_response()
}

async fn sdk_settings(
    axum::extract::State(state): axum::extract::State<Arc<ServerState>>,
) -> Response {
    Json(serde_json::json!({ "ingest_key": state.dashboard_ingest_key.get() })).into_response()
}

async fn metrics_page(
    axum::extract::State(state): axum::extract::State<Arc<ServerState>>,
) -> Response {
    prometheus_text(&state.registry)
}

/// `registry` in Prometheus' text format: the `/metrics` page of every service.
pub fn prometheus_text(registry: &prometheus::Registry) -> Response {
    use prometheus::Encoder as _;
    let encoder = prometheus::TextEncoder::new();
    let mut out = Vec::new();
    match encoder.encode(&registry.gather(), &mut out) {
        Ok(()) => (
            [(header::CONTENT_TYPE, encoder.format_type().to_string())],
            out,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

const NOT_BUILT_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tidemark</title>
<style>body{background:#0f1419;color:#d6dde6;font:16px/1.5 system-ui,sans-serif;max-width:40em;margin:4em auto;padding:0 1em}
code{background:#1c242d;padding:.2em .4em;border-radius:4px}</style></head>
<body><h1>tidemark</h1>
<p>The web dashboard is not built. Build it with</p>
<p><code>npm --prefix dashboards/web ci &amp;&amp; npm --prefix dashboards/web run build</code></p>
<p>and start the server with the dashboard directory (<code>dashboards/web/dist</code>).
The API is available meanwhile: <a href="/api/v1/health">/api/v1/health</a>, <a href="/metrics">/metrics</a>.</p>
</body></html>
"#;

async fn not_built() -> Html<&'static str> {
    Html(NOT_BUILT_PAGE)
}

/// A JSON number for a value: integral values without a fraction, non-finite
/// values as `null`.
pub(crate) fn json_number(v: f64) -> serde_json::Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if v.is_finite() && v.fract() == 0.0 && v.abs() <= EXACT {
        serde_json::Value::from(v as i64)
    } else {
        serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)
    }
}
