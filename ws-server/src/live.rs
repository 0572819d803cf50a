//! The live side: the overview hot cache and WebSocket sessions.
//!
//! A session subscribes to the updates broadcast before it copies the hot
//! cache, so nothing falls between its snapshot and its first update; it then
//! keeps its own copy of the overview up to date and sends each changed window
//! whole, so a client never has to merge partial results. When the served
//! database changes (`tidemark promote`), the hot cache is rebuilt under a
//! new generation and every session sends a fresh snapshot.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse as _, Response};
use futures::{future, Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tidemark_model::{EventTime, Tier, Update};
use tokio::sync::broadcast::error::RecvError;

use crate::auth::{Permission, Principal, Role};
use crate::channels::Published;
use crate::served::Served;
use crate::{json_number, ServerError, ServerState};

/// How many 1-minute windows the overview keeps: the last hour.
pub const OVERVIEW_WINDOWS: usize = 60;

const WINDOW: Duration = Duration::from_secs(60);

/// A client that cannot take a message for this long is disconnected, so it
/// never holds on to server resources indefinitely.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

const OVERVIEW: &str = "overview";

/// How long a slow client's close frame may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// One 1-minute window of the overview channel.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OverviewWindow {
    /// Whether the window has closed.
    pub is_final: bool,
    /// Events per event type.
    pub traffic: BTreeMap<String, f64>,
    /// Distinct active users.
    pub active_users: f64,
}

/// The newest value of each of the last [`OVERVIEW_WINDOWS`] 1-minute windows,
/// built from `traffic` (field `events`, by `event_type`) and `active_users`
/// (field `users`) points of the real-time tier.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overview {
    windows: BTreeMap<EventTime, OverviewWindow>,
}

impl Overview {
    /// Applies an update and returns the starts of the windows it changed that
    /// are still kept. A measurement present in the update replaces that
    /// measurement's value for the window; the others are left alone, since
    /// pipelines publish their updates separately.
    pub fn apply(&mut self, update: &Update) -> Vec<EventTime> {
        let mut traffic: BTreeMap<EventTime, BTreeMap<String, f64>> = BTreeMap::new();
        let mut users: BTreeMap<EventTime, f64> = BTreeMap::new();
        for p in update.points.iter().filter(|p| p.tier == Tier::Rt) {
            let start = p.time.floor(WINDOW);
            match p.measurement.as_str() {
                "traffic" => {
                    if let (Some(v), Some(kind)) = (p.field("events"), p.tag("event_type")) {
                        *traffic
                            .entry(start)
                            .or_default()
                            .entry(kind.to_string())
                            .or_default() += v.as_f64();
                    }
                }
                "active_users" => {
                    if let Some(v) = p.field("users") {
                        *users.entry(start).or_default() += v.as_f64();
                    }
                }
                _ => {}
            }
        }
        let mut touched: Vec<EventTime> = traffic.keys().chain(users.keys()).copied().collect();
        touched.sort();
        touched.dedup();
        for start in &touched {
            let w = self.windows.entry(*start).or_default();
            if let Some(t) = traffic.remove(start) {
                w.traffic = t;
            }
            if let Some(u) = users.remove(start) {
                w.active_users = u;
            }
            w.is_final |= update.is_final;
        }
        self.trim();
        touched.retain(|s| self.windows.contains_key(s));
        touched
    }

    fn trim(&mut self) {
        let Some(newest) = self.windows.keys().next_back().copied() else {
            return;
        };
        let oldest_kept = newest.minus(WINDOW * (OVERVIEW_WINDOWS as u32 - 1));
        self.windows = self.windows.split_off(&oldest_kept);
    }

    /// The kept windows, oldest first.
    pub fn windows(&self) -> impl Iterator<Item = (EventTime, &OverviewWindow)> {
        self.windows.iter().map(|(t, w)| (*t, w))
    }

