//! A throwaway Kafka-compatible broker for tests: [tansu] on a free loopback
//! port, storing into SQLite in a temporary directory, killed on drop.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tidemark_log::LogError> {
//! use tidemark_log::kafka::testing::TansuServer;
//! use tidemark_log::kafka::{KafkaConfig, KafkaLog};
//!
//! let server = TansuServer::start();
//! let log = KafkaLog::connect(KafkaConfig::new(&server.brokers)).await?;
//! # Ok(()) }
//! ```
//!
//! The binary is found as [`TansuServer::binary`] says; `scripts/setup.sh`
//! installs it (`cargo install tansu --locked --features libsql`).
//!
//! [tansu]: https://github.com/tansu-io/tansu

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// How long a broker may take to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const LOG_FILE: &str = "tansu.log";

/// A running tansu broker; stopped (killed) and its data deleted on drop.
#[derive(Debug)]
pub struct TansuServer {
    /// Bootstrap address, `127.0.0.1:<port>`.
    pub brokers: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl TansuServer {
    /// The tansu binary, looked up as `scripts/env.sh` does: `TANSU_BIN`,
    /// else where `scripts/setup.sh` installs it (`$TIDEMARK_TOOLS/bin`,
    /// by default `~/.cache/tidemark/tools/bin`), else `~/.cargo/bin`, else
    /// `PATH`; `None` if none exists.
    pub fn binary() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("TANSU_BIN") {
            return Some(PathBuf::from(p));
        }
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let tools = std::env::var_os("TIDEMARK_TOOLS")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".cache/tidemark/tools")));
        let cargo = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| home.map(|h| h.join(".cargo")));
        let path = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
            .unwrap_or_default();
        tools
            .into_iter()
            .chain(cargo)
            .map(|dir| dir.join("bin"))
            .chain(path)
            .map(|dir| dir.join("tansu"))
            .find(|p| p.is_file())
    }

    /// Starts a broker and waits until it answers metadata requests.
    ///
    /// # Panics
    /// If tansu is not installed or does not come up; the message says why
    /// (with the broker's own output).
    pub fn start() -> TansuServer {
        match TansuServer::try_start() {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`start`](Self::start), returning the reason instead of panicking.
    pub fn try_start() -> Result<TansuServer, String> {
        let bin = TansuServer::binary().ok_or(
            "tansu not found: run scripts/setup.sh, or set TANSU_BIN, or run \
             `cargo install tansu --locked --features libsql`",
        )?;
        // The port is free when we look; another process could take it before
        // tansu binds it, so try a few times.
        let mut last = String::new();
        for _ in 0..3 {
            match TansuServer::spawn(&bin) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn spawn(bin: &Path) -> Result<TansuServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("tansu-")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir for tansu: {e}"))?;
        let port = free_port()?;
        let child = TansuServer::run(bin, dir.path(), port)?;
        let mut server = TansuServer {
            brokers: format!("127.0.0.1:{port}"),
            child: Some(child),
            dir,
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn run(bin: &Path, dir: &Path, port: u16) -> Result<Child, String> {
        let url = format!("tcp://127.0.0.1:{port}");
        let log = File::options()
            .create(true)
            .append(true)
            .open(dir.join(LOG_FILE))
            .map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        Command::new(bin)
            .current_dir(dir)
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env(
                "RUST_LOG",
                std::env::var("TANSU_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))
    }

    /// Kills the broker (as a crash would); its data stays for [`restart`](Self::restart).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the broker if running and starts it again on the same port and
    /// storage, waiting until it answers.
    ///
    /// tansu 0.6 cannot take records from an idempotent producer that
    /// produced before the restart (its storage task panics), so clients of
    /// [`KafkaLog`](crate::kafka::KafkaLog) must not outlive the restart;
    /// fault tests with a live producer use librdkafka's mock cluster.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        let bin = TansuServer::binary().ok_or("tansu not found")?;
        let port: u16 = self
            .brokers
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or("no port in the broker address")?;
        self.child = Some(TansuServer::run(&bin, self.dir.path(), port)?);
        self.wait_ready()
    }

    /// Polls metadata until the broker answers (no fixed sleeps).
    fn wait_ready(&mut self) -> Result<(), String> {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "tansu-probe")
            .set("log_level", "0")
            .create()
            .map_err(|e| format!("cannot create a probe client: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait().ok().flatten(),
                None => return Err("tansu is stopped".to_string()),
            };
            if let Some(status) = exited {
                return Err(format!(
                    "tansu exited ({status}) before accepting connections:\n{}",
                    self.output()
                ));
            }
            match probe.fetch_metadata(None, Duration::from_millis(500)) {
                Ok(md) if !md.brokers().is_empty() => return Ok(()),
                _ if Instant::now() >= deadline => {
                    return Err(format!(
                        "tansu did not answer on {} within {START_TIMEOUT:?}:\n{}",
                        self.brokers,
                        self.output()
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The broker's output so far (stdout and stderr).
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(LOG_FILE)).unwrap_or_default()
    }

    /// The broker's working directory (its SQLite file and log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TansuServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}
