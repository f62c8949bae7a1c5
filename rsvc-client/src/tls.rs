//! Mutual TLS between clients and engines, and between engines.
//!
//! One cluster CA signs every certificate. An engine's certificate carries the DNS name
//! [`ENGINE_NAME`] (and `rank<N>.`[`ENGINE_NAME`]), and every party checks an engine against
//! that name, not against the address it dialled: addresses change with failover and NAT, the
//! CA does not. A client's certificate names its principal (subject CN: the user; subject O:
//! its groups); the engine reads it once per connection (see `rsvc_server::caller`).
//!
//! [`TlsFiles`] holds the three PEM files (CA, certificate, key) and reloads them when they
//! change, so that a renewed certificate is picked up without a restart: every new connection
//! asks for the current configuration, which re-reads the files if their size, modification
//! time, inode or contents changed (looked at most every 500 ms). A set that fails to load (a
//! key written before its certificate, a wrong path) leaves the last good one in use and is
//! logged; the next change tries again.
//! Connections already open keep the certificate they were made with.
//!
//! CAVEATS: no revocation lists; a stolen client key is good until its certificate expires,
//! or until the CA is replaced. rustls with the `ring` provider, TLS 1.2 and 1.3, without
//! the post-quantum hybrid key exchange that the aws-lc-rs provider would add.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The DNS name every engine certificate carries, and that clients verify engines against.
pub const ENGINE_NAME: &str = "rsvc-engine";

/// Where a party's TLS material is: the cluster CA, its own certificate (chain) and its key,
/// all PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    /// The cluster CA certificate(s) that peers must chain to.
    pub ca: PathBuf,
    /// This party's certificate, optionally followed by intermediates.
    pub cert: PathBuf,
    /// This party's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsPaths {
    /// The command-line flags that name these files: `--tls-ca CA --tls-cert CERT --tls-key KEY`.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--tls-ca".into(),
            self.ca.display().to_string(),
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }

    /// The three paths, or a usage error if only some are given: TLS needs all of them.
    pub fn from_parts(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<TlsPaths>, String> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsPaths { ca, cert, key })),
            (ca, cert, key) => {
                let missing: Vec<&str> = [
                    ("--tls-ca", ca.is_none()),
                    ("--tls-cert", cert.is_none()),
                    ("--tls-key", key.is_none()),
                ]
                .into_iter()
                .filter(|(_, m)| *m)
                .map(|(f, _)| f)
                .collect();
                Err(format!(
                    "TLS needs a CA, a certificate and a key (flags --tls-ca, --tls-cert and \
                     --tls-key, or ca, cert and key under [tls] in the config file); {} missing",
                    missing.join(" and ")
                ))
            }
        }
    }
}

/// What a TLS set of files could not become.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: String,
    },
    /// The files were read but do not make a usable configuration.
    #[error("{0}")]
    Invalid(String),
}

/// (size, mtime, inode, hash of the contents) of each file: a change in any of them means
/// "read again". The hash catches a certificate rewritten in place, at the same size, within
/// one tick of a coarse filesystem clock.
type Stamp = Vec<(u64, Option<SystemTime>, u64, u64)>;

struct Loaded {
    stamp: Stamp,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

struct State {
    loaded: Loaded,
    /// The stamp of the last set that failed to load, so that it is logged once.
    failed: Option<Stamp>,
    /// When the files were last looked at.
    checked: std::time::Instant,
}

/// A party's TLS files, loaded, and reloaded when they change (see the module docs).
pub struct TlsFiles {
    paths: TlsPaths,
    state: Mutex<State>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles").field("paths", &self.paths).finish()
    }
}

/// How often the files are looked at, at most: a burst of new connections stats them once.
const RECHECK: Duration = Duration::from_millis(500);

// NB: ring, not aws-lc-rs, keeps the build free of aws-lc's C sources; rustls 0.23.48 marks
// ring's provider deprecated because it lacks the post-quantum hybrid key exchange. See the
// module caveats.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn stamp(paths: &TlsPaths) -> Stamp {
    [&paths.ca, &paths.cert, &paths.key]
        .iter()
        .map(|p| match fs::metadata(p) {
            Ok(m) => {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                fs::read(p).unwrap_or_default().hash(&mut h);
                (m.len(), m.modified().ok(), m.ino(), h.finish())
            }
            Err(_) => (0, None, 0, 0),
        })
        .collect()
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.to_path_buf(),
        cause: e.to_string(),
    }
}

