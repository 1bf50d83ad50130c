//! The REST API: `/api/v1/...`, JSON bodies from `vgrid-api`, errors as
//! `{"error": "...", "detail": ...}`, and the OpenAPI document at `/api/openapi.json`.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use utoipa::OpenApi;
use vgrid_api::grid::{Future, FuturesQuery, HostAd, HostRecord, HostState, ImageServerAd};
use vgrid_api::host::{HeartbeatReply, HostHeartbeat, VmReport};
use vgrid_api::vm::{ConsoleChunk, SavedImage, Suspended, VmCreate, VmRecord, VmResume, VmSnapshot, VmStop};
use vgrid_api::ErrorBody;

use crate::auth::{Auth, AuthError, Principal};
use crate::join::Joins;
use crate::lifecycle::{Coordinator, CoordinatorError};

mod console;
mod drain;
mod images;
mod networks;
mod session;
mod tunnels;
mod ui;
mod usage;
mod volumes;
use axum::extract::Request;
use axum::middleware::Next;
use axum::Extension;
use vgrid_api::auth::{
    AuditEntry, Challenge, ChallengeRequest, JoinReply, JoinRequest, JoinTokenCreate, JoinTokenInfo, LoginRequest, LoginToken, Quota,
    RenewRequest, UserCreate, UserInfo,
};
use vgrid_trust::json::{Json, JsonRejection};
use vgrid_trust::{NodeRole, Peer};

/// The Retry-After of a 503 answer, in seconds.
const RETRY_AFTER_SECS: &str = "2";

/// An error as the API returns it.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(ErrorBody { error: self.1, detail: None })).into_response();
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            // Retryable: nothing was done; the condition passes within a heartbeat or two.
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        r
    }
}

impl From<CoordinatorError> for ApiError {
    fn from(e: CoordinatorError) -> Self {
        use CoordinatorError::*;
        let code = match &e {
            // Well-formed requests whose values are refused: 422 naming the field (a 400 is
            // only for a body or parameter that is not of the documented shape).
            BadRequest(_) | Config(_) | Image(_) | Net(_) => StatusCode::UNPROCESSABLE_ENTITY,
            UnknownImage(_) | UnknownVm(_) | UnknownHost(_) | UnknownNetwork(_) => StatusCode::NOT_FOUND,
            Conflict(_) | Capacity(_) | Waited(_) | Transition { .. } | Contended(_) | NetworkIdentityTaken(_) => StatusCode::CONFLICT,
            ImageServer(_) | NotOnReachable { .. } | Host(_) => StatusCode::BAD_GATEWAY,
            NoImageServer => StatusCode::SERVICE_UNAVAILABLE,
            Settling(_) => StatusCode::GATEWAY_TIMEOUT,
            Expr(_) => StatusCode::UNPROCESSABLE_ENTITY,
            State(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Quota(_) | Forbidden(_) => StatusCode::FORBIDDEN,
        };
        ApiError(code, e.to_string())
    }
}

impl From<crate::images::Refusal> for ApiError {
    fn from(r: crate::images::Refusal) -> Self {
        match r {
            crate::images::Refusal::Forbidden(m) => ApiError(StatusCode::FORBIDDEN, m),
            crate::images::Refusal::Failed(e) => e.into(),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let code = match &e {
            AuthError::Unauthenticated(_) | AuthError::BadSignature { .. } => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
            AuthError::BadRequest(_) | AuthError::NotAKey { .. } | AuthError::KeyEncoding(_) | AuthError::CertRequest(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            AuthError::Conflict(_) => StatusCode::CONFLICT,
            AuthError::NotFound(_) => StatusCode::NOT_FOUND,
            AuthError::State(_) | AuthError::Audit { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        body_refused(r.status(), &r.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        body_refused(r.status(), &r.body_text())
    }
}

/// A body that could not be read (413 when it is over [`MAX_BODY`]) or is not JSON of the
/// documented shape (400).
fn body_refused(status: StatusCode, why: &str) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError(status, format!("request body too large: the limit is {MAX_BODY} bytes"));
    }
    ApiError(StatusCode::BAD_REQUEST, format!("malformed request body: {why}"))
}

/// The largest request body the coordinator reads (413 beyond).
pub const MAX_BODY: usize = 1024 * 1024;

type ApiResult<T> = Result<Json<T>, ApiError>;

/// A JSON body that may be left out (empty: the defaults); a malformed one is a 400 that says
/// what is wrong, like every other body.
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: Result<axum::body::Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body?;
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    vgrid_api::json::from_slice(&body).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("malformed request body: {e}")))
}
type Ctx = State<Arc<Coordinator>>;
/// The authenticated caller (present on every route but the public ones).
type Caller = Extension<Principal>;
type Users = Extension<Arc<Auth>>;
type Nodes = Extension<Option<Arc<Joins>>>;

/// The grid node proven by the connection's client certificate, if any (set on every request).
#[derive(Clone, Debug)]
pub struct NodePeer(pub Option<Peer>);

/// With a grid CA, a node's request must come with a certificate of this grid for `role`: 401
/// without one, 403 for another role's. Checked before the body is read.
fn node_role(nodes: &Option<Arc<Joins>>, peer: &NodePeer, role: NodeRole) -> Result<(), ApiError> {
    if nodes.is_none() {
        return Ok(());
    }
    match &peer.0 {
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            format!("this {role} has not joined this grid: its connection shows no certificate of this grid's CA (start it with --join-token from `vgrid join-token create --role {role}`)"),
        )),
        // A coordinator's certificate (also that of `vgrid up`) may speak for any node.
        Some(p) if p.is(NodeRole::Coordinator) => Ok(()),
        Some(p) if !p.is(role) => Err(ApiError(StatusCode::FORBIDDEN, format!("the certificate of {} is for {:?}, not for a {role}", p.name, p.roles))),
        Some(_) => Ok(()),
    }
}

