//! Image manifests: what an image is made of.
//!
//! An image is a manifest plus content-addressed chunks. The disk (and, for direct kernel boot,
//! the kernel and initrd; later saved memory states) are each a [`Blob`]: a byte length and the
//! list of chunk hashes, `None` standing for an all-zero chunk that is never stored. The last
//! chunk of a blob may be shorter than the chunk size.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Current manifest schema version. Readers refuse manifests of a newer schema.
pub const SCHEMA_VERSION: u32 = 1;

/// The blake3 hash of a chunk's uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", &self.to_hex()[..16])
    }
}

impl FromStr for ChunkHash {
    type Err = ManifestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        if s.len() != 64 {
            return Err(ManifestError::BadHash(s.to_string()));
        }
        hex::decode_to_slice(s, &mut out).map_err(|_| ManifestError::BadHash(s.to_string()))?;
        Ok(ChunkHash(out))
    }
}

impl utoipa::PartialSchema for ChunkHash {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(crate::openapi::HASH_PATTERN))
            .description(Some("the blake3 hash of a chunk's uncompressed bytes, 64 lowercase hex digits"))
            .into()
    }
}
impl utoipa::ToSchema for ChunkHash {}

impl Serialize for ChunkHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}
impl<'de> Deserialize<'de> for ChunkHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A byte string stored as fixed-size chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Blob {
    /// Length in bytes; need not be a multiple of the chunk size.
    pub size: u64,
    /// One entry per chunk: `None` is an all-zero chunk (not stored).
    pub chunks: Vec<Option<ChunkHash>>,
}

impl Blob {
    /// Length of chunk `index` for this blob (the last one may be short).
    pub fn chunk_len(&self, chunk_size: u32, index: usize) -> u32 {
        let start = index as u64 * chunk_size as u64;
        (self.size.saturating_sub(start)).min(chunk_size as u64) as u32
    }
    /// Hashes of the stored (non-zero) chunks.
    pub fn stored(&self) -> impl Iterator<Item = &ChunkHash> {
        self.chunks.iter().flatten()
    }
}

/// How an image boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Boot {
    /// The image's own firmware and bootloader (BIOS by default).
    Firmware,
    /// Direct kernel boot: kernel and initrd are blobs of this manifest.
    Kernel {
        kernel: Blob,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        initrd: Option<Blob>,
        #[serde(default)]
        cmdline: String,
    },
}

/// Descriptive metadata of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageMeta {
    #[serde(default)]
    pub os: String,
    #[serde(default = "default_arch")]
    pub arch: String,
    pub boot: Boot,
    /// Set on a volume's manifests (the user's data, not a bootable image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeMeta>,
}

/// What a volume's manifests carry besides an image's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeMeta {
    /// A named snapshot: an immutable copy (no data copied) of `NAME@VERSION`; attached
    /// read-only only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_of: Option<ImageRef>,
}

fn default_arch() -> String {
    "x86_64".into()
}

/// `NAME` or `NAME@VERSION`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageRef {
    #[schema(pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.version {
            Some(v) => write!(f, "{}@{}", self.name, v),
            None => f.write_str(&self.name),
        }
    }
}

impl FromStr for ImageRef {
    type Err = ManifestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, version) = match s.split_once('@') {
            Some((n, v)) => (n, Some(v.parse::<u32>().map_err(|_| ManifestError::BadName(s.to_string()))?)),
            None => (s, None),
        };
        validate_name(name)?;
        Ok(ImageRef { name: name.to_string(), version })
    }
}

/// Image names: 1–64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_name(name: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ManifestError::BadName(name.to_string()))
    }
}

/// An image version: immutable once written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Manifest {
    pub schema: u32,
    pub name: String,
    pub version: u32,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub chunk_size: u32,
    pub disk: Blob,
    pub meta: ImageMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ImageRef>,
    /// A saved post-boot state (warm image): the guest starts from it instead of booting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<SavedState>,
}

