//! One VM configuration, validated once: [`VmConfig`] is built from a `POST /api/v1/vms` body by
//! [`VmCreate::validate`], embedded unchanged in the coordinator's record
//! ([`crate::vm::VmRecord::config`]) and in the launch request a host receives
//! ([`crate::host::LaunchRequest::config`]); the host derives QEMU's arguments from it. Every
//! static check of a VM's shape lives here, with errors that name the field and the allowed
//! range; checks that need the world (the image exists, a port is free, KVM works on this host)
//! stay with the role that can make them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::manifest::{validate_name, ImageRef, ManifestError};
use crate::net::{Forward, NetConfig, NetError};
use crate::vm::VmCreate;

/// The CFS period used when a CPU share is given without a period, in microseconds.
pub const DEFAULT_CPU_PERIOD_US: u64 = 100_000;
/// Most vCPUs a VM may have.
pub const MAX_CPUS: u32 = 64;
/// Least guest memory, in MiB (the most is what a host has: the scheduler's answer).
pub const MIN_MEMORY_MIB: u64 = 32;
/// Most guest memory (and memory limit) a request may name, in MiB (4 TiB, the most a host
/// starts a guest with).
pub const MAX_MEMORY_MIB: u64 = 4 * 1024 * 1024;
/// Least memory limit QEMU runs in, in MiB.
pub const MIN_MEMORY_LIMIT_MIB: u64 = 16;

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The name QEMU's `-accel` option takes.
    pub fn as_str(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Accel {
    type Err = ConfigError;
    /// `kvm` or `tcg`, in any case.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s.to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(ConfigError::Accel { value: s.to_string() }),
        }
    }
}

/// What is wrong with a VM's configuration. Each error names the field and what is allowed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Image(#[from] ManifestError),
    #[error("cpus {value} is out of range 1-{MAX_CPUS}")]
    Cpus { value: u32 },
    #[error("memory {value} MiB is too small: at least {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall { value: u64 },
    #[error("memory {value} MiB is too large: at most {MAX_MEMORY_MIB} MiB")]
    MemoryTooLarge { value: u64 },
    #[error("accel {value:?}: expected kvm or tcg")]
    Accel { value: String },
    #[error("invalid VM name {value:?}: use 1-64 characters of A-Z a-z 0-9 . _ -")]
    Name { value: String },
    #[error("invalid request_id {value:?}: use 8-64 characters of A-Z a-z 0-9 _ -")]
    RequestId { value: String },
    #[error(transparent)]
    Reservation(#[from] ReservationError),
    #[error("memory limit {value} MiB is out of range {MIN_MEMORY_LIMIT_MIB}-{MAX_MEMORY_MIB} MiB")]
    MemoryLimit { value: u64 },
    #[error("disk limits must be positive (leave them out for no limit)")]
    DiskLimits,
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    #[error(transparent)]
    CloudInit(#[from] crate::cloudinit::CloudInitError),
}

/// A CPU reservation that cannot be enforced as given.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReservationError {
    #[error("give either a CPU share or a (slice, period) reservation, not both")]
    Both,
    #[error("CPU share {share} is out of range: more than 0, at most 64 cores")]
    ShareRange { share: f64 },
    #[error("CPU share {share} of a {period_ms} ms period is under the kernel's 1 ms minimum slice")]
    ShareTooSmall { share: f64, period_ms: u64 },
    #[error("a CPU slice needs a period (--cpu-period MS)")]
    SliceNeedsPeriod,
    #[error("a CPU slice must be at least 1 ms")]
    SliceTooSmall,
    #[error("CPU slice {slice_ms} ms is more than 64 cores' worth of the {period_ms} ms period")]
    SliceTooLarge { slice_ms: u64, period_ms: u64 },
    #[error("a CPU period needs a slice (--cpu-slice MS)")]
    PeriodNeedsSlice,
    #[error("CPU period {period_ms} ms is out of range 1-1000 ms")]
    Period { period_ms: u64 },
}

