//! The state every export of a proxy shares: the chunk cache, the chunk source, the settings,
//! uploads under way, the hot pages of warm images and the reads waiting for image servers;
//! and the read primitives over them.

use crate::cache::{Access, CacheError, ChunkCache, ChunkFile};
use crate::config::ProxyConfig;
use crate::error::ReadError;
use crate::hot::{self, HotState};
use crate::source::ChunkSource;
use crate::wait::{self, Waits};
use futures::stream::{FuturesOrdered, StreamExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vgrid_api::{Blob, ChunkHash, ImageRef, Manifest};

/// The state the proxy and its exports share (services an export needs from the proxy).
pub(crate) struct Shared {
    pub cache: Arc<ChunkCache>,
    pub source: Arc<dyn ChunkSource>,
    pub config: ProxyConfig,
    /// Boot-profile uploads under way (a stopping host waits for them briefly).
    pub uploads: Arc<Uploads>,
    /// Hot pages of warm images being restored here (see `hot.rs`).
    pub hot: Mutex<HashMap<ImageRef, Arc<HotState>>>,
    /// Reads waiting for image servers (see `wait.rs`).
    pub waits: Arc<Waits>,
    /// Chunk fetches in flight at once (`ProxyConfig::fetch_concurrency`; see `wait::try_once`).
    pub fetch_slots: Arc<tokio::sync::Semaphore>,
}

/// A count of uploads under way, and a wake-up when one ends.
#[derive(Default)]
pub(crate) struct Uploads {
    pub n: std::sync::atomic::AtomicUsize,
    pub done: tokio::sync::Notify,
}

impl Shared {
    /// Fetches (or finds) one chunk through the cache, trying the image servers once (a
    /// prefetch, a pull): an outage is an error at once.
    pub async fn chunk(&self, hash: ChunkHash, len: u32, access: Access) -> Result<ChunkFile, CacheError> {
        let (source, slots) = (self.source.clone(), self.fetch_slots.clone());
        let limit = self.config.fetch_attempt_timeout;
        self.cache
            .get_or_fetch(&hash, len, access, move || async move { wait::try_once(source.as_ref(), &hash, len, limit, &slots).await })
            .await
    }

    /// Fetches (or finds) chunk `index` (hash `hash`) of what `image`'s reader reads through
    /// the cache, for a guest's read: while the image servers are unreachable it waits for
    /// them, up to `fetch_timeout` (see `wait.rs`). Concurrent readers of the chunk share one
    /// waiting fetch.
    pub async fn read_chunk(&self, image: &ImageRef, index: u64, hash: ChunkHash, len: u32) -> Result<ChunkFile, CacheError> {
        let bounds = wait::Bounds { wait: self.config.fetch_timeout, attempt: self.config.fetch_attempt_timeout };
        let started = Instant::now();
        loop {
            let (source, waits, slots) = (self.source.clone(), self.waits.clone(), self.fetch_slots.clone());
            let read = wait::ForRead { image: image.clone(), chunk: index };
            match self
                .cache
                .get_or_fetch(&hash, len, Access::Read, move || wait::fetch(source, waits, read, hash, len, bounds, slots))
                .await
            {
                // The fetch this read joined was a single try (a prefetch's) and met the
                // outage: wait in a fetch of its own (or join the one a reader started).
                Err(e) if e.is_outage() && bounds.wait.is_none_or(|b| started.elapsed() < b) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                r => return r,
            }
        }
    }

    /// All chunk files of `blob` over chunk indices `first..=last` (`None` for zero chunks),
    /// fetching misses concurrently; a miss waits while the image servers are unreachable
    /// ([`Shared::read_chunk`]).
    pub async fn blob_chunks(
        &self,
        image: &ImageRef,
        chunk_size: u32,
        blob: &Blob,
        first: u64,
        last: u64,
    ) -> Result<Vec<Option<ChunkFile>>, ReadError> {
        let mut out: Vec<Option<ChunkFile>> = Vec::with_capacity((last - first + 1) as usize);
        let mut missing = Vec::new();
        for idx in first..=last {
            match blob.chunks[idx as usize] {
                None => out.push(None),
                Some(h) => match self.cache.get(&h) {
                    Some(f) => out.push(Some(f)),
                    None => {
                        missing.push((idx, h));
                        out.push(None);
                    }
                },
            }
        }
        if !missing.is_empty() {
            let mut futs: FuturesOrdered<_> = missing
                .iter()
                .map(|&(idx, h)| {
                    let len = blob.chunk_len(chunk_size, idx as usize);
                    async move { (idx, h, self.read_chunk(image, idx, h, len).await) }
                })
                .collect();
            while let Some((idx, hash, r)) = futs.next().await {
                match r {
                    Ok(f) => out[(idx - first) as usize] = Some(f),
                    Err(cause) => {
                        let e = ReadError::Chunk { image: image.clone(), index: idx, hash, source: Box::new(cause) };
                        tracing::error!(image = %image, chunk = idx, hash = %hash, "read failed: {e}");
                        return Err(e);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Copies `[offset, offset+buf.len())` of a blob from `files` (chunk files for chunk indices
/// starting at `first`; `None` = zeroes) into `buf`.
pub(crate) fn copy_out(
    image: &ImageRef,
    blob: &Blob,
    chunk_size: u32,
    first: u64,
    files: &[Option<ChunkFile>],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), ReadError> {
    let cs = chunk_size as u64;
    let mut pos = offset;
    let mut done = 0usize;
    while done < buf.len() {
        let idx = pos / cs;
        let in_chunk = (pos % cs) as u32;
        let n = ((cs - in_chunk as u64) as usize).min(buf.len() - done);
        let dst = &mut buf[done..done + n];
        match &files[(idx - first) as usize] {
            None => dst.fill(0),
            Some(f) => f.read_at(dst, in_chunk).map_err(|e| {
                let hash = blob.chunks[idx as usize].expect("a chunk file exists only for stored chunks");
                let err = ReadError::Io { image: image.clone(), index: idx, hash, source: Arc::new(e) };
                tracing::error!(image = %image, chunk = idx, hash = %hash, "read failed: {err}");
                err
            })?,
        }
        done += n;
        pos += n as u64;
    }
    Ok(())
}

impl Shared {
    /// The hot pages of `image`, if any are loading or loaded here.
    pub(crate) fn hot_state(&self, image: &ImageRef) -> Option<Arc<HotState>> {
        self.hot.lock().unwrap().get(image).cloned()
    }

    /// Forgets the hot pages of `image` (its saved RAM is cached whole, or no longer served).
    pub(crate) fn drop_hot(&self, image: &ImageRef) {
        if let Some(s) = self.hot.lock().unwrap().remove(image) {
            s.end();
        }
    }

    /// Streams in and verifies the hot-page bundle of warm image `manifest`, which its profile
    /// says has `n` pages (see [`hot::load`]); pages no read used are dropped after a while.
    pub(crate) fn load_hot(self: &Arc<Self>, manifest: Arc<Manifest>, n: u64) {
        let Some(ram) = manifest.state.as_ref().and_then(|s| s.ram.clone()) else { return };
        let image = manifest.image_ref();
        let st = HotState::new();
        self.hot.lock().unwrap().insert(image.clone(), st.clone());
        let shared = self.clone();
        tokio::spawn(async move {
            if !hot::load(&st, shared.source.as_ref(), &shared.cache, &image, ram, n).await {
                return;
            }
            // Weak while waiting: this task must not keep a stopped proxy's cache alive.
            let weak = Arc::downgrade(&shared);
            drop(shared);
            tokio::time::sleep(hot::UNUSED_FOR).await;
            let Some(shared) = weak.upgrade() else { return };
            let mut map = shared.hot.lock().unwrap();
            if st.unused() && map.get(&image).is_some_and(|cur| Arc::ptr_eq(cur, &st)) {
                map.remove(&image);
                tracing::debug!(image = %image, "hot pages dropped: no read used them");
            }
        });
    }
}