/// ... and the certificate must name `name` (403 for another node's), once the body is read.
fn node_peer(nodes: &Option<Arc<Joins>>, peer: &NodePeer, role: NodeRole, name: &str) -> Result<(), ApiError> {
    node_role(nodes, peer, role)?;
    match (nodes, &peer.0) {
        (Some(_), Some(p)) if !p.is(NodeRole::Coordinator) && p.name != name => {
            Err(ApiError(StatusCode::FORBIDDEN, format!("the certificate names {:?}; it may not speak for {role} {name:?}", p.name)))
        }
        _ => Ok(()),
    }
}

/// A host or image server joins: a valid one-time join token gets its certificate request signed.
#[utoipa::path(post, path = "/api/v1/join", request_body = JoinRequest, security(()),
    responses((status = 200, body = JoinReply), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn join(Extension(nodes): Nodes, body: Result<Json<JoinRequest>, JsonRejection>) -> ApiResult<JoinReply> {
    let Json(r) = body?;
    let nodes = nodes
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "this coordinator has no grid CA (it serves plain HTTP); nothing to join".into()))?;
    Ok(Json(nodes.redeem(&r).await?))
}

/// A host or image server that has joined gets a certificate for new names (its listen or
/// advertised address changed): the connection's client certificate of this grid is the
/// credential, and the new certificate names the same node and roles.
#[utoipa::path(post, path = "/api/v1/join/renew", request_body = RenewRequest, security(()),
    responses((status = 200, body = JoinReply), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn renew_cert(
    Extension(nodes): Nodes,
    Extension(peer): Extension<NodePeer>,
    body: Result<Json<RenewRequest>, JsonRejection>,
) -> ApiResult<JoinReply> {
    let Json(r) = body?;
    let nodes = nodes.ok_or_else(|| {
        ApiError(StatusCode::NOT_FOUND, "this coordinator has no grid CA (it serves plain HTTP); nothing to renew".into())
    })?;
    let Some(p) = peer.0 else {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "renewing a certificate needs the node's current certificate of this grid on the connection; a node that has none joins with a join token".into(),
        ));
    };
    Ok(Json(nodes.renew(&p, &r)?))
}

/// Makes a one-time join token for a host or an image server (admins only).
#[utoipa::path(post, path = "/api/v1/join-tokens", request_body = JoinTokenCreate,
    responses((status = 200, body = JoinTokenInfo), (status = 403, body = ErrorBody)))]
async fn create_join_token(
    Extension(nodes): Nodes,
    Extension(p): Caller,
    body: Result<Json<JoinTokenCreate>, JsonRejection>,
) -> ApiResult<JoinTokenInfo> {
    p.check_admin("making join tokens")?;
    let Json(r) = body?;
    let nodes = nodes.ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "this coordinator has no grid CA (it serves plain HTTP)".into()))?;
    Ok(Json(nodes.create(&r.role, r.ttl_seconds, &p.user).await?))
}

