//! `tidemark bench fanout`: WebSocket fan-out of the overview channel.
//!
//! The real serving layer (`tidemark_ws_server`) runs in a child process of
//! its own, this binary re-executed with a hidden flag, so that its resident
//! memory is the server's alone: memory per connection is the growth of the
//! child's `VmRSS` from before the first client connected to after every
//! client holds its snapshot. This process opens `--clients` WebSocket
//! connections over loopback, subscribes each to `overview`, then asks the
//! child to publish `--updates` updates one at a time and times each from
//! the moment the child published it (its wall clock, which both processes
//! share) to the moment the last client received it.
//!
//! Each update carries its number as the event count of a traffic type of
//! its own (`fanout_seq`), which clients find in the text without parsing
//! it, so the measure does not depend on the overview's message layout.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tidemark_model::{EventTime, FieldValue, Point, Tier, Update};
use tidemark_ws_server::{Access, AccessConfig, Role, ServerState};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::{broadcast, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::args::BenchArgs;
use super::report::cpu_seconds;

/// The traffic type whose event count is the update's number.
const MARKER: &str = "fanout_seq";

/// Connections being opened at once: more overflows the listen backlog on
/// loopback and costs SYN retransmits (a second each), not throughput.
const CONNECT_CONCURRENCY: usize = 500;

/// How long every client may take to receive one update before the bench
/// counts the stragglers as undelivered and moves on.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// File descriptors either process needs beside one per connection (the
/// server holds 12 before its first client).
const SPARE_FILES: u64 = 64;

const WINDOW: Duration = Duration::from_secs(60);

/// The child's half: serves WebSocket clients on loopback and publishes an
/// update for each `publish <n>` line on stdin, answering with when it did.
/// Its first stdout line gives the address and a token; it ends at EOF.
pub async fn serve_child(args: &BenchArgs) -> anyhow::Result<()> {
    raise_open_files(args.clients as u64 + SPARE_FILES)?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(tidemark_tsdb_writer::sqlite::SqliteStore::open_in_memory()?);
    let access = Access::open(AccessConfig {
        users_file: dir.path().join("users.toml"),
        jwt_secret: rand::random::<[u8; 32]>().to_vec(),
        ingest_keys: Vec::new(),
        audit_log: dir.path().join("audit.ndjson"),
    })?;
    let (token, _) = access.users().create_token(Role::Analyst, "bench-fanout")?;
    let (updates, _) = broadcast::channel::<Update>(1024);
    let state = Arc::new(ServerState::new(
        store,
        updates.clone(),
        prometheus::Registry::new(),
        None,
        access,
    ));

    // A backlog as deep as the kernel allows (`somaxconn`), for the bursts
    // of connects.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let listener = socket.listen(4096)?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let server = tokio::spawn(tidemark_ws_server::serve(
        listener,
        tidemark_ws_server::router(state.clone()),
        stop.clone().cancelled_owned(),
    ));

    // A server that has run for a while holds the last hour: snapshots and
    // per-session state are measured at that size, not empty.
    let current = EventTime::now().floor(WINDOW);
    let warm = args.warm_windows.min(tidemark_ws_server::OVERVIEW_WINDOWS);
    for age in (1..=warm).rev() {
        let start = current.minus(WINDOW * age as u32);
        let _ = updates.send(window_update(start, true, 1_000 + age as u64, None));
    }
    let warm_deadline = Instant::now() + Duration::from_secs(10);
    while state.overview().windows().count() < warm {
        anyhow::ensure!(
            Instant::now() < warm_deadline,
            "the overview cache did not fill"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("{}", json!({ "addr": addr.to_string(), "token": token }));

    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = commands.next_line().await? {
        let Some(seq) = line
            .strip_prefix("publish ")
            .and_then(|n| n.trim().parse::<u64>().ok())
        else {
            anyhow::bail!("unknown command {line:?}");
        };
        let update = window_update(current, false, seq, Some(seq));
        let published_us = unix_micros();
        updates
            .send(update)
            .map_err(|_| anyhow::anyhow!("the server stopped following updates"))?;
        println!("{}", json!({ "seq": seq, "published_us": published_us }));
    }
    stop.cancel();
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(joined) => joined??,
        Err(_) => tracing::warn!("The fan-out server did not stop within 5 s"),
    }
    Ok(())
}

