//! Resource control through cgroups, v1 and v2, by writing the few cgroupfs files directly.
//!
//! Layout: a parent group `vgrid/HOST` holds the owner's cap (CPU quota, memory limit) for all
//! guests of this host together; one child `vgrid/HOST/VMID` per VM holds its reservation
//! (CFS bandwidth: `cpu.cfs_quota_us`/`cpu.cfs_period_us` on v1, `cpu.max` on v2) and its memory
//! limit (`memory.limit_in_bytes` / `memory.max`). QEMU's pid is written into the child right
//! after spawn. The counters the agent accounts from are read here too: CPU time
//! (`cpuacct.usage` / `cpu.stat usage_usec`), memory use and peak, limit hits and OOM kills.
//!
//! Which version is mounted is detected at runtime: v2 when `/sys/fs/cgroup/cgroup.controllers`
//! exists (unified hierarchy), else v1 with one mount per controller (found in
//! `/proc/self/mounts`). A controller that is missing is reported by [`Cgroups::missing`] and
//! refusing limits that need it is the caller's job ([`Cgroups::check_limits`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The CFS period used when a share is given without a period.
pub use vgrid_api::config::DEFAULT_CPU_PERIOD_US as DEFAULT_PERIOD_US;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path}: write: writing {value:?}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {id}: cannot enforce its {what}: the {controller} cgroup controller is not available on this host")]
    Missing { id: String, what: &'static str, controller: &'static str },
    #[error("no cgroup filesystem found under {0} (neither v2 cgroup.controllers nor v1 controller mounts)")]
    NotMounted(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn as_str(&self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// The limits of one VM's group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// CFS bandwidth: `quota_us` of CPU time per `period_us`, over all of QEMU's threads.
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: Option<u64>,
    /// Limit on QEMU's whole memory (guest RAM + QEMU's own), bytes.
    pub memory_bytes: Option<u64>,
}

/// Counters of one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// CPU time used by all tasks of the group, nanoseconds.
    pub cpu_ns: u64,
    pub memory_bytes: u64,
    /// Highest memory use seen (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`; 0 when the
    /// kernel does not keep it).
    pub memory_peak_bytes: u64,
    /// Times the memory limit was hit (v1 `memory.failcnt`, v2 `memory.events max`).
    pub memory_limit_hits: u64,
    /// Processes the OOM killer killed in the group.
    pub oom_kills: u64,
    /// CFS periods in which the group was throttled.
    pub cpu_throttled_periods: u64,
    pub cpu_periods: u64,
}

/// One place a controller lives: a v1 controller mount, or the v2 unified root.
#[derive(Debug, Clone)]
struct Hier {
    mount: PathBuf,
    cpu: bool,
    cpuacct: bool,
    memory: bool,
}

/// The cgroups of one host agent.
#[derive(Debug, Clone)]
pub struct Cgroups {
    version: Version,
    hiers: Vec<Hier>,
    /// `vgrid/HOST`, relative to each mount.
    parent: PathBuf,
    /// The cap last set by [`Cgroups::setup_parent`], to set again should the parent vanish
    /// (another agent of the same host name removed it at its shutdown).
    cap: std::sync::Arc<std::sync::Mutex<(Option<f64>, Option<u64>)>>,
}

fn io(path: &Path, what: &'static str, e: std::io::Error) -> CgroupError {
    CgroupError::Io { path: path.to_path_buf(), what, source: e }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write { path: path.to_path_buf(), value: value.to_string(), source })
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `KEY VALUE` lines (cpu.stat, memory.events, memory.oom_control).
fn read_kv(path: &Path, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    s.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next().and_then(|v| v.parse().ok())).flatten()
    })
}

impl Cgroups {
    /// Detects the cgroup version under `/sys/fs/cgroup` and prepares the layout for `host`.
    /// Nothing is created yet.
    pub fn detect(host: &str) -> Result<Cgroups, CgroupError> {
        Self::detect_at(Path::new("/sys/fs/cgroup"), host)
    }

