//! The host's side of tunnel networks (`--net tunnel:NAME`): for each tunnel interface of its
//! guests the agent listens on the interface's stream socket (`nicN.sock` in the VM's runtime
//! directory, before QEMU starts, and again for a guest re-adopted after a restart: QEMU
//! reconnects every second), and carries its frames (QEMU's framing: a 4-byte big-endian length,
//! then the frame) to and from the coordinator's relay over ONE WebSocket per host
//! (`/api/v1/tunnels/hosts/NAME`, TLS with the host's grid certificate; see
//! `vgrid_api::tunnel`). Each interface is a port on that connection.
//!
//! **Direct links.** The owner's `vgrid tunnel` may also connect to this agent itself
//! (`GET /host/v1/tunnels/NAME/direct`, TLS with the host's certificate, admitted by a one-time
//! ticket the coordinator handed this agent, see [`Tunnels::admit`]): while it is connected,
//! the ports of network NAME leave the relay (detached) and their frames go straight to the
//! user and back, unseen by the coordinator; when it ends they are attached to the relay again.
//! A port sends only with its VM's MAC on a direct link (others are dropped and counted), and
//! receives only frames for its MAC, broadcast and multicast. `vgrid host --tunnel-direct off`
//! refuses tickets (a host that takes no incoming connections from users).
//!
//! Frames stay off the control plane: each socket and the uplink are their own tasks joined by
//! bounded queues; a full queue drops the frame and counts it ([`TunnelStats`], logged).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Message;
use vgrid_api::net::{MacAddr, Nic};
use vgrid_api::tunnel::{
    batch, dest_mac, records, source_mac, AnswerPoll, DirectControl, DirectTicket, HostControl, Look, MAX_BATCH, MAX_FRAME,
};
use vgrid_api::vm::VmConfig;

use crate::error::AgentError;

/// Frames queued towards the relay, and towards each guest, before frames are dropped.
const QUEUE_FRAMES: usize = 1024;

/// What the tunnel ports carried and dropped since the agent started.
#[derive(Debug, Default)]
pub struct TunnelStats {
    pub to_relay: AtomicU64,
    pub to_guests: AtomicU64,
    /// Dropped: the queue towards the relay was full (or the relay unreachable for long).
    pub dropped_to_relay: AtomicU64,
    /// Dropped: a guest's queue was full (its QEMU not connected or not reading).
    pub dropped_to_guests: AtomicU64,
    /// Carried on direct links, to the user.
    pub to_direct: AtomicU64,
    /// Dropped on the way to a direct link: a full queue, or a source MAC not the VM's.
    pub dropped_to_direct: AtomicU64,
}

struct Port {
    vm: String,
    nic: usize,
    network: String,
    mac: Option<[u8; 6]>,
    to_guest: mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<()>,
    socket: PathBuf,
}

/// A user's direct link for one network: its writer's queues.
struct Direct {
    id: u64,
    frames: mpsc::Sender<Bytes>,
    control: mpsc::UnboundedSender<DirectControl>,
}

/// The ports and the direct links, under one lock (a port is on the relay exactly when its
/// network has no direct link).
#[derive(Default)]
struct Links {
    ports: HashMap<u32, Port>,
    directs: HashMap<String, Direct>,
}

impl Links {
    fn macs(&self, network: &str) -> Vec<MacAddr> {
        self.ports.values().filter(|p| p.network == network).filter_map(|p| p.mac.map(MacAddr)).collect()
    }

    /// Tells network `network`'s direct link (if any) the MACs behind it now.
    fn announce(&self, network: &str) -> bool {
        let Some(d) = self.directs.get(network) else { return false };
        let _ = d.control.send(DirectControl::Macs { macs: self.macs(network) });
        true
    }
}

struct Inner {
    links: Mutex<Links>,
    next: AtomicU32,
    next_direct: AtomicU64,
    /// Whether this host takes direct links (`--tunnel-direct`).
    direct_allowed: AtomicBool,
    /// How long a port waits awake for its guest's answer, microseconds (`--tunnel-poll-us`).
    poll_us: AtomicU64,
    /// Tickets the coordinator issued: ticket → (network, owner, expiry).
    tickets: Mutex<HashMap<String, (String, String, Instant)>>,
    frames: mpsc::Sender<(u32, Bytes)>,
    frames_rx: Mutex<Option<mpsc::Receiver<(u32, Bytes)>>>,
    control: mpsc::UnboundedSender<HostControl>,
    control_rx: Mutex<Option<mpsc::UnboundedReceiver<HostControl>>>,
    wake: Notify,
    stats: TunnelStats,
}

