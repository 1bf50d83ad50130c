//! The host agent's API (`/host/v1`), spoken by the coordinator, and the host's heartbeat to
//! the coordinator (`POST /api/v1/hosts/heartbeat`): launch, reports, exits, saving, live
//! migration, and the timeouts both sides count on.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::grid::HostAd;
pub use crate::grid::VmReport;
use crate::net::Forward;
use crate::usage::VmUsageReport;
use crate::vm::{Accel, Resources, VmConfig};
use crate::ImageRef;

/// Default heartbeat interval; a host is lost after [`LOST_AFTER_BEATS`] missed ones.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
pub const LOST_AFTER_BEATS: u32 = 3;
/// How long a guest gets to obey the ACPI power button before QEMU is told to quit.
pub const POWERDOWN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long QEMU may take to write a guest's state (snapshot, suspend).
pub const SAVE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long QEMU may take to load a saved state (resume, a warm image).
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);
/// At most this much console history travels with a migration (its tail), in bytes.
pub const MAX_CONSOLE_HISTORY: usize = 4 << 20;

/// What the coordinator asks a host to start (`POST /host/v1/vms`): the VM's configuration as
/// recorded, and for a resume the saved image to restore instead of booting
/// `config.boot.image`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "StoredLaunch")]
pub struct LaunchRequest {
    /// The VM's id: 1-64 characters of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
    #[schema(pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")]
    pub id: String,
    pub config: VmConfig,
    /// The saved image (`NAME@VERSION`) to restore from, when resuming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<ImageRef>,
}

impl LaunchRequest {
    /// The image the host instantiates: the saved one when restoring, else the configured one.
    pub fn image(&self) -> &ImageRef {
        self.restore.as_ref().unwrap_or(&self.config.boot.image)
    }
}

/// A launch request in either shape: the current one, or the flat one of earlier versions
/// (which hosts kept as `launch.json` next to their VMs, read again after an upgrade).
#[derive(Deserialize)]
struct StoredLaunch {
    id: String,
    #[serde(default)]
    config: Option<VmConfig>,
    #[serde(default)]
    restore: Option<ImageRef>,
    #[serde(default)]
    image: Option<ImageRef>,
    #[serde(default)]
    cpus: Option<u32>,
    #[serde(default)]
    memory_mib: Option<u64>,
    #[serde(default)]
    forwards: Vec<(u16, u16)>,
    #[serde(default)]
    accel: Option<Accel>,
    #[serde(default)]
    resources: Resources,
}

impl TryFrom<StoredLaunch> for LaunchRequest {
    type Error = String;

    fn try_from(l: StoredLaunch) -> Result<LaunchRequest, String> {
        let config = match (l.config, l.image, l.cpus, l.memory_mib) {
            (Some(c), ..) => c,
            (None, Some(image), Some(cpus), Some(memory_mib)) => VmConfig::new(image)
                .with_cpus(cpus)
                .with_memory_mib(memory_mib)
                .with_accel(l.accel)
                .with_resources(l.resources)
                .with_forwards(l.forwards.into_iter().map(|(host, guest)| Forward { host, guest }).collect()),
            _ => return Err("a launch request needs a `config` (or the `image`, `cpus` and `memory_mib` of earlier versions)".into()),
        };
        Ok(LaunchRequest { id: l.id, config, restore: l.restore })
    }
}

/// Answer to a launch (and to the end of an incoming migration): QEMU runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Launched {
    pub pid: u32,
    pub accel: Accel,
}

/// How a QEMU process ended. Both fields `None`: unknown (an adopted VM is not the agent's
/// child).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// An exit whose status nobody knows.
    pub fn unknown() -> ExitInfo {
        ExitInfo { code: None, signal: None }
    }

    /// Exit code 0: the guest powered off.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Names of Linux's signals 1-31 (x86 and ARM numbering).
const SIGNALS: [&str; 31] = [
    "SIGHUP",
    "SIGINT",
    "SIGQUIT",
    "SIGILL",
    "SIGTRAP",
    "SIGABRT",
    "SIGBUS",
    "SIGFPE",
    "SIGKILL",
    "SIGUSR1",
    "SIGSEGV",
    "SIGUSR2",
    "SIGPIPE",
    "SIGALRM",
    "SIGTERM",
    "SIGSTKFLT",
    "SIGCHLD",
    "SIGCONT",
    "SIGSTOP",
    "SIGTSTP",
    "SIGTTIN",
    "SIGTTOU",
    "SIGURG",
    "SIGXCPU",
    "SIGXFSZ",
    "SIGVTALRM",
    "SIGPROF",
    "SIGWINCH",
    "SIGIO",
    "SIGPWR",
    "SIGSYS",
];

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => {
                let name = usize::try_from(s).ok().and_then(|i| i.checked_sub(1)).and_then(|i| SIGNALS.get(i)).unwrap_or(&"?");
                write!(f, "killed by signal {s} ({name})")
            }
            (None, None) => f.write_str("exit status unknown"),
        }
    }
}

/// How a VM's QEMU ended (`GET /host/v1/vms/{id}/wait`), with the last console lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmExit {
    pub exit: ExitInfo,
    pub console_tail: Vec<String>,
    /// What the host knows of the cause (e.g. its memory limit), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// Whether this host had the VM (false: it does not know it, e.g. it restarted without it).
    #[serde(default)]
    pub present: bool,
}

