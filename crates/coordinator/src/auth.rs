//! Users identified by SSH public keys, login by signed challenge, short-lived bearer tokens,
//! and the audit log.
//!
//! A user registers one or more OpenSSH public keys (ed25519, ecdsa, rsa). To log in, the
//! client asks for a challenge, signs its message as an SSH signature (`SSHSIG`, namespace
//! [`LOGIN_NAMESPACE`]: what `ssh-keygen -Y sign -n vgrid-login` makes, and what a key in
//! ssh-agent can make), and receives a bearer token. Only a hash of each token is stored, so a
//! copy of the state database grants nothing. Challenges are single-use and expire.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ssh_key::{PublicKey, SshSig};
use vgrid_api::auth::{AuditEntry, Challenge, LoginToken, Quota, UserCreate, UserInfo, LOGIN_NAMESPACE};

use crate::state::records::record_key;
use crate::state::{decode, encode, Expect, RecordStore, StateError};

const USERS: &str = "users";
const TOKENS: &str = "tokens";
/// How long a challenge may be answered.
const CHALLENGE_TTL: Duration = Duration::from_secs(120);
/// Challenges kept at once (a flood of unanswered ones evicts the oldest).
const MAX_CHALLENGES: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token, or one that is not valid (unknown, expired, malformed): HTTP 401.
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated, not allowed: HTTP 403.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// A public key line that is not an OpenSSH key (HTTP 400); `start` is its beginning.
    #[error(
        "not an OpenSSH public key ({source}): {start:?}...; expected a line like \"ssh-ed25519 AAAA... comment\" (ed25519, ecdsa-sha2-nistp256/384 or ssh-rsa)"
    )]
    NotAKey {
        start: String,
        #[source]
        source: ssh_key::Error,
    },
    /// A key that cannot be written back as an OpenSSH line (HTTP 400).
    #[error("{0}")]
    KeyEncoding(#[source] ssh_key::Error),
    /// A login whose signature is not an SSH signature (HTTP 401).
    #[error("login as {user} failed: malformed SSH signature: {source}")]
    BadSignature {
        user: String,
        #[source]
        source: ssh_key::Error,
    },
    /// A node's certificate request that the grid CA does not sign (HTTP 400).
    #[error("{0}")]
    CertRequest(#[source] vgrid_trust::TrustError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("audit log {}: {source}", path.display())]
    Audit {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Who is calling: the user a valid token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub admin: bool,
}

impl Principal {
    /// May this principal act on an object owned by `owner`?
    pub fn may_act_on(&self, owner: &str) -> bool {
        self.admin || self.user == owner
    }

    /// `Forbidden` unless the principal owns the object or is an admin.
    pub fn check_owner(&self, what: &str, owner: &str) -> Result<(), AuthError> {
        if self.may_act_on(owner) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!("{what} belongs to another user; {} may not act on it", self.user)))
        }
    }

    /// `Forbidden` unless the principal is an admin.
    pub fn check_admin(&self, what: &str) -> Result<(), AuthError> {
        if self.admin {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!("{what} is for admins only; {} is not an admin", self.user)))
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TokenRecord {
    user: String,
    expires: u64,
}

struct PendingChallenge {
    user: String,
    message: String,
    issued: Instant,
}

/// Users, challenges, tokens and the audit log of one coordinator.
pub struct Auth {
    records: RecordStore,
    challenges: Mutex<HashMap<String, PendingChallenge>>,
    token_ttl: Duration,
    audit: Mutex<Option<std::fs::File>>,
    audit_path: Option<PathBuf>,
    /// Distinguishes this coordinator in challenge messages, so a signature made for one
    /// coordinator is worthless at another.
    realm: String,
}

pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(crate) fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn token_key(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// Signs a login challenge's message with a private key: the SSH signature (PEM) that
/// `ssh-keygen -Y sign -n vgrid-login` would make.
pub fn sign_challenge(key: &ssh_key::PrivateKey, message: &str) -> Result<String, String> {
    use ssh_key::private::KeypairData;
    if key.is_encrypted() {
        return Err("the private key is encrypted with a passphrase; decrypt a copy (ssh-keygen -p) or use an unencrypted key".into());
    }
    let sig = match key.key_data() {
        KeypairData::Rsa(kp) => {
            // ssh-key 0.6 rebuilds RSA private keys from the wrong primes, so sign with `rsa`.
            use rsa::signature::{SignatureEncoding, Signer};
            let big = |m: &ssh_key::Mpint| -> Result<rsa::BigUint, String> {
                Ok(rsa::BigUint::from_bytes_be(m.as_positive_bytes().ok_or("malformed RSA key")?))
            };
            let private = rsa::RsaPrivateKey::from_components(
                big(&kp.public.n)?,
                big(&kp.public.e)?,
                big(&kp.private.d)?,
                vec![big(&kp.private.p)?, big(&kp.private.q)?],
            )
            .map_err(|e| format!("RSA key: {e}"))?;
            let data = SshSig::signed_data(LOGIN_NAMESPACE, ssh_key::HashAlg::Sha512, message.as_bytes()).map_err(|e| e.to_string())?;
            let s =
                rsa::pkcs1v15::SigningKey::<rsa::sha2::Sha512>::new(private).try_sign(&data).map_err(|e| format!("RSA signature: {e}"))?;
            let signature = ssh_key::Signature::new(ssh_key::Algorithm::Rsa { hash: Some(ssh_key::HashAlg::Sha512) }, s.to_vec())
                .map_err(|e| e.to_string())?;
            SshSig::new(key.public_key().key_data().clone(), LOGIN_NAMESPACE, ssh_key::HashAlg::Sha512, signature)
                .map_err(|e| e.to_string())?
        }
        _ => key.sign(LOGIN_NAMESPACE, ssh_key::HashAlg::Sha512, message.as_bytes()).map_err(|e| e.to_string())?,
    };
    sig.to_pem(ssh_key::LineEnding::LF).map_err(|e| e.to_string())
}

/// Parses an OpenSSH public key line, with a clear error.
pub fn parse_public_key(line: &str) -> Result<PublicKey, AuthError> {
    let line = line.trim();
    PublicKey::from_openssh(line).map_err(|source| AuthError::NotAKey { start: line.chars().take(24).collect(), source })
}

/// This coordinator's realm (made on first start; of two coordinators making it at once, the
/// first one's).
async fn realm(records: &RecordStore) -> Result<String, StateError> {
    loop {
        if let Some(e) = records.get_record("meta", "realm").await? {
            return Ok(String::from_utf8_lossy(&e.value).into_owned());
        }
        let r = random_hex(8);
        match records.put_record_if("meta", "realm", r.as_bytes().to_vec(), Expect::Absent).await {
            Ok(_) => return Ok(r),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e),
        }
    }
}

fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(ssh_key::HashAlg::Sha256).to_string()
}

