//! `/host/v1/vms...`, `/host/v1/cache/stats`, `/host/v1/usage`, `/host/v1/pull/{image}`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use vgrid_api::host::{HostUsage, LaunchRequest, Launched, PullProgress, VmExit, VmReport};
use vgrid_api::vm::{ConsoleChunk, VmStop};
use vgrid_api::ErrorBody;
use vgrid_api::ImageRef;
use vgrid_trust::json::Json;
use vgrid_trust::json::JsonRejection;

use super::HttpError;
use crate::agent::Agent;

type Ctx = State<Arc<Agent>>;

#[utoipa::path(get, path = "/host/v1/cache/stats", responses((status = 200, body = Object, description = "the host chunk cache's statistics and waiting reads")))]
pub(super) async fn stats(State(a): Ctx) -> Response {
    Json(a.proxy().stats()).into_response()
}

#[utoipa::path(get, path = "/host/v1/vms", responses((status = 200, body = [VmReport])))]
pub(super) async fn list(State(a): Ctx) -> Response {
    Json(a.vms()).into_response()
}

#[utoipa::path(post, path = "/host/v1/vms", request_body = LaunchRequest, responses((status = 200, body = Launched, description = "QEMU runs"), (status = 404, body = ErrorBody, description = "no image server has the image"), (status = 409, body = ErrorBody, description = "not admitted (capacity, a port taken) or the VM exists"), (status = 502, body = ErrorBody, description = "no image server delivered the image")))]
pub(super) async fn launch(State(a): Ctx, body: Result<Json<LaunchRequest>, JsonRejection>) -> Result<Response, HttpError> {
    let Json(req) = body.map_err(|e| HttpError::body("launch request", e))?;
    crate::spec::validate_vm_id(&req.id).map_err(|e| HttpError(StatusCode::BAD_REQUEST, e.to_string()))?;
    // Its own task: a caller that goes away (a coordinator restarting) does not cancel a
    // launch half-way; the restarted coordinator finds the VM running.
    let id = req.id.clone();
    let l = tokio::spawn(async move { crate::instantiate::launch(&a, req, &|_| {}).await })
        .await
        .map_err(|e| HttpError(StatusCode::INTERNAL_SERVER_ERROR, format!("launch of VM {id} ended abnormally: {e}")))??;
    Ok(Json(l).into_response())
}

