//! Networks: their definitions (`records/networks/NAME`, made by `vgrid net create`) and the
//! network identity of VMs. A site interface's address and every interface's MAC are chosen at
//! admission ([`Coordinator::assign_network_identity`]) and written into the VM's
//! configuration; the record then holds them as unique claims (`claims/addr/NET/IP`,
//! `claims/mac/NET/MAC`, see `lifecycle::claims`) written in the same batch as the record, so
//! that no address or MAC is handed out twice, across coordinators sharing a store and across
//! restarts, and both are freed when the record goes (`vm rm`), not when the VM stops: a VM
//! keeps its address across suspend, resume and migration.
//!
//! Allocation is static-only, as Neutron's: the coordinator is the one allocator, hosts answer
//! DHCP with what the record says and hold no pool of their own.
//!
//! Part of the core (admission calls it); it must never talk to hosts or know how a host wires
//! an interface (bridges, taps, DHCP are the host agent's).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use vgrid_api::net::{Lease, MacAddr, NetConfig, Network, NetworkCreate, NetworkInfo, NetworkKind, Nic};
use vgrid_api::vm::VmConfig;

use crate::lifecycle::claims::{self, Held};
use crate::lifecycle::{now, Coordinator, CoordinatorError};
use crate::state::{decode, encode, Expect};

/// The named table of network definitions.
pub const TABLE: &str = "networks";

/// Who asks: their name and whether they are an admin.
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    pub user: &'a str,
    pub admin: bool,
}

impl Coordinator {
    /// The definition of network `name`.
    pub async fn network(&self, name: &str) -> Result<Network, CoordinatorError> {
        let e = self.state.records().get_record(TABLE, name).await?.ok_or_else(|| CoordinatorError::UnknownNetwork(name.to_string()))?;
        Ok(decode(name, &e.value)?)
    }

    /// Every network definition, by name.
    pub async fn network_defs(&self) -> Result<Vec<Network>, CoordinatorError> {
        let (rows, _) = self.state.records().list_records(TABLE).await?;
        rows.iter().map(|(k, e)| Ok(decode(k, &e.value)?)).collect()
    }

    /// Defines a network. Site networks are an admin's (they describe a site's LAN) and may not
    /// overlap another site network; a tunnel network belongs to the user who makes it.
    pub async fn create_network(&self, req: NetworkCreate, who: Asker<'_>) -> Result<Network, CoordinatorError> {
        req.validate()?;
        if let NetworkKind::Site(s) = &req.kind {
            if !who.admin {
                return Err(CoordinatorError::Forbidden(format!(
                    "defining site network {:?} is for admins only (a site network describes a site's LAN); {} is not an admin. \
                     A user's own LAN is a tunnel network: vgrid net create {} --tunnel",
                    req.name, who.user, req.name
                )));
            }
            for other in self.network_defs().await? {
                if let NetworkKind::Site(o) = &other.kind {
                    if o.cidr.overlaps(&s.cidr) {
                        return Err(CoordinatorError::Conflict(format!(
                            "network {:?} ({}) overlaps site network {:?} ({})",
                            req.name, s.cidr, other.name, o.cidr
                        )));
                    }
                }
            }
        }
        let net = Network { name: req.name.clone(), owner: who.user.to_string(), created: now(), kind: req.kind };
        match self.state.records().put_record_if(TABLE, &net.name, encode(&net), Expect::Absent).await {
            Ok(_) => {
                tracing::info!(network = %net.name, owner = %net.owner, "network defined");
                Ok(net)
            }
            Err(e) if e.is_conflict() => Err(CoordinatorError::Conflict(format!("a network named {:?} exists already", net.name))),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes network `name`: its owner or an admin, and only while no VM holds an address or
    /// MAC on it (they are named).
    pub async fn delete_network(&self, name: &str, who: Asker<'_>) -> Result<Network, CoordinatorError> {
        let net = self.network(name).await?;
        check_visible(&net, who)?;
        if !who.admin && net.owner != who.user {
            return Err(CoordinatorError::Forbidden(format!("network {name:?} belongs to {}; {} may not remove it", net.owner, who.user)));
        }
        let leases = self.leases(name).await?;
        if !leases.is_empty() {
            let vms: Vec<&str> = leases.iter().map(|l| if l.name.is_empty() { l.vm.as_str() } else { l.name.as_str() }).collect();
            return Err(CoordinatorError::Conflict(format!(
                "network {name:?} is in use by {} VM(s): {}; remove them first",
                vms.len(),
                vms.join(", ")
            )));
        }
        self.state.records().delete_record(TABLE, name).await?;
        tracing::info!(network = %name, "network removed");
        Ok(net)
    }

    /// The definitions of the site networks among `names` (what a host attached to them
    /// answers DHCP with); names that are no site network are left out.
    pub async fn site_networks(&self, names: &[String]) -> Result<Vec<Network>, CoordinatorError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.network_defs().await?.into_iter().filter(|n| names.contains(&n.name) && matches!(n.kind, NetworkKind::Site(_))).collect())
    }

    /// Network `name` as `net show` gives it: the hosts attached and the leases.
    pub async fn network_info(&self, name: &str, who: Asker<'_>) -> Result<NetworkInfo, CoordinatorError> {
        let net = self.network(name).await?;
        check_visible(&net, who)?;
        self.info_of(net).await
    }

    /// The networks `who` may see (admins: all; users: site networks and their own tunnels).
    pub async fn list_networks(&self, who: Asker<'_>) -> Result<Vec<NetworkInfo>, CoordinatorError> {
        let mut out = Vec::new();
        for n in self.network_defs().await? {
            if check_visible(&n, who).is_ok() {
                out.push(self.info_of(n).await?);
            }
        }
        Ok(out)
    }

