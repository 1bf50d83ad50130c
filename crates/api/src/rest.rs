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
    /// Pages of the saved RAM in the image's hot-page bundle (`GET .../profile/hot`): what a
    /// restored guest touched first, sent as pages rather than chunks. 0: no bundle.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hot_pages: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Answer of the image server when an upload session starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UploadCreated {
    pub id: String,
}

/// What deleting images (and the garbage collection that follows) freed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GcReport {
    pub chunks_freed: u64,
    /// Stored (compressed) bytes of the freed chunks.
    pub bytes_freed: u64,
}