/// The tunnel ports of this host's guests and the uplink to the relay.
pub struct Tunnels {
    inner: Arc<Inner>,
}

impl Default for Tunnels {
    fn default() -> Self {
        let (frames, frames_rx) = mpsc::channel(QUEUE_FRAMES);
        let (control, control_rx) = mpsc::unbounded_channel();
        Tunnels {
            inner: Arc::new(Inner {
                links: Default::default(),
                next: AtomicU32::new(1),
                next_direct: AtomicU64::new(1),
                direct_allowed: AtomicBool::new(true),
                poll_us: AtomicU64::new(vgrid_api::tunnel::DEFAULT_POLL_US),
                tickets: Default::default(),
                frames,
                frames_rx: Mutex::new(Some(frames_rx)),
                control,
                control_rx: Mutex::new(Some(control_rx)),
                wake: Notify::new(),
                stats: Default::default(),
            }),
        }
    }
}

impl Tunnels {
    /// Starts the uplink to the coordinator at `coordinator` as host `host` (once; it connects
    /// while the host has tunnel ports and reconnects with backoff).
    pub fn connect(&self, coordinator: &str, host: &str) {
        let (Some(frames), Some(control)) = (self.inner.frames_rx.lock().unwrap().take(), self.inner.control_rx.lock().unwrap().take())
        else {
            return;
        };
        let url = format!("{}/api/v1/tunnels/hosts/{host}", coordinator.trim_end_matches('/').replacen("http", "ws", 1));
        tokio::spawn(uplink(self.inner.clone(), url, frames, control));
    }

    /// The counters.
    pub fn stats(&self) -> &TunnelStats {
        &self.inner.stats
    }

    /// Whether this host takes direct links from users' `vgrid tunnel` (default: yes).
    pub fn allow_direct(&self, on: bool) {
        self.inner.direct_allowed.store(on, Ordering::Relaxed);
    }

    /// How long a port waits awake for its guest's answer after handing it frames (zero: it
    /// sleeps at once; see [`AnswerPoll`]). Applies to QEMU connections made after the call.
    pub fn poll_answers(&self, window: Duration) {
        self.inner.poll_us.store(window.as_micros() as u64, Ordering::Relaxed);
    }

    /// Listens on the stream socket of each tunnel interface of VM `id` (`config`, runtime
    /// directory `dir`), for QEMU running as `uid`, and attaches the ports to the relay (or
    /// announces them on the network's direct link).
    pub fn plug(&self, id: &str, dir: &Path, config: &VmConfig, uid: Option<u32>) -> Result<(), AgentError> {
        for (i, nic) in config.net.nics.iter().enumerate() {
            let Nic::Tunnel { network, mac } = nic else { continue };
            if self.has(id, i) {
                continue;
            }
            let socket = crate::qemu::net::stream_socket(dir, i);
            let _ = std::fs::remove_file(&socket);
            let listener = std::os::unix::net::UnixListener::bind(&socket)
                .and_then(|l| l.set_nonblocking(true).map(|_| l))
                .and_then(tokio::net::UnixListener::from_std)
                .map_err(|e| {
                    AgentError::Network(format!("VM {id}: tunnel interface {i} ({network}): listening on {}: {e}", socket.display()))
                })?;
            if let Some(uid) = uid {
                let _ = nix::unistd::chown(&socket, Some(nix::unistd::Uid::from_raw(uid)), None);
            }
            let port = self.inner.next.fetch_add(1, Ordering::Relaxed);
            let (to_guest, from_relay) = mpsc::channel(QUEUE_FRAMES);
            let mac = mac.map(|m| m.0);
            let task = tokio::spawn(serve_socket(self.inner.clone(), port, listener, from_relay, id.to_string(), network.clone(), mac));
            let mut links = self.inner.links.lock().unwrap();
            links.ports.insert(port, Port { vm: id.to_string(), nic: i, network: network.clone(), mac, to_guest, task, socket });
            if !links.announce(network) {
                let _ = self.inner.control.send(HostControl::Attach { port, vm: id.to_string(), nic: i });
            }
            drop(links);
            self.inner.wake.notify_one();
            tracing::info!(vm = %id, network = %network, port, "tunnel interface {i} of VM {id} on network {network}: listening for QEMU");
        }
        Ok(())
    }

    fn has(&self, id: &str, nic: usize) -> bool {
        self.inner.links.lock().unwrap().ports.values().any(|p| p.vm == id && p.nic == nic)
    }

