//! An open export: one image version's disk, read through the host chunk cache, with
//! readahead for sequential readers and boot-profile recording / prefetching.

use crate::cache::{Access, ChunkFile};
use crate::error::ReadError;
use crate::hot::{self, HotRead, HotState};
use crate::profile::Recording;
use crate::service::{copy_out, Miss, Shared};
use crate::wait::Backoff;
use futures::stream::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vgrid_api::rest::BootProfile;
use vgrid_api::{Blob, ChunkHash, ImageRef, Manifest};

/// The suffix of an export name that serves a warm image's saved RAM (`IMAGE@VERSION/ram`)
/// instead of its disk: a lazily restored guest maps its memory from it (see the host agent).
pub const RAM_EXPORT_SUFFIX: &str = "/ram";

/// How long after a saved RAM's export opens its background fetch starts.
const RAM_PREFETCH_DELAY: Duration = Duration::from_secs(3);

/// One image version's disk (or saved RAM) as the proxy serves it. Obtain with
/// [`crate::BlockProxy::open_export`].
pub struct Export {
    name: String,
    image: ImageRef,
    manifest: Arc<Manifest>,
    /// What is served: the disk, or the saved RAM of a warm image.
    blob: Blob,
    /// The saved RAM: read where the guest touches it, so no sequential readahead.
    ram: bool,
    /// Chunk size of `blob` (a saved RAM has its own).
    chunk_size: u32,
    shared: Arc<Shared>,
    recording: std::sync::OnceLock<Arc<Recording>>,
    readahead_slots: Arc<tokio::sync::Semaphore>,
}

impl Export {
    pub(crate) fn new(name: String, manifest: Arc<Manifest>, blob: Blob, chunk_size: u32, ram: bool, shared: Arc<Shared>) -> Arc<Export> {
        let slots = shared.config.readahead_chunks.max(1);
        Arc::new(Export {
            chunk_size,
            name,
            image: manifest.image_ref(),
            manifest,
            blob,
            ram,
            shared,
            recording: std::sync::OnceLock::new(),
            readahead_slots: Arc::new(tokio::sync::Semaphore::new(slots)),
        })
    }

