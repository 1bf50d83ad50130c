//! The state every export of a proxy shares: the chunk cache, the chunk source, the settings,
//! uploads under way, the hot pages of warm images and the reads waiting for image servers;
//! and the read primitives over them.

use crate::cache::{Access, CacheError, ChunkCache, ChunkFile, Partial};
use crate::config::ProxyConfig;
use crate::error::ReadError;
use crate::hot::{self, HotState};
use crate::source::{ChunkSource, RangeBlocks, SourceError};
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
    /// Connections busy polling for their next request (`ProxyConfig::busy_poll`).
    pub pollers: crate::busy::Pollers,
}

/// A count of uploads under way, and a wake-up when one ends.
#[derive(Default)]
pub(crate) struct Uploads {
    pub n: std::sync::atomic::AtomicUsize,
    pub done: tokio::sync::Notify,
}

/// How [`Shared::blob_chunks`] fetches a chunk it misses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// The whole chunk, stored before the read is answered.
    Whole,
    /// The whole chunk, the read answered from memory while it is stored ([`Access::ReadEarly`]).
    WholeEarly,
    /// Only the blocks covering the blob's bytes `[offset, offset+len)`.
    Range { offset: u64, len: u64 },
}

impl Shared {
    pub fn new(cache: Arc<ChunkCache>, source: Arc<dyn ChunkSource>, config: ProxyConfig) -> Shared {
        Shared {
            cache,
            source,
            fetch_slots: Arc::new(tokio::sync::Semaphore::new(config.fetch_concurrency.max(1))),
            pollers: crate::busy::Pollers::new(config.busy_poll, config.busy_pollers),
            config,
            uploads: Default::default(),
            hot: Default::default(),
            waits: Default::default(),
        }
    }

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
        self.read_chunk_as(image, index, hash, len, Access::Read).await
    }

    /// [`Shared::read_chunk`] as `access` ([`Access::ReadEarly`]: answered before it is stored).
    async fn read_chunk_as(
        &self,
        image: &ImageRef,
        index: u64,
        hash: ChunkHash,
        len: u32,
        access: Access,
    ) -> Result<ChunkFile, CacheError> {
        let bounds = wait::Bounds { wait: self.config.fetch_timeout, attempt: self.config.fetch_attempt_timeout };
        let started = Instant::now();
        loop {
            let (source, waits, slots) = (self.source.clone(), self.waits.clone(), self.fetch_slots.clone());
            let read = wait::ForRead { image: image.clone(), chunk: index };
            match self.cache.get_or_fetch(&hash, len, access, move || wait::fetch(source, waits, read, hash, len, bounds, slots)).await {
                // The fetch this read joined was a single try (a prefetch's) and met the
                // outage: wait in a fetch of its own (or join the one a reader started).
                Err(e) if e.is_outage() && bounds.wait.is_none_or(|b| started.elapsed() < b) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                r => return r,
            }
        }
    }

    /// Bytes `[start, end)` of chunk `index` (hash `hash`, `len` bytes) of what `image`'s
    /// reader reads, for a random read: only the blocks covering them are fetched (verified
    /// through the chunk's BLAKE3 tree, see `cache.rs`), waiting through an outage like
    /// [`Shared::read_chunk`]. The chunk file returned may be partial: read only
    /// `[start, end)` of it. Falls back to the whole chunk when ranges do not apply (a chunk
    /// not a power of two long, a read of all of it with none of its blocks here, a whole
    /// fetch of it under way, a source that serves no ranges).
    pub async fn read_range(
        &self,
        image: &ImageRef,
        index: u64,
        hash: ChunkHash,
        len: u32,
        start: u32,
        end: u32,
    ) -> Result<ChunkFile, CacheError> {
        let block = self.config.range_block;
        if block == 0 || !vgrid_storeclient::tree::geometry_ok(block, len) {
            return self.read_chunk(image, index, hash, len).await;
        }
        // A read of all of it fetches it whole, unless blocks of it are here already (a
        // sequential reader reaching a chunk a random read began): then only the rest.
        let all = start / block == 0 && end.div_ceil(block) >= len / block;
        if all && !self.cache.has_partial(&hash) {
            return self.read_chunk(image, index, hash, len).await;
        }
        if let Some(f) = self.cache.get(&hash) {
            return Ok(f);
        }
        let Some(p) = self.cache.partial(&hash, len, block)? else {
            return self.read_chunk(image, index, hash, len).await;
        };
        if !p.has(start, end) {
            let _one = p.fetching.lock().await;
            let runs = p.missing(start, end);
            if !runs.is_empty() {
                let fetch = |first, n| self.fetch_blocks(image, index, hash, len, block, first, n);
                if !self.fill_runs(hash, &p, runs, Access::Read, fetch).await? {
                    drop(_one);
                    return self.read_chunk(image, index, hash, len).await;
                }
                return Ok(p.chunk_file());
            }
        }
        self.cache.count_hits(1);
        Ok(p.chunk_file())
    }

    /// Prefetches the blocks covering `ranges` (byte ranges within the chunk) of chunk
    /// `hash` (`len` bytes): a boot profile's part of it. One try, like [`Shared::chunk`]: an
    /// outage is an error at once. Nothing is fetched when the chunk is cached or coming
    /// whole; the whole chunk when ranges do not apply.
    pub(crate) async fn prefetch_blocks(&self, hash: ChunkHash, len: u32, ranges: &[vgrid_api::rest::ByteRange]) -> Result<(), CacheError> {
        let block = self.config.range_block;
        if block == 0 || !vgrid_storeclient::tree::geometry_ok(block, len) {
            return self.chunk(hash, len, Access::Prefetch).await.map(drop);
        }
        let Some(p) = self.cache.partial(&hash, len, block)? else { return Ok(()) };
        let _one = p.fetching.lock().await;
        let runs: Vec<(u32, u32)> =
            ranges.iter().filter(|r| r.offset < len).flat_map(|r| p.missing(r.offset, r.offset.saturating_add(r.len).min(len))).collect();
        if runs.is_empty() {
            return Ok(());
        }
        let limit = self.config.fetch_attempt_timeout;
        let fetch = |first: u32, n: u32| {
            let (source, slots) = (self.source.clone(), self.fetch_slots.clone());
            async move { wait::try_range_once(source.as_ref(), &hash, len, block, first * block, n * block, limit, &slots).await }
        };
        if !self.fill_runs(hash, &p, runs, Access::Prefetch, fetch).await? {
            drop(_one);
            return self.chunk(hash, len, Access::Prefetch).await.map(drop);
        }
        Ok(())
    }

    /// Fetches the runs `(first block, count)` of partial chunk `p` (of chunk `hash`) with
    /// `fetch` and stores them, verified; counted as a miss of a read or as a prefetch, as
    /// `access` says. `Ok(false)`: the source serves no ranges (fetch the chunk whole instead).
    async fn fill_runs<F, Fut>(
        &self,
        hash: ChunkHash,
        p: &Arc<Partial>,
        runs: Vec<(u32, u32)>,
        access: Access,
        fetch: F,
    ) -> Result<bool, CacheError>
    where
        F: Fn(u32, u32) -> Fut,
        Fut: std::future::Future<Output = Result<Option<RangeBlocks>, SourceError>>,
    {
        let t0 = Instant::now();
        let mut fetched = 0u64;
        for (first, n) in runs {
            match fetch(first, n).await {
                Ok(Some(r)) => {
                    fetched += (r.data.len() + 32 * r.cvs.len()) as u64;
                    let (c, p) = (self.cache.clone(), p.clone());
                    let stored = tokio::task::spawn_blocking(move || c.put_blocks(&p, first, &r)).await;
                    let stored =
                        stored.unwrap_or_else(|e| Err(crate::cache::io_err(self.cache.dir(), "store blocks", std::io::Error::other(e))));
                    if let Err(e) = stored {
                        self.cache.count_fetch_error();
                        return Err(e);
                    }
                }
                Ok(None) => {
                    if fetched > 0 {
                        self.cache.count_range_fetch(t0.elapsed(), fetched, access);
                    }
                    return Ok(false);
                }
                Err(e) => {
                    self.cache.count_fetch_error();
                    return Err(CacheError::Fetch { hash, source: e });
                }
            }
        }
        self.cache.count_range_fetch(t0.elapsed(), fetched, access);
        Ok(true)
    }

    /// Fetches `n` blocks of chunk `hash` from block `first` on, for a guest's read (waiting
    /// while the image servers are unreachable, see `wait.rs`).
    #[allow(clippy::too_many_arguments)]
    async fn fetch_blocks(
        &self,
        image: &ImageRef,
        index: u64,
        hash: ChunkHash,
        len: u32,
        block: u32,
        first: u32,
        n: u32,
    ) -> Result<Option<RangeBlocks>, SourceError> {
        let bounds = wait::Bounds { wait: self.config.fetch_timeout, attempt: self.config.fetch_attempt_timeout };
        let read = wait::ForRead { image: image.clone(), chunk: index };
        let (offset, bytes) = (first * block, n * block);
        let what = format!("chunk {hash} (bytes {offset}..{})", offset + bytes);
        wait::fetch_with(self.source.clone(), self.waits.clone(), read, hash, what, bounds, self.fetch_slots.clone(), move |s| {
            Box::pin(async move { s.chunk_range(&hash, len, block, offset, bytes).await })
        })
        .await
    }

    /// All chunk files of `blob` over chunk indices `first..=last` (`None` for zero chunks),
    /// fetching misses concurrently; a miss waits while the image servers are unreachable
    /// ([`Shared::read_chunk`]), and fetches as `miss` says: the whole chunk (answered before
    /// it is stored with [`Miss::WholeEarly`]) or only the blocks a random read `(offset,
    /// len)` of the blob covers ([`Shared::read_range`]: the files are then good for that read
    /// only).
    pub async fn blob_chunks(
        &self,
        image: &ImageRef,
        chunk_size: u32,
        blob: &Blob,
        first: u64,
        last: u64,
        miss: Miss,
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
                    async move {
                        let r = match miss {
                            // The part of the read in this chunk.
                            Miss::Range { offset, len: n } => {
                                let base = idx * chunk_size as u64;
                                let start = offset.max(base) - base;
                                let end = (offset + n).min(base + len as u64) - base;
                                self.read_range(image, idx, h, len, start as u32, end as u32).await
                            }
                            Miss::Whole => self.read_chunk(image, idx, h, len).await,
                            Miss::WholeEarly => self.read_chunk_as(image, idx, h, len, Access::ReadEarly).await,
                        };
                        (idx, h, r)
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyConfig;
    use futures::future::BoxFuture;
    use std::sync::atomic::{AtomicU32, Ordering};
    use vgrid_api::rest::BootProfile;

    /// Chunks from memory; counts whole and ranged fetches; serves ranges unless `no_ranges`,
    /// flips a byte of every range when `forge`.
    #[derive(Default)]
    struct Mem {
        chunks: HashMap<ChunkHash, Vec<u8>>,
        wholes: AtomicU32,
        ranges: AtomicU32,
        no_ranges: bool,
        forge: bool,
    }

    impl ChunkSource for Mem {
        fn manifest<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Manifest, SourceError>> {
            Box::pin(async move { Err(SourceError::NotFound { what: format!("image {image}"), source_name: "mem".into() }) })
        }
        fn chunk<'a>(&'a self, hash: &'a ChunkHash, _: usize) -> BoxFuture<'a, Result<Vec<u8>, SourceError>> {
            self.wholes.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Ok(self.chunks[hash].clone()) })
        }
        fn chunk_range<'a>(
            &'a self,
            hash: &'a ChunkHash,
            chunk_len: u32,
            block: u32,
            offset: u32,
            len: u32,
        ) -> BoxFuture<'a, Result<Option<RangeBlocks>, SourceError>> {
            Box::pin(async move {
                if self.no_ranges {
                    return Ok(None);
                }
                self.ranges.fetch_add(1, Ordering::SeqCst);
                // Slow enough for concurrent readers to meet.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let d = &self.chunks[hash];
                assert_eq!(d.len(), chunk_len as usize);
                let mut data = d[offset as usize..(offset + len) as usize].to_vec();
                if self.forge {
                    data[0] ^= 1;
                }
                Ok(Some(RangeBlocks { cvs: vgrid_storeclient::tree::block_cvs(d, block), data }))
            })
        }
        fn profile<'a>(&'a self, _: &'a ImageRef) -> BoxFuture<'a, Result<Option<BootProfile>, SourceError>> {
            Box::pin(async { Ok(None) })
        }
        fn put_profile<'a>(&'a self, _: &'a ImageRef, _: &'a BootProfile) -> BoxFuture<'a, Result<(), SourceError>> {
            Box::pin(async { Ok(()) })
        }
        fn describe(&self) -> String {
            "mem".into()
        }
    }

    const CS: u32 = 65536;
    const BLOCK: u32 = 16384;

    fn shared(dir: &std::path::Path, mem: Mem) -> (Arc<Shared>, Arc<Mem>) {
        let mem = Arc::new(mem);
        let mut config = ProxyConfig::new(dir, 1 << 30);
        config.range_block = BLOCK;
        let s = Shared::new(Arc::new(ChunkCache::open(dir, 1 << 30, 64).unwrap()), mem.clone(), config);
        (Arc::new(s), mem)
    }

    fn chunk(seed: u8) -> (ChunkHash, Vec<u8>) {
        let d: Vec<u8> = (0..CS).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 ^ seed).collect();
        (ChunkHash::of(&d), d)
    }

    fn read(f: &ChunkFile, start: u32, end: u32) -> Vec<u8> {
        let mut b = vec![0u8; (end - start) as usize];
        f.read_at(&mut b, start).unwrap();
        b
    }

    /// Concurrent random readers of one block share one ranged fetch; readers of the other
    /// blocks complete the chunk; each reader gets the chunk's bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_random_readers_share_fetches_and_complete_the_chunk() {
        let tmp = tempfile::tempdir().unwrap();
        let (h, d) = chunk(1);
        let (s, mem) = shared(tmp.path(), Mem { chunks: HashMap::from([(h, d.clone())]), ..Default::default() });
        let image: ImageRef = "img@1".parse().unwrap();
        let (a, b) = (BLOCK + 100, BLOCK + 4196);
        let readers: Vec<_> = (0..8)
            .map(|_| {
                let (s, image) = (s.clone(), image.clone());
                tokio::spawn(async move { s.read_range(&image, 0, h, CS, a, b).await.unwrap() })
            })
            .collect();
        for r in readers {
            assert_eq!(read(&r.await.unwrap(), a, b), &d[a as usize..b as usize]);
        }
        assert_eq!(mem.ranges.load(Ordering::SeqCst), 1);
        assert!(!s.cache.contains(&h));
        // Blocks 0, 2 and 3 by three readers at once (block 1 is there): three fetches.
        let readers: Vec<_> = [0u32, 2, 3]
            .into_iter()
            .map(|k| {
                let (s, image) = (s.clone(), image.clone());
                tokio::spawn(async move { (k, s.read_range(&image, 0, h, CS, k * BLOCK, k * BLOCK + 512).await.unwrap()) })
            })
            .collect();
        for r in readers {
            let (k, f) = r.await.unwrap();
            assert_eq!(read(&f, k * BLOCK, k * BLOCK + 512), &d[(k * BLOCK) as usize..(k * BLOCK + 512) as usize]);
        }
        assert_eq!((mem.ranges.load(Ordering::SeqCst), mem.wholes.load(Ordering::SeqCst)), (4, 0));
        assert!(s.cache.contains(&h));
        let st = s.cache.stats();
        assert_eq!((st.bytes_fetched, st.chunks_cached), (CS as u64 + 4 * 4 * 32, 1));
        // A read of all the blocks of a chunk fetches it whole.
        let (h2, d2) = chunk(2);
        let (s, mem) = shared(&tmp.path().join("2"), Mem { chunks: HashMap::from([(h2, d2.clone())]), ..Default::default() });
        let f = s.read_range(&image, 0, h2, CS, 10, CS - 10).await.unwrap();
        assert_eq!(read(&f, 0, CS), d2);
        assert_eq!((mem.ranges.load(Ordering::SeqCst), mem.wholes.load(Ordering::SeqCst)), (0, 1));
    }

    /// A source without ranges: the whole chunk. Forged blocks: an error, nothing cached or
    /// served.
    #[tokio::test]
    async fn no_ranges_fall_back_to_whole_chunks_and_forged_blocks_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (h, d) = chunk(3);
        let image: ImageRef = "img@1".parse().unwrap();
        let (s, mem) =
            shared(&tmp.path().join("a"), Mem { chunks: HashMap::from([(h, d.clone())]), no_ranges: true, ..Default::default() });
        let f = s.read_range(&image, 0, h, CS, 100, 200).await.unwrap();
        assert_eq!(read(&f, 0, CS), d);
        assert_eq!(mem.wholes.load(Ordering::SeqCst), 1);
        assert!(s.cache.contains(&h));

        let (s, mem) = shared(&tmp.path().join("b"), Mem { chunks: HashMap::from([(h, d.clone())]), forge: true, ..Default::default() });
        let e = s.read_range(&image, 0, h, CS, 100, 200).await.unwrap_err();
        assert!(matches!(e, CacheError::CorruptRange(_)), "{e}");
        assert!(e.to_string().contains(&h.to_hex()), "{e}");
        assert_eq!(mem.ranges.load(Ordering::SeqCst), 1);
        let st = s.cache.stats();
        assert_eq!((st.bytes_cached, st.fetch_errors), (0, 1));
        let p = s.cache.partial(&h, CS, BLOCK).unwrap().unwrap();
        assert!(!p.has(100, 200));
    }
}
