//! The store-side checks every admitting write commits with ([`Coordinator::guard`]): the
//! owner's quota and the capacity of each host the VM newly claims, counted from the claims in
//! the store, and the conditions that those claims did not change before the batch commits.
//! The one write path (`records.rs`) applies it; admission (`admit.rs`), resume and migration
//! ask for it.

use vgrid_api::auth::Quota;
use vgrid_api::vm::VmRecord;

use super::admission::check_quota;
use super::claims::{self, Held, Totals};
use super::{Coordinator, CoordinatorError};
use crate::state::{decode, Txn};

/// What an admitting write is checked against besides the host's capacity.
#[derive(Debug, Clone, Default)]
pub(crate) struct Admit {
    /// The owner's quota (`None`: checked when the VM was first admitted, or none).
    pub quota: Option<Quota>,
}

pub(crate) fn limited(q: &Quota) -> bool {
    q.vms.is_some() || q.cpus.is_some() || q.memory_mib.is_some()
}

impl Coordinator {
    /// The checks of an admitting write of `new` over `old`, against the claims in the store,
    /// and the conditions that they still hold when the batch commits: the owner's quota when
    /// the VM becomes active (and a quota applies), the capacity of every host it newly claims.
    pub(crate) async fn guard(&self, old: Option<&VmRecord>, new: &VmRecord, admit: &Admit) -> Result<Txn, CoordinatorError> {
        let store = self.state.store();
        let mut txn = Txn::new();
        let was_active = old.is_some_and(|o| o.state.is_active());
        if let Some(q) = admit.quota.as_ref().filter(|q| limited(q) && new.state.is_active() && !was_active) {
            let prefix = claims::owner_prefix(&new.owner);
            let (rows, at) = store.range(&prefix).await?;
            check_quota(claims::totals(&rows, &new.id), &new.owner, q, new.config.cpus, new.config.memory_mib)?;
            txn = txn.when_unchanged_since(prefix, at);
        }
        let had: Vec<String> = old.map(claims::claims).unwrap_or_default().into_iter().map(|c| c.key).collect();
        for c in claims::claims(new).into_iter().filter(|c| c.key.starts_with(&format!("{}host/", claims::CLAIMS))) {
            if had.contains(&c.key) {
                continue;
            }
            let host = c.key[claims::CLAIMS.len() + "host/".len()..].split('/').next().unwrap_or_default().to_string();
            let Some(h) = self.registry.host(&host) else { continue };
            let prefix = claims::host_prefix(&host);
            let (rows, at) = store.range(&prefix).await?;
            let used = claims::totals(&rows, &new.id);
            fits(&host, used, &c.held, &h.ad)?;
            // Not onto a host drained meanwhile (by any coordinator): see `try_commit`.
            txn = txn.when_unchanged_since(prefix, at).when(crate::drain::drain_key(&host), crate::state::Expect::Absent);
        }
        Ok(txn)
    }

    /// The error for a unique claim (`key`) another VM holds.
    pub(crate) async fn refusal(&self, key: &str) -> CoordinatorError {
        if let Some(name) = key.strip_prefix(&format!("{}name/", claims::CLAIMS)) {
            return CoordinatorError::Conflict(name_taken(name));
        }
        for (kind, what) in [("addr", "address"), ("mac", "MAC address")] {
            if let Some(rest) = key.strip_prefix(&format!("{}{kind}/", claims::CLAIMS)) {
                let (net, value) = rest.split_once('/').unwrap_or((rest, ""));
                return CoordinatorError::NetworkIdentityTaken(format!("{what} {value} on network {net:?} is taken by another VM"));
            }
        }
        if let Some(volume) = key.strip_prefix(&format!("{}volume/", claims::CLAIMS)) {
            let who = match self.holder(key).await {
                Ok(Some(h)) => match self.record(&h.vm).await {
                    Ok(Some(r)) => format!("VM {} ({}, {})", h.name, h.vm, r.state.as_str()),
                    _ => format!("VM {} ({})", h.name, h.vm),
                },
                _ => "another VM".to_string(),
            };
            return CoordinatorError::Conflict(format!(
                "volume {volume} is attached read-write to {who}: a volume has one writer at a time (attach it with :ro, or stop or remove that VM)"
            ));
        }
        let port = key.rsplit('/').next().unwrap_or_default();
        CoordinatorError::Conflict(format!("host port {port} is already forwarded to another VM"))
    }

    /// The VM holding unique claim `key` now, if any.
    pub(crate) async fn holder(&self, key: &str) -> Result<Option<Held>, CoordinatorError> {
        match self.state.store().get(key).await? {
            Some(e) => Ok(Some(decode(key, &e.value)?)),
            None => Ok(None),
        }
    }
}

/// Refuses claims `held` on `host` (advertised as `ad`) when the claims there (`used`) leave no
/// room for them.
fn fits(host: &str, used: Totals, held: &Held, ad: &vgrid_api::grid::HostAd) -> Result<(), CoordinatorError> {
    let full = |what: &str, used: String, total: String| {
        Err(CoordinatorError::Capacity(format!(
            "host {host} has no room for VM {} any more: {used} of its {total} {what} are taken",
            held.vm
        )))
    };
    if used.cpus + held.cpus > ad.cpus {
        return full("cpus", used.cpus.to_string(), ad.cpus.to_string());
    }
    if used.memory_mib + held.memory_mib > ad.memory_mib {
        return full("MiB of memory", used.memory_mib.to_string(), ad.memory_mib.to_string());
    }
    if ad.cpu_cap > 0.0 && held.cpu_cores > 0.0 && used.cpu_cores + held.cpu_cores > ad.cpu_cap + 1e-9 {
        return full("cpu cores", used.cpu_cores.to_string(), ad.cpu_cap.to_string());
    }
    Ok(())
}

/// What a create is told when another VM holds the name it asked for (or was given).
pub(crate) fn name_taken(name: &str) -> String {
    format!("a VM named {name:?} exists already")
}
