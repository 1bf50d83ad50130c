//! Who is calling a role's HTTP API: a grid node proven by its client certificate, a user
//! proven by a coordinator's login token, or nobody. Host agents and image servers do not keep
//! users: they ask their coordinator ([`RemoteUsers`], `GET /api/v1/whoami` with the token,
//! answers cached for 30 s), or, inside `vgrid up`, the coordinator's user table directly.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::tls::{peer_of, Peer};
use crate::NodeRole;

/// A user a token was issued to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserId {
    pub name: String,
    pub admin: bool,
    /// The user's quota on stored image bytes (per image server), if any.
    pub max_stored_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Node(Peer),
    User(UserId),
    Anonymous,
}

impl Caller {
    /// A node of the grid in `role`, or an admin user.
    pub fn is_node_or_admin(&self, role: NodeRole) -> bool {
        match self {
            Caller::Node(p) => p.is(role) || p.is(NodeRole::Coordinator),
            Caller::User(u) => u.admin,
            Caller::Anonymous => false,
        }
    }

    /// A trusted party for every object: a grid node or an admin.
    pub fn is_privileged(&self) -> bool {
        matches!(self, Caller::Node(_)) || matches!(self, Caller::User(u) if u.admin)
    }

    /// The user name, for users.
    pub fn user(&self) -> Option<&str> {
        match self {
            Caller::User(u) => Some(&u.name),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Caller::Node(p) => format!("node {}", p.name),
            Caller::User(u) => format!("user {}", u.name),
            Caller::Anonymous => "an anonymous caller".into(),
        }
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Checks a login token: the user it belongs to, or why not.
pub trait UserTokens: Send + Sync {
    fn verify<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<UserId, String>>;
}

/// Tokens checked by the coordinator at `url` (`GET /api/v1/whoami`), each answer kept 30 s.
pub struct RemoteUsers {
    url: String,
    /// By the token's SHA-256.
    cache: Mutex<HashMap<String, Answer>>,
}

/// The coordinator's answer about a token (the user, or why not, as the 401 will say it) and
/// when it came.
type Answer = (Result<UserId, String>, Instant);

const CACHE_FOR: Duration = Duration::from_secs(30);

impl RemoteUsers {
    pub fn new(coordinator_url: &str) -> Arc<RemoteUsers> {
        Arc::new(RemoteUsers { url: coordinator_url.trim_end_matches('/').to_string(), cache: Mutex::new(HashMap::new()) })
    }

    async fn ask(&self, token: &str) -> Result<UserId, String> {
        let http = crate::tls::client_builder().timeout(Duration::from_secs(10)).build().map_err(|e| e.to_string())?;
        let resp = http
            .get(format!("{}/api/v1/whoami", self.url))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| format!("cannot check the token with the coordinator at {}: {e}", self.url))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(serde_json::from_str::<vgrid_api::ErrorBody>(&body).map(|e| e.error).unwrap_or(body));
        }
        let u: vgrid_api::auth::UserInfo = serde_json::from_str(&body).map_err(|e| format!("malformed whoami answer: {e}"))?;
        Ok(UserId { name: u.name, admin: u.admin, max_stored_bytes: u.quota.stored_bytes })
    }
}

impl UserTokens for RemoteUsers {
    fn verify<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<UserId, String>> {
        Box::pin(async move {
            use sha2::Digest;
            let key = hex::encode(sha2::Sha256::digest(token.as_bytes()));
            if let Some((r, at)) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
                if at.elapsed() < CACHE_FOR {
                    return r.clone();
                }
            }
            let r = self.ask(token).await;
            let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if c.len() > 10_000 {
                c.retain(|_, (_, at)| at.elapsed() < CACHE_FOR);
            }
            c.insert(key, (r.clone(), Instant::now()));
            r
        })
    }
}

/// A request's credentials: its connection's grid certificate and its bearer token.
fn credentials<B>(req: &axum::http::Request<B>) -> (Option<Peer>, Option<String>) {
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.strip_prefix("Bearer ").unwrap_or(h).trim().to_string());
    (peer_of(req).cloned(), token)
}

/// Who is calling: the grid certificate first, else the token's user.
async fn identify_by(users: &dyn UserTokens, peer: Option<Peer>, token: Option<String>) -> Result<Caller, String> {
    if let Some(p) = peer {
        return Ok(Caller::Node(p));
    }
    match token {
        None => Ok(Caller::Anonymous),
        Some(t) => users.verify(&t).await.map(Caller::User),
    }
}

/// A JSON error answer (`{"error": ...}`) with `status`.
pub fn refuse(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(vgrid_api::ErrorBody { error: msg.into(), detail: None })).into_response()
}

/// A query string of the documented shape (`axum::extract::Query`), or a 400 whose body is a
/// JSON `{"error": ...}` naming what is wrong, like every other error of the roles' APIs.
pub struct JsonQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for JsonQuery<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Response> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(t)) => Ok(JsonQuery(t)),
            Err(e) => Err(refuse(StatusCode::BAD_REQUEST, format!("malformed query: {}", e.body_text()))),
        }
    }
}

/// Middleware state: how tokens are checked.
pub type Users = Arc<dyn UserTokens>;

/// Middleware that puts the [`Caller`] of every request into its extensions; a token that does
/// not check out is a 401 naming why.
pub async fn identify_layer(
    axum::extract::State(users): axum::extract::State<Users>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (peer, token) = credentials(&req);
    match identify_by(users.as_ref(), peer, token).await {
        Ok(c) => {
            req.extensions_mut().insert(c);
            next.run(req).await
        }
        Err(e) => refuse(StatusCode::UNAUTHORIZED, e),
    }
}

/// The caller put there by [`identify_layer`] (anonymous without that layer).
pub fn caller_of<B>(req: &axum::http::Request<B>) -> Caller {
    req.extensions().get::<Caller>().cloned().unwrap_or(Caller::Anonymous)
}