/// A guest's saved memory and device state (QEMU's migration stream), stored as a blob next
/// to the disk it was saved with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SavedState {
    /// The migration stream. With `ram`, only the devices' state: the guest's RAM is not in it.
    pub blob: Blob,
    /// What a QEMU must look like to load it.
    pub meta: StateMeta,
    /// The guest's RAM saved apart from the stream so that a restore can map it lazily: pages
    /// come over the network when the guest first touches them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<SavedRam>,
}

/// A guest's RAM as an image of its memory (page `i` at offset `i * 4096`, zero chunks not
/// stored), in chunks of its own size: smaller than a disk's, since a guest touches its memory
/// a page here and a page there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SavedRam {
    pub chunk_size: u32,
    pub blob: Blob,
}

/// The machine a saved state needs: restoring with other cpus/memory, another machine type or
/// another QEMU version is refused with a clear error instead of a failed load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StateMeta {
    /// QEMU version that saved it (`MAJOR.MINOR.MICRO`).
    pub qemu_version: String,
    /// Machine type (e.g. `pc`, or the versioned `pc-i440fx-10.0` it resolved to).
    pub machine: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// `kvm` or `tcg`.
    #[serde(default)]
    pub accel: String,
    /// Seconds since the Unix epoch.
    #[serde(default)]
    pub saved: u64,
    /// The kernel loader ROMs the stream has as RAM blocks (a state of a direct kernel boot),
    /// which a restoring QEMU must be started with: known from the manifest, a restore starts
    /// QEMU without waiting for the state's first chunk. `None` (states saved before it was
    /// recorded): read from that chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader_roms: Option<Vec<String>>,
}

impl StateMeta {
    /// Why a VM with `cpus`/`memory_mib` on a QEMU of `qemu_version` cannot load this state,
    /// or `None` when it can. QEMU loads streams of the same major.minor release.
    pub fn incompatibility(&self, cpus: u32, memory_mib: u64, qemu_version: &str) -> Option<String> {
        if cpus != self.cpus || memory_mib != self.memory_mib {
            return Some(format!(
                "the state was saved with {} cpus and {} MiB; run it with --cpus {} --memory {} (asked: {cpus} cpus, {memory_mib} MiB)",
                self.cpus, self.memory_mib, self.cpus, self.memory_mib
            ));
        }
        let mm = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
        if mm(qemu_version) != mm(&self.qemu_version) {
            return Some(format!("the state was saved by QEMU {} and this host has QEMU {qemu_version}", self.qemu_version));
        }
        None
    }
}

impl Manifest {
    /// Every stored chunk hash of the image (disk, kernel, initrd), duplicates included.
    pub fn all_chunks(&self) -> impl Iterator<Item = &ChunkHash> {
        let boot: Vec<&Blob> = match &self.meta.boot {
            Boot::Firmware => vec![],
            Boot::Kernel { kernel, initrd, .. } => std::iter::once(kernel).chain(initrd.iter()).collect(),
        };
        let state = self.state.iter().flat_map(|s| std::iter::once(&s.blob).chain(s.ram.iter().map(|r| &r.blob)));
        self.disk.stored().chain(boot.into_iter().chain(state).flat_map(|b| b.stored()))
    }

    /// Chunk `index` of a boot profile: indices below the disk's chunk count are disk chunks,
    /// the next ones a saved RAM's chunks (what a restored guest touched). The hash (`None`:
    /// zero or out of range) and its length.
    pub fn profile_chunk(&self, index: u64) -> Option<(ChunkHash, u32)> {
        let disk = self.disk.chunks.len() as u64;
        if index < disk {
            let h = self.disk.chunks[index as usize]?;
            return Some((h, self.disk.chunk_len(self.chunk_size, index as usize)));
        }
        let ram = self.state.as_ref()?.ram.as_ref()?;
        let i = (index - disk) as usize;
        let h = (*ram.blob.chunks.get(i)?)?;
        Some((h, ram.blob.chunk_len(ram.chunk_size, i)))
    }

