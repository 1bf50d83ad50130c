//! A node's own certificate (`DIR/node.crt`, `node.key` mode 0600, and the grid's `ca.crt`),
//! and joining a grid with a join token.

use std::path::Path;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use vgrid_api::auth::{JoinReply, JoinRequest, RenewRequest};

use crate::tls::Peer;
use crate::{fingerprint, pem_to_der, read_file, write_file, Cause, NodeRole, TrustError};

/// A node's certificate, its key and the CA that signed it (all PEM).
#[derive(Clone)]
pub struct NodeCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert").field("peer", &self.peer().ok()).finish_non_exhaustive()
    }
}

impl NodeCert {
    /// Loads `node.crt`, `node.key` and `ca.crt` from `dir`; `None` when the node has not
    /// joined yet (no `node.crt`).
    pub fn load(dir: &Path) -> Result<Option<NodeCert>, TrustError> {
        if !dir.join("node.crt").exists() {
            return Ok(None);
        }
        let n = NodeCert {
            cert_pem: read_file(&dir.join("node.crt"))?,
            key_pem: read_file(&dir.join("node.key"))?,
            ca_pem: read_file(&dir.join("ca.crt"))?,
        };
        n.peer().map_err(|e| TrustError::InFile { path: dir.join("node.crt").display().to_string(), source: Box::new(e) })?;
        Ok(Some(n))
    }

    pub fn save(&self, dir: &Path) -> Result<(), TrustError> {
        write_file(&dir.join("node.key"), &self.key_pem, 0o600)?;
        write_file(&dir.join("ca.crt"), &self.ca_pem, 0o644)?;
        write_file(&dir.join("node.crt"), &self.cert_pem, 0o644)
    }

    /// Who this certificate says the node is.
    pub fn peer(&self) -> Result<Peer, TrustError> {
        Peer::from_der(&pem_to_der(&self.cert_pem)?)
    }

    pub fn ca_fingerprint(&self) -> Result<String, TrustError> {
        Ok(fingerprint(&pem_to_der(&self.ca_pem)?))
    }

    /// The DNS names and IP addresses the certificate is valid for (its subject alternative
    /// names), IP addresses in their usual text form.
    pub fn names(&self) -> Result<Vec<String>, TrustError> {
        use x509_parser::extensions::GeneralName;
        let der = pem_to_der(&self.cert_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| TrustError::cert("malformed certificate", e))?;
        let san = cert.subject_alternative_name().map_err(|e| TrustError::cert("malformed subject alternative names", e))?;
        let mut v = Vec::new();
        for n in san.map(|s| s.value.general_names.iter()).into_iter().flatten() {
            match n {
                GeneralName::DNSName(d) => v.push(d.to_string()),
                GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        v.push(std::net::IpAddr::from(a).to_string());
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        v.push(std::net::IpAddr::from(a).to_string());
                    }
                }
                _ => {}
            }
        }
        Ok(v)
    }

    /// Those of `wanted` (DNS names or IP addresses) the certificate is not valid for: a
    /// client reaching the node by one of them would refuse the handshake.
    pub fn missing_names(&self, wanted: &[String]) -> Result<Vec<String>, TrustError> {
        let have = self.names()?;
        Ok(wanted.iter().filter(|w| !have.iter().any(|h| same_name(h, w))).cloned().collect())
    }
}

/// Whether two subject names are the same: IP addresses by value (`::1` = `0:0:0:0:0:0:0:1`),
/// DNS names without regard to case.
fn same_name(a: &str, b: &str) -> bool {
    match (a.parse::<std::net::IpAddr>(), b.parse::<std::net::IpAddr>()) {
        (Ok(x), Ok(y)) => x == y,
        (Err(_), Err(_)) => a.eq_ignore_ascii_case(b),
        _ => false,
    }
}

