//! The host's side of tunnel networks (`--net tunnel:NAME`): for each tunnel interface of its
//! guests the agent listens on the interface's stream socket (`nicN.sock` in the VM's runtime
//! directory, before QEMU starts, and again for a guest re-adopted after a restart: QEMU
//! reconnects every second), and carries its frames (QEMU's framing: a 4-byte big-endian length,
//! then the frame) to and from the coordinator's relay over ONE WebSocket per host
//! (`/api/v1/tunnels/hosts/NAME`, TLS with the host's grid certificate; see
//! `vgrid_api::tunnel`). Each interface is a port on that connection.
//!
//! Frames stay off the control plane: each socket and the uplink are their own tasks joined by
//! bounded queues; a full queue drops the frame and counts it ([`TunnelStats`], logged).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Message;
use vgrid_api::net::Nic;
use vgrid_api::tunnel::{push_record, records, HostControl, MAX_BATCH, MAX_FRAME};
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
}

struct Port {
    vm: String,
    nic: usize,
    to_guest: mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<()>,
    socket: PathBuf,
}

struct Inner {
    ports: Mutex<HashMap<u32, Port>>,
    next: AtomicU32,
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
                ports: Default::default(),
                next: AtomicU32::new(1),
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

    /// Listens on the stream socket of each tunnel interface of VM `id` (`config`, runtime
    /// directory `dir`), for QEMU running as `uid`, and attaches the ports to the relay.
    pub fn plug(&self, id: &str, dir: &Path, config: &VmConfig, uid: Option<u32>) -> Result<(), AgentError> {
        for (i, nic) in config.net.nics.iter().enumerate() {
            let Nic::Tunnel { network, .. } = nic else { continue };
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
            let task = tokio::spawn(serve_socket(self.inner.clone(), port, listener, from_relay, id.to_string()));
            self.inner.ports.lock().unwrap().insert(port, Port { vm: id.to_string(), nic: i, to_guest, task, socket });
            let _ = self.inner.control.send(HostControl::Attach { port, vm: id.to_string(), nic: i });
            self.inner.wake.notify_one();
            tracing::info!(vm = %id, network = %network, port, "tunnel interface {i} of VM {id} on network {network}: listening for QEMU");
        }
        Ok(())
    }

    fn has(&self, id: &str, nic: usize) -> bool {
        self.inner.ports.lock().unwrap().values().any(|p| p.vm == id && p.nic == nic)
    }

    /// Closes VM `id`'s tunnel ports (it left this host).
    pub fn unplug(&self, id: &str) {
        let mut ports = self.inner.ports.lock().unwrap();
        let gone: Vec<u32> = ports.iter().filter(|(_, p)| p.vm == id).map(|(k, _)| *k).collect();
        for k in gone {
            if let Some(p) = ports.remove(&k) {
                p.task.abort();
                let _ = std::fs::remove_file(&p.socket);
                let _ = self.inner.control.send(HostControl::Detach { port: k });
                tracing::info!(vm = %id, port = k, "tunnel interface {} of VM {id} closed", p.nic);
            }
        }
    }
}

/// Accepts QEMU's connections on one interface's socket (one at a time; QEMU reconnects after
/// an agent restart) and carries frames both ways.
async fn serve_socket(inner: Arc<Inner>, port: u32, listener: tokio::net::UnixListener, mut from_relay: mpsc::Receiver<Bytes>, vm: String) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        tracing::debug!(vm = %vm, port, "QEMU connected to its tunnel socket");
        let (mut rd, mut wr) = conn.into_split();
        let read = async {
            let mut len = [0u8; 4];
            loop {
                if rd.read_exact(&mut len).await.is_err() {
                    break;
                }
                let n = u32::from_be_bytes(len) as usize;
                if n == 0 || n > MAX_FRAME {
                    tracing::warn!(vm = %vm, port, "QEMU sent a frame of {n} bytes: closing its tunnel connection");
                    break;
                }
                let mut f = vec![0u8; n];
                if rd.read_exact(&mut f).await.is_err() {
                    break;
                }
                inner.stats.to_relay.fetch_add(1, Ordering::Relaxed);
                if inner.frames.try_send((port, f.into())).is_err() {
                    inner.stats.dropped_to_relay.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        let write = async {
            let mut buf = Vec::with_capacity(64 * 1024);
            while let Some(f) = from_relay.recv().await {
                buf.clear();
                buf.extend_from_slice(&(f.len() as u32).to_be_bytes());
                buf.extend_from_slice(&f);
                while buf.len() < MAX_BATCH {
                    let Ok(f) = from_relay.try_recv() else { break };
                    buf.extend_from_slice(&(f.len() as u32).to_be_bytes());
                    buf.extend_from_slice(&f);
                }
                if wr.write_all(&buf).await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            _ = read => {}
            _ = write => {}
        }
        tracing::debug!(vm = %vm, port, "QEMU's tunnel connection ended");
    }
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
        if inner.ports.lock().unwrap().is_empty() {
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
        // Whatever control was queued is superseded by attaching every port now.
        while control.try_recv().is_ok() {}
        let attach: Vec<HostControl> =
            inner.ports.lock().unwrap().iter().map(|(k, p)| HostControl::Attach { port: *k, vm: p.vm.clone(), nic: p.nic }).collect();
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
                let mut b = Vec::with_capacity(f.len() + 64);
                push_record(&mut b, port, &f);
                while b.len() < MAX_BATCH {
                    let Ok((port, f)) = frames.try_recv() else { break };
                    push_record(&mut b, port, &f);
                }
                tx.send(Message::Binary(b.into())).await.map_err(|e| e.to_string())?;
            }
            m = rx.next() => match m {
                Some(Ok(Message::Binary(b))) => deliver(inner, &b),
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
    let ports = inner.ports.lock().unwrap();
    for r in records(batch) {
        match r {
            Ok((port, f)) => {
                let Some(p) = ports.get(&port) else { continue };
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