impl Auth {
    /// `audit`: the audit log file (JSON lines), appended to; `None` keeps no log.
    pub async fn new(records: RecordStore, audit: Option<PathBuf>, token_ttl: Duration) -> Result<Arc<Auth>, AuthError> {
        let file = match &audit {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| AuthError::Audit { path: p.clone(), source })?,
            ),
            None => None,
        };
        let realm = realm(&records).await?;
        Ok(Arc::new(Auth { records, challenges: Mutex::new(HashMap::new()), token_ttl, audit: Mutex::new(file), audit_path: audit, realm }))
    }

    async fn load_user(&self, name: &str) -> Result<Option<UserInfo>, AuthError> {
        let Some(e) = self.records.get_record(USERS, name).await? else { return Ok(None) };
        Ok(Some(decode(&record_key(USERS, name), &e.value)?))
    }

    async fn store_user(&self, u: &UserInfo) -> Result<(), AuthError> {
        self.records.put_record(USERS, &u.name, encode(u)).await?;
        Ok(())
    }

    /// Adds a user. Keys are checked and normalised; a key already registered to another user
    /// is refused (a key identifies one user).
    pub async fn add_user(&self, req: UserCreate) -> Result<UserInfo, AuthError> {
        vgrid_api::auth::validate_user_name(&req.name).map_err(AuthError::BadRequest)?;
        if req.keys.is_empty() {
            return Err(AuthError::BadRequest(format!("user {}: at least one public key is needed", req.name)));
        }
        let exists = || AuthError::Conflict(format!("user {} exists already", req.name));
        if self.load_user(&req.name).await?.is_some() {
            return Err(exists());
        }
        let mut keys = Vec::new();
        let mut fingerprints = Vec::new();
        for k in &req.keys {
            let key = parse_public_key(k)?;
            let fp = fingerprint(&key);
            if let Some(other) = self.users().await?.into_iter().find(|u| u.fingerprints.contains(&fp)) {
                return Err(AuthError::Conflict(format!("key {fp} is already registered to user {}", other.name)));
            }
            keys.push(key.to_openssh().map_err(AuthError::KeyEncoding)?);
            fingerprints.push(fp);
        }
        let u = UserInfo { name: req.name.clone(), admin: req.admin, keys, fingerprints, quota: req.quota, created: now() };
        // Created only if no one created it meanwhile.
        match self.records.put_record_if(USERS, &u.name, encode(&u), Expect::Absent).await {
            Err(StateError::Conflict { .. }) => return Err(exists()),
            r => r?,
        };
        tracing::info!(user = %u.name, admin = u.admin, keys = ?u.fingerprints, "user added");
        Ok(u)
    }

    pub async fn users(&self) -> Result<Vec<UserInfo>, AuthError> {
        let (records, _) = self.records.list_records(USERS).await?;
        Ok(records.into_iter().map(|(k, e)| decode(&record_key(USERS, &k), &e.value)).collect::<Result<_, _>>()?)
    }

    pub async fn user(&self, name: &str) -> Result<UserInfo, AuthError> {
        self.load_user(name).await?.ok_or_else(|| AuthError::NotFound(format!("no user named {name}")))
    }

    /// Removes a user and every token of theirs.
    pub async fn remove_user(&self, name: &str) -> Result<UserInfo, AuthError> {
        let u = self.user(name).await?;
        self.records.delete_record(USERS, name).await?;
        for (k, e) in self.records.list_records(TOKENS).await?.0 {
            if serde_json::from_slice::<TokenRecord>(&e.value).map(|t| t.user == name).unwrap_or(true) {
                self.records.delete_record(TOKENS, &k).await?;
            }
        }
        tracing::info!(user = %name, "user removed");
        Ok(u)
    }

    pub async fn set_quota(&self, name: &str, quota: Quota) -> Result<UserInfo, AuthError> {
        let mut u = self.user(name).await?;
        u.quota = quota;
        self.store_user(&u).await?;
        Ok(u)
    }

    /// Creates the first admin when there are no users yet. Returns whether it did.
    pub async fn bootstrap_admin(&self, name: &str, key: &str) -> Result<bool, AuthError> {
        if !self.users().await?.is_empty() {
            return Ok(false);
        }
        self.add_user(UserCreate { name: name.to_string(), keys: vec![key.to_string()], admin: true, quota: Quota::default() }).await?;
        Ok(true)
    }

    /// A single-use challenge for `user`. Issued for unknown users too (answering it fails),
    /// so a challenge does not tell which users exist.
    pub fn challenge(&self, user: &str) -> Result<Challenge, AuthError> {
        vgrid_api::auth::validate_user_name(user).map_err(AuthError::BadRequest)?;
        let nonce = random_hex(24);
        let message = format!("vgrid login to {} as {user}, nonce {nonce}", self.realm);
        let mut c = self.challenges.lock().unwrap_or_else(|e| e.into_inner());
        c.retain(|_, p| p.issued.elapsed() < CHALLENGE_TTL);
        if c.len() >= MAX_CHALLENGES {
            if let Some(oldest) = c.iter().min_by_key(|(_, p)| p.issued).map(|(k, _)| k.clone()) {
                c.remove(&oldest);
            }
        }
        c.insert(nonce.clone(), PendingChallenge { user: user.to_string(), message: message.clone(), issued: Instant::now() });
        Ok(Challenge {
            user: user.to_string(),
            nonce,
            message,
            namespace: LOGIN_NAMESPACE.to_string(),
            expires_in: CHALLENGE_TTL.as_secs(),
        })
    }

    /// Checks a signed challenge and issues a token.
    pub async fn login(&self, user: &str, nonce: &str, signature: &str) -> Result<LoginToken, AuthError> {
        let pending = self.challenges.lock().unwrap_or_else(|e| e.into_inner()).remove(nonce);
        let fail = |why: &str| AuthError::Unauthenticated(format!("login as {user} failed: {why}"));
        let Some(p) = pending else {
            return Err(fail("unknown or already used challenge; ask for a new one"));
        };
        if p.user != user {
            return Err(fail("the challenge was issued for another user"));
        }
        if p.issued.elapsed() >= CHALLENGE_TTL {
            return Err(fail("the challenge expired; ask for a new one"));
        }
        let sig = SshSig::from_pem(signature.trim()).map_err(|source| AuthError::BadSignature { user: user.to_string(), source })?;
        let Some(u) = self.load_user(user).await? else {
            return Err(fail("no such user, or none of the user's keys made this signature"));
        };
        let mut matched = None;
        for k in &u.keys {
            let key = parse_public_key(k)?;
            if key.verify(LOGIN_NAMESPACE, p.message.as_bytes(), &sig).is_ok() {
                matched = Some(fingerprint(&key));
                break;
            }
        }
        let Some(fp) = matched else {
            return Err(fail("no such user, or none of the user's keys made this signature"));
        };
        self.prune_tokens().await;
        let token = format!("vgt_{}", random_hex(32));
        let expires = now() + self.token_ttl.as_secs();
        let rec = TokenRecord { user: user.to_string(), expires };
        self.records.put_record(TOKENS, &token_key(&token), encode(&rec)).await?;
        tracing::info!(user, key = %fp, "login");
        Ok(LoginToken { user: user.to_string(), admin: u.admin, token, expires })
    }

    async fn prune_tokens(&self) {
        let t = now();
        for (k, e) in self.records.list_records(TOKENS).await.map(|(r, _)| r).unwrap_or_default() {
            if serde_json::from_slice::<TokenRecord>(&e.value).map(|r| r.expires <= t).unwrap_or(true) {
                let _ = self.records.delete_record(TOKENS, &k).await;
            }
        }
    }

    /// The principal of a bearer token.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        Ok(self.authenticate_until(token).await?.0)
    }

    /// The principal of a bearer token and when the token expires (seconds since the epoch).
    pub async fn authenticate_until(&self, token: &str) -> Result<(Principal, u64), AuthError> {
        let unauth = |why: &str| AuthError::Unauthenticated(format!("{why}; log in again with `vgrid login`"));
        if !token.starts_with("vgt_") || token.len() != 68 {
            return Err(unauth("malformed token"));
        }
        let Some(e) = self.records.get_record(TOKENS, &token_key(token)).await? else {
            return Err(unauth("unknown token"));
        };
        let rec: TokenRecord = serde_json::from_slice(&e.value).map_err(|_| unauth("unreadable token record"))?;
        if rec.expires <= now() {
            let _ = self.records.delete_record(TOKENS, &token_key(token)).await;
            return Err(unauth("the token expired"));
        }
        let Some(u) = self.load_user(&rec.user).await? else {
            return Err(unauth(&format!("user {} no longer exists", rec.user)));
        };
        Ok((Principal { user: u.name, admin: u.admin }, rec.expires))
    }

    /// Ends a token (logout).
    pub async fn revoke(&self, token: &str) -> Result<(), AuthError> {
        self.records.delete_record(TOKENS, &token_key(token)).await?;
        Ok(())
    }

    /// Appends one entry to the audit log (and to the tracing log).
    pub fn audit(&self, e: &AuditEntry) {
        tracing::info!(target: "vgrid::audit", user = %e.user, method = %e.method, path = %e.path, status = e.status, error = e.error.as_deref().unwrap_or(""), "audit");
        let mut g = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = g.as_mut() {
            let mut line = serde_json::to_vec(e).expect("serialises");
            line.push(b'\n');
            if let Err(err) = f.write_all(&line) {
                tracing::error!("cannot write the audit log: {err}");
            }
        }
    }

    /// Audit entries, oldest first, optionally only of `user` and since `since` (epoch s).
    pub fn audit_entries(&self, user: Option<&str>, since: Option<f64>) -> Vec<AuditEntry> {
        let Some(p) = &self.audit_path else { return Vec::new() };
        let text = std::fs::read_to_string(p).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<AuditEntry>(l).ok())
            .filter(|e| user.is_none_or(|u| e.user == u))
            .filter(|e| since.is_none_or(|s| e.time >= s))
            .collect()
    }
}

