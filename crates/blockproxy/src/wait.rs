//! The hard mount: a guest's read whose chunk cannot be fetched because no image server
//! answers waits for one to come back (as a read on an NFS hard mount waits for its server),
//! trying every server again with backoff, for as long as the operator allows
//! ([`crate::ProxyConfig::fetch_timeout`]). Only an answer ends the wait early: the bytes, or
//! a refusal worth an error (corrupt bytes, a chunk no reachable server has).
//!
//! One waiting fetch per chunk: it runs as the cache's single fetch of that chunk, so every
//! reader of the chunk waits on it. While it waits it is registered in [`Waits`], which the
//! proxy's stats and the host's heartbeat read; the log says when it starts waiting, every
//! [`LOG_EVERY`] while it waits, and when it goes on (with how long it waited).

use crate::source::{ChunkSource, RangeBlocks, SourceError};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use vgrid_api::{ChunkHash, ImageRef};

/// First pause between the tries of a waiting fetch; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a fetch that keeps waiting says so in the log.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Pauses between tries: 0.2 s, doubling, at most 5 s.
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff(BACKOFF_FIRST)
    }
    pub(crate) fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (d * 2).min(BACKOFF_MAX);
        d
    }
}

/// One try of fetching chunk `hash` from `source` (every server in turn, each with its
/// client's retries) once one of the proxy's fetch `slots` is free: see [`try_once_with`],
/// `quiet` being how long the source may stay silent. The slots bound the fetches in flight:
/// over a thin link, dozens of fetches at once (a kernel staged, a readahead, a prefetch)
/// would each get too little of it to finish.
pub(crate) async fn try_once(
    source: &dyn ChunkSource,
    hash: &ChunkHash,
    len: u32,
    quiet: Duration,
    slots: &Semaphore,
) -> Result<Vec<u8>, SourceError> {
    try_once_with(source, &format!("chunk {hash}"), quiet, None, slots, source.chunk(hash, len as usize)).await
}

/// [`try_once`] of bytes `[offset, offset+len)` (whole `block`-byte blocks) of chunk `hash`
/// (`chunk_len` bytes) with their chaining values; `None`: the source serves no ranges.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn try_range_once(
    source: &dyn ChunkSource,
    hash: &ChunkHash,
    chunk_len: u32,
    block: u32,
    offset: u32,
    len: u32,
    quiet: Duration,
    slots: &Semaphore,
) -> Result<Option<RangeBlocks>, SourceError> {
    let what = format!("chunk {hash} (bytes {offset}..{})", offset + len);
    try_once_with(source, &what, quiet, None, slots, source.chunk_range(hash, chunk_len, block, offset, len)).await
}

/// One try of a fetch `call` (of `what`) from `source`, once a fetch slot is free (the wait
/// for it not counted). The try counts as an outage, like a refused connection, when nothing
/// came from the source for `quiet` since it began — neither this fetch's bytes nor any
/// other's — or at `deadline` (what is left of a read's `fetch_timeout`). A fetch that shares
/// a thin link with others waits for its bytes while theirs arrive: a bound on its whole
/// answer would cut them all half-way and fetch them again, for ever.
async fn try_once_with<T>(
    source: &dyn ChunkSource,
    what: &str,
    quiet: Duration,
    deadline: Option<Instant>,
    slots: &Semaphore,
    call: impl std::future::Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    let _slot = slots.acquire().await.expect("the fetch slots are never closed");
    let started = Instant::now();
    let mut call = std::pin::pin!(call);
    loop {
        let now = Instant::now();
        let silent = source.quiet_for().map_or(now - started, |q| q.min(now - started));
        let cause = if silent >= quiet {
            format!("nothing came from the image servers for {:.1} s", silent.as_secs_f64())
        } else if deadline.is_some_and(|d| now >= d) {
            format!("no answer within {:.1} s (the rest of the fetch timeout)", (now - started).as_secs_f64())
        } else {
            let wake = now + (quiet - silent);
            tokio::select! {
                r = &mut call => return r,
                _ = tokio::time::sleep_until(deadline.map_or(wake, |d| d.min(wake)).into()) => continue,
            }
        };
        return Err(SourceError::Unavailable { what: what.to_string(), source_name: source.describe(), cause: cause.into() });
    }
}

