//! The tunnel relay: one Ethernet switch per tunnel network (`--net tunnel:NAME`), joining the
//! ports of that network: the tunnel interfaces of the owner's VMs (carried by their hosts'
//! connections) and the owner's `vgrid tunnel` connections. It learns which port a MAC is
//! behind and floods what it has not learnt (broadcast, unknown unicast) to every other port
//! of the same network. A network's ports are only ever its owner's (checked when a port is
//! attached, see `http::tunnels`): another user's frames never reach it. A VM's port only
//! sends frames with the MAC the coordinator allocated to it (others are dropped and counted);
//! no port can take over a VM's MAC but another port of the same VM (its migration's
//! destination).
//!
//! Frames never wait on the control plane: each connection has a bounded queue to its writer;
//! a full queue drops the frame and counts it ([`RelayStats`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::mpsc;

/// A port: the connection it belongs to and its number on that connection (0 for a user's).
pub type PortKey = (u64, u32);

/// Where a port's frames go: its connection's writer queue.
pub type PortTx = mpsc::Sender<(u32, Frame)>;

/// A frame as the relay hands it on (shared by the ports a flood reaches).
pub type Frame = std::sync::Arc<[u8]>;

/// How many frames each connection's writer queue holds before frames are dropped.
pub const QUEUE_FRAMES: usize = 1024;

/// What the relay carried and dropped, since the coordinator started.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub frames: AtomicU64,
    /// Dropped because a VM's port sent with a MAC other than its own.
    pub spoofed: AtomicU64,
    /// Dropped because the receiving connection's queue was full.
    pub overflow: AtomicU64,
}

struct Port {
    tx: PortTx,
    /// A VM's port: the only source MAC it may send with.
    mac: Option<[u8; 6]>,
}

#[derive(Default)]
struct Switch {
    owner: String,
    ports: HashMap<PortKey, Port>,
    macs: HashMap<[u8; 6], PortKey>,
}

/// Every tunnel network's switch.
pub struct Relay {
    nets: Mutex<HashMap<String, Switch>>,
    next_conn: AtomicU64,
    pub stats: RelayStats,
    /// Drops logged so far, and when.
    pub logged: Mutex<(u64, std::time::Instant)>,
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            nets: Default::default(),
            next_conn: Default::default(),
            stats: Default::default(),
            logged: Mutex::new((0, std::time::Instant::now())),
        }
    }
}

/// Why a port was not attached.
#[derive(Debug, thiserror::Error)]
#[error("tunnel network {network:?} belongs to {owner:?}; a port of {who:?} may not join it")]
pub struct NotOwner {
    pub network: String,
    pub owner: String,
    pub who: String,
}