    /// Closes VM `id`'s tunnel ports (it left this host).
    pub fn unplug(&self, id: &str) {
        let mut links = self.inner.links.lock().unwrap();
        let gone: Vec<u32> = links.ports.iter().filter(|(_, p)| p.vm == id).map(|(k, _)| *k).collect();
        for k in gone {
            if let Some(p) = links.ports.remove(&k) {
                p.task.abort();
                let _ = std::fs::remove_file(&p.socket);
                if !links.announce(&p.network) {
                    let _ = self.inner.control.send(HostControl::Detach { port: k });
                }
                tracing::info!(vm = %id, port = k, "tunnel interface {} of VM {id} closed", p.nic);
            }
        }
    }

    /// Takes a ticket the coordinator issued for one direct link of `t.owner` to `t.network`
    /// (refused when this host takes no direct links).
    pub fn admit(&self, t: DirectTicket) -> Result<(), AgentError> {
        if !self.inner.direct_allowed.load(Ordering::Relaxed) {
            return Err(AgentError::Network("this host takes no direct tunnel links (vgrid host --tunnel-direct off)".into()));
        }
        let mut tickets = self.inner.tickets.lock().unwrap();
        let now = Instant::now();
        tickets.retain(|_, (_, _, until)| *until > now);
        let until = now + Duration::from_secs(vgrid_api::tunnel::TICKET_TTL_SECS);
        tickets.insert(t.ticket, (t.network, t.owner, until));
        Ok(())
    }

    /// Uses up `ticket` for a direct link to `network`: the owner it was issued for.
    pub fn redeem(&self, network: &str, ticket: &str) -> Result<String, String> {
        let mut tickets = self.inner.tickets.lock().unwrap();
        match tickets.remove(ticket) {
            Some((net, owner, until)) if net == network && until > Instant::now() => Ok(owner),
            Some((net, ..)) if net != network => Err(format!("the ticket is for tunnel network {net:?}, not {network:?}")),
            Some(_) => Err("the ticket has expired: ask the coordinator for a new one".into()),
            None => Err("unknown or used ticket: ask the coordinator for a new one".into()),
        }
    }

    /// Carries the frames of network `network`'s ports over a user's direct link until it ends;
    /// the ports leave the relay meanwhile. A newer link for the same network replaces this one.
    pub async fn direct_link(&self, network: String, owner: String, ws: axum::extract::ws::WebSocket) {
        let inner = &self.inner;
        let id = inner.next_direct.fetch_add(1, Ordering::Relaxed);
        let (ftx, frx) = mpsc::channel(QUEUE_FRAMES);
        let (ctx, crx) = mpsc::unbounded_channel();
        {
            let mut links = inner.links.lock().unwrap();
            links.directs.insert(network.clone(), Direct { id, frames: ftx, control: ctx });
            for (port, _) in links.ports.iter().filter(|(_, p)| p.network == network) {
                let _ = inner.control.send(HostControl::Detach { port: *port });
            }
            links.announce(&network);
        }
        tracing::info!(network = %network, user = %owner, "direct tunnel link of user {owner} for network {network} connected: its guests' frames leave the relay");
        let why = carry_direct(inner, &network, ws, frx, crx).await;
        let mut links = inner.links.lock().unwrap();
        if links.directs.get(&network).is_some_and(|d| d.id == id) {
            links.directs.remove(&network);
            for (port, p) in links.ports.iter().filter(|(_, p)| p.network == network) {
                let _ = inner.control.send(HostControl::Attach { port: *port, vm: p.vm.clone(), nic: p.nic });
            }
            inner.wake.notify_one();
        }
        tracing::info!(network = %network, user = %owner, "direct tunnel link of user {owner} for network {network} ended ({why}): its guests are on the relay again");
    }
}

/// Where a guest's frame goes: the network's direct link if it has one (only with the VM's
/// own MAC), else the relay.
fn from_guest(inner: &Inner, port: u32, network: &str, mac: Option<[u8; 6]>, f: Bytes) {
    let links = inner.links.lock().unwrap();
    if let Some(d) = links.directs.get(network) {
        let sent = source_mac(&f) == mac && d.frames.try_send(f).is_ok();
        let counter = if sent { &inner.stats.to_direct } else { &inner.stats.dropped_to_direct };
        counter.fetch_add(1, Ordering::Relaxed);
        return;
    }
    drop(links);
    inner.stats.to_relay.fetch_add(1, Ordering::Relaxed);
    if inner.frames.try_send((port, f)).is_err() {
        inner.stats.dropped_to_relay.fetch_add(1, Ordering::Relaxed);
    }
}