/// The read a waiting fetch is for (the first reader's: several images may share a chunk).
#[derive(Debug, Clone)]
pub(crate) struct ForRead {
    pub image: ImageRef,
    /// The chunk's index in what the read reads (a disk, or a saved RAM).
    pub chunk: u64,
}

/// How long a waiting fetch may wait in all (`None`: for ever), and how long one try of it may
/// hear nothing from the source ([`try_once_with`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub wait: Option<Duration>,
    pub attempt: Duration,
}

/// Fetches chunk `hash` for `read`, waiting while its image servers are unreachable: tries
/// again after each outage with backoff until the bytes come, a server answers with a
/// refusal (returned as is), or `bounds.wait` has passed ([`SourceError::TimedOut`], naming
/// the bound and the last failure).
pub(crate) async fn fetch(
    source: Arc<dyn ChunkSource>,
    waits: Arc<Waits>,
    read: ForRead,
    hash: ChunkHash,
    len: u32,
    bounds: Bounds,
    slots: Arc<Semaphore>,
) -> Result<Vec<u8>, SourceError> {
    fetch_with(source, waits, read, hash, format!("chunk {hash}"), bounds, slots, move |s: Arc<dyn ChunkSource>| {
        Box::pin(async move { s.chunk(&hash, len as usize).await })
    })
    .await
}

/// [`fetch`] of any fetch `call` of chunk `hash` (`what`: e.g. a range of it), waiting the same
/// way while the image servers are unreachable.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn fetch_with<T, F>(
    source: Arc<dyn ChunkSource>,
    waits: Arc<Waits>,
    read: ForRead,
    hash: ChunkHash,
    what: String,
    bounds: Bounds,
    slots: Arc<Semaphore>,
    call: F,
) -> Result<T, SourceError>
where
    F: Fn(Arc<dyn ChunkSource>) -> futures::future::BoxFuture<'static, Result<T, SourceError>>,
{
    let started = Instant::now();
    let deadline = bounds.wait.map(|b| started + b);
    let mut backoff = Backoff::new();
    let mut waiting: Option<Waiting> = None;
    loop {
        let attempt = try_once_with(source.as_ref(), &what, bounds.attempt, deadline, &slots, call(source.clone()));
        let e = match attempt.await {
            Ok(data) => {
                if let Some(w) = waiting {
                    w.recovered();
                }
                return Ok(data);
            }
            Err(e) if !e.is_unavailable() => {
                if let Some(w) = waiting {
                    w.answered(&e);
                }
                return Err(e);
            }
            Err(e) => e,
        };
        match &mut waiting {
            None => waiting = Some(waits.begin(&read, hash, started, bounds.wait, &e)),
            Some(w) => w.failed(&e),
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let pause = backoff.next();
        tokio::time::sleep(left.map_or(pause, |l| l.min(pause))).await;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let err = SourceError::TimedOut { what, secs: bounds.wait.unwrap_or_default().as_secs(), last: Box::new(e) };
            if let Some(w) = waiting {
                w.gave_up(&err);
            }
            return Err(err);
        }
    }
}

/// The fetches waiting for image servers now, and counters of every wait since the proxy
/// started.
#[derive(Default)]
pub(crate) struct Waits {
    now: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
    /// Fetches that had to wait.
    pub(crate) started: AtomicU64,
    /// The longest wait that ended, in milliseconds.
    longest_ms: AtomicU64,
}

struct Entry {
    read: ForRead,
    hash: ChunkHash,
    since: Instant,
    error: SourceError,
}

/// A chunk fetch waiting for its image servers (in [`crate::CacheStats::waiting`]).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChunkWait {
    /// The image version read (`NAME@VERSION`).
    pub image: String,
    /// The chunk's index in what is read (the image's disk, or its saved RAM).
    pub chunk: u64,
    pub hash: String,
    /// The image servers that failed at the last try.
    pub servers: Vec<String>,
    /// The last failure.
    pub error: String,
    /// How long it has waited so far, in milliseconds.
    pub waiting_ms: u64,
}

