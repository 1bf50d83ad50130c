//! Trust between vgrid's roles.
//!
//! - [`ca`]: the grid's certificate authority, made by the coordinator on first start; it signs
//!   the certificates of hosts and image servers that join with a one-time join token.
//! - [`node`]: a role's own certificate and key on disk, and joining (CSR → signed certificate),
//!   the coordinator's CA checked against the fingerprint inside the join token.
//! - [`tls`]: rustls configurations, the TLS listener every role serves its HTTP API on (the
//!   verified client certificate becomes the request's [`PeerInfo`]), the process-wide client
//!   settings every outgoing request uses, and fetching a server's chain for pinning.
//!
//! A node certificate names the node (subject CN) and its roles (subject OU, comma-separated:
//! `coordinator`, `host`, `image-server`). Peers are verified against the grid CA only.

pub mod ca;
pub mod caller;
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

/// Errors of certificate handling and joining; each names the file, peer or cause.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path}: {cause}")]
    File { path: String, cause: String },
    #[error("certificate: {0}")]
    Cert(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("joining {url}: {cause}")]
    Join { url: String, cause: String },
}

/// `sha256:` and the hex SHA-256 of a certificate's DER bytes: how CAs are pinned.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(der)))
}

/// The DER bytes of the first certificate in a PEM text.
pub fn pem_to_der(text: &str) -> Result<Vec<u8>, TrustError> {
    let all = pem::parse_many(text).map_err(|e| TrustError::Cert(format!("malformed PEM: {e}")))?;
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
    let err = |e: std::io::Error| TrustError::File { path: path.display().to_string(), cause: e.to_string() };
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
    std::fs::read_to_string(path).map_err(|e| TrustError::File { path: path.display().to_string(), cause: e.to_string() })
}