    /// The export name the client asked for (`NAME` or `NAME@VERSION`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The resolved image version.
    pub fn image(&self) -> &ImageRef {
        &self.image
    }
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }
    /// Size in bytes of what is served (the disk, or the saved RAM).
    pub fn size(&self) -> u64 {
        self.blob.size
    }
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }
    /// Bytes of stored chunks not in the cache.
    pub fn uncached_bytes(&self) -> u64 {
        let cs = self.chunk_size();
        self.blob
            .chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_some_and(|h| !self.shared.cache.contains(&h)))
            .map(|(i, _)| self.blob.chunk_len(cs, i) as u64)
            .sum()
    }

    /// True if chunk `index` is all zeroes (not stored).
    pub fn is_zero_chunk(&self, index: u64) -> bool {
        self.blob.chunks.get(index as usize).is_some_and(|c| c.is_none())
    }

    /// Chunk files covering `[offset, offset+len)`; `len > 0` and the range inside the disk.
    pub(crate) async fn files(&self, offset: u64, len: u64) -> Result<(u64, Vec<Option<ChunkFile>>), ReadError> {
        self.files_for(offset, len, None).await
    }

    /// [`Export::files`] for one guest read, given `run`: what the connection read
    /// contiguously just before it (0 for a random read). A miss of a disk's chunk then
    /// fetches only blocks of it (see [`Shared::read_range`]): those the read covers, plus up
    /// to `run` bytes past it within its last chunk, so a sequential reader's window doubles as
    /// it goes, as the kernel's readahead does, instead of every short run fetching whole
    /// chunks; the files are good for `[offset, offset+len)` only. `None`: whole chunks.
    pub(crate) async fn files_for(&self, offset: u64, len: u64, run: Option<u64>) -> Result<(u64, Vec<Option<ChunkFile>>), ReadError> {
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(ReadError::OutOfRange { image: self.image.clone(), offset, len, size: self.size() });
        }
        let cs = self.chunk_size() as u64;
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        self.record(first, last, (!self.ram).then_some((offset, len)));
        if self.ram {
            tracing::trace!(export = %self.name, offset, len, "RAM read");
            self.record_pages(offset, len);
        }
        let last_end = ((last + 1) * cs).min(self.size());
        // A saved RAM's chunk is a guest's page fault: answered as soon as it is verified.
        let miss = match run {
            _ if self.ram => Miss::WholeEarly,
            Some(run) => Miss::Range { offset, len: len.saturating_add(run).min(last_end - offset) },
            None => Miss::Whole,
        };
        let files = self.shared.blob_chunks(&self.image, self.chunk_size(), &self.blob, first, last, miss).await?;
        Ok((first, files))
    }

    /// Chunk files covering `[offset, offset+len)` if every stored chunk there is cached
    /// (no fetch, no await); `None` otherwise. The range must be valid.
    pub(crate) fn cached_files(&self, offset: u64, len: u64) -> Option<(u64, Vec<Option<ChunkFile>>)> {
        let cs = self.chunk_size() as u64;
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        let mut out = Vec::with_capacity((last - first + 1) as usize);
        let mut hits = 0;
        for idx in first..=last {
            match self.blob.chunks[idx as usize] {
                None => out.push(None),
                Some(h) => {
                    out.push(Some(self.shared.cache.get_uncounted(&h)?));
                    hits += 1;
                }
            }
        }
        self.shared.cache.count_hits(hits);
        self.record(first, last, (!self.ram).then_some((offset, len)));
        if self.ram {
            self.record_pages(offset, len);
        }
        Some((first, out))
    }

    /// A read of a saved RAM answered from its image's hot pages (see `hot.rs`): the bytes
    /// if every page of the range is hot (waiting briefly for announced pages still on their
    /// way), `None` to read the chunks. Always `None` for a disk.
    pub(crate) async fn hot_read(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + hot::LOAD_WAIT;
        loop {
            let st = self.hot_state(offset, len)?;
            let mut changes = st.subscribe();
            if let Ok(r) = self.take_hot(&st, offset, len) {
                return r;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// Like [`Export::hot_read`] without waiting: `Err(())` when pages are on their way.
    pub(crate) fn hot_read_now(&self, offset: u64, len: u64) -> Result<Option<Vec<u8>>, ()> {
        match self.hot_state(offset, len) {
            Some(st) => self.take_hot(&st, offset, len),
            None => Ok(None),
        }
    }

    /// The hot pages a read of `[offset, offset+len)` may use: a valid read of a saved RAM
    /// whose image has some loading or loaded here.
    fn hot_state(&self, offset: u64, len: u64) -> Option<Arc<HotState>> {
        if !self.ram || len == 0 || offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return None;
        }
        self.shared.hot_state(&self.image)
    }

    /// The read from `st`, recorded when answered: `Err(())` when pages are on their way.
    fn take_hot(&self, st: &HotState, offset: u64, len: u64) -> Result<Option<Vec<u8>>, ()> {
        match st.read(offset, len) {
            HotRead::Data(d) => {
                self.record_hot(offset, len);
                Ok(Some(d))
            }
            HotRead::Wait => Err(()),
            HotRead::No => Ok(None),
        }
    }

    fn record_hot(&self, offset: u64, len: u64) {
        let cs = self.chunk_size() as u64;
        self.record(offset / cs, (offset + len - 1) / cs, None);
        self.record_pages(offset, len);
    }

    /// Copies `[offset, offset+buf.len())` of the chunk files returned by [`Export::files`].
    pub(crate) fn copy(&self, first: u64, files: &[Option<ChunkFile>], offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        copy_out(&self.image, &self.blob, self.chunk_size(), first, files, offset, buf)
    }

    /// Reads `buf.len()` bytes of the disk at `offset` through the cache. Zero-length reads
    /// succeed; reads outside the disk are an error.
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        if buf.is_empty() {
            return Ok(());
        }
        let (first, files) = self.files(offset, buf.len() as u64).await?;
        self.copy(first, &files, offset, buf)
    }

    /// Starts fetching the chunks after `end` in the background (readahead) for a reader that
    /// has read `run` bytes contiguously up to `end`: one chunk ahead per chunk it has read, at
    /// most `readahead_chunks`, and at most that many fetches in flight per export.
    pub(crate) fn readahead(self: &Arc<Self>, end: u64, run: u64) {
        let cs = self.chunk_size() as u64;
        let n = (self.shared.config.readahead_chunks as u64).min(run / cs);
        if n == 0 || self.ram || end >= self.size() {
            return;
        }
        let first = end.div_ceil(cs);
        let last = (first + n).min(self.blob.chunks.len() as u64);
        for idx in first..last {
            let Some(hash) = self.blob.chunks[idx as usize] else { continue };
            // Cached, or coming (an earlier read's readahead): no second fetch, no slot taken.
            if self.shared.cache.cached_or_coming(&hash) {
                continue;
            }
            let Ok(permit) = self.readahead_slots.clone().try_acquire_owned() else { return };
            let len = self.blob.chunk_len(self.chunk_size(), idx as usize);
            let shared = self.shared.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = shared.chunk(hash, len, Access::Prefetch).await {
                    tracing::debug!(chunk = idx, hash = %hash, "readahead failed: {e}");
                }
            });
        }
    }

    /// Records this export's reads into `rec` (the image version's boot-profile recording).
    pub(crate) fn attach_recording(&self, rec: Arc<Recording>) {
        let _ = self.recording.set(rec);
    }

    /// Records the saved-RAM pages of `[offset, offset+len)` (a warm image's hot pages).
    fn record_pages(&self, offset: u64, len: u64) {
        if let Some(r) = self.recording.get() {
            let ps = vgrid_storeclient::hotpages::HOT_PAGE_SIZE as u64;
            r.record_pages(offset / ps, (offset + len - 1) / ps);
        }
    }

    /// Records a read of chunks `first..=last` (and, of a disk, its bytes `range`: the boot
    /// profile's parts).
    fn record(&self, first: u64, last: u64, range: Option<(u64, u64)>) {
        if let Some(r) = self.recording.get() {
            // A saved RAM's chunks follow the disk's in a profile.
            let off = if self.ram { self.manifest.disk.chunks.len() as u64 } else { 0 };
            r.record(first + off, last + off, range, |i| self.is_zero_chunk(i - off));
        }
    }

    /// Fetches every stored chunk of the export into the cache in the background, in order,
    /// `concurrency` at a time, while the export is open (a saved RAM: the guest's later page
    /// faults are then local, and it stops depending on the image server). Demand reads are
    /// served meanwhile; a chunk both want is fetched once.
    pub(crate) fn prefetch_all(self: &Arc<Self>, concurrency: usize) {
        let weak = Arc::downgrade(self);
        let shared = self.shared.clone();
        let image = self.image.clone();
        let name = self.name.clone();
        let wanted: Vec<(u64, ChunkHash, u32)> = self
            .blob
            .chunks
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.map(|h| (i as u64, h, self.blob.chunk_len(self.chunk_size(), i))))
            .collect();
        tokio::spawn(async move {
            // The first moments are the guest's: its page faults come one at a time, each
            // waiting for its chunk, and a background fetch sharing the link delays them.
            tokio::time::sleep(RAM_PREFETCH_DELAY).await;
            let started = Instant::now();
            let n = wanted.len();
            futures::stream::iter(wanted)
                .for_each_concurrent(concurrency.max(1), |(i, h, len)| {
                    let (shared, weak) = (shared.clone(), weak.clone());
                    async move {
                        // An outage pauses it (the guest's own reads wait meanwhile); it goes
                        // on once a server answers, while the export is open.
                        let mut backoff = Backoff::new();
                        while weak.strong_count() > 0 && !shared.cache.contains(&h) {
                            match shared.chunk(h, len, Access::Prefetch).await {
                                Err(e) if e.is_outage() => tokio::time::sleep(backoff.next()).await,
                                Err(e) => {
                                    tracing::debug!(chunk = i, hash = %h, "prefetch failed: {e}");
                                    return;
                                }
                                Ok(_) => return,
                            }
                        }
                    }
                })
                .await;
            tracing::info!(image = %image, export = %name, chunks = n, "export prefetched in {:.1} s", started.elapsed().as_secs_f64());
            // All of it is cached now: its hot pages are of no more use.
            if weak.strong_count() > 0 {
                shared.drop_hot(&image);
            }
        });
    }
}