impl Waits {
    /// A fetch that began at `since` failed its first try with `e`: it waits.
    fn begin(self: &Arc<Self>, read: &ForRead, hash: ChunkHash, since: Instant, bound: Option<Duration>, e: &SourceError) -> Waiting {
        let id = self.next_id.fetch_add(1, Relaxed);
        self.started.fetch_add(1, Relaxed);
        self.now.lock().unwrap().insert(id, Entry { read: read.clone(), hash, since, error: e.clone() });
        let up_to = bound.map_or("without bound".to_string(), |b| format!("up to {} s", b.as_secs()));
        tracing::warn!(
            image = %read.image, chunk = read.chunk, hash = %hash, servers = %e.source_name(),
            "image servers unreachable: the read waits for them ({up_to}, --fetch-timeout): {e}"
        );
        Waiting { waits: self.clone(), id, read: read.clone(), hash, since, logged: Instant::now() }
    }

    /// The fetches waiting now, longest first.
    pub(crate) fn snapshot(&self) -> Vec<ChunkWait> {
        let mut v: Vec<ChunkWait> = self
            .now
            .lock()
            .unwrap()
            .values()
            .map(|e| ChunkWait {
                image: e.read.image.to_string(),
                chunk: e.read.chunk,
                hash: e.hash.to_string(),
                servers: e.error.source_names(),
                error: e.error.to_string(),
                waiting_ms: e.since.elapsed().as_millis() as u64,
            })
            .collect();
        v.sort_by(|a, b| b.waiting_ms.cmp(&a.waiting_ms).then(a.chunk.cmp(&b.chunk)));
        v
    }

    /// The longest wait, ended or still going on, in milliseconds.
    pub(crate) fn longest_ms(&self, now: &[ChunkWait]) -> u64 {
        now.iter().map(|w| w.waiting_ms).fold(self.longest_ms.load(Relaxed), u64::max)
    }
}

/// One fetch's wait, registered in [`Waits`] while it lasts; `since` is when the fetch began
/// (its first, failed try is part of what the read waited).
struct Waiting {
    waits: Arc<Waits>,
    id: u64,
    read: ForRead,
    hash: ChunkHash,
    since: Instant,
    logged: Instant,
}

impl Waiting {
    /// Another try failed.
    fn failed(&mut self, e: &SourceError) {
        if let Some(entry) = self.waits.now.lock().unwrap().get_mut(&self.id) {
            entry.error = e.clone();
        }
        if self.logged.elapsed() >= LOG_EVERY {
            self.logged = Instant::now();
            tracing::warn!(
                image = %self.read.image, chunk = self.read.chunk, hash = %self.hash, servers = %e.source_name(),
                "the read still waits for the image servers, for {:.0} s now: {e}", self.since.elapsed().as_secs_f64()
            );
        }
    }

    fn recovered(self) {
        tracing::info!(
            image = %self.read.image, chunk = self.read.chunk, hash = %self.hash,
            "image servers answered again: the read goes on after waiting {:.1} s", self.since.elapsed().as_secs_f64()
        );
    }

    /// A server answered, with a refusal the read gets as its error.
    fn answered(self, e: &SourceError) {
        tracing::warn!(
            image = %self.read.image, chunk = self.read.chunk, hash = %self.hash,
            "image servers answered again after {:.1} s, refusing the chunk: {e}", self.since.elapsed().as_secs_f64()
        );
    }

