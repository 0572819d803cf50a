//! A real Prometheus (Debian's `prometheus`) on a free loopback port, started
//! from a configuration text, with its storage in a temporary folder.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{free_port, wait_until};

/// A `prometheus` process; killed on drop.
#[derive(Debug)]
pub struct PrometheusServer {
    child: Child,
    /// Base URL, `http://127.0.0.1:port`.
    pub url: String,
    /// Holds the configuration and the TSDB.
    pub dir: tempfile::TempDir,
}

impl PrometheusServer {
    /// Starts Prometheus with `config` (the text of a `prometheus.yml`) and
    /// waits until it is ready. Files the configuration names relative to
    /// itself (rule files) can be placed with [`PrometheusServer::start_with_files`].
    pub async fn start(config: &str) -> PrometheusServer {
        Self::start_with_files(config, &[]).await
    }

    /// Like [`PrometheusServer::start`], with `files` (name, content) written
    /// next to the configuration first, so `rule_files` can name them.
    pub async fn start_with_files(config: &str, files: &[(&str, &str)]) -> PrometheusServer {
        let bin = std::env::var_os("PROMETHEUS_BIN").unwrap_or_else(|| "prometheus".into());
        let dir = tempfile::tempdir().expect("a temporary folder");
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).expect("write a Prometheus file");
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{bin:?} does not start ({e}): install it with scripts/setup.sh")
            });
        let server = PrometheusServer {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let client = reqwest::Client::new();
        let ready = format!("{}/-/ready", server.url);
        wait_until(
            "Prometheus to become ready",
            Duration::from_secs(30),
            || {
                let request = client.get(&ready).send();
                async move { matches!(request.await, Ok(r) if r.status().is_success()) }
            },
        )
        .await;
        server
    }

    /// Runs an instant query: the JSON answer's `data` (`resultType`, `result`).
    /// Panics with Prometheus' error text when the query is refused.
    pub async fn query(&self, expr: &str) -> Value {
        let reply: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .expect("Prometheus reachable")
            .json()
            .await
            .expect("Prometheus answers JSON");
        assert_eq!(
            reply["status"], "success",
            "Prometheus refused {expr}: {reply}"
        );
        reply["data"].clone()
    }

    /// The instant query's result vector (empty when nothing matched).
    pub async fn query_vector(&self, expr: &str) -> Vec<Value> {
        self.query(expr).await["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Prometheus' own log (stderr), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
