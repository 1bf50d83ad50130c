//! Users, keys, login and audit: the bodies of `/api/v1/auth/...`, `/api/v1/users/...` and
//! `/api/v1/audit`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The SSH signature namespace of a login proof (`ssh-keygen -Y sign -n vgrid-login`).
pub const LOGIN_NAMESPACE: &str = "vgrid-login";

/// What a user may hold at once. `None` is no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// VMs that are not stopped or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<u32>,
    /// Virtual CPUs over those VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Guest memory over those VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Bytes of images the user owns, on each image server (the non-zero data of every
    /// version, as `image ls` shows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
}

/// Body of `POST /api/v1/users` (admins only).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserCreate {
    #[schema(pattern = "^[a-z0-9][a-z0-9_.-]{0,31}$")]
    pub name: String,
    /// OpenSSH public keys (`ssh-ed25519 AAAA... comment`; ed25519, ecdsa and rsa).
    #[schema(min_items = 1)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub quota: Quota,
}

/// A user as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UserInfo {
    pub name: String,
    pub admin: bool,
    /// OpenSSH public keys.
    pub keys: Vec<String>,
    /// `SHA256:...` fingerprints of `keys`, in the same order.
    #[serde(default)]
    pub fingerprints: Vec<String>,
    #[serde(default)]
    pub quota: Quota,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// Body of `POST /api/v1/auth/challenge`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {
    #[schema(pattern = "^[a-z0-9][a-z0-9_.-]{0,31}$")]
    pub user: String,
}

/// A login challenge: sign `message` with namespace [`LOGIN_NAMESPACE`] and send it back within
/// `expires_in` seconds. Single use.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Challenge {
    pub user: String,
    pub nonce: String,
    /// The exact bytes to sign (UTF-8).
    pub message: String,
    pub namespace: String,
    pub expires_in: u64,
}

/// Body of `POST /api/v1/auth/login`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[schema(pattern = "^[a-z0-9][a-z0-9_.-]{0,31}$")]
    pub user: String,
    pub nonce: String,
    /// The SSH signature (`-----BEGIN SSH SIGNATURE-----` PEM, as `ssh-keygen -Y sign` writes).
    pub signature: String,
}

/// A bearer token for `Authorization: Bearer ...`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LoginToken {
    pub user: String,
    pub admin: bool,
    pub token: String,
    /// Seconds since the Unix epoch.
    pub expires: u64,
}

/// Body of `POST /api/v1/auth/session`: a token (from `vgrid login --print-token`) a browser
/// exchanges for a session cookie (HttpOnly, SameSite=Strict; Secure over TLS).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionCreate {
    pub token: String,
}

/// Answer of `POST /api/v1/auth/session`: who the cookie now logs in, and until when.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Session {
    pub user: String,
    pub admin: bool,
    /// Seconds since the Unix epoch (the token's expiry; the cookie's too).
    pub expires: u64,
}

/// One line of the audit log: a state-changing request, or any refused one.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// Seconds since the Unix epoch (fractional).
    pub time: f64,
    /// The authenticated user, or `-` when the request carried no valid token.
    pub user: String,
    pub method: String,
    pub path: String,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The error message of a refused request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Checks a user name: 1-32 characters of a-z 0-9 _ - ., starting with a letter or digit.
pub fn validate_user_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'))
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!("invalid user name {name:?}: use 1-32 characters of a-z 0-9 _ - . starting with a letter or digit"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        assert!(validate_user_name("alice").is_ok());
        assert!(validate_user_name("a.b-c_1").is_ok());
        for bad in ["", "Alice", "-x", "a b", "a/b", &"x".repeat(33)] {
            assert!(validate_user_name(bad).is_err(), "{bad:?}");
        }
    }
}

/// Body of `POST /api/v1/join-tokens` (admins only): a one-time token a host or an image
/// server joins the grid with.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenCreate {
    /// `host` or `image-server`.
    #[schema(pattern = "^(host|image-server)$")]
    pub role: String,
    /// Seconds until the token expires (default one hour; at most 30 days).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2592000)]
    pub ttl_seconds: Option<u64>,
}

/// A join token as made (the secret is shown only here) or listed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenInfo {
    pub id: String,
    pub role: String,
    /// Unix seconds.
    pub expires: u64,
    pub created_by: String,
    /// Name of the node that used it, once used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
    /// The whole token, `vgrid-join1:<id>.<secret>:<CA fingerprint>`; only when made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Body of `POST /api/v1/join` (public: the token is the credential).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// `<id>.<secret>` of the join token.
    pub token: String,
    /// `host` or `image-server`; must be the token's.
    #[schema(pattern = "^(host|image-server)$")]
    pub role: String,
    /// The node's name (a host's name in `host ls`).
    #[schema(pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")]
    pub name: String,
    /// PEM PKCS#10 certificate request; its DNS/IP names become the certificate's.
    pub csr: String,
}

/// Body of `POST /api/v1/join/renew`: a node that has joined asks, over a connection with its
/// current certificate, for a new one valid for other names (its listen or advertised address
/// changed). The name and roles are those of the certificate it shows; only the names change.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// PEM PKCS#10 certificate request; its DNS/IP names become the new certificate's.
    pub csr: String,
}

/// Answer to a join: the node's certificate and the grid CA, both PEM.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinReply {
    pub cert: String,
    pub ca: String,
}
