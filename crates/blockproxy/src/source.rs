//! Where chunks and manifests come from: a small trait so the proxy does not depend on how the
//! image servers are reached, with [`Servers`] trying several sources in order.

use futures::future::BoxFuture;
use std::sync::Arc;
use vgrid_api::rest::BootProfile;
use vgrid_api::{ChunkHash, ImageRef, Manifest};

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
    Corrupt { what: String, source_name: String, cause: String },
    /// The source could not be reached or failed after its retries.
    #[error("{what} could not be fetched from {source_name}: {cause}")]
    Unavailable { what: String, source_name: String, cause: String },
}

impl SourceError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, SourceError::NotFound { .. })
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
}

impl<T: ChunkSource + ?Sized> ChunkSource for Arc<T> {
    fn manifest<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Manifest, SourceError>> {
        (**self).manifest(image)
    }
    fn chunk<'a>(&'a self, hash: &'a ChunkHash, limit: usize) -> BoxFuture<'a, Result<Vec<u8>, SourceError>> {
        (**self).chunk(hash, limit)
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
}

/// Several sources tried in order: the first one that answers wins. `NotFound` and failures
/// both move on to the next source; the error returned is the most telling one (a failure
/// beats "not found", since the object may exist on the server that failed). A source that
/// failed (unreachable after its retries) is tried last for [`Servers::BACKOFF`], so one dead
/// server does not slow every chunk down.
pub struct Servers {
    sources: Vec<Box<dyn ChunkSource>>,
    failed_at: std::sync::Mutex<Vec<Option<std::time::Instant>>>,
}

impl Servers {
    /// How long a failed source is tried after the others.
    pub const BACKOFF: std::time::Duration = std::time::Duration::from_secs(10);

    pub fn new(sources: Vec<Box<dyn ChunkSource>>) -> Self {
        let n = sources.len();
        Servers { sources, failed_at: std::sync::Mutex::new(vec![None; n]) }
    }

    /// Source indices in the order to try now: healthy ones first, in configured order.
    fn order(&self) -> Vec<usize> {
        let failed = self.failed_at.lock().unwrap();
        let (mut ok, mut bad): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
        for (i, f) in failed.iter().enumerate() {
            match f {
                Some(t) if t.elapsed() < Self::BACKOFF => bad.push(i),
                _ => ok.push(i),
            }
        }
        ok.extend(bad);
        ok
    }

    fn mark(&self, i: usize, failed: bool) {
        self.failed_at.lock().unwrap()[i] = failed.then(std::time::Instant::now);
    }

    /// Where what belongs with an image (its profile, its hot pages) is stored: the first
    /// server that has the image.
    async fn home(&self, image: &ImageRef) -> Result<&dyn ChunkSource, SourceError> {
        let mut last = None;
        for s in &self.sources {
            if s.manifest(image).await.is_ok() {
                return Ok(s.as_ref());
            }
            last = Some(s.describe());
        }
        Err(SourceError::NotFound { what: format!("image {image}"), source_name: last.unwrap_or_else(|| "(no image servers)".into()) })
    }

