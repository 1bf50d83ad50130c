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

use crate::state::{StateError, StateStore};

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
    #[error(transparent)]
    State(#[from] StateError),
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
    state: Arc<dyn StateStore>,
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
    PublicKey::from_openssh(line).map_err(|e| {
        let start: String = line.chars().take(24).collect();
        AuthError::BadRequest(format!(
            "not an OpenSSH public key ({e}): {start:?}...; expected a line like \"ssh-ed25519 AAAA... comment\" (ed25519, ecdsa-sha2-nistp256/384 or ssh-rsa)"
        ))
    })
}

fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(ssh_key::HashAlg::Sha256).to_string()
}

impl Auth {
    /// `audit`: the audit log file (JSON lines), appended to; `None` keeps no log.
    pub fn new(state: Arc<dyn StateStore>, audit: Option<PathBuf>, token_ttl: Duration) -> Result<Arc<Auth>, AuthError> {
        let file = match &audit {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| AuthError::State(StateError::Db(format!("audit log {}: {e}", p.display()))))?,
            ),
            None => None,
        };
        let realm = match state.get_record("meta", "realm")? {
            Some(r) => String::from_utf8_lossy(&r).into_owned(),
            None => {
                let r = random_hex(8);
                state.put_record("meta", "realm", r.as_bytes())?;
                r
            }
        };
        Ok(Arc::new(Auth { state, challenges: Mutex::new(HashMap::new()), token_ttl, audit: Mutex::new(file), audit_path: audit, realm }))
    }

    fn load_user(&self, name: &str) -> Result<Option<UserInfo>, AuthError> {
        let Some(bytes) = self.state.get_record(USERS, name)? else { return Ok(None) };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| AuthError::State(StateError::Corrupt { id: format!("user {name}"), cause: e.to_string() }))
    }

    fn store_user(&self, u: &UserInfo) -> Result<(), AuthError> {
        let bytes = serde_json::to_vec(u).expect("a user serialises");
        self.state.put_record(USERS, &u.name, &bytes)?;
        Ok(())
    }

    /// Adds a user. Keys are checked and normalised; a key already registered to another user
    /// is refused (a key identifies one user).
    pub fn add_user(&self, req: UserCreate) -> Result<UserInfo, AuthError> {
        vgrid_api::auth::validate_user_name(&req.name).map_err(AuthError::BadRequest)?;
        if req.keys.is_empty() {
            return Err(AuthError::BadRequest(format!("user {}: at least one public key is needed", req.name)));
        }
        if self.load_user(&req.name)?.is_some() {
            return Err(AuthError::Conflict(format!("user {} exists already", req.name)));
        }
        let mut keys = Vec::new();
        let mut fingerprints = Vec::new();
        for k in &req.keys {
            let key = parse_public_key(k)?;
            let fp = fingerprint(&key);
            if let Some(other) = self.users()?.into_iter().find(|u| u.fingerprints.contains(&fp)) {
                return Err(AuthError::Conflict(format!("key {fp} is already registered to user {}", other.name)));
            }
            keys.push(key.to_openssh().map_err(|e| AuthError::BadRequest(e.to_string()))?);
            fingerprints.push(fp);
        }
        let u = UserInfo { name: req.name, admin: req.admin, keys, fingerprints, quota: req.quota, created: now() };
        self.store_user(&u)?;
        tracing::info!(user = %u.name, admin = u.admin, keys = ?u.fingerprints, "user added");
        Ok(u)
    }

    pub fn users(&self) -> Result<Vec<UserInfo>, AuthError> {
        let mut out = Vec::new();
        for (k, v) in self.state.list_records(USERS)? {
            out.push(
                serde_json::from_slice(&v)
                    .map_err(|e| AuthError::State(StateError::Corrupt { id: format!("user {k}"), cause: e.to_string() }))?,
            );
        }
        Ok(out)
    }

    pub fn user(&self, name: &str) -> Result<UserInfo, AuthError> {
        self.load_user(name)?.ok_or_else(|| AuthError::NotFound(format!("no user named {name}")))
    }

    /// Removes a user and every token of theirs.
    pub fn remove_user(&self, name: &str) -> Result<UserInfo, AuthError> {
        let u = self.user(name)?;
        self.state.delete_record(USERS, name)?;
        for (k, v) in self.state.list_records(TOKENS)? {
            if serde_json::from_slice::<TokenRecord>(&v).map(|t| t.user == name).unwrap_or(true) {
                self.state.delete_record(TOKENS, &k)?;
            }
        }
        tracing::info!(user = %name, "user removed");
        Ok(u)
    }

    pub fn set_quota(&self, name: &str, quota: Quota) -> Result<UserInfo, AuthError> {
        let mut u = self.user(name)?;
        u.quota = quota;
        self.store_user(&u)?;
        Ok(u)
    }

    /// Creates the first admin when there are no users yet. Returns whether it did.
    pub fn bootstrap_admin(&self, name: &str, key: &str) -> Result<bool, AuthError> {
        if !self.users()?.is_empty() {
            return Ok(false);
        }
        self.add_user(UserCreate { name: name.to_string(), keys: vec![key.to_string()], admin: true, quota: Quota::default() })?;
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
    pub fn login(&self, user: &str, nonce: &str, signature: &str) -> Result<LoginToken, AuthError> {
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
        let sig = SshSig::from_pem(signature.trim()).map_err(|e| fail(&format!("malformed SSH signature: {e}")))?;
        let Some(u) = self.load_user(user)? else {
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
        self.prune_tokens();
        let token = format!("vgt_{}", random_hex(32));
        let expires = now() + self.token_ttl.as_secs();
        let rec = TokenRecord { user: user.to_string(), expires };
        self.state.put_record(TOKENS, &token_key(&token), &serde_json::to_vec(&rec).expect("serialises"))?;
        tracing::info!(user, key = %fp, "login");
        Ok(LoginToken { user: user.to_string(), admin: u.admin, token, expires })
    }

    fn prune_tokens(&self) {
        let t = now();
        for (k, v) in self.state.list_records(TOKENS).unwrap_or_default() {
            if serde_json::from_slice::<TokenRecord>(&v).map(|r| r.expires <= t).unwrap_or(true) {
                let _ = self.state.delete_record(TOKENS, &k);
            }
        }
    }

    /// The principal of a bearer token.
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let unauth = |why: &str| AuthError::Unauthenticated(format!("{why}; log in again with `vgrid login`"));
        if !token.starts_with("vgt_") || token.len() != 68 {
            return Err(unauth("malformed token"));
        }
        let Some(bytes) = self.state.get_record(TOKENS, &token_key(token))? else {
            return Err(unauth("unknown token"));
        };
        let rec: TokenRecord = serde_json::from_slice(&bytes).map_err(|_| unauth("unreadable token record"))?;
        if rec.expires <= now() {
            let _ = self.state.delete_record(TOKENS, &token_key(token));
            return Err(unauth("the token expired"));
        }
        let Some(u) = self.load_user(&rec.user)? else {
            return Err(unauth(&format!("user {} no longer exists", rec.user)));
        };
        Ok(Principal { user: u.name, admin: u.admin })
    }

    /// Ends a token (logout).
    pub fn revoke(&self, token: &str) -> Result<(), AuthError> {
        self.state.delete_record(TOKENS, &token_key(token))?;
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
            let p = self.authenticate(token).map_err(|e| e.to_string())?;
            let max_stored_bytes = self.user(&p.user).ok().and_then(|u| u.quota.stored_bytes);
            Ok(vgrid_trust::caller::UserId { name: p.user, admin: p.admin, max_stored_bytes })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::RedbState;
    use ssh_key::{Algorithm, LineEnding, PrivateKey};

    fn auth() -> (tempfile::TempDir, Arc<Auth>) {
        let d = tempfile::tempdir().unwrap();
        let st = Arc::new(RedbState::open(&d.path().join("s.redb")).unwrap());
        let a = Auth::new(st, Some(d.path().join("audit.log")), Duration::from_secs(3600)).unwrap();
        (d, a)
    }

    fn key(alg: Algorithm) -> PrivateKey {
        PrivateKey::random(&mut rand::rngs::OsRng, alg).unwrap()
    }

    fn sign(k: &PrivateKey, msg: &str) -> String {
        sign_challenge(k, msg).unwrap()
    }

    fn add(a: &Auth, name: &str, k: &PrivateKey, admin: bool) {
        a.add_user(UserCreate { name: name.into(), keys: vec![k.public_key().to_openssh().unwrap()], admin, quota: Quota::default() })
            .unwrap();
    }

    #[test]
    fn login_with_ed25519_and_ecdsa_keys_gives_a_token() {
        let (_d, a) = auth();
        for (name, alg) in [("ed", Algorithm::Ed25519), ("ec", Algorithm::Ecdsa { curve: ssh_key::EcdsaCurve::NistP256 })] {
            let k = key(alg);
            add(&a, name, &k, false);
            let c = a.challenge(name).unwrap();
            let t = a.login(name, &c.nonce, &sign(&k, &c.message)).unwrap();
            assert_eq!(a.authenticate(&t.token).unwrap(), Principal { user: name.into(), admin: false });
            // Single use.
            assert!(matches!(a.login(name, &c.nonce, &sign(&k, &c.message)), Err(AuthError::Unauthenticated(_))));
            a.revoke(&t.token).unwrap();
            assert!(matches!(a.authenticate(&t.token), Err(AuthError::Unauthenticated(_))));
        }
    }

    #[test]
    fn wrong_key_wrong_user_wrong_message_and_forged_tokens_are_refused() {
        let (_d, a) = auth();
        let alice = key(Algorithm::Ed25519);
        let bob = key(Algorithm::Ed25519);
        add(&a, "alice", &alice, true);
        add(&a, "bob", &bob, false);
        // Bob's key cannot log in as alice.
        let c = a.challenge("alice").unwrap();
        let e = a.login("alice", &c.nonce, &sign(&bob, &c.message)).unwrap_err();
        assert!(e.to_string().contains("none of the user's keys"), "{e}");
        // A signature over another message, or with another namespace.
        let c = a.challenge("alice").unwrap();
        assert!(a.login("alice", &c.nonce, &sign(&alice, "something else")).is_err());
        let c = a.challenge("alice").unwrap();
        let other_ns = alice.sign("git", ssh_key::HashAlg::Sha512, c.message.as_bytes()).unwrap().to_pem(LineEnding::LF).unwrap();
        assert!(a.login("alice", &c.nonce, &other_ns).is_err());
        // A challenge for bob answered as alice.
        let c = a.challenge("bob").unwrap();
        assert!(a.login("alice", &c.nonce, &sign(&alice, &c.message)).is_err());
        // Garbage signature: a clear error.
        let c = a.challenge("alice").unwrap();
        let e = a.login("alice", &c.nonce, "not a signature").unwrap_err();
        assert!(e.to_string().contains("malformed SSH signature"), "{e}");
        // Forged tokens.
        for t in ["", "vgt_", "Bearer x", &format!("vgt_{}", "0".repeat(64))] {
            assert!(matches!(a.authenticate(t), Err(AuthError::Unauthenticated(_))), "{t:?}");
        }
    }

    #[test]
    fn expired_tokens_are_refused_and_removed_users_lose_their_tokens() {
        let d = tempfile::tempdir().unwrap();
        let st = Arc::new(RedbState::open(&d.path().join("s.redb")).unwrap());
        let a = Auth::new(st, None, Duration::from_secs(0)).unwrap();
        let k = key(Algorithm::Ed25519);
        add(&a, "carol", &k, false);
        let c = a.challenge("carol").unwrap();
        let t = a.login("carol", &c.nonce, &sign(&k, &c.message)).unwrap();
        let e = a.authenticate(&t.token).unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");

        let (_d2, a) = auth();
        add(&a, "dave", &k, false);
        let c = a.challenge("dave").unwrap();
        let t = a.login("dave", &c.nonce, &sign(&k, &c.message)).unwrap();
        a.remove_user("dave").unwrap();
        assert!(a.authenticate(&t.token).is_err());
    }

    #[test]
    fn bad_keys_duplicate_users_and_shared_keys_are_refused() {
        let (_d, a) = auth();
        let k = key(Algorithm::Ed25519);
        let e = a
            .add_user(UserCreate { name: "x".into(), keys: vec!["ssh-ed25519 notbase64".into()], admin: false, quota: Quota::default() })
            .unwrap_err();
        assert!(e.to_string().contains("not an OpenSSH public key"), "{e}");
        add(&a, "x", &k, false);
        let e = a
            .add_user(UserCreate {
                name: "x".into(),
                keys: vec![k.public_key().to_openssh().unwrap()],
                admin: false,
                quota: Quota::default(),
            })
            .unwrap_err();
        assert!(matches!(e, AuthError::Conflict(_)));
        let e = a
            .add_user(UserCreate {
                name: "y".into(),
                keys: vec![k.public_key().to_openssh().unwrap()],
                admin: false,
                quota: Quota::default(),
            })
            .unwrap_err();
        assert!(e.to_string().contains("already registered to user x"), "{e}");
        // Bootstrap only when there are no users.
        assert!(!a.bootstrap_admin("root", &key(Algorithm::Ed25519).public_key().to_openssh().unwrap()).unwrap());
    }

    #[test]
    fn rsa_keys_log_in() {
        let (_d, a) = auth();
        let k = PrivateKey::from(ssh_key::private::RsaKeypair::random(&mut rand::rngs::OsRng, 2048).unwrap());
        add(&a, "r", &k, false);
        let c = a.challenge("r").unwrap();
        a.login("r", &c.nonce, &sign(&k, &c.message)).unwrap();
    }
}