impl Relay {
    /// A number for a new connection (its ports' keys start with it).
    pub fn connection(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Attaches `key` to network `network` of `owner` (replacing what that key was). `mac`:
    /// a VM's port, sending only with that MAC. `who` must be `owner`.
    pub fn attach(&self, network: &str, owner: &str, who: &str, key: PortKey, tx: PortTx, mac: Option<[u8; 6]>) -> Result<(), NotOwner> {
        let mut nets = self.nets.lock().unwrap();
        let sw = nets.entry(network.to_string()).or_insert_with(|| Switch { owner: owner.to_string(), ..Switch::default() });
        if sw.owner != owner || who != owner {
            return Err(NotOwner { network: network.into(), owner: sw.owner.clone(), who: who.into() });
        }
        sw.ports.insert(key, Port { tx, mac });
        if let Some(m) = mac {
            // A VM's MAC is its port's from the start, unless another port of the VM has it: a
            // migration's destination attaches before the switchover and takes the MAC over
            // with the first frame the guest sends from there (QEMU announces it).
            let held = sw.macs.get(&m).is_some_and(|k| *k != key && sw.ports.get(k).is_some_and(|p| p.mac == Some(m)));
            if !held {
                sw.macs.insert(m, key);
            }
        }
        Ok(())
    }

    /// Detaches port `key` from `network`.
    pub fn detach(&self, network: &str, key: PortKey) {
        let mut nets = self.nets.lock().unwrap();
        if let Some(sw) = nets.get_mut(network) {
            sw.ports.remove(&key);
            sw.macs.retain(|_, k| *k != key);
            if sw.ports.is_empty() {
                nets.remove(network);
            }
        }
    }

    /// The ports of `network` (for `net show` and tests).
    pub fn ports(&self, network: &str) -> usize {
        self.nets.lock().unwrap().get(network).map(|s| s.ports.len()).unwrap_or(0)
    }

    /// Switches one frame that came in on port `from` of `network`.
    pub fn forward(&self, network: &str, from: PortKey, frame: &[u8]) {
        let (Some(dst), Some(src)) = (vgrid_api::tunnel::dest_mac(frame), vgrid_api::tunnel::source_mac(frame)) else {
            return;
        };
        let mut nets = self.nets.lock().unwrap();
        let Some(sw) = nets.get_mut(network) else { return };
        let Some(port) = sw.ports.get(&from) else { return };
        if port.mac.is_some_and(|m| m != src) {
            self.stats.spoofed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let multicast = src[0] & 1 == 1;
        if !multicast {
            let learnt = sw.macs.get(&src).copied();
            // A VM's MAC moves only to another port with that MAC (its migration's destination).
            let vm_owned = learnt.and_then(|k| sw.ports.get(&k)).is_some_and(|p| p.mac == Some(src));
            if learnt != Some(from) && (!vm_owned || port.mac == Some(src)) {
                sw.macs.insert(src, from);
            }
        }
        self.stats.frames.fetch_add(1, Ordering::Relaxed);
        let bytes: Frame = frame.into();
        let send = |key: &PortKey, p: &Port| {
            if p.tx.try_send((key.1, bytes.clone())).is_err() {
                self.stats.overflow.fetch_add(1, Ordering::Relaxed);
            }
        };
        let known = if dst[0] & 1 == 0 { sw.macs.get(&dst).copied() } else { None };
        match known {
            Some(k) if k == from => {}
            Some(k) => {
                if let Some(p) = sw.ports.get(&k) {
                    send(&k, p);
                }
            }
            None => {
                for (k, p) in sw.ports.iter().filter(|(k, _)| **k != from) {
                    send(k, p);
                }
            }
        }
    }

    /// Logs the drop counters when they grew since the last call that logged (called every
    /// half second; logs at most every 10 s).
    pub fn log_drops(&self) {
        let last = &self.logged;
        let (frames, spoofed, overflow) = self.counters();
        let mut l = last.lock().unwrap();
        if spoofed + overflow > l.0 && l.1.elapsed() >= std::time::Duration::from_secs(10) {
            tracing::warn!(frames, spoofed, overflow, "tunnel relay dropped frames: {spoofed} with a source MAC not the VM's, {overflow} on full connection queues ({frames} carried)");
            *l = (spoofed + overflow, std::time::Instant::now());
        }
    }

    /// The counters as one log line's fields: carried, spoofed, overflow.
    pub fn counters(&self) -> (u64, u64, u64) {
        let s = &self.stats;
        (s.frames.load(Ordering::Relaxed), s.spoofed.load(Ordering::Relaxed), s.overflow.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(60, 0);
        f
    }

    const VM: [u8; 6] = [6, 1, 2, 3, 4, 5];
    const LAN: [u8; 6] = [2, 9, 9, 9, 9, 9];
    const BCAST: [u8; 6] = [0xff; 6];

    #[test]
    fn switches_learns_floods_and_keeps_networks_and_owners_apart() {
        let r = Relay::default();
        let (vm_tx, mut vm_rx) = mpsc::channel(8);
        let (user_tx, mut user_rx) = mpsc::channel(8);
        let (other_tx, mut other_rx) = mpsc::channel(8);
        r.attach("home", "alice", "alice", (1, 7), vm_tx, Some(VM)).unwrap();
        r.attach("home", "alice", "alice", (2, 0), user_tx.clone(), None).unwrap();
        r.attach("lab", "bob", "bob", (3, 0), other_tx, None).unwrap();
        // Bob may not join Alice's network, whatever he claims.
        assert!(r.attach("home", "bob", "bob", (4, 0), user_tx.clone(), None).is_err());
        assert!(r.attach("home", "alice", "bob", (4, 0), user_tx, None).is_err());
        // A broadcast from the VM floods to the user's port only (not Bob's network).
        r.forward("home", (1, 7), &frame(BCAST, VM));
        assert_eq!(user_rx.try_recv().unwrap().0, 0);
        assert!(other_rx.try_recv().is_err() && vm_rx.try_recv().is_err());
        // The answer is unicast to the learnt VM port.
        r.forward("home", (2, 0), &frame(VM, LAN));
        assert_eq!(vm_rx.try_recv().unwrap().0, 7);
        // The VM spoofing another MAC is dropped and counted.
        r.forward("home", (1, 7), &frame(LAN, [6, 6, 6, 6, 6, 6]));
        assert!(user_rx.try_recv().is_err());
        assert_eq!(r.counters().1, 1);
        // The LAN side cannot take the VM's MAC over.
        r.forward("home", (2, 0), &frame(BCAST, VM));
        let _ = vm_rx.try_recv();
        r.forward("home", (2, 0), &frame(VM, LAN));
        assert!(vm_rx.try_recv().is_ok(), "the VM's MAC stays on its port");
        r.detach("home", (1, 7));
        r.detach("home", (2, 0));
        assert_eq!(r.ports("home"), 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let r = Relay::default();
        let (tx, _rx) = mpsc::channel(1);
        let (vm_tx, _vm_rx) = mpsc::channel(1);
        r.attach("home", "alice", "alice", (1, 1), vm_tx, Some(VM)).unwrap();
        r.attach("home", "alice", "alice", (2, 0), tx, None).unwrap();
        for _ in 0..3 {
            r.forward("home", (1, 1), &frame(BCAST, VM));
        }
        assert_eq!(r.counters(), (3, 0, 2));
    }
}