    async fn info_of(&self, network: Network) -> Result<NetworkInfo, CoordinatorError> {
        let hosts =
            self.registry.hosts().into_iter().filter(|h| h.ad.networks.contains(&network.name)).map(|h| h.ad.name.clone()).collect();
        let leases = self.leases(&network.name).await?;
        let free = match &network.kind {
            NetworkKind::Site(s) => s.range.len().saturating_sub(leases.iter().filter(|l| l.address.is_some()).count() as u64),
            NetworkKind::Tunnel => 0,
        };
        let relay_ports = self.relay.ports(&network.name) as u64;
        Ok(NetworkInfo { network, hosts, leases, free, relay_ports })
    }

    /// The interfaces on network `name`, from the claims: one per MAC, with its address.
    pub async fn leases(&self, name: &str) -> Result<Vec<Lease>, CoordinatorError> {
        let store = self.state.store();
        let (macs, _) = store.range(&claims::mac_prefix(name)).await?;
        let (addrs, _) = store.range(&claims::addr_prefix(name)).await?;
        let addr_of = |vm: &str| {
            addrs.iter().find_map(|(k, e)| {
                let h: Held = decode(k, &e.value).ok()?;
                (h.vm == vm).then(|| k.rsplit('/').next()?.parse::<Ipv4Addr>().ok()).flatten()
            })
        };
        let mut out = Vec::new();
        for (k, e) in &macs {
            let h: Held = decode(k, &e.value)?;
            let Some(mac) = k.rsplit('/').next().and_then(|m| m.parse::<MacAddr>().ok()) else { continue };
            out.push(Lease { address: addr_of(&h.vm), vm: h.vm, name: h.name, mac });
        }
        out.sort_by_key(|l| (l.address.map(u32::from), l.mac));
        Ok(out)
    }

    /// Gives every site and tunnel interface of `config` that has none its MAC (and a site
    /// interface its address: the first free one of the range), for VM `vm` of `owner`.
    /// `attempt` varies the choice after a lost race (another admission took the address or
    /// MAC first: the store refuses the second, and admission asks again). The networks must
    /// exist: site ones at all, tunnel ones as `owner`'s.
    pub(crate) async fn assign_network_identity(
        &self,
        config: &mut VmConfig,
        vm: &str,
        owner: &str,
        attempt: u32,
    ) -> Result<(), CoordinatorError> {
        for nic in config.net.nics.iter_mut() {
            match nic {
                Nic::User { .. } => {}
                Nic::Site { network, mac, address } => {
                    let net = self.network(network).await?;
                    let NetworkKind::Site(site) = &net.kind else {
                        return Err(CoordinatorError::BadRequest(format!(
                            "network {network:?} is a tunnel network: attach it with --net tunnel:{network}"
                        )));
                    };
                    if address.is_none() {
                        let (rows, _) = self.state.store().range(&claims::addr_prefix(network)).await?;
                        let taken: BTreeSet<Ipv4Addr> = rows.iter().filter_map(|(k, _)| k.rsplit('/').next()?.parse().ok()).collect();
                        let free: Vec<Ipv4Addr> =
                            site.range.iter().filter(|a| !taken.contains(a) && Some(*a) != site.gateway && !site.dns.contains(a)).collect();
                        if free.is_empty() {
                            return Err(CoordinatorError::Capacity(format!(
                                "network {network:?} has no free address: all {} of {} are leased (see `vgrid net show {network}`)",
                                site.range.len(),
                                site.range
                            )));
                        }
                        // A lost race retries with the next free address, not the same one.
                        *address = Some(free[attempt as usize % free.len()]);
                    }
                    let a = address.expect("assigned above");
                    if !site.range.contains(a) {
                        return Err(CoordinatorError::BadRequest(format!(
                            "address {a} is outside network {network:?}'s range {}",
                            site.range
                        )));
                    }
                    mac.get_or_insert(MacAddr::for_site(network, a));
                }
                Nic::Tunnel { network, mac } => {
                    let net = self.network(network).await?;
                    if net.kind != NetworkKind::Tunnel {
                        return Err(CoordinatorError::BadRequest(format!(
                            "network {network:?} is a site network: attach it with --net site:{network}"
                        )));
                    }
                    if net.owner != owner {
                        // Another user's tunnel is not there as far as this user is concerned.
                        return Err(CoordinatorError::UnknownNetwork(network.clone()));
                    }
                    mac.get_or_insert(MacAddr::for_tunnel(vm, network, attempt));
                }
            }
        }
        Ok(())
    }
}

/// Site networks are visible to all; a tunnel network to its owner and admins only (to anyone
/// else it does not exist).
fn check_visible(net: &Network, who: Asker<'_>) -> Result<(), CoordinatorError> {
    match net.kind {
        NetworkKind::Tunnel if !who.admin && net.owner != who.user => Err(CoordinatorError::UnknownNetwork(net.name.clone())),
        _ => Ok(()),
    }
}

/// The placement clause a VM's site networks add: every host it may run on is attached to
/// each (`"farm" in host.networks`), and tunnel interfaces need a host that carries tunnels.
pub fn network_requirement(net: &NetConfig) -> Option<String> {
    let mut clauses: Vec<String> = net.site_networks().map(|n| format!("{n:?} in host.networks")).collect();
    if net.nics.iter().any(|n| matches!(n, Nic::Tunnel { .. })) {
        clauses.push("\"tunnel\" in host.network_modes".into());
    }
    (!clauses.is_empty()).then(|| clauses.join(" && "))
}
