//! Trust between vgrid's roles. This crate owns the grid CA, each node's certificate and key on
//! disk, joining, every TLS setting of the process and telling who is calling (a node, a user,
//! nobody: [`caller`]). It must never decide what a caller may do (each role's own rule), keep
//! users or tokens (the coordinator does), or know about VMs, images or chunks.
//!
//! - [`ca`]: the grid's certificate authority, made by the coordinator on first start; it signs
//!   the certificates of hosts and image servers that join with a one-time join token.
//! - [`node`]: a role's own certificate and key on disk, and joining (CSR → signed certificate),
//!   the coordinator's CA checked against the fingerprint inside the join token.
//! - [`tls`]: rustls configurations, the TLS listener every role serves its HTTP API on (the
//!   verified client certificate becomes the request's [`PeerInfo`]), the process-wide client
//!   settings every outgoing request uses, and fetching a server's chain for pinning.
//! - [`deadline`]: the bound on how long a new connection may take to send its first request's
//!   headers (slow-loris clients).
//! - [`metrics`]: the process's Prometheus registry, the HTTP request counting every role's
//!   router shares, and the unauthenticated `/metrics` listener on its own address; what each
//!   role counts is that role's own.
//! - [`json`]: the JSON body extractor of every role's handlers (integral floats are integers,
//!   an optional body may be `null`), so that all three read bodies alike.
//!
//! A node certificate names the node (subject CN) and its roles (subject OU, comma-separated:
//! `coordinator`, `host`, `image-server`). Peers are verified against the grid CA only.

pub mod ca;
pub mod caller;
pub mod deadline;
pub mod json;
pub mod metrics;
pub mod node;
pub mod tls;

pub use ca::Ca;
pub use node::NodeCert;
pub use tls::{Peer, PeerInfo};

use std::fmt;

/// What a node certificate lets its holder act as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeRole {
    Coordinator,
    Host,
    ImageServer,
}

impl NodeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Coordinator => "coordinator",
            NodeRole::Host => "host",
            NodeRole::ImageServer => "image-server",
        }
    }
}

impl fmt::Display for NodeRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for NodeRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "coordinator" => Ok(NodeRole::Coordinator),
            "host" => Ok(NodeRole::Host),
            "image-server" => Ok(NodeRole::ImageServer),
            _ => Err(format!("unknown role {s:?}: expected host, image-server or coordinator")),
        }
    }
}

/// Errors of certificate handling and joining; each names the file, peer or cause. Variants
/// with a `String` only are refusals with no other error behind them.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A file that is there but unusable: `what` is wrong with it.
    #[error("{path}: {what}")]
    BadFile { path: String, what: &'static str },
    /// A file that is there but unusable: `what` is wrong with it, and why.
    #[error("{path}: {what}: {source}")]
    BadFileBecause {
        path: String,
        what: &'static str,
        #[source]
        source: Cause,
    },
    /// A file whose content is refused (`source` says why).
    #[error("{path}: {source}")]
    InFile {
        path: String,
        #[source]
        source: Box<TrustError>,
    },
    /// A certificate, key, request or join token is refused.
    #[error("certificate: {0}")]
    Cert(String),
    /// Making, reading or signing a certificate, key or request failed at `what`.
    #[error("certificate: {what}: {source}")]
    CertFailed {
        what: String,
        #[source]
        source: Cause,
    },
    /// A TLS setting or connection is refused.
    #[error("TLS: {0}")]
    Tls(String),
    /// A TLS setting or connection failed at `what`.
    #[error("TLS: {what}: {source}")]
    TlsFailed {
        what: String,
        #[source]
        source: Cause,
    },
    /// The TLS library refused a setting.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// Serving over TLS failed.
    #[error("TLS: {0}")]
    Io(#[source] std::io::Error),
    /// Joining was refused or went wrong: `why` (it may quote the coordinator's HTTP error
    /// text, which is why it is text).
    #[error("joining {url}: {why}")]
    Join { url: String, why: String },
    /// The coordinator's answer to a join is not what it must be.
    #[error("joining {url}: malformed answer: {source}")]
    JoinAnswer {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    /// Joining failed while talking to the coordinator.
    #[error("joining {url}: {source}")]
    JoinFailed {
        url: String,
        #[source]
        source: Cause,
    },
}

/// The error behind a [`TrustError`], of whichever library.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

impl TrustError {
    /// Making, reading or signing a certificate failed at `what` because of `e`.
    pub(crate) fn cert(what: impl Into<String>, e: impl Into<Cause>) -> TrustError {
        TrustError::CertFailed { what: what.into(), source: e.into() }
    }

    /// A TLS setting or connection failed at `what` because of `e`.
    pub(crate) fn tls(what: impl Into<String>, e: impl Into<Cause>) -> TrustError {
        TrustError::TlsFailed { what: what.into(), source: e.into() }
    }
}

/// `sha256:` and the hex SHA-256 of a certificate's DER bytes: how CAs are pinned.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(der)))
}

/// The DER bytes of the first certificate in a PEM text.
pub fn pem_to_der(text: &str) -> Result<Vec<u8>, TrustError> {
    let all = pem::parse_many(text).map_err(|e| TrustError::cert("malformed PEM", e))?;
    all.into_iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .ok_or_else(|| TrustError::Cert("no certificate in the PEM text".into()))
}

/// PEM text of a DER certificate.
pub fn der_to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Writes `text` to `path` atomically (temporary file, then rename) with `mode`.
pub(crate) fn write_file(path: &std::path::Path, text: &str, mode: u32) -> Result<(), TrustError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TrustError::File { path: path.display().to_string(), source };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(err)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

pub(crate) fn read_file(path: &std::path::Path) -> Result<String, TrustError> {
    std::fs::read_to_string(path).map_err(|source| TrustError::File { path: path.display().to_string(), source })
}