    async fn first<'a, T, F>(&'a self, what: &str, mut call: F) -> Result<T, SourceError>
    where
        F: FnMut(&'a dyn ChunkSource) -> BoxFuture<'a, Result<T, SourceError>>,
    {
        let mut err: Option<SourceError> = None;
        for i in self.order() {
            let s = &self.sources[i];
            match call(s.as_ref()).await {
                Ok(v) => {
                    self.mark(i, false);
                    return Ok(v);
                }
                Err(e) => {
                    self.mark(i, matches!(e, SourceError::Unavailable { .. }));
                    tracing::debug!(source = %s.describe(), "{what}: {e}");
                    if err.as_ref().is_none_or(|prev| prev.is_not_found()) {
                        err = Some(e);
                    }
                }
            }
        }
        Err(err.unwrap_or_else(|| SourceError::Unavailable {
            what: what.to_string(),
            source_name: "(no image servers configured)".into(),
            cause: "the source list is empty".into(),
        }))
    }
}

impl ChunkSource for Servers {
    fn manifest<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Manifest, SourceError>> {
        Box::pin(self.first("manifest", move |s| s.manifest(image)))
    }
    fn chunk<'a>(&'a self, hash: &'a ChunkHash, limit: usize) -> BoxFuture<'a, Result<Vec<u8>, SourceError>> {
        Box::pin(self.first("chunk", move |s| s.chunk(hash, limit)))
    }
    fn profile<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Option<BootProfile>, SourceError>> {
        Box::pin(async move {
            for s in &self.sources {
                if let Ok(Some(p)) = s.profile(image).await {
                    return Ok(Some(p));
                }
            }
            Ok(None)
        })
    }
    fn put_profile<'a>(&'a self, image: &'a ImageRef, profile: &'a BootProfile) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move { self.home(image).await?.put_profile(image, profile).await })
    }
    fn hot_pages<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Option<ByteStream>, SourceError>> {
        Box::pin(async move {
            for s in &self.sources {
                if let Ok(Some(b)) = s.hot_pages(image).await {
                    return Ok(Some(b));
                }
            }
            Ok(None)
        })
    }
    fn put_hot_pages<'a>(&'a self, image: &'a ImageRef, bundle: bytes::Bytes) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move { self.home(image).await?.put_hot_pages(image, bundle).await })
    }
    fn describe(&self) -> String {
        let names: Vec<String> = self.sources.iter().map(|s| s.describe()).collect();
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A scripted source for testing the combinator: answers chunks from memory or fails.
    struct Scripted {
        name: &'static str,
        answer: Result<Vec<u8>, fn(String) -> SourceError>,
        calls: Arc<AtomicU32>,
    }

    impl ChunkSource for Scripted {
        fn manifest<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Manifest, SourceError>> {
            Box::pin(async move { Err(SourceError::NotFound { what: format!("image {image}"), source_name: self.name.into() }) })
        }
        fn chunk<'a>(&'a self, _: &'a ChunkHash, _: usize) -> BoxFuture<'a, Result<Vec<u8>, SourceError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { self.answer.clone().map_err(|f| f(self.name.to_string())) })
        }
        fn profile<'a>(&'a self, _: &'a ImageRef) -> BoxFuture<'a, Result<Option<BootProfile>, SourceError>> {
            Box::pin(async { Ok(None) })
        }
        fn put_profile<'a>(&'a self, _: &'a ImageRef, _: &'a BootProfile) -> BoxFuture<'a, Result<(), SourceError>> {
            Box::pin(async { Ok(()) })
        }
        fn describe(&self) -> String {
            self.name.into()
        }
    }

    fn down(name: String) -> SourceError {
        SourceError::Unavailable { what: "chunk".into(), source_name: name, cause: "connection refused".into() }
    }
    fn missing(name: String) -> SourceError {
        SourceError::NotFound { what: "chunk".into(), source_name: name }
    }

    #[tokio::test]
    async fn servers_fall_through_and_skip_a_dead_one() {
        let (a, b) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let s = Servers::new(vec![
            Box::new(Scripted { name: "a", answer: Err(down), calls: a.clone() }),
            Box::new(Scripted { name: "b", answer: Ok(b"data".to_vec()), calls: b.clone() }),
        ]);
        let h = ChunkHash::of(b"data");
        assert_eq!(s.chunk(&h, 10).await.unwrap(), b"data");
        assert_eq!((a.load(Ordering::SeqCst), b.load(Ordering::SeqCst)), (1, 1));
        // The dead server is now tried after the live one.
        assert_eq!(s.chunk(&h, 10).await.unwrap(), b"data");
        assert_eq!((a.load(Ordering::SeqCst), b.load(Ordering::SeqCst)), (1, 2));

        // All failing: the failure wins over "not found".
        let s = Servers::new(vec![
            Box::new(Scripted { name: "x", answer: Err(missing), calls: Arc::default() }),
            Box::new(Scripted { name: "y", answer: Err(down), calls: Arc::default() }),
        ]);
        let e = s.chunk(&h, 10).await.unwrap_err();
        assert!(matches!(&e, SourceError::Unavailable { source_name, .. } if source_name == "y"), "{e}");
        let e = Servers::new(vec![]).chunk(&h, 10).await.unwrap_err();
        assert!(e.to_string().contains("no image servers"), "{e}");
    }
}
