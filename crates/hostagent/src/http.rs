//! The host agent's HTTP API (`/host/v1/...`), spoken by the coordinator: launch, stop, wait
//! for, release and remove VMs; their console (log pages and a WebSocket); cache statistics and
//! explicit staging (`pull`) with NDJSON progress.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use vgrid_api::host::{HostUsage, LaunchRequest, PullProgress, VmExit};
use vgrid_api::vm::{ConsoleChunk, VmStop};
use vgrid_api::{ErrorBody, ImageRef};

use crate::agent::{Agent, AgentError};

type Ctx = State<Arc<Agent>>;

pub(crate) struct HttpError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1, detail: None })).into_response()
    }
}

impl From<AgentError> for HttpError {
    fn from(e: AgentError) -> Self {
        let code = match &e {
            AgentError::UnknownVm(_) => StatusCode::NOT_FOUND,
            AgentError::NoKvm { .. } => StatusCode::BAD_REQUEST,
            AgentError::Admission(crate::resources::AdmissionError::Invalid { .. }) => StatusCode::BAD_REQUEST,
            AgentError::Admission(_) => StatusCode::CONFLICT,
            AgentError::Migration { .. } => StatusCode::CONFLICT,
            AgentError::Proxy(vgrid_blockproxy::ProxyError::ImageNotFound { .. }) => StatusCode::NOT_FOUND,
            AgentError::Mobile(m) => crate::mobile::status_of(m),
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        HttpError(code, e.to_string())
    }
}

/// The host API. With `users` (always, outside in-process tests) only the coordinator (its
/// grid certificate) or an admin (a login token) may call it: 401 for anybody else without
/// credentials, 403 with others'.
pub fn router(agent: Arc<Agent>, users: Option<vgrid_trust::caller::Users>) -> Router {
    let r = routes(agent);
    match users {
        Some(u) => r
            .layer(axum::middleware::from_fn(only_coordinator))
            .layer(axum::middleware::from_fn_with_state(u, vgrid_trust::caller::identify_layer)),
        None => r,
    }
}

async fn only_coordinator(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use vgrid_trust::caller::{caller_of, refuse, Caller};
    let c = caller_of(&req);
    if c.is_node_or_admin(vgrid_trust::NodeRole::Coordinator) {
        return next.run(req).await;
    }
    let what = format!("{} {}", req.method(), req.uri().path());
    tracing::warn!(caller = %c.describe(), %what, "refused a host API request");
    match c {
        Caller::Anonymous => refuse(
            StatusCode::UNAUTHORIZED,
            format!("{what}: the host API answers its coordinator (by certificate) or an admin (by token)"),
        ),
        c => {
            refuse(StatusCode::FORBIDDEN, format!("{what}: {} may not use the host API; only the coordinator and admins may", c.describe()))
        }
    }
}

fn routes(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/host/v1/cache/stats", get(stats))
        .route("/host/v1/usage", get(usage))
        .route("/host/v1/pull/{image}", post(pull))
        .route("/host/v1/vms", get(list).post(launch))
        .route("/host/v1/vms/{id}", axum::routing::delete(remove))
        .route("/host/v1/vms/{id}/stop", post(stop))
        .route("/host/v1/vms/{id}/wait", get(wait))
        .route("/host/v1/vms/{id}/release", post(release))
        .route("/host/v1/vms/{id}/snapshot", post(crate::mobile::http_snapshot))
        .route("/host/v1/vms/{id}/suspend", post(crate::mobile::http_suspend))
        .route("/host/v1/vms/{id}/saving", get(crate::mobile::http_saving))
        .route("/host/v1/vms/{id}/console", get(console))
        .route("/host/v1/vms/{id}/console/ws", get(console_ws))
        .merge(crate::migrate::router())
        .with_state(agent)
}

async fn stats(State(a): Ctx) -> Response {
    Json(a.proxy().stats()).into_response()
}

async fn list(State(a): Ctx) -> Response {
    Json(a.vms()).into_response()
}

async fn launch(State(a): Ctx, body: Result<Json<LaunchRequest>, JsonRejection>) -> Result<Response, HttpError> {
    let Json(req) = body.map_err(|e| HttpError(StatusCode::BAD_REQUEST, format!("malformed launch request: {}", e.body_text())))?;
    crate::vm::validate_vm_id(&req.id).map_err(|e| HttpError(StatusCode::BAD_REQUEST, e.to_string()))?;
    // Its own task: a caller that goes away (a coordinator restarting) does not cancel a
    // launch half-way; the restarted coordinator finds the VM running.
    let id = req.id.clone();
    let l = tokio::spawn(async move { a.launch(req, &|_| {}).await })
        .await
        .map_err(|e| HttpError(StatusCode::INTERNAL_SERVER_ERROR, format!("launch of VM {id} ended abnormally: {e}")))??;
    Ok(Json(l).into_response())
}

async fn stop(State(a): Ctx, Path(id): Path<String>, body: Option<Json<VmStop>>) -> Result<Response, HttpError> {
    a.stop(&id, body.map(|b| b.0.force).unwrap_or(false)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Long poll: answers when the VM's QEMU has exited (at once when the host does not run it).
async fn wait(State(a): Ctx, Path(id): Path<String>) -> Response {
    let present = a.has_vm(&id);
    let exit = a.wait_exit(&id).await;
    let cause = a.resources().exit_cause(&id);
    Json(VmExit { exit, console_tail: a.console_tail(&id, 10), cause, present }).into_response()
}

/// Per-VM usage counters (as in the heartbeat), the host load and its prediction.
async fn usage(State(a): Ctx) -> Response {
    let r = a.resources();
    let load = r.load();
    Json(HostUsage {
        vms: r.reports(),
        load_now: load.now,
        load_predicted: load.predicted,
        cpu_cap: r.cap_cores().unwrap_or(0.0),
        free_cpu_share: r.free_share(),
        cgroups: r.cgroup_version(),
    })
    .into_response()
}

async fn release(State(a): Ctx, Path(id): Path<String>) -> Result<Response, HttpError> {
    a.release(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn remove(State(a): Ctx, Path(id): Path<String>) -> Result<Response, HttpError> {
    a.remove(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    offset: i64,
}

/// At most this much console log per request.
const CONSOLE_PAGE: u64 = 256 * 1024;

async fn console(State(a): Ctx, Path(id): Path<String>, Query(q): Query<ConsoleQuery>) -> Result<Response, HttpError> {
    // A VM received by a migration: what it printed at the source comes first.
    if let Some(chunk) = crate::migrate::console_with_history(&a, &id, q.offset, CONSOLE_PAGE) {
        return Ok(Json(chunk).into_response());
    }
    let path = a.console_log(&id);
    // Never through a link: the directory is QEMU's user's, and the log goes to the VM's owner.
    let mut f = match crate::qemu_user::open_file(&path).map(tokio::fs::File::from_std) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Json(ConsoleChunk { offset: 0, next: 0, data: String::new() }).into_response())
        }
        Err(e) => return Err(HttpError(StatusCode::INTERNAL_SERVER_ERROR, format!("console log of VM {id}: {e}"))),
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let start = if q.offset < 0 { len.saturating_sub(q.offset.unsigned_abs()) } else { (q.offset as u64).min(len) };
    let mut buf = Vec::new();
    f.seek(std::io::SeekFrom::Start(start)).await.ok();
    f.take(CONSOLE_PAGE).read_to_end(&mut buf).await.ok();
    let next = start + buf.len() as u64;
    Ok(Json(ConsoleChunk { offset: start, next, data: String::from_utf8_lossy(&buf).into_owned() }).into_response())
}

/// Interactive console: binary WebSocket frames both ways, bridged to the VM's serial socket.
async fn console_ws(State(a): Ctx, Path(id): Path<String>, ws: WebSocketUpgrade) -> Result<Response, HttpError> {
    let sock = a.console_socket(&id);
    let stream = tokio::net::UnixStream::connect(&sock)
        .await
        .map_err(|e| HttpError(StatusCode::CONFLICT, format!("console of VM {id} is not reachable ({}): {e}", sock.display())))?;
    Ok(ws.on_upgrade(move |socket| bridge(socket, stream)))
}

async fn bridge(mut ws: WebSocket, stream: tokio::net::UnixStream) {
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = vec![0u8; 4096];
    loop {
        let forwarded = tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => ws.send(Message::Binary(buf[..n].to_vec().into())).await.is_ok(),
            },
            m = ws.recv() => match m {
                Some(Ok(Message::Binary(b))) => wr.write_all(&b).await.is_ok(),
                Some(Ok(Message::Text(t))) => wr.write_all(t.as_bytes()).await.is_ok(),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => true,
            }
        };
        if !forwarded {
            break;
        }
    }
}

async fn pull(State(a): Ctx, Path(image): Path<String>) -> Response {
    let r: ImageRef = match image.parse() {
        Ok(r) => r,
        Err(e) => return HttpError(StatusCode::BAD_REQUEST, format!("{e}")).into_response(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<PullProgress>(64);
    tokio::spawn(async move { a.pull(&r, tx).await });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let p = rx.recv().await?;
        let mut line = serde_json::to_vec(&p).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::io::Error>(line), rx))
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response()
}
