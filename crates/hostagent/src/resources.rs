//! The host agent's resource control, accounting and load monitoring: the owner's cap and
//! admission control of CPU reservations, one cgroup per VM (see [`crate::cgroup`]), disk
//! throttling through a QEMU throttle group, per-VM usage counters reported with every
//! heartbeat, and the host load sampled every second and predicted (see [`crate::predict`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vgrid_api::usage::VmUsageReport;
use vgrid_api::vm::Resources;

use crate::cgroup::{Cgroups, Limits, VmCgroup};
use crate::predict::{LoadSampler, Predictor};
use crate::vm::Vm;
use crate::Accel;

/// QEMU's own memory besides guest RAM, MiB. Measured on this project's test machine (QEMU
/// 10.0, TCG): the sample guest with 256 MiB, made to touch all its RAM (`dd bs=200M` plus a
/// 100 MiB file in its RAM root), peaked at 350 MiB in its cgroup, i.e. 94 MiB above guest RAM.
/// The base covers QEMU itself and its device buffers; TCG adds headroom for its translation
/// cache, which grows with the code the guest runs.
pub const QEMU_OVERHEAD_MIB: u64 = 64;
pub const TCG_OVERHEAD_MIB: u64 = 96;

/// The memory limit of a VM's cgroup when none is asked for.
pub fn default_memory_limit_mib(memory_mib: u64, accel: Accel) -> u64 {
    memory_mib + QEMU_OVERHEAD_MIB + if accel == Accel::Tcg { TCG_OVERHEAD_MIB } else { 0 }
}

pub use crate::qemu::args::{throttle_args, DiskThrottle};

#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("host {host} refuses VM {id}: {reason}")]
    Refused { host: String, id: String, reason: String },
    #[error("VM {id}: {reason}")]
    Invalid { id: String, reason: String },
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
}

/// What is tracked of one VM for accounting.
struct Tracked {
    cgroup: Option<VmCgroup>,
    generation: u64,
    memory_mib_s: f64,
    last_tick: Instant,
    disk_read_bytes: u64,
    disk_write_bytes: u64,
    fetched_bytes: u64,
    stored_bytes: u64,
    memory_limit_bytes: u64,
    overlay: PathBuf,
    last: crate::cgroup::Usage,
    usage_file: PathBuf,
    /// See `VmUsageReport::ram_remote_bytes`.
    ram_remote_bytes: Option<u64>,
}

/// What is kept across agent restarts in the VM's runtime directory (`usage.json`).
#[derive(Serialize, Deserialize)]
struct Saved {
    generation: u64,
    memory_mib_s: f64,
    fetched_bytes: u64,
}

/// Load figures of this host.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Load {
    pub now: f64,
    pub predicted: f64,
}

pub struct HostResources {
    host: String,
    cgroups: Option<Cgroups>,
    /// The owner's CPU cap in cores (`max_share` × host CPUs); None: uncapped.
    cap_cores: Option<f64>,
    /// CPU reservations in cores, by VM (admitted, running or starting).
    reserved: Mutex<HashMap<String, f64>>,
    tracked: Mutex<HashMap<String, Tracked>>,
    /// Final reports of ended VMs, sent with the next heartbeat.
    finished: Mutex<Vec<VmUsageReport>>,
    load: Mutex<(LoadSampler, Predictor, Load)>,
    last_fetched: Mutex<u64>,
}

