//! Bodies of the REST API (coordinator) and of the image server's HTTP API.

use serde::{Deserialize, Serialize};

/// One image version as listed by an image server.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageSummary {
    pub name: String,
    pub version: u32,
    pub size: u64,
    /// Bytes of non-zero chunks (what a full pull transfers, before compression).
    pub stored_bytes: u64,
    pub chunk_size: u32,
    pub os: String,
    pub arch: String,
    /// `firmware` or `kernel`.
    pub boot: String,
    pub created: u64,
    /// A warm image: it carries a saved state and starts without booting.
    #[serde(default)]
    pub warm: bool,
    /// `NAME@VERSION` of the image it was saved from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The user the image name belongs to (none: only admins and grid nodes may use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Readable (runnable) by every user.
    #[serde(default)]
    pub public: bool,
    /// A volume (the user's data), not a bootable image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<crate::volume::VolumeMeta>,
}

/// Who an image name (all its versions) belongs to: `GET|PUT /store/v1/owners/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageOwner {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default)]
    pub public: bool,
}

impl ImageOwner {
    /// May user `user` (`admin` or not) read it? Grid nodes are checked apart.
    pub fn readable_by(&self, user: &str, admin: bool) -> bool {
        admin || self.public || self.owner.as_deref() == Some(user)
    }
    /// May user `user` change or delete it?
    pub fn writable_by(&self, user: &str, admin: bool) -> bool {
        admin || self.owner.as_deref() == Some(user)
    }
}

/// Boot working set of an image version: the disk chunk indices a guest read while booting,
/// in first-touch order; for a warm image with a saved RAM, indices past the disk's chunk
/// count are RAM chunks a restored guest touched (`Manifest::profile_chunk`). Hosts prefetch
/// these before (or while) starting the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BootProfile {
    pub chunks: Vec<u64>,
    /// Disk chunks of `chunks` that the recorded boot read only in part, with the byte ranges
    /// it read (whole blocks of the recording host's ranged fetches): a host prefetches only
    /// those ranges. A chunk not named here is prefetched whole (and a host that does not know
    /// this field prefetches every chunk whole).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<ChunkPart>,
    /// Pages of the saved RAM in the image's hot-page bundle (`GET .../profile/hot`): what a
    /// restored guest touched first, sent as pages rather than chunks. 0: no bundle.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hot_pages: u64,
}

/// The part of one disk chunk a recorded boot read ([`BootProfile::parts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChunkPart {
    /// The chunk's index in the disk.
    pub chunk: u64,
    /// Byte ranges within the chunk, in ascending order, not overlapping.
    pub ranges: Vec<ByteRange>,
}

/// Bytes `[offset, offset+len)` of a chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ByteRange {
    pub offset: u32,
    pub len: u32,
}

impl From<[u32; 2]> for ByteRange {
    /// `[offset, len]`.
    fn from([offset, len]: [u32; 2]) -> ByteRange {
        ByteRange { offset, len }
    }
}

impl ChunkPart {
    /// Why `self` cannot be a part of a chunk of `chunk_len` bytes, if it cannot.
    pub fn invalid(&self, chunk_len: u32) -> Option<String> {
        if self.ranges.is_empty() {
            return Some("no ranges".into());
        }
        let mut end = 0u64;
        for &ByteRange { offset: off, len } in &self.ranges {
            if len == 0 || (off as u64) < end || off as u64 + len as u64 > chunk_len as u64 {
                return Some(format!("range [{off}, {len}] is empty, out of order or beyond the chunk's {chunk_len} bytes"));
            }
            end = off as u64 + len as u64;
        }
        None
    }
}

impl ImageSummary {
    /// The summary of image version `m` (no owner, not public: the store adds those).
    pub fn of(m: &crate::Manifest) -> ImageSummary {
        let stored_bytes =
            m.disk.chunks.iter().enumerate().filter(|(_, c)| c.is_some()).map(|(i, _)| m.disk.chunk_len(m.chunk_size, i) as u64).sum();
        ImageSummary {
            name: m.name.clone(),
            version: m.version,
            size: m.disk.size,
            stored_bytes,
            chunk_size: m.chunk_size,
            os: m.meta.os.clone(),
            arch: m.meta.arch.clone(),
            boot: match m.meta.boot {
                crate::Boot::Firmware => "firmware".into(),
                crate::Boot::Kernel { .. } => "kernel".into(),
            },
            created: m.created,
            warm: m.state.is_some(),
            parent: m.parent.as_ref().map(|p| p.to_string()),
            owner: None,
            public: false,
            volume: m.meta.volume.clone(),
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Answer of the image server when an upload session starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UploadCreated {
    pub id: String,
}

/// Identifier of an upload session on an image server (random, 32 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UploadId(pub String);

impl std::fmt::Display for UploadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Machine-readable error kinds of the image server, in `detail.kind` of every error body
/// (`{"kind": ..., "object": ...}`).
pub struct ErrorKind;
impl ErrorKind {
    pub const NOT_FOUND: &'static str = "not_found";
    pub const CHUNK_CORRUPT: &'static str = "chunk_corrupt";
    pub const BAD_REQUEST: &'static str = "bad_request";
    pub const MISSING_CHUNKS: &'static str = "missing_chunks";
    pub const CONFLICT: &'static str = "conflict";
    pub const NO_SPACE: &'static str = "no_space";
    pub const INTERNAL: &'static str = "internal";
}

/// What deleting images (and the garbage collection that follows) freed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GcReport {
    pub chunks_freed: u64,
    /// Stored (compressed) bytes of the freed chunks.
    pub bytes_freed: u64,
}
