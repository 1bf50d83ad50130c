//! Admission arithmetic of the coordinator, as pure functions of the VM records: quotas,
//! forwarded host ports, what the scheduler is asked for and what a host is asked to start, and
//! a host's free capacity net of the VMs recorded on it.

use vgrid_api::auth::Quota;
use vgrid_api::grid::{HostAd, PlacementRequest};
use vgrid_api::host::LaunchRequest;
use vgrid_api::vm::{VmConfig, VmRecord};
use vgrid_api::{ImageRef, Manifest};

use crate::lifecycle::CoordinatorError;

/// Refuses a new VM of `owner` that would exceed one of their quotas, naming it.
pub(crate) fn check_quota(all: &[VmRecord], owner: &str, quota: &Quota, cpus: u32, memory_mib: u64) -> Result<(), CoordinatorError> {
    let mine: Vec<&VmRecord> = all.iter().filter(|v| v.owner == owner && v.state.is_active()).collect();
    let (n, c, m) = mine.iter().fold((0u32, 0u32, 0u64), |(n, c, m), v| (n + 1, c + v.config.cpus, m + v.config.memory_mib));
    let over = |what: &str, used: String, asked: String, limit: String| {
        Err(CoordinatorError::Quota(format!(
            "quota exceeded: user {owner} may have {limit} {what}; {used} in use, this VM asks for {asked}"
        )))
    };
    if let Some(q) = quota.vms {
        if n + 1 > q {
            return over("VMs", n.to_string(), "1 more".into(), q.to_string());
        }
    }
    if let Some(q) = quota.cpus {
        if c + cpus > q {
            return over("cpus", c.to_string(), cpus.to_string(), q.to_string());
        }
    }
    if let Some(q) = quota.memory_mib {
        if m + memory_mib > q {
            return over("MiB of memory", format!("{m} MiB"), format!("{memory_mib} MiB"), q.to_string());
        }
    }
    Ok(())
}

/// Refuses a new VM that forwards a host port another active VM forwards already.
pub(crate) fn check_forwards_free(all: &[VmRecord], config: &VmConfig) -> Result<(), CoordinatorError> {
    for f in config.net.forwards() {
        if all.iter().any(|v| v.state.is_active() && v.config.net.forwards_host_port(f.host)) {
            return Err(CoordinatorError::Conflict(format!("host port {} is already forwarded to another VM", f.host)));
        }
    }
    Ok(())
}

/// What the scheduler is asked for a VM of `config` running `manifest`.
pub(crate) fn placement_request(
    owner: &str,
    manifest: &Manifest,
    config: &VmConfig,
    require: &Option<String>,
    rank: &Option<String>,
) -> PlacementRequest {
    PlacementRequest {
        user: owner.to_string(),
        image: manifest.image_ref().to_string(),
        cpus: config.cpus,
        memory_mib: config.memory_mib,
        cpu_share: config.resources.cpu_cores(),
        require: require.clone(),
        rank: rank.clone(),
    }
}

/// What the host is asked to start for the VM recorded as `rec`: its configuration as
/// recorded, and `restore` (its saved image) when it resumes. A VM that ran before (resumed,
/// migrated) asks for the accelerator its host chose then: its saved state needs it.
pub(crate) fn launch_request(rec: &VmRecord, restore: Option<ImageRef>) -> LaunchRequest {
    let accel = rec.accel.or(rec.config.accel);
    LaunchRequest { id: rec.id.clone(), config: rec.config.clone().with_accel(accel), restore }
}

/// A refusal, one line per host.
pub(crate) fn explain(nm: &crate::sched::NoMatch) -> String {
    if nm.refusals.is_empty() {
        return "no host can take this VM: no host has joined".into();
    }
    let mut s = format!("no host can take this VM ({} hosts):", nm.refusals.len());
    for r in nm.refusals.iter().take(50) {
        s.push_str(&format!("\n  {}: `{}` {}", r.host, r.clause, r.detail));
    }
    if nm.refusals.len() > 50 {
        s.push_str(&format!("\n  and {} more", nm.refusals.len() - 50));
    }
    s
}

/// Cores of `ad`'s owner cap not reserved by the active VMs recorded on it (0 when uncapped).
pub(crate) fn free_share(vms: &[VmRecord], ad: &HostAd) -> f64 {
    if ad.cpu_cap <= 0.0 {
        return 0.0;
    }
    let held: f64 = vms
        .iter()
        .filter(|v| v.state.is_active() && v.host.as_deref() == Some(ad.name.as_str()))
        .map(|v| v.config.resources.cpu_cores())
        .sum();
    (ad.cpu_cap - held).max(0.0)
}

/// Cpus and memory of the active VMs recorded on `host`.
pub(crate) fn reserved(vms: &[VmRecord], host: &str) -> (u32, u64) {
    vms.iter()
        .filter(|v| v.state.is_active() && v.host.as_deref() == Some(host))
        .fold((0, 0), |(c, m), v| (c + v.config.cpus, m + v.config.memory_mib))
}
