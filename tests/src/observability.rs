//! Prometheus, Alertmanager and the webhook receiver of
//! `dashboards/prometheus` as real processes on free loopback ports, for the
//! tests of the alert rules and the operations dashboard.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{free_port, wait_until};

/// The folder of the shipped Prometheus and Alertmanager files.
pub fn prometheus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/prometheus")
}

/// A child process with its own folder and log; killed on drop.
#[derive(Debug)]
struct Daemon {
    child: Child,
    log: PathBuf,
    // Declared last so the folder goes after the process.
    _dir: tempfile::TempDir,
}

/// How a starting server shows it is ready: a 2xx answer to this request.
enum Ready<'a> {
    Get(&'a str),
    /// For a server that only takes POSTs: an empty JSON object.
    Post(&'a str),
}

impl Daemon {
    /// Runs `program args` in `dir` (so they may name its files) and waits
    /// until it is `ready`.
    async fn start(
        program: &str,
        args: &[String],
        dir: tempfile::TempDir,
        ready: Ready<'_>,
    ) -> Daemon {
        let log = dir.path().join("output.log");
        let out = std::fs::File::create(&log).expect("a log file");
        let child = Command::new(program)
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {program}: {e}; scripts/setup.sh installs it")
            });
        let daemon = Daemon {
            child,
            log,
            _dir: dir,
        };
        let client = reqwest::Client::new();
        let what = format!("{program} to start");
        wait_until(&what, Duration::from_secs(60), || {
            let request = match ready {
                Ready::Get(url) => client.get(url),
                Ready::Post(url) => client.post(url).body("{}"),
            };
            async move { matches!(request.send().await, Ok(r) if r.status().is_success()) }
        })
        .await;
        daemon
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get_json(url: &str) -> Value {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("{url}: not JSON: {e}"))
}

/// A `prometheus` server.
#[derive(Debug)]
pub struct PrometheusServer {
    pub url: String,
    daemon: Daemon,
}

impl PrometheusServer {
    /// Starts Prometheus with `config` as its `prometheus.yml` and `files`
    /// (relative path, content) beside it, which the config may name.
    pub async fn start(config: &str, files: &[(&str, &str)]) -> PrometheusServer {
        let dir = tempfile::tempdir().expect("a folder for Prometheus");
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("config written");
        for (path, content) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().expect("a file in a folder")).expect("folder");
            std::fs::write(path, content).expect("file written");
        }
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let args = [
            "--config.file=prometheus.yml".to_string(),
            "--storage.tsdb.path=data".to_string(),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--log.level=warn".to_string(),
        ];
        let daemon = Daemon::start(
            "prometheus",
            &args,
            dir,
            Ready::Get(&format!("{url}/-/ready")),
        )
        .await;
        PrometheusServer { url, daemon }
    }

    /// An instant query's answer (`data`: `resultType` and `result`);
    /// panics with Prometheus' message when it refuses the query.
    pub async fn query_data(&self, expr: &str) -> Value {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.url),
            &[("query", expr)],
        )
        .expect("a query URL");
        let reply = get_json(url.as_str()).await;
        assert_eq!(
            reply["status"], "success",
            "Prometheus refused {expr}: {reply}"
        );
        reply["data"].clone()
    }

    /// An instant query's result vector (empty when nothing matched).
    pub async fn query(&self, expr: &str) -> Vec<Value> {
        self.query_data(expr).await["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Each scrape target's URL, health and last error, for failure messages.
    pub async fn targets(&self) -> String {
        let reply = get_json(&format!("{}/api/v1/targets", self.url)).await;
        let targets = reply["data"]["activeTargets"].as_array().cloned();
        targets
            .unwrap_or_default()
            .iter()
            .map(|t| format!("{} {} {}", t["scrapeUrl"], t["health"], t["lastError"]))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Prometheus' own log, for failure messages.
    pub fn output(&self) -> String {
        self.daemon.output()
    }
}

/// A `prometheus-alertmanager` server (clustering off).
#[derive(Debug)]
pub struct AlertmanagerServer {
    pub url: String,
    daemon: Daemon,
}

impl AlertmanagerServer {
    pub async fn start(config: &str) -> AlertmanagerServer {
        let dir = tempfile::tempdir().expect("a folder for Alertmanager");
        std::fs::write(dir.path().join("alertmanager.yml"), config).expect("config written");
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let args = [
            "--config.file=alertmanager.yml".to_string(),
            "--storage.path=data".to_string(),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--cluster.listen-address=".to_string(),
            "--log.level=warn".to_string(),
        ];
        let daemon = Daemon::start(
            "prometheus-alertmanager",
            &args,
            dir,
            Ready::Get(&format!("{url}/-/ready")),
        )
        .await;
        AlertmanagerServer { url, daemon }
    }

    /// The alerts Alertmanager holds (`GET /api/v2/alerts`).
    pub async fn alerts(&self) -> Vec<Value> {
        let reply = get_json(&format!("{}/api/v2/alerts", self.url)).await;
        reply.as_array().cloned().unwrap_or_default()
    }

    pub fn output(&self) -> String {
        self.daemon.output()
    }
}

/// `dashboards/prometheus/alert-receiver.py`: the webhook Alertmanager notifies.
#[derive(Debug)]
pub struct AlertReceiver {
    pub url: String,
    daemon: Daemon,
}

impl AlertReceiver {
    pub async fn start() -> AlertReceiver {
        let dir = tempfile::tempdir().expect("a folder for the receiver");
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let script = prometheus_dir().join("alert-receiver.py");
        let args = [
            script.display().to_string(),
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
        ];
        let daemon = Daemon::start("python3", &args, dir, Ready::Post(&url)).await;
        AlertReceiver { url, daemon }
    }

    /// The notifications received so far, one per alert.
    pub fn notifications(&self) -> Vec<Value> {
        self.daemon
            .output()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("alertname").is_some())
            .collect()
    }
}