/// Host agents and image servers in the coordinator's process check tokens here directly.
impl vgrid_trust::caller::UserTokens for Auth {
    fn verify<'a>(&'a self, token: &'a str) -> vgrid_trust::caller::BoxFuture<'a, Result<vgrid_trust::caller::UserId, String>> {
        Box::pin(async move {
            let p = self.authenticate(token).await.map_err(|e| e.to_string())?;
            let max_stored_bytes = self.user(&p.user).await.ok().and_then(|u| u.quota.stored_bytes);
            Ok(vgrid_trust::caller::UserId { name: p.user, admin: p.admin, max_stored_bytes })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{open, StateConfig};
    use ssh_key::{Algorithm, LineEnding, PrivateKey};

    async fn auth() -> (tempfile::TempDir, Arc<Auth>) {
        let d = tempfile::tempdir().unwrap();
        let st = open(&StateConfig::Memory).unwrap().records();
        let a = Auth::new(st, Some(d.path().join("audit.log")), Duration::from_secs(3600)).await.unwrap();
        (d, a)
    }

    fn key(alg: Algorithm) -> PrivateKey {
        PrivateKey::random(&mut rand::rngs::OsRng, alg).unwrap()
    }

    fn sign(k: &PrivateKey, msg: &str) -> String {
        sign_challenge(k, msg).unwrap()
    }

    async fn add(a: &Auth, name: &str, k: &PrivateKey, admin: bool) {
        a.add_user(UserCreate { name: name.into(), keys: vec![k.public_key().to_openssh().unwrap()], admin, quota: Quota::default() })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn login_with_ed25519_and_ecdsa_keys_gives_a_token() {
        let (_d, a) = auth().await;
        for (name, alg) in [("ed", Algorithm::Ed25519), ("ec", Algorithm::Ecdsa { curve: ssh_key::EcdsaCurve::NistP256 })] {
            let k = key(alg);
            add(&a, name, &k, false).await;
            let c = a.challenge(name).unwrap();
            let t = a.login(name, &c.nonce, &sign(&k, &c.message)).await.unwrap();
            assert_eq!(a.authenticate(&t.token).await.unwrap(), Principal { user: name.into(), admin: false });
            // Single use.
            assert!(matches!(a.login(name, &c.nonce, &sign(&k, &c.message)).await, Err(AuthError::Unauthenticated(_))));
            a.revoke(&t.token).await.unwrap();
            assert!(matches!(a.authenticate(&t.token).await, Err(AuthError::Unauthenticated(_))));
        }
    }

    #[tokio::test]
    async fn wrong_key_wrong_user_wrong_message_and_forged_tokens_are_refused() {
        let (_d, a) = auth().await;
        let alice = key(Algorithm::Ed25519);
        let bob = key(Algorithm::Ed25519);
        add(&a, "alice", &alice, true).await;
        add(&a, "bob", &bob, false).await;
        // Bob's key cannot log in as alice.
        let c = a.challenge("alice").unwrap();
        let e = a.login("alice", &c.nonce, &sign(&bob, &c.message)).await.unwrap_err();
        assert!(e.to_string().contains("none of the user's keys"), "{e}");
        // A signature over another message, or with another namespace.
        let c = a.challenge("alice").unwrap();
        assert!(a.login("alice", &c.nonce, &sign(&alice, "something else")).await.is_err());
        let c = a.challenge("alice").unwrap();
        let other_ns = alice.sign("git", ssh_key::HashAlg::Sha512, c.message.as_bytes()).unwrap().to_pem(LineEnding::LF).unwrap();
        assert!(a.login("alice", &c.nonce, &other_ns).await.is_err());
        // A challenge for bob answered as alice.
        let c = a.challenge("bob").unwrap();
        assert!(a.login("alice", &c.nonce, &sign(&alice, &c.message)).await.is_err());
        // Garbage signature: a clear error.
        let c = a.challenge("alice").unwrap();
        let e = a.login("alice", &c.nonce, "not a signature").await.unwrap_err();
        assert!(e.to_string().contains("malformed SSH signature"), "{e}");
        assert!(matches!(e, AuthError::BadSignature { .. }) && std::error::Error::source(&e).is_some(), "{e:?}");
        // Forged tokens.
        for t in ["", "vgt_", "Bearer x", &format!("vgt_{}", "0".repeat(64))] {
            assert!(matches!(a.authenticate(t).await, Err(AuthError::Unauthenticated(_))), "{t:?}");
        }
    }

    #[tokio::test]
    async fn expired_tokens_are_refused_and_removed_users_lose_their_tokens() {
        let st = open(&StateConfig::Memory).unwrap().records();
        let a = Auth::new(st, None, Duration::from_secs(0)).await.unwrap();
        let k = key(Algorithm::Ed25519);
        add(&a, "carol", &k, false).await;
        let c = a.challenge("carol").unwrap();
        let t = a.login("carol", &c.nonce, &sign(&k, &c.message)).await.unwrap();
        let e = a.authenticate(&t.token).await.unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");

        let (_d2, a) = auth().await;
        add(&a, "dave", &k, false).await;
        let c = a.challenge("dave").unwrap();
        let t = a.login("dave", &c.nonce, &sign(&k, &c.message)).await.unwrap();
        a.remove_user("dave").await.unwrap();
        assert!(a.authenticate(&t.token).await.is_err());
    }

    #[tokio::test]
    async fn bad_keys_duplicate_users_and_shared_keys_are_refused() {
        let (_d, a) = auth().await;
        let k = key(Algorithm::Ed25519);
        let e = a
            .add_user(UserCreate { name: "x".into(), keys: vec!["ssh-ed25519 notbase64".into()], admin: false, quota: Quota::default() })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not an OpenSSH public key"), "{e}");
        assert!(matches!(e, AuthError::NotAKey { .. }) && std::error::Error::source(&e).is_some(), "{e:?}");
        add(&a, "x", &k, false).await;
        let e = a
            .add_user(UserCreate {
                name: "x".into(),
                keys: vec![k.public_key().to_openssh().unwrap()],
                admin: false,
                quota: Quota::default(),
            })
            .await
            .unwrap_err();
        assert!(matches!(e, AuthError::Conflict(_)));
        let e = a
            .add_user(UserCreate {
                name: "y".into(),
                keys: vec![k.public_key().to_openssh().unwrap()],
                admin: false,
                quota: Quota::default(),
            })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("already registered to user x"), "{e}");
        // Bootstrap only when there are no users.
        assert!(!a.bootstrap_admin("root", &key(Algorithm::Ed25519).public_key().to_openssh().unwrap()).await.unwrap());
    }

    #[tokio::test]
    async fn rsa_keys_log_in() {
        let (_d, a) = auth().await;
        let k = PrivateKey::from(ssh_key::private::RsaKeypair::random(&mut rand::rngs::OsRng, 2048).unwrap());
        add(&a, "r", &k, false).await;
        let c = a.challenge("r").unwrap();
        a.login("r", &c.nonce, &sign(&k, &c.message)).await.unwrap();
    }
}