    pub fn detect_at(root: &Path, host: &str) -> Result<Cgroups, CgroupError> {
        let parent = Path::new("vgrid").join(host);
        if root.join("cgroup.controllers").exists() {
            let ctl = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| ctl.split_whitespace().any(|x| x == c);
            let h = Hier { mount: root.to_path_buf(), cpu: has("cpu"), cpuacct: true, memory: has("memory") };
            return Ok(Cgroups { version: Version::V2, hiers: vec![h], parent, cap: Default::default() });
        }
        // v1: one mount per controller set, found in the mount table.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut hiers: Vec<Hier> = Vec::new();
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[2] != "cgroup" {
                continue;
            }
            let mount = PathBuf::from(f[1]);
            if !mount.starts_with(root) {
                continue;
            }
            let opts: Vec<&str> = f[3].split(',').collect();
            let h = Hier { mount, cpu: opts.contains(&"cpu"), cpuacct: opts.contains(&"cpuacct"), memory: opts.contains(&"memory") };
            if h.cpu || h.cpuacct || h.memory {
                hiers.push(h);
            }
        }
        if hiers.is_empty() {
            return Err(CgroupError::NotMounted(root.to_path_buf()));
        }
        Ok(Cgroups { version: Version::V1, hiers, parent, cap: Default::default() })
    }

    pub fn version(&self) -> Version {
        self.version
    }

    fn has(&self, f: impl Fn(&Hier) -> bool) -> bool {
        self.hiers.iter().any(f)
    }

    /// Controllers vgrid uses that this host lacks (`cpu`, `cpuacct`, `memory`).
    pub fn missing(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if !self.has(|h| h.cpu) {
            m.push("cpu");
        }
        if !self.has(|h| h.cpuacct) {
            m.push("cpuacct");
        }
        if !self.has(|h| h.memory) {
            m.push("memory");
        }
        m
    }

    /// Refuses limits that need a controller this host lacks.
    pub fn check_limits(&self, id: &str, l: &Limits) -> Result<(), CgroupError> {
        if l.cpu_quota_us.is_some() && !self.has(|h| h.cpu) {
            return Err(CgroupError::Missing { id: id.into(), what: "CPU reservation", controller: "cpu" });
        }
        if l.memory_bytes.is_some() && !self.has(|h| h.memory) {
            return Err(CgroupError::Missing { id: id.into(), what: "memory limit", controller: "memory" });
        }
        Ok(())
    }

    /// The parent group's directory in the hierarchy holding `ctl` (for tests and display).
    pub fn parent_dir(&self, ctl: &str) -> Option<PathBuf> {
        self.hier_of(ctl).map(|h| h.mount.join(&self.parent))
    }

    fn hier_of(&self, ctl: &str) -> Option<&Hier> {
        self.hiers.iter().find(|h| match ctl {
            "cpu" => h.cpu,
            "cpuacct" => h.cpuacct,
            "memory" => h.memory,
            _ => false,
        })
    }

    /// Distinct mounts (a v1 mount may carry several controllers).
    fn mounts(&self) -> Vec<&Hier> {
        let mut v: Vec<&Hier> = Vec::new();
        for h in &self.hiers {
            if !v.iter().any(|x| x.mount == h.mount) {
                v.push(h);
            }
        }
        v
    }

    /// Creates the parent group `vgrid/HOST` and sets the owner's cap on it: `max_share` of the
    /// whole machine's CPU time in cores (`None`: unlimited) and `max_memory_bytes`.
    pub fn setup_parent(&self, cpu_cores: Option<f64>, max_memory_bytes: Option<u64>) -> Result<(), CgroupError> {
        *self.cap.lock().unwrap() = (cpu_cores, max_memory_bytes);
        for h in self.mounts() {
            let dir = h.mount.join(&self.parent);
            if self.version == Version::V2 {
                // Controllers must be enabled top-down in every ancestor's subtree_control.
                let mut enable = Vec::new();
                if h.cpu {
                    enable.push("+cpu");
                }
                if h.memory {
                    enable.push("+memory");
                }
                let mut cur = h.mount.clone();
                for comp in std::iter::once(None).chain(self.parent.components().map(Some)) {
                    if let Some(c) = comp {
                        cur.push(c);
                        std::fs::create_dir_all(&cur).map_err(|e| io(&cur, "create", e))?;
                    }
                    for e in &enable {
                        let _ = std::fs::write(cur.join("cgroup.subtree_control"), e);
                    }
                }
            } else {
                std::fs::create_dir_all(&dir).map_err(|e| io(&dir, "create", e))?;
                if h.memory {
                    // Hierarchical accounting (always on in recent kernels; older ones need it).
                    let _ = std::fs::write(h.mount.join("vgrid/memory.use_hierarchy"), "1");
                    let _ = std::fs::write(dir.join("memory.use_hierarchy"), "1");
                }
            }
            if h.cpu {
                let quota = cpu_cores.map(|c| (c * DEFAULT_PERIOD_US as f64).round().max(1000.0) as u64);
                self.write_cpu(&dir, quota, DEFAULT_PERIOD_US)?;
            }
            if h.memory {
                self.write_memory(&dir, max_memory_bytes)?;
            }
        }
        Ok(())
    }

    fn write_cpu(&self, dir: &Path, quota_us: Option<u64>, period_us: u64) -> Result<(), CgroupError> {
        match self.version {
            Version::V2 => {
                let q = quota_us.map(|q| q.to_string()).unwrap_or_else(|| "max".into());
                write(&dir.join("cpu.max"), &format!("{q} {period_us}"))
            }
            Version::V1 => {
                // Quota first to unlimited so that a shorter period is always accepted.
                write(&dir.join("cpu.cfs_quota_us"), "-1")?;
                write(&dir.join("cpu.cfs_period_us"), &period_us.to_string())?;
                if let Some(q) = quota_us {
                    write(&dir.join("cpu.cfs_quota_us"), &q.to_string())?;
                }
                Ok(())
            }
        }
    }

    fn write_memory(&self, dir: &Path, bytes: Option<u64>) -> Result<(), CgroupError> {
        match self.version {
            Version::V2 => {
                let v = bytes.map(|b| b.to_string()).unwrap_or_else(|| "max".into());
                write(&dir.join("memory.max"), &v)?;
                if bytes.is_some() {
                    // The limit is on RAM: do not let the group escape it into swap.
                    let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                }
                Ok(())
            }
            Version::V1 => {
                let v = bytes.map(|b| b.to_string()).unwrap_or_else(|| "-1".into());
                write(&dir.join("memory.limit_in_bytes"), &v)
            }
        }
    }

    /// Creates the group of VM `id` with `limits`. An existing group of that name is reused
    /// (its counters continue).
    pub fn create_vm(&self, id: &str, limits: &Limits) -> Result<VmCgroup, CgroupError> {
        self.check_limits(id, limits)?;
        if self.mounts().iter().any(|h| !h.mount.join(&self.parent).is_dir()) {
            let (c, m) = *self.cap.lock().unwrap();
            self.setup_parent(c, m)?;
        }
        let rel = self.parent.join(id);
        for h in self.mounts() {
            let dir = h.mount.join(&rel);
            std::fs::create_dir_all(&dir).map_err(|e| io(&dir, "create", e))?;
            if h.cpu {
                self.write_cpu(&dir, limits.cpu_quota_us, limits.cpu_period_us.unwrap_or(DEFAULT_PERIOD_US))?;
            }
            if h.memory {
                self.write_memory(&dir, limits.memory_bytes)?;
            }
        }
        Ok(self.vm(id))
    }

    /// The group of VM `id` (whether or not it exists).
    pub fn vm(&self, id: &str) -> VmCgroup {
        let rel = self.parent.join(id);
        let dir = |ctl: &str| self.hier_of(ctl).map(|h| h.mount.join(&rel));
        VmCgroup {
            version: self.version,
            id: id.to_string(),
            dirs: self.mounts().iter().map(|h| h.mount.join(&rel)).collect(),
            cpu: dir("cpu"),
            cpuacct: dir("cpuacct"),
            memory: dir("memory"),
        }
    }

    /// The parent group's counters (all guests of this host together).
    pub fn parent_usage(&self) -> Usage {
        let dir = |ctl: &str| self.hier_of(ctl).map(|h| h.mount.join(&self.parent));
        usage_of(self.version, dir("cpu"), dir("cpuacct"), dir("memory"))
    }

    /// Removes VM groups left empty under the parent (their QEMU died with an earlier agent)
    /// among those `ours` claims (another agent using the same host name may be creating one);
    /// groups that still hold a process are kept (a QEMU that may be re-adopted). Returns the
    /// ids removed.
    pub fn remove_stale(&self, ours: impl Fn(&str) -> bool) -> Vec<String> {
        let Some(first) = self.mounts().first().map(|h| h.mount.join(&self.parent)) else { return vec![] };
        let mut removed = Vec::new();
        for e in std::fs::read_dir(first).into_iter().flatten().flatten() {
            if !e.path().is_dir() {
                continue;
            }
            let id = e.file_name().to_string_lossy().into_owned();
            if !ours(&id) {
                continue;
            }
            let g = self.vm(&id);
            if g.pids().is_empty() && g.remove().is_ok() {
                removed.push(id);
            }
        }
        removed
    }

    /// Removes the parent group if no VM group is left in it (at agent shutdown).
    pub fn remove_parent(&self) {
        for h in self.mounts() {
            let dir = h.mount.join(&self.parent);
            let _ = std::fs::remove_dir(&dir);
            if let Some(p) = dir.parent() {
                // `vgrid` itself goes once the last host agent of this machine has gone.
                let _ = std::fs::remove_dir(p);
            }
        }
    }
}

