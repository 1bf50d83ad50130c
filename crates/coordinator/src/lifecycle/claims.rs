//! Claims: what a VM record holds in the store besides itself, so that admission is decided by
//! the store and not by a lock of one coordinator process. They are ONE pure function of the
//! record ([`claims`]), written in the same batch as the record and diffed old → new at every
//! write ([`txn`]):
//!
//! | key | while | value |
//! | --- | --- | --- |
//! | `claims/name/NAME` | the record exists (names are unique) | the VM's id and name |
//! | `claims/addr/NET/IP` | the record exists (a site interface's address: kept while suspended) | the VM's id and name |
//! | `claims/mac/NET/MAC` | the record exists (a site or tunnel interface's MAC) | the VM's id and name |
//! | `claims/port/HOSTPORT` | active (a forwarded host port) | the VM's id and name |
//! | `claims/volume/NAME` | not stopped, failed nor lost (a volume attached read-write: its one writer, kept while suspended) | the VM's id and name |
//! | `claims/owner/OWNER/ID` | active (the owner's quota) | cpus, memory |
//! | `claims/host/HOST/ID` | active and placed on HOST, or migrating to HOST (capacity) | cpus, memory, cpu cores |
//!
//! Unique claims (name, port) are written with the condition "absent" when they appear: the
//! batch fails if another VM holds them. Counted claims (owner, host) are plain puts and
//! deletes; admission reads them and commits with the condition "none changed under the
//! prefix since I read it" (see `admission`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vgrid_api::vm::{VmRecord, VmState};

use crate::state::vms::vm_key;
use crate::state::{decode, encode, Expect, Revision, Txn};

/// The prefix of every claim.
pub const CLAIMS: &str = "claims/";

/// What a claim key holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub vm: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_mib: u64,
    #[serde(default)]
    pub cpu_cores: f64,
}

/// One claim of a record.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub key: String,
    pub held: Held,
    /// Held by one VM at most.
    pub unique: bool,
}

pub fn name_key(name: &str) -> String {
    format!("{CLAIMS}name/{name}")
}

/// Where the addresses leased on network `net` are claimed.
pub fn addr_prefix(net: &str) -> String {
    format!("{CLAIMS}addr/{net}/")
}

/// Where the MACs of interfaces on network `net` are claimed.
pub fn mac_prefix(net: &str) -> String {
    format!("{CLAIMS}mac/{net}/")
}

/// The claim of volume `name`'s one writer.
pub fn volume_key(name: &str) -> String {
    format!("{CLAIMS}volume/{name}")
}

pub fn port_key(port: u16) -> String {
    format!("{CLAIMS}port/{port}")
}

pub fn owner_prefix(owner: &str) -> String {
    format!("{CLAIMS}owner/{owner}/")
}

pub fn host_prefix(host: &str) -> String {
    format!("{CLAIMS}host/{host}/")
}

/// The claims of `rec`.
pub fn claims(rec: &VmRecord) -> Vec<Claim> {
    let who = || Held { vm: rec.id.clone(), name: rec.name.clone(), ..Held::default() };
    let size = || Held {
        vm: rec.id.clone(),
        cpus: rec.config.cpus,
        memory_mib: rec.config.memory_mib,
        cpu_cores: rec.config.resources.cpu_cores(),
        ..Held::default()
    };
    let mut out = vec![Claim { key: name_key(&rec.name), held: who(), unique: true }];
    for nic in &rec.config.net.nics {
        let Some(net) = nic.network() else { continue };
        if let Some(a) = nic.address() {
            out.push(Claim { key: format!("{}{a}", addr_prefix(net)), held: who(), unique: true });
        }
        if let Some(m) = nic.mac() {
            out.push(Claim { key: format!("{}{m}", mac_prefix(net)), held: who(), unique: true });
        }
    }
    if !matches!(rec.state, VmState::Stopped | VmState::Failed | VmState::Lost) {
        for v in rec.config.volumes.iter().filter(|v| !v.readonly) {
            out.push(Claim { key: volume_key(&v.name), held: who(), unique: true });
        }
    }
    if !rec.state.is_active() {
        return out;
    }
    for f in rec.config.net.forwards() {
        out.push(Claim { key: port_key(f.host), held: who(), unique: true });
    }
    let quota = Held { cpu_cores: 0.0, ..size() };
    out.push(Claim { key: format!("{}{}", owner_prefix(&rec.owner), rec.id), held: quota, unique: false });
    let mut hosts: Vec<&str> = rec.host.iter().map(String::as_str).collect();
    if rec.state == VmState::Migrating {
        if let Some(m) = &rec.migration {
            hosts.push(&m.to);
        }
    }
    hosts.dedup();
    for h in hosts {
        out.push(Claim { key: format!("{}{}", host_prefix(h), rec.id), held: size(), unique: false });
    }
    out
}