fn load(paths: &TlsPaths) -> Result<Loaded, TlsError> {
    // The stamp is taken first: a change made while reading shows as a change next time.
    let stamp = stamp(paths);
    let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.ca)
        .map_err(|e| read_err(&paths.ca, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(&paths.ca, e))?;
    if ca.is_empty() {
        return Err(read_err(&paths.ca, "no certificate in the file"));
    }
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots
            .add(c)
            .map_err(|e| read_err(&paths.ca, format!("not a usable CA certificate: {e}")))?;
    }
    let roots = Arc::new(roots);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.cert)
        .map_err(|e| read_err(&paths.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(&paths.cert, e))?;
    if chain.is_empty() {
        return Err(read_err(&paths.cert, "no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| read_err(&paths.key, e))?;
    let p = provider();
    let h2 = vec![b"h2".to_vec()];
    let unusable = |e: rustls::Error| {
        TlsError::Invalid(format!(
            "{} and {} do not make a usable identity: {e}",
            paths.cert.display(),
            paths.key.display()
        ))
    };
    let mut client = ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain.clone(), key.clone_key())
        .map_err(unusable)?;
    client.alpn_protocols = h2.clone();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, p.clone())
        .build()
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", paths.ca.display())))?;
    let mut server = ServerConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(unusable)?;
    server.alpn_protocols = h2;
    Ok(Loaded {
        stamp,
        client: Arc::new(client),
        server: Arc::new(server),
    })
}

impl TlsFiles {
    /// Loads the files, or says which one is wrong and how.
    pub fn load(paths: TlsPaths) -> Result<Arc<TlsFiles>, TlsError> {
        let loaded = load(&paths)?;
        Ok(Arc::new(TlsFiles {
            paths,
            state: Mutex::new(State {
                loaded,
                failed: None,
                checked: std::time::Instant::now(),
            }),
        }))
    }

    /// The files.
    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    fn current(&self) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
        let mut s = self.state.lock().expect("lock");
        if s.checked.elapsed() >= RECHECK {
            s.checked = std::time::Instant::now();
            let now = stamp(&self.paths);
            if now != s.loaded.stamp && s.failed.as_ref() != Some(&now) {
                match load(&self.paths) {
                    Ok(l) => {
                        tracing::info!(cert = %self.paths.cert.display(), "TLS files changed; reloaded");
                        s.loaded = l;
                        s.failed = None;
                    }
                    Err(e) => {
                        tracing::warn!(cause = %e, "TLS files changed but do not load; keeping the last good set");
                        s.failed = Some(now);
                    }
                }
            }
        }
        (s.loaded.client.clone(), s.loaded.server.clone())
    }

    /// The configuration to dial with now.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current().0
    }

    /// The configuration to accept with now: it requires a client certificate from the CA.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current().1
    }

    /// Dials `addr` (`host:port`) within `timeout`, from `local` if given, and makes a TLS
    /// session that checks the engine's certificate against [`ENGINE_NAME`]. An error names the
    /// address and, for a handshake that failed, the reason (an unknown CA, an expired or
    /// wrong-name certificate).
    pub async fn connect(
        &self,
        addr: &str,
        local: Option<std::net::IpAddr>,
        timeout: Duration,
    ) -> io::Result<TlsConn> {
        let cfg = self.client_config();
        let dial = async {
            let tcp = dial(addr, local).await?;
            let name = ServerName::try_from(ENGINE_NAME).expect("a valid DNS name");
            let hs = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await;
            // NB: in TLS 1.3 the client finishes its handshake before the engine has checked
            // the client's certificate; a refusal arrives as an alert on the first read, which
            // HTTP/2 would report as a closed connection. The engine speaks first (its
            // SETTINGS), so one read here gets either its first bytes or the alert.
            let hs = match hs {
                Ok(mut s) => {
                    let mut first = vec![0u8; 512];
                    match tokio::io::AsyncReadExt::read(&mut s, &mut first).await {
                        Ok(0) => Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the engine closed the connection after the handshake",
                        )),
                        Ok(n) => {
                            first.truncate(n);
                            Ok(TlsConn {
                                inner: s,
                                first,
                                at: 0,
                            })
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            hs.map_err(|e| {
                let kind = e.kind();
                let cause = match e.into_inner().map(|i| i.downcast::<rustls::Error>()) {
                    Some(Ok(r)) => HandshakeCause::Tls(*r),
                    Some(Err(other)) => HandshakeCause::Other(other.to_string()),
                    None => HandshakeCause::Other(format!("{kind}")),
                };
                io::Error::new(
                    kind,
                    HandshakeError {
                        addr: addr.to_string(),
                        cause,
                    },
                )
            })
        };
        match tokio::time::timeout(timeout, dial).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {addr} (TCP and TLS) took over {timeout:?}"),
            )),
        }
    }
}

