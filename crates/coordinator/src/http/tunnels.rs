//! The tunnel relay's WebSockets (see `crate::relay` and `vgrid_api::tunnel`):
//! `/api/v1/tunnels/hosts/{name}`, one per host agent, authenticated by its grid certificate
//! and carrying the tunnel interfaces of its guests; `/api/v1/networks/{name}/tunnel`, a
//! user's `vgrid tunnel`, authenticated by the user's token and only for the user's own tunnel
//! network. Each connection has a reader (this task: frames into the relay's switch) and a
//! writer (its own task: batches out of a bounded queue), so frames never wait on requests.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use vgrid_api::net::{NetworkKind, Nic};
use vgrid_api::tunnel::{batch, records, DirectEndpoint, DirectTicket, HostControl};
use vgrid_api::ErrorBody;
use vgrid_trust::NodeRole;

use super::{ApiError, NodePeer, Nodes};
use crate::auth::Principal;
use crate::relay::{PortTx, QUEUE_FRAMES};
use crate::{Coordinator, CoordinatorError};

type Upgrade = Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>;

/// A host agent's connection: its certificate must name host `name`.
pub async fn host_link(
    State(c): State<Arc<Coordinator>>,
    Extension(nodes): Nodes,
    Extension(peer): Extension<NodePeer>,
    Path(name): Path<String>,
    ws: Upgrade,
) -> Result<Response, ApiError> {
    super::node_peer(&nodes, &peer, NodeRole::Host, &name)?;
    let ws = match ws {
        Ok(ws) => ws,
        Err(r) => return Ok(r.into_response()),
    };
    Ok(ws.read_buffer_size(vgrid_trust::tls::WS_READ_BUFFER).on_upgrade(move |s| run_host(c, name, s)))
}

/// A user's `vgrid tunnel NAME`: only the owner of tunnel network `name` joins it.
pub async fn user_link(
    State(c): State<Arc<Coordinator>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    ws: Upgrade,
) -> Result<Response, ApiError> {
    own_tunnel(&c, &p, &name).await?;
    let ws = match ws {
        Ok(ws) => ws,
        Err(r) => return Ok(r.into_response()),
    };
    Ok(ws.read_buffer_size(vgrid_trust::tls::WS_READ_BUFFER).on_upgrade(move |s| run_user(c, name, p.user, s)))
}

/// Refuses unless tunnel network `name` is `p`'s own (404 for another user's, so its name
/// tells nothing; 403 for an admin, who sees it but may not join another user's LAN).
async fn own_tunnel(c: &Coordinator, p: &Principal, name: &str) -> Result<(), ApiError> {
    vgrid_api::net::check_network_name(name).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let unknown =
        || ApiError(StatusCode::NOT_FOUND, format!("user {} has no tunnel network {name:?} (vgrid net create {name} --tunnel)", p.user));
    let net = match c.network(name).await {
        Ok(n) => n,
        Err(CoordinatorError::UnknownNetwork(_)) => return Err(unknown()),
        Err(e) => return Err(e.into()),
    };
    match &net.kind {
        NetworkKind::Site(_) => Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("network {name:?} is a site network: `vgrid tunnel` joins tunnel networks (vgrid net create NAME --tunnel)"),
        )),
        NetworkKind::Tunnel if net.owner == p.user => Ok(()),
        NetworkKind::Tunnel if p.admin => Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("tunnel network {name:?} belongs to user {}: only its owner may join it", net.owner),
        )),
        NetworkKind::Tunnel => Err(unknown()),
    }
}

/// Hosts the caller has a direct link to already.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DirectQuery {
    /// Comma-separated host names to leave out (no ticket is issued for them).
    #[serde(default)]
    pub skip: String,
}

