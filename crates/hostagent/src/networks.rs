//! The host's side of site networks: the bridges it is attached to (`--network NAME=BRIDGE`),
//! each with its static DHCP responder, and each site interface of its guests plugged in
//! before QEMU starts (a tap owned by QEMU's user on the network's bridge, the anti-spoofing
//! filter, the lease served) and unplugged when the guest is released here. The leases come
//! from the VM's configuration (the coordinator allocated them) and the network's definition
//! from the heartbeat's answer; the host never chooses an address.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use vgrid_api::net::{MacAddr, Network, NetworkKind, Nic, SiteNet};
use vgrid_api::vm::VmConfig;
use vgrid_vnet::dhcp::{Lease, Responder};

use crate::error::AgentError;

/// One plugged interface.
#[derive(Debug, Clone)]
struct Plugged {
    tap: String,
    bridge: String,
    network: String,
    mac: MacAddr,
    address: std::net::Ipv4Addr,
}

/// The site networks of this host.
#[derive(Default)]
pub struct SiteNets {
    /// Network name → bridge.
    attached: BTreeMap<String, String>,
    /// Bridge → its responder.
    responders: HashMap<String, Responder>,
    /// Network name → definition (from the coordinator).
    defs: Mutex<HashMap<String, SiteNet>>,
    /// VM id → its plugged interfaces.
    plugged: Mutex<HashMap<String, Vec<Plugged>>>,
    /// The tunnel interfaces of this host's guests and the uplink to the relay.
    pub(crate) tunnels: crate::tunnel::Tunnels,
}

impl SiteNets {
    /// Attaches the host to `attached` (network → bridge): makes each bridge that is missing,
    /// checks that nftables works (without it a guest could take another's address), starts a
    /// DHCP responder per bridge. No networks: nothing is touched.
    pub fn start(attached: BTreeMap<String, String>) -> Result<SiteNets, AgentError> {
        let mut responders = HashMap::new();
        if !attached.is_empty() {
            vgrid_vnet::filter::available().map_err(AgentError::network)?;
            if vgrid_vnet::link::open_tun_device().map_err(AgentError::network)? {
                tracing::info!("made /dev/net/tun mode 0666 (as udev does) so that QEMU's user can open its taps");
            }
        }
        for (net, bridge) in &attached {
            vgrid_api::net::check_network_name(net).map_err(|e| AgentError::Network(e.to_string()))?;
            if vgrid_vnet::link::ensure_bridge(bridge).map_err(AgentError::network)? {
                tracing::info!(network = %net, bridge = %bridge, "made bridge {bridge} for site network {net} (it has no uplink: attach one to reach the site's LAN)");
            } else {
                tracing::info!(network = %net, bridge = %bridge, "attached to site network {net} through bridge {bridge}");
            }
            if !responders.contains_key(bridge) {
                responders.insert(bridge.clone(), Responder::start(bridge).map_err(AgentError::network)?);
            }
        }
        Ok(SiteNets { attached, responders, ..SiteNets::default() })
    }

    /// The site networks this host is attached to (advertised).
    pub fn names(&self) -> Vec<String> {
        self.attached.keys().cloned().collect()
    }

    /// Takes the coordinator's definitions, and serves the leases of the guests plugged
    /// before they arrived (after a restart of the agent: its adopted guests).
    pub fn learn(&self, networks: &[Network]) {
        {
            let mut defs = self.defs.lock().unwrap();
            for n in networks {
                if let NetworkKind::Site(s) = &n.kind {
                    defs.insert(n.name.clone(), s.clone());
                }
            }
        }
        let plugged: Vec<Plugged> = self.plugged.lock().unwrap().values().flatten().cloned().collect();
        for p in plugged {
            self.serve(&p);
        }
    }

    /// Serves `p`'s lease on its bridge, once the network's definition is known.
    fn serve(&self, p: &Plugged) {
        let def = self.defs.lock().unwrap().get(&p.network).cloned();
        if let (Some(r), Some(net)) = (self.responders.get(&p.bridge), def) {
            let lease = Lease { mac: p.mac, address: p.address, net };
            if r.lease(p.mac).as_ref() != Some(&lease) {
                r.set(lease);
            }
        }
    }

