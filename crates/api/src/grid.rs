//! Advertisements of the information service: what hosts ("VM futures") and image servers
//! offer, and what a placement request asks for.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// A compute host's advertisement, refreshed at every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