/// Join tokens, without their secrets (admins only).
#[utoipa::path(get, path = "/api/v1/join-tokens", responses((status = 200, body = [JoinTokenInfo]), (status = 403, body = ErrorBody)))]
async fn list_join_tokens(Extension(nodes): Nodes, Extension(p): Caller) -> ApiResult<Vec<JoinTokenInfo>> {
    p.check_admin("join tokens")?;
    Ok(Json(match nodes {
        Some(n) => n.list().await?,
        None => Vec::new(),
    }))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "vgrid API", description = "Run VMs on a grid of hosts, images streamed on demand."),
    paths(list_vms, create_vm, get_vm, stop_vm, migrate_vm, delete_vm, console, suspend_vm, resume_vm, snapshot_vm, list_hosts, get_host, host_heartbeat,
        list_image_servers, image_server_heartbeat, futures, auth_challenge, auth_login, session::logout, session::create_session, whoami, images::list_images,
        list_users, add_user, get_user, delete_user, set_quota, audit, usage::get_usage, drain::drain_host, drain::get_drain, drain::undrain_host, join, renew_cert, create_join_token, list_join_tokens,
        networks::list_networks, networks::create_network, networks::get_network, networks::delete_network, tunnels::direct_endpoints,
        volumes::list_volumes, volumes::get_volume, volumes::delete_volume, volumes::commit_volume, volumes::snapshot_volume),
    components(schemas(VmCreate, VmRecord, VmStop, ConsoleChunk, ErrorBody, HostAd, ImageServerAd, HostRecord,
        HostState, HostHeartbeat, HeartbeatReply, VmReport, vgrid_api::host::VmWaiting, FuturesQuery, Future, vgrid_api::vm::VmState, vgrid_api::vm::Forward,
        vgrid_api::vm::VmConfig, vgrid_api::vm::BootConfig, vgrid_api::vm::NetConfig, vgrid_api::vm::Nic, vgrid_api::vm::Accel,
        vgrid_api::ImageRef, vgrid_api::tunnel::DirectEndpoint,
        Challenge, ChallengeRequest, LoginRequest, LoginToken, vgrid_api::auth::SessionCreate, vgrid_api::auth::Session,
        vgrid_api::grid::GridImage, vgrid_api::rest::ImageSummary, vgrid_api::volume::VolumeMeta, JoinRequest, JoinReply, RenewRequest, JoinTokenCreate, JoinTokenInfo, Quota, UserCreate, UserInfo, AuditEntry,
        vgrid_api::vm::Resources, vgrid_api::usage::UsageReport, vgrid_api::usage::UserUsage, vgrid_api::usage::VmUsage,
        vgrid_api::usage::UsageTotals, vgrid_api::usage::VmUsageReport, VmResume, VmSnapshot, SavedImage, Suspended,
        vgrid_api::migrate::VmMigrate, vgrid_api::migrate::Migration, vgrid_api::migrate::MigrationStatus,
        vgrid_api::grid::Drain, vgrid_api::grid::DrainedVm, vgrid_api::grid::DrainStep,
        vgrid_api::net::Network, vgrid_api::net::NetworkCreate, vgrid_api::net::NetworkInfo, vgrid_api::net::NetworkKind,
        vgrid_api::net::SiteNet, vgrid_api::net::Lease, vgrid_api::volume::VolumeAttach, vgrid_api::volume::VolumeInfo,
        vgrid_api::volume::VolumeCommitted, vgrid_api::volume::SnapshotCreate, vgrid_api::rest::GcReport)),
    modifiers(&CONTRACT),
    security(("bearer" = []))
)]
pub struct ApiDoc;

/// What this API answers besides each route's own statuses (see [`vgrid_api::openapi::Contract`]).
const CONTRACT: vgrid_api::openapi::Contract = vgrid_api::openapi::Contract { body_limit: MAX_BODY };

/// Routes that need no token: health, the API document, login, joining (the join token is the
/// credential), and the heartbeats and certificate renewals of hosts and image servers (those
/// prove themselves with their certificates, see [`node_peer`] and [`renew_cert`]).
fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/api/v1/health"
            | "/api/openapi.json"
            | "/api/v1/auth/challenge"
            | "/api/v1/auth/login"
            | "/api/v1/auth/session"
            | "/api/v1/hosts/heartbeat"
            | "/api/v1/image-servers/heartbeat"
            | "/api/v1/join"
            | "/api/v1/join/renew"
    ) || path.starts_with("/api/v1/tunnels/hosts/")
}

fn bearer(req: &Request) -> Option<&str> {
    let h = req.headers().get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    Some(h.strip_prefix("Bearer ").unwrap_or(h).trim())
}