    /// How many chunk indices a boot profile of this image may name (disk, then saved RAM).
    pub fn profile_len(&self) -> u64 {
        self.disk.chunks.len() as u64 + self.state.as_ref().and_then(|s| s.ram.as_ref()).map_or(0, |r| r.blob.chunks.len() as u64)
    }

    /// Whether this is a warm image (it carries a saved state).
    pub fn is_warm(&self) -> bool {
        self.state.is_some()
    }

    /// `NAME@VERSION` of this manifest.
    pub fn image_ref(&self) -> ImageRef {
        ImageRef { name: self.name.clone(), version: Some(self.version) }
    }

    /// Checks internal consistency; every decoder of untrusted manifests calls this.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.schema == 0 || self.schema > SCHEMA_VERSION {
            return Err(ManifestError::Schema(self.schema));
        }
        validate_name(&self.name)?;
        if !(crate::MIN_CHUNK_SIZE..=crate::MAX_CHUNK_SIZE).contains(&self.chunk_size) || !self.chunk_size.is_power_of_two() {
            return Err(ManifestError::ChunkSize(self.chunk_size));
        }
        let mut blobs = vec![("disk", &self.disk)];
        if let Boot::Kernel { kernel, initrd, .. } = &self.meta.boot {
            blobs.push(("kernel", kernel));
            if let Some(i) = initrd {
                blobs.push(("initrd", i));
            }
        }
        if let Some(st) = &self.state {
            blobs.push(("state", &st.blob));
            if let Some(ram) = &st.ram {
                if ram.blob.size != st.meta.memory_mib.saturating_mul(1 << 20) {
                    return Err(ManifestError::RamSize { size: ram.blob.size, memory_mib: st.meta.memory_mib });
                }
                if !(crate::MIN_CHUNK_SIZE..=crate::MAX_CHUNK_SIZE).contains(&ram.chunk_size) || !ram.chunk_size.is_power_of_two() {
                    return Err(ManifestError::ChunkSize(ram.chunk_size));
                }
            }
        }
        let ram = self.state.iter().flat_map(|s| s.ram.iter().map(|r| ("ram", &r.blob, r.chunk_size)));
        let blobs: Vec<(&str, &Blob, u32)> = blobs.into_iter().map(|(w, b)| (w, b, self.chunk_size)).chain(ram).collect();
        for (what, b, cs) in blobs {
            let want = b.size.div_ceil(cs as u64);
            if b.chunks.len() as u64 != want {
                return Err(ManifestError::ChunkCount { blob: what, size: b.size, chunks: b.chunks.len(), expected: want });
            }
        }
        Ok(())
    }

    /// Parses and validates a manifest from JSON.
    pub fn from_json(data: &[u8]) -> Result<Self, ManifestError> {
        let m: Manifest = crate::json::from_slice(data).map_err(|e| ManifestError::Json(JsonError(e.into())))?;
        m.validate()?;
        Ok(m)
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("invalid chunk hash {0:?}: expected 64 hex digits")]
    BadHash(String),
    #[error("invalid image name {0:?}: use 1-64 characters of A-Z a-z 0-9 . _ - (optionally @VERSION)")]
    BadName(String),
    #[error("manifest schema {0} is not supported (this vgrid reads schema 1..={SCHEMA_VERSION})")]
    Schema(u32),
    #[error("chunk size {0} is invalid: must be a power of two between 4 KiB and 16 MiB")]
    ChunkSize(u32),
    #[error("{blob} of {size} bytes lists {chunks} chunks, expected {expected}")]
    ChunkCount { blob: &'static str, size: u64, chunks: usize, expected: u64 },
    #[error("saved RAM of {size} bytes does not match the state's {memory_mib} MiB of guest memory")]
    RamSize { size: u64, memory_mib: u64 },
    #[error("malformed manifest: {0}")]
    Json(#[source] JsonError),
}

/// The JSON error of a malformed manifest, kept as [`ManifestError::Json`]'s source: shared, so
/// that the error stays `Clone`, and compared by what it says.
#[derive(Debug, Clone)]
pub struct JsonError(std::sync::Arc<serde_json::Error>);

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for JsonError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for JsonError {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl Eq for JsonError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ref_parses() {
        let r: ImageRef = "sample@3".parse().unwrap();
        assert_eq!(r, ImageRef { name: "sample".into(), version: Some(3) });
        assert_eq!(r.to_string(), "sample@3");
        assert!("../etc".parse::<ImageRef>().is_err());
        assert!("a@x".parse::<ImageRef>().is_err());
    }

    #[test]
    fn manifest_validation_catches_wrong_chunk_count() {
        let m = Manifest {
            schema: 1,
            name: "x".into(),
            version: 1,
            created: 0,
            chunk_size: 4096,
            disk: Blob { size: 4097, chunks: vec![None] },
            meta: ImageMeta { os: "".into(), arch: "x86_64".into(), boot: Boot::Firmware, volume: None },
            parent: None,
            state: None,
        };
        assert!(matches!(m.validate(), Err(ManifestError::ChunkCount { expected: 2, .. })));
        let json = serde_json::to_vec(&Manifest { disk: Blob { size: 4097, chunks: vec![None, None] }, ..m }).unwrap();
        let back = Manifest::from_json(&json).unwrap();
        assert_eq!(back.disk.chunk_len(4096, 1), 1);
    }

    #[test]
    fn old_manifests_parse_and_state_round_trips() {
        let old = r#"{"schema":1,"name":"x","version":1,"created":0,"chunk_size":4096,
            "disk":{"size":4096,"chunks":[null]},"meta":{"os":"","arch":"x86_64","boot":{"mode":"firmware"}}}"#;
        let m = Manifest::from_json(old.as_bytes()).unwrap();
        assert!(m.state.is_none() && !m.is_warm());
        assert!(!String::from_utf8(serde_json::to_vec(&m).unwrap()).unwrap().contains("state"));
        let h = ChunkHash::of(b"state");
        let meta = StateMeta {
            qemu_version: "10.0.2".into(),
            machine: "pc".into(),
            cpus: 1,
            memory_mib: 256,
            accel: "tcg".into(),
            saved: 1,
            loader_roms: None,
        };
        let warm =
            Manifest { state: Some(SavedState { blob: Blob { size: 5000, chunks: vec![Some(h), None] }, meta, ram: None }), ..m.clone() };
        let back = Manifest::from_json(&serde_json::to_vec(&warm).unwrap()).unwrap();
        assert_eq!(back, warm);
        assert!(back.all_chunks().any(|c| *c == h), "state chunks count as the image's chunks");
        let bad =
            Manifest { state: Some(SavedState { blob: Blob { size: 5000, chunks: vec![Some(h)] }, ..warm.state.clone().unwrap() }), ..m };
        assert!(matches!(bad.validate(), Err(ManifestError::ChunkCount { blob: "state", .. })));
    }

    #[test]
    fn loader_roms_are_optional_in_state_meta() {
        let old = r#"{"qemu_version":"10.0.2","machine":"pc","cpus":1,"memory_mib":256,"accel":"tcg","saved":1}"#;
        let meta: StateMeta = serde_json::from_str(old).unwrap();
        assert_eq!(meta.loader_roms, None);
        assert!(!serde_json::to_string(&meta).unwrap().contains("loader_roms"));
        let with = StateMeta { loader_roms: Some(vec!["linuxboot_dma.bin".into()]), ..meta };
        let back: StateMeta = serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
        assert_eq!(back, with);
    }

    #[test]
    fn saved_ram_is_validated_and_counted() {
        let mut m = Manifest::from_json(
            br#"{"schema":1,"name":"x","version":1,"created":0,"chunk_size":4194304,
            "disk":{"size":4096,"chunks":[null]},"meta":{"os":"","arch":"x86_64","boot":{"mode":"firmware"}}}"#,
        )
        .unwrap();
        let (st, page) = (ChunkHash::of(b"devices"), ChunkHash::of(b"page"));
        let meta = StateMeta {
            qemu_version: "10.0.2".into(),
            machine: "pc".into(),
            cpus: 1,
            memory_mib: 8,
            accel: "tcg".into(),
            saved: 1,
            loader_roms: None,
        };
        let ram = SavedRam { chunk_size: 4 << 20, blob: Blob { size: 8 << 20, chunks: vec![Some(page), None] } };
        m.state = Some(SavedState { blob: Blob { size: 10, chunks: vec![Some(st)] }, meta, ram: Some(ram) });
        let back = Manifest::from_json(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        assert!(back.all_chunks().any(|c| *c == page), "RAM chunks count as the image's chunks");
        let mut short = m.clone();
        short.state.as_mut().unwrap().ram.as_mut().unwrap().blob.size = 4 << 20;
        short.state.as_mut().unwrap().ram.as_mut().unwrap().blob.chunks.pop();
        let e = short.validate().unwrap_err();
        assert_eq!(e, ManifestError::RamSize { size: 4 << 20, memory_mib: 8 });
        assert!(e.to_string().contains("8 MiB"), "{e}");
        let mut count = m.clone();
        count.state.as_mut().unwrap().ram.as_mut().unwrap().blob.chunks.pop();
        assert!(matches!(count.validate(), Err(ManifestError::ChunkCount { blob: "ram", .. })));
        // The RAM's own chunk size counts: 2 chunks of 4 MiB, or 8 of 1 MiB.
        let mut small = m;
        small.state.as_mut().unwrap().ram.as_mut().unwrap().chunk_size = 1 << 20;
        assert!(matches!(small.validate(), Err(ManifestError::ChunkCount { blob: "ram", expected: 8, .. })));
        small.state.as_mut().unwrap().ram.as_mut().unwrap().chunk_size = 3000;
        assert_eq!(small.validate(), Err(ManifestError::ChunkSize(3000)));
    }

    #[test]
    fn state_meta_explains_incompatibility() {
        let meta = StateMeta {
            qemu_version: "10.0.2".into(),
            machine: "pc".into(),
            cpus: 2,
            memory_mib: 512,
            accel: "tcg".into(),
            saved: 0,
            loader_roms: None,
        };
        assert_eq!(meta.incompatibility(2, 512, "10.0.7"), None);
        let e = meta.incompatibility(1, 256, "10.0.2").unwrap();
        assert!(e.contains("--cpus 2 --memory 512"), "{e}");
        let e = meta.incompatibility(2, 512, "9.2.0").unwrap();
        assert!(e.contains("QEMU 10.0.2") && e.contains("9.2.0"), "{e}");
    }

    #[test]
    fn hash_roundtrip() {
        let h = ChunkHash::of(b"abc");
        let s = serde_json::to_string(&h).unwrap();
        let back: ChunkHash = serde_json::from_str(&s).unwrap();
        assert_eq!(h, back);
        assert!("zz".parse::<ChunkHash>().is_err());
    }

    #[test]
    fn a_malformed_manifest_keeps_its_json_error() {
        let e = Manifest::from_json(b"{").unwrap_err();
        let cause = serde_json::from_slice::<Manifest>(b"{").unwrap_err();
        assert_eq!(e.to_string(), format!("malformed manifest: {cause}"));
        assert_eq!(std::error::Error::source(&e).map(|s| s.to_string()), Some(cause.to_string()));
        assert_eq!(e.clone(), e);
    }
}
