//! What a VM is to the host driver before it runs: its [`VmSpec`] (configuration, disk, boot,
//! RAM backing) and the checks a spec passes before anything is touched ([`validate_spec`]).

use crate::accel::{kvm_usable, Accel};
use crate::vm::error::VmError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use vgrid_api::vm::VmConfig;

/// Most guest memory this driver starts a VM with, in MiB: the API's bound.
pub use vgrid_api::config::MAX_MEMORY_MIB;

/// The guest's disk: what the per-VM qcow2 overlay is layered on. Never written to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DiskSource {
    /// An NBD export, e.g. the block proxy's `nbd+unix:///IMAGE?socket=PATH`. Raw format.
    Nbd { url: String },
    /// A local image file.
    File {
        path: PathBuf,
        /// QEMU format name of the file (`raw`, `qcow2`); `raw` when omitted.
        #[serde(default = "default_format")]
        format: String,
    },
}

fn default_format() -> String {
    "raw".into()
}

impl DiskSource {
    /// A local raw image file.
    pub fn raw_file(path: impl Into<PathBuf>) -> DiskSource {
        DiskSource::File { path: path.into(), format: "raw".into() }
    }
    /// The NBD export `export` served on the unix socket `socket`.
    pub fn nbd_unix(socket: impl AsRef<Path>, export: &str) -> DiskSource {
        DiskSource::Nbd { url: format!("nbd+unix:///{export}?socket={}", socket.as_ref().display()) }
    }
    /// The backing file string and its format, as written into the overlay.
    pub(crate) fn backing(&self) -> (String, &str) {
        match self {
            DiskSource::Nbd { url } => (url.clone(), "raw"),
            DiskSource::File { path, format } => (path.display().to_string(), format.as_str()),
        }
    }
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum BootSource {
    /// Direct kernel boot.
    Kernel {
        kernel: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        initrd: Option<PathBuf>,
        #[serde(default)]
        cmdline: String,
    },
    /// The disk's own bootloader through firmware (SeaBIOS unless `bios` names another image).
    Firmware {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bios: Option<PathBuf>,
    },
    /// Only for loading a saved state of a direct kernel boot: the kernel is in the guest's
    /// memory already, so QEMU gets no `-kernel`, only any kernel loader option ROM the saved
    /// state holds as a RAM block (`-option-rom`; none for QEMU 10's `pc`), and `-no-reboot`:
    /// with no kernel to boot again, a guest reset ends QEMU.
    Restore { option_roms: Vec<String> },
}

/// Everything needed to start one VM: its configuration as the coordinator recorded it, and
/// the host's own means (disk, boot files, RAM backing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "crate::vmspec::StoredSpec")]
pub struct VmSpec {
    /// 1–64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
    pub id: String,
    /// Cpus, memory, networking (TCP port forwards bound on the host's 127.0.0.1), and the
    /// accelerator (`None`: KVM when usable, else TCG; resolved at launch).
    pub config: VmConfig,
    pub disk: DiskSource,
    pub boot: BootSource,
    /// How the guest's RAM is backed ([`crate::ram`]). An anonymous spec becomes shared at
    /// launch when [`LaunchOptions::ram_dir`] is set.
    #[serde(default)]
    pub ram: crate::ram::RamBacking,
    /// The committed version each of `config.volumes` starts from (same order): the block
    /// proxy's export of it. A read-write volume gets an overlay of its own
    /// ([`crate::runtime::volume_overlay`]), committed by [`crate::volume`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_disks: Vec<DiskSource>,
}

impl VmSpec {
    /// A spec of VM `id` with `config` on `disk`, booting by `boot`, with anonymous RAM.
    pub fn new(id: &str, config: VmConfig, disk: DiskSource, boot: BootSource) -> VmSpec {
        VmSpec { id: id.to_string(), config, disk, boot, ram: Default::default(), volume_disks: Vec::new() }
    }

    /// The volumes with their disks: (index, attachment, backing).
    pub fn volumes(&self) -> impl Iterator<Item = (usize, &vgrid_api::volume::VolumeAttach, &DiskSource)> {
        self.config.volumes.iter().zip(&self.volume_disks).enumerate().map(|(i, (a, d))| (i, a, d))
    }
}

/// Validates a VM id: 1–64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_vm_id(id: &str) -> Result<(), VmError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && !id.starts_with('-')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(VmError::InvalidSpec {
            id: id.to_string(),
            reason: "the id must be 1-64 characters of [A-Za-z0-9._-], not starting with '.' or '-'".into(),
        })
    }
}

pub(crate) fn check_file(id: &str, what: &'static str, path: &Path) -> Result<(), VmError> {
    match std::fs::File::open(path).and_then(|f| f.metadata()) {
        Ok(m) if m.is_file() => Ok(()),
        _ => Err(VmError::MissingFile { id: id.to_string(), what, path: path.to_path_buf() }),
    }
}

