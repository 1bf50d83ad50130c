//! TLS for every role: the server side (a listener for `axum::serve` whose connections carry
//! the verified client certificate as [`PeerInfo`]), the client side (one process-wide setting
//! that every `reqwest` client and WebSocket connection of the process uses), and fetching a
//! server's chain without verifying it, for pinning a CA on first contact.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::{NodeCert, NodeRole, TrustError};

/// A peer proven by a client certificate the grid CA signed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Peer {
    pub name: String,
    pub roles: Vec<NodeRole>,
}

impl Peer {
    /// Reads name (CN) and roles (OU) from a certificate (already verified by the caller).
    pub fn from_der(der: &[u8]) -> Result<Peer, TrustError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TrustError::cert("malformed certificate", e))?;
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .ok_or_else(|| TrustError::Cert("certificate without a common name".into()))?
            .to_string();
        let roles = subject
            .iter_organizational_unit()
            .filter_map(|o| o.as_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|r| r.trim().parse().ok())
            .collect();
        Ok(Peer { name, roles })
    }

    pub fn is(&self, role: NodeRole) -> bool {
        self.roles.contains(&role)
    }
}

/// Who is at the other end of a connection: its address and, when it showed a client
/// certificate of the grid CA, the peer it proves.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub peer: Option<Peer>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let all = pem::parse_many(pem).map_err(|e| TrustError::cert("malformed PEM", e))?;
    let v: Vec<_> = all.into_iter().filter(|p| p.tag() == "CERTIFICATE").map(|p| CertificateDer::from(p.into_contents())).collect();
    if v.is_empty() {
        return Err(TrustError::Cert("no certificate in the PEM text".into()));
    }
    Ok(v)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TrustError> {
    let p = pem::parse(pem).map_err(|e| TrustError::cert("malformed PEM key", e))?;
    match p.tag() {
        "PRIVATE KEY" => Ok(PrivateKeyDer::Pkcs8(p.into_contents().into())),
        "EC PRIVATE KEY" => Ok(PrivateKeyDer::Sec1(p.into_contents().into())),
        "RSA PRIVATE KEY" => Ok(PrivateKeyDer::Pkcs1(p.into_contents().into())),
        t => Err(TrustError::Cert(format!("unsupported key type {t:?}"))),
    }
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TrustError> {
    let mut r = RootCertStore::empty();
    for c in certs(ca_pem)? {
        r.add(c).map_err(|e| TrustError::cert("the CA certificate is not usable", e))?;
    }
    Ok(r)
}

/// The server side of a node: its certificate (sent with the CA, so clients can pin it),
/// client certificates optional but, when shown, verified against the grid CA.
pub fn server_config(node: &NodeCert) -> Result<Arc<ServerConfig>, TrustError> {
    let p = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&node.ca_pem)?), p.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TrustError::tls("client verifier", e))?;
    let mut chain = certs(&node.cert_pem)?;
    chain.extend(certs(&node.ca_pem)?);
    let mut cfg = ServerConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key(&node.key_pem)?)
        .map_err(|e| TrustError::tls("the node certificate and key do not fit", e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The client side: servers verified against `ca_pem`; `identity` shown when asked.
pub fn client_config(ca_pem: &str, identity: Option<&NodeCert>) -> Result<Arc<ClientConfig>, TrustError> {
    let b = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?.with_root_certificates(roots(ca_pem)?);
    let mut cfg = match identity {
        Some(n) => b
            .with_client_auth_cert(certs(&n.cert_pem)?, key(&n.key_pem)?)
            .map_err(|e| TrustError::tls("the node certificate and key do not fit", e))?,
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A `reqwest` client builder that trusts only `ca_pem` and shows `identity`.
pub fn client_builder_for(ca_pem: &str, identity: Option<&NodeCert>) -> Result<reqwest::ClientBuilder, TrustError> {
    let cfg = client_config(ca_pem, identity)?;
    Ok(reqwest::Client::builder().use_preconfigured_tls((*cfg).clone()))
}

/// The TLS settings of this process: the CA it trusts and, for a node, its certificate.
#[derive(Clone, Debug)]
pub struct ProcessTls {
    pub ca_pem: String,
    pub identity: Option<NodeCert>,
}

fn process() -> &'static RwLock<Option<Arc<ProcessTls>>> {
    static P: OnceLock<RwLock<Option<Arc<ProcessTls>>>> = OnceLock::new();
    P.get_or_init(|| RwLock::new(None))
}

/// Sets the CA (and identity) every client of this process uses from now on.
pub fn install(tls: ProcessTls) {
    *process().write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(tls));
}

/// The process's TLS settings, if installed.
pub fn current() -> Option<Arc<ProcessTls>> {
    process().read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn bearer_slot() -> &'static RwLock<Option<String>> {
    static B: OnceLock<RwLock<Option<String>>> = OnceLock::new();
    B.get_or_init(|| RwLock::new(None))
}

/// Sets the login token this process (a CLI command acting for a user, e.g. `vgrid image nbd`)
/// sends to image servers when a client has none of its own.
pub fn set_bearer(token: Option<String>) {
    *bearer_slot().write().unwrap_or_else(|e| e.into_inner()) = token;
}

/// The process's login token, if set.
pub fn bearer() -> Option<String> {
    bearer_slot().read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A `reqwest` client builder with this process's TLS settings (plain defaults when none are
/// installed, e.g. in unit tests over `http://`). Every outgoing request of vgrid is built here.
pub fn client_builder() -> reqwest::ClientBuilder {
    if let Some(t) = current() {
        match client_builder_for(&t.ca_pem, t.identity.as_ref()) {
            Ok(b) => return b,
            Err(e) => tracing::error!("TLS client settings unusable, requests will fail verification: {e}"),
        }
    }
    reqwest::Client::builder().use_rustls_tls().tls_built_in_root_certs(false)
}

/// The rustls client configuration for WebSocket connections (`None` without TLS settings).
pub fn ws_client_config() -> Option<Arc<ClientConfig>> {
    let t = current()?;
    client_config(&t.ca_pem, t.identity.as_ref()).map_err(|e| tracing::error!("TLS client settings unusable: {e}")).ok()
}

/// A connection as [`TlsListener`] hands it over: TLS, with its first request's headers due
/// within [`crate::deadline::HEADER_READ_TIMEOUT`].
pub type TlsConn = crate::deadline::HeaderDeadline<tokio_rustls::server::TlsStream<TcpStream>>;

/// A TCP listener that completes TLS handshakes (in the background, at most 10 s each) and
/// hands `axum::serve` the connections with their [`PeerInfo`].
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsConn, PeerInfo)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, cfg: Arc<ServerConfig>) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let task = tokio::spawn(async move {
            loop {
                let (sock, addr) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(%local, "accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock)).await {
                        Ok(Ok(s)) => {
                            let peer = s.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| Peer::from_der(c).ok());
                            let s = crate::deadline::HeaderDeadline::new(s, crate::deadline::HEADER_READ_TIMEOUT);
                            let _ = tx.send((s, PeerInfo { addr, peer })).await;
                        }
                        Ok(Err(e)) => tracing::info!(%addr, "TLS handshake refused: {e}"),
                        Err(_) => tracing::info!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local, task })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConn;
    type Addr = PeerInfo;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(PeerInfo { addr: self.local, peer: None })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for PeerInfo {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// The peer proven on the connection of a request, if any.
pub fn peer_of<B>(req: &axum::http::Request<B>) -> Option<&Peer> {
    req.extensions().get::<axum::extract::ConnectInfo<PeerInfo>>().and_then(|c| c.0.peer.as_ref())
}

/// How long requests in flight may go on once a role is asked to stop ([`serve`]).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `app` over TLS on `tcp` until `shutdown` resolves, then stops promptly: no new
/// connection is accepted, idle keep-alive connections are closed, and requests in flight get
/// [`SHUTDOWN_GRACE`] to finish; whatever is still open then (a long poll, a console's
/// WebSocket, a client that never closes its connection) is dropped and this returns.
/// Without the bound a single open connection held a stopping role for as long as its client
/// kept it (90 s and more).
pub async fn serve(
    tcp: TcpListener,
    node: NodeCert,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), TrustError> {
    let l = TlsListener::new(tcp, server_config(&node)?).map_err(TrustError::Io)?;
    let local = l.local;
    let (asked, stopping) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = asked.send(());
    };
    let app = app.layer(axum::middleware::from_fn(read_small_body_first));
    let server = axum::serve(l, app.into_make_service_with_connect_info::<PeerInfo>()).with_graceful_shutdown(signal).into_future();
    let grace = async move {
        match stopping.await {
            Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
            // The server ended without being asked to: let it say why.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        r = server => r.map_err(|e| TrustError::tls("serving", e)),
        _ = grace => {
            tracing::info!(%local, "connections still open {SHUTDOWN_GRACE:?} after the stop request are dropped");
            Ok(())
        }
    }
}

/// Request bodies up to this size are read whole before anything answers ([`serve`]).
const READ_FIRST: u64 = 1 << 20;

/// Reads a small request body (declared length up to [`READ_FIRST`]) before the request is
/// handled. An answer given before the body was read (a 401 for a missing token, a 403 for the
/// wrong role, a 404) made hyper close the connection after it, and a client that had already
/// reused that keep-alive connection for its next request got an EOF instead of an answer.
/// Larger bodies (chunk uploads, migration streams) and bodies without a declared length go
/// through as streams.
async fn read_small_body_first(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse;
    let declared = req.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if !declared.is_some_and(|n| n > 0 && n <= READ_FIRST) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, READ_FIRST as usize).await {
        Ok(bytes) => next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await,
        Err(e) => {
            let error = format!("{} {}: reading the request body: {e}", parts.method, parts.uri.path());
            (axum::http::StatusCode::BAD_REQUEST, axum::Json(serde_json::json!({ "error": error }))).into_response()
        }
    }
}

/// Records what a server presents, accepting anything: only for pinning on first contact,
/// where the caller then compares or stores the CA.
#[derive(Debug)]
struct Capture(Arc<std::sync::Mutex<Vec<Vec<u8>>>>, Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.push(end_entity.as_ref().to_vec());
        v.extend(intermediates.iter().map(|c| c.as_ref().to_vec()));
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.1.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.1.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.1.signature_verification_algorithms.supported_schemes()
    }
}

/// `(host, port)` of an `https://` URL.
pub fn host_port(url: &str) -> Result<(String, u16), TrustError> {
    let u = reqwest::Url::parse(url).map_err(|e| TrustError::tls(format!("{url:?} is not a URL"), e))?;
    if u.scheme() != "https" {
        return Err(TrustError::Tls(format!("{url} is not an https:// URL")));
    }
    let host = match u.host() {
        Some(url::Host::Ipv6(a)) => a.to_string(),
        Some(h) => h.to_string(),
        None => return Err(TrustError::Tls(format!("{url} has no host"))),
    };
    Ok((host, u.port_or_known_default().unwrap_or(443)))
}

/// The certificates the server at `url` presents (leaf first), unverified. Blocking; used
/// once per coordinator to pin its CA (CLI) or to check it against a join token (nodes).
pub fn fetch_chain(url: &str) -> Result<Vec<Vec<u8>>, TrustError> {
    use std::io::Write;
    let (host, port) = host_port(url)?;
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let p = provider();
    let cfg = ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Capture(got.clone(), p)))
        .with_no_client_auth();
    let name = ServerName::try_from(host.clone()).map_err(|e| TrustError::tls(host.clone(), e))?;
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name)?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .map_err(|e| TrustError::tls(format!("resolving {host}"), e))?
        .next()
        .ok_or_else(|| TrustError::Tls(format!("{host} has no address")))?;
    let mut sock = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| TrustError::tls(format!("cannot reach {url}"), e))?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| TrustError::tls(format!("TLS handshake with {url}"), e))?;
    }
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    let _ = sock.flush();
    let v = got.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if v.is_empty() {
        return Err(TrustError::Tls(format!("{url} presented no certificate")));
    }
    Ok(v)
}

/// The CA certificate (DER) in a chain a vgrid node presents: the last one.
pub fn ca_of_chain(chain: &[Vec<u8>]) -> Option<&[u8]> {
    chain.last().map(|c| c.as_slice())
}

/// Opens a WebSocket (`ws://` or `wss://`) with this process's TLS settings.
pub async fn ws_connect<R>(
    req: R,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
>
where
    R: tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
{
    let connector = ws_client_config().map(tokio_tungstenite::Connector::Rustls);
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(WS_READ_BUFFER);
    // Nagle off: consoles and tunnelled frames are small writes that must not wait for an ACK.
    tokio_tungstenite::connect_async_tls_with_config(req, Some(config), true, connector).await
}

/// The most a WebSocket of vgrid reads at once (client and server ends: pass it to axum's
/// `WebSocketUpgrade::read_buffer_size`). tungstenite zeroes that much of its buffer before
/// every read, also a read that finds nothing: its default, 128 KiB, cost a tunnelled frame a
/// 128 KiB memset per read at each end. 16 KiB is one TLS record, what a read from rustls
/// gives at most anyway; larger messages are read in several.
pub const WS_READ_BUFFER: usize = 16 * 1024;