/// The claims of `rec` by key.
fn by_key(rec: Option<&VmRecord>) -> BTreeMap<String, Claim> {
    rec.map(claims).unwrap_or_default().into_iter().map(|c| (c.key.clone(), c)).collect()
}

/// Adds to `txn` the write of `new` over `old` (read at its revision; `None`: created) or its
/// delete (`new` `None`), with the claims that appear (unique ones on condition that nobody
/// holds them), change or go.
pub fn txn(old: Option<(&VmRecord, Revision)>, new: Option<&VmRecord>, txn: Txn) -> Txn {
    let id = new.or(old.map(|o| o.0)).map(|v| v.id.clone()).unwrap_or_default();
    let mut t = txn.when(vm_key(&id), old.map_or(Expect::Absent, |(_, r)| Expect::ModRevision(r)));
    t = match new {
        Some(v) => t.op(crate::state::VmStore::put_op(v)),
        None => t.delete(vm_key(&id)),
    };
    let (before, after) = (by_key(old.map(|o| o.0)), by_key(new));
    for (k, c) in &after {
        match before.get(k) {
            Some(b) if b.held == c.held => {}
            Some(_) => t = t.put(k.clone(), encode(&c.held)),
            None if c.unique => t = t.when(k.clone(), Expect::Absent).put(k.clone(), encode(&c.held)),
            None => t = t.put(k.clone(), encode(&c.held)),
        }
    }
    for k in before.keys().filter(|k| !after.contains_key(*k)) {
        t = t.delete(k.clone());
    }
    t
}

/// The hosts whose capacity claims `old` → `new` gives up.
pub fn hosts_freed(old: &VmRecord, new: Option<&VmRecord>) -> Vec<String> {
    let after = by_key(new);
    by_key(Some(old))
        .into_keys()
        .filter(|k| !after.contains_key(k))
        .filter_map(|k| k.strip_prefix(&format!("{CLAIMS}host/")).and_then(|r| r.split('/').next()).map(str::to_string))
        .collect()
}

/// The claims every record in `records` holds, by key (what the store's `claims/` must be).
pub fn expected(records: &[VmRecord]) -> BTreeMap<String, Held> {
    let mut out = BTreeMap::new();
    for r in records {
        for c in claims(r) {
            out.entry(c.key).or_insert(c.held);
        }
    }
    out
}

/// Sums of counted claims: how many, cpus, memory, cpu cores.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub vms: u32,
    pub cpus: u32,
    pub memory_mib: u64,
    pub cpu_cores: f64,
}

/// The totals of the claims under one prefix, except those of VM `except`.
pub fn totals(rows: &[(String, crate::state::Entry)], except: &str) -> Totals {
    rows.iter().filter_map(|(k, e)| decode::<Held>(k, &e.value).ok()).filter(|h| h.vm != except).fold(Totals::default(), |t, h| Totals {
        vms: t.vms + 1,
        cpus: t.cpus + h.cpus,
        memory_mib: t.memory_mib + h.memory_mib,
        cpu_cores: t.cpu_cores + h.cpu_cores,
    })
}
