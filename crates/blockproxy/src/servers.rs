//! The image servers a proxy reads from: several sources tried in order, as one
//! [`ChunkSource`]. The list can be replaced while the proxy runs (a host's coordinator
//! announces a different list at a heartbeat).

use crate::source::{ByteStream, ChunkSource, RangeBlocks, SourceError};
use crate::store_source::StoreSource;
use futures::future::BoxFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vgrid_api::rest::BootProfile;
use vgrid_api::{ChunkHash, ImageRef, Manifest};

/// Several sources tried in order: the first one that answers wins. `NotFound` and failures
/// both move on to the next source; the error returned is the most telling one (a failure
/// beats "not found", since the object may exist on the server that failed). A source that
/// failed (unreachable after its retries) is tried last for [`Servers::BACKOFF`], so one dead
/// server does not slow every chunk down.
///
/// [`Servers::set_urls`] replaces the list; calls under way finish on the list they began with.
pub struct Servers {
    current: Mutex<Arc<List>>,
}

/// One list of sources and their health.
struct List {
    /// The image server URLs the sources were made from; `None` for sources given as such.
    urls: Option<Vec<String>>,
    sources: Vec<Box<dyn ChunkSource>>,
    failed_at: Mutex<Vec<Option<Instant>>>,
}

impl Servers {
    /// How long a failed source is tried after the others.
    pub const BACKOFF: Duration = Duration::from_secs(10);

    /// These sources, in order.
    pub fn new(sources: Vec<Box<dyn ChunkSource>>) -> Self {
        Servers { current: Mutex::new(Arc::new(List::new(None, sources))) }
    }

    /// The image servers at `urls`, in order (each a [`StoreSource`]).
    pub fn from_urls(urls: Vec<String>) -> Result<Self, SourceError> {
        Ok(Servers { current: Mutex::new(Arc::new(List::from_urls(urls)?)) })
    }

    /// Replaces the list by the image servers at `urls`; a no-op when they are the list
    /// already. Answers whether the list changed. On error the list stays as it was.
    pub fn set_urls(&self, urls: Vec<String>) -> Result<bool, SourceError> {
        let mut cur = self.current.lock().unwrap();
        if cur.urls.as_ref() == Some(&urls) {
            return Ok(false);
        }
        let list = List::from_urls(urls.clone())?;
        tracing::info!(servers = ?urls, "image servers changed");
        *cur = Arc::new(list);
        Ok(true)
    }

    /// The URLs of the image servers read from, in order (empty when the list was made of
    /// sources given as such).
    pub fn urls(&self) -> Vec<String> {
        self.list().urls.clone().unwrap_or_default()
    }

    /// The list as it is now.
    fn list(&self) -> Arc<List> {
        self.current.lock().unwrap().clone()
    }
}

impl List {
    fn new(urls: Option<Vec<String>>, sources: Vec<Box<dyn ChunkSource>>) -> List {
        let n = sources.len();
        List { urls, sources, failed_at: Mutex::new(vec![None; n]) }
    }

    fn from_urls(urls: Vec<String>) -> Result<List, SourceError> {
        let mut sources: Vec<Box<dyn ChunkSource>> = Vec::with_capacity(urls.len());
        for url in &urls {
            sources.push(Box::new(StoreSource::from_url(url)?));
        }
        Ok(List::new(Some(urls), sources))
    }

    /// Source indices in the order to try now: healthy ones first, in configured order.
    fn order(&self) -> Vec<usize> {
        let failed = self.failed_at.lock().unwrap();
        let (mut ok, mut bad): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
        for (i, f) in failed.iter().enumerate() {
            match f {
                Some(t) if t.elapsed() < Servers::BACKOFF => bad.push(i),
                _ => ok.push(i),
            }
        }
        ok.extend(bad);
        ok
    }

    fn mark(&self, i: usize, failed: bool) {
        self.failed_at.lock().unwrap()[i] = failed.then(Instant::now);
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
        let mut down: Vec<(String, String)> = Vec::new();
        for i in self.order() {
            let s = &self.sources[i];
            match call(s.as_ref()).await {
                Ok(v) => {
                    self.mark(i, false);
                    return Ok(v);
                }
                Err(e) => {
                    self.mark(i, e.is_unavailable());
                    tracing::debug!(source = %s.describe(), "{what}: {e}");
                    if let SourceError::Unavailable { cause, .. } = &e {
                        down.push((s.describe(), cause.to_string()));
                    }
                    if err.as_ref().is_none_or(|prev| prev.is_not_found()) {
                        err = Some(e);
                    }
                }
            }
        }
        match err {
            // Every server that failed is named (an outage's log line and the VM's phase say
            // which servers a read waits for).
            Some(SourceError::Unavailable { what, .. }) if down.len() > 1 => {
                let names: Vec<&str> = down.iter().map(|(n, _)| n.as_str()).collect();
                let causes: Vec<String> = down.iter().map(|(n, c)| format!("{n}: {c}")).collect();
                Err(SourceError::Unavailable { what, source_name: names.join(", "), cause: causes.join("; ").into() })
            }
            Some(e) => Err(e),
            None => Err(SourceError::Unavailable {
                what: what.to_string(),
                source_name: "(no image servers configured)".into(),
                cause: "the source list is empty".into(),
            }),
        }
    }

    /// The first profile any server has; `Ok(None)` when a server answered and none had one,
    /// the first error when none could answer (an outage must not look like "no profile").
    async fn profile(&self, image: &ImageRef) -> Result<Option<BootProfile>, SourceError> {
        let mut err = None;
        let mut answered = false;
        for s in &self.sources {
            match s.profile(image).await {
                Ok(Some(p)) => return Ok(Some(p)),
                Ok(None) => answered = true,
                Err(e) => {
                    tracing::debug!(source = %s.describe(), image = %image, "boot profile lookup: {e}");
                    err.get_or_insert(e);
                }
            }
        }
        match err {
            Some(e) if !answered => Err(e),
            _ => Ok(None),
        }
    }

