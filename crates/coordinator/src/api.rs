//! The REST API: `/api/v1/...`, JSON bodies from `vgrid-api`, errors as
//! `{"error": "...", "detail": ...}`, and the OpenAPI document at `/api/openapi.json`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as TMessage;
use utoipa::OpenApi;
use vgrid_api::grid::{HostAd, ImageServerAd};
use vgrid_api::vm::{ConsoleChunk, VmCreate, VmRecord, VmStop};
use vgrid_api::ErrorBody;

use crate::hosts::{HeartbeatReply, HostHeartbeat, HostRecord, HostState};
use crate::lifecycle::{Coordinator, CoordinatorError, Future, FuturesQuery};

/// An error as the API returns it.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1, detail: None })).into_response()
    }
}

impl From<CoordinatorError> for ApiError {
    fn from(e: CoordinatorError) -> Self {
        use CoordinatorError::*;
        let code = match &e {
            BadRequest(_) => StatusCode::BAD_REQUEST,
            UnknownImage(_) | UnknownVm(_) | UnknownHost(_) => StatusCode::NOT_FOUND,
            Conflict(_) | Capacity(_) => StatusCode::CONFLICT,
            Store(_) | Host(_) => StatusCode::BAD_GATEWAY,
            Expr(_) => StatusCode::BAD_REQUEST,
            State(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, format!("malformed request body: {}", r.body_text()))
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;
type Ctx = State<Arc<Coordinator>>;

#[derive(OpenApi)]
#[openapi(
    info(title = "vgrid API", description = "Run VMs on a grid of hosts, images streamed on demand."),
    paths(list_vms, create_vm, get_vm, stop_vm, migrate_vm, delete_vm, console, list_hosts, get_host, host_heartbeat,
        list_image_servers, image_server_heartbeat, futures),
    components(schemas(VmCreate, VmRecord, VmStop, ConsoleChunk, ErrorBody, HostAd, ImageServerAd, HostRecord,
        HostState, HostHeartbeat, HeartbeatReply, FuturesQuery, Future, vgrid_api::vm::VmState, vgrid_api::vm::Forward,
        vgrid_api::migrate::VmMigrate, vgrid_api::migrate::Migration, vgrid_api::migrate::MigrationStatus))
)]
pub struct ApiDoc;

/// The coordinator's routes (`/api/...`). No fallback: the caller merges other roles' routes.
pub fn router(c: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/api/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .route("/api/v1/health", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .route("/api/v1/vms", get(list_vms).post(create_vm))
        .route("/api/v1/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/api/v1/vms/{id}/stop", post(stop_vm))
        .route("/api/v1/vms/{id}/migrate", post(migrate_vm))
        .route("/api/v1/vms/{id}/console", get(console))
        .route("/api/v1/vms/{id}/console/ws", get(console_ws))
        .route("/api/v1/hosts", get(list_hosts))
        .route("/api/v1/hosts/heartbeat", post(host_heartbeat))
        .route("/api/v1/hosts/{name}", get(get_host))
        .route("/api/v1/futures", post(futures))
        .route("/api/v1/image-servers", get(list_image_servers))
        .route("/api/v1/image-servers/heartbeat", post(image_server_heartbeat))
        .with_state(c)
}

#[utoipa::path(get, path = "/api/v1/vms", responses((status = 200, body = [VmRecord])))]
async fn list_vms(State(c): Ctx) -> ApiResult<Vec<VmRecord>> {
    Ok(Json(c.list()?))
}

#[utoipa::path(post, path = "/api/v1/vms", request_body = VmCreate,
    responses((status = 201, body = VmRecord), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_vm(State(c): Ctx, body: Result<Json<VmCreate>, JsonRejection>) -> Result<(StatusCode, Json<VmRecord>), ApiError> {
    let Json(req) = body?;
    Ok((StatusCode::CREATED, Json(c.create(req).await?)))
}

#[utoipa::path(get, path = "/api/v1/vms/{id}", params(("id" = String, Path, description = "VM id, unique id prefix, or name")),
    responses((status = 200, body = VmRecord), (status = 404, body = ErrorBody)))]
async fn get_vm(State(c): Ctx, Path(id): Path<String>) -> ApiResult<VmRecord> {
    Ok(Json(c.get(&id)?))
}

#[utoipa::path(post, path = "/api/v1/vms/{id}/stop", params(("id" = String, Path)), request_body = VmStop,
    responses((status = 200, body = VmRecord), (status = 404, body = ErrorBody)))]
async fn stop_vm(State(c): Ctx, Path(id): Path<String>, body: Option<Json<VmStop>>) -> ApiResult<VmRecord> {
    let force = body.map(|b| b.0.force).unwrap_or(false);
    Ok(Json(c.stop(&id, force).await?))
}