    fn window_json(&self, start: EventTime) -> Option<Value> {
        let w = self.windows.get(&start)?;
        let traffic: Map<String, Value> = w
            .traffic
            .iter()
            .map(|(k, v)| (k.clone(), json_number(*v)))
            .collect();
        Some(json!({
            "window_start": start.to_rfc3339(),
            "final": w.is_final,
            "traffic": traffic,
            "active_users": json_number(w.active_users),
        }))
    }

    fn message(&self, kind: &str, starts: impl Iterator<Item = EventTime>) -> String {
        let windows: Vec<Value> = starts.filter_map(|s| self.window_json(s)).collect();
        json!({ "type": kind, "channel": OVERVIEW, "windows": windows }).to_string()
    }

    fn snapshot_message(&self) -> String {
        self.message("snapshot", self.windows.keys().copied())
    }
}

pub(crate) fn lock(hot: &Mutex<Overview>) -> MutexGuard<'_, Overview> {
    // The cache is plain data; a panic elsewhere cannot leave it inconsistent.
    hot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Deserialize)]
struct ClientMessage {
    op: String,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

fn error_message(code: &str, message: &str) -> String {
    json!({ "type": "error", "code": code, "message": message }).to_string()
}

/// The subprotocol a browser names beside `bearer.<token>` (browsers cannot
/// set an `Authorization` header on a WebSocket).
pub const PROTOCOL: &str = "tidemark";

const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

enum Event {
    Client(Option<String>),
    Update(Result<Served, RecvError>),
    /// The hot cache was rebuilt for another database.
    Reset,
    /// A change of one of the hub's channels.
    Channel(String, Result<Arc<Published>, RecvError>),
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client closed the socket or went away.
    ClientLeft,
    /// The client did not take a message for [`SEND_TIMEOUT`]: close it
    /// with [`SLOW_CLOSE_CODE`].
    Slow,
}

/// The close code of a client dropped for not keeping up, with reason `slow`.
pub const SLOW_CLOSE_CODE: u16 = 4008;

/// A session's subscription to one of the hub's channels.
struct ChannelSubscription {
    /// The newest change the client has (in a snapshot or an update).
    seq: u64,
    updates: tokio::sync::broadcast::Receiver<Arc<Published>>,
}

/// The next change of any channel subscribed to; never, with none.
async fn next_published(
    subscriptions: &mut BTreeMap<String, ChannelSubscription>,
) -> (String, Result<Arc<Published>, RecvError>) {
    if subscriptions.is_empty() {
        return future::pending().await;
    }
    let receives = subscriptions
        .iter_mut()
        .map(|(name, sub)| Box::pin(async move { (name.clone(), sub.updates.recv().await) }));
    future::select_all(receives).await.0
}

/// The overview's next update or reset; never, without the subscription.
async fn next_overview(subscription: &mut Option<Subscription>) -> Event {
    let Some(sub) = subscription else {
        return future::pending().await;
    };
    tokio::select! {
        update = sub.updates.recv() => Event::Update(update),
        changed = sub.generation.changed() => match changed {
            Ok(()) => Event::Reset,
            // The server is going away; the update channel says so too.
            Err(_) => Event::Update(Err(RecvError::Closed)),
        },
    }
}

/// A session's subscription to the overview channel.
struct Subscription {
    updates: tokio::sync::broadcast::Receiver<Served>,
    generation: tokio::sync::watch::Receiver<u64>,
    /// The generation `overview` belongs to.
    current: u64,
    overview: Overview,
}

impl Subscription {
    fn new(state: &ServerState) -> Subscription {
        // In this order, nothing falls between the snapshot and the updates.
        let updates = state.served.subscribe();
        let mut generation = state.generation.clone();
        let current = *generation.borrow_and_update();
        Subscription {
            updates,
            generation,
            current,
            overview: state.overview(),
        }
    }

