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
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use utoipa::OpenApi;
use vgrid_api::vm::{ConsoleChunk, HostInfo, VmCreate, VmRecord, VmStop};
use vgrid_api::ErrorBody;

use crate::lifecycle::{Coordinator, CoordinatorError};

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
            UnknownImage(_) | UnknownVm(_) => StatusCode::NOT_FOUND,
            Conflict(_) | Capacity(_) => StatusCode::CONFLICT,
            Store(_) => StatusCode::BAD_GATEWAY,
            State(_) | Agent(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
    paths(list_vms, create_vm, get_vm, stop_vm, delete_vm, console, list_hosts),
    components(schemas(VmCreate, VmRecord, VmStop, ConsoleChunk, HostInfo, ErrorBody,
        vgrid_api::vm::VmState, vgrid_api::vm::Forward))
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
        .route("/api/v1/vms/{id}/console", get(console))
        .route("/api/v1/vms/{id}/console/ws", get(console_ws))
        .route("/api/v1/hosts", get(list_hosts))
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

/// At most this much console log per request.
const CONSOLE_PAGE: u64 = 256 * 1024;

#[utoipa::path(get, path = "/api/v1/vms/{id}/console", params(("id" = String, Path), ConsoleQuery),
    responses((status = 200, body = ConsoleChunk), (status = 404, body = ErrorBody)))]
async fn console(State(c): Ctx, Path(id): Path<String>, Query(q): Query<ConsoleQuery>) -> ApiResult<ConsoleChunk> {
    let rec = c.get(&id)?;
    let path = c.agent().console_log(&rec.id);
    let mut f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Json(ConsoleChunk { offset: 0, next: 0, data: String::new() }))
        }
        Err(e) => {
            return Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("console log of VM {}: {e}", rec.id)))
        }
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let start = if q.offset < 0 { len.saturating_sub(q.offset.unsigned_abs()) } else { (q.offset as u64).min(len) };
    let mut buf = Vec::new();
    f.seek(std::io::SeekFrom::Start(start)).await.ok();
    f.take(CONSOLE_PAGE).read_to_end(&mut buf).await.ok();
    let next = start + buf.len() as u64;
    Ok(Json(ConsoleChunk { offset: start, next, data: String::from_utf8_lossy(&buf).into_owned() }))
}

/// Interactive console: binary WebSocket frames both ways, bridged to the VM's serial socket.
async fn console_ws(State(c): Ctx, Path(id): Path<String>, ws: WebSocketUpgrade) -> Result<Response, ApiError> {
    let rec = c.get(&id)?;
    if rec.state != vgrid_api::vm::VmState::Running {
        return Err(ApiError(StatusCode::CONFLICT, format!("VM {} is {}, not running", rec.id, rec.state.as_str())));
    }
    let sock = c.agent().console_socket(&rec.id);
    let stream = tokio::net::UnixStream::connect(&sock).await.map_err(|e| {
        ApiError(StatusCode::CONFLICT, format!("console of VM {} is not reachable ({}): {e}", rec.id, sock.display()))
    })?;
    Ok(ws.on_upgrade(move |socket| bridge(socket, stream)))
}

async fn bridge(mut ws: WebSocket, stream: tokio::net::UnixStream) {
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => if ws.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() { break },
            },
            m = ws.recv() => match m {
                Some(Ok(Message::Binary(b))) => if wr.write_all(&b).await.is_err() { break },
                Some(Ok(Message::Text(t))) => if wr.write_all(t.as_bytes()).await.is_err() { break },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => {}
            }
        }
    }
}

#[utoipa::path(get, path = "/api/v1/hosts", responses((status = 200, body = [HostInfo])))]
async fn list_hosts(State(c): Ctx) -> ApiResult<Vec<HostInfo>> {
    Ok(Json(c.hosts()))
}