/// Prefetches `profile`'s chunks of `image` into the cache, in order with bounded concurrency,
/// in the background (holding no export open). The image servers becoming unreachable stops
/// it: the guest's reads then fetch what they need (and wait for the servers, see `wait.rs`).
pub(crate) fn prefetch_profile(shared: Arc<Shared>, manifest: Arc<Manifest>, image: ImageRef, profile: BootProfile) {
    let conc = shared.config.profile_prefetch_concurrency.max(1);
    tokio::spawn(async move {
        let started = Instant::now();
        // A chunk the boot read only in part: only those parts (see `profile.rs`).
        let parts: std::collections::HashMap<u64, Vec<vgrid_api::rest::ByteRange>> =
            profile.parts.into_iter().map(|p| (p.chunk, p.ranges)).collect();
        let parts = &parts;
        let wanted: Vec<(u64, ChunkHash, u32)> =
            profile.chunks.iter().filter_map(|&i| manifest.profile_chunk(i).map(|(h, len)| (i, h, len))).collect();
        let n = wanted.len();
        let stopped = std::sync::atomic::AtomicBool::new(false);
        futures::stream::iter(wanted)
            .for_each_concurrent(conc, |(i, h, len)| {
                let (shared, stopped, image) = (shared.clone(), &stopped, &image);
                async move {
                    if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let fetched = match parts.get(&i) {
                        Some(ranges) => shared.prefetch_blocks(h, len, ranges).await,
                        None => shared.chunk(h, len, Access::Prefetch).await.map(drop),
                    };
                    match fetched {
                        Err(e) if e.is_outage() => {
                            if !stopped.swap(true, std::sync::atomic::Ordering::Relaxed) {
                                tracing::warn!(image = %image, "boot profile prefetch stopped, image servers unreachable: {e}");
                            }
                        }
                        Err(e) => tracing::debug!(chunk = i, hash = %h, "profile prefetch failed: {e}"),
                        Ok(_) => {}
                    }
                }
            })
            .await;
        if stopped.into_inner() {
            return;
        }
        tracing::info!(image = %image, chunks = n, "boot profile prefetched in {:.1} s", started.elapsed().as_secs_f64());
    });
}

impl Drop for Export {
    /// The last export of a warm image's recording closing (its guests are gone) ends it now:
    /// what they read is the profile, uploaded before this host might go away too.
    fn drop(&mut self) {
        if self.ram {
            self.shared.drop_hot(&self.image);
        }
        if let Some(rec) = self.recording.get() {
            // Besides this export, only the recording's timer holds it. (A cold image's boot
            // profile may gather reads of several sessions within its window.)
            if rec.finish_on_close && Arc::strong_count(rec) <= 2 {
                rec.finish();
            }
        }
    }
}