/// Accepts QEMU's connections on one interface's socket (one at a time; QEMU reconnects after
/// an agent restart) and carries frames both ways.
async fn serve_socket(
    inner: Arc<Inner>,
    port: u32,
    listener: tokio::net::UnixListener,
    mut from_relay: mpsc::Receiver<Bytes>,
    vm: String,
    network: String,
    mac: Option<[u8; 6]>,
) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        tracing::debug!(vm = %vm, port, "QEMU connected to its tunnel socket");
        let fd = conn.as_raw_fd();
        let (mut rd, mut wr) = conn.into_split();
        // One read takes every frame QEMU has written; they are handed on, and the writer they
        // went to runs before the next read (which usually finds nothing: off the RTT).
        // Reading and writing share one loop (the wait for the answer reads into the read's
        // buffer), so a write QEMU does not take blocks this port's reads meanwhile: QEMU takes
        // our frames whenever its guest has receive buffers, whatever its own sends do, so this
        // is back-pressure on the guest's sends, not a deadlock.
        let mut buf = bytes::BytesMut::with_capacity(MAX_BATCH);
        let mut out = Vec::with_capacity(64 * 1024);
        let mut poll = AnswerPoll::new(Duration::from_micros(inner.poll_us.load(Ordering::Relaxed)));
        loop {
            tokio::select! {
                r = rd.read_buf(&mut buf) => {
                    if !matches!(r, Ok(n) if n > 0) || !hand_on(&inner, port, &network, mac, &vm, &mut buf) {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                f = from_relay.recv() => {
                    let Some(f) = f else { break };
                    out.clear();
                    out.extend_from_slice(&(f.len() as u32).to_be_bytes());
                    out.extend_from_slice(&f);
                    while out.len() < MAX_BATCH {
                        let Ok(f) = from_relay.try_recv() else { break };
                        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
                        out.extend_from_slice(&f);
                    }
                    if wr.write_all(&out).await.is_err() {
                        break;
                    }
                    // The guest's answer usually follows within a millisecond: wait for it
                    // awake instead of asleep (see `poll_answer`).
                    if poll_answer(&mut poll, fd, &mut buf, &from_relay) {
                        if !hand_on(&inner, port, &network, mac, &vm, &mut buf) {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                }
            }
            buf.reserve(MAX_FRAME + 4);
        }
        tracing::debug!(vm = %vm, port, "QEMU's tunnel connection ended");
    }
}

/// Hands every whole frame in `buf` on (see [`from_guest`]); false when QEMU sent a frame no
/// stream netdev sends (the connection is then closed).
fn hand_on(inner: &Inner, port: u32, network: &str, mac: Option<[u8; 6]>, vm: &str, buf: &mut bytes::BytesMut) -> bool {
    while buf.len() >= 4 {
        let n = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        if n == 0 || n > MAX_FRAME {
            tracing::warn!(vm = %vm, port, "QEMU sent a frame of {n} bytes: closing its tunnel connection");
            return false;
        }
        if buf.len() < 4 + n {
            break;
        }
        let _ = buf.split_to(4);
        from_guest(inner, port, network, mac, buf.split_to(n).freeze());
    }
    true
}

/// After frames went into a guest: reads QEMU's socket `fd` without sleeping, as
/// [`AnswerPoll`] allows, into `buf`; true when something came. Stops early when more frames
/// for the guest are queued, or at an end or error of the socket (the ordinary read reports it).
fn poll_answer(poll: &mut AnswerPoll, fd: std::os::fd::RawFd, buf: &mut bytes::BytesMut, queued: &mpsc::Receiver<Bytes>) -> bool {
    buf.reserve(MAX_FRAME + 4);
    poll.wait(|| {
        let spare = buf.spare_capacity_mut();
        // SAFETY: `spare` is writable memory of `buf` of that length; recv writes at most that.
        let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), spare.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            // SAFETY: recv initialised these n bytes.
            unsafe { buf.set_len(buf.len() + n as usize) };
            Look::Answer
        } else if n == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock || !queued.is_empty() {
            Look::OtherWork
        } else {
            Look::Nothing
        }
    })
}