/// One overview window's traffic and active users, `scale` setting the
/// counts; with `marker`, also the [`MARKER`] type counting it.
fn window_update(start: EventTime, is_final: bool, scale: u64, marker: Option<u64>) -> Update {
    let traffic = |kind: &str, events: i64| {
        Point::new(
            "traffic",
            Tier::Rt,
            start,
            vec![("event_type".to_string(), kind.to_string())],
            vec![("events".to_string(), FieldValue::Int(events))],
        )
    };
    // The generator's mix, so messages are the size a real window's are.
    let mut points: Vec<Point> = tidemark_generator::MIX
        .iter()
        .map(|&(kind, share)| traffic(kind, i64::from(share) * 50 * scale as i64))
        .collect();
    if let Some(seq) = marker {
        points.push(traffic(MARKER, seq as i64));
    }
    points.push(Point::new(
        "active_users",
        Tier::Rt,
        start,
        Vec::new(),
        vec![("users".to_string(), FieldValue::Int(300 * scale as i64))],
    ));
    Update {
        window_start: start,
        is_final,
        newest_received_at: EventTime::now(),
        points,
    }
}

/// What clients report as they receive updates.
#[derive(Debug)]
struct Tracker {
    /// Clients that took their snapshot.
    subscribed: AtomicUsize,
    /// The clients an update has to reach (the subscribed ones).
    target: AtomicUsize,
    /// Per update (index = its number): clients that received it.
    received: Vec<AtomicUsize>,
    /// Per update: the latest receipt, µs since the Unix epoch.
    last_us: Vec<AtomicU64>,
    /// Told when an update reached its last client.
    complete: Notify,
}

impl Tracker {
    fn new(updates: usize) -> Tracker {
        Tracker {
            subscribed: AtomicUsize::new(0),
            target: AtomicUsize::new(usize::MAX),
            received: (0..=updates).map(|_| AtomicUsize::new(0)).collect(),
            last_us: (0..=updates).map(|_| AtomicU64::new(0)).collect(),
            complete: Notify::new(),
        }
    }

    fn received(&self, seq: usize, at_us: u64) {
        self.last_us[seq].fetch_max(at_us, Ordering::Relaxed);
        let count = self.received[seq].fetch_add(1, Ordering::AcqRel) + 1;
        if count == self.target.load(Ordering::Acquire) {
            self.complete.notify_one();
        }
    }
}

/// The number of the update in an overview message: the first number after
/// [`MARKER`], whichever way the message lays out a window's traffic
/// (`"fanout_seq":7` or `"event_type":"fanout_seq","events":7`).
fn marker_in(text: &str) -> Option<u64> {
    let at = text.find(MARKER)? + MARKER.len();
    let rest = &text[at..];
    let end_of_object = rest.find('}').unwrap_or(rest.len());
    let rest = &rest[..end_of_object];
    let digits_at = rest.find(|c: char| c.is_ascii_digit())?;
    let digits = &rest[digits_at..];
    let len = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..len].parse().ok()
}

/// Where one client connects, and with what.
#[derive(Debug, Clone)]
struct Target {
    url: String,
    /// The `Sec-WebSocket-Protocol` header: authenticated on the upgrade.
    protocols: HeaderValue,
}

type ClientSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects, subscribes to `overview` and waits for the snapshot.
async fn subscribe(target: &Target) -> anyhow::Result<ClientSocket> {
    let mut request = target.url.as_str().into_client_request()?;
    request
        .headers_mut()
        .insert(header::SEC_WEBSOCKET_PROTOCOL, target.protocols.clone());
    // Updates are a few hundred bytes, and the library zero-fills its whole
    // read buffer (128 KiB by default) before every read: a small one keeps
    // the clients' CPU, which the server shares, low.
    let config = WebSocketConfig::default().read_buffer_size(2 * 1024);
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
    ws.send(Message::text(
        r#"{"op":"subscribe","channel":"overview","id":"fanout"}"#,
    ))
    .await?;
    loop {
        let message = tokio::time::timeout(DELIVERY_TIMEOUT, ws.next())
            .await
            .context("no snapshot")?
            .context("closed before the snapshot")??;
        let Message::Text(text) = message else {
            continue;
        };
        anyhow::ensure!(
            !text.contains(r#""type":"error""#),
            "subscribing failed: {text}"
        );
        if text.contains("snapshot") {
            return Ok(ws);
        }
    }
}

/// One client: subscribes (a few tries; `permit` held until then), then
/// records when each update arrives until `stop`. Returns each update's
/// receipt time (µs since the Unix epoch, 0 if never), or `None` if it
/// never subscribed.
async fn client(
    target: Target,
    tracker: Arc<Tracker>,
    stop: CancellationToken,
    permit: OwnedSemaphorePermit,
) -> Option<Vec<u64>> {
    let mut ws = None;
    for attempt in 1..=3u64 {
        match subscribe(&target).await {
            Ok(socket) => {
                ws = Some(socket);
                break;
            }
            Err(e) if attempt == 3 => {
                tracing::warn!(error = %e, "A fan-out client could not subscribe");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200 * attempt)).await,
        }
    }
    // Counted before the permit goes back: all permits back means every
    // client that subscribed is counted.
    if ws.is_some() {
        tracker.subscribed.fetch_add(1, Ordering::AcqRel);
    }
    drop(permit);
    let mut ws = ws?;
    let updates = tracker.received.len() - 1;
    let mut receipts = vec![0u64; updates + 1];
    let mut newest = 0usize;
    // Made once: a fresh waiter per message would queue all clients on the
    // token's one lock and weigh on the measure.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let message = tokio::select! {
            _ = &mut stopped => break,
            message = ws.next() => message,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => break,
        };
        let now = unix_micros();
        // A message without the marker (a layout this bench does not know)
        // still counts, as the next update.
        let seq = marker_in(&text).map_or(newest + 1, |n| n as usize);
        if seq <= newest || seq > updates {
            continue;
        }
        // A coalesced snapshot (after lagging) stands for every update it
        // skipped over.
        for (missed, receipt) in receipts
            .iter_mut()
            .enumerate()
            .take(seq + 1)
            .skip(newest + 1)
        {
            *receipt = now;
            tracker.received(missed, now);
        }
        newest = seq;
    }
    Some(receipts)
}

