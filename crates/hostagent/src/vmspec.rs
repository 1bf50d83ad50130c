//! Reading a runtime directory's `spec.json` as every version wrote it: the current shape (a
//! [`VmConfig`] under `config`) and the flat one from before it (top-level `cpus`,
//! `memory_mib`, `forwards` as `[host, guest]` pairs and `accel`), so that an upgraded agent
//! re-adopts the QEMUs its predecessor started.

use serde::Deserialize;
use vgrid_api::vm::{Accel, Forward, VmConfig};
use vgrid_api::ImageRef;

use crate::ram::RamBacking;
use crate::spec::{BootSource, DiskSource, VmSpec};

#[derive(Deserialize)]
pub(crate) struct StoredSpec {
    id: String,
    #[serde(default)]
    config: Option<VmConfig>,
    disk: DiskSource,
    boot: BootSource,
    #[serde(default)]
    ram: RamBacking,
    #[serde(default)]
    cpus: Option<u32>,
    #[serde(default)]
    memory_mib: Option<u64>,
    #[serde(default)]
    forwards: Vec<(u16, u16)>,
    #[serde(default)]
    accel: Option<Accel>,
    #[serde(default)]
    volume_disks: Vec<DiskSource>,
}

/// The image a disk is an export of (`nbd+unix:///IMAGE@VERSION?socket=...`), else a label.
fn image_of(disk: &DiskSource) -> ImageRef {
    let export = match disk {
        DiskSource::Nbd { url } => url.strip_prefix("nbd+unix:///").and_then(|r| r.split('?').next()).and_then(|e| e.parse().ok()),
        DiskSource::File { .. } => None,
    };
    export.unwrap_or_else(|| ImageRef { name: "local".into(), version: None })
}

impl TryFrom<StoredSpec> for VmSpec {
    type Error = String;

    fn try_from(s: StoredSpec) -> Result<VmSpec, String> {
        let config = match (s.config, s.cpus, s.memory_mib) {
            (Some(c), ..) => c,
            (None, Some(cpus), Some(memory_mib)) => VmConfig::new(image_of(&s.disk))
                .with_cpus(cpus)
                .with_memory_mib(memory_mib)
                .with_accel(s.accel)
                .with_forwards(s.forwards.into_iter().map(|(host, guest)| Forward { host, guest }).collect()),
            _ => return Err("a VM spec needs a `config` (or the `cpus` and `memory_mib` of earlier versions)".into()),
        };
        Ok(VmSpec { id: s.id, config, disk: s.disk, boot: s.boot, ram: s.ram, volume_disks: s.volume_disks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgrid_api::vm::NetConfig;

    #[test]
    fn a_spec_json_of_the_previous_version_reads() {
        // As an agent before `VmConfig` wrote it for a running guest.
        let old = r#"{
  "id": "vm-0a1b2c3d4e5f",
  "cpus": 2,
  "memory_mib": 256,
  "disk": {"kind": "nbd", "url": "nbd+unix:///sample@3?socket=/var/lib/vgrid/host/nbd.sock"},
  "boot": {"mode": "kernel", "kernel": "/var/lib/vgrid/host/vms/vm-0a1b2c3d4e5f/kernel", "cmdline": "console=ttyS0"},
  "forwards": [[2222, 22]],
  "accel": "tcg",
  "ram": {"kind": "shared", "path": "/dev/shm/vgrid/vm-0a1b2c3d4e5f"}
}"#;
        let s: VmSpec = serde_json::from_str(old).unwrap();
        assert_eq!(s.id, "vm-0a1b2c3d4e5f");
        assert_eq!((s.config.cpus, s.config.memory_mib, s.config.accel), (2, 256, Some(Accel::Tcg)));
        assert_eq!(s.config.net, NetConfig::user(vec![Forward { host: 2222, guest: 22 }]));
        assert_eq!(s.config.image(), &ImageRef { name: "sample".into(), version: Some(3) });
        assert!(matches!(s.ram, RamBacking::Shared { .. }), "{:?}", s.ram);
        // Written again, it is the current shape and reads back equal.
        let again: VmSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(again, s);
        let file = r#"{"id":"x","cpus":1,"memory_mib":64,"disk":{"kind":"file","path":"/d.img"},"boot":{"mode":"firmware"}}"#;
        let s: VmSpec = serde_json::from_str(file).unwrap();
        assert_eq!(s.config.image().name, "local");
        assert_eq!(s.config.net, NetConfig::default());
    }
}