    async fn hot_pages(&self, image: &ImageRef) -> Result<Option<ByteStream>, SourceError> {
        for s in &self.sources {
            if let Ok(Some(b)) = s.hot_pages(image).await {
                return Ok(Some(b));
            }
        }
        Ok(None)
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self.sources.iter().map(|s| s.describe()).collect();
        names.join(", ")
    }
}

impl ChunkSource for Servers {
    fn manifest<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Manifest, SourceError>> {
        let list = self.list();
        Box::pin(async move { list.first("manifest", move |s| s.manifest(image)).await })
    }
    fn chunk<'a>(&'a self, hash: &'a ChunkHash, limit: usize) -> BoxFuture<'a, Result<Vec<u8>, SourceError>> {
        let list = self.list();
        Box::pin(async move {
            list.first("chunk", move |s| {
                Box::pin(async move {
                    let t0 = Instant::now();
                    let r = s.chunk(hash, limit).await;
                    crate::metrics::fetched(&s.describe(), t0.elapsed(), r.as_ref().ok().map(|d| d.len()));
                    r
                })
            })
            .await
        })
    }
    fn chunk_range<'a>(
        &'a self,
        hash: &'a ChunkHash,
        chunk_len: u32,
        block: u32,
        offset: u32,
        len: u32,
    ) -> BoxFuture<'a, Result<Option<RangeBlocks>, SourceError>> {
        let list = self.list();
        Box::pin(async move {
            list.first("chunk range", move |s| {
                Box::pin(async move {
                    let t0 = Instant::now();
                    let r = s.chunk_range(hash, chunk_len, block, offset, len).await;
                    match &r {
                        Ok(Some(b)) => crate::metrics::fetched(&s.describe(), t0.elapsed(), Some(b.data.len() + 32 * b.cvs.len())),
                        Err(_) => crate::metrics::fetched(&s.describe(), t0.elapsed(), None),
                        Ok(None) => {}
                    }
                    r
                })
            })
            .await
        })
    }
    fn profile<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Option<BootProfile>, SourceError>> {
        let list = self.list();
        Box::pin(async move { list.profile(image).await })
    }
    fn put_profile<'a>(&'a self, image: &'a ImageRef, profile: &'a BootProfile) -> BoxFuture<'a, Result<(), SourceError>> {
        let list = self.list();
        Box::pin(async move { list.home(image).await?.put_profile(image, profile).await })
    }
    fn hot_pages<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Option<ByteStream>, SourceError>> {
        let list = self.list();
        Box::pin(async move { list.hot_pages(image).await })
    }
    fn put_hot_pages<'a>(&'a self, image: &'a ImageRef, bundle: bytes::Bytes) -> BoxFuture<'a, Result<(), SourceError>> {
        let list = self.list();
        Box::pin(async move { list.home(image).await?.put_hot_pages(image, bundle).await })
    }
    fn describe(&self) -> String {
        self.list().describe()
    }
    /// The shortest of the servers': a try goes to one of them.
    fn quiet_for(&self) -> Option<Duration> {
        self.list().sources.iter().filter_map(|s| s.quiet_for()).min()
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

        // Several down: all of them are named, each with its cause.
        let s = Servers::new(vec![
            Box::new(Scripted { name: "p", answer: Err(down), calls: Arc::default() }),
            Box::new(Scripted { name: "q", answer: Err(missing), calls: Arc::default() }),
            Box::new(Scripted { name: "r", answer: Err(down), calls: Arc::default() }),
        ]);
        let e = s.chunk(&h, 10).await.unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        assert_eq!(e.source_names(), vec!["p", "r"]);
        assert!(e.to_string().contains("p: connection refused; r: connection refused"), "{e}");
    }

    #[test]
    fn set_urls_replaces_the_list_unless_unchanged() {
        let (a, b) = ("http://127.0.0.1:1".to_string(), "http://127.0.0.1:2".to_string());
        let s = Servers::from_urls(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!(s.urls(), vec![a.clone(), b.clone()]);
        assert_eq!(s.describe(), format!("{a}, {b}"));
        // The same list: kept as is, with what it learnt of its servers' health.
        s.list().mark(0, true);
        assert_eq!(s.list().order(), vec![1, 0]);
        let before = s.list();
        s.set_urls(vec![a.clone(), b.clone()]).unwrap();
        assert!(Arc::ptr_eq(&before, &s.list()));
        assert_eq!(s.list().order(), vec![1, 0]);
        // Another list: replaces it, in the order given, all healthy.
        s.set_urls(vec![b.clone(), a.clone()]).unwrap();
        assert_eq!(s.urls(), vec![b.clone(), a.clone()]);
        assert_eq!(s.describe(), format!("{b}, {a}"));
        assert_eq!(s.list().order(), vec![0, 1]);
        // A list with a bad URL is refused, naming it; the list stays.
        let e = s.set_urls(vec!["not a url".into()]).unwrap_err();
        assert!(e.to_string().contains("not a url"), "{e}");
        assert_eq!(s.urls(), vec![b.clone(), a.clone()]);
        // Sources given as such have no URLs; setting some replaces them.
        let s = Servers::new(vec![Box::new(Scripted { name: "x", answer: Ok(vec![]), calls: Arc::default() })]);
        assert!(s.urls().is_empty());
        assert_eq!(s.describe(), "x");
        s.set_urls(vec![]).unwrap();
        assert_eq!(s.describe(), "");
    }
}
