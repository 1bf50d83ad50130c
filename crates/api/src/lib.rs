//! The contracts between vgrid's processes: every type that crosses a process boundary lives
//! here. Chunk hashes and image manifests; the coordinator's REST bodies (`vm`, `grid`,
//! `migrate`, `auth`, `usage`); the VM configuration, validated once (`config`, `net`); the host
//! agent's API and heartbeat (`host`); the image server's wire types (`rest`); volumes (`volume`); cloud-init seeds (`cloudinit`); the tunnel
//! relay's frame batches (`tunnel`); and the timeouts
//! and resource arithmetic both sides of a call count on; how a JSON body is read (`json`:
//! integral floats are integers). This crate holds data definitions and
//! their validation only; it must never do I/O, start tasks, or know how any role stores or
//! serves these objects.

pub mod auth;
pub mod cloudinit;
pub mod config;
pub mod grid;
pub mod host;
pub mod json;
pub mod manifest;
pub mod migrate;
pub mod net;
pub mod openapi;
mod record;
pub mod rest;
pub mod tunnel;
pub mod usage;
pub mod vm;
pub mod volume;

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