/// Authenticates every request but the public ones (401 without a valid token), hands the
/// caller to the handlers, and writes the audit log: every state-changing request and every
/// refused one, with who, what, when and the result.
async fn authenticate(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let public = is_public(&path);
    let peer = NodePeer(vgrid_trust::tls::peer_of(&req).cloned());
    req.extensions_mut().insert(peer);
    let credential = session::credential(&req);
    // The session cookie is honoured only from the dashboard's own origin (see `session`).
    let foreign = match &credential {
        Some(session::Credential::Cookie(_)) if !public => session::same_origin(&req).err(),
        _ => None,
    };
    let caller = match &credential {
        Some(c) => Some(auth.authenticate(c.token()).await),
        None => None,
    };
    let mut user = "-".to_string();
    let resp = match (foreign, caller) {
        (Some(e), _) => e.into_response(),
        (None, Some(Ok(p))) => {
            user = p.user.clone();
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        _ if public => next.run(req).await,
        (None, None) => ApiError(
            StatusCode::UNAUTHORIZED,
            format!(
                "{method} {path} needs a token (Authorization: Bearer ..., or the dashboard's session cookie); log in with `vgrid login`"
            ),
        )
        .into_response(),
        (None, Some(Err(e))) => ApiError::from(e).into_response(),
    };
    let status = resp.status();
    let heartbeat = path.ends_with("/heartbeat");
    let refused = status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
    if refused || (method != axum::http::Method::GET && !(heartbeat && status.is_success())) {
        let (parts, body) = resp.into_parts();
        // Error bodies are small JSON; successful ones are not read.
        let (error, body) = if status.is_success() {
            (None, body)
        } else {
            let bytes = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
            let e = serde_json::from_slice::<ErrorBody>(&bytes).map(|b| b.error).ok();
            (e, axum::body::Body::from(bytes))
        };
        let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        auth.audit(&AuditEntry { time, user, method: method.to_string(), path, status: status.as_u16(), error });
        return Response::from_parts(parts, body);
    }
    resp
}

/// The coordinator's routes (`/api/...`), every one but the public ones behind a token. No
/// fallback: the caller merges other roles' routes.
///
/// `nodes` is the grid's CA and join tokens: with it, the heartbeats of hosts and image servers
/// must come over a connection with a certificate of this grid naming that node (see
/// [`vgrid_trust::tls::serve`]); without it (in-process tests over plain HTTP) they need none.
/// The coordinator answers; `leader`: whether it leads the grid (runs the once-per-grid work;
/// always true for a coordinator alone on its state).
async fn health(State(c): Ctx) -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "leader": c.is_leader()}))
}

pub fn router(c: Arc<Coordinator>, auth: Arc<Auth>, nodes: Option<Arc<Joins>>) -> Router {
    Router::new()
        .route("/api/v1/join", post(join))
        .route("/api/v1/join/renew", post(renew_cert))
        .route("/api/v1/join-tokens", get(list_join_tokens).post(create_join_token))
        .route("/api/v1/auth/challenge", post(auth_challenge))
        .route("/api/v1/auth/login", post(auth_login))
        .route("/api/v1/auth/session", post(session::create_session))
        .route("/api/v1/auth/logout", post(session::logout))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/users", get(list_users).post(add_user))
        .route("/api/v1/users/{name}", get(get_user).delete(delete_user))
        .route("/api/v1/users/{name}/quota", axum::routing::put(set_quota))
        .route("/api/v1/audit", get(audit))
        .route("/api/openapi.json", get(|| async { Json(vgrid_api::openapi::served(&ApiDoc::openapi())) }))
        .route("/api/v1/health", get(health))
        .route("/api/v1/vms", get(list_vms).post(create_vm))
        .route("/api/v1/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/api/v1/vms/{id}/stop", post(stop_vm))
        .route("/api/v1/vms/{id}/suspend", post(suspend_vm))
        .route("/api/v1/vms/{id}/resume", post(resume_vm))
        .route("/api/v1/vms/{id}/snapshot", post(snapshot_vm))
        .route("/api/v1/vms/{id}/migrate", post(migrate_vm))
        .route("/api/v1/vms/{id}/console", get(console))
        .route("/api/v1/vms/{id}/console/ws", get(console::console_ws))
        .route("/api/v1/vms/{id}/vnc/ws", get(console::vnc_ws))
        .route("/api/v1/vms/{id}/ssh/ws", get(console::ssh_ws))
        .route("/api/v1/hosts", get(list_hosts))
        .route("/api/v1/hosts/heartbeat", post(host_heartbeat))
        .route("/api/v1/hosts/{name}", get(get_host))
        .route("/api/v1/hosts/{name}/drain", get(drain::get_drain).post(drain::drain_host).delete(drain::undrain_host))
        .route("/api/v1/futures", post(futures))
        .route("/api/v1/usage", get(usage::get_usage))
        .route("/api/v1/networks", get(networks::list_networks).post(networks::create_network))
        .route("/api/v1/networks/{name}", get(networks::get_network).delete(networks::delete_network))
        .route("/api/v1/networks/{name}/tunnel", get(tunnels::user_link))
        .route("/api/v1/networks/{name}/tunnel/direct", get(tunnels::direct_endpoints))
        .route("/api/v1/tunnels/hosts/{name}", get(tunnels::host_link))
        .route("/api/v1/volumes", get(volumes::list_volumes))
        .route("/api/v1/volumes/{name}", get(volumes::get_volume).delete(volumes::delete_volume))
        .route("/api/v1/volumes/{name}/commit", post(volumes::commit_volume))
        .route("/api/v1/volumes/{name}/snapshot", post(volumes::snapshot_volume))
        .route("/api/v1/images", get(images::list_images))
        .route("/api/v1/image-servers", get(list_image_servers))
        .route("/api/v1/image-servers/heartbeat", post(image_server_heartbeat))
        .with_state(c)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(Extension(nodes))
        .layer(Extension(auth.clone()))
        .layer(axum::middleware::from_fn_with_state(auth, authenticate))
        // The dashboard's files are public: the page logs in through `/api/v1/auth/session`.
        .merge(ui::router())
        .route_layer(axum::middleware::from_fn(|r: axum::extract::Request, n: axum::middleware::Next| {
            vgrid_trust::metrics::track("coordinator", r, n)
        }))
}