/// One direct link's traffic: batches of the guests' frames out, the user's frames in to the
/// ports of `network` (by destination MAC), MAC announcements out. Returns why it ended.
async fn carry_direct(
    inner: &Inner,
    network: &str,
    ws: axum::extract::ws::WebSocket,
    mut frames: mpsc::Receiver<Bytes>,
    mut control: mpsc::UnboundedReceiver<DirectControl>,
) -> String {
    use axum::extract::ws::Message as M;
    let (mut tx, mut rx) = ws.split();
    loop {
        // Announcements first: the user drops frames from MACs it has not been told of.
        let sent = tokio::select! {
            biased;
            c = control.recv() => {
                let Some(c) = c else { return "replaced by a newer link".into() };
                tx.send(M::Text(serde_json::to_string(&c).unwrap_or_default().into())).await
            }
            f = frames.recv() => {
                let Some(f) = f else { return "replaced by a newer link".into() };
                let b = batch((0, f), || frames.try_recv().ok().map(|f| (0, f)));
                tx.send(M::Binary(b.into())).await
            }
            m = rx.next() => match m {
                Some(Ok(M::Binary(b))) => {
                    if let Err(e) = deliver_direct(inner, network, &b) {
                        return format!("malformed batch from the user: {e}");
                    }
                    // The guests' writers run before this link reads again (latency).
                    tokio::task::yield_now().await;
                    Ok(())
                }
                Some(Ok(M::Close(_))) | None => return "closed by the user".into(),
                Some(Err(e)) => return e.to_string(),
                _ => Ok(()),
            }
        };
        if let Err(e) = sent {
            return e.to_string();
        }
    }
}

