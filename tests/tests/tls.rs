//! TLS on every listener: `tidemark run`, and `ingest`, `process` and
//! `serve` over a real broker and InfluxDB, with `--tls-cert` and
//! `--tls-key` made here by a private CA. Real clients (reqwest,
//! tokio-tungstenite) verify the certificate; a plain-HTTP client gets a
//! clear answer and the server goes on.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tidemark_tests::services::{ingest_args, process_args, serve_args, TansuServer};
use tidemark_tests::{create_token, free_port, tidemark_bin, InfluxServer, API_KEY};
use tidemark_tsdb_writer::testing::TestCertificates;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;

const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

/// A tidemark process on a TLS port; killed on drop.
struct TlsProcess {
    child: Child,
    base: String,
    port: u16,
}

impl TlsProcess {
    /// Starts `tidemark <args> --listen <free port> --tls-cert --tls-key`
    /// and waits until `/api/v1/health` answers over HTTPS.
    async fn start(args: &[String], certs: &TestCertificates, log: &Path) -> TlsProcess {
        let port = free_port();
        let child = Command::new(tidemark_bin())
            .args(args)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--tls-cert")
            .arg(&certs.cert)
            .arg("--tls-key")
            .arg(&certs.key)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("tidemark starts");
        let mut process = TlsProcess {
            child,
            base: format!("https://127.0.0.1:{port}"),
            port,
        };
        let client = trusting(certs);
        let health = format!("{}/api/v1/health", process.base);
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            if matches!(client.get(&health).send().await, Ok(r) if r.status().is_success()) {
                return process;
            }
            let exited = process.child.try_wait().expect("status").is_some();
            if exited || Instant::now() > deadline {
                panic!(
                    "`tidemark {}` did not become healthy over HTTPS:\n{}",
                    args.join(" "),
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for TlsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTPS client that trusts the test CA (and nothing else).
fn trusting(certs: &TestCertificates) -> reqwest::Client {
    let pem = std::fs::read(&certs.ca).expect("CA file");
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA certificate"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Asserts that `base` refuses a plain-HTTP request with a 400 that says
/// to use https, and still serves HTTPS afterwards.
async fn plain_http_is_refused_cleanly(process: &TlsProcess, certs: &TestCertificates) {
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/api/v1/health", process.port))
        .send()
        .await
        .expect("the plain request gets an answer");
    assert_eq!(plain.status(), 400);
    let text = plain.text().await.unwrap();
    assert!(text.contains("https://"), "{text}");
    let again = trusting(certs)
        .get(format!("{}/api/v1/health", process.base))
        .send()
        .await
        .expect("HTTPS still served");
    assert!(again.status().is_success());
}

fn rustls_client(certs: &TestCertificates) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(&certs.ca).expect("CA file");
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::test]
async fn run_serves_https_and_wss_only() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCertificates::write(dir.path()).unwrap();
    let data_dir = dir.path().join("data");
    let token = create_token(&["--data-dir", &data_dir.display().to_string()]);
    let args: Vec<String> = [
        "run",
        "--data-dir",
        &data_dir.display().to_string(),
        "--api-key",
        API_KEY,
    ]
    .map(String::from)
    .to_vec();
    let run = TlsProcess::start(&args, &certs, &dir.path().join("run.log")).await;

    // A client that does not trust the CA is refused by its own check.
    let unverified = reqwest::Client::new()
        .get(format!("{}/api/v1/health", run.base))
        .send()
        .await;
    assert!(unverified.is_err(), "{unverified:?}");

    // A client that connects and never speaks holds up nobody.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", run.port))
        .await
        .unwrap();

    let client = trusting(&certs);
    let now = tidemark_model::EventTime::now().millis();
    let events: Vec<Value> = (0..3)
        .map(|i| {
            json!({"event_id": format!("tls-{i}"), "event_type": "view", "user_id": "u1",
                   "post_id": "p1", "timestamp": now, "session_id": "s1"})
        })
        .collect();
    let posted = client
        .post(format!("{}/v1/events", run.base))
        .bearer_auth(API_KEY)
        .json(&events)
        .send()
        .await
        .expect("ingest over HTTPS");
    assert_eq!(posted.status(), 202, "{}", posted.text().await.unwrap());

    // WSS: the overview channel's snapshot arrives over a verified connection.
    let url = format!("wss://127.0.0.1:{}/ws", run.port);
    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        url,
        None,
        false,
        Some(tokio_tungstenite::Connector::Rustls(rustls_client(&certs))),
    )
    .await
    .expect("WSS connects");
    for message in [
        json!({"op": "auth", "token": token}),
        json!({"op": "subscribe", "channel": "overview"}),
    ] {
        ws.send(Message::text(message.to_string())).await.unwrap();
    }
    let snapshot = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = ws.next().await {
            let Ok(text) = message.expect("WSS message").into_text() else {
                continue;
            };
            let value: Value = serde_json::from_str(&text).unwrap_or_default();
            if value["channel"] == "overview" && value["type"] == "snapshot" {
                return value;
            }
        }
        panic!("WSS closed before the snapshot");
    })
    .await
    .expect("the overview snapshot over WSS");
    assert!(snapshot["seq"].is_u64(), "{snapshot}");

    plain_http_is_refused_cleanly(&run, &certs).await;
}

#[tokio::test]
async fn the_scale_out_services_listen_on_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCertificates::write(dir.path()).unwrap();
    let tansu = TansuServer::start();
    // InfluxDB over https too, trusted through --influx-ca.
    let influx = InfluxServer::start_tls(&certs.cert, &certs.key).expect("influxd starts");
    let ca = certs.ca.display().to_string();
    let with_ca = |mut args: Vec<String>| {
        args.extend(["--influx-ca".to_string(), ca.clone()]);
        args
    };
    let ingest = TlsProcess::start(
        &ingest_args(&tansu.brokers),
        &certs,
        &dir.path().join("ingest.log"),
    )
    .await;
    let process = TlsProcess::start(
        &with_ca(process_args(
            &tansu.brokers,
            &influx.url,
            &dir.path().join("process"),
        )),
        &certs,
        &dir.path().join("process.log"),
    )
    .await;
    let mut serve = with_ca(serve_args(&tansu.brokers, &influx.url));
    serve.extend(
        [
            "--users-file",
            &dir.path().join("users.toml").display().to_string(),
            "--audit-log",
            &dir.path().join("audit.ndjson").display().to_string(),
        ]
        .map(String::from),
    );
    let serve = TlsProcess::start(&serve, &certs, &dir.path().join("serve.log")).await;
    for service in [&ingest, &process, &serve] {
        plain_http_is_refused_cleanly(service, &certs).await;
    }
    // serve reads InfluxDB over https: its health names the database.
    let health: Value = trusting(&certs)
        .get(format!("{}/api/v1/health", serve.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["store"], "influxdb", "{health}");
}
