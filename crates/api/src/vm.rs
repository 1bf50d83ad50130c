//! VM records and the VM bodies of the REST API.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use crate::config::{Accel, BootConfig, ConfigError, Resources, VmConfig};
pub use crate::net::{Forward, NetConfig, Nic};
use crate::ImageRef;

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
    /// Every state, in lifecycle order (the lifecycle table's columns, the metrics' labels).
    pub const ALL: [VmState; 11] = [
        VmState::Pending,
        VmState::Starting,
        VmState::Running,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Failed,
        VmState::Unknown,
        VmState::Suspending,
        VmState::Suspended,
        VmState::Migrating,
        VmState::Lost,
    ];

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
    /// Whether the VM holds host resources (a QEMU process may exist): a state of
    /// [`active_states!`]. (The match is exhaustive, so a new state must join one of the two
    /// lists, and a state in both is an unreachable pattern.)
    pub fn is_active(&self) -> bool {
        match self {
            crate::active_states!() => true,
            crate::inactive_states!() => false,
        }
    }
}

/// Every state in which a VM holds host resources, as a pattern (the lifecycle table matches
/// on it; [`VmState::is_active`] is defined by it): `matches!(s, vgrid_api::active_states!())`.
#[macro_export]
macro_rules! active_states {
    () => {
        $crate::vm::VmState::Pending
            | $crate::vm::VmState::Starting
            | $crate::vm::VmState::Running
            | $crate::vm::VmState::Stopping
            | $crate::vm::VmState::Unknown
            | $crate::vm::VmState::Suspending
            | $crate::vm::VmState::Migrating
    };
}

/// Every state in which a VM holds none: the other states than [`active_states!`].
#[macro_export]
macro_rules! inactive_states {
    () => {
        $crate::vm::VmState::Stopped | $crate::vm::VmState::Failed | $crate::vm::VmState::Suspended | $crate::vm::VmState::Lost
    };
}

/// Body of `POST /api/v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    /// `NAME` or `NAME@VERSION`.
    #[schema(pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}(@[0-9]{1,9})?$")]
    pub image: String,
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")]
    pub name: Option<String>,
    #[serde(default = "default_cpus")]
    #[schema(minimum = 1, maximum = 64)]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[serde(default = "default_memory")]
    #[schema(minimum = 32, maximum = 4194304)]
    pub memory_mib: u64,
    /// TCP port forwards of the user-mode interface.
    #[serde(default)]
    pub forwards: Vec<Forward>,
    /// The network interfaces, in guest order [default: one user-mode interface]: `user`,
    /// `site` (a network of the host's site, an address leased by the coordinator) or `tunnel`
    /// (the user's own LAN). Addresses and MACs are the coordinator's to allocate.
    #[serde(default)]
    #[schema(max_items = 8)]
    pub nics: Vec<Nic>,
    /// `kvm` or `tcg`; chosen by the host when absent.
    #[serde(default)]
    #[schema(pattern = "^(kvm|tcg)$")]
    pub accel: Option<String>,
    /// Requirement over the host ad (CEL), e.g. `host.labels.site == "uf"`; at most 2048 bytes.
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub require: Option<String>,
    /// Rank over the host ad (CEL, higher is better); default: image cached, low load, spread.
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub rank: Option<String>,
    /// Fail at once when no host can take the VM now, instead of queueing it.
    #[serde(default)]
    pub no_wait: bool,
    /// CPU reservation, memory limit and disk throttling (all optional).
    #[serde(default)]
    pub resources: Resources,
    /// Volumes to attach (read-write: at most one VM at a time; `epoch` is the coordinator's).
    #[serde(default)]
    #[schema(max_items = 8)]
    pub volumes: Vec<crate::volume::VolumeAttach>,
    /// Ssh keys, hostname and user-data for a stock cloud image (a NoCloud seed disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<crate::cloudinit::CloudInit>,
    /// The client's own id for this create, so that sending it again (its answer was lost, or
    /// it went to another coordinator) cannot make a second VM: a create whose owner and
    /// `request_id` match an existing VM's is answered with that VM. The VM's id is derived
    /// from them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9_-]{8,64}$")]
    pub request_id: Option<String>,
}

pub fn default_cpus() -> u32 {
    1
}
pub fn default_memory() -> u64 {
    256
}

/// A VM as the coordinator records it: its configuration (as validated at admission) and
/// where and how it runs now.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "crate::record::StoredVmRecord")]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    /// The user who created it (records from before users existed: `anonymous`).
    pub owner: String,
    /// What the VM is: cpus, memory, the image (`NAME@VERSION`, pinned at admission), the
    /// accelerator asked for, resources, networking.
    pub config: VmConfig,
    pub state: VmState,
    /// What the VM is doing now (placing, fetching, booting, ...), for progress displays.
    #[serde(default)]
    pub phase: String,
    /// Why the VM failed, when `state` is `failed`.
    #[serde(default)]
    pub reason: Option<String>,
    pub host: Option<String>,
    /// The accelerator its host runs it with (set at launch).
    #[serde(default)]
    pub accel: Option<Accel>,
    #[serde(default)]
    pub pid: Option<u32>,
    /// The requirement and rank it was placed with (kept so a queued VM survives restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<String>,
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

impl VmRecord {
    /// A new VM `id` of `owner` with `config`, created at `now` (seconds since the epoch):
    /// `pending`, placed nowhere yet.
    pub fn new(id: &str, name: &str, owner: &str, config: VmConfig, now: u64) -> VmRecord {
        VmRecord {
            id: id.to_string(),
            name: name.to_string(),
            owner: owner.to_string(),
            config,
            state: VmState::Pending,
            phase: String::new(),
            reason: None,
            host: None,
            accel: None,
            pid: None,
            require: None,
            rank: None,
            saved_image: None,
            created: now,
            started: None,
            stopped: None,
            state_since: Some(now),
            migration: None,
            ram_remote_bytes: None,
        }
    }

    /// The image the VM runs from now: its saved image once it was suspended (and after it
    /// resumed from it), else the image of its configuration.
    pub fn running_image(&self) -> Result<ImageRef, crate::ManifestError> {
        match &self.saved_image {
            Some(saved) => saved.parse(),
            None => Ok(self.config.boot.image.clone()),
        }
    }
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

/// Body of `POST /api/v1/vms/{id}/resume`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmResume {
    /// Requirement over the host ad (CEL) for the host it resumes on.
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub require: Option<String>,
    /// Resume on this host (a requirement on `host.name`).
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")]
    pub host: Option<String>,
}

/// Body of `POST /api/v1/vms/{id}/snapshot`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    /// Name of the new warm image.
    #[schema(pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")]
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

/// Answer of `POST /api/v1/vms/{id}/suspend`: the record and what was saved.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Suspended {
    pub vm: VmRecord,
    pub saved: SavedImage,
}
