//! Nodes joining the grid: the grid CA (made on first start, `DATA/tls/`), one-time join tokens
//! made by admins, and signing the certificate a host or image server asks for when it joins.
//! Tokens are kept hashed (BLAKE3) in the state store, expire, and are spent by their first use:
//! redeeming writes the token back only if it is unchanged since it was read (compare-and-swap),
//! so of two nodes redeeming one token at once (even through two coordinators) one joins.

use serde::{Deserialize, Serialize};
use vgrid_api::auth::{JoinReply, JoinRequest, JoinTokenInfo, RenewRequest};
use vgrid_trust::node::JoinToken;
use vgrid_trust::{Ca, NodeRole, Peer};

use crate::auth::{now, random_hex, AuthError};
use crate::state::{encode, Expect, RecordStore, StateError};

const TABLE: &str = "join-tokens";
/// Default lifetime of a join token.
pub const DEFAULT_TTL_SECS: u64 = 3600;

#[derive(Serialize, Deserialize)]
struct Stored {
    info: JoinTokenInfo,
    secret_hash: String,
}

pub struct Joins {
    ca: Ca,
    records: RecordStore,
}

fn joinable(role: &str) -> Result<NodeRole, AuthError> {
    match role.parse::<NodeRole>() {
        Ok(r @ (NodeRole::Host | NodeRole::ImageServer)) => Ok(r),
        _ => Err(AuthError::BadRequest(format!("role {role:?} cannot join: expected host or image-server"))),
    }
}

