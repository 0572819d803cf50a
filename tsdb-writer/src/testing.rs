//! Test support: a throwaway InfluxDB 1.x server (`influxd`) on free local ports.
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
             [http]\n  bind-address = \"127.0.0.1:{http_port}\"\n  log-enabled = false\n  pprof-enabled = false\n",
            meta = toml_path(&dir.path().join("meta")),
            data = toml_path(&dir.path().join("data")),
            wal = toml_path(&dir.path().join("wal")),
        );
        let config_path = dir.path().join("influxdb.conf");
        std::fs::write(&config_path, config)
            .map_err(|e| format!("cannot write the influxd config: {e}"))?;
        let http_addr = SocketAddr::from(([127, 0, 0, 1], http_port));
        let mut server = InfluxServer {
            url: format!("http://{http_addr}"),
            http_addr,
            config_path,
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
            if ping(self.http_addr) {
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

/// Whether `GET /ping` answers 204.
fn ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /ping HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 204")
}