/// Hands a batch from a user's direct link to the ports of `network` its frames are for.
fn deliver_direct(inner: &Inner, network: &str, batch: &[u8]) -> Result<(), vgrid_api::tunnel::BatchError> {
    let links = inner.links.lock().unwrap();
    for r in records(batch) {
        let (_, f) = r?;
        let Some(dst) = dest_mac(f) else { continue };
        let group = dst[0] & 1 == 1;
        for p in links.ports.values().filter(|p| p.network == network && (group || p.mac == Some(dst))) {
            inner.stats.to_guests.fetch_add(1, Ordering::Relaxed);
            if p.to_guest.try_send(Bytes::copy_from_slice(f)).is_err() {
                inner.stats.dropped_to_guests.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
/// The host's one connection to the relay: connects while there are ports, attaches them all
/// at each (re)connection, batches frames out, hands frames in to their ports.
async fn uplink(
    inner: Arc<Inner>,
    url: String,
    mut frames: mpsc::Receiver<(u32, Bytes)>,
    mut control: mpsc::UnboundedReceiver<HostControl>,
) {
    let mut backoff = Duration::from_millis(250);
    let mut failing = false;
    loop {
        if inner.links.lock().unwrap().ports.is_empty() {
            inner.wake.notified().await;
            continue;
        }
        let ws = match vgrid_trust::tls::ws_connect(url.as_str()).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                if !failing {
                    tracing::warn!(url = %url, "tunnel relay unreachable (retrying with backoff): {e}");
                }
                failing = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        tracing::info!(url = %url, "tunnel link to the relay connected");
        failing = false;
        backoff = Duration::from_millis(250);
        // Whatever control was queued is superseded by attaching every port now (but those on
        // a direct link).
        while control.try_recv().is_ok() {}
        let attach: Vec<HostControl> = {
            let links = inner.links.lock().unwrap();
            let relayed = links.ports.iter().filter(|(_, p)| !links.directs.contains_key(&p.network));
            relayed.map(|(k, p)| HostControl::Attach { port: *k, vm: p.vm.clone(), nic: p.nic }).collect()
        };
        if let Err(e) = run_link(&inner, ws, attach, &mut frames, &mut control).await {
            tracing::warn!(url = %url, "tunnel link to the relay lost (reconnecting): {e}");
        }
        let s = &inner.stats;
        let (d1, d2) = (s.dropped_to_relay.load(Ordering::Relaxed), s.dropped_to_guests.load(Ordering::Relaxed));
        if d1 + d2 > 0 {
            tracing::warn!(dropped_to_relay = d1, dropped_to_guests = d2, "tunnel frames dropped so far on full queues");
        }
        tokio::time::sleep(backoff).await;
    }
}

async fn run_link(
    inner: &Inner,
    ws: Ws,
    attach: Vec<HostControl>,
    frames: &mut mpsc::Receiver<(u32, Bytes)>,
    control: &mut mpsc::UnboundedReceiver<HostControl>,
) -> Result<(), String> {
    let (mut tx, mut rx) = ws.split();
    for a in attach {
        tx.send(Message::Text(serde_json::to_string(&a).unwrap_or_default().into())).await.map_err(|e| e.to_string())?;
    }
    loop {
        tokio::select! {
            c = control.recv() => {
                let Some(c) = c else { return Ok(()) };
                tx.send(Message::Text(serde_json::to_string(&c).unwrap_or_default().into())).await.map_err(|e| e.to_string())?;
            }
            f = frames.recv() => {
                let Some((port, f)) = f else { return Ok(()) };
                let b = batch((port, f), || frames.try_recv().ok());
                tx.send(Message::Binary(b.into())).await.map_err(|e| e.to_string())?;
            }
            m = rx.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    deliver(inner, &b);
                    tokio::task::yield_now().await;
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<HostControl>(&t) {
                    Ok(HostControl::Refused { port, error }) => tracing::warn!(port, "the relay refused tunnel port {port}: {error}"),
                    Ok(HostControl::Attached { port, network }) => tracing::info!(port, network = %network, "tunnel port {port} joined network {network}"),
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None => return Err("closed by the relay".into()),
                Some(Err(e)) => return Err(e.to_string()),
                _ => {}
            }
        }
    }
}

/// Hands a batch from the relay to the ports' guests.
fn deliver(inner: &Inner, batch: &[u8]) {
    let links = inner.links.lock().unwrap();
    for r in records(batch) {
        match r {
            Ok((port, f)) => {
                let Some(p) = links.ports.get(&port) else { continue };
                inner.stats.to_guests.fetch_add(1, Ordering::Relaxed);
                if p.to_guest.try_send(Bytes::copy_from_slice(f)).is_err() {
                    inner.stats.dropped_to_guests.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                tracing::warn!("malformed batch from the tunnel relay: {e}");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(t: &str, network: &str) -> DirectTicket {
        DirectTicket { ticket: t.into(), network: network.into(), owner: "alice".into() }
    }

    /// A ticket admits one direct link, to its own network only; a host that takes no direct
    /// links refuses tickets.
    #[test]
    fn tickets_are_used_once_for_their_network() {
        let t = Tunnels::default();
        t.admit(ticket("t1", "home")).unwrap();
        t.admit(ticket("t2", "home")).unwrap();
        assert_eq!(t.redeem("home", "t1").unwrap(), "alice");
        assert!(t.redeem("home", "t1").unwrap_err().contains("unknown or used"));
        assert!(t.redeem("lab", "t2").unwrap_err().contains("for tunnel network \"home\""));
        assert!(t.redeem("home", "t2").is_err(), "a ticket tried for another network is used up");
        assert!(t.redeem("home", "forged").is_err());
        t.allow_direct(false);
        let e = t.admit(ticket("t3", "home")).unwrap_err().to_string();
        assert!(e.contains("--tunnel-direct off"), "{e}");
    }

    /// A port that handed its guest frames reads the answer QEMU writes a moment later without
    /// going to sleep; frames queued for the guest, or QEMU's end of the socket closing, stop
    /// the wait at once (the ordinary loop handles them).
    #[test]
    fn a_port_reads_the_guests_answer_awake_and_stops_for_other_work() {
        use std::io::Write;
        let (agent, qemu) = std::os::unix::net::UnixStream::pair().unwrap();
        agent.set_nonblocking(true).unwrap();
        let answer = [0u8, 0, 0, 3, 7, 8, 9];
        let qemu = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            (&qemu).write_all(&answer).unwrap();
            qemu
        });
        let window = Duration::from_secs(30);
        let mut poll = AnswerPoll::new(window);
        let (_tx, idle) = mpsc::channel::<Bytes>(4);
        let mut buf = bytes::BytesMut::new();
        assert!(poll_answer(&mut poll, agent.as_raw_fd(), &mut buf, &idle));
        assert_eq!(&buf[..], &answer);

        let (tx, queued) = mpsc::channel::<Bytes>(4);
        tx.try_send(Bytes::from_static(b"next frame")).unwrap();
        let t = Instant::now();
        assert!(!poll_answer(&mut poll, agent.as_raw_fd(), &mut buf, &queued));
        assert!(t.elapsed() < window, "queued frames end the wait");

        drop(qemu.join().unwrap());
        let t = Instant::now();
        assert!(!poll_answer(&mut poll, agent.as_raw_fd(), &mut buf, &idle));
        assert!(t.elapsed() < window, "the end of QEMU's socket ends the wait");
        assert_eq!(&buf[..], &answer, "nothing read but the answer");
    }
}
