//! Where chunks and manifests come from: a small trait so the proxy does not depend on how the
//! image servers are reached (one server: `StoreSource`; several in order: `Servers`).

use futures::future::BoxFuture;
use std::sync::Arc;
use vgrid_api::rest::BootProfile;
use vgrid_api::{ChunkHash, ImageRef, Manifest};
pub use vgrid_storeclient::tree::RangeBlocks;

/// Bytes as they arrive from a source.
pub type ByteStream = futures::stream::BoxStream<'static, Result<bytes::Bytes, SourceError>>;

/// Why a source could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The object does not exist there (an answer, not a failure: try the next server).
    #[error("{what} not found on {source_name}")]
    NotFound { what: String, source_name: String },
    /// The object exists but its bytes are wrong (failed verification, bad manifest).
    #[error("{what} from {source_name} is corrupt: {cause}")]
    Corrupt {
        what: String,
        source_name: String,
        #[source]
        cause: Cause,
    },
    /// The source could not be reached or failed after its retries (an outage: a read
    /// waits and tries again, see `wait.rs`). [`crate::Servers`] names every server that
    /// failed in `source_name`, joined by `", "`.
    #[error("{what} could not be fetched from {source_name}: {cause}")]
    Unavailable {
        what: String,
        source_name: String,
        #[source]
        cause: Cause,
    },
    /// The image servers stayed unreachable for as long as a read may wait (the proxy's
    /// `fetch_timeout`, `--fetch-timeout`); `last` is the last failure.
    #[error("{what} could not be fetched within the fetch timeout of {secs} s (--fetch-timeout); last failure: {last}")]
    TimedOut {
        what: String,
        secs: u64,
        #[source]
        last: Box<SourceError>,
    },
}

/// What went wrong at a source: the error it got (e.g. the image server client's), or a
/// message. Cheap to clone: a failed fetch answers every reader waiting for it.
#[derive(Debug, Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    pub fn new(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Cause {
        Cause(Arc::from(e.into()))
    }
}

impl From<&str> for Cause {
    fn from(message: &str) -> Cause {
        Cause::new(message)
    }
}

impl From<String> for Cause {
    fn from(message: String) -> Cause {
        Cause::new(message)
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl SourceError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, SourceError::NotFound { .. })
    }

    /// An outage: the source could not be reached (worth waiting for, unlike an answer such
    /// as "not found" or corrupt bytes).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, SourceError::Unavailable { .. })
    }

    /// The source that answered (e.g. an image server's URL).
    pub fn source_name(&self) -> &str {
        match self {
            SourceError::NotFound { source_name, .. }
            | SourceError::Corrupt { source_name, .. }
            | SourceError::Unavailable { source_name, .. } => source_name,
            SourceError::TimedOut { last, .. } => last.source_name(),
        }
    }

    /// Every source named by [`SourceError::source_name`] (several when a list of servers
    /// failed together).
    pub fn source_names(&self) -> Vec<String> {
        self.source_name().split(", ").filter(|s| !s.is_empty()).map(str::to_string).collect()
    }
}

/// A supplier of manifests, verified chunks and boot profiles (an image server, or several).
///
/// Implementations must return chunk bytes that hash to the requested hash (the cache checks
/// again before storing). Every call must finish in bounded time (bounded retries).
pub trait ChunkSource: Send + Sync + 'static {
    /// The manifest of `image`; its latest version when `image.version` is `None`.
    fn manifest<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Manifest, SourceError>>;
    /// The plain bytes of chunk `hash`, at most `limit` bytes long, verified.
    fn chunk<'a>(&'a self, hash: &'a ChunkHash, limit: usize) -> BoxFuture<'a, Result<Vec<u8>, SourceError>>;
    /// Bytes `[offset, offset+len)`, whole `block`-byte blocks, of chunk `hash` (`chunk_len`
    /// bytes long) with the chaining values of every block of the chunk, verified against
    /// `hash` (`vgrid_storeclient::tree`; the cache checks again). `None` when this source
    /// cannot serve part of a chunk (an older image server): fetch the whole chunk instead.
    fn chunk_range<'a>(
        &'a self,
        _hash: &'a ChunkHash,
        _chunk_len: u32,
        _block: u32,
        _offset: u32,
        _len: u32,
    ) -> BoxFuture<'a, Result<Option<RangeBlocks>, SourceError>> {
        Box::pin(async { Ok(None) })
    }
    /// The boot profile of a (versioned) image, `None` when none was recorded yet.
    fn profile<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Option<BootProfile>, SourceError>>;
    /// Stores the boot profile of a (versioned) image.
    fn put_profile<'a>(&'a self, image: &'a ImageRef, profile: &'a BootProfile) -> BoxFuture<'a, Result<(), SourceError>>;
    /// The hot-page bundle of a (versioned) warm image as stored, as it arrives (unverified:
    /// see `vgrid_storeclient::hotpages::decode_stream`), `None` when there is none.
    fn hot_pages<'a>(&'a self, _image: &'a ImageRef) -> BoxFuture<'a, Result<Option<ByteStream>, SourceError>> {
        Box::pin(async { Ok(None) })
    }
    /// Stores the hot-page bundle of a (versioned) warm image.
    fn put_hot_pages<'a>(&'a self, image: &'a ImageRef, _bundle: bytes::Bytes) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            Err(SourceError::Unavailable {
                what: format!("hot pages of image {image}"),
                source_name: self.describe(),
                cause: "this source stores none".into(),
            })
        })
    }
    /// A short name for logs and errors (e.g. the server URL).
    fn describe(&self) -> String;
    /// How long since bytes last came from this source, for any request (`None`: unknown, or
    /// none yet). A fetch that waits long for its own bytes while this stays short shares a
    /// busy link with others and is not cut (see `wait::try_once`).
    fn quiet_for(&self) -> Option<std::time::Duration> {
        None
    }
}

impl<T: ChunkSource + ?Sized> ChunkSource for Arc<T> {
    fn manifest<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Manifest, SourceError>> {
        (**self).manifest(image)
    }
    fn chunk<'a>(&'a self, hash: &'a ChunkHash, limit: usize) -> BoxFuture<'a, Result<Vec<u8>, SourceError>> {
        (**self).chunk(hash, limit)
    }
    fn chunk_range<'a>(
        &'a self,
        hash: &'a ChunkHash,
        chunk_len: u32,
        block: u32,
        offset: u32,
        len: u32,
    ) -> BoxFuture<'a, Result<Option<RangeBlocks>, SourceError>> {
        (**self).chunk_range(hash, chunk_len, block, offset, len)
    }
    fn profile<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Option<BootProfile>, SourceError>> {
        (**self).profile(image)
    }
    fn put_profile<'a>(&'a self, image: &'a ImageRef, profile: &'a BootProfile) -> BoxFuture<'a, Result<(), SourceError>> {
        (**self).put_profile(image, profile)
    }
    fn hot_pages<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Option<ByteStream>, SourceError>> {
        (**self).hot_pages(image)
    }
    fn put_hot_pages<'a>(&'a self, image: &'a ImageRef, bundle: bytes::Bytes) -> BoxFuture<'a, Result<(), SourceError>> {
        (**self).put_hot_pages(image, bundle)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn quiet_for(&self) -> Option<std::time::Duration> {
        (**self).quiet_for()
    }
}