#[utoipa::path(post, path = "/api/v1/auth/challenge", request_body = ChallengeRequest, security(()),
    responses((status = 200, body = Challenge), (status = 400, body = ErrorBody)))]
async fn auth_challenge(Extension(auth): Users, body: Result<Json<ChallengeRequest>, JsonRejection>) -> ApiResult<Challenge> {
    let Json(r) = body?;
    Ok(Json(auth.challenge(&r.user)?))
}

/// Answers a challenge with an SSH signature; returns a bearer token.
#[utoipa::path(post, path = "/api/v1/auth/login", request_body = LoginRequest, security(()),
    responses((status = 200, body = LoginToken), (status = 401, body = ErrorBody)))]
async fn auth_login(Extension(auth): Users, body: Result<Json<LoginRequest>, JsonRejection>) -> ApiResult<LoginToken> {
    let Json(r) = body?;
    Ok(Json(auth.login(&r.user, &r.nonce, &r.signature).await?))
}

#[utoipa::path(get, path = "/api/v1/whoami", responses((status = 200, body = UserInfo)))]
async fn whoami(Extension(auth): Users, Extension(p): Caller) -> ApiResult<UserInfo> {
    Ok(Json(auth.user(&p.user).await?))
}

#[utoipa::path(get, path = "/api/v1/users", responses((status = 200, body = [UserInfo]), (status = 403, body = ErrorBody)))]
async fn list_users(Extension(auth): Users, Extension(p): Caller) -> ApiResult<Vec<UserInfo>> {
    p.check_admin("listing users")?;
    Ok(Json(auth.users().await?))
}

#[utoipa::path(post, path = "/api/v1/users", request_body = UserCreate,
    responses((status = 201, body = UserInfo), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn add_user(
    Extension(auth): Users,
    Extension(p): Caller,
    body: Result<Json<UserCreate>, JsonRejection>,
) -> Result<(StatusCode, Json<UserInfo>), ApiError> {
    p.check_admin("adding users")?;
    let Json(u) = body?;
    Ok((StatusCode::CREATED, Json(auth.add_user(u).await?)))
}

#[utoipa::path(get, path = "/api/v1/users/{name}", params(("name" = String, Path, description = "user name", pattern = "^[a-z0-9][a-z0-9_.-]{0,31}$")),
    responses((status = 200, body = UserInfo), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_user(Extension(auth): Users, Extension(p): Caller, Path(name): Path<String>) -> ApiResult<UserInfo> {
    if p.user != name {
        p.check_admin("reading another user")?;
    }
    Ok(Json(auth.user(&name).await?))
}

#[utoipa::path(delete, path = "/api/v1/users/{name}", params(("name" = String, Path, description = "user name", pattern = "^[a-z0-9][a-z0-9_.-]{0,31}$")),
    responses((status = 200, body = UserInfo), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "an admin cannot remove themselves")))]
async fn delete_user(Extension(auth): Users, Extension(p): Caller, Path(name): Path<String>) -> ApiResult<UserInfo> {
    p.check_admin("removing users")?;
    if name == p.user {
        return Err(ApiError(StatusCode::CONFLICT, format!("{name} cannot remove themselves; another admin can")));
    }
    Ok(Json(auth.remove_user(&name).await?))
}

#[utoipa::path(put, path = "/api/v1/users/{name}/quota", params(("name" = String, Path, description = "user name", pattern = "^[a-z0-9][a-z0-9_.-]{0,31}$")), request_body = Quota,
    responses((status = 200, body = UserInfo), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn set_quota(
    Extension(auth): Users,
    Extension(p): Caller,
    Path(name): Path<String>,
    body: Result<Json<Quota>, JsonRejection>,
) -> ApiResult<UserInfo> {
    p.check_admin("setting quotas")?;
    let Json(q) = body?;
    Ok(Json(auth.set_quota(&name, q).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// Only this user's entries (`-`: requests without a valid token).
    #[serde(default)]
    user: Option<String>,
    /// Only entries at or after this time (seconds since the Unix epoch).
    #[serde(default)]
    since: Option<f64>,
}

/// The audit log (admins: everyone's; others: their own).
#[utoipa::path(get, path = "/api/v1/audit", params(AuditQuery), responses((status = 200, body = [AuditEntry])))]
async fn audit(
    Extension(auth): Users,
    Extension(p): Caller,
    vgrid_trust::caller::JsonQuery(q): vgrid_trust::caller::JsonQuery<AuditQuery>,
) -> ApiResult<Vec<AuditEntry>> {
    let user = if p.admin { q.user } else { Some(p.user.clone()) };
    Ok(Json(auth.audit_entries(user.as_deref(), q.since)))
}

#[utoipa::path(get, path = "/api/v1/vms", responses((status = 200, body = [VmRecord])))]
async fn list_vms(State(c): Ctx, Extension(p): Caller) -> ApiResult<Vec<VmRecord>> {
    Ok(Json(c.list().await?.into_iter().filter(|v| p.may_act_on(&v.owner)).collect()))
}

/// The VM `key` names, if the caller may act on it (403 otherwise).
async fn owned(c: &Coordinator, p: &Principal, key: &str) -> Result<VmRecord, ApiError> {
    let rec = c.get(key).await?;
    p.check_owner(&format!("VM {}", rec.name), &rec.owner)?;
    Ok(rec)
}

#[utoipa::path(post, path = "/api/v1/vms", request_body = VmCreate,
    responses((status = 201, body = VmRecord), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 503, body = ErrorBody, description = "no image server is registered yet (after a restart): retry after the Retry-After seconds")))]
