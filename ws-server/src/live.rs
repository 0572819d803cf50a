//! WebSocket sessions: authentication, subscriptions to the hub's
//! channels, and sending what they publish.
//!
//! A session forwards each channel's snapshot and then its numbered
//! changes, already serialised by the hub; a change the client has in its
//! snapshot (an equal or lower `seq`) is skipped. A session that falls more
//! than the channel's backlog behind starts over from a new snapshot (its
//! pending changes coalesced), and one whose client cannot take a message
//! for [`SEND_TIMEOUT`] ends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse as _, Response};
use futures::{future, Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tidemark_model::EventTime;
use tokio::sync::broadcast::error::RecvError;

use crate::auth::{Permission, Principal, Role};
use crate::channels::{Published, Refused, Subscribed};
use crate::{ServerError, ServerState};

/// A client that cannot take a message for this long is disconnected, so it
/// never holds on to server resources indefinitely.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a slow client's close frame may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A client only sends small control messages, so its read buffer can be
/// small; the WebSocket library's default (128 KiB, allocated up front)
/// would make it most of a connection's memory.
const READ_BUFFER_BYTES: usize = 4 * 1024;

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
    /// A change of one of the channels subscribed to.
    Channel(Arc<str>, Result<Arc<Published>, RecvError>),
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

impl ChannelSubscription {
    /// The subscription and the snapshot message to send first.
    fn start(sub: Subscribed) -> (ChannelSubscription, String) {
        let subscription = ChannelSubscription {
            seq: sub.seq,
            updates: sub.updates,
        };
        (subscription, sub.snapshot)
    }
}

/// The channels a session follows, by name. The name is shared so that
/// naming the channel of each change costs no allocation.
type Subscriptions = BTreeMap<Arc<str>, ChannelSubscription>;

/// The next change of any channel subscribed to; never, with none.
async fn next_published(
    subscriptions: &mut Subscriptions,
) -> (Arc<str>, Result<Arc<Published>, RecvError>) {
    if subscriptions.len() == 1 {
        // Most sessions follow one channel: wait on it without the boxed
        // futures a selection over several needs.
        let (name, sub) = subscriptions.iter_mut().next().expect("one subscription");
        return (name.clone(), sub.updates.recv().await);
    }
    if subscriptions.is_empty() {
        return future::pending().await;
    }
    let receives = subscriptions
        .iter_mut()
        .map(|(name, sub)| Box::pin(async move { (name.clone(), sub.updates.recv().await) }));
    future::select_all(receives).await.0
}

/// Sends `text`, giving up after [`SEND_TIMEOUT`]; `None` on timeout. The
/// timer is only armed when the socket does not take the message at once,
/// which spares a timer per message to every client that keeps up.
async fn send_in_time<Si: Sink<Utf8Bytes> + Unpin>(
    sink: &mut Si,
    text: Utf8Bytes,
) -> Option<Result<(), Si::Error>> {
    let mut send = sink.send(text);
    match futures::poll!(&mut send) {
        std::task::Poll::Ready(sent) => Some(sent),
        std::task::Poll::Pending => tokio::time::timeout(SEND_TIMEOUT, send).await.ok(),
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
    Si: Sink<Utf8Bytes> + Unpin,
    St: Stream<Item = String> + Unpin,
{
    state.metrics.ws_clients.inc();
    let _gauge = ClientGauge(state.metrics.ws_clients.clone());
    let mut channels = Subscriptions::new();
    let end = loop {
        let event = tokio::select! {
            msg = incoming.next() => Event::Client(msg),
            (name, change) = next_published(&mut channels) => Event::Channel(name, change),
        };
        // What to send, and the ingest time of the events it carries.
        let reply: Option<(Utf8Bytes, EventTime)> = match event {
            Event::Client(None) => break SessionEnd::ClientLeft,
            Event::Client(Some(text)) => {
                client_message(&state, &mut principal, &mut channels, &text)
                    .map(|text| (text.into(), EventTime(0)))
            }
            Event::Channel(name, Ok(change)) => match channels.get_mut(&name) {
                // Already in the snapshot the client has.
                Some(sub) if change.seq > sub.seq => {
                    sub.seq = change.seq;
                    Some((change.text.clone(), change.received_at))
                }
                _ => None,
            },
            Event::Channel(name, Err(RecvError::Lagged(n))) => {
                // Coalesce: the newest value of every key, as a snapshot.
                state.metrics.ws_dropped.inc_by(n);
                let allowed = |p| principal.as_ref().is_some_and(|pr| pr.allows(p));
                match state.hub.subscribe(&name, allowed) {
                    Ok(sub) => {
                        let (sub, snapshot) = ChannelSubscription::start(sub);
                        channels.insert(name, sub);
                        Some((snapshot.into(), EventTime(0)))
                    }
                    Err(_) => {
                        channels.remove(&name);
                        None
                    }
                }
            }
            Event::Channel(name, Err(RecvError::Closed)) => {
                channels.remove(&name);
                None
            }
        };
        if let Some((text, received_at)) = reply {
            match send_in_time(&mut sink, text).await {
                Some(Ok(())) => observe_latency(&state, received_at),
                Some(Err(_)) => break SessionEnd::ClientLeft,
                None => {
                    tracing::info!("disconnecting a WebSocket client that stopped reading");
                    state.metrics.ws_slow_disconnects.inc();
                    break SessionEnd::Slow;
                }
            }
        }
    };
    (sink, end)
}

/// Handles one message of the client; the answer, if any.
fn client_message(
    state: &ServerState,
    principal: &mut Option<Principal>,
    channels: &mut Subscriptions,
    text: &str,
) -> Option<String> {
    let msg = match serde_json::from_str::<ClientMessage>(text) {
        Ok(msg) => msg,
        Err(e) => {
            return Some(error_message(
                "bad_message",
                &format!("invalid message: {e}"),
            ))
        }
    };
    let forbidden = |p: &Principal, needs: Permission, channel: &str| {
        state
            .access
            .audit
            .record_forbidden(p, needs, &format!("subscribe {channel}"), None);
        error_message("forbidden", &ServerError::Forbidden(needs).to_string())
    };
    let unknown = |channel: Option<&str>| {
        error_message("unknown_channel", &format!("unknown channel {channel:?}"))
    };
    match (msg.op.as_str(), msg.channel.as_deref()) {
        ("auth", _) => match state
            .access
            .authenticate(msg.token.as_deref().unwrap_or_default())
        {
            Ok(p) => {
                let role = p.role().map(Role::name);
                *principal = Some(p);
                Some(json!({ "type": "authenticated", "role": role }).to_string())
            }
            Err(e) => Some(error_message(e.code(), &e.to_string())),
        },
        ("subscribe", channel) => {
            let Some(p) = principal.as_ref() else {
                return Some(error_message(
                    "unauthorized",
                    "send {\"op\":\"auth\",\"token\":\"...\"} first",
                ));
            };
            if !p.allows(Permission::ReadMetrics) {
                return Some(forbidden(
                    p,
                    Permission::ReadMetrics,
                    channel.unwrap_or_default(),
                ));
            }
            let Some(name) = channel else {
                return Some(unknown(None));
            };
            match state.hub.subscribe(name, |needs| p.allows(needs)) {
                Ok(sub) => {
                    let (sub, snapshot) = ChannelSubscription::start(sub);
                    channels.insert(name.into(), sub);
                    Some(snapshot)
                }
                Err(Refused::Forbidden(needs)) => Some(forbidden(p, needs, name)),
                Err(Refused::Unknown) => Some(unknown(Some(name))),
            }
        }
        ("unsubscribe", channel) => match channel {
            Some(name) if channels.remove(name).is_some() || state.hub.knows(name) => None,
            _ => Some(unknown(channel)),
        },
        (op, _) => Some(error_message("unknown_op", &format!("unknown op {op:?}"))),
    }
}

/// Event-to-update latency: from ingest receiving the newest event of a
/// change to the change having been handed to the client's socket.
fn observe_latency(state: &ServerState, received_at: EventTime) {
    if received_at.millis() > 0 {
        let ms = EventTime::now().millis() - received_at.millis();
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
        .read_buffer_size(READ_BUFFER_BYTES)
        // Every message is flushed as it is sent; nothing waits to batch.
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            let (sink, stream) = socket.split();
            let sink = sink
                .with(|text: Utf8Bytes| future::ready(Ok::<_, axum::Error>(Message::Text(text))));
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
