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
}