/// A line of `POST /host/v1/pull/{image}`'s NDJSON answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PullProgress {
    #[serde(default)]
    pub image: Option<String>,
    pub done: u64,
    pub total: u64,
    #[serde(default)]
    pub fetched_bytes: u64,
    #[serde(default)]
    pub seconds: f64,
    #[serde(default)]
    pub finished: bool,
    #[serde(default)]
    pub error: Option<String>,
}

/// Per-VM usage counters (as in the heartbeat), the host load and its prediction
/// (`GET /host/v1/usage`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostUsage {
    pub vms: Vec<VmUsageReport>,
    pub load_now: f64,
    pub load_predicted: f64,
    /// The owner's CPU cap in cores (0: uncapped).
    pub cpu_cap: f64,
    pub free_cpu_share: f64,
    /// `v1`, `v2`, or empty without cgroups.
    pub cgroups: String,
}

/// Body of `POST /host/v1/vms/{id}/snapshot` and `/suspend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SaveRequest {
    /// Name of the image to create (a new version of it if it exists).
    #[schema(pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")]
    pub name: String,
}

/// `GET /host/v1/vms/{id}/saving`: what the host knows of one VM while it may be saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(from = "StoredPresence")]
pub struct VmPresence {
    /// A snapshot or suspend of the VM is in progress.
    pub saving: bool,
    /// Its QEMU runs.
    pub running: bool,
    /// Launching (admitted) or present on the host.
    pub known: bool,
    /// Its QEMU ran and has exited (the host keeps the VM until it is released): a launch
    /// that happened, whose end `GET /host/v1/vms/{id}/wait` tells.
    pub exited: bool,
}

#[derive(Deserialize)]
struct StoredPresence {
    saving: bool,
    running: bool,
    /// Absent from agents that predate it: such an agent knows a VM it runs.
    #[serde(default)]
    known: Option<bool>,
    #[serde(default)]
    exited: bool,
}

impl From<StoredPresence> for VmPresence {
    fn from(p: StoredPresence) -> VmPresence {
        VmPresence { saving: p.saving, running: p.running, known: p.known.unwrap_or(p.running), exited: p.exited }
    }
}

/// `POST /host/v1/migrate/incoming`: prepare to receive a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct IncomingRequest {
    /// The VM as the source runs it (same image version, cpus, memory, forwards, accel).
    pub launch: LaunchRequest,
    /// The address QEMU listens on for the disk and memory streams (this host's address as
    /// the source reaches it).
    pub listen_host: String,
}

/// Answer to [`IncomingRequest`]: where the source sends the disk and the memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IncomingReady {
    pub host: String,
    pub nbd_port: u16,
    pub migration_port: u16,
    pub pid: u32,
    pub accel: Accel,
}

/// `POST /host/v1/vms/{id}/migrate`: send a VM to a prepared destination. The source answers
/// (and `GET` polls) with a [`crate::migrate::Migration`]: the same status the record keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SendRequest {
    pub dest: IncomingReady,
    /// The destination host's name (for the status the source reports).
    #[serde(default)]
    pub to: String,
    pub downtime_ms: u64,
    pub max_seconds: u64,
    #[serde(default)]
    pub max_bandwidth_mib: Option<u64>,
}

/// Body of `POST /host/v1/migrate/incoming/{id}/finish`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FinishRequest {
    /// The console log the VM had at the source.
    #[serde(default)]
    pub console_history: String,
}

/// Body of `POST /api/v1/hosts/heartbeat`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostHeartbeat {
    pub ad: HostAd,
    /// VMs the host runs.
    #[serde(default)]
    pub vms: Vec<VmReport>,
    /// Per-VM cumulative usage counters (running VMs, and the last report of ended ones).
    #[serde(default)]
    pub usage: Vec<VmUsageReport>,
    /// VMs whose reads wait for unreachable image servers now (absent from older agents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<VmWaiting>,
}

/// A VM whose guest's reads (of its disk, or of its lazily restored RAM) wait for unreachable
/// image servers: it stalls until one answers, or until its host's `--fetch-timeout` passes
/// (then the read fails with an I/O error). The coordinator shows it as the VM's phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmWaiting {
    /// The VM's id.
    pub vm: String,
    /// The image version whose chunks it waits for (`NAME@VERSION`).
    pub image: String,
    /// The image servers that failed at the last try.
    pub servers: Vec<String>,
    /// Chunks waited for.
    pub chunks: u32,
    /// How long the longest of those waits has lasted, in seconds.
    pub waiting_secs: u64,
}

/// Answer to a heartbeat (of a host or an image server): when to beat again and which image
/// servers to read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatReply {
    #[serde(default = "default_interval_secs")]
    pub interval_secs: u64,
    #[serde(default)]
    pub image_servers: Vec<String>,
    /// The definitions of the site networks the host advertised: what its DHCP answers with.
    #[serde(default)]
    pub networks: Vec<crate::net::Network>,
}

fn default_interval_secs() -> u64 {
    HEARTBEAT_INTERVAL.as_secs()
}

#[cfg(test)]
mod tests;