#[utoipa::path(post, path = "/host/v1/vms/{id}/stop", params(("id" = String, Path, description = "VM id")), request_body(content = Option<VmStop>, description = "optional"), responses((status = 204, description = "stopped")))]
pub(super) async fn stop(
    State(a): Ctx,
    Path(id): Path<String>,
    body: Result<Option<Json<VmStop>>, JsonRejection>,
) -> Result<Response, HttpError> {
    let body = body.map_err(|e| HttpError::body("stop request", e))?;
    a.stop(&id, body.map(|b| b.0.force).unwrap_or(false)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Long poll: answers when the VM's QEMU has exited (at once when the host does not run it).
#[utoipa::path(get, path = "/host/v1/vms/{id}/wait", params(("id" = String, Path, description = "VM id")), responses((status = 200, body = VmExit, description = "when QEMU has exited (at once when the host does not run the VM)")))]
pub(super) async fn wait(State(a): Ctx, Path(id): Path<String>) -> Response {
    let present = a.has_vm(&id);
    let exit = a.wait_exit(&id).await;
    let cause = a.resources().exit_cause(&id);
    Json(VmExit { exit, console_tail: a.console_tail(&id, 10), cause, present }).into_response()
}

/// Per-VM usage counters (as in the heartbeat), the host load and its prediction.
#[utoipa::path(get, path = "/host/v1/usage", responses((status = 200, body = HostUsage)))]
pub(super) async fn usage(State(a): Ctx) -> Response {
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

#[utoipa::path(post, path = "/host/v1/vms/{id}/release", params(("id" = String, Path, description = "VM id")), responses((status = 204, description = "released")))]
pub(super) async fn release(State(a): Ctx, Path(id): Path<String>) -> Result<Response, HttpError> {
    crate::volume::release(&a, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(delete, path = "/host/v1/vms/{id}", params(("id" = String, Path, description = "VM id")), responses((status = 204, description = "removed")))]
pub(super) async fn remove(State(a): Ctx, Path(id): Path<String>) -> Result<Response, HttpError> {
    crate::volume::remove(&a, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Commits a read-write volume of a running VM: its guest is paused while its writes are
/// read, they are published as the volume's next version (fenced by the VM's epoch).
#[utoipa::path(post, path = "/host/v1/vms/{id}/volumes/{name}/commit", params(("id" = String, Path, description = "VM id"), ("name" = String, Path, description = "volume name")), responses((status = 200, body = vgrid_api::volume::VolumeCommitted, description = "committed"), (status = 409, body = ErrorBody, description = "not attached read-write, or refused by the image server")))]
pub(super) async fn commit_volume(State(a): Ctx, Path((id, name)): Path<(String, String)>) -> Result<Response, HttpError> {
    let c = crate::volume::commit_running(&a, &id, &name).await?;
    Ok(Json(c).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ConsoleQuery {
    /// Byte offset in the console log to start from; negative counts from the end.
    #[serde(default)]
    offset: i64,
}

/// At most this much console log per request.
const CONSOLE_PAGE: u64 = 256 * 1024;

#[utoipa::path(get, path = "/host/v1/vms/{id}/console", params(("id" = String, Path, description = "VM id"), ConsoleQuery), responses((status = 200, body = ConsoleChunk)))]
pub(super) async fn console(
    State(a): Ctx,
    Path(id): Path<String>,
    vgrid_trust::caller::JsonQuery(q): vgrid_trust::caller::JsonQuery<ConsoleQuery>,
) -> Result<Response, HttpError> {
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
pub(super) async fn console_ws(State(a): Ctx, Path(id): Path<String>, ws: WebSocketUpgrade) -> Result<Response, HttpError> {
    socket_ws(a.console_socket(&id), "console", &id, ws).await
}

/// Graphical console: binary WebSocket frames both ways, bridged to the VM's VNC socket.
pub(super) async fn vnc_ws(State(a): Ctx, Path(id): Path<String>, ws: WebSocketUpgrade) -> Result<Response, HttpError> {
    socket_ws(a.vnc_socket(&id), "VNC display", &id, ws).await
}

/// The guest's ssh port: binary WebSocket frames both ways, bridged to a TCP connection to
/// QEMU's forward of guest port 22 on this host's loopback (its port asked of QMP now: a
/// migrated guest has another).
pub(super) async fn ssh_ws(State(a): Ctx, Path(id): Path<String>, ws: WebSocketUpgrade) -> Result<Response, HttpError> {
    let vm = a.vm(&id).ok_or_else(|| HttpError(StatusCode::NOT_FOUND, format!("no VM {id} runs on this host")))?;
    let no_port = |why: String| HttpError(StatusCode::CONFLICT, format!("ssh port of VM {id}: {why}"));
    let usernet = vm
        .execute("human-monitor-command", Some(serde_json::json!({"command-line": "info usernet"})))
        .await
        .map_err(|e| no_port(e.to_string()))?;
    let port = crate::qemu::net::forwarded_port(usernet.as_str().unwrap_or_default(), crate::qemu::net::SSH_PORT)
        .ok_or_else(|| no_port("it has no user-mode interface (on a site network, ssh to its address)".into()))?;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| no_port(format!("127.0.0.1:{port}: {e}")))?;
    let (rd, wr) = stream.into_split();
    Ok(ws.on_upgrade(move |socket| bridge(socket, rd, wr)))
}

async fn socket_ws(sock: std::path::PathBuf, what: &str, id: &str, ws: WebSocketUpgrade) -> Result<Response, HttpError> {
    let stream = tokio::net::UnixStream::connect(&sock)
        .await
        .map_err(|e| HttpError(StatusCode::CONFLICT, format!("{what} of VM {id} is not reachable ({}): {e}", sock.display())))?;
    let (rd, wr) = stream.into_split();
    Ok(ws.on_upgrade(move |socket| bridge(socket, rd, wr)))
}

async fn bridge(mut ws: WebSocket, mut rd: impl tokio::io::AsyncRead + Unpin, mut wr: impl tokio::io::AsyncWrite + Unpin) {
    let mut buf = vec![0u8; 64 * 1024];
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

#[utoipa::path(post, path = "/host/v1/pull/{image}", params(("image" = String, Path, description = "NAME or NAME@VERSION", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}(@[0-9]{1,9})?$")), responses((status = 200, body = PullProgress, content_type = "application/x-ndjson", description = "one progress line per chunk batch, the last with finished or error")))]
pub(super) async fn pull(State(a): Ctx, Path(image): Path<String>) -> Response {
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