    /// Starts over from the hot cache: what the client gets is a snapshot.
    fn resync(&mut self, state: &ServerState) -> String {
        self.current = *self.generation.borrow_and_update();
        self.overview = state.overview();
        self.overview.snapshot_message()
    }
}

struct ClientGauge(prometheus::IntGauge);

impl Drop for ClientGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Runs one client session over any text transport until the client goes
/// away or stops accepting messages, and gives the sink back with how it
/// ended. Client messages are `{"op":"auth","token":"..."}` (unless
/// `principal` came with the upgrade) and
/// `{"op":"subscribe"|"unsubscribe","channel":"..."}`.
pub async fn run_session<Si, St>(
    state: Arc<ServerState>,
    mut principal: Option<Principal>,
    mut sink: Si,
    mut incoming: St,
) -> (Si, SessionEnd)
where
    Si: Sink<String> + Unpin,
    St: Stream<Item = String> + Unpin,
{
    state.metrics.ws_clients.inc();
    let _gauge = ClientGauge(state.metrics.ws_clients.clone());
    let mut subscription: Option<Subscription> = None;
    let mut channels: BTreeMap<String, ChannelSubscription> = BTreeMap::new();
    let end = loop {
        let event = tokio::select! {
            msg = incoming.next() => Event::Client(msg),
            event = next_overview(&mut subscription) => event,
            (name, change) = next_published(&mut channels) => Event::Channel(name, change),
        };
        let reply = match event {
            Event::Client(None) => break SessionEnd::ClientLeft,
            Event::Client(Some(text)) => match serde_json::from_str::<ClientMessage>(&text) {
                Err(e) => Some(error_message(
                    "bad_message",
                    &format!("invalid message: {e}"),
                )),
                Ok(msg) if msg.op == "auth" => {
                    match state
                        .access
                        .authenticate(msg.token.as_deref().unwrap_or_default())
                    {
                        Ok(p) => {
                            let role = p.role().map(Role::name);
                            principal = Some(p);
                            Some(json!({ "type": "authenticated", "role": role }).to_string())
                        }
                        Err(e) => Some(error_message(e.code(), &e.to_string())),
                    }
                }
                Ok(msg)
                    if msg.op == "subscribe"
                        && !matches!(&principal, Some(p) if p.allows(Permission::ReadMetrics)) =>
                {
                    Some(match &principal {
                        None => error_message(
                            "unauthorized",
                            "send {\"op\":\"auth\",\"token\":\"...\"} first",
                        ),
                        Some(p) => {
                            state.access.audit.record_forbidden(
                                p,
                                Permission::ReadMetrics,
                                &format!(
                                    "subscribe {}",
                                    msg.channel.as_deref().unwrap_or_default()
                                ),
                                None,
                            );
                            error_message(
                                "forbidden",
                                &ServerError::Forbidden(Permission::ReadMetrics).to_string(),
                            )
                        }
                    })
                }
                Ok(msg) => match (msg.op.as_str(), msg.channel.as_deref()) {
                    ("subscribe", Some(OVERVIEW)) => {
                        let sub = Subscription::new(&state);
                        let snapshot = sub.overview.snapshot_message();
                        subscription = Some(sub);
                        Some(snapshot)
                    }
                    ("unsubscribe", Some(OVERVIEW)) => {
                        subscription = None;
                        None
                    }
                    ("subscribe", Some(name)) if state.hub.permission(name).is_some() => {
                        let needs = state
                            .hub
                            .permission(name)
                            .unwrap_or(Permission::ReadMetrics);
                        match (&principal, state.hub.subscribe(name)) {
                            (Some(p), Some(sub)) if p.allows(needs) => {
                                channels.insert(
                                    name.to_string(),
                                    ChannelSubscription {
                                        seq: sub.seq,
                                        updates: sub.updates,
                                    },
                                );
                                Some(sub.snapshot)
                            }
                            _ => Some(error_message(
                                "forbidden",
                                &ServerError::Forbidden(needs).to_string(),
                            )),
                        }
                    }
                    ("unsubscribe", Some(name)) if channels.contains_key(name) => {
                        channels.remove(name);
                        None
                    }
                    ("subscribe" | "unsubscribe", channel) => Some(error_message(
                        "unknown_channel",
                        &format!("unknown channel {channel:?}"),
                    )),
                    (op, _) => Some(error_message("unknown_op", &format!("unknown op {op:?}"))),
                },
            },
            Event::Update(Ok((generation, update))) => match &mut subscription {
                Some(sub) if generation > sub.current => Some(sub.resync(&state)),
                Some(sub) if generation == sub.current => {
                    let changed = sub.overview.apply(&update);
                    if changed.is_empty() {
                        None
                    } else {
                        observe_latency(&state, &update);
                        Some(sub.overview.message("update", changed.into_iter()))
                    }
                }
                // Of a database no longer served.
                _ => None,
            },
            Event::Reset => subscription.as_mut().map(|sub| sub.resync(&state)),
            Event::Update(Err(RecvError::Lagged(n))) => {
                // Coalesce: what was missed is in the hot cache; send it whole.
                state.metrics.ws_dropped.inc_by(n);
                subscription.as_mut().map(|sub| sub.resync(&state))
            }
            Event::Update(Err(RecvError::Closed)) => {
                subscription = None;
                None
            }
            Event::Channel(name, Ok(change)) => match channels.get_mut(&name) {
                // Already in the snapshot the client has.
                Some(sub) if change.seq > sub.seq => {
                    sub.seq = change.seq;
                    Some(change.text.clone())
                }
                _ => None,
            },
            Event::Channel(name, Err(RecvError::Lagged(n))) => {
                // Coalesce: the newest value of every key, as a snapshot.
                state.metrics.ws_dropped.inc_by(n);
                match state.hub.subscribe(&name) {
                    Some(sub) => {
                        channels.insert(
                            name,
                            ChannelSubscription {
                                seq: sub.seq,
                                updates: sub.updates,
                            },
                        );
                        Some(sub.snapshot)
                    }
                    None => None,
                }
            }
            Event::Channel(name, Err(RecvError::Closed)) => {
                channels.remove(&name);
                None
            }
        };
        if let Some(text) = reply {
            match tokio::time::timeout(SEND_TIMEOUT, sink.send(text)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break SessionEnd::ClientLeft,
                Err(_) => {
                    tracing::info!("disconnecting a WebSocket client that stopped reading");
                    break SessionEnd::Slow;
                }
            }
        }
    };
    (sink, end)
}

fn observe_latency(state: &ServerState, update: &Update) {
    if update.newest_received_at.millis() > 0 {
        let ms = EventTime::now().millis() - update.newest_received_at.millis();
        if ms >= 0 {
            state
                .metrics
                .event_to_update_seconds
                .observe(ms as f64 / 1000.0);
        }
    }
}

/// The credential of an upgrade request: `Authorization: Bearer`, or a
/// `bearer.<token>` entry of `Sec-WebSocket-Protocol`.
fn upgrade_credential(headers: &HeaderMap) -> Option<String> {
    if let Some(token) = crate::auth::bearer(headers) {
        return Some(token.to_string());
    }
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix(BEARER_PROTOCOL_PREFIX))
        .map(str::to_string)
}

