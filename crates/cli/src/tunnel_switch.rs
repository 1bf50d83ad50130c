//! The user's end of a tunnel network is a small Ethernet switch (`vgrid tunnel`): its ports
//! ("links") are the local device (a tap or passt), the coordinator's relay (the VMs on hosts
//! without a direct link, and the relay's own switching among them), and one direct link per
//! host that takes them (`vgrid_api::tunnel::DirectEndpoint`: the frames of that host's VMs
//! travel between the user and the host agent only). It learns source MACs per link and
//! floods broadcast and unknown unicast to every other link, so every VM of the network, on
//! whatever path, reaches every other and the user's LAN.
//!
//! A direct link's host announces the MACs of its VMs ([`DirectControl::Macs`]): frames from
//! it with another source MAC are dropped, and the user's LAN cannot take such a MAC over (the
//! relay may: a VM migrated to a host without a direct link speaks through it).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::mpsc;
use vgrid_api::net::MacAddr;
use vgrid_api::tunnel::{dest_mac, source_mac};

/// A link's number: [`LOCAL`], [`RELAY`], then the direct links.
pub type LinkId = u32;
/// The local device.
pub const LOCAL: LinkId = 0;
/// The coordinator's relay.
pub const RELAY: LinkId = 1;

#[derive(Default)]
struct State {
    links: HashMap<LinkId, mpsc::Sender<Vec<u8>>>,
    learnt: HashMap<[u8; 6], LinkId>,
    /// What each direct link's host announced.
    announced: HashMap<LinkId, HashSet<[u8; 6]>>,
}

/// The switch; frames are handed to each link's bounded queue (full: dropped and counted).
#[derive(Default)]
pub struct Switch {
    state: Mutex<State>,
    /// Dropped on a full link queue.
    pub dropped: AtomicU64,
    /// Dropped: a direct link's frame with a source MAC its host did not announce.
    pub spoofed: AtomicU64,
}

impl Switch {
    pub fn add(&self, id: LinkId, tx: mpsc::Sender<Vec<u8>>) {
        self.state.lock().unwrap().links.insert(id, tx);
    }

    /// Removes link `id` and what was learnt behind it.
    pub fn remove(&self, id: LinkId) {
        let mut st = self.state.lock().unwrap();
        st.links.remove(&id);
        st.announced.remove(&id);
        st.learnt.retain(|_, l| *l != id);
    }

    /// The MACs behind direct link `id` now (its host's announcement).
    pub fn announce(&self, id: LinkId, macs: &[MacAddr]) {
        let mut st = self.state.lock().unwrap();
        let now: HashSet<[u8; 6]> = macs.iter().map(|m| m.0).collect();
        let before = st.announced.insert(id, now.clone()).unwrap_or_default();
        for m in now.difference(&before) {
            st.learnt.insert(*m, id);
        }
        for m in before.difference(&now) {
            if st.learnt.get(m) == Some(&id) {
                st.learnt.remove(m);
            }
        }
    }

    /// Switches one frame that came in on link `from`.
    pub fn input(&self, from: LinkId, frame: Vec<u8>) {
        let (Some(dst), Some(src)) = (dest_mac(&frame), source_mac(&frame)) else { return };
        let mut st = self.state.lock().unwrap();
        if from > RELAY && !st.announced.get(&from).is_some_and(|a| a.contains(&src)) {
            self.spoofed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if src[0] & 1 == 0 && st.learnt.get(&src) != Some(&from) {
            // The LAN may not take over a MAC a direct link's host announced.
            let vm_elsewhere = st.announced.iter().any(|(l, a)| *l != from && a.contains(&src));
            if !(from == LOCAL && vm_elsewhere) {
                st.learnt.insert(src, from);
            }
        }
        let known = if dst[0] & 1 == 0 { st.learnt.get(&dst).copied() } else { None };
        let send = |tx: &mpsc::Sender<Vec<u8>>, f: Vec<u8>| {
            if tx.try_send(f).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        };
        match known {
            Some(l) if l == from => {}
            Some(l) => {
                if let Some(tx) = st.links.get(&l) {
                    send(tx, frame);
                }
            }
            None => {
                for (_, tx) in st.links.iter().filter(|(l, _)| **l != from) {
                    send(tx, frame.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = [dst, src].concat();
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(60, 0);
        f
    }

    const VM1: [u8; 6] = [6, 1, 1, 1, 1, 1];
    const VM2: [u8; 6] = [6, 2, 2, 2, 2, 2];
    const LAN: [u8; 6] = [2, 9, 9, 9, 9, 9];
    const BCAST: [u8; 6] = [0xff; 6];

    /// The LAN, the relay (VM2 behind it) and a direct link (VM1): broadcasts reach every other
    /// link once, unicast goes where the MAC was learnt or announced, a direct link cannot send
    /// with another MAC, the LAN cannot take VM1's MAC, and VM1 migrated behind the relay is
    /// followed there.
    #[test]
    fn switches_between_the_lan_the_relay_and_direct_links() {
        let sw = Switch::default();
        let (mut rx, mut txs) = (HashMap::new(), Vec::new());
        for id in [LOCAL, RELAY, 2] {
            let (tx, r) = mpsc::channel(16);
            sw.add(id, tx.clone());
            rx.insert(id, r);
            txs.push(tx);
        }
        let mut got = |id: LinkId| {
            let r = rx.get_mut(&id).unwrap();
            let mut n = 0;
            while r.try_recv().is_ok() {
                n += 1;
            }
            n
        };
        sw.announce(2, &[MacAddr(VM1)]);
        // The LAN's broadcast floods to the relay and the direct link.
        sw.input(LOCAL, frame(BCAST, LAN));
        assert_eq!((got(LOCAL), got(RELAY), got(2)), (0, 1, 1));
        // Unicast to VM1 goes to its direct link only, before VM1 ever spoke.
        sw.input(LOCAL, frame(VM1, LAN));
        assert_eq!((got(RELAY), got(2)), (0, 1));
        // VM2 (behind the relay) answers VM1: learnt, and switched to the direct link.
        sw.input(RELAY, frame(VM1, VM2));
        assert_eq!((got(LOCAL), got(2)), (0, 1));
        sw.input(2, frame(VM2, VM1));
        assert_eq!((got(LOCAL), got(RELAY)), (0, 1));
        // The direct link spoofing VM2 is dropped.
        sw.input(2, frame(BCAST, VM2));
        assert_eq!((got(LOCAL), got(RELAY), sw.spoofed.load(Ordering::Relaxed)), (0, 0, 1));
        // The LAN claiming VM1's MAC does not take it.
        sw.input(LOCAL, frame(BCAST, VM1));
        let _ = (got(RELAY), got(2));
        sw.input(RELAY, frame(VM1, VM2));
        assert_eq!(got(2), 1, "VM1's MAC stays at its direct link");
        // VM1 migrated to a host on the relay: its announcement there moves it; the old
        // host's link then announces it no more.
        sw.input(RELAY, frame(BCAST, VM1));
        sw.announce(2, &[]);
        let _ = (got(LOCAL), got(2));
        sw.input(LOCAL, frame(VM1, LAN));
        assert_eq!((got(RELAY), got(2)), (1, 0));
        sw.remove(2);
        sw.input(LOCAL, frame(BCAST, LAN));
        assert_eq!(got(RELAY), 1);
    }
}