/// Resource control of one VM, enforced by its host (cgroups and QEMU throttle groups).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU reservation as a fraction of one core (e.g. 0.2), over all of QEMU's threads:
    /// CFS bandwidth `share * period` per period. Exclusive with `cpu_slice_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0, maximum = 64)]
    pub cpu_share: Option<f64>,
    /// CPU reservation as VSched's (slice, period): `cpu_slice_ms` of CPU time every
    /// `cpu_period_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64000)]
    pub cpu_slice_ms: Option<u64>,
    /// The reservation's period [default 100 ms].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000)]
    pub cpu_period_ms: Option<u64>,
    /// Limit on QEMU's whole memory in MiB [default: the guest's memory plus the measured
    /// QEMU overhead].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 16, maximum = 4194304)]
    pub memory_limit_mib: Option<u64>,
    /// Guest disk bandwidth limit, bytes per second (reads and writes together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub disk_bps: Option<u64>,
    /// Guest disk operations per second limit (reads and writes together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
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

    /// The CPU reservation as CFS bandwidth: `(quota_us, period_us)` from a share of one core
    /// or from VSched's (slice, period); `None` when there is none.
    pub fn reservation(&self) -> Result<Option<(u64, u64)>, ReservationError> {
        reservation(self.cpu_share, self.cpu_slice_ms, self.cpu_period_ms)
    }

    /// Static checks: the CPU reservation, the memory limit, the disk limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.reservation()?;
        if let Some(m) = self.memory_limit_mib.filter(|m| !(MIN_MEMORY_LIMIT_MIB..=MAX_MEMORY_MIB).contains(m)) {
            return Err(ConfigError::MemoryLimit { value: m });
        }
        if self.disk_bps == Some(0) || self.disk_iops == Some(0) {
            return Err(ConfigError::DiskLimits);
        }
        Ok(())
    }
}

/// A CPU reservation: `slice` of CPU time every `period` (VSched's (slice, period)), or a
/// share of one core. Returns (quota_us, period_us).
pub fn reservation(share: Option<f64>, slice_ms: Option<u64>, period_ms: Option<u64>) -> Result<Option<(u64, u64)>, ReservationError> {
    match (share, slice_ms, period_ms) {
        (None, None, None) => Ok(None),
        (Some(_), Some(_), _) => Err(ReservationError::Both),
        (Some(s), None, p) => {
            if !(s.is_finite() && s > 0.0 && s <= 64.0) {
                return Err(ReservationError::ShareRange { share: s });
            }
            let period_us = p.map(|p| p.saturating_mul(1000)).unwrap_or(DEFAULT_CPU_PERIOD_US);
            check_period(period_us)?;
            let quota = (s * period_us as f64).round() as u64;
            if quota < 1000 {
                return Err(ReservationError::ShareTooSmall { share: s, period_ms: period_us / 1000 });
            }
            Ok(Some((quota, period_us)))
        }
        (None, Some(sl), p) => {
            let period_us = p.ok_or(ReservationError::SliceNeedsPeriod)?.saturating_mul(1000);
            check_period(period_us)?;
            let quota = sl.saturating_mul(1000);
            if quota < 1000 {
                return Err(ReservationError::SliceTooSmall);
            }
            if quota > 64 * period_us {
                return Err(ReservationError::SliceTooLarge { slice_ms: sl, period_ms: period_us / 1000 });
            }
            Ok(Some((quota, period_us)))
        }
        (None, None, Some(_)) => Err(ReservationError::PeriodNeedsSlice),
    }
}

fn check_period(period_us: u64) -> Result<(), ReservationError> {
    if !(1000..=1_000_000).contains(&period_us) {
        return Err(ReservationError::Period { period_ms: period_us / 1000 });
    }
    Ok(())
}

/// How a VM boots: the image it instantiates (`NAME@VERSION` once admitted: the coordinator
/// pins the version it resolved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BootConfig {
    pub image: ImageRef,
}

/// A VM's configuration: what it is, as opposed to where and how it runs now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmConfig {
    #[schema(minimum = 1, maximum = 64)]
    pub cpus: u32,
    #[schema(minimum = 32, maximum = 4194304)]
    pub memory_mib: u64,
    /// The accelerator asked for; the host's choice (KVM where usable) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    pub boot: BootConfig,
    /// CPU reservation, memory limit and disk throttling.
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    #[serde(default)]
    pub net: NetConfig,
    /// Volumes attached as extra virtio disks, in guest order after the image's disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::volume::VolumeAttach>,
    /// A cloud-init NoCloud seed disk for stock cloud images (last of the guest's disks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<crate::cloudinit::CloudInit>,
}

impl VmConfig {
    /// A VM of `image` with the defaults: 1 cpu, 256 MiB, the host's accelerator, no resource
    /// control, one user-mode interface without forwards.
    pub fn new(image: ImageRef) -> VmConfig {
        VmConfig {
            cpus: crate::vm::default_cpus(),
            memory_mib: crate::vm::default_memory(),
            accel: None,
            boot: BootConfig { image },
            resources: Resources::default(),
            net: NetConfig::default(),
            volumes: Vec::new(),
            cloud_init: None,
        }
    }

    pub fn with_cpus(mut self, cpus: u32) -> VmConfig {
        self.cpus = cpus;
        self
    }