async fn create_vm(
    State(c): Ctx,
    Extension(auth): Users,
    Extension(p): Caller,
    body: Result<Json<VmCreate>, JsonRejection>,
) -> Result<(StatusCode, Json<VmRecord>), ApiError> {
    let Json(req) = body?;
    let quota = auth.user(&p.user).await?.quota;
    Ok((StatusCode::CREATED, Json(c.create(req, &p.user, p.admin, &quota).await?)))
}

#[utoipa::path(get, path = "/api/v1/vms/{id}", params(("id" = String, Path, description = "VM id, unique id prefix, or name"), WaitQuery),
    responses((status = 200, body = VmRecord), (status = 404, body = ErrorBody)))]
async fn get_vm(
    State(c): Ctx,
    Extension(p): Caller,
    Path(id): Path<String>,
    vgrid_trust::caller::JsonQuery(w): vgrid_trust::caller::JsonQuery<WaitQuery>,
) -> ApiResult<VmRecord> {
    if let Some(ms) = w.wait_ms.filter(|&ms| ms > MAX_WAIT_MS) {
        return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("wait_ms {ms} is out of range 0-{MAX_WAIT_MS}")));
    }
    let rec = owned(&c, &p, &id).await?;
    if let Some(ms) = w.wait_ms {
        // Long poll: answer as soon as the record leaves the state and phase the client saw.
        let seen = |r: &VmRecord| w.state.as_deref() == Some(r.state.as_str()) && w.phase.as_deref().is_none_or(|ph| ph == r.phase);
        if seen(&rec) {
            let id = rec.id.clone();
            c.wait_while(&id, std::time::Duration::from_millis(ms), seen).await;
            return Ok(Json(with_gauges(&c, owned(&c, &p, &id).await?).await));
        }
    }
    Ok(Json(with_gauges(&c, rec).await))
}

/// A running VM's record with what its host last reported of it that is not stored with the
/// record (how much of a lazily paged RAM is still remote).
async fn with_gauges(c: &Coordinator, mut rec: VmRecord) -> VmRecord {
    if rec.state == vgrid_api::vm::VmState::Running {
        rec.ram_remote_bytes =
            c.accounting().vm(&rec.id).await.filter(|u| Some(&u.host) == rec.host.as_ref()).and_then(|u| u.ram_remote_bytes);
    }
    rec
}

/// `GET /api/v1/vms/{id}?wait_ms=N&state=S&phase=P`: wait up to N ms (at most 30 s) while the
/// VM is in state S (and phase P), then answer.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct WaitQuery {
    /// Wait up to this many ms while the VM is in `state` (and `phase`).
    #[param(maximum = 30000)]
    wait_ms: Option<u64>,
    /// The state the client saw.
    state: Option<String>,
    /// The phase the client saw.
    phase: Option<String>,
}

const MAX_WAIT_MS: u64 = 30_000;

#[utoipa::path(post, path = "/api/v1/vms/{id}/stop", params(("id" = String, Path)), request_body = VmStop,
    responses((status = 200, body = VmRecord), (status = 404, body = ErrorBody)))]
async fn stop_vm(
    State(c): Ctx,
    Extension(p): Caller,
    Path(id): Path<String>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> ApiResult<VmRecord> {
    let force = optional_body::<VmStop>(body)?.force;
    let rec = owned(&c, &p, &id).await?;
    Ok(Json(c.stop(&rec.id, force).await?))
}

/// Saves a running VM (memory state and disk) on the image servers and frees its host.
/// On failure the VM keeps running.
#[utoipa::path(post, path = "/api/v1/vms/{id}/suspend", params(("id" = String, Path)),
    responses((status = 200, body = Suspended), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 502, body = ErrorBody),
              (status = 504, body = ErrorBody, description = "the host has not answered the save yet: follow the VM's record")))]
