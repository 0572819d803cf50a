//! TLS on every listener: with `--tls-cert` and `--tls-key` a service's one
//! HTTP port speaks HTTPS and WSS only (rustls, HTTP/1.1).
//!
//! Handshakes run on tasks of their own, each bounded by
//! [`HANDSHAKE_TIMEOUT`], so a client that connects and says nothing holds
//! up no other client. A plain-HTTP request on the TLS port is answered in
//! plain HTTP with a 400 that says to use `https://`, the way nginx does,
//! rather than with bytes its client cannot read.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshake is done but that the server has not taken yet.
const ACCEPTED_QUEUE: usize = 256;

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Connection: close\r\n\
Content-Length: 58\r\n\
\r\n\
This port speaks TLS only: use https:// (or wss://) here.\n";

/// The TLS flags of a listening service.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain, the server's own first: the listener then
    /// speaks HTTPS and WSS only.
    #[arg(long, env = "TIDEMARK_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert` (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "TIDEMARK_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The server config of these flags, or `None` for plain HTTP.
    pub fn server_config(&self) -> Result<Option<Arc<ServerConfig>>, TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => server_config(cert, key).map(Some),
            (None, None) => Ok(None),
            _ => Err(TlsError::Incomplete),
        }
    }

    /// `tcp` as this service's listener: TLS when the flags ask for it.
    pub fn listener(&self, tcp: TcpListener) -> Result<HttpListener, TlsError> {
        Ok(HttpListener::new(tcp, self.server_config()?))
    }
}

/// Why a certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert and --tls-key go together")]
    Incomplete,
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key: {detail}")]
    NoKey { path: PathBuf, detail: String },
    #[error("the certificate in {cert} and the key in {key} cannot be used: {source}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// A TLS server config from a PEM certificate chain and its private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(cert)?;
    let key_pem = std::fs::read(key).map_err(|source| TlsError::Read {
        path: key.to_path_buf(),
        source,
    })?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::NoKey {
        path: key.to_path_buf(),
        detail: e.to_string(),
    })?;
    let mismatch = |source| TlsError::Mismatch {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    };
    // ring rather than aws-lc-rs: it builds with a C compiler alone, no
    // cmake. It offers no post-quantum key exchange, hence the deprecation.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(mismatch)?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(mismatch)?;
    // WebSocket upgrades are HTTP/1.1 requests.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The certificates of a PEM file, in order; an error if there are none.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

/// A bound HTTP port, plain or TLS: what [`crate::serve`] serves.
#[derive(Debug)]
pub struct HttpListener {
    tcp: TcpListener,
    tls: Option<Arc<ServerConfig>>,
}

impl HttpListener {
    pub fn new(tcp: TcpListener, tls: Option<Arc<ServerConfig>>) -> HttpListener {
        HttpListener { tcp, tls }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The base URL clients reach this listener at, e.g. `https://127.0.0.1:8080`.
    pub fn url(&self) -> io::Result<String> {
        Ok(format!("{}://{}", self.scheme(), self.local_addr()?))
    }

    pub(crate) fn into_parts(self) -> (TcpListener, Option<Arc<ServerConfig>>) {
        (self.tcp, self.tls)
    }
}

impl From<TcpListener> for HttpListener {
    fn from(tcp: TcpListener) -> HttpListener {
        HttpListener::new(tcp, None)
    }
}

/// The TLS side of a listener: connections whose handshake is done.
pub(crate) struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::AbortHandle,
}

impl TlsListener {
    pub(crate) fn spawn(tcp: TcpListener, config: Arc<ServerConfig>) -> io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (done, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        let acceptor =
            tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), done)).abort_handle();
        Ok(TlsListener {
            accepted,
            local,
            acceptor,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        // The server stopped taking connections: so does the port.
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accept loop only ends when aborted, which happens on drop.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    done: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let (stream, addr) = match tcp.accept().await {
            Ok(connection) => connection,
            Err(e) => {
                // As axum's own loop: a failed connection is the client's
                // problem; anything else (out of file descriptors) gets a pause.
                if !is_connection_error(&e) {
                    tracing::error!(error = %e, "Cannot accept a connection");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let done = done.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&acceptor, stream)).await {
                Ok(Ok(tls)) => {
                    let _ = done.send((tls, addr)).await;
                }
                Ok(Err(e)) => tracing::debug!(client = %addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(client = %addr, "TLS handshake timed out"),
            }
        });
    }
}

async fn handshake(
    acceptor: &TlsAcceptor,
    mut stream: TcpStream,
) -> io::Result<TlsStream<TcpStream>> {
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        // Read the request head first: closing a socket with unread bytes
        // resets it, and the client would see a reset instead of the answer.
        let mut head = [0u8; 4096];
        let _ = stream.read(&mut head).await;
        stream.write_all(PLAIN_HTTP_ANSWER).await?;
        let _ = stream.shutdown().await;
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a plain-HTTP request on the TLS port",
        ));
    }
    acceptor.accept(stream).await
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_http_answer_says_its_length() {
        let text = std::str::from_utf8(PLAIN_HTTP_ANSWER).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }

    #[test]
    fn unreadable_or_empty_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let error = server_config(&missing, &missing).unwrap_err();
        assert!(error.to_string().contains("missing.pem"), "{error}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let error = server_config(&empty, &empty).unwrap_err();
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");

        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        let error = server_config(&cert, &empty).unwrap_err();
        assert!(matches!(error, TlsError::NoKey { .. }), "{error}");

        let other = rcgen::KeyPair::generate().unwrap();
        let wrong_key = dir.path().join("other.key");
        std::fs::write(&wrong_key, other.serialize_pem()).unwrap();
        let error = server_config(&cert, &wrong_key).unwrap_err();
        assert!(matches!(error, TlsError::Mismatch { .. }), "{error}");

        let key = dir.path().join("cert.key");
        std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
        assert!(server_config(&cert, &key).is_ok());
    }
}
