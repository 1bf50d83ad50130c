//! Advertisements of the information service: what hosts ("VM futures") and image servers
//! offer, and what a placement request asks for.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// A compute host's advertisement, refreshed at every heartbeat. `Default` is an empty ad (no
/// name, no capacity), for tests to fill in what they need.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostAd {
    /// Unique host name.
    pub name: String,
    /// Base URL of the host agent's API.
    pub url: String,
    pub arch: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub free_cpus: u32,
    pub free_memory_mib: u64,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub qemu_version: String,
    /// e.g. `["user"]`.
    #[serde(default)]
    pub network_modes: Vec<String>,
    /// The site networks the host is attached to (`vgrid host --network NAME=BRIDGE`).
    #[serde(default)]
    pub networks: Vec<String>,
    /// Free-form labels: site, domain, ...
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The host owner's requirement over requests (CEL over `request`), if any.
    #[serde(default)]
    pub policy: Option<String>,
    /// 1-minute load average.
    #[serde(default)]
    pub load_avg: f64,
    #[serde(default)]
    pub running_vms: u32,
    /// For each image (`NAME@VERSION`), the fraction of its chunks in the host cache (0..=1).
    #[serde(default)]
    pub image_cache: BTreeMap<String, f64>,
    /// CPU cores busy during the last second (sampled every second from /proc/stat).
    #[serde(default)]
    pub load_now: f64,
    /// Mean of the cores predicted busy over the next 30 s (AR(16) model of the samples).
    #[serde(default)]
    pub load_predicted: f64,
    /// The owner's CPU cap for all guests together, in cores (`--max-share` times the host's
    /// CPUs); 0 when uncapped.
    #[serde(default)]
    pub cpu_cap: f64,
    /// Cores of the cap not yet reserved by guests (`cpu_share` reservations).
    #[serde(default)]
    pub free_cpu_share: f64,
    /// Cgroup version used for resource control (`v1`, `v2`), empty when unavailable.
    #[serde(default)]
    pub cgroups: String,
}

/// An image server's advertisement.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageServerAd {
    pub name: String,
    pub url: String,
    pub images: Vec<crate::rest::ImageSummary>,
}

/// What a placement is asked for; `request.*` in CEL expressions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlacementRequest {
    pub user: String,
    /// `NAME@VERSION`.
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// CPU reservation in cores (0: none); admitted only within a host's `free_cpu_share`.
    #[serde(default)]
    pub cpu_share: f64,
    /// The user's requirement (CEL over `host`), if any.
    #[serde(default)]
    pub require: Option<String>,
    /// The user's rank (CEL over `host`, higher is better), if any.
    #[serde(default)]
    pub rank: Option<String>,
}

/// A host's state in the information service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    Ready,
    Lost,
}

/// A host as the coordinator knows it (`GET /api/v1/hosts`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostRecord {
    pub ad: HostAd,
    pub state: HostState,
    /// Seconds since its last heartbeat.
    pub last_seen_secs: f64,
    pub vms: Vec<VmReport>,
    /// QEMUs the host runs that the coordinator has no record of (never killed by vgrid:
    /// an operator decides).
    #[serde(default)]
    pub orphans: Vec<String>,
    /// Taken out of service (`vgrid host drain`): no new placement; its VMs are moved away.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// A host's drain (`POST /api/v1/hosts/{name}/drain`): the host gets no new placement and each
/// of its VMs is live-migrated to a host that can take it, else suspended to the image servers.
/// Kept in the coordinator's state: a restarted coordinator goes on with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Drain {
    pub host: String,
    /// Seconds since the Unix epoch.
    pub started: u64,
    /// When every VM of the host was handled (the agent may be stopped then).
    #[serde(default)]
    pub finished: Option<u64>,
    /// The host's VMs, in the order they are handled.
    #[serde(default)]
    pub vms: Vec<DrainedVm>,
}