/// The driver's half: starts the server child, connects the clients,
/// publishes and times the updates.
pub async fn run(args: &BenchArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    let open_files = raise_open_files(args.clients as u64 + SPARE_FILES)?;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["bench", "fanout", "--fanout-server"])
        .args(["--clients", &args.clients.to_string()])
        .args(["--warm-windows", &args.warm_windows.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the fan-out server")?;
    let pid = child.id().context("the fan-out server exited at once")?;
    let mut commands = child.stdin.take().context("no stdin")?;
    let mut replies = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let ready: Value = serde_json::from_str(
        &replies
            .next_line()
            .await?
            .context("the fan-out server exited before it was ready")?,
    )?;
    let (Some(addr), Some(token)) = (ready["addr"].as_str(), ready["token"].as_str()) else {
        anyhow::bail!("unexpected first line from the fan-out server: {ready}");
    };
    let target = Target {
        url: format!("ws://{addr}/ws"),
        protocols: HeaderValue::from_str(&format!("tidemark, bearer.{token}"))?,
    };
    let rss_before = rss_bytes(pid)?;

    let tracker = Arc::new(Tracker::new(args.updates));
    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut clients = tokio::task::JoinSet::new();
    let connect_started = Instant::now();
    for _ in 0..args.clients {
        let permit = gate.clone().acquire_owned().await?;
        clients.spawn(client(
            target.clone(),
            tracker.clone(),
            stop.clone(),
            permit,
        ));
    }
    // Every permit back: every client subscribed or gave up.
    drop(gate.acquire_many(CONNECT_CONCURRENCY as u32).await?);
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let subscribed = tracker.subscribed.load(Ordering::Acquire);
    anyhow::ensure!(subscribed > 0, "no client could subscribe");
    tracker.target.store(subscribed, Ordering::Release);
    // Let the sessions' last writes and the allocator settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_bytes(pid)?;

    let (server_cpu_before, own_cpu_before) = (cpu_seconds(pid), cpu_seconds(std::process::id()));
    let mut published_us = vec![0u64; args.updates + 1];
    let mut incomplete = 0usize;
    let started = Instant::now();
    for (seq, published) in published_us.iter_mut().enumerate().skip(1) {
        let tick = Instant::now();
        commands
            .write_all(format!("publish {seq}\n").as_bytes())
            .await?;
        commands.flush().await?;
        let reply: Value = serde_json::from_str(
            &replies
                .next_line()
                .await?
                .context("the fan-out server exited")?,
        )?;
        *published = reply["published_us"]
            .as_u64()
            .context("no publish time from the fan-out server")?;
        let deadline = tokio::time::Instant::from_std(tick + DELIVERY_TIMEOUT);
        while tracker.received[seq].load(Ordering::Acquire) < subscribed {
            if tokio::time::timeout_at(deadline, tracker.complete.notified())
                .await
                .is_err()
            {
                incomplete += 1;
                break;
            }
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(tick + args.update_interval)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let server_cpu = server_cpu_before.zip(cpu_seconds(pid)).map(|(b, a)| a - b);
    let own_cpu = own_cpu_before
        .zip(cpu_seconds(std::process::id()))
        .map(|(b, a)| a - b);
    let rss_end = rss_bytes(pid)?;

    stop.cancel();
    let mut message_ms = Vec::with_capacity(subscribed * args.updates);
    while let Some(done) = clients.join_next().await {
        for (seq, &at) in done?.iter().flatten().enumerate().skip(1) {
            if at > 0 {
                message_ms.push(at.saturating_sub(published_us[seq]) as f64 / 1000.0);
            }
        }
    }
    drop(commands);
    match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
        Ok(status) => anyhow::ensure!(status?.success(), "the fan-out server failed"),
        Err(_) => child.kill().await?,
    }

    let mut all_received_ms: Vec<f64> = (1..=args.updates)
        .filter(|&seq| tracker.received[seq].load(Ordering::Acquire) >= subscribed)
        .map(|seq| {
            let last = tracker.last_us[seq].load(Ordering::Acquire);
            last.saturating_sub(published_us[seq]) as f64 / 1000.0
        })
        .collect();
    let delivered = message_ms.len() as u64;
    let per_connection = (rss_after as f64 - rss_before as f64) / subscribed as f64;
    Ok(super::report::summary(
        "fanout",
        delivered,
        seconds,
        json!({
            "clients": subscribed,
            "clients_failed": args.clients - subscribed,
            "updates": args.updates,
            "update_interval_ms": args.update_interval.as_millis() as u64,
            "warm_windows": args.warm_windows.min(tidemark_ws_server::OVERVIEW_WINDOWS),
            "connect_seconds": round(connect_seconds, 3),
            "latency_ms": percentiles(&mut all_received_ms),
            "message_latency_ms": percentiles(&mut message_ms),
            "updates_incomplete": incomplete,
            "messages_undelivered": ((subscribed * args.updates) as u64).saturating_sub(delivered),
            "server_rss_bytes_before": rss_before,
            "server_rss_bytes_after": rss_after,
            "server_rss_bytes_end": rss_end,
            "bytes_per_connection": per_connection.round(),
            "server_cpu_seconds": server_cpu.map(|s| round(s, 2)),
            "client_cpu_seconds": own_cpu.map(|s| round(s, 2)),
            "open_files_limit": open_files,
        }),
    ))
}

fn round(v: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (v * scale).round() / scale
}

/// p50, p99 and max of `values` (sorted in place), null when empty.
fn percentiles(values: &mut [f64]) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| round(values[((values.len() - 1) as f64 * q).round() as usize], 1);
    json!({ "p50": at(0.50), "p99": at(0.99), "max": at(1.0) })
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Resident memory of process `pid` (Linux `VmRSS`).
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("no VmRSS in {path}"))?;
    Ok(kib * 1024)
}