pub(crate) async fn ws_upgrade(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let principal = match upgrade_credential(&headers) {
        None => None,
        Some(credential) => match state.access.authenticate(&credential) {
            Ok(p) => Some(p),
            Err(e) => return e.into_response(),
        },
    };
    upgrade
        .protocols([PROTOCOL])
        .on_upgrade(move |socket| async move {
            let (sink, stream) = socket.split();
            let sink = sink.with(|text: String| {
                future::ready(Ok::<_, axum::Error>(Message::Text(text.into())))
            });
            let stream = stream
                .take_while(|m| {
                    future::ready(matches!(m, Ok(m) if !matches!(m, Message::Close(_))))
                })
                .filter_map(|m| {
                    future::ready(match m {
                        Ok(Message::Text(text)) => Some(text.to_string()),
                        _ => None,
                    })
                });
            let (sink, end) = run_session(state, principal, sink, Box::pin(stream)).await;
            if end == SessionEnd::Slow {
                // Said if the socket still takes it; a client that reads nothing
                // may not, and is dropped either way.
                let close = Message::Close(Some(CloseFrame {
                    code: SLOW_CLOSE_CODE,
                    reason: "slow".into(),
                }));
                let mut socket = sink.into_inner();
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.send(close)).await;
            }
        })
}