/// The group of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCgroup {
    version: Version,
    id: String,
    /// One directory per mount.
    dirs: Vec<PathBuf>,
    cpu: Option<PathBuf>,
    cpuacct: Option<PathBuf>,
    memory: Option<PathBuf>,
}

fn usage_of(version: Version, cpu: Option<PathBuf>, cpuacct: Option<PathBuf>, memory: Option<PathBuf>) -> Usage {
    let mut u = Usage::default();
    match version {
        Version::V1 => {
            if let Some(d) = &cpuacct {
                u.cpu_ns = read_u64(&d.join("cpuacct.usage")).unwrap_or(0);
            }
            if let Some(d) = &cpu {
                u.cpu_periods = read_kv(&d.join("cpu.stat"), "nr_periods").unwrap_or(0);
                u.cpu_throttled_periods = read_kv(&d.join("cpu.stat"), "nr_throttled").unwrap_or(0);
            }
            if let Some(d) = &memory {
                u.memory_bytes = read_u64(&d.join("memory.usage_in_bytes")).unwrap_or(0);
                u.memory_peak_bytes = read_u64(&d.join("memory.max_usage_in_bytes")).unwrap_or(0);
                u.memory_limit_hits = read_u64(&d.join("memory.failcnt")).unwrap_or(0);
                u.oom_kills = read_kv(&d.join("memory.oom_control"), "oom_kill").unwrap_or(0);
            }
        }
        Version::V2 => {
            if let Some(d) = &cpu {
                let stat = d.join("cpu.stat");
                u.cpu_ns = read_kv(&stat, "usage_usec").unwrap_or(0) * 1000;
                u.cpu_periods = read_kv(&stat, "nr_periods").unwrap_or(0);
                u.cpu_throttled_periods = read_kv(&stat, "nr_throttled").unwrap_or(0);
            }
            if let Some(d) = &memory {
                u.memory_bytes = read_u64(&d.join("memory.current")).unwrap_or(0);
                u.memory_peak_bytes = read_u64(&d.join("memory.peak")).unwrap_or(0);
                u.memory_limit_hits = read_kv(&d.join("memory.events"), "max").unwrap_or(0);
                u.oom_kills = read_kv(&d.join("memory.events"), "oom_kill").unwrap_or(0);
            }
        }
    }
    u
}