/// Starts a live migration; the record (`migrating`) is returned at once and its `migration`
/// shows progress until its status is `completed`, `cancelled` or `failed`.
#[utoipa::path(post, path = "/api/v1/vms/{id}/migrate", params(("id" = String, Path)), request_body = vgrid_api::migrate::VmMigrate,
    responses((status = 202, body = VmRecord), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
async fn migrate_vm(
    State(c): Ctx,
    Path(id): Path<String>,
    body: Result<Json<vgrid_api::migrate::VmMigrate>, JsonRejection>,
) -> Result<(StatusCode, Json<VmRecord>), ApiError> {
    let Json(req) = body?;
    Ok((StatusCode::ACCEPTED, Json(c.migrate(&id, req).await?)))
}

#[derive(Deserialize, utoipa::IntoParams)]
struct RmQuery {
    /// Stop the VM first if it is running.
    #[serde(default)]
    force: bool,
}

#[utoipa::path(delete, path = "/api/v1/vms/{id}", params(("id" = String, Path), RmQuery),
    responses((status = 200, body = VmRecord), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_vm(State(c): Ctx, Path(id): Path<String>, Query(q): Query<RmQuery>) -> ApiResult<VmRecord> {
    Ok(Json(c.remove(&id, q.force).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
struct ConsoleQuery {
    /// Byte offset in the console log to start from; negative counts from the end.
    #[serde(default)]
    offset: i64,
}

#[utoipa::path(get, path = "/api/v1/vms/{id}/console", params(("id" = String, Path), ConsoleQuery),
    responses((status = 200, body = ConsoleChunk), (status = 404, body = ErrorBody)))]
async fn console(State(c): Ctx, Path(id): Path<String>, Query(q): Query<ConsoleQuery>) -> ApiResult<ConsoleChunk> {
    Ok(Json(c.console(&id, q.offset).await?))
}

/// Interactive console: binary WebSocket frames both ways, bridged to the host's console socket.
async fn console_ws(State(c): Ctx, Path(id): Path<String>, ws: WebSocketUpgrade) -> Result<Response, ApiError> {
    let (rec, url) = c.console_ws_url(&id)?;
    let (host_ws, _) = tokio_tungstenite::connect_async(&url).await.map_err(|e| {
        ApiError(StatusCode::BAD_GATEWAY, format!("console of VM {} on host {}: {e}", rec.id, rec.host.unwrap_or_default()))
    })?;
    Ok(ws.on_upgrade(move |socket| bridge(socket, host_ws)))
}

async fn bridge(
    client: WebSocket,
    host: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
) {
    let (mut ctx, mut crx) = client.split();
    let (mut htx, mut hrx) = host.split();
    loop {
        tokio::select! {
            m = hrx.next() => match m {
                Some(Ok(TMessage::Binary(b))) => if ctx.send(Message::Binary(b.to_vec().into())).await.is_err() { break },
                Some(Ok(TMessage::Text(t))) => if ctx.send(Message::Text(t.as_str().into())).await.is_err() { break },
                Some(Ok(TMessage::Close(_))) | None | Some(Err(_)) => break,
                _ => {}
            },
            m = crx.next() => match m {
                Some(Ok(Message::Binary(b))) => if htx.send(TMessage::Binary(b.to_vec().into())).await.is_err() { break },
                Some(Ok(Message::Text(t))) => if htx.send(TMessage::Text(t.as_str().into())).await.is_err() { break },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => {}
            }
        }
    }
    let _ = ctx.send(Message::Close(None)).await;
    let _ = htx.send(TMessage::Close(None)).await;
}

#[utoipa::path(get, path = "/api/v1/hosts", responses((status = 200, body = [HostRecord])))]
async fn list_hosts(State(c): Ctx) -> ApiResult<Vec<HostRecord>> {
    Ok(Json(c.hosts()))
}

#[utoipa::path(get, path = "/api/v1/hosts/{name}", params(("name" = String, Path)),
    responses((status = 200, body = HostRecord), (status = 404, body = ErrorBody)))]
async fn get_host(State(c): Ctx, Path(name): Path<String>) -> ApiResult<HostRecord> {
    c.hosts()
        .into_iter()
        .find(|h| h.ad.name == name)
        .map(Json)
        .ok_or_else(|| CoordinatorError::UnknownHost(name).into())
}

/// A host registers and refreshes its advertisement; the answer names the image servers.
#[utoipa::path(post, path = "/api/v1/hosts/heartbeat", request_body = HostHeartbeat,
    responses((status = 200, body = HeartbeatReply), (status = 400, body = ErrorBody)))]
async fn host_heartbeat(State(c): Ctx, body: Result<Json<HostHeartbeat>, JsonRejection>) -> ApiResult<HeartbeatReply> {
    let Json(hb) = body?;
    if vgrid_api::manifest::validate_name(&hb.ad.name).is_err() {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("invalid host name {:?}", hb.ad.name)));
    }
    let image_servers = c.heartbeat(hb)?;
    Ok(Json(HeartbeatReply { interval_secs: c.registry().interval.as_secs().max(1), image_servers }))
}

#[utoipa::path(get, path = "/api/v1/image-servers", responses((status = 200, body = [ImageServerAd])))]
async fn list_image_servers(State(c): Ctx) -> ApiResult<Vec<ImageServerAd>> {
    Ok(Json(c.registry().image_servers()))
}

/// An image server registers and advertises its images.
#[utoipa::path(post, path = "/api/v1/image-servers/heartbeat", request_body = ImageServerAd,
    responses((status = 200, body = HeartbeatReply), (status = 400, body = ErrorBody)))]
async fn image_server_heartbeat(State(c): Ctx, body: Result<Json<ImageServerAd>, JsonRejection>) -> ApiResult<HeartbeatReply> {
    let Json(ad) = body?;
    c.registry().server_beat(ad);
    Ok(Json(HeartbeatReply { interval_secs: c.registry().interval.as_secs().max(1), image_servers: c.registry().image_server_urls() }))
}

/// Which hosts could start a VM like this now (VM futures), and why not the others.
#[utoipa::path(post, path = "/api/v1/futures", request_body = FuturesQuery,
    responses((status = 200, body = [Future]), (status = 400, body = ErrorBody)))]
async fn futures(State(c): Ctx, body: Result<Json<FuturesQuery>, JsonRejection>) -> ApiResult<Vec<Future>> {
    let Json(q) = body?;
    Ok(Json(c.futures(&q).await?))
}