/// The direct paths of the caller's tunnel network `name`: for each host that runs (or is
/// receiving) a VM with an interface on it and takes direct connections, the host agent's
/// WebSocket and a one-time ticket the coordinator just gave that agent. Hosts that refuse
/// (`vgrid host --tunnel-direct off`) or do not answer are left out: their VMs stay on the relay.
#[utoipa::path(get, path = "/api/v1/networks/{name}/tunnel/direct", params(("name" = String, Path, description = "a tunnel network of the caller"), DirectQuery),
    responses((status = 200, body = [DirectEndpoint]), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn direct_endpoints(
    State(c): State<Arc<Coordinator>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    Query(q): Query<DirectQuery>,
) -> Result<Json<Vec<DirectEndpoint>>, ApiError> {
    own_tunnel(&c, &p, &name).await?;
    let skip: Vec<&str> = q.skip.split(',').collect();
    let mut hosts = std::collections::BTreeSet::new();
    for rec in c.list().await? {
        let on_net = rec.config.net.nics.iter().any(|n| matches!(n, Nic::Tunnel { network, .. } if *network == name));
        if !on_net || rec.owner != p.user {
            continue;
        }
        hosts.extend(rec.host.clone());
        hosts.extend(rec.migration.as_ref().filter(|m| m.status == vgrid_api::migrate::MigrationStatus::Active).map(|m| m.to.clone()));
    }
    let mut out = Vec::new();
    for host in hosts.into_iter().filter(|h| !skip.contains(&h.as_str())) {
        let Ok(client) = c.client(&host) else { continue };
        let ticket = DirectTicket { ticket: crate::auth::random_hex(24), network: name.clone(), owner: p.user.clone() };
        match client.tunnel_ticket(&ticket).await {
            Ok(()) => out.push(DirectEndpoint {
                host: host.clone(),
                url: format!("{}/host/v1/tunnels/{name}/direct", client.url),
                ticket: ticket.ticket,
            }),
            Err(e) => tracing::debug!(host = %host, network = %name, "no direct tunnel path to host {host}: {e}"),
        }
    }
    Ok(Json(out))
}

/// Writes what the relay queued for this connection, batched (several frames per message),
/// and the control messages.
async fn write_batches(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut frames: mpsc::Receiver<(u32, crate::relay::Frame)>,
    mut ctl: mpsc::UnboundedReceiver<String>,
) {
    loop {
        let sent = tokio::select! {
            t = ctl.recv() => match t {
                Some(t) => sink.send(Message::Text(t.into())).await,
                None => break,
            },
            f = frames.recv() => {
                let Some((port, f)) = f else { break };
                let b = batch((port, f), || frames.try_recv().ok());
                sink.send(Message::Binary(b.into())).await
            }
        };
        if sent.is_err() {
            break;
        }
    }
    let _ = sink.send(Message::Close(None)).await;
}

fn writer(ws: WebSocket) -> (PortTx, mpsc::UnboundedSender<String>, futures::stream::SplitStream<WebSocket>, tokio::task::JoinHandle<()>) {
    let (sink, stream) = ws.split();
    let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    (tx, ctl_tx, stream, tokio::spawn(write_batches(sink, rx, ctl_rx)))
}

async fn run_host(c: Arc<Coordinator>, host: String, ws: WebSocket) {
    let conn = c.relay.connection();
    let (tx, ctl, mut stream, w) = writer(ws);
    tracing::info!(host = %host, "tunnel link of host {host} connected");
    // Port → (network, VM) of this host's attached ports.
    let mut ports: HashMap<u32, (String, String)> = HashMap::new();
    while let Some(Ok(m)) = stream.next().await {
        match m {
            Message::Binary(b) => {
                for r in records(&b) {
                    match r {
                        Ok((port, f)) => {
                            if let Some((net, _)) = ports.get(&port) {
                                c.relay.forward(net, (conn, port), f);
                            }
                        }
                        Err(e) => tracing::warn!(host = %host, "tunnel link of host {host}: malformed batch: {e}"),
                    }
                }
                // The writers the frames went to run before this link reads again (latency).
                tokio::task::yield_now().await;
            }
            Message::Text(t) => match serde_json::from_str::<HostControl>(&t) {
                Ok(HostControl::Attach { port, vm, nic }) => {
                    if let Some((old, _)) = ports.remove(&port) {
                        c.relay.detach(&old, (conn, port));
                    }
                    let reply = match attach_vm(&c, &host, &vm, nic, (conn, port), &tx).await {
                        Ok(network) => {
                            tracing::info!(host = %host, vm = %vm, network = %network, "VM {vm} (interface {nic} on host {host}) joined tunnel network {network}");
                            ports.insert(port, (network.clone(), vm));
                            HostControl::Attached { port, network }
                        }
                        Err(error) => {
                            tracing::warn!(host = %host, vm = %vm, "tunnel port refused: {error}");
                            HostControl::Refused { port, error }
                        }
                    };
                    let _ = ctl.send(serde_json::to_string(&reply).unwrap_or_default());
                }
                Ok(HostControl::Detach { port }) => {
                    if let Some((net, vm)) = ports.remove(&port) {
                        c.relay.detach(&net, (conn, port));
                        tracing::info!(host = %host, vm = %vm, network = %net, "VM {vm} left tunnel network {net} on host {host}");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(host = %host, "tunnel link of host {host}: malformed control message: {e}"),
            },
            Message::Close(_) => break,
            _ => {}
        }
    }
    for (port, (net, _)) in ports {
        c.relay.detach(&net, (conn, port));
    }
    w.abort();
    tracing::info!(host = %host, "tunnel link of host {host} closed");
}

/// Checks that interface `nic` of VM `vm` is a tunnel interface of its owner's tunnel network
/// and that the VM runs on (or migrates to) `host`; attaches the port with the VM's MAC.
async fn attach_vm(c: &Coordinator, host: &str, vm: &str, nic: usize, key: (u64, u32), tx: &PortTx) -> Result<String, String> {
    let rec = c.record(vm).await.map_err(|e| e.to_string())?.ok_or_else(|| format!("no VM {vm}"))?;
    let here = rec.host.as_deref() == Some(host) || rec.migration.as_ref().is_some_and(|m| m.to == host);
    if !here {
        return Err(format!("VM {vm} does not run on host {host}"));
    }
    let Some(Nic::Tunnel { network, mac: Some(mac) }) = rec.config.net.nics.get(nic) else {
        return Err(format!("interface {nic} of VM {vm} is not a tunnel interface with a MAC"));
    };
    let net = c.network(network).await.map_err(|e| e.to_string())?;
    if net.kind != NetworkKind::Tunnel {
        return Err(format!("network {network:?} of VM {vm} is not a tunnel network"));
    }
    c.relay.attach(network, &net.owner, &rec.owner, key, tx.clone(), Some(mac.0)).map_err(|e| e.to_string())?;
    Ok(network.clone())
}

async fn run_user(c: Arc<Coordinator>, network: String, user: String, ws: WebSocket) {
    let conn = c.relay.connection();
    let (tx, _ctl, mut stream, w) = writer(ws);
    if let Err(e) = c.relay.attach(&network, &user, &user, (conn, 0), tx, None) {
        tracing::warn!(user = %user, network = %network, "{e}");
        w.abort();
        return;
    }
    tracing::info!(user = %user, network = %network, "vgrid tunnel of user {user} joined tunnel network {network}");
    while let Some(Ok(m)) = stream.next().await {
        match m {
            Message::Binary(b) => {
                for r in records(&b) {
                    match r {
                        Ok((_, f)) => c.relay.forward(&network, (conn, 0), f),
                        Err(e) => tracing::warn!(user = %user, network = %network, "vgrid tunnel of user {user}: malformed batch: {e}"),
                    }
                }
                tokio::task::yield_now().await;
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    c.relay.detach(&network, (conn, 0));
    w.abort();
    tracing::info!(user = %user, network = %network, "vgrid tunnel of user {user} left tunnel network {network}");
}