impl HostResources {
    /// Detects cgroups and creates the parent group `vgrid/HOST` with the owner's cap
    /// (`max_share` of the machine's CPU time, `max_memory_mib` for all guests). Without usable
    /// cgroups the agent still runs, unlimited and with a warning.
    /// `vms_dir` holds this agent's VM runtime directories: only groups of VMs found there are
    /// cleaned up as stale.
    pub fn new(
        host: &str,
        max_share: Option<f64>,
        max_memory_mib: Option<u64>,
        vms_dir: &std::path::Path,
    ) -> Result<HostResources, String> {
        if let Some(s) = max_share {
            if !(s.is_finite() && s > 0.0 && s <= 1.0) {
                return Err(format!("--max-share {s} is out of range: more than 0, at most 1 (the whole machine)"));
            }
        }
        let ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        let cap_cores = max_share.map(|s| s * ncpu);
        let cgroups = match Cgroups::detect(host) {
            Ok(cg) => {
                let missing = cg.missing();
                if !missing.is_empty() {
                    tracing::warn!(
                        host,
                        version = cg.version().as_str(),
                        ?missing,
                        "cgroup controllers missing: limits that need them are refused, their usage is not accounted"
                    );
                }
                match cg.setup_parent(cap_cores, max_memory_mib.map(|m| m << 20)) {
                    Ok(()) => {
                        let stale = cg.remove_stale(|id| vms_dir.join(id).is_dir());
                        if !stale.is_empty() {
                            tracing::info!(host, ?stale, "removed empty cgroups of VMs that ended with an earlier agent");
                        }
                        tracing::info!(host, version = cg.version().as_str(), cap_cores, max_memory_mib, "resource control by cgroups");
                        Some(cg)
                    }
                    Err(e) => {
                        tracing::warn!(host, "cannot set up cgroups ({e}): guests run without resource control");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::warn!(host, "{e}: guests run without resource control");
                None
            }
        };
        Ok(HostResources {
            host: host.to_string(),
            cgroups,
            cap_cores,
            reserved: Mutex::new(HashMap::new()),
            tracked: Mutex::new(HashMap::new()),
            finished: Mutex::new(Vec::new()),
            load: Mutex::new((LoadSampler::new(), Predictor::default(), Load::default())),
            last_fetched: Mutex::new(0),
        })
    }

    pub fn cgroups(&self) -> Option<&Cgroups> {
        self.cgroups.as_ref()
    }

    pub fn cgroup_version(&self) -> String {
        self.cgroups.as_ref().map(|c| c.version().as_str().to_string()).unwrap_or_default()
    }

    pub fn cap_cores(&self) -> Option<f64> {
        self.cap_cores
    }

    /// Cores of the cap not reserved (0 when uncapped).
    pub fn free_share(&self) -> f64 {
        match self.cap_cores {
            Some(c) => (c - self.reserved.lock().unwrap().values().sum::<f64>()).max(0.0),
            None => 0.0,
        }
    }

    /// Admission control: checks VM `id`'s reservation against the owner's cap and holds it.
    /// Returns the cgroup limits to create. Release with [`HostResources::release`].
    pub fn admit(&self, id: &str, r: &Resources, memory_mib: u64, accel: Accel) -> Result<Limits, AdmissionError> {
        let invalid = |reason: String| AdmissionError::Invalid { id: id.into(), reason };
        let cpu = r.reservation().map_err(|e| invalid(e.to_string()))?;
        let cores = cpu.map(|(q, p)| q as f64 / p as f64).unwrap_or(0.0);
        let mem_limit = r.memory_limit_mib.unwrap_or_else(|| default_memory_limit_mib(memory_mib, accel));
        if mem_limit < 16 {
            return Err(invalid(format!("memory limit {mem_limit} MiB is too small for QEMU: at least 16 MiB")));
        }
        let limits = Limits { cpu_quota_us: cpu.map(|c| c.0), cpu_period_us: cpu.map(|c| c.1), memory_bytes: Some(mem_limit << 20) };
        let mut reserved = self.reserved.lock().unwrap();
        if let Some(cap) = self.cap_cores {
            let held: f64 = reserved.iter().filter(|(k, _)| k.as_str() != id).map(|(_, v)| v).sum();
            if cores > 0.0 && held + cores > cap + 1e-9 {
                return Err(AdmissionError::Refused {
                    host: self.host.clone(),
                    id: id.into(),
                    reason: format!(
                        "CPU reservation of {cores:.3} cores exceeds the owner's cap (--max-share): {cap:.3} cores for all guests, {held:.3} reserved, {:.3} free",
                        (cap - held).max(0.0)
                    ),
                });
            }
        }
        if let Some(cg) = &self.cgroups {
            cg.check_limits(id, &Limits { memory_bytes: None, ..limits.clone() })?;
        } else if cpu.is_some() {
            return Err(AdmissionError::Refused {
                host: self.host.clone(),
                id: id.into(),
                reason: "it asks for a CPU reservation and this host has no usable cgroups to enforce it".into(),
            });
        }
        reserved.insert(id.to_string(), cores);
        Ok(limits)
    }

    /// Whether VM `id` is admitted here (launching or running, not yet released).
    pub fn is_admitted(&self, id: &str) -> bool {
        self.reserved.lock().unwrap().contains_key(id)
    }

    /// Creates VM `id`'s cgroup (None when cgroups are unavailable).
    pub fn create_group(&self, id: &str, limits: &Limits) -> Result<Option<VmCgroup>, AdmissionError> {
        let Some(cg) = &self.cgroups else { return Ok(None) };
        let mut l = limits.clone();
        if cg.missing().contains(&"memory") {
            l.memory_bytes = None;
        }
        Ok(Some(cg.create_vm(id, &l)?))
    }

    /// Starts accounting for a launched VM. `fetched` is what the host fetched during its launch.
    pub fn track(&self, vm: &Vm, cgroup: Option<VmCgroup>, limits: &Limits, fetched: u64) {
        let usage_file = vm.runtime_dir().join("usage.json");
        let saved: Option<Saved> = std::fs::read(&usage_file).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let fresh = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        // The generation is the start of the cgroup's counters: kept when the group (and its
        // counters) survived, new otherwise.
        let survived = cgroup.as_ref().is_some_and(|c| c.usage().cpu_ns > 0);
        let (generation, memory_mib_s, fetched_bytes) = match saved {
            Some(s) if survived => (s.generation, s.memory_mib_s, s.fetched_bytes),
            None if survived && usage_file.exists() => {
                tracing::warn!(vm = %vm.id(), file = %usage_file.display(),
                    "unreadable accounting state: the surviving cgroup counters start a new generation (the coordinator counts them again)");
                (fresh, 0.0, fetched)
            }
            _ => (fresh, 0.0, fetched),
        };
        let t = Tracked {
            cgroup,
            generation,
            memory_mib_s,
            last_tick: Instant::now(),
            disk_read_bytes: 0,
            disk_write_bytes: 0,
            fetched_bytes,
            stored_bytes: 0,
            memory_limit_bytes: limits.memory_bytes.unwrap_or(0),
            overlay: vm.overlay_path(),
            last: Default::default(),
            usage_file,
            ram_remote_bytes: None,
        };
        save(&t);
        self.tracked.lock().unwrap().insert(vm.id().to_string(), t);
    }

    /// The VM ended: its last report is queued for the next heartbeat, its group removed and
    /// its reservation released.
    pub fn release(&self, id: &str) {
        self.reserved.lock().unwrap().remove(id);
        let t = self.tracked.lock().unwrap().remove(id);
        if let Some(mut t) = t {
            sample(&mut t);
            let mut rep = report(id, &t);
            rep.finished = true;
            self.finished.lock().unwrap().push(rep);
            if let Some(cg) = &t.cgroup {
                if let Err(e) = cg.remove() {
                    tracing::warn!(vm = %id, "removing its cgroup: {e}");
                }
            }
        } else if let Some(cg) = &self.cgroups {
            // Admitted but never launched: a group may have been created.
            let g = cg.vm(id);
            if g.exists() && g.pids().is_empty() {
                let _ = g.remove();
            }
        }
    }

    /// The cgroup of a running VM.
    pub fn group(&self, id: &str) -> Option<VmCgroup> {
        self.tracked.lock().unwrap().get(id).and_then(|t| t.cgroup.clone())
    }

    /// Why VM `id`'s QEMU ended, as far as its cgroup tells (an OOM kill at its memory limit).
    pub fn exit_cause(&self, id: &str) -> Option<String> {
        let tracked = self.tracked.lock().unwrap();
        let t = tracked.get(id)?;
        let u = t.cgroup.as_ref().filter(|c| c.exists()).map(|c| c.usage()).unwrap_or_else(|| t.last.clone());
        (u.oom_kills > 0).then(|| {
            format!(
                "killed by the kernel's OOM killer at its memory limit of {} MiB (peak {} MiB, limit hit {} times)",
                t.memory_limit_bytes >> 20,
                u.memory_peak_bytes >> 20,
                u.memory_limit_hits
            )
        })
    }

    /// Reports of all tracked VMs plus the final ones not yet delivered.
    pub fn reports(&self) -> Vec<VmUsageReport> {
        let mut v: Vec<VmUsageReport> = self.finished.lock().unwrap().clone();
        let tracked = self.tracked.lock().unwrap();
        let mut ids: Vec<&String> = tracked.keys().collect();
        ids.sort();
        for id in ids {
            v.push(report(id, &tracked[id]));
        }
        v
    }

    /// The final reports in `delivered` reached the coordinator.
    pub fn delivered(&self, delivered: &[VmUsageReport]) {
        self.finished.lock().unwrap().retain(|r| !delivered.iter().any(|d| d.finished && d.id == r.id && d.generation == r.generation));
    }

    pub fn load(&self) -> Load {
        self.load.lock().unwrap().2
    }

    /// One tick (every second): the host load sample and prediction, each VM's cgroup counters
    /// and memory integral, and how much of a lazily paged RAM is still remote (`ram_remote`,
    /// by VM id); every `slow` ticks also disk counters (QMP) and overlay sizes.
    pub async fn tick(&self, vms: &[Arc<Vm>], fetched_total: u64, slow: bool, ram_remote: &HashMap<String, u64>) {
        {
            let mut l = self.load.lock().unwrap();
            if let Some(x) = l.0.sample() {
                l.1.push(x);
                l.2 = Load { now: x, predicted: l.1.predicted_mean() };
            }
        }
        // Fetches since the last tick are split among the running VMs.
        let fetched_delta = {
            let mut last = self.last_fetched.lock().unwrap();
            let d = fetched_total.saturating_sub(*last);
            *last = fetched_total;
            d
        };
        let mut disk: HashMap<String, (u64, u64)> = HashMap::new();
        if slow {
            for vm in vms {
                if let Some(rw) = disk_stats(vm).await {
                    disk.insert(vm.id().to_string(), rw);
                }
            }
        }
        let mut tracked = self.tracked.lock().unwrap();
        let n = tracked.len() as u64;
        for (id, t) in tracked.iter_mut() {
            sample(t);
            t.ram_remote_bytes = ram_remote.get(id).copied();
            t.fetched_bytes += fetched_delta.checked_div(n).unwrap_or(0);
            if let Some((r, w)) = disk.get(id) {
                t.disk_read_bytes = *r;
                t.disk_write_bytes = *w;
            }
            if slow {
                t.stored_bytes = allocated(&t.overlay).unwrap_or(t.stored_bytes);
                save(t);
            }
        }
    }

    /// Samples every tracked VM once more and saves its accounting (`usage.json`): an agent
    /// that stops and leaves its guests running hands its successor the figures of now, not
    /// of the last slow tick.
    pub fn persist(&self) {
        for t in self.tracked.lock().unwrap().values_mut() {
            sample(t);
            save(t);
        }
    }

    /// At agent shutdown: removes the parent group if no guest is left in it.
    pub fn shutdown(&self) {
        if let Some(cg) = &self.cgroups {
            cg.remove_parent();
        }
    }
}

/// Keeps the VM's generation and integrals in `usage.json`, replaced atomically: an agent
/// killed while writing must not leave an empty file, or its successor would start a new
/// generation over the surviving cgroup counters and the coordinator would count them twice.
fn save(t: &Tracked) {
    let s = Saved { generation: t.generation, memory_mib_s: t.memory_mib_s, fetched_bytes: t.fetched_bytes };
    if let Ok(b) = serde_json::to_vec(&s) {
        if let Err(e) = crate::qemu_user::replace_file(&t.usage_file, &b) {
            tracing::warn!(file = %t.usage_file.display(), "cannot save the VM's accounting: {e}");
        }
    }
}

fn sample(t: &mut Tracked) {
    let now = Instant::now();
    let dt = now.duration_since(t.last_tick).as_secs_f64();
    t.last_tick = now;
    if let Some(cg) = &t.cgroup {
        if cg.exists() {
            let u = cg.usage();
            // Trapezoid between the previous and this sample.
            let prev = if t.last.memory_bytes == 0 { u.memory_bytes } else { t.last.memory_bytes };
            t.memory_mib_s += (prev + u.memory_bytes) as f64 / 2.0 / (1u64 << 20) as f64 * dt;
            t.last = u;
        }
    }
}

fn report(id: &str, t: &Tracked) -> VmUsageReport {
    VmUsageReport {
        id: id.to_string(),
        generation: t.generation,
        cpu_ns: t.last.cpu_ns,
        memory_mib_s: t.memory_mib_s,
        disk_read_bytes: t.disk_read_bytes,
        disk_write_bytes: t.disk_write_bytes,
        fetched_bytes: t.fetched_bytes,
        stored_bytes: t.stored_bytes,
        memory_bytes: t.last.memory_bytes,
        memory_peak_bytes: t.last.memory_peak_bytes,
        memory_limit_bytes: t.memory_limit_bytes,
        memory_limit_hits: t.last.memory_limit_hits,
        oom_kills: t.last.oom_kills,
        finished: false,
        ram_remote_bytes: t.ram_remote_bytes,
    }
}

/// Allocated bytes of a file.
fn allocated(p: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| m.blocks() * 512)
}

/// (rd_bytes, wr_bytes) of the guest's disk from QMP, with a timeout (a stopped QEMU does not
/// answer).
async fn disk_stats(vm: &Vm) -> Option<(u64, u64)> {
    if vm.exit_info().is_some() {
        return None;
    }
    let v = tokio::time::timeout(Duration::from_secs(2), vm.execute("query-blockstats", None)).await.ok()?.ok()?;
    let (mut r, mut w) = (0, 0);
    for dev in v.as_array()? {
        // The device's own counters (the one a guest drive is attached to).
        let has_dev = dev.get("qdev").and_then(|q| q.as_str()).is_some_and(|q| !q.is_empty())
            || dev.get("device").and_then(|q| q.as_str()).is_some_and(|q| !q.is_empty());
        if !has_dev {
            continue;
        }
        let s = dev.get("stats")?;
        r += s.get("rd_bytes").and_then(|x| x.as_u64()).unwrap_or(0);
        w += s.get("wr_bytes").and_then(|x| x.as_u64()).unwrap_or(0);
    }
    Some((r, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_wraps_the_drive() {
        let mut args: Vec<String> = [
            "-pidfile",
            "p",
            "-blockdev",
            "driver=qcow2,node-name=vda,discard=unmap,file.driver=file,file.filename=o",
            "-device",
            "virtio-blk-pci,drive=vda",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        throttle_args(&mut args, &DiskThrottle { bps: Some(1 << 20), iops: Some(100) });
        assert_eq!(
            args,
            [
                "-pidfile",
                "p",
                "-object",
                "throttle-group,id=tg0,x-bps-total=1048576,x-iops-total=100",
                "-blockdev",
                "driver=qcow2,node-name=vda-qcow2,discard=unmap,file.driver=file,file.filename=o",
                "-blockdev",
                "driver=throttle,node-name=vda,throttle-group=tg0,file=vda-qcow2",
                "-device",
                "virtio-blk-pci,drive=vda"
            ]
        );
    }

    #[test]
    fn admission_respects_the_cap() {
        let r = HostResources {
            host: "h".into(),
            cgroups: None,
            cap_cores: Some(0.5),
            reserved: Mutex::new(HashMap::new()),
            tracked: Mutex::new(HashMap::new()),
            finished: Mutex::new(Vec::new()),
            load: Mutex::new((LoadSampler::new(), Predictor::default(), Load::default())),
            last_fetched: Mutex::new(0),
        };
        // No cgroups: a reservation cannot be enforced and is refused, plainly.
        let e = r.admit("a", &Resources { cpu_share: Some(0.2), ..Default::default() }, 256, Accel::Tcg).unwrap_err();
        assert!(e.to_string().contains("no usable cgroups"), "{e}");
        r.reserved.lock().unwrap().insert("x".into(), 0.4);
        let e = r.admit("b", &Resources { cpu_share: Some(0.2), ..Default::default() }, 256, Accel::Tcg).unwrap_err();
        assert!(e.to_string().contains("exceeds the owner's cap") && e.to_string().contains("0.100 free"), "{e}");
        let e =
            r.admit("c", &Resources { cpu_share: Some(0.2), cpu_slice_ms: Some(3), ..Default::default() }, 256, Accel::Tcg).unwrap_err();
        assert!(e.to_string().contains("VM c") && e.to_string().contains("not both"), "{e}");
        assert!((r.free_share() - 0.1).abs() < 1e-9);
    }
}
