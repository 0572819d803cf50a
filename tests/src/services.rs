//! The scale-out services (`tidemark ingest|process|serve`) as separate
//! processes over a real broker (tansu) and a real InfluxDB.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tidemark_model::EventTime;

pub use tidemark_log::kafka::testing::TansuServer;

use crate::{free_port, tidemark_bin, JsonApi, API_KEY};

/// One service process on a free port; killed on drop.
#[derive(Debug)]
pub struct Service {
    child: Option<Child>,
    pub base: String,
    pub port: u16,
    args: Vec<String>,
    log: PathBuf,
    /// An admin service token, for `serve` (whose routes need one).
    pub token: String,
}

impl Service {
    /// Starts `tidemark <args...> --listen 127.0.0.1:<free port>`, logging
    /// into `log_dir`, and waits until `/api/v1/health` answers.
    pub async fn start(args: &[String], log_dir: &Path) -> Service {
        let port = free_port();
        let name = args.first().map_or("service", String::as_str);
        let mut args = args.to_vec();
        let mut token = String::new();
        if name == "serve" {
            // Credentials of its own in the log folder, and a token for the
            // tests' requests.
            let access = [
                "--users-file".to_string(),
                log_dir
                    .join(format!("users-{port}.toml"))
                    .display()
                    .to_string(),
                "--audit-log".to_string(),
                log_dir
                    .join(format!("audit-{port}.ndjson"))
                    .display()
                    .to_string(),
            ];
            let secret = log_dir.join(format!("jwt-secret-{port}"));
            std::fs::write(&secret, format!("{:064x}", port as u128 * 7919)).expect("JWT key");
            let access: Vec<&str> = access.iter().map(String::as_str).collect();
            token = crate::create_token(&access);
            args.extend(access.iter().map(|s| s.to_string()));
            args.extend([
                "--jwt-secret-file".to_string(),
                secret.display().to_string(),
            ]);
        }
        let mut s = Service {
            child: None,
            base: format!("http://127.0.0.1:{port}"),
            port,
            args,
            log: log_dir.join(format!("{name}-{port}.log")),
            token,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("service log file");
        let child = Command::new(tidemark_bin())
            .args(&self.args)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            // `TIDEMARK_SERVICE_LOG=debug` shows more in the services' logs.
            .env(
                "RUST_LOG",
                std::env::var("TIDEMARK_SERVICE_LOG").unwrap_or_else(|_| "info".to_string()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tidemark starts");
        self.child = Some(child);
        let client = reqwest::Client::new();
        let health = format!("{}/api/v1/health", self.base);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if matches!(client.get(&health).send().await, Ok(r) if r.status().is_success()) {
                return;
            }
            if !self.is_running() || Instant::now() > deadline {
                panic!(
                    "`tidemark {}` did not become healthy:\n{}",
                    self.args.join(" "),
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the service logged so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown, no final checkpoint, no leaving the group.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        child.wait().expect("exit status")
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Posts events (a JSON array) to ingest: status, `Retry-After`, reply.
    pub async fn post(&self, events: &[Value]) -> (u16, Option<String>, Value) {
        let reply = reqwest::Client::new()
            .post(format!("{}/v1/events", self.base))
            .bearer_auth(API_KEY)
            .timeout(Duration::from_secs(60))
            .json(events)
            .send()
            .await
            .expect("ingest reachable");
        let status = reply.status().as_u16();
        let retry_after = reply
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (
            status,
            retry_after,
            reply.json().await.unwrap_or(Value::Null),
        )
    }

    pub async fn metrics_text(&self) -> String {
        reqwest::Client::new()
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }
}

impl JsonApi for Service {
    fn base(&self) -> &str {
        &self.base
    }

    fn token(&self) -> &str {
        &self.token
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Flags every service takes to reach the broker and the store.
pub fn backend_args(brokers: &str, influx_url: &str) -> Vec<String> {
    [
        "--kafka-brokers",
        brokers,
        "--influx-url",
        influx_url,
        "--influx-db",
        "tidemark",
    ]
    .map(String::from)
    .to_vec()
}

/// `tidemark ingest` arguments.
pub fn ingest_args(brokers: &str) -> Vec<String> {
    ["ingest", "--kafka-brokers", brokers, "--api-key", API_KEY]
        .map(String::from)
        .to_vec()
}

/// `tidemark process` arguments.
pub fn process_args(brokers: &str, influx_url: &str, data_dir: &Path) -> Vec<String> {
    let mut args = vec!["process".to_string()];
    args.extend(backend_args(brokers, influx_url));
    args.push("--data-dir".into());
    args.push(data_dir.display().to_string());
    args
}

/// `tidemark serve` arguments.
pub fn serve_args(brokers: &str, influx_url: &str) -> Vec<String> {
    let mut args = vec!["serve".to_string()];
    args.extend(backend_args(brokers, influx_url));
    args
}

/// A WebSocket client of the `overview` channel that keeps the newest state
/// of every window it was told about: the snapshot's data with each update
/// merged in (a JSON merge patch), as docs/api.md describes.
#[derive(Debug)]
pub struct OverviewClient {
    ws: WebSocket,
    /// The channel's data and the `seq` it is at, once a snapshot came.
    data: Option<(u64, Value)>,
    /// Window start (ms) → (final, events per event type).
    pub windows: BTreeMap<i64, (bool, BTreeMap<String, u64>)>,
}

/// A client's connection to the server's `/ws`.
pub type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects to `base`'s `/ws`, authenticates with `token` and subscribes to
/// `channel`; its messages are the caller's to read.
pub async fn subscribe(base: &str, token: &str, channel: &str) -> WebSocket {
    let url = format!("{}/ws", base.replacen("http://", "ws://", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket connects");
    for op in [
        serde_json::json!({"op": "auth", "token": token}),
        serde_json::json!({"op": "subscribe", "channel": channel}),
    ] {
        (ws.send(tokio_tungstenite::tungstenite::Message::text(
            op.to_string(),
        ))
        .await)
            .expect("auth and subscribe sent");
    }
    ws
}

const SUBSCRIBE_OVERVIEW: &str = r#"{"op":"subscribe","channel":"overview"}"#;

impl OverviewClient {
    /// Connects to `base`'s `/ws` with `token` and subscribes.
    pub async fn connect(base: &str, token: &str) -> OverviewClient {
        let ws = subscribe(base, token, "overview").await;
        OverviewClient {
            ws,
            data: None,
            windows: BTreeMap::new(),
        }
    }

    /// Reads messages until `done` holds for the windows seen, or `timeout`.
    pub async fn until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&BTreeMap<i64, (bool, BTreeMap<String, u64>)>) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(&self.windows) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let Ok(Some(Ok(msg))) = tokio::time::timeout(left, self.ws.next()).await else {
                continue;
            };
            let Ok(text) = msg.into_text() else { continue };
            let Ok(value) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if value["channel"] != "overview" {
                continue;
            }
            let seq = value["seq"].as_u64().unwrap_or_default();
            match (value["type"].as_str(), &mut self.data) {
                // A snapshot is the whole overview.
                (Some("snapshot"), data) => *data = Some((seq, value["data"].clone())),
                (Some("update"), Some((last, data))) if seq == *last + 1 => {
                    *last = seq;
                    merge_patch(data, &value["data"]);
                }
                // A gap: subscribing again gives a new snapshot.
                (Some("update"), _) => {
                    self.data = None;
                    self.ws
                        .send(tokio_tungstenite::tungstenite::Message::text(
                            SUBSCRIBE_OVERVIEW,
                        ))
                        .await
                        .expect("subscribe again");
                    continue;
                }
                _ => continue,
            }
            self.windows = self.data.as_ref().map(windows_of).unwrap_or_default();
        }
        true
    }
}

/// Window start (ms) → (final, events per event type) of the overview's data.
fn windows_of((_, data): &(u64, Value)) -> BTreeMap<i64, (bool, BTreeMap<String, u64>)> {
    let mut windows = BTreeMap::new();
    for w in data["windows"]
        .as_object()
        .into_iter()
        .flat_map(|w| w.values())
    {
        let Some(start) = w["window_start"].as_str().and_then(EventTime::parse) else {
            continue;
        };
        let traffic = w["traffic"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .collect();
        let is_final = w["final"].as_bool().unwrap_or(false);
        windows.insert(start.millis(), (is_final, traffic));
    }
    windows
}

/// Merges a channel update into its data (JSON merge patch, RFC 7396): an
/// object merges key by key, `null` removes a key, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(patch) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            if let Some(object) = target.as_object_mut() {
                for (key, value) in patch {
                    if value.is_null() {
                        object.remove(key);
                    } else {
                        merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}