impl Drain {
    /// VMs still on the host because moving them failed.
    pub fn failed(&self) -> impl Iterator<Item = &DrainedVm> {
        self.vms.iter().filter(|v| v.step == DrainStep::Failed)
    }
}

/// One VM of a draining host and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrainedVm {
    pub id: String,
    pub name: String,
    pub step: DrainStep,
    /// The host it moved to (`migrating`, `migrated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The saved image (`suspended`), why it was not migrated (`suspending`, `suspended`: no
    /// host could take it, the migration failed) or why nothing worked (`failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Where one VM of a drain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DrainStep {
    Waiting,
    Migrating,
    Migrated,
    Suspending,
    Suspended,
    Failed,
}

impl DrainStep {
    /// Whether the VM is handled (it left the host, or could not).
    pub fn done(self) -> bool {
        matches!(self, DrainStep::Migrated | DrainStep::Suspended | DrainStep::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DrainStep::Waiting => "waiting",
            DrainStep::Migrating => "migrating",
            DrainStep::Migrated => "migrated",
            DrainStep::Suspending => "suspending",
            DrainStep::Suspended => "suspended",
            DrainStep::Failed => "failed",
        }
    }
}

/// Body of `POST /api/v1/futures`: a VM like this one.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FuturesQuery {
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub require: Option<String>,
    #[serde(default = "crate::vm::default_cpus")]
    #[schema(minimum = 1, maximum = 64)]
    pub cpus: u32,
    #[serde(default = "crate::vm::default_memory")]
    #[schema(minimum = 32, maximum = 4194304)]
    pub memory_mib: u64,
    /// `NAME[@VERSION]`: also check the image's architecture.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}(@[0-9]{1,9})?$")]
    pub image: Option<String>,
    /// The network interfaces the VM would have: a site interface needs a host attached to its
    /// network (`"NET" in host.networks`, named in the refusals).
    #[serde(default)]
    #[schema(max_items = 8)]
    pub nics: Vec<crate::net::Nic>,
}

/// One host's answer to a futures query.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Future {
    pub host: String,
    pub state: HostState,
    pub could_start: bool,
    pub why_not: Option<String>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A host advertisement for tests.
    pub(crate) fn ad(name: &str) -> HostAd {
        HostAd {
            name: name.into(),
            url: format!("https://{name}:7072"),
            arch: "x86_64".into(),
            cpus: 4,
            memory_mib: 4096,
            free_cpus: 4,
            free_memory_mib: 4096,
            accel: "tcg".into(),
            qemu_version: "10.0.2".into(),
            network_modes: vec!["user".into()],
            ..HostAd::default()
        }
    }

    #[test]
    fn host_records_and_futures_round_trip() {
        let h = HostRecord {
            ad: ad("h1"),
            state: HostState::Lost,
            last_seen_secs: 1.5,
            vms: vec![],
            orphans: vec!["vm-x".into()],
            draining: false,
        };
        let j = serde_json::to_value(&h).unwrap();
        assert_eq!(j["state"], "lost");
        let back: HostRecord = serde_json::from_value(j).unwrap();
        assert_eq!((back.ad, back.orphans), (h.ad, h.orphans));
        let q: FuturesQuery = serde_json::from_str("{}").unwrap();
        assert_eq!((q.cpus, q.memory_mib), (1, 256));
        let f = Future { host: "h1".into(), state: HostState::Ready, could_start: false, why_not: Some("x".into()) };
        assert_eq!(serde_json::to_value(&f).unwrap()["state"], "ready");
    }
}

/// A VM a host runs, as reported in its heartbeat (and `GET /host/v1/vms`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmReport {
    pub id: String,
    pub pid: u32,
    /// Being received by a live migration (not yet this host's: the coordinator's record
    /// still names the source).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incoming: bool,
}

/// One image version of the grid (`GET /api/v1/images`): as its image servers advertise it,
/// with the names of the servers that have it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GridImage {
    #[serde(flatten)]
    pub image: crate::rest::ImageSummary,
    /// The image servers that have this version.
    pub servers: Vec<String>,
}
