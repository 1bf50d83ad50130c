//! The image store's errors ([`StoreError`]), shared by the store, its shared-bucket state and
//! the HTTP server that maps them to status codes.

use vgrid_api::rest::UploadId;
use vgrid_api::{ChunkHash, ImageRef, ManifestError};
use vgrid_storeclient::codec::ChunkError;
use vgrid_storeclient::hotpages::HotPagesError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image {0} not found")]
    ImageNotFound(ImageRef),
    #[error("image {0} already exists (versions are immutable)")]
    ImageExists(ImageRef),
    #[error("image {image}: invalid manifest: {cause}")]
    InvalidManifest {
        image: String,
        #[source]
        cause: ManifestError,
    },
    #[error("{0}")]
    BadName(#[source] ManifestError),
    #[error("image {image}: stored manifest is unreadable: {cause}")]
    CorruptManifest {
        image: ImageRef,
        #[source]
        cause: Unreadable,
    },
    #[error("image {image}: {count} referenced chunk(s) are not in the store, first {first}")]
    MissingChunks { image: String, count: usize, first: ChunkHash, missing: Vec<ChunkHash> },
    #[error("chunk {0} not found")]
    ChunkNotFound(ChunkHash),
    /// A chunk in the store failed verification: never served, always logged.
    #[error("chunk {hash} is corrupt in the image store: {cause}")]
    ChunkCorrupt {
        hash: ChunkHash,
        #[source]
        cause: ChunkError,
    },
    /// A ranged read of a chunk that is not whole blocks inside it (or blocks that are not
    /// whole BLAKE3 subtrees of it).
    #[error("{0}")]
    BadRange(#[source] vgrid_storeclient::tree::TreeError),
    /// Uploaded bytes do not decode to the hash they were uploaded under.
    #[error("uploaded chunk {hash} rejected: {cause}")]
    BadUpload {
        hash: ChunkHash,
        #[source]
        cause: ChunkError,
    },
    #[error("upload session {0} is unknown or expired")]
    UploadNotFound(UploadId),
    #[error("boot profile of image {0} not found")]
    ProfileNotFound(ImageRef),
    #[error("boot profile of image {image}: chunk index {index} is beyond the disk's {chunks} chunks")]
    BadProfile { image: ImageRef, index: u64, chunks: usize },
    #[error("boot profile of image {image}: the part of chunk {chunk}: {cause}")]
    BadProfilePart { image: ImageRef, chunk: u64, cause: String },
    #[error("hot pages of image {0} not found")]
    HotPagesNotFound(ImageRef),
    #[error("hot pages of image {image} refused: {cause}")]
    BadHotPages {
        image: ImageRef,
        #[source]
        cause: HotPagesError,
    },
    #[error("hot pages of image {0} refused: the image has no saved RAM")]
    NoSavedRam(ImageRef),
    /// A commit of a volume whose read-write claim has moved on: the committing host's epoch
    /// is older than the volume's (its VM was taken over, e.g. after its host was lost).
    #[error("volume {volume}: commit refused: its writer's epoch {epoch} is older than the volume's {current} (the volume was attached read-write elsewhere since)")]
    Fenced { volume: String, epoch: u64, current: u64 },
    /// A volume's version over an image's name, or the other way round.
    /// A volume's epoch object (`volumes/NAME/epoch`) that is not `EPOCH [VERSION]`.
    #[error("volume {volume}: its epoch object is unreadable ({content:?}); refusing to guess its fencing epoch")]
    CorruptEpoch { volume: String, content: String },
    /// An object other servers kept changing under our conditional writes.
    #[error("{object}: changed by other image servers {tries} times in a row under our conditional writes; try again")]
    Contended { object: String, tries: u32 },
    #[error("{name} is {is}, not {not}: choose another name")]
    KindMismatch { name: String, is: &'static str, not: &'static str },
    /// Another image server on the same bucket is collecting garbage (see [`crate::shared`]).
    #[error("garbage collection is running on image server {holder} (its lease ends within {seconds} s); try again then")]
    GcBusy { holder: String, seconds: u64 },
    /// A store that cannot be shared safely (see [`crate::shared`]).
    #[error("image store {store} cannot be used: {why}")]
    Unsafe { store: String, why: String },
    #[error("image store is out of space while writing {object}")]
    NoSpace { object: String },
    #[error("image store: {op} {object} failed: {source}")]
    Backend {
        op: &'static str,
        object: String,
        #[source]
        source: object_store::Error,
    },
}

/// Why a stored manifest, or a record beside it, cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum Unreadable {
    #[error(transparent)]
    Manifest(ManifestError),
    #[error("owner record: {0}")]
    Owner(#[source] serde_json::Error),
    #[error("boot profile: {0}")]
    Profile(#[source] serde_json::Error),
}

impl StoreError {
    pub(crate) fn backend(op: &'static str, object: impl Into<String>, source: object_store::Error) -> Self {
        let object = object.into();
        if is_no_space(&source) {
            return StoreError::NoSpace { object };
        }
        StoreError::Backend { op, object, source }
    }
}

fn is_no_space(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc::ENOSPC) || io.raw_os_error() == Some(libc::EDQUOT) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}
