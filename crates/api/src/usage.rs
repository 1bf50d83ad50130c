//! Accounting: what a host reports about each VM's use, and what the coordinator answers to
//! `GET /api/v1/usage`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A host's cumulative counters of one VM, sent with every heartbeat. Counters start at zero
/// when the VM's cgroup is created; `generation` names that start, so the coordinator adds the
/// difference to the previous report of the same generation, and the whole counters of a new
/// generation (a restarted agent that re-adopts the VM keeps the generation and the counters).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmUsageReport {
    pub id: String,
    pub generation: u64,
    /// CPU time of all QEMU threads, nanoseconds (cgroup `cpuacct.usage` / `cpu.stat usage_usec`).
    pub cpu_ns: u64,
    /// Integral of the cgroup's memory use over time, MiB-seconds (sampled every second).
    pub memory_mib_s: f64,
    /// Bytes the guest read from its disk (QMP `query-blockstats` `rd_bytes`).
    pub disk_read_bytes: u64,
    /// Bytes the guest wrote to its disk.
    #[serde(default)]
    pub disk_write_bytes: u64,
    /// Bytes fetched from image servers on this VM's behalf (its launch wholly; later fetches
    /// split among the VMs running).
    pub fetched_bytes: u64,
    /// Bytes the VM stores on the host now (its overlay's allocated size).
    pub stored_bytes: u64,
    /// Current memory use of the cgroup, bytes.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Peak memory use of the cgroup, bytes.
    #[serde(default)]
    pub memory_peak_bytes: u64,
    /// The cgroup's memory limit, bytes (0: none).
    #[serde(default)]
    pub memory_limit_bytes: u64,
    /// Times the memory limit was hit, and OOM kills in the group.
    #[serde(default)]
    pub memory_limit_hits: u64,
    #[serde(default)]
    pub oom_kills: u64,
    /// The VM has ended: this is its last report.
    #[serde(default)]
    pub finished: bool,
    /// A guest whose saved RAM is paged in lazily: bytes of that RAM not yet on this host
    /// (fetched when the guest touches them, or by the background fetch); 0 once all are.
    /// `None`: its memory is all local (booted, or loaded whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_remote_bytes: Option<u64>,
}

/// Totals of resource use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageTotals {
    /// CPU time, nanoseconds (the cgroup counter's unit; `cpu_seconds` is the same in seconds).
    pub cpu_ns: u64,
    pub cpu_seconds: f64,
    pub memory_mib_seconds: f64,
    pub disk_read_bytes: u64,
    #[serde(default)]
    pub disk_write_bytes: u64,
    pub fetched_bytes: u64,
    /// Bytes stored: the last figure reported (a gauge, summed over VMs).
    pub stored_bytes: u64,
}

impl UsageTotals {
    pub fn add(&mut self, o: &UsageTotals) {
        self.cpu_ns += o.cpu_ns;
        self.cpu_seconds = self.cpu_ns as f64 / 1e9;
        self.memory_mib_seconds += o.memory_mib_seconds;
        self.disk_read_bytes += o.disk_read_bytes;
        self.disk_write_bytes += o.disk_write_bytes;
        self.fetched_bytes += o.fetched_bytes;
        self.stored_bytes += o.stored_bytes;
    }
}

/// One VM's use.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct VmUsage {
    pub vm: String,
    pub name: String,
    pub user: String,
    pub image: String,
    pub host: String,
    /// First and last report, seconds since the Unix epoch.
    pub first: u64,
    pub last: u64,
    pub usage: UsageTotals,
    /// Memory limit and peak use seen, and limit hits / OOM kills (from the last report).
    #[serde(default)]
    pub memory_limit_bytes: u64,
    #[serde(default)]
    pub memory_peak_bytes: u64,
    #[serde(default)]
    pub memory_limit_hits: u64,
    #[serde(default)]
    pub oom_kills: u64,
    /// From the last report: see [`VmUsageReport::ram_remote_bytes`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_remote_bytes: Option<u64>,
}

/// One user's use.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct UserUsage {
    pub user: String,
    pub vms: u32,
    pub usage: UsageTotals,
}

/// Answer of `GET /api/v1/usage`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct UsageReport {
    /// Start of the period (seconds since the Unix epoch; 0: since the beginning).
    pub since: u64,
    pub users: Vec<UserUsage>,
    pub vms: Vec<VmUsage>,
}