async fn suspend_vm(State(c): Ctx, Extension(auth): Users, Extension(p): Caller, Path(id): Path<String>) -> ApiResult<Suspended> {
    let rec = owned(&c, &p, &id).await?;
    c.check_stored_quota(&rec.owner, &auth.user(&rec.owner).await?.quota)?;
    let s = c.suspend(&rec.id).await?;
    c.own_saved_image(&s.saved.image, &rec.owner).await;
    Ok(Json(s))
}

/// Restores a suspended VM on a matching host (any, `require`, or `host`); answers once placed,
/// the VM becomes `running` when restored.
#[utoipa::path(post, path = "/api/v1/vms/{id}/resume", params(("id" = String, Path)), request_body = VmResume,
    responses((status = 200, body = VmRecord), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 503, body = ErrorBody, description = "no image server is registered yet (after a restart): retry after the Retry-After seconds")))]
async fn resume_vm(
    State(c): Ctx,
    Extension(auth): Users,
    Extension(p): Caller,
    Path(id): Path<String>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> ApiResult<VmRecord> {
    let req = optional_body::<VmResume>(body)?;
    let rec = owned(&c, &p, &id).await?;
    Ok(Json(c.resume(&rec.id, &req, &auth.user(&rec.owner).await.map(|u| u.quota).unwrap_or_default()).await?))
}

/// Saves a running VM as a warm image (memory state + changed disk, the VM's image as parent);
/// the VM keeps running. `vm run NAME` then restores instead of booting.
#[utoipa::path(post, path = "/api/v1/vms/{id}/snapshot", params(("id" = String, Path)), request_body = VmSnapshot,
    responses((status = 200, body = SavedImage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 502, body = ErrorBody), (status = 503, body = ErrorBody, description = "no image server is registered yet (after a restart): retry after the Retry-After seconds")))]
async fn snapshot_vm(
    State(c): Ctx,
    Extension(auth): Users,
    Extension(p): Caller,
    Path(id): Path<String>,
    body: Result<Json<VmSnapshot>, JsonRejection>,
) -> ApiResult<SavedImage> {
    let rec = owned(&c, &p, &id).await?;
    let Json(req) = body?;
    c.check_image_write(&req.name, &p.user, p.admin).await?;
    c.check_stored_quota(&rec.owner, &auth.user(&rec.owner).await?.quota)?;
    let saved = c.snapshot(&rec.id, &req.name).await?;
    c.own_saved_image(&saved.image, &rec.owner).await;
    Ok(Json(saved))
}

/// Starts a live migration; the record (`migrating`) is returned at once and its `migration`
/// shows progress until its status is `completed`, `cancelled` or `failed`.
#[utoipa::path(post, path = "/api/v1/vms/{id}/migrate", params(("id" = String, Path)), request_body = vgrid_api::migrate::VmMigrate,
    responses((status = 202, body = VmRecord), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 503, body = ErrorBody, description = "no image server is registered yet (after a restart): retry after the Retry-After seconds")))]
async fn migrate_vm(
    State(c): Ctx,
    Extension(p): Caller,
    Path(id): Path<String>,
    body: Result<Json<vgrid_api::migrate::VmMigrate>, JsonRejection>,
) -> Result<(StatusCode, Json<VmRecord>), ApiError> {
    let rec = owned(&c, &p, &id).await?;
    let Json(req) = body?;
    Ok((StatusCode::ACCEPTED, Json(c.migrate(&rec.id, req).await?)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RmQuery {
    /// Stop the VM first if it is running.
    #[serde(default)]
    force: bool,
}

#[utoipa::path(delete, path = "/api/v1/vms/{id}", params(("id" = String, Path), RmQuery),
    responses((status = 200, body = VmRecord), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_vm(
    State(c): Ctx,
    Extension(p): Caller,
    Path(id): Path<String>,
    vgrid_trust::caller::JsonQuery(q): vgrid_trust::caller::JsonQuery<RmQuery>,
) -> ApiResult<VmRecord> {
    let rec = owned(&c, &p, &id).await?;
    Ok(Json(c.remove(&rec.id, q.force).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ConsoleQuery {
    /// Byte offset in the console log to start from; negative counts from the end.
    #[serde(default)]
    offset: i64,
}

#[utoipa::path(get, path = "/api/v1/vms/{id}/console", params(("id" = String, Path), ConsoleQuery),
    responses((status = 200, body = ConsoleChunk), (status = 404, body = ErrorBody)))]
async fn console(
    State(c): Ctx,
    Extension(p): Caller,
    Path(id): Path<String>,
    vgrid_trust::caller::JsonQuery(q): vgrid_trust::caller::JsonQuery<ConsoleQuery>,
) -> ApiResult<ConsoleChunk> {
    let rec = owned(&c, &p, &id).await?;
    Ok(Json(c.console(&rec.id, q.offset).await?))
}

#[utoipa::path(get, path = "/api/v1/hosts", responses((status = 200, body = [HostRecord])))]
async fn list_hosts(State(c): Ctx) -> ApiResult<Vec<HostRecord>> {
    Ok(Json(c.hosts().await))
}

#[utoipa::path(get, path = "/api/v1/hosts/{name}", params(("name" = String, Path, description = "user name", pattern = "^[a-z0-9][a-z0-9_.-]{0,31}$")),
    responses((status = 200, body = HostRecord), (status = 404, body = ErrorBody)))]
async fn get_host(State(c): Ctx, Path(name): Path<String>) -> ApiResult<HostRecord> {
    c.hosts().await.into_iter().find(|h| h.ad.name == name).map(Json).ok_or_else(|| CoordinatorError::UnknownHost(name).into())
}

/// A host registers and refreshes its advertisement; the answer names the image servers.
#[utoipa::path(post, path = "/api/v1/hosts/heartbeat", request_body = HostHeartbeat, security(("node_certificate" = [])),
    responses((status = 200, body = HeartbeatReply)))]
async fn host_heartbeat(
    State(c): Ctx,
    Extension(nodes): Nodes,
    Extension(peer): Extension<NodePeer>,
    body: Result<Json<HostHeartbeat>, JsonRejection>,
) -> ApiResult<HeartbeatReply> {
    node_role(&nodes, &peer, NodeRole::Host)?;
    let Json(hb) = body?;
    if vgrid_api::manifest::validate_name(&hb.ad.name).is_err() {
        return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("invalid host name {:?}", hb.ad.name)));
    }
    node_peer(&nodes, &peer, NodeRole::Host, &hb.ad.name)?;
    let attached = hb.ad.networks.clone();
    let image_servers = c.heartbeat(hb).await?;
    let networks = c.site_networks(&attached).await?;
    Ok(Json(HeartbeatReply { interval_secs: c.registry().interval.as_secs().max(1), image_servers, networks }))
}

