//! A minimal ssh-agent client: list the agent's keys (`SSH_AGENTC_REQUEST_IDENTITIES`) and have
//! it sign (`SSH_AGENTC_SIGN_REQUEST`), as in draft-miller-ssh-agent. Enough for `vgrid login`
//! to sign its challenge with a key that exists only in the agent (a `.pub` file on disk, a
//! passphrase-protected key, a hardware token behind the agent).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SSH_AGENT_FAILURE: u8 = 5;
const SSH_AGENTC_REQUEST_IDENTITIES: u8 = 11;
const SSH_AGENT_IDENTITIES_ANSWER: u8 = 12;
const SSH_AGENTC_SIGN_REQUEST: u8 = 13;
const SSH_AGENT_SIGN_RESPONSE: u8 = 14;
/// Sign flag: an RSA key signs with rsa-sha2-512 (not the SHA-1 `ssh-rsa`).
const SSH_AGENT_RSA_SHA2_512: u32 = 4;
/// Upper bound of one agent message (OpenSSH's own limit is 256 KiB).
const MAX_MESSAGE: usize = 256 * 1024;

/// One key the agent holds.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The public key in the SSH wire format.
    pub blob: Vec<u8>,
    pub comment: String,
}

impl Identity {
    pub fn public_key(&self) -> Option<ssh_key::PublicKey> {
        ssh_key::PublicKey::from_bytes(&self.blob).ok()
    }
}

/// A connection to the agent at `$SSH_AUTH_SOCK`.
pub struct SshAgent {
    path: PathBuf,
    stream: UnixStream,
}

impl SshAgent {
    /// Connects to `$SSH_AUTH_SOCK`; `Ok(None)` when the variable is unset or empty.
    pub fn from_env() -> anyhow::Result<Option<SshAgent>> {
        match std::env::var_os("SSH_AUTH_SOCK") {
            Some(p) if !p.is_empty() => Self::connect(Path::new(&p)).map(Some),
            _ => Ok(None),
        }
    }

    pub fn connect(path: &Path) -> anyhow::Result<SshAgent> {
        let stream = UnixStream::connect(path)
            .map_err(|e| anyhow::anyhow!("cannot reach the ssh-agent at {} ($SSH_AUTH_SOCK): {e}", path.display()))?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
        Ok(SshAgent { path: path.to_path_buf(), stream })
    }

    fn err(&self, what: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("ssh-agent at {}: {what}", self.path.display())
    }

    fn call(&mut self, msg: &[u8]) -> anyhow::Result<(u8, Vec<u8>)> {
        let mut out = Vec::with_capacity(msg.len() + 4);
        out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        out.extend_from_slice(msg);
        self.stream.write_all(&out).map_err(|e| self.err(format!("sending: {e}")))?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).map_err(|e| self.err(format!("reading the answer: {e}")))?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_MESSAGE {
            return Err(self.err(format!("answer of {len} bytes")));
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).map_err(|e| self.err(format!("reading the answer: {e}")))?;
        let kind = body[0];
        body.remove(0);
        Ok((kind, body))
    }

    /// The keys the agent holds.
    pub fn identities(&mut self) -> anyhow::Result<Vec<Identity>> {
        let (kind, body) = self.call(&[SSH_AGENTC_REQUEST_IDENTITIES])?;
        if kind != SSH_AGENT_IDENTITIES_ANSWER {
            return Err(self.err(format!("unexpected answer type {kind} to a request for identities")));
        }
        let mut r = Reader(&body);
        let n = r.u32().ok_or_else(|| self.err("truncated identities answer"))?;
        let mut out = Vec::new();
        for _ in 0..n {
            let blob = r.string().ok_or_else(|| self.err("truncated identities answer"))?;
            let comment = r.string().ok_or_else(|| self.err("truncated identities answer"))?;
            out.push(Identity { blob: blob.to_vec(), comment: String::from_utf8_lossy(comment).into_owned() });
        }
        Ok(out)
    }

    /// Has the agent sign `data` with the key `blob`; returns the SSH signature (algorithm
    /// name and signature bytes, wire format) as an `ssh_key::Signature`.
    pub fn sign(&mut self, id: &Identity, data: &[u8]) -> anyhow::Result<ssh_key::Signature> {
        let mut msg = vec![SSH_AGENTC_SIGN_REQUEST];
        put_string(&mut msg, &id.blob);
        put_string(&mut msg, data);
        msg.extend_from_slice(&SSH_AGENT_RSA_SHA2_512.to_be_bytes());
        let (kind, body) = self.call(&msg)?;
        match kind {
            SSH_AGENT_SIGN_RESPONSE => {}
            SSH_AGENT_FAILURE => {
                return Err(self.err(format!(
                    "refused to sign with the key {} (confirmation denied, or the key was removed?)",
                    if id.comment.is_empty() { "without comment" } else { &id.comment }
                )))
            }
            k => return Err(self.err(format!("unexpected answer type {k} to a sign request"))),
        }
        let mut r = Reader(&body);
        let sig = r.string().ok_or_else(|| self.err("truncated sign answer"))?;
        let mut s = Reader(sig);
        let alg = s.string().ok_or_else(|| self.err("malformed signature"))?;
        let bytes = s.string().ok_or_else(|| self.err("malformed signature"))?;
        let alg = std::str::from_utf8(alg).map_err(|_| self.err("malformed signature algorithm"))?;
        let alg = ssh_key::Algorithm::new(alg).map_err(|e| self.err(format!("signature algorithm {alg:?}: {e}")))?;
        ssh_key::Signature::new(alg, bytes.to_vec()).map_err(|e| self.err(format!("signature: {e}")))
    }
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_at_checked(4)?;
        self.0 = t;
        Some(u32::from_be_bytes(h.try_into().ok()?))
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        let (h, t) = self.0.split_at_checked(n)?;
        self.0 = t;
        Some(h)
    }
}

/// Signs the login challenge `message` through the agent with `id`: the same SSH signature
/// (`vgrid-login` namespace, SHA-512) as `vgrid_coordinator::auth::sign_challenge` makes from a
/// key file, as PEM.
pub fn sign_challenge(agent: &mut SshAgent, id: &Identity, message: &str) -> anyhow::Result<String> {
    use ssh_key::SshSig;
    let public = id.public_key().ok_or_else(|| agent.err("the agent holds a key this program cannot read"))?;
    let ns = vgrid_api::auth::LOGIN_NAMESPACE;
    let data = SshSig::signed_data(ns, ssh_key::HashAlg::Sha512, message.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let signature = agent.sign(id, &data)?;
    let sig = SshSig::new(public.key_data().clone(), ns, ssh_key::HashAlg::Sha512, signature).map_err(|e| anyhow::anyhow!("{e}"))?;
    sig.to_pem(ssh_key::LineEnding::LF).map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_refuses_truncated_strings() {
        let mut v = Vec::new();
        put_string(&mut v, b"abc");
        assert_eq!(Reader(&v).string(), Some(&b"abc"[..]));
        assert_eq!(Reader(&v[..5]).string(), None);
        assert_eq!(Reader(&[0, 0]).u32(), None);
    }
}