    pub fn with_memory_mib(mut self, memory_mib: u64) -> VmConfig {
        self.memory_mib = memory_mib;
        self
    }

    pub fn with_accel(mut self, accel: Option<Accel>) -> VmConfig {
        self.accel = accel;
        self
    }

    pub fn with_resources(mut self, resources: Resources) -> VmConfig {
        self.resources = resources;
        self
    }

    /// One user-mode interface with these forwards.
    pub fn with_forwards(mut self, forwards: Vec<Forward>) -> VmConfig {
        self.net = NetConfig::user(forwards);
        self
    }

    /// The image the VM boots.
    pub fn image(&self) -> &ImageRef {
        &self.boot.image
    }

    /// Every static check: cpus, memory, the image name, resources, networking.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_cpus(self.cpus)?;
        check_memory(self.memory_mib)?;
        validate_name(&self.boot.image.name)?;
        self.resources.validate()?;
        crate::volume::validate_all(&self.volumes)?;
        if let Some(c) = &self.cloud_init {
            c.validate()?;
        }
        Ok(self.net.validate()?)
    }
}

/// 1 to [`MAX_CPUS`] vCPUs.
pub fn check_cpus(cpus: u32) -> Result<(), ConfigError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(ConfigError::Cpus { value: cpus });
    }
    Ok(())
}

/// [`MIN_MEMORY_MIB`] to [`MAX_MEMORY_MIB`] MiB of guest memory.
pub fn check_memory(memory_mib: u64) -> Result<(), ConfigError> {
    if memory_mib < MIN_MEMORY_MIB {
        return Err(ConfigError::MemoryTooSmall { value: memory_mib });
    }
    if memory_mib > MAX_MEMORY_MIB {
        return Err(ConfigError::MemoryTooLarge { value: memory_mib });
    }
    Ok(())
}