/// A certificate request for `name` valid for `sans`, and its new private key (both PEM).
pub fn make_request(name: &str, sans: &[String]) -> Result<(String, String), TrustError> {
    let key = KeyPair::generate().map_err(|e| TrustError::cert("making a key", e))?;
    let mut p = CertificateParams::new(sans.to_vec()).map_err(|e| TrustError::cert(format!("subject names {sans:?}"), e))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    let csr = p.serialize_request(&key).map_err(|e| TrustError::cert("making the certificate request", e))?;
    let pem = csr.pem().map_err(|e| TrustError::cert("encoding the certificate request", e))?;
    Ok((pem, key.serialize_pem()))
}

/// A join token: `vgrid-join1:<id>.<secret>:sha256:<hex of the CA certificate>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    /// `<id>.<secret>`: what the coordinator checks.
    pub credential: String,
    /// `sha256:<hex>`: what the joining node checks the coordinator's CA against.
    pub ca_fingerprint: String,
}

pub const JOIN_TOKEN_PREFIX: &str = "vgrid-join1:";

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{JOIN_TOKEN_PREFIX}{}:{}", self.credential, self.ca_fingerprint)
    }
}

impl std::str::FromStr for JoinToken {
    type Err = TrustError;
    fn from_str(s: &str) -> Result<Self, TrustError> {
        let bad = |why: &str| {
            TrustError::Cert(format!(
                "malformed join token: {why} (expected {JOIN_TOKEN_PREFIX}<id>.<secret>:sha256:<hex>, as `vgrid join-token create` prints)"
            ))
        };
        let rest = s.trim().strip_prefix(JOIN_TOKEN_PREFIX).ok_or_else(|| bad("wrong prefix"))?;
        let (cred, fp) = rest.split_once(':').ok_or_else(|| bad("no CA fingerprint"))?;
        let hexpart = fp.strip_prefix("sha256:").ok_or_else(|| bad("the CA fingerprint is not sha256:<hex>"))?;
        if hexpart.len() != 64 || !hexpart.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("the CA fingerprint is not 64 hex digits"));
        }
        let (id, secret) = cred.split_once('.').ok_or_else(|| bad("no secret"))?;
        if id.is_empty() || secret.is_empty() {
            return Err(bad("empty id or secret"));
        }
        Ok(JoinToken { credential: cred.to_string(), ca_fingerprint: fp.to_ascii_lowercase() })
    }
}

/// Joins the grid of the coordinator at `url`: checks that its CA is the one the token names,
/// sends a certificate request for `name` with `roles`' first role, and returns the signed
/// certificate with its key. Nothing is written; the caller saves it.
pub async fn join(url: &str, token: &JoinToken, role: NodeRole, name: &str, sans: &[String]) -> Result<NodeCert, TrustError> {
    let fail = |why: String| TrustError::Join { url: url.to_string(), why };
    let failed = |e: Cause| TrustError::JoinFailed { url: url.to_string(), source: e };
    let chain = {
        let url = url.to_string();
        tokio::task::spawn_blocking(move || crate::tls::fetch_chain(&url)).await.map_err(|e| failed(e.into()))??
    };
    let ca_der = chain
        .iter()
        .find(|c| fingerprint(c) == token.ca_fingerprint)
        .ok_or_else(|| {
            fail(format!(
                "the coordinator's CA is not the one the join token names ({}); it presented {}. Wrong coordinator URL, or someone in between",
                token.ca_fingerprint,
                chain.iter().map(|c| fingerprint(c)).collect::<Vec<_>>().join(", ")
            ))
        })?
        .clone();
    let ca_pem = crate::der_to_pem(&ca_der);
    let client = crate::tls::client_builder_for(&ca_pem, None)
        .map_err(|e| failed(e.into()))?
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| failed(e.into()))?;
    let (csr, key_pem) = make_request(name, sans)?;
    let body = JoinRequest { token: token.credential.clone(), role: role.as_str().into(), name: name.into(), csr };
    let reply = signed(&client, url, "/api/v1/join", &body, "").await?;
    if fingerprint(&pem_to_der(&reply.ca)?) != token.ca_fingerprint {
        return Err(fail("the answer carries a different CA than the token names".into()));
    }
    let node = NodeCert { cert_pem: reply.cert, key_pem, ca_pem: reply.ca };
    let peer = node.peer()?;
    if peer.name != name || !peer.roles.contains(&role) {
        return Err(fail(format!("the certificate names {} as {:?}, not {name} as {role}", peer.name, peer.roles)));
    }
    Ok(node)
}

