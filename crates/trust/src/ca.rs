//! The grid CA: made once by the coordinator (`DATA/tls/ca.crt`, `ca.key` mode 0600), it signs
//! node certificates: the coordinator's own at every start, and those of hosts and image servers
//! that join.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::{fingerprint, pem_to_der, read_file, write_file, NodeCert, NodeRole, TrustError};

/// How far before its issue a certificate is valid: a host whose clock runs behind the CA's
/// (a clock jumped back, an NTP step) must still accept the certificates issued "later". With
/// one hour, a host clock 3 h behind refused every new TLS handshake (scripts/faults
/// clock-jump found it); two days covers the skew of any machine that keeps time at all.
const CLOCK_SKEW_ALLOWANCE: time::Duration = time::Duration::days(2);

/// How long a node certificate is valid.
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

pub struct Ca {
    cert_pem: String,
    cert_der: Vec<u8>,
    /// The CA re-materialised for signing (same subject and key as `cert_pem`).
    signer: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    /// Loads the CA from `dir` (`ca.crt`, `ca.key`), or makes one there if `dir` has none.
    pub fn load_or_create(dir: &Path, grid_name: &str) -> Result<Ca, TrustError> {
        let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        if crt.exists() || key.exists() {
            return Self::load(&crt, &key);
        }
        let key_pair = KeyPair::generate().map_err(|e| TrustError::cert("making the CA key", e))?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "vgrid");
        dn.push(DnType::CommonName, format!("vgrid CA {grid_name}"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - CLOCK_SKEW_ALLOWANCE;
        p.not_after = now + time::Duration::days(3650);
        let cert = p.self_signed(&key_pair).map_err(|e| TrustError::cert("making the CA certificate", e))?;
        write_file(&key, &key_pair.serialize_pem(), 0o600)?;
        write_file(&crt, &cert.pem(), 0o644)?;
        tracing::info!(ca = %crt.display(), fingerprint = %fingerprint(cert.der()), "made the grid CA");
        Self::load(&crt, &key)
    }

    fn load(crt: &PathBuf, key: &PathBuf) -> Result<Ca, TrustError> {
        let cert_pem = read_file(crt)?;
        let key_pem = read_file(key)?;
        let path = |p: &PathBuf| p.display().to_string();
        let bad = |p: &PathBuf, what: &'static str| {
            let path = path(p);
            move |e: rcgen::Error| TrustError::BadFileBecause { path, what, source: e.into() }
        };
        let key = KeyPair::from_pem(&key_pem).map_err(bad(key, "not a private key"))?;
        let cert_der = pem_to_der(&cert_pem).map_err(|e| TrustError::InFile { path: path(crt), source: Box::new(e) })?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem).map_err(bad(crt, "not a CA certificate"))?;
        let signer = params.self_signed(&key).map_err(bad(crt, "cannot be used with its key"))?;
        if signer.der().is_empty() {
            return Err(TrustError::BadFile { path: path(crt), what: "empty certificate" });
        }
        Ok(Ca { cert_pem, cert_der, signer, key })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// `sha256:<hex>` of the CA certificate: what join tokens carry and the CLI pins.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    fn node_params(mut p: CertificateParams, name: &str, roles: &[NodeRole]) -> CertificateParams {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "vgrid");
        dn.push(DnType::OrganizationalUnitName, roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(","));
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.is_ca = IsCa::NoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - CLOCK_SKEW_ALLOWANCE;
        p.not_after = now + time::Duration::seconds(NODE_CERT_VALIDITY.as_secs() as i64);
        p.use_authority_key_identifier_extension = true;
        p
    }

    /// A certificate and a new key for a node of this process (the coordinator itself, or
    /// every role of `vgrid up`), valid for `sans` (DNS names or IP addresses).
    pub fn issue_local(&self, name: &str, roles: &[NodeRole], sans: &[String]) -> Result<NodeCert, TrustError> {
        let key = KeyPair::generate().map_err(|e| TrustError::cert("making a key", e))?;
        let p = CertificateParams::new(sans.to_vec()).map_err(|e| TrustError::cert(format!("subject names {sans:?}"), e))?;
        let cert = Self::node_params(p, name, roles)
            .signed_by(&key, &self.signer, &self.key)
            .map_err(|e| TrustError::cert(format!("signing {name}"), e))?;
        Ok(NodeCert { cert_pem: cert.pem(), key_pem: key.serialize_pem(), ca_pem: self.cert_pem.clone() })
    }

    /// Signs a joining node's certificate request. The subject is set here (the CSR's is
    /// ignored); the DNS/IP names the node asks for are kept (at most 16, no wildcards).
    pub fn sign_request(&self, csr_pem: &str, name: &str, roles: &[NodeRole]) -> Result<String, TrustError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| TrustError::cert("malformed certificate request", e))?;
        let sans = &csr.params.subject_alt_names;
        if sans.len() > 16 {
            return Err(TrustError::Cert(format!("the request asks for {} names; at most 16", sans.len())));
        }
        for s in sans {
            match s {
                SanType::DnsName(d) if d.as_str().contains('*') => {
                    return Err(TrustError::Cert(format!("wildcard name {:?} refused", d.as_str())))
                }
                SanType::DnsName(_) | SanType::IpAddress(_) => {}
                other => return Err(TrustError::Cert(format!("subject name {other:?} refused: only DNS names and IP addresses"))),
            }
        }
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans.clone();
        let params = Self::node_params(p, name, roles);
        let cert =
            params.signed_by(&csr.public_key, &self.signer, &self.key).map_err(|e| TrustError::cert(format!("signing {name}"), e))?;
        Ok(cert.pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_survives_reload_and_signs_requests() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(d.path(), "t").unwrap();
        let again = Ca::load_or_create(d.path(), "t").unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());
        let (csr, key) = crate::node::make_request("h1", &["127.0.0.1".into(), "localhost".into()]).unwrap();
        let pem = again.sign_request(&csr, "h1", &[NodeRole::Host]).unwrap();
        let node = NodeCert { cert_pem: pem, key_pem: key, ca_pem: ca.cert_pem().into() };
        let peer = node.peer().unwrap();
        assert_eq!(peer.name, "h1");
        assert_eq!(peer.roles, vec![NodeRole::Host]);
        assert!(ca.sign_request("garbage", "h1", &[NodeRole::Host]).is_err());
        let (wild, _) = crate::node::make_request("h2", &["*.example.org".into()]).unwrap();
        assert!(ca.sign_request(&wild, "h2", &[NodeRole::Host]).unwrap_err().to_string().contains("wildcard"));
    }

    #[test]
    fn unusable_ca_files_are_named_with_their_cause_kept() {
        use std::error::Error;
        let d = tempfile::tempdir().unwrap();
        let (crt, key) = (d.path().join("ca.crt"), d.path().join("ca.key"));
        // One of the two missing: the file and the I/O error.
        std::fs::write(&key, "garbage").unwrap();
        let e = Ca::load_or_create(d.path(), "t").err().expect("refused");
        assert!(matches!(&e, TrustError::File { path, .. } if path == &crt.display().to_string()), "{e}");
        assert!(e.source().unwrap().downcast_ref::<std::io::Error>().is_some());
        // Both there, the key unreadable: the file, what is wrong, and rcgen's error.
        std::fs::write(&crt, "garbage").unwrap();
        let e = Ca::load_or_create(d.path(), "t").err().expect("refused");
        let cause = e.source().expect("the parser's error is kept").to_string();
        assert_eq!(e.to_string(), format!("{}: not a private key: {cause}", key.display()));
        // A good key beside a bad certificate: the file, then the certificate's own error.
        let good = tempfile::tempdir().unwrap();
        Ca::load_or_create(good.path(), "t").unwrap();
        std::fs::copy(good.path().join("ca.key"), &key).unwrap();
        let e = Ca::load_or_create(d.path(), "t").err().expect("refused");
        assert_eq!(e.to_string(), format!("{}: certificate: no certificate in the PEM text", crt.display()));
        assert_eq!(e.source().unwrap().to_string(), "certificate: no certificate in the PEM text");
    }
}