/// Raises this process's open-file limit to at least `need` and returns it:
/// the hard limit too where the process may (root, `CAP_SYS_RESOURCE`).
fn raise_open_files(need: u64) -> anyhow::Result<u64> {
    use rlimit::Resource;
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE)?;
    if soft >= need {
        return Ok(soft);
    }
    if hard < need && rlimit::setrlimit(Resource::NOFILE, need, need).is_ok() {
        return Ok(need);
    }
    let got = rlimit::increase_nofile_limit(need)?;
    anyhow::ensure!(
        got >= need,
        "the open-file limit is {got} and cannot be raised past its hard limit here \
         (raising that takes CAP_SYS_RESOURCE in the initial user namespace), but \
         {need} are needed: raise the hard limit (`ulimit -Hn`) or use at most \
         --clients {}",
        got.saturating_sub(SPARE_FILES)
    );
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_is_found_in_either_layout() {
        let keyed = r#"{"type":"update","windows":[{"traffic":{"fanout_seq":17,"like":800}}]}"#;
        assert_eq!(marker_in(keyed), Some(17));
        let rows = r#"{"data":[{"event_type":"fanout_seq","events":4.0},{"x":9}]}"#;
        assert_eq!(marker_in(rows), Some(4));
        assert_eq!(marker_in(r#"{"traffic":{"like":3}}"#), None);
        assert_eq!(marker_in(r#"{"fanout_seq":null}, {"like":3}"#), None);
    }

    #[test]
    fn an_update_names_its_number_once() {
        let update = window_update(EventTime(60_000), false, 3, Some(3));
        let markers: Vec<_> = update
            .points
            .iter()
            .filter(|p| p.tag("event_type") == Some(MARKER))
            .collect();
        assert_eq!(markers.len(), 1);
        assert_eq!(markers[0].field("events"), Some(FieldValue::Int(3)));
    }
}
