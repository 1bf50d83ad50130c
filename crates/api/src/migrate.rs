//! Live migration bodies of the REST API (`POST /api/v1/vms/{id}/migrate`) and the migration
//! status: the one kept in a VM's record, which is also what the source host reports while it
//! sends the VM (`GET /host/v1/vms/{id}/migrate`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Default downtime limit of a migration, in milliseconds (QEMU's own default is 300).
pub const DEFAULT_DOWNTIME_MS: u64 = 100;
/// Default longest a migration may take before it is cancelled, in seconds.
pub const DEFAULT_MAX_SECONDS: u64 = 300;

/// Highest bandwidth cap a migration may name, in MiB/s (1 TiB/s).
pub const MAX_BANDWIDTH_MIB: u64 = 1024 * 1024;

/// Body of `POST /api/v1/vms/{id}/migrate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmMigrate {
    /// Destination host name; any other host that can take the VM when absent.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")]
    pub to: Option<String>,
    /// Longest the guest may be paused at switchover, in ms [default: 100].
    #[serde(default)]
    #[schema(minimum = 1, maximum = 60000)]
    pub downtime_ms: Option<u64>,
    /// Cancel the migration (the VM keeps running at the source) when it has not finished
    /// after this many seconds [default: 300].
    #[serde(default)]
    #[schema(minimum = 1, maximum = 86400)]
    pub max_seconds: Option<u64>,
    /// Bandwidth cap of the memory transfer, in MiB/s [default: QEMU's, 128 MiB/s].
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1048576)]
    pub max_bandwidth_mib: Option<u64>,
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MigrationStatus {
    /// Under way: the disk is being mirrored or memory copied.
    Active,
    /// The destination runs the VM; the source QEMU has quit.
    Completed,
    /// Cancelled (did not converge in time, or asked to): the VM runs on at the source.
    Cancelled,
    /// Failed: the VM runs on at the source (`error` says what failed).
    Failed,
}

impl MigrationStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            MigrationStatus::Active => "active",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Failed => "failed",
        }
    }
}

/// A VM's last (or current) live migration, as recorded by the coordinator; also the source
/// host's view of it (QEMU's figures, phase and status), which the coordinator copies into the
/// record as the migration goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Migration {
    pub from: String,
    pub to: String,
    pub status: MigrationStatus,
    /// What it is doing now: `preparing destination`, `mirroring disk`, `copying memory`,
    /// `switching over`, ...
    #[serde(default)]
    pub phase: String,
    pub downtime_limit_ms: u64,
    pub max_seconds: u64,
    /// Seconds since the Unix epoch.
    pub started: u64,
    #[serde(default)]
    pub finished: Option<u64>,
    /// How long the guest was paused (QEMU's `query-migrate` `downtime`).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Memory migration time (QEMU's `total-time`).
    #[serde(default)]
    pub total_ms: Option<u64>,
    /// The whole operation, destination preparation and disk mirror included (in a source
    /// host's status: since the source started sending).
    #[serde(default)]
    pub elapsed_ms: Option<u64>,
    /// Guest disk bytes the mirror copied (the overlay's data).
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// Memory bytes sent so far.
    #[serde(default)]
    pub ram_transferred_bytes: Option<u64>,
    #[serde(default)]
    pub ram_remaining_bytes: Option<u64>,
    /// Memory passes (1 = no page had to be sent twice).
    #[serde(default)]
    pub dirty_sync_count: Option<u64>,
    /// The CPU throttle auto-converge applied, in percent.
    #[serde(default)]
    pub cpu_throttle_percentage: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
}

impl Migration {
    /// A migration from `from` to `to` that starts now (`started`, seconds since the epoch):
    /// active, no figures yet.
    pub fn begin(from: &str, to: &str, downtime_limit_ms: u64, max_seconds: u64, started: u64) -> Migration {
        Migration {
            from: from.to_string(),
            to: to.to_string(),
            status: MigrationStatus::Active,
            phase: "preparing the destination".into(),
            downtime_limit_ms,
            max_seconds,
            started,
            finished: None,
            downtime_ms: None,
            total_ms: None,
            elapsed_ms: None,
            disk_bytes: None,
            ram_transferred_bytes: None,
            ram_remaining_bytes: None,
            dirty_sync_count: None,
            cpu_throttle_percentage: None,
            error: None,
        }
    }
}