impl VmCreate {
    /// Checks the request and returns the configuration it asks for, its image as requested
    /// (the coordinator pins the version it resolves).
    pub fn validate(&self) -> Result<VmConfig, ConfigError> {
        let image: ImageRef = self.image.parse()?;
        check_cpus(self.cpus)?;
        check_memory(self.memory_mib)?;
        // Exactly the names the API documents (the CLI offers these two).
        let accel = match self.accel.as_deref() {
            None => None,
            Some("kvm") => Some(Accel::Kvm),
            Some("tcg") => Some(Accel::Tcg),
            Some(a) => return Err(ConfigError::Accel { value: a.to_string() }),
        };
        if let Some(n) = &self.name {
            validate_name(n).map_err(|_| ConfigError::Name { value: n.clone() })?;
        }
        if let Some(r) = &self.request_id {
            if !(8..=64).contains(&r.len()) || !r.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(ConfigError::RequestId { value: r.clone() });
            }
        }
        let config = VmConfig::new(image)
            .with_cpus(self.cpus)
            .with_memory_mib(self.memory_mib)
            .with_accel(accel)
            .with_resources(self.resources.clone());
        let config = VmConfig {
            net: NetConfig::requested(&self.nics, &self.forwards)?,
            volumes: self.volumes.clone(),
            cloud_init: self.cloud_init.clone(),
            ..config
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(image: &str) -> VmCreate {
        serde_json::from_value(serde_json::json!({ "image": image })).unwrap()
    }

    fn err(req: &VmCreate) -> String {
        req.validate().unwrap_err().to_string()
    }

    #[test]
    fn a_valid_request_becomes_its_config() {
        let mut r = create("sample@2");
        r.cpus = 2;
        r.memory_mib = 512;
        r.accel = Some("tcg".into());
        r.forwards = vec![Forward { host: 2222, guest: 22 }];
        r.resources.cpu_share = Some(0.5);
        let c = r.validate().unwrap();
        assert_eq!(c.image(), &ImageRef { name: "sample".into(), version: Some(2) });
        assert_eq!((c.cpus, c.memory_mib, c.accel), (2, 512, Some(Accel::Tcg)));
        assert_eq!(c.net.forwards().copied().collect::<Vec<_>>(), vec![Forward { host: 2222, guest: 22 }]);
        assert_eq!(c.resources.cpu_share, Some(0.5));
        assert_eq!(create("sample").validate().unwrap(), VmConfig::new(ImageRef { name: "sample".into(), version: None }));
    }

    #[test]
    fn each_error_names_the_field_and_the_range() {
        assert!(err(&create("bad name")).contains("invalid image name \"bad name\""));
        let mut r = create("sample");
        r.cpus = 0;
        assert_eq!(err(&r), "cpus 0 is out of range 1-64");
        r.cpus = 65;
        assert_eq!(err(&r), "cpus 65 is out of range 1-64");
        let mut r = create("sample");
        r.memory_mib = 31;
        assert_eq!(err(&r), "memory 31 MiB is too small: at least 32 MiB");
        // Beyond what QEMU's guests can have is a static error; below it, too much for every
        // host is for the scheduler to say.
        r.memory_mib = 99_999_999;
        assert_eq!(err(&r), "memory 99999999 MiB is too large: at most 4194304 MiB");
        r.memory_mib = MAX_MEMORY_MIB;
        r.validate().unwrap();
        let mut r = create("sample");
        r.accel = Some("hvf".into());
        assert_eq!(err(&r), "accel \"hvf\": expected kvm or tcg");
        r.accel = Some("KVM".into());
        assert_eq!(err(&r), "accel \"KVM\": expected kvm or tcg");
        let mut r = create("sample");
        r.name = Some("no/slash".into());
        assert_eq!(err(&r), "invalid VM name \"no/slash\": use 1-64 characters of A-Z a-z 0-9 . _ -");
        let mut r = create("sample");
        r.resources = Resources { cpu_share: Some(0.2), cpu_slice_ms: Some(10), ..Default::default() };
        assert!(err(&r).contains("not both"));
        let mut r = create("sample");
        r.resources.memory_limit_mib = Some(15);
        assert_eq!(err(&r), "memory limit 15 MiB is out of range 16-4194304 MiB");
        let mut r = create("sample");
        r.resources.disk_iops = Some(0);
        assert_eq!(err(&r), "disk limits must be positive (leave them out for no limit)");
        let mut r = create("sample");
        r.forwards = vec![Forward { host: 0, guest: 22 }];
        assert_eq!(err(&r), "port forward 0->22: ports must be 1-65535");
        r.forwards = vec![Forward { host: 80, guest: 22 }, Forward { host: 80, guest: 23 }];
        assert_eq!(err(&r), "host port 80 is forwarded twice");
    }

    #[test]
    fn a_config_validates_its_image_name() {
        let c = VmConfig::new(ImageRef { name: "-x".into(), version: None });
        assert!(matches!(c.validate(), Err(ConfigError::Image(_))));
    }

    #[test]
    fn cpu_reservations() {
        assert_eq!(reservation(None, None, None).unwrap(), None);
        assert_eq!(reservation(Some(0.2), None, None).unwrap(), Some((20_000, 100_000)));
        assert_eq!(reservation(None, Some(10), Some(50)).unwrap(), Some((10_000, 50_000)));
        assert_eq!(reservation(Some(1.5), None, Some(20)).unwrap(), Some((30_000, 20_000)));
        assert!(reservation(Some(0.2), Some(10), Some(50)).unwrap_err().to_string().contains("not both"));
        assert!(reservation(None, Some(10), None).unwrap_err().to_string().contains("period"));
        assert!(reservation(None, None, Some(10)).unwrap_err().to_string().contains("slice"));
        assert!(reservation(Some(0.0), None, None).is_err());
        assert!(reservation(Some(f64::NAN), None, None).is_err());
        assert!(reservation(Some(0.001), None, Some(100)).unwrap_err().to_string().contains("1 ms"));
        assert!(reservation(None, Some(1), Some(5000)).unwrap_err().to_string().contains("1-1000"));
        assert!(reservation(None, Some(1), Some(u64::MAX)).unwrap_err().to_string().contains("1-1000"));
        assert_eq!(
            reservation(None, Some(7000), Some(100)).unwrap_err().to_string(),
            "CPU slice 7000 ms is more than 64 cores' worth of the 100 ms period"
        );
    }

    #[test]
    fn accel_parses_and_serialises_lowercase() {
        assert_eq!("KVM".parse::<Accel>().unwrap(), Accel::Kvm);
        assert!("hvf".parse::<Accel>().unwrap_err().to_string().contains("hvf"));
        assert_eq!(serde_json::to_string(&Accel::Tcg).unwrap(), "\"tcg\"");
        assert_eq!(Accel::Kvm.to_string(), "kvm");
    }

    #[test]
    fn config_json_leaves_defaults_out_and_reads_them_back() {
        let c = VmConfig::new(ImageRef { name: "sample".into(), version: Some(1) });
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"cpus": 1, "memory_mib": 256, "boot": {"image": {"name": "sample", "version": 1}},
                "net": {"nics": [{"mode": "user", "forwards": []}]}})
        );
        let sparse = serde_json::json!({"cpus": 1, "memory_mib": 256, "boot": {"image": {"name": "sample", "version": 1}}});
        assert_eq!(serde_json::from_value::<VmConfig>(sparse).unwrap(), c);
    }
}
