//! The errors of the block proxy and of reads of its exports.

use crate::cache::CacheError;
use crate::source::SourceError;
use std::path::PathBuf;
use std::sync::Arc;
use vgrid_api::{ChunkHash, ImageRef, ManifestError};

/// Errors of the block proxy; each names the image, export, chunk or address concerned.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("export name {name:?} is not an image reference: {source}")]
    BadExportName {
        name: String,
        #[source]
        source: ManifestError,
    },
    #[error("export name {name:?} is not an image reference: image {image} has no saved RAM (not a lazily restorable warm image)")]
    NoSavedRam { name: String, image: ImageRef },
    #[error("image {image} not found on image servers {servers}")]
    ImageNotFound { image: ImageRef, servers: String },
    #[error("image {image}: manifest unavailable: {source}")]
    ImageUnavailable {
        image: ImageRef,
        #[source]
        source: SourceError,
    },
    #[error("image {image}: manifest unavailable: invalid manifest: {source}")]
    InvalidManifest {
        image: ImageRef,
        #[source]
        source: ManifestError,
    },
    #[error("image {image}: manifest unavailable: source answered with manifest of {answered}")]
    WrongManifest { image: ImageRef, answered: ImageRef },
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("image {image} needs {needed} bytes of cache to stage but the cache holds at most {max} bytes ({dir})")]
    CacheTooSmall { image: ImageRef, needed: u64, max: u64, dir: PathBuf },
    #[error("image {image}: blob of {size} bytes is too large to load into memory (limit {limit})")]
    BlobTooLarge { image: ImageRef, size: u64, limit: u64 },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: another server is listening on this socket")]
    SocketInUse { addr: String },
    /// Preparing a unix socket (`step` says what) failed.
    #[error("cannot listen on {addr}: {step}: {source}")]
    SocketSetup {
        addr: String,
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("local manifest store {path}: {source}")]
    ManifestStore {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A read of an export failed; names the image, chunk index and hash, and the cause.
/// (`Clone`: one failed fetch answers every read waiting for it; I/O errors are shared.)
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error("image {image}: read of {len} bytes at offset {offset} is outside the {size}-byte disk")]
    OutOfRange { image: ImageRef, offset: u64, len: u64, size: u64 },
    #[error("image {image}: chunk {index}: {source}")]
    Chunk {
        image: ImageRef,
        index: u64,
        hash: ChunkHash,
        #[source]
        source: Box<CacheError>,
    },
    #[error("image {image}: chunk {index} ({hash}): reading the cached file failed: {source}")]
    Io {
        image: ImageRef,
        index: u64,
        hash: ChunkHash,
        #[source]
        source: Arc<std::io::Error>,
    },
}