#[utoipa::path(get, path = "/api/v1/image-servers", responses((status = 200, body = [ImageServerAd])))]
async fn list_image_servers(State(c): Ctx, Extension(p): Caller) -> ApiResult<Vec<ImageServerAd>> {
    let mut ads = c.registry().image_servers();
    // The servers are everyone's to know; another user's private images and volumes are not.
    for ad in &mut ads {
        ad.images.retain(|i| vgrid_api::rest::ImageOwner { owner: i.owner.clone(), public: i.public }.readable_by(&p.user, p.admin));
    }
    Ok(Json(ads))
}

/// An image server registers and advertises its images.
#[utoipa::path(post, path = "/api/v1/image-servers/heartbeat", request_body = ImageServerAd, security(("node_certificate" = [])),
    responses((status = 200, body = HeartbeatReply)))]
async fn image_server_heartbeat(
    State(c): Ctx,
    Extension(nodes): Nodes,
    Extension(peer): Extension<NodePeer>,
    body: Result<Json<ImageServerAd>, JsonRejection>,
) -> ApiResult<HeartbeatReply> {
    node_role(&nodes, &peer, NodeRole::ImageServer)?;
    let Json(ad) = body?;
    node_peer(&nodes, &peer, NodeRole::ImageServer, &ad.name)?;
    c.image_server_beat(ad).await?;
    Ok(Json(HeartbeatReply {
        interval_secs: c.registry().interval.as_secs().max(1),
        image_servers: c.registry().image_server_urls(),
        networks: Vec::new(),
    }))
}

/// Which hosts could start a VM like this now (VM futures), and why not the others.
#[utoipa::path(post, path = "/api/v1/futures", request_body = FuturesQuery,
    responses((status = 200, body = [Future]), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody, description = "no image server has the image"),
              (status = 502, body = ErrorBody, description = "an image server failed to answer"), (status = 503, body = ErrorBody, description = "no image server is registered yet (after a restart): retry after the Retry-After seconds")))]
async fn futures(State(c): Ctx, Extension(p): Caller, body: Result<Json<FuturesQuery>, JsonRejection>) -> ApiResult<Vec<Future>> {
    let Json(q) = body?;
    Ok(Json(c.futures(&q, &p.user).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_every_body() {
        let doc = vgrid_api::openapi::served(&ApiDoc::openapi());
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for name in [
            "VmCreate",
            "VmRecord",
            "VmConfig",
            "BootConfig",
            "NetConfig",
            "Nic",
            "Forward",
            "Accel",
            "Resources",
            "ImageRef",
            "HostRecord",
            "HostState",
            "HostHeartbeat",
            "HeartbeatReply",
            "VmReport",
            "VmWaiting",
            "FuturesQuery",
            "Future",
            "Suspended",
            "SavedImage",
            "Migration",
            "MigrationStatus",
        ] {
            assert!(schemas.contains_key(name), "{name} missing from the OpenAPI document");
        }
        assert!(doc["paths"]["/api/v1/futures"]["post"].is_object());
    }
}
