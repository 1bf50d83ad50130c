//! Volumes: the user's data, kept on the image servers (the data-server role) as versions of
//! content-addressed chunks, like images, and attached to VMs as extra virtio disks whose blocks
//! come through the host's block proxy on demand.
//!
//! A volume is an image name whose manifests carry [`VolumeMeta`]; each committed version is
//! an immutable manifest over the store's chunks, and the head (the latest version) moves by
//! a create-only write of the next version. At most one VM holds a volume read-write: the
//! coordinator's claim (`claims/volume/NAME`), with a fencing epoch the image server checks at
//! every commit, so a host that lost the claim cannot commit over its successor.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::manifest::validate_name;
/// What a volume's manifests carry (part of the manifest format).
pub use crate::manifest::VolumeMeta;
use crate::ImageRef;

/// The serial of a staging volume (`vm run --stage-in/--stage-out`): the guest finds it as
/// `/dev/disk/by-id/virtio-vgrid-stage` (docs/volumes.md, "Staging").
pub const STAGE_SERIAL: &str = "vgrid-stage";

/// Most volumes one VM may attach.
pub const MAX_VOLUMES: usize = 8;
/// Longest disk serial (virtio-blk's limit).
pub const MAX_SERIAL: usize = 20;

/// One volume attached to a VM: `NAME[@VERSION][:ro][,serial=S]` on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeAttach {
    #[schema(pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")]
    pub name: String,
    /// The committed version the guest starts from (the latest when absent; the coordinator
    /// pins it at admission). A read-write attach always starts from the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default)]
    pub readonly: bool,
    /// The disk's serial as the guest sees it (`/dev/disk/by-id/virtio-SERIAL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 20)]
    pub serial: Option<String>,
    /// The fencing token of a read-write attach, set by the coordinator: every commit carries
    /// it and the image server refuses one older than the volume's current epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// A staging volume of `vm run --stage-in` without `--stage-out`: the coordinator removes
    /// it once the VM has ended (its guest copied the inputs in at boot; nothing reads it
    /// after), and at the latest with the VM (`vm rm`). A failure to remove it is logged and
    /// added to the VM's `reason`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub remove_with_vm: bool,
}

/// Why a volume attachment is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {spec:?}: {why} (expected NAME[@VERSION][:ro][,serial=S])")]
    Syntax { spec: String, why: String },
    #[error("volume {name} is attached twice")]
    Twice { name: String },
    #[error("at most {MAX_VOLUMES} volumes per VM, not {count}")]
    TooMany { count: usize },
    #[error("volume {name}: a read-write attach starts from the latest version; attach {name}@{version} with :ro")]
    VersionReadWrite { name: String, version: u32 },
}

impl VolumeAttach {
    /// The export it is read through: `NAME@VERSION` once pinned.
    pub fn image_ref(&self) -> ImageRef {
        ImageRef { name: self.name.clone(), version: self.version }
    }

    fn check_serial(s: &str) -> bool {
        !s.is_empty() && s.len() <= MAX_SERIAL && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    /// Static checks of one attachment.
    pub fn validate(&self) -> Result<(), VolumeError> {
        let syntax = |why: String| VolumeError::Syntax { spec: self.name.clone(), why };
        validate_name(&self.name).map_err(|e| syntax(e.to_string()))?;
        if let Some(s) = &self.serial {
            if !Self::check_serial(s) {
                return Err(syntax(format!("serial {s:?} must be 1-{MAX_SERIAL} characters of A-Z a-z 0-9 - _")));
            }
        }
        Ok(())
    }
}

/// Checks a VM's attachments: each valid, no name twice, at most [`MAX_VOLUMES`].
pub fn validate_all(v: &[VolumeAttach]) -> Result<(), VolumeError> {
    if v.len() > MAX_VOLUMES {
        return Err(VolumeError::TooMany { count: v.len() });
    }
    for (i, a) in v.iter().enumerate() {
        a.validate()?;
        if v[..i].iter().any(|b| b.name == a.name) {
            return Err(VolumeError::Twice { name: a.name.clone() });
        }
    }
    Ok(())
}

impl std::str::FromStr for VolumeAttach {
    type Err = VolumeError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let syntax = |why: &str| VolumeError::Syntax { spec: spec.to_string(), why: why.to_string() };
        let mut parts = spec.split(',');
        let head = parts.next().unwrap_or_default();
        let (name_ver, readonly) = match head.rsplit_once(':') {
            Some((n, "ro")) => (n, true),
            Some((n, "rw")) => (n, false),
            Some(_) => return Err(syntax("the mode after ':' must be ro or rw")),
            None => (head, false),
        };
        let r: ImageRef = name_ver.parse().map_err(|e: crate::ManifestError| syntax(&e.to_string()))?;
        let mut serial = None;
        for p in parts {
            match p.split_once('=') {
                Some(("serial", s)) => serial = Some(s.to_string()),
                _ => return Err(syntax(&format!("unknown option {p:?}"))),
            }
        }
        if let (false, Some(v)) = (readonly, r.version) {
            return Err(VolumeError::VersionReadWrite { name: r.name, version: v });
        }
        let a = VolumeAttach { name: r.name, version: r.version, readonly, serial, epoch: None, remove_with_vm: false };
        a.validate()?;
        Ok(a)
    }
}