impl Joins {
    pub fn new(ca: Ca, records: RecordStore) -> Self {
        Joins { ca, records }
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// A new token for `role`, valid `ttl_secs`; the whole token is in `token` of the answer.
    pub async fn create(&self, role: &str, ttl_secs: Option<u64>, by: &str) -> Result<JoinTokenInfo, AuthError> {
        let role = joinable(role)?;
        let ttl = ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
        if ttl == 0 || ttl > 30 * 24 * 3600 {
            return Err(AuthError::BadRequest(format!("token lifetime {ttl} s is out of range: 1 s to 30 days")));
        }
        let (id, secret) = (random_hex(6), random_hex(24));
        let info = JoinTokenInfo {
            id: id.clone(),
            role: role.as_str().into(),
            expires: now() + ttl,
            created_by: by.into(),
            used_by: None,
            token: None,
        };
        let stored = Stored { info: info.clone(), secret_hash: blake3::hash(secret.as_bytes()).to_hex().to_string() };
        self.records.put_record_if(TABLE, &id, encode(&stored), Expect::Absent).await?;
        let token = JoinToken { credential: format!("{id}.{secret}"), ca_fingerprint: self.ca.fingerprint() };
        Ok(JoinTokenInfo { token: Some(token.to_string()), ..info })
    }

    pub async fn list(&self) -> Result<Vec<JoinTokenInfo>, AuthError> {
        let (records, _) = self.records.list_records(TABLE).await?;
        let mut v: Vec<JoinTokenInfo> =
            records.into_iter().filter_map(|(_, e)| serde_json::from_slice::<Stored>(&e.value).ok().map(|s| s.info)).collect();
        v.sort_by_key(|i| i.expires);
        Ok(v)
    }

    /// Checks the token (known, unspent, unexpired, for this role), spends it and signs the
    /// node's certificate request.
    pub async fn redeem(&self, req: &JoinRequest) -> Result<JoinReply, AuthError> {
        let role = joinable(&req.role)?;
        vgrid_api::manifest::validate_name(&req.name).map_err(|_| AuthError::BadRequest(format!("invalid node name {:?}", req.name)))?;
        let refused = |why: &str| {
            AuthError::Unauthenticated(format!("join token refused: {why}; make a new one with `vgrid join-token create --role {role}`"))
        };
        let (id, secret) = req.token.split_once('.').ok_or_else(|| refused("malformed (expected <id>.<secret>)"))?;
        let Some(entry) = self.records.get_record(TABLE, id).await? else { return Err(refused("unknown token")) };
        let mut s: Stored = serde_json::from_slice(&entry.value).map_err(|_| refused("unreadable record"))?;
        if blake3::hash(secret.as_bytes()).to_hex().as_str() != s.secret_hash {
            return Err(refused("wrong secret"));
        }
        if let Some(u) = &s.info.used_by {
            return Err(refused(&format!("already used by {u}")));
        }
        if s.info.expires <= now() {
            return Err(refused("expired"));
        }
        if s.info.role != role.as_str() {
            return Err(refused(&format!("it is for a {}, not a {role}", s.info.role)));
        }
        let cert = self.ca.sign_request(&req.csr, &req.name, &[role]).map_err(AuthError::CertRequest)?;
        s.info.used_by = Some(req.name.clone());
        match self.records.put_record_if(TABLE, id, encode(&s), Expect::ModRevision(entry.mod_revision)).await {
            Ok(_) => {}
            // Spent (or changed) by another redeemer since it was read: what is there now says why.
            Err(StateError::Conflict { .. }) => return Err(self.refused_now(id, &refused).await),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(node = %req.name, %role, token = %id, "node joined the grid");
        Ok(JoinReply { cert, ca: self.ca.cert_pem().to_string() })
    }

    /// Signs a new certificate for a node that has joined: `peer` is what the certificate of
    /// its connection (verified against this grid's CA) proves; the new one names the same
    /// node and roles, for the DNS/IP names of `req`'s request (a node whose listen or
    /// advertised address changed). A coordinator's certificate is not renewed this way: it
    /// holds the CA and issues its own.
    pub fn renew(&self, peer: &Peer, req: &RenewRequest) -> Result<JoinReply, AuthError> {
        let roles: Vec<NodeRole> = peer.roles.iter().copied().filter(|r| joinable(r.as_str()).is_ok()).collect();
        if roles.is_empty() || peer.is(NodeRole::Coordinator) {
            return Err(AuthError::Forbidden(format!(
                "the certificate of {} is for {:?}: only hosts and image servers renew their certificates here",
                peer.name, peer.roles
            )));
        }
        let cert = self.ca.sign_request(&req.csr, &peer.name, &roles).map_err(AuthError::CertRequest)?;
        tracing::info!(node = %peer.name, roles = ?roles, "renewed a node's certificate for new names");
        Ok(JoinReply { cert, ca: self.ca.cert_pem().to_string() })
    }

    /// Why token `id` is refused now that another redeemer changed it.
    async fn refused_now(&self, id: &str, refused: &impl Fn(&str) -> AuthError) -> AuthError {
        match self.records.get_record(TABLE, id).await {
            Ok(Some(e)) => match serde_json::from_slice::<Stored>(&e.value).ok().and_then(|s| s.info.used_by) {
                Some(u) => refused(&format!("already used by {u}")),
                None => refused("changed while it was being used"),
            },
            Ok(None) => refused("unknown token"),
            Err(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{open, StateConfig};

    fn joins() -> (tempfile::TempDir, Joins) {
        let d = tempfile::tempdir().unwrap();
        let state = open(&StateConfig::Memory).unwrap().records();
        let ca = Ca::load_or_create(&d.path().join("tls"), "t").unwrap();
        (d, Joins::new(ca, state))
    }

    #[tokio::test]
    async fn a_token_joins_once_for_its_role_only() {
        let (_d, j) = joins();
        let t: JoinToken = j.create("host", None, "admin").await.unwrap().token.unwrap().parse().unwrap();
        assert_eq!(t.ca_fingerprint, j.ca().fingerprint());
        let (csr, _) = vgrid_trust::node::make_request("h1", &["127.0.0.1".into()]).unwrap();
        let req = |role: &str, token: &str| JoinRequest { token: token.into(), role: role.into(), name: "h1".into(), csr: csr.clone() };
        let wrong_role = j.redeem(&req("image-server", &t.credential)).await.unwrap_err().to_string();
        assert!(wrong_role.contains("not a image-server"), "{wrong_role}");
        let (id, _) = t.credential.split_once('.').unwrap();
        assert!(j.redeem(&req("host", &format!("{id}.00"))).await.unwrap_err().to_string().contains("wrong secret"));
        let ok = j.redeem(&req("host", &t.credential)).await.unwrap();
        assert!(ok.cert.contains("BEGIN CERTIFICATE"));
        assert!(j.redeem(&req("host", &t.credential)).await.unwrap_err().to_string().contains("already used by h1"));
        assert!(j.create("coordinator", None, "admin").await.is_err());
        assert_eq!(j.list().await.unwrap()[0].used_by.as_deref(), Some("h1"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn of_nodes_redeeming_one_token_at_once_one_joins() {
        let (_d, j) = joins();
        let j = std::sync::Arc::new(j);
        let t: JoinToken = j.create("host", None, "admin").await.unwrap().token.unwrap().parse().unwrap();
        let (csr, _) = vgrid_trust::node::make_request("h1", &["127.0.0.1".into()]).unwrap();
        let tries: Vec<_> = (0..8)
            .map(|_| {
                let (j, req) =
                    (j.clone(), JoinRequest { token: t.credential.clone(), role: "host".into(), name: "h1".into(), csr: csr.clone() });
                tokio::spawn(async move { j.redeem(&req).await })
            })
            .collect();
        let mut joined = 0;
        for t in tries {
            match t.await.unwrap() {
                Ok(_) => joined += 1,
                Err(e) => assert!(e.to_string().contains("already used by h1"), "{e}"),
            }
        }
        assert_eq!(joined, 1);
    }
}
