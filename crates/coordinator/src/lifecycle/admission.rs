//! Admission arithmetic of the coordinator, as pure functions: quotas (of what the owner's
//! claims hold), warm images, what the scheduler is asked for and what a host is asked to
//! start. The store-side checks are `lifecycle::admit`'s.

use vgrid_api::auth::Quota;
use vgrid_api::grid::PlacementRequest;
use vgrid_api::host::LaunchRequest;
use vgrid_api::vm::{VmConfig, VmRecord};
use vgrid_api::{ImageRef, Manifest};

use crate::lifecycle::claims::Totals;
use crate::lifecycle::CoordinatorError;

/// Refuses a new VM of `owner` (`cpus`, `memory_mib`) that would exceed one of their quotas
/// (`used`: what their active VMs hold), naming it.
pub(crate) fn check_quota(used: Totals, owner: &str, quota: &Quota, cpus: u32, memory_mib: u64) -> Result<(), CoordinatorError> {
    let Totals { vms: n, cpus: c, memory_mib: m, .. } = used;
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

/// Refuses, at admission, a warm image with other cpus/memory than its state was saved with.
pub(crate) fn check_warm(manifest: &Manifest, cpus: u32, memory_mib: u64) -> Result<(), CoordinatorError> {
    if let Some(st) = &manifest.state {
        if let Some(why) = st.meta.incompatibility(cpus, memory_mib, &st.meta.qemu_version) {
            return Err(CoordinatorError::BadRequest(format!("image {} is a warm image: {why}", manifest.image_ref())));
        }
    }
    Ok(())
}

/// The user's requirement, plus for a warm image the accelerator its state needs.
pub(crate) fn warm_requirement(manifest: &Manifest, require: Option<String>) -> Option<String> {
    let accel = manifest.state.as_ref().map(|s| s.meta.accel.clone()).filter(|a| !a.is_empty());
    match (require.filter(|r| !r.trim().is_empty()), accel) {
        (r, None) => r,
        (None, Some(a)) => Some(format!("host.accel == {a:?}")),
        (Some(r), Some(a)) => Some(format!("({r}) && host.accel == {a:?}")),
    }
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
        require: match (require.clone().filter(|r| !r.trim().is_empty()), crate::networks::network_requirement(&config.net)) {
            (r, None) => r,
            (None, Some(n)) => Some(n),
            (Some(r), Some(n)) => Some(format!("({r}) && {n}")),
        },
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
