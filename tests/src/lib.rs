//! Harness for tidemark's end-to-end tests: starts the `tidemark` binary and
//! real services (InfluxDB, a Kafka-compatible broker) on free loopback
//! ports, and stops them afterwards.

pub mod services;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod known;
pub mod observability;
pub mod workload;

pub use known::KnownEvents;

pub use tidemark_tsdb_writer::testing::InfluxServer;

/// The API key every test instance accepts.
pub const API_KEY: &str = "test-key";

/// The `tidemark` binary: `TIDEMARK_BIN`, else the workspace's build of it.
pub fn tidemark_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TIDEMARK_BIN") {
        return PathBuf::from(bin);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    for profile in ["release", "debug"] {
        let candidate = target.join(profile).join("tidemark");
        if candidate.exists() {
            return candidate;
        }
    }
    panic!("no tidemark binary: build it with `cargo build --release --bin tidemark` or set TIDEMARK_BIN");
}

/// `tidemark generate` posting to a running instance; killed on drop.
#[derive(Debug)]
pub struct Generator(Child);

impl Generator {
    /// Posts about `rate` events a second to `t`.
    pub fn start(t: &Tidemark, rate: u64) -> Generator {
        let child = Command::new(tidemark_bin())
            .args(generator_args(&t.base, rate, API_KEY))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("generator starts");
        Generator(child)
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The arguments of `tidemark generate` posting `rate` events a second to
/// the ingest API at `url` with `key`.
pub fn generator_args(url: &str, rate: u64, key: &str) -> Vec<String> {
    [
        "generate",
        "--rate",
        &rate.to_string(),
        "--url",
        url,
        "--key",
        key,
    ]
    .map(String::from)
    .to_vec()
}

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A `tidemark run` process on a free port; killed on drop.
#[derive(Debug)]
pub struct Tidemark {
    child: Option<Child>,
    pub base: String,
    pub port: u16,
    pub data_dir: PathBuf,
    extra_args: Vec<String>,
    /// Environment of the next start, beyond the test's own.
    env: Vec<(String, String)>,
    /// An admin service token of the data folder's users file.
    pub token: String,
}

impl Tidemark {
    /// Starts `tidemark run` over `data_dir` with `extra_args`, and waits until healthy.
    pub async fn start(data_dir: &Path, extra_args: &[&str]) -> Tidemark {
        let port = free_port();
        let mut t = Tidemark {
            child: None,
            base: format!("http://127.0.0.1:{port}"),
            port,
            data_dir: data_dir.to_path_buf(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            token: create_token(&["--data-dir", &data_dir.display().to_string()]),
        };
        t.spawn()
            .await
            .unwrap_or_else(|status| panic!("tidemark exited before it became healthy: {status}"));
        t
    }

    /// Starts `tidemark run` over `data_dir`, storing in `influx`'s database `tidemark`.
    pub async fn start_on_influx(data_dir: &Path, influx: &InfluxServer) -> Tidemark {
        Tidemark::start(
            data_dir,
            &["--influx-url", &influx.url, "--influx-db", "tidemark"],
        )
        .await
    }

    fn command(&self) -> Command {
        let mut command = Command::new(tidemark_bin());
        command
            .arg("run")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--api-key")
            .arg(API_KEY)
            .args(&self.extra_args)
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null());
        command
    }

    /// Starts the process and waits until it is healthy, or has ended.
    async fn spawn(&mut self) -> Result<(), std::process::ExitStatus> {
        self.child = Some(self.command().spawn().expect("tidemark starts"));
        self.healthy_or_exited().await
    }

    /// Waits until the process answers its health check, or ends.
    async fn healthy_or_exited(&mut self) -> Result<(), std::process::ExitStatus> {
        let client = reqwest::Client::new();
        let health = format!("{}/api/v1/health", self.base);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if matches!(client.get(&health).send().await, Ok(r) if r.status().is_success()) {
                return Ok(());
            }
            if let Some(status) = self.exit_status() {
                return Err(status);
            }
            assert!(
                Instant::now() < deadline,
                "tidemark did not become healthy within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process with SIGKILL (no shutdown, no final checkpoint).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops with SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        child.wait().expect("exit status")
    }

    /// Starts again on the same port and data folder.
    pub async fn restart(&mut self) {
        self.try_restart()
            .await
            .unwrap_or_else(|status| panic!("tidemark exited before it became healthy: {status}"));
    }

    /// Starts again like [`restart`](Self::restart), and returns how the
    /// process ended if it did before it became healthy.
    pub async fn try_restart(&mut self) -> Result<(), std::process::ExitStatus> {
        self.kill();
        self.spawn().await
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// How the process ended, once it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sets (or with `None` removes) an environment variable for the next
    /// [`restart`](Self::restart).
    pub fn set_env(&mut self, key: &str, value: Option<String>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            self.env.push((key.to_string(), value));
        }
    }

    /// Posts events like [`post`](Self::post), and returns the transport
    /// error when no answer came (the process died, say).
    pub async fn try_post(&self, events: &[Value]) -> Result<(u16, Value), reqwest::Error> {
        let reply = reqwest::Client::new()
            .post(format!("{}/v1/events", self.base))
            .bearer_auth(API_KEY)
            .json(events)
            .send()
            .await?;
        let status = reply.status().as_u16();
        Ok((status, reply.json().await.unwrap_or(Value::Null)))
    }

    /// Posts events (a JSON array) and returns status and reply.
    pub async fn post(&self, events: &[Value]) -> (u16, Value) {
        self.try_post(events).await.expect("ingest reachable")
    }

    /// GET a JSON API path.
    pub async fn get_json(&self, path_and_query: &str) -> Value {
        JsonApi::get_json(self, path_and_query).await
    }

    /// The Prometheus text of `/metrics`.
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

/// A process answering tidemark's REST API.
pub trait JsonApi {
    /// Base URL, `http://host:port`.
    fn base(&self) -> &str;

    /// The bearer token its protected routes take.
    fn token(&self) -> &str;

    /// GET a JSON API path.
    fn get_json(&self, path_and_query: &str) -> impl std::future::Future<Output = Value> {
        let request = reqwest::Client::new()
            .get(format!("{}{}", self.base(), path_and_query))
            .bearer_auth(self.token());
        async move {
            request
                .send()
                .await
                .expect("API reachable")
                .json()
                .await
                .expect("JSON answer")
        }
    }

    /// POST a JSON body to an API path: the status and the JSON answer.
    fn post_json(
        &self,
        path: &str,
        body: &Value,
    ) -> impl std::future::Future<Output = (u16, Value)> {
        let request = reqwest::Client::new()
            .post(format!("{}{}", self.base(), path))
            .bearer_auth(self.token())
            .json(body);
        async move {
            let reply = request.send().await.expect("API reachable");
            let status = reply.status().as_u16();
            (status, reply.json().await.expect("JSON answer"))
        }
    }
}

impl JsonApi for Tidemark {
    fn base(&self) -> &str {
        &self.base
    }

    fn token(&self) -> &str {
        &self.token
    }
}

/// An admin service token made by `tidemark token create ARGS` (which name
/// the users file).
pub fn create_token(args: &[&str]) -> String {
    let out = Command::new(tidemark_bin())
        .args(["token", "create", "--role", "admin", "--name", "tests"])
        .args(args)
        .output()
        .expect("tidemark token create runs");
    assert!(
        out.status.success(),
        "tidemark token create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("the token is text")
        .trim()
        .to_string()
}

impl Drop for Tidemark {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `tidemark replay --data-dir DATA_DIR ARGS`.
pub fn replay(data_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(tidemark_bin())
        .arg("replay")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("tidemark replay runs")
}

/// Runs `tidemark promote ARGS --data-dir DATA_DIR` and asserts it succeeded.
pub fn promote(data_dir: &Path, args: &[&str]) {
    let out = Command::new(tidemark_bin())
        .arg("promote")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("tidemark promote runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A replay's JSON summary: the last line of its stdout.
pub fn replay_summary(out: &std::process::Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "no summary ({e}); stdout:\n{text}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Posts the workload to live and waits until live has processed it all:
/// until the combined watermark reached the closing batch (the profile
/// partitions hold it back until they count as idle, after 10 s).
pub async fn post_and_settle(t: &Tidemark, workload: &workload::Workload) {
    for batch in &workload.batches {
        let (status, reply) = t.post(batch).await;
        assert_eq!(status, 202, "{reply}");
    }
    settle(t, workload).await;
}

/// Waits until live has processed the whole (posted) workload: until the
/// combined watermark reached its closing batch.
pub async fn settle(t: &Tidemark, workload: &workload::Workload) {
    settle_at(t, workload.hour + 105 * 60_000 - 5_000 - 1_000).await;
}

/// Waits until live's combined watermark reached `watermark` (ms).
pub async fn settle_at(t: &Tidemark, watermark: i64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let text = t.metrics_text().await;
        let seconds = metric_value(&text, "tidemark_processor_watermark_timestamp_seconds", "");
        // The gauge stays 0 until the first combined watermark.
        if seconds > 0.0 && (seconds * 1000.0) as i64 >= watermark {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "live's watermark did not reach {watermark}: at {seconds} s"
        );
    }
}

/// Polls `probe` every 100 ms until it holds; panics after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_until_else(what, timeout, probe, || async { String::new() }).await;
}

/// [`wait_until`], and on the timeout the panic says what `explain` finds
/// then (the services' state and logs), so a failure shows its reason.
pub async fn wait_until_else<F, Fut, E, EFut>(
    what: &str,
    timeout: Duration,
    mut probe: F,
    explain: E,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
    E: FnOnce() -> EFut,
    EFut: std::future::Future<Output = String>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if probe().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "timed out after {timeout:?} waiting for {what}\n{}",
        explain().await
    );
}

/// The value of a Prometheus sample whose name and labels contain all of `parts`.
pub fn metric_value(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A random test's seed: `var` if set (to repeat a run), else the clock.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// The stored points of every pipeline whose windows lie inside the hour
/// starting at `hour`, from the SQLite store at `path`.
pub async fn hour_points(path: &Path, hour: i64) -> Vec<tidemark_model::Point> {
    let store = tidemark_tsdb_writer::sqlite::SqliteStore::open(path).unwrap();
    let measurements = ["traffic", "active_users", "engagement", "trending", "ads"];
    let (from, to) = (
        tidemark_model::EventTime(hour),
        tidemark_model::EventTime(hour + 3_600_000),
    );
    tidemark_replay::verify::stored_points(&store, &measurements, from, to)
        .await
        .unwrap()
}
