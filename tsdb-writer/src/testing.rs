//! Test support: a throwaway InfluxDB 1.x server (`influxd`) on free local
//! ports, and certificates for the TLS tests.
//!
//! Enabled by the `testing` feature so other crates' tests can reuse it. The
//! binary is looked up as `$TIDEMARK_INFLUXD`, else `influxd` on the `PATH`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server may take to answer `/ping`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `influxd` with its own data directory; killed on drop.
#[derive(Debug)]
pub struct InfluxServer {
    /// Base URL of the HTTP API, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    http_addr: SocketAddr,
    config_path: PathBuf,
    /// Whether the server speaks HTTPS only.
    tls: bool,
    child: Option<Child>,
    // Declared last so the directory is removed after the process is gone.
    dir: tempfile::TempDir,
}

fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot bind a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

fn binary() -> String {
    std::env::var("TIDEMARK_INFLUXD").unwrap_or_else(|_| "influxd".to_string())
}

fn toml_path(p: &Path) -> String {
    p.display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
}

impl InfluxServer {
    /// Starts a fresh server and waits until `/ping` answers 204.
    pub fn start() -> Result<InfluxServer, String> {
        InfluxServer::start_with(None)
    }

    /// Starts a fresh server that speaks HTTPS only, with the PEM
    /// certificate and key given, and waits until it answers.
    pub fn start_tls(cert: &Path, key: &Path) -> Result<InfluxServer, String> {
        InfluxServer::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> Result<InfluxServer, String> {
        // A free port can be taken by another process between the probe and
        // influxd's bind (tests run in parallel): try fresh ports then.
        let mut attempts = 0;
        loop {
            match InfluxServer::start_on_free_ports(tls) {
                Err(e) if e.contains("address already in use") && attempts < 4 => attempts += 1,
                result => return result,
            }
        }
    }

    fn start_on_free_ports(tls: Option<(&Path, &Path)>) -> Result<InfluxServer, String> {
        let dir =
            tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let http_port = free_port()?;
        let rpc_port = free_port()?;
        let config = format!(
            "reporting-disabled = true\n\
             reporting-enabled = false\n\
             bind-address = \"127.0.0.1:{rpc_port}\"\n\
             [meta]\n  dir = \"{meta}\"\n  logging-enabled = false\n\
             [data]\n  dir = \"{data}\"\n  wal-dir = \"{wal}\"\n  query-log-enabled = false\n\
             [monitor]\n  store-enabled = false\n\
             [subscriber]\n  enabled = false\n\
             [http]\n  bind-address = \"127.0.0.1:{http_port}\"\n  log-enabled = false\n  pprof-enabled = false\n{https}",
            https = match tls {
                Some((cert, key)) => format!(
                    "  https-enabled = true\n  https-certificate = \"{}\"\n  https-private-key = \"{}\"\n",
                    toml_path(cert),
                    toml_path(key)
                ),
                None => String::new(),
            },
            meta = toml_path(&dir.path().join("meta")),
            data = toml_path(&dir.path().join("data")),
            wal = toml_path(&dir.path().join("wal")),
        );
        let config_path = dir.path().join("influxdb.conf");
        std::fs::write(&config_path, config)
            .map_err(|e| format!("cannot write the influxd config: {e}"))?;
        let http_addr = SocketAddr::from(([127, 0, 0, 1], http_port));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut server = InfluxServer {
            url: format!("{scheme}://{http_addr}"),
            http_addr,
            config_path,
            tls: tls.is_some(),
            child: None,
            dir,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.path().join("influxd.log"))
            .map_err(|e| format!("cannot create the influxd log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let bin = binary();
        let child = Command::new(&bin)
            .arg("-config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start InfluxDB ({bin}): {e}; install influxdb 1.x (Debian package `influxdb`) \
                     or set TIDEMARK_SKIP_INFLUX=1 to skip these tests"
                )
            })?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "influxd exited with {status} during start; log:\n{}",
                        self.log()
                    ));
                }
            }
            if ping(self.http_addr, self.tls) {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                self.stop();
                return Err(format!(
                    "influxd did not answer /ping within {START_TIMEOUT:?}; log:\n{}",
                    self.log()
                ));
            }
            // Polling a process we do not control: there is no event to await.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("influxd.log")).unwrap_or_default()
    }

    /// Kills the server; its data stays for [`InfluxServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server if running and starts it again on the same port and data.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.spawn()
    }
}

impl Drop for InfluxServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether `GET /ping` answers 204; a TLS-only server is up once it
/// answers the plain request with its 400 ("an HTTP request to an HTTPS server").
fn ping(addr: SocketAddr, tls: bool) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /ping HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    let expected: &[u8] = if tls {
        b"HTTP/1.0 400"
    } else {
        b"HTTP/1.1 204"
    };
    stream.read_exact(&mut head).is_ok() && head.starts_with(expected)
}

/// A private CA and a server certificate it signed, for `127.0.0.1` and
/// `localhost`, written as PEM files.
#[derive(Debug, Clone)]
pub struct TestCertificates {
    /// The CA's certificate: what a client is told to trust.
    pub ca: PathBuf,
    /// The server's certificate chain (its own, then the CA's).
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

impl TestCertificates {
    /// Makes the CA and the server certificate in `dir`.
    pub fn write(dir: &Path) -> Result<TestCertificates, String> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let failed = |e: rcgen::Error| format!("cannot make a test certificate: {e}");
        let ca_key = KeyPair::generate().map_err(failed)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tidemark test CA");
        let ca = ca_params.self_signed(&ca_key).map_err(failed)?;
        let server_key = KeyPair::generate().map_err(failed)?;
        let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .map_err(failed)?
            .signed_by(&server_key, &ca, &ca_key)
            .map_err(failed)?;
        let files = TestCertificates {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        let write = |path: &Path, text: String| {
            std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
        };
        write(&files.ca, ca.pem())?;
        write(&files.cert, format!("{}{}", server.pem(), ca.pem()))?;
        write(&files.key, server_key.serialize_pem())?;
        Ok(files)
    }
}