    /// Plugs the site interfaces of VM `id` (`config`, runtime directory `dir`) in: taps for
    /// QEMU running as `uid`, filters, leases. An interface on a network this host is not
    /// attached to is refused.
    pub fn plug(&self, id: &str, dir: &Path, config: &VmConfig, uid: Option<u32>) -> Result<(), AgentError> {
        let mut done = Vec::new();
        let r = self.plug_all(id, dir, config, uid, &mut done).and_then(|_| self.tunnels.plug(id, dir, config, uid));
        if r.is_err() {
            for p in &done {
                self.unplug_one(id, p);
            }
        } else if !done.is_empty() {
            self.plugged.lock().unwrap().insert(id.to_string(), done);
        }
        r
    }

    fn plug_all(&self, id: &str, dir: &Path, config: &VmConfig, uid: Option<u32>, done: &mut Vec<Plugged>) -> Result<(), AgentError> {
        for (i, nic) in config.net.nics.iter().enumerate() {
            let Nic::Site { network, mac, address } = nic else { continue };
            let (Some(mac), Some(address)) = (*mac, *address) else {
                return Err(AgentError::Network(format!(
                    "VM {id}: interface {i} on site network {network} has no MAC or address allocated"
                )));
            };
            let bridge = self.attached.get(network).ok_or_else(|| {
                AgentError::Network(format!(
                    "VM {id}: this host is not attached to site network {network} (vgrid host --network {network}=BRIDGE)"
                ))
            })?;
            let tap = crate::qemu::net::tap_name(dir, i);
            vgrid_vnet::link::add_tap(&tap, uid, bridge).map_err(AgentError::network)?;
            let p = Plugged { tap: tap.clone(), bridge: bridge.clone(), network: network.clone(), mac, address };
            done.push(p.clone());
            vgrid_vnet::filter::guard(&tap, mac, address).map_err(AgentError::network)?;
            // Served at once if the network's definition is known, else when the next
            // heartbeat's answer brings it (`learn`): the guest's DHCP client keeps asking.
            self.serve(&p);
            tracing::info!(vm = %id, tap = %tap, bridge = %bridge, mac = %mac, address = %address, "site interface plugged");
        }
        Ok(())
    }

    /// Takes back the leases and filters of an adopted guest (its taps are still there), and
    /// listens again on its tunnel interfaces' sockets (its QEMU reconnects).
    pub fn adopt(&self, id: &str, dir: &Path, config: &VmConfig, uid: Option<u32>) {
        if let Err(e) = self.tunnels.plug(id, dir, config, uid) {
            tracing::warn!(vm = %id, "{e}");
        }
        let mut plugged = Vec::new();
        for (i, nic) in config.net.nics.iter().enumerate() {
            let Nic::Site { network, mac: Some(mac), address: Some(address) } = nic else { continue };
            let Some(bridge) = self.attached.get(network) else {
                tracing::warn!(vm = %id, network = %network, "adopted guest is on site network {network}, which this agent is no longer attached to");
                continue;
            };
            let tap = crate::qemu::net::tap_name(dir, i);
            if let Err(e) = vgrid_vnet::filter::guard(&tap, *mac, *address) {
                tracing::warn!(vm = %id, tap = %tap, "{e}");
            }
            let p = Plugged { tap, bridge: bridge.clone(), network: network.clone(), mac: *mac, address: *address };
            // Served at once if the definition is known, else when the heartbeat brings it.
            self.serve(&p);
            plugged.push(p);
        }
        if !plugged.is_empty() {
            self.plugged.lock().unwrap().insert(id.to_string(), plugged);
        }
    }

    /// Unplugs VM `id`'s site interfaces (when it is released here: stopped, gone, migrated
    /// away).
    pub fn unplug(&self, id: &str) {
        self.tunnels.unplug(id);
        let plugged = self.plugged.lock().unwrap().remove(id).unwrap_or_default();
        for p in &plugged {
            self.unplug_one(id, p);
        }
    }

    fn unplug_one(&self, id: &str, p: &Plugged) {
        if let Some(r) = self.responders.get(&p.bridge) {
            r.remove(p.mac);
        }
        if let Err(e) = vgrid_vnet::filter::unguard(&p.tap) {
            tracing::warn!(vm = %id, tap = %p.tap, "{e}");
        }
        if let Err(e) = vgrid_vnet::link::delete(&p.tap) {
            tracing::warn!(vm = %id, tap = %p.tap, "{e}");
        }
        tracing::info!(vm = %id, tap = %p.tap, "site interface unplugged");
    }
}