/// Checks a spec without touching anything: id, sizes, files that must exist, accelerator.
pub fn validate_spec(spec: &VmSpec) -> Result<(), VmError> {
    let id = spec.id.as_str();
    validate_vm_id(id)?;
    let invalid = |reason: String| VmError::InvalidSpec { id: id.to_string(), reason };
    // Cpus, memory, resources and networking: the configuration's own checks.
    spec.config.validate().map_err(|e| invalid(e.to_string()))?;
    if spec.config.memory_mib > MAX_MEMORY_MIB {
        return Err(invalid(format!("memory_mib must be at most {MAX_MEMORY_MIB}, not {}", spec.config.memory_mib)));
    }
    match &spec.disk {
        DiskSource::Nbd { url } => {
            if !(url.starts_with("nbd://") || url.starts_with("nbd+unix://") || url.starts_with("nbd+tcp://")) {
                return Err(invalid(format!("disk URL {url:?} is not an nbd://, nbd+unix:// or nbd+tcp:// URL")));
            }
        }
        DiskSource::File { path, format } => {
            check_file(id, "disk image", path)?;
            if format.is_empty() || !format.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(invalid(format!("disk format {format:?} is not a QEMU format name")));
            }
        }
    }
    if spec.volume_disks.len() != spec.config.volumes.len() {
        return Err(invalid(format!("{} volumes but {} volume disks", spec.config.volumes.len(), spec.volume_disks.len())));
    }
    match &spec.boot {
        BootSource::Kernel { kernel, initrd, .. } => {
            check_file(id, "kernel", kernel)?;
            if let Some(i) = initrd {
                check_file(id, "initrd", i)?;
            }
        }
        BootSource::Firmware { bios: Some(b) } => check_file(id, "firmware", b)?,
        BootSource::Firmware { bios: None } | BootSource::Restore { .. } => {}
    }
    if spec.config.accel == Some(Accel::Kvm) && !kvm_usable() {
        return Err(invalid(
            "accelerator kvm requested but this host has no usable KVM (no vmx/svm in /proc/cpuinfo or /dev/kvm does not open)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vgrid_api::vm::Forward;

    /// A valid spec of VM `vm-1` over files made in `dir`.
    pub(crate) fn spec(dir: &Path) -> VmSpec {
        let k = dir.join("vmlinuz");
        let d = dir.join("disk.img");
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&d, b"d").unwrap();
        let config = VmConfig::new(vgrid_api::ImageRef { name: "sample".into(), version: Some(1) })
            .with_memory_mib(128)
            .with_forwards(vec![Forward { host: 2222, guest: 22 }])
            .with_accel(Some(Accel::Tcg));
        VmSpec::new(
            "vm-1",
            config,
            DiskSource::raw_file(d),
            BootSource::Kernel { kernel: k, initrd: None, cmdline: "console=ttyS0".into() },
        )
    }

    #[test]
    fn spec_validation_names_the_vm_and_the_cause() {
        let t = tempfile::tempdir().unwrap();
        let good = spec(t.path());
        validate_spec(&good).unwrap();

        let mut s = good.clone();
        s.boot = BootSource::Kernel { kernel: t.path().join("nope"), initrd: None, cmdline: String::new() };
        let e = validate_spec(&s).unwrap_err().to_string();
        assert!(e.contains("vm-1") && e.contains("kernel") && e.contains("nope"), "{e}");

        let mut s = good.clone();
        s.id = "bad id,x".into();
        assert!(matches!(validate_spec(&s), Err(VmError::InvalidSpec { .. })));

        let mut s = good.clone();
        s.config.cpus = 0;
        assert!(validate_spec(&s).unwrap_err().to_string().contains("cpus"));

        let mut s = good.clone();
        s.disk = DiskSource::Nbd { url: "http://x".into() };
        assert!(validate_spec(&s).unwrap_err().to_string().contains("http://x"));

        let mut s = good.clone();
        s.config = s.config.with_forwards(vec![Forward { host: 2222, guest: 22 }, Forward { host: 2222, guest: 80 }]);
        assert!(validate_spec(&s).unwrap_err().to_string().contains("2222"));
    }

    #[test]
    fn spec_json_round_trips() {
        let t = tempfile::tempdir().unwrap();
        let s = spec(t.path());
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"kind\":\"file\""), "{j}");
        let back: VmSpec = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        let nbd = DiskSource::nbd_unix("/run/proxy.sock", "debian");
        assert_eq!(nbd, DiskSource::Nbd { url: "nbd+unix:///debian?socket=/run/proxy.sock".into() });
    }
}