/// Body of `POST /api/v1/volumes/{name}/snapshot`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// The snapshot's own name (a read-only volume).
    #[schema(pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")]
    pub snapshot: String,
}

/// A volume as `GET /api/v1/volumes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Size of the latest version, in bytes.
    pub size: u64,
    /// Bytes of non-zero chunks of the latest version.
    pub stored_bytes: u64,
    /// Committed versions, ascending.
    pub versions: Vec<u32>,
    /// A snapshot: the version it copies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_of: Option<String>,
    /// The VM that holds it read-write (its name), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_rw: Option<String>,
    /// The image servers that hold it.
    pub servers: Vec<String>,
}

/// What a commit published: `POST /api/v1/volumes/{name}/commit` and the host's commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeCommitted {
    /// `NAME@VERSION` of the new version (or of the unchanged head when nothing was written).
    pub volume: String,
    /// Chunks that differ from the version the VM started from.
    pub chunks_changed: u64,
    /// Bytes sent to the image server (compressed chunks it lacked).
    pub uploaded_bytes: u64,
    /// Seconds the guest was paused to read its writes consistently (0 for a stopped VM).
    pub paused_secs: f64,
}

/// Body of the image server's `PUT /store/v1/volumes/{name}/epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Epoch {
    pub epoch: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_specs_parse() {
        let a: VolumeAttach = "data".parse().unwrap();
        assert_eq!((a.name.as_str(), a.version, a.readonly, a.serial.as_deref()), ("data", None, false, None));
        let a: VolumeAttach = "data@3:ro,serial=abc-1".parse().unwrap();
        assert_eq!((a.version, a.readonly, a.serial.as_deref()), (Some(3), true, Some("abc-1")));
        let a: VolumeAttach = "data:rw,serial=s".parse().unwrap();
        assert!(!a.readonly);
        assert!(matches!("data@3".parse::<VolumeAttach>(), Err(VolumeError::VersionReadWrite { .. })));
        let e = "data:rx".parse::<VolumeAttach>().unwrap_err().to_string();
        assert!(e.contains("ro or rw"), "{e}");
        let e = "data,size=3".parse::<VolumeAttach>().unwrap_err().to_string();
        assert!(e.contains("unknown option"), "{e}");
        let e = "data,serial=way-too-long-for-a-virtio-serial".parse::<VolumeAttach>().unwrap_err().to_string();
        assert!(e.contains("serial"), "{e}");
        assert!("bad name".parse::<VolumeAttach>().is_err());
    }

    #[test]
    fn a_vm_attaches_each_volume_once() {
        let a: VolumeAttach = "data".parse().unwrap();
        assert_eq!(validate_all(&[a.clone(), a.clone()]), Err(VolumeError::Twice { name: "data".into() }));
        let many: Vec<VolumeAttach> = (0..9).map(|i| format!("v{i}").parse().unwrap()).collect();
        assert_eq!(validate_all(&many), Err(VolumeError::TooMany { count: 9 }));
        assert_eq!(validate_all(&many[..8]), Ok(()));
    }
}