    fn gave_up(self, e: &SourceError) {
        tracing::error!(image = %self.read.image, chunk = self.read.chunk, hash = %self.hash, "the read gives up: {e}");
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.waits.now.lock().unwrap().remove(&self.id);
        self.waits.longest_ms.fetch_max(self.since.elapsed().as_millis() as u64, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use std::sync::atomic::AtomicU32;
    use vgrid_api::rest::BootProfile;
    use vgrid_api::Manifest;

    /// A source that is down for its first `down` tries, then serves `data` (or `then`).
    struct Flaky {
        down: u32,
        tries: AtomicU32,
        data: Vec<u8>,
        then: Option<fn() -> SourceError>,
    }

    impl ChunkSource for Flaky {
        fn manifest<'a>(&'a self, _: &'a ImageRef) -> BoxFuture<'a, Result<Manifest, SourceError>> {
            unimplemented!("chunks only")
        }
        fn chunk<'a>(&'a self, _: &'a ChunkHash, _: usize) -> BoxFuture<'a, Result<Vec<u8>, SourceError>> {
            let n = self.tries.fetch_add(1, Relaxed);
            Box::pin(async move {
                if n < self.down {
                    return Err(SourceError::Unavailable { what: "chunk".into(), source_name: "a, b".into(), cause: "refused".into() });
                }
                match self.then {
                    Some(f) => Err(f()),
                    None => Ok(self.data.clone()),
                }
            })
        }
        fn profile<'a>(&'a self, _: &'a ImageRef) -> BoxFuture<'a, Result<Option<BootProfile>, SourceError>> {
            Box::pin(async { Ok(None) })
        }
        fn put_profile<'a>(&'a self, _: &'a ImageRef, _: &'a BootProfile) -> BoxFuture<'a, Result<(), SourceError>> {
            Box::pin(async { Ok(()) })
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    fn read() -> ForRead {
        ForRead { image: "img@2".parse().unwrap(), chunk: 7 }
    }

    fn bounds(wait: Option<Duration>) -> Bounds {
        Bounds { wait, attempt: Duration::from_secs(1) }
    }

    fn slots() -> Arc<Semaphore> {
        Arc::new(Semaphore::new(4))
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::new();
        let ms: Vec<u128> = (0..8).map(|_| b.next().as_millis()).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[tokio::test]
    async fn a_fetch_waits_through_an_outage_and_is_seen_waiting() {
        let src = Arc::new(Flaky { down: 3, tries: AtomicU32::new(0), data: b"bytes".to_vec(), then: None });
        let waits = Arc::new(Waits::default());
        let h = ChunkHash::of(b"bytes");
        let task = tokio::spawn(fetch(src.clone(), waits.clone(), read(), h, 5, bounds(None), slots()));
        // While it waits: one entry naming the read and every server that failed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = waits.snapshot();
        assert_eq!(now.len(), 1);
        assert_eq!((now[0].image.as_str(), now[0].chunk, now[0].servers.clone()), ("img@2", 7, vec!["a".to_string(), "b".to_string()]));
        assert!(now[0].error.contains("refused"), "{:?}", now[0]);
        assert_eq!(task.await.unwrap().unwrap(), b"bytes");
        assert_eq!(src.tries.load(Relaxed), 4);
        assert!(waits.snapshot().is_empty());
        assert_eq!(waits.started.load(Relaxed), 1);
        // It paused 0.2 + 0.4 + 0.8 s (sleeps never end early).
        assert!(waits.longest_ms(&[]) >= 1400);
    }

    #[tokio::test]
    async fn the_bound_ends_a_wait_and_answers_end_it_at_once() {
        let h = ChunkHash::of(b"x");
        let src = Arc::new(Flaky { down: u32::MAX, tries: AtomicU32::new(0), data: vec![], then: None });
        let waits = Arc::new(Waits::default());
        let e = fetch(src, waits.clone(), read(), h, 1, bounds(Some(Duration::from_secs(1))), slots()).await.unwrap_err();
        assert!(matches!(&e, SourceError::TimedOut { secs: 1, .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains(&format!("chunk {h}")) && text.contains("fetch timeout of 1 s") && text.contains("refused"), "{text}");
        assert!(waits.snapshot().is_empty());
        assert!(waits.longest_ms(&[]) >= 1000);

        // Corrupt bytes after an outage: the refusal, not a longer wait.
        let corrupt = || SourceError::Corrupt { what: "chunk".into(), source_name: "a".into(), cause: "hash mismatch".into() };
        let src = Arc::new(Flaky { down: 2, tries: AtomicU32::new(0), data: vec![], then: Some(corrupt) });
        let e = fetch(src.clone(), waits.clone(), read(), h, 1, bounds(None), slots()).await.unwrap_err();
        assert!(matches!(e, SourceError::Corrupt { .. }), "{e}");
        assert_eq!(src.tries.load(Relaxed), 3);
        assert_eq!(waits.started.load(Relaxed), 2);
    }
}