/// A TCP connection to `addr` with Nagle off, leaving from `local` if given.
async fn dial(addr: &str, local: Option<std::net::IpAddr>) -> io::Result<tokio::net::TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr} resolves to nothing"));
    for sa in tokio::net::lookup_host(addr).await? {
        let sock = if sa.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(ip) = local.filter(|ip| ip.is_ipv4() == sa.is_ipv4()) {
            sock.bind(std::net::SocketAddr::new(ip, 0))?;
        }
        match sock.connect(sa).await {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A connector for a tonic endpoint: every (re)connect dials `addr` with the current
/// configuration of `tls`.
pub fn connector(
    tls: Arc<TlsFiles>,
    addr: String,
    local: Option<std::net::IpAddr>,
    timeout: Duration,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<TlsConn>,
    Error = io::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |_: tonic::transport::Uri| {
        let (tls, addr) = (tls.clone(), addr.clone());
        async move {
            let s = tls.connect(&addr, local, timeout).await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    })
}

/// Why a TLS handshake that this side started failed.
#[derive(Debug)]
enum HandshakeCause {
    Tls(rustls::Error),
    Other(String),
}

/// A failed TLS handshake with an engine: its address and why.
#[derive(Debug)]
struct HandshakeError {
    addr: String,
    cause: HandshakeCause,
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.cause {
            HandshakeCause::Tls(e) => write!(f, "TLS handshake with {} failed: {}", self.addr, explain(e)),
            HandshakeCause::Other(e) => write!(f, "TLS handshake with {} failed: {e}", self.addr),
        }
    }
}

impl std::error::Error for HandshakeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            HandshakeCause::Tls(e) => Some(e),
            HandshakeCause::Other(_) => None,
        }
    }
}

/// rustls's reason, with what it means for an operator.
fn explain(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C};
    let hint = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "the engine's certificate has expired",
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the engine's certificate is not valid yet (clock skew?)"
            }
            C::UnknownIssuer => "the engine's certificate is not signed by this client's CA (--tls-ca)",
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the engine's certificate does not name an rsvc engine (SAN DNS rsvc-engine)"
            }
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "the engine's certificate is not an engine certificate (no server authentication usage)"
            }
            C::BadSignature => "the engine's certificate has a bad signature",
            _ => "the engine's certificate was rejected",
        },
        rustls::Error::AlertReceived(a) => match a {
            A::BadCertificate | A::UnknownCA | A::CertificateUnknown => {
                "the engine rejected this client's certificate (not signed by the cluster CA?)"
            }
            A::CertificateExpired => "the engine rejected this client's certificate: it has expired",
            A::CertificateRequired => "the engine requires a client certificate (--tls-cert, --tls-key)",
            A::AccessDenied => "the engine refused this client",
            _ => "the engine ended the handshake",
        },
        _ => "",
    };
    if hint.is_empty() {
        e.to_string()
    } else {
        format!("{hint} ({e})")
    }
}

/// If `err`, or an error it was caused by, is a certificate failure (this side's check of the
/// engine, or the engine's refusal of this side), says what it is. Such a failure stays until
/// certificates change, so clients stop retrying on it.
pub fn certificate_problem(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(err);
    while let Some(e) = next {
        // An io::Error hides what it wraps from `source`.
        let inner = e
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for cand in [Some(e), inner].into_iter().flatten() {
            if let Some(h) = cand.downcast_ref::<HandshakeError>() {
                if let HandshakeCause::Tls(r) = &h.cause {
                    if is_certificate_error(r) {
                        return Some(h.to_string());
                    }
                }
            }
            if let Some(r) = cand.downcast_ref::<rustls::Error>() {
                if is_certificate_error(r) {
                    return Some(format!("TLS: {}", explain(r)));
                }
            }
        }
        next = e.source();
    }
    None
}

fn is_certificate_error(e: &rustls::Error) -> bool {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => true,
        rustls::Error::AlertReceived(a) => matches!(
            a,
            A::BadCertificate
                | A::UnknownCA
                | A::CertificateUnknown
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::UnsupportedCertificate
                | A::CertificateRequired
                | A::AccessDenied
        ),
        _ => false,
    }
}

/// A client's TLS connection to an engine, with the first bytes the engine sent (read to see
/// whether it took this client's certificate) handed out again before the rest.
pub struct TlsConn {
    inner: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    first: Vec<u8>,
    at: usize,
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.first.len() {
            let n = (this.first.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.first[this.at..this.at + n]);
            this.at += n;
            if this.at == this.first.len() {
                this.first = Vec::new();
                this.at = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
