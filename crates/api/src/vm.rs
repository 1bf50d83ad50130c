//! VM and host records of the REST API.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Lifecycle of a VM: `pending → starting → running → stopping → stopped`, or `failed`;
/// `unknown` while its host is silent, `migrating` while it moves live, `lost` when its host
/// no longer has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Accepted, not yet placed on a host.
    Pending,
    /// Placed; the host is opening the image and starting QEMU.
    Starting,
    Running,
    Stopping,
    Stopped,
    /// Failed to start or died; `VmRecord::reason` says why.
    Failed,
    /// Its host stopped answering; it may still run there.
    Unknown,
    /// Its state and disk are being saved to the image servers (`vgrid vm suspend`).
    Suspending,
    /// Saved on the image servers (`VmRecord::saved_image`); holds no host. `vgrid vm resume`
    /// restores it on any matching host.
    Suspended,
    /// Moving live to another host (`VmRecord::migration` says where and how far); it keeps
    /// running on `host` until the destination runs it.
    Migrating,
    /// Its host answers but no longer has it (the host restarted without it, or QEMU vanished).
    Lost,
}

impl VmState {
    pub fn as_str(&self) -> &'static str {
        match self {
            VmState::Pending => "pending",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
            VmState::Unknown => "unknown",
            VmState::Suspending => "suspending",
            VmState::Suspended => "suspended",
            VmState::Migrating => "migrating",
            VmState::Lost => "lost",
        }
    }
    /// Whether the VM holds host resources (a QEMU process may exist).
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            VmState::Pending
                | VmState::Starting
                | VmState::Running
                | VmState::Stopping
                | VmState::Unknown
                | VmState::Suspending
                | VmState::Migrating
        )
    }
}

/// A host port forwarded to a guest port over user-mode networking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Forward {
    pub host: u16,
    pub guest: u16,
}

impl std::str::FromStr for Forward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (h, g) = s.split_once(':').ok_or_else(|| format!("invalid forward {s:?}: expected HOSTPORT:GUESTPORT"))?;
        let port = |p: &str| {
            p.parse::<u16>().ok().filter(|&v| v != 0).ok_or_else(|| format!("invalid port {p:?} in forward {s:?}: expected 1-65535"))
        };
        Ok(Forward { host: port(h)?, guest: port(g)? })
    }
}

/// Body of `POST /api/v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    /// `NAME` or `NAME@VERSION`.
    pub image: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default)]
    pub forwards: Vec<Forward>,
    /// `kvm` or `tcg`; chosen by the host when absent.
    #[serde(default)]
    pub accel: Option<String>,
    /// Requirement over the host ad (CEL), e.g. `host.labels.site == "uf"`.
    #[serde(default)]
    pub require: Option<String>,
    /// Rank over the host ad (CEL, higher is better); default: image cached, low load, spread.
    #[serde(default)]
    pub rank: Option<String>,
    /// Fail at once when no host can take the VM now, instead of queueing it.
    #[serde(default)]
    pub no_wait: bool,
    /// CPU reservation, memory limit and disk throttling (all optional).
    #[serde(default)]
    pub resources: Resources,
}

/// Resource control of one VM, enforced by its host (cgroups and QEMU throttle groups).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU reservation as a fraction of one core (e.g. 0.2), over all of QEMU's threads:
    /// CFS bandwidth `share * period` per period. Exclusive with `cpu_slice_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_share: Option<f64>,
    /// CPU reservation as VSched's (slice, period): `cpu_slice_ms` of CPU time every
    /// `cpu_period_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_slice_ms: Option<u64>,
    /// The reservation's period [default 100 ms].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_period_ms: Option<u64>,
    /// Limit on QEMU's whole memory in MiB [default: the guest's memory plus the measured
    /// QEMU overhead].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mib: Option<u64>,
    /// Guest disk bandwidth limit, bytes per second (reads and writes together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bps: Option<u64>,
    /// Guest disk operations per second limit (reads and writes together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_iops: Option<u64>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }

    /// The reserved CPU in cores (`cpu_share`, or slice / period), 0 when none.
    pub fn cpu_cores(&self) -> f64 {
        match (self.cpu_share, self.cpu_slice_ms) {
            (Some(s), _) => s,
            (None, Some(sl)) => sl as f64 / self.cpu_period_ms.unwrap_or(100).max(1) as f64,
            _ => 0.0,
        }
    }
}

pub fn default_cpus() -> u32 {
    1
}
pub fn default_memory() -> u64 {
    256
}

/// A VM as the coordinator records it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    /// The user who created it (records from before users existed: `anonymous`).
    #[serde(default = "anonymous")]
    pub owner: String,
    /// The image as requested.
    pub image: String,
    /// The image version resolved at placement.
    #[serde(default)]
    pub image_version: Option<u32>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub forwards: Vec<Forward>,
    pub state: VmState,
    /// What the VM is doing now (placing, fetching, booting, ...), for progress displays.
    #[serde(default)]
    pub phase: String,
    /// Why the VM failed, when `state` is `failed`.
    #[serde(default)]
    pub reason: Option<String>,
    pub host: Option<String>,
    #[serde(default)]
    pub accel: Option<String>,
    #[serde(default)]
    pub pid: Option<u32>,
    /// The requirement and rank it was placed with (kept so a queued VM survives restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<String>,
    /// Resource control it was started with.
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    /// The image (`NAME@VERSION`) holding this VM's saved state and disk, while it is
    /// suspended and after it resumed from it (its disk's base then); deleted with the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_image: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    #[serde(default)]
    pub started: Option<u64>,
    #[serde(default)]
    pub stopped: Option<u64>,
    /// When the VM entered its current state (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_since: Option<u64>,
    /// The last (or current) live migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::migrate::Migration>,
    /// A running guest whose saved RAM is paged in lazily: bytes of it its host does not have
    /// yet (from the host's last report; 0: the guest no longer needs the image server).
    /// Filled in answers, not stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_remote_bytes: Option<u64>,
}

/// Body of `POST /api/v1/vms/{id}/stop`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmStop {
    /// Kill QEMU at once instead of an ACPI power-down.
    #[serde(default)]
    pub force: bool,
}

/// A page of a VM's console log: `GET /api/v1/vms/{id}/console?offset=N`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConsoleChunk {
    /// Offset of `data` in the log.
    pub offset: u64,
    /// Offset to ask for next.
    pub next: u64,
    /// Console output (lossy UTF-8).
    pub data: String,
}

fn anonymous() -> String {
    "anonymous".into()
}

/// Body of `POST /api/v1/vms/{id}/resume`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmResume {
    /// Requirement over the host ad (CEL) for the host it resumes on.
    #[serde(default)]
    pub require: Option<String>,
    /// Resume on this host (a requirement on `host.name`).
    #[serde(default)]
    pub host: Option<String>,
}

/// Body of `POST /api/v1/vms/{id}/snapshot`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    /// Name of the new warm image.
    pub name: String,
}

/// What saving a VM (snapshot or suspend) stored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SavedImage {
    /// `NAME@VERSION` of the new image.
    pub image: String,
    /// The image it was derived from.
    pub parent: Option<String>,
    /// Bytes of the saved memory state.
    pub state_bytes: u64,
    /// Disk chunks the guest changed (new in this image) and all disk chunks.
    pub disk_chunks_new: u64,
    pub disk_chunks_total: u64,
    /// Bytes sent to the image server (compressed chunks it lacked).
    pub uploaded_bytes: u64,
    /// Seconds the guest was paused / the whole operation took.
    pub paused_secs: f64,
    pub total_secs: f64,
}
