//! Types shared by every vgrid role and by its clients: chunk hashes, image manifests, and the
//! bodies of the REST API. This crate holds data definitions and their validation only; it must
//! never do I/O, start tasks, or know how any role stores or serves these objects.

pub mod auth;
pub mod grid;
pub mod manifest;
pub mod migrate;
pub mod rest;
pub mod usage;
pub mod vm;

pub use manifest::{Blob, Boot, ChunkHash, ImageMeta, ImageRef, Manifest, ManifestError, SavedRam, SavedState, StateMeta};

/// Default chunk size of new images (see `bench/run proxy` for why).
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;
/// Smallest and largest chunk size an image may use.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;

/// JSON error body of every REST endpoint: `{"error": "...", "detail": ...}`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}
