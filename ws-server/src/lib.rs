//! Serving: the REST query API, WebSocket fan-out of live updates, the web
//! dashboard and `/metrics`, at the end of the data flow.
//!
//! [`ServerState`] holds the store, the live updates channel, the Prometheus
//! registry and the hot cache of the overview channel; [`router`] exposes them
//! over HTTP and [`serve`] runs the router until shutdown.

mod live;
mod rest;
mod served;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use tidemark_model::Update;
use tidemark_tsdb_writer::{Store, StoreError};
use tokio::sync::{broadcast, watch};
use tower_http::services::{ServeDir, ServeFile};

pub use live::{run_session, Overview, OverviewWindow, OVERVIEW_WINDOWS};

/// Errors of the serving layer.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A request parameter is missing or malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The store failed to answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServerError {
    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ServerError::BadRequest(_) => false,
            ServerError::Store(e) => e.is_retryable(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ServerError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServerError::Store(StoreError::InvalidQuery(_)) => StatusCode::BAD_REQUEST,
            ServerError::Store(e) if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            ServerError::Store(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.to_string() });
        (self.status(), Json(body)).into_response()
    }
}

/// The serving layer's own Prometheus metrics.
#[derive(Debug, Clone)]
pub(crate) struct ServerMetrics {
    pub ws_clients: IntGauge,
    pub ws_dropped: IntCounter,
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
            query_seconds: Histogram::with_opts(
                HistogramOpts::new("tidemark_query_seconds", "Latency of REST metric queries.")
                    .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            )
            .expect("static histogram options are valid"),
            event_to_update_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "tidemark_event_to_update_seconds",
                    "Time from ingest receiving an event to a live update carrying it being pushed.",
                )
                .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]),
            )
            .expect("static histogram options are valid"),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 4] = [
            Box::new(metrics.ws_clients.clone()),
            Box::new(metrics.ws_dropped.clone()),
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
    /// What sessions follow (see [`served`]).
    pub(crate) served: broadcast::Sender<served::Served>,
    /// The hot cache's generation: it goes up when the served database changes.
    pub(crate) generation: watch::Receiver<u64>,
    pub(crate) registry: Registry,
    pub(crate) web_dir: Option<PathBuf>,
    pub(crate) hot: Arc<Mutex<Overview>>,
    pub(crate) metrics: ServerMetrics,
}

impl ServerState {
    /// Builds the state serving `store` as the live database, registers the
    /// server metrics in `registry` and starts the hot-cache task that
    /// follows `updates` (call inside a Tokio runtime; the task ends with the
    /// state).
    pub fn new(
        store: Arc<dyn Store>,
        updates: broadcast::Sender<Update>,
        registry: Registry,
        web_dir: Option<PathBuf>,
    ) -> ServerState {
        let metrics = ServerMetrics::new(&registry);
        let hot = Arc::new(Mutex::new(Overview::default()));
        let live_database = Arc::new(RwLock::new(
            tidemark_tsdb_writer::DEFAULT_DATABASE.to_string(),
        ));
        let (current, serving) =
            watch::channel((tidemark_tsdb_writer::DEFAULT_DATABASE.to_string(), store));
        let (served, _) = broadcast::channel(1024);
        let (generation_tx, generation) = watch::channel(0);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(served::follow_serving(
                    serving,
                    live_database.clone(),
                    updates.subscribe(),
                    served.clone(),
                    Arc::clone(&hot),
                    generation_tx,
                    metrics.ws_dropped.clone(),
                ));
            }
            Err(_) => tracing::warn!("no Tokio runtime: the overview hot cache stays empty"),
        }
        ServerState {
            store: ServingStore { current },
            live_database,
            served,
            generation,
            registry,
            web_dir,
            hot,
            metrics,
        }
    }

    /// The database the REST API answers from (see [`ServingStore`]).
    pub fn serving(&self) -> &ServingStore {
        &self.store
    }

    /// Names the database the live processor writes (by default
    /// `tidemark`): while it is served, live updates feed the overview;
    /// while another one is, that database does (see [`served`]). The live
    /// store, if served, is served under the new name from now on.
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

    /// A copy of the overview hot cache.
    pub fn overview(&self) -> Overview {
        live::lock(&self.hot).clone()
    }
}

/// The HTTP routes: `/api/v1/health`, `/api/v1/metrics`, `/ws`, `/metrics` and
/// the dashboard.
pub fn router(state: Arc<ServerState>) -> Router {
    let web_dir = state
        .web_dir
        .clone()
        .filter(|dir| dir.join("index.html").is_file());
    let api = Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/metrics", get(rest::metrics_query))
        .route("/ws", get(live::ws_upgrade))
        .route("/metrics", get(prometheus_text))
        .with_state(state);
    match web_dir {
        Some(dir) => {
            let index = dir.join("index.html");
            api.fallback_service(ServeDir::new(dir).fallback(ServeFile::new(index)))
        }
        None => api.route("/", get(not_built)),
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then lets
/// in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn health(axum::extract::State(state): axum::extract::State<Arc<ServerState>>) -> Response {
    let store = state.store.get();
    Json(serde_json::json!({ "status": "ok", "store": store.kind(), "database": state.store.name() }))
        .into_response()
}

async fn prometheus_text(
    axum::extract::State(state): axum::extract::State<Arc<ServerState>>,
) -> Response {
    use prometheus::Encoder as _;
    let encoder = prometheus::TextEncoder::new();
    let mut out = Vec::new();
    match encoder.encode(&state.registry.gather(), &mut out) {
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