/// POSTs `body` (a certificate request) to the coordinator at `url` + `path` and reads the
/// certificate it signed; a refusal is an error with the coordinator's message after `what`.
async fn signed<B: serde::Serialize>(
    client: &reqwest::Client,
    url: &str,
    path: &str,
    body: &B,
    what: &str,
) -> Result<JoinReply, TrustError> {
    let failed = |e: Cause| TrustError::JoinFailed { url: url.to_string(), source: e };
    let resp = client.post(format!("{}{path}", url.trim_end_matches('/'))).json(body).send().await.map_err(|e| failed(e.into()))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| failed(e.into()))?;
    if !status.is_success() {
        let msg = serde_json::from_str::<vgrid_api::ErrorBody>(&text).map(|e| e.error).unwrap_or(text);
        return Err(TrustError::Join { url: url.to_string(), why: format!("{what}{msg} (HTTP {})", status.as_u16()) });
    }
    serde_json::from_str(&text).map_err(|e| TrustError::JoinAnswer { url: url.to_string(), source: e })
}

/// Asks the coordinator at `url` for a new certificate of this node valid for `sans`, over a
/// connection showing `current` (the node's certificate, which proves its name and roles; the
/// grid's CA in it is what the coordinator must show). Returns the new certificate with its new
/// key; nothing is written, the caller saves it.
pub async fn renew(url: &str, current: &NodeCert, sans: &[String]) -> Result<NodeCert, TrustError> {
    let fail = |why: String| TrustError::Join { url: url.to_string(), why };
    let failed = |e: Cause| TrustError::JoinFailed { url: url.to_string(), source: e };
    let client = crate::tls::client_builder_for(&current.ca_pem, Some(current))
        .map_err(|e| failed(e.into()))?
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| failed(e.into()))?;
    let peer = current.peer()?;
    let (csr, key_pem) = make_request(&peer.name, sans)?;
    let reply = signed(&client, url, "/api/v1/join/renew", &RenewRequest { csr }, "renewing the certificate: ").await?;
    if fingerprint(&pem_to_der(&reply.ca)?) != current.ca_fingerprint()? {
        return Err(fail("the renewed certificate comes with another CA than the node's".into()));
    }
    let node = NodeCert { cert_pem: reply.cert, key_pem, ca_pem: reply.ca };
    let got = node.peer()?;
    if got != peer {
        return Err(fail(format!("the renewed certificate names {} as {:?}, not {} as {:?}", got.name, got.roles, peer.name, peer.roles)));
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_parse_and_print() {
        let fp = format!("sha256:{}", "ab".repeat(32));
        let t: JoinToken = format!("vgrid-join1:abc.def:{fp}").parse().unwrap();
        assert_eq!(t.credential, "abc.def");
        assert_eq!(t.to_string(), format!("vgrid-join1:abc.def:{fp}"));
        for bad in ["", "vgrid-join1:abc.def", "x:abc.def:sha256:00", "vgrid-join1:abc:sha256:00", &format!("vgrid-join1:.x:{fp}")] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_certificate_knows_its_names() {
        let d = tempfile::tempdir().unwrap();
        let ca = crate::Ca::load_or_create(d.path(), "t").unwrap();
        let n = ca.issue_local("n1", &[NodeRole::ImageServer], &["localhost".into(), "127.0.0.1".into(), "::1".into()]).unwrap();
        let names = n.names().unwrap();
        assert!(names.contains(&"localhost".to_string()) && names.contains(&"127.0.0.1".to_string()), "{names:?}");
        let wanted: Vec<String> = ["LOCALHOST", "0:0:0:0:0:0:0:1", "127.0.0.1", "127.0.0.2", "h.example.org"].map(String::from).to_vec();
        assert_eq!(n.missing_names(&wanted).unwrap(), vec!["127.0.0.2".to_string(), "h.example.org".to_string()]);
    }
}