impl VmCgroup {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the group exists (in every hierarchy).
    pub fn exists(&self) -> bool {
        !self.dirs.is_empty() && self.dirs.iter().all(|d| d.is_dir())
    }

    /// The group's directory in the hierarchy of `ctl` (`cpu`, `cpuacct`, `memory`).
    pub fn dir(&self, ctl: &str) -> Option<&Path> {
        match ctl {
            "cpu" => self.cpu.as_deref(),
            "cpuacct" => self.cpuacct.as_deref(),
            "memory" => self.memory.as_deref(),
            _ => None,
        }
    }

    /// Moves process `pid` (all its threads) into the group.
    pub fn attach(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Pids in the group.
    pub fn pids(&self) -> Vec<u32> {
        let Some(d) = self.dirs.first() else { return vec![] };
        std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    pub fn usage(&self) -> Usage {
        usage_of(self.version, self.cpu.clone(), self.cpuacct.clone(), self.memory.clone())
    }

    /// Removes the group (its processes must have exited; retried briefly while the kernel
    /// finishes tearing them down).
    pub fn remove(&self) -> Result<(), CgroupError> {
        for d in &self.dirs {
            let mut last = None;
            for _ in 0..50 {
                match std::fs::remove_dir(d) {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        last = None;
                        break;
                    }
                    Err(e) => {
                        last = Some(e);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            if let Some(e) = last {
                return Err(io(d, "remove", e));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v2_layout() {
        // A fake v2 tree: the files the kernel would show.
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        let cg = Cgroups::detect_at(root.path(), "h1").unwrap();
        assert_eq!(cg.version(), Version::V2);
        assert!(cg.missing().is_empty());
        let vm = cg
            .create_vm("vm-1", &Limits { cpu_quota_us: Some(20_000), cpu_period_us: Some(100_000), memory_bytes: Some(1 << 28) })
            .unwrap();
        let d = vm.dir("cpu").unwrap().to_path_buf();
        assert_eq!(std::fs::read_to_string(d.join("cpu.max")).unwrap(), "20000 100000");
        assert_eq!(std::fs::read_to_string(d.join("memory.max")).unwrap(), (1u64 << 28).to_string());
        std::fs::write(d.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\nnr_periods 7\nnr_throttled 3\n").unwrap();
        std::fs::write(d.join("memory.current"), "4096\n").unwrap();
        std::fs::write(d.join("memory.events"), "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n").unwrap();
        let u = vm.usage();
        assert_eq!(u.cpu_ns, 1_500_000);
        assert_eq!((u.cpu_periods, u.cpu_throttled_periods), (7, 3));
        assert_eq!((u.memory_bytes, u.memory_limit_hits, u.oom_kills), (4096, 5, 1));
    }

    #[test]
    fn v2_parent_holds_the_cap_and_comes_back() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
        let cg = Cgroups::detect_at(root.path(), "h2").unwrap();
        cg.setup_parent(Some(0.5), Some(1 << 30)).unwrap();
        let p = root.path().join("vgrid/h2");
        assert_eq!(std::fs::read_to_string(p.join("cpu.max")).unwrap(), "50000 100000");
        assert_eq!(std::fs::read_to_string(p.join("memory.max")).unwrap(), (1u64 << 30).to_string());
        // Controllers are enabled for the children all the way down.
        assert_eq!(std::fs::read_to_string(root.path().join("vgrid/cgroup.subtree_control")).unwrap(), "+memory");
        // Another agent of this name removed the parent: the next VM sets the cap again.
        std::fs::remove_dir_all(root.path().join("vgrid")).unwrap();
        cg.create_vm("vm-2", &Limits::default()).unwrap();
        assert_eq!(std::fs::read_to_string(p.join("cpu.max")).unwrap(), "50000 100000");
        assert_eq!(std::fs::read_to_string(p.join("vm-2/cpu.max")).unwrap(), "max 100000");
        // Empty groups of VMs that are ours are cleaned up, others' are left alone.
        assert!(cg.remove_stale(|id| id == "vm-x").is_empty());
    }

    #[test]
    fn missing_controller_is_named() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "pids io\n").unwrap();
        let cg = Cgroups::detect_at(root.path(), "h1").unwrap();
        assert_eq!(cg.missing(), vec!["cpu", "memory"]);
        let e = cg.create_vm("vm-9", &Limits { cpu_quota_us: Some(1000), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("vm-9") && e.to_string().contains("cpu cgroup controller"), "{e}");
    }
}
