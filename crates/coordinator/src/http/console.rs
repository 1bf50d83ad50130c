//! The VM streams the coordinator proxies to the VM's host over the caller's authenticated
//! connection: the serial console, the VNC display and the guest's ssh port, each a WebSocket of binary frames
//! bridged to the host agent's WebSocket for the same stream. Only the VM's owner (or an
//! admin) may open them.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as TMessage;

use super::{owned, ApiError, Caller, Ctx};
use crate::auth::Principal;
use crate::lifecycle::Coordinator;

type Upgrade = Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>;

/// Which stream of a VM.
#[derive(Clone, Copy)]
enum Stream {
    Console,
    Vnc,
    Ssh,
}

impl Stream {
    /// Its path segment on the host agent (`/host/v1/vms/{id}/SEGMENT/ws`).
    fn path(self) -> &'static str {
        match self {
            Stream::Console => "console",
            Stream::Vnc => "vnc",
            Stream::Ssh => "ssh",
        }
    }
}

/// Interactive console: binary WebSocket frames both ways, bridged to the host's console socket.
pub(super) async fn console_ws(State(c): Ctx, Extension(p): Caller, Path(id): Path<String>, ws: Upgrade) -> Result<Response, ApiError> {
    proxy(c, p, id, ws, Stream::Console).await
}

/// Graphical console: the VM's VNC display (RFB) as binary WebSocket frames both ways, bridged
/// to the host's VNC socket in the VM's runtime directory (QEMU never listens on a TCP port).
/// `vgrid vm vnc` offers it on a local port to any VNC viewer.
pub(super) async fn vnc_ws(State(c): Ctx, Extension(p): Caller, Path(id): Path<String>, ws: Upgrade) -> Result<Response, ApiError> {
    proxy(c, p, id, ws, Stream::Vnc).await
}

/// The guest's ssh port (TCP 22 through its user-mode interface) as binary WebSocket frames
/// both ways, bridged to the host agent, which connects to QEMU's forward on its loopback.
/// `vgrid vm ssh` uses it as ssh's `ProxyCommand`.
pub(super) async fn ssh_ws(State(c): Ctx, Extension(p): Caller, Path(id): Path<String>, ws: Upgrade) -> Result<Response, ApiError> {
    proxy(c, p, id, ws, Stream::Ssh).await
}

async fn proxy(c: Arc<Coordinator>, p: Principal, id: String, ws: Upgrade, what: Stream) -> Result<Response, ApiError> {
    // Who may open it is decided before whether the request is a proper upgrade.
    let rec = owned(&c, &p, &id).await?;
    let ws = match ws {
        Ok(ws) => ws,
        Err(r) => return Ok(r.into_response()),
    };
    let (rec, url) = c.stream_ws_url(&rec.id, what.path()).await?;
    let (host_ws, _) = vgrid_trust::tls::ws_connect(url.as_str()).await.map_err(|e| {
        ApiError(StatusCode::BAD_GATEWAY, format!("{} of VM {} on host {}: {e}", what.path(), rec.id, rec.host.unwrap_or_default()))
    })?;
    Ok(ws.on_upgrade(move |socket| bridge(socket, host_ws)))
}

async fn bridge(client: WebSocket, host: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>) {
    let (mut ctx, mut crx) = client.split();
    let (mut htx, mut hrx) = host.split();
    loop {
        let forwarded = tokio::select! {
            m = hrx.next() => match m {
                Some(Ok(TMessage::Binary(b))) => ctx.send(Message::Binary(b.to_vec().into())).await.is_ok(),
                Some(Ok(TMessage::Text(t))) => ctx.send(Message::Text(t.as_str().into())).await.is_ok(),
                Some(Ok(TMessage::Close(_))) | None | Some(Err(_)) => break,
                _ => true,
            },
            m = crx.next() => match m {
                Some(Ok(Message::Binary(b))) => htx.send(TMessage::Binary(b.to_vec().into())).await.is_ok(),
                Some(Ok(Message::Text(t))) => htx.send(TMessage::Text(t.as_str().into())).await.is_ok(),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => true,
            }
        };
        if !forwarded {
            break;
        }
    }
    let _ = ctx.send(Message::Close(None)).await;
    let _ = htx.send(TMessage::Close(None)).await;
}
