//! Boot-profile recording: which chunks (and saved-RAM pages) an image version's first
//! guests read, uploaded to the image server for later openings to prefetch.

use crate::hot;
use crate::service::{Shared, Uploads};
use crate::source::ChunkSource;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vgrid_api::rest::{BootProfile, ByteRange, ChunkPart};
use vgrid_api::{ImageRef, Manifest};

/// A boot profile being recorded for one image version: the disk chunk indices read (by any
/// export of that version) during the window after its first opening, in first-touch order.
/// Uploaded when the window ends or the chunk limit is reached.
pub(crate) struct Recording {
    image: ImageRef,
    manifest: Arc<Manifest>,
    started: Instant,
    window: Duration,
    max: usize,
    /// Block size of the disk parts recorded (the host's `range_block`); 0: whole chunks only.
    block: u32,
    source: Arc<dyn ChunkSource>,
    uploads: Arc<Uploads>,
    /// For the hot-page bundle, made from the cache (weak: a recording must not keep a
    /// stopped proxy's cache, and its directory lock, alive until its window ends).
    shared: std::sync::Weak<Shared>,
    /// Ends when its last export closes (a warm image: what its restored guest touched).
    pub(crate) finish_on_close: bool,
    state: Mutex<Option<RecState>>,
    /// The image's existing profile and the hot pages of it this restore is served (see
    /// [`Recording::refine`]); `None`: a first recording.
    refining: Mutex<Option<(BootProfile, Arc<hot::HotState>)>>,
    /// The image server said the image has no profile: this recording is its first.
    first: std::sync::atomic::AtomicBool,
}

struct RecState {
    chunks: Vec<u64>,
    seen: HashSet<u64>,
    /// Per disk chunk read: which of its blocks were read (one bit each).
    blocks: std::collections::HashMap<u64, Vec<u64>>,
    /// Saved-RAM pages (of `HOT_PAGE_SIZE`) in first-touch order: a warm image's hot pages.
    pages: Vec<u64>,
    seen_pages: HashSet<u64>,
}

impl Recording {
    /// Starts recording for `image`; a timer uploads the result when the window ends.
    pub(crate) fn start(manifest: Arc<Manifest>, window: Duration, finish_on_close: bool, shared: &Arc<Shared>) -> Arc<Recording> {
        let cfg = &shared.config;
        let rec = Arc::new(Recording {
            image: manifest.image_ref(),
            manifest,
            started: Instant::now(),
            window,
            max: cfg.profile_max_chunks.max(1),
            block: cfg.range_block,
            source: shared.source.clone(),
            uploads: shared.uploads.clone(),
            shared: Arc::downgrade(shared),
            finish_on_close,
            state: Mutex::new(Some(RecState {
                chunks: Vec::new(),
                seen: HashSet::new(),
                blocks: Default::default(),
                pages: Vec::new(),
                seen_pages: HashSet::new(),
            })),
            refining: Mutex::new(None),
            first: std::sync::atomic::AtomicBool::new(false),
        });
        tracing::info!(image = %rec.image, "recording boot profile for {} s", rec.window.as_secs());
        let r = rec.clone();
        tokio::spawn(async move {
            tokio::time::sleep(r.window).await;
            r.finish();
        });
        rec
    }

    /// The image has no profile yet (its lookup said so): this recording will be its first.
    pub(crate) fn mark_first(&self) {
        self.first.store(true, std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn is_first(&self) -> bool {
        self.first.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Drops the recording without uploading it (the image has a profile already).
    pub(crate) fn cancel(&self) {
        self.state.lock().unwrap().take();
    }

    /// Makes this recording (of a warm image restored with `profile`'s hot pages) refine that
    /// profile instead: when it ends, saved-RAM pages this guest touched that the bundle did
    /// not announce (each cost a chunk fetch while the guest waited) are added to the bundle,
    /// which is uploaded again with them. A guest does not touch exactly the same pages at
    /// every restore (the first restore's guest runs slower and allocates differently), so
    /// the hot pages learn from the restores that follow. Nothing is uploaded when every
    /// touched page was announced.
    pub(crate) fn refine(&self, profile: BootProfile, hot: Arc<hot::HotState>) {
        *self.refining.lock().unwrap() = Some((profile, hot));
    }

    /// Records a read of chunks `first..=last` and, of a disk, of its bytes `range` (`(offset,
    /// len)`: which blocks of those chunks were read).
    pub(crate) fn record(&self, first: u64, last: u64, range: Option<(u64, u64)>, is_zero: impl Fn(u64) -> bool) {
        let mut g = self.state.lock().unwrap();
        let Some(st) = g.as_mut() else { return };
        let expired = self.started.elapsed() >= self.window;
        if !expired {
            for idx in first..=last {
                if st.chunks.len() >= self.max {
                    break;
                }
                if !is_zero(idx) && st.seen.insert(idx) {
                    st.chunks.push(idx);
                }
            }
            if let Some((offset, len)) = range {
                self.record_blocks(st, offset, len);
            }
        }
        if expired || st.chunks.len() >= self.max {
            drop(g);
            self.finish();
        }
    }

    /// Marks the blocks of the disk's bytes `[offset, offset+len)` a guest read (of the chunks
    /// the recording took), so that the profile names the parts of chunks a boot read rather
    /// than whole chunks.
    fn record_blocks(&self, st: &mut RecState, offset: u64, len: u64) {
        let (cs, block) = (self.manifest.chunk_size as u64, self.block as u64);
        if block == 0 || len == 0 || !vgrid_storeclient::tree::geometry_ok(self.block, self.manifest.chunk_size) {
            return;
        }
        let (first, last) = (offset / block, (offset + len - 1) / block);
        let per_chunk = cs / block;
        for b in first..=last {
            let chunk = b / per_chunk;
            if !st.seen.contains(&chunk) {
                continue;
            }
            let bits = st.blocks.entry(chunk).or_insert_with(|| vec![0; per_chunk.div_ceil(64) as usize]);
            let i = b % per_chunk;
            bits[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Records saved-RAM pages `first..=last` (within the window, like chunks).
    pub(crate) fn record_pages(&self, first: u64, last: u64) {
        let mut g = self.state.lock().unwrap();
        let Some(st) = g.as_mut() else { return };
        if self.started.elapsed() >= self.window {
            return;
        }
        for p in first..=last {
            if st.pages.len() >= self.max * 16 {
                break;
            }
            if st.seen_pages.insert(p) {
                st.pages.push(p);
            }
        }
    }

    pub(crate) fn finish(&self) {
        let Some(st) = self.state.lock().unwrap().take() else { return };
        if let Some((profile, hot)) = self.refining.lock().unwrap().take() {
            return self.finish_refining(st, profile, &hot);
        }
        if st.chunks.is_empty() {
            tracing::info!(image = %self.image, "no disk reads during the boot profile window; nothing recorded");
            return;
        }
        let parts = parts(&self.manifest, self.block, &st.chunks, &st.blocks);
        let mut profile = BootProfile { chunks: st.chunks, parts, hot_pages: 0 };
        let shared = self.shared.clone();
        let source = self.source.clone();
        let manifest = self.manifest.clone();
        let image = self.image.clone();
        let pages = st.pages;
        let upload = async move {
            // A warm image: the RAM pages its guest touched go as a bundle of pages, and the
            // profile keeps only the disk's chunks (the RAM chunks stay the fallback).
            if let (false, Some(sh)) = (pages.is_empty(), shared.upgrade()) {
                settle(&sh, &manifest, &pages).await;
                let m = manifest.clone();
                let built = tokio::task::spawn_blocking(move || hot::build_bundle(&sh.cache, &m, &pages)).await.ok().flatten();
                if let Some((bundle, n)) = built {
                    let len = bundle.len();
                    match source.put_hot_pages(&image, bundle).await {
                        Ok(()) => {
                            tracing::info!(image = %image, pages = n, bundle_bytes = len, "hot pages uploaded");
                            profile.hot_pages = n;
                            let disk = manifest.disk.chunks.len() as u64;
                            profile.chunks.retain(|&i| i < disk);
                        }
                        Err(e) => tracing::warn!(image = %image, "hot pages upload failed (the profile keeps the RAM chunks): {e}"),
                    }
                }
            }
            match source.put_profile(&image, &profile).await {
                Ok(()) => tracing::info!(image = %image, chunks = profile.chunks.len(), "boot profile uploaded"),
                Err(e) => tracing::warn!(image = %image, "boot profile upload failed: {e}"),
            }
        };
        self.spawn_upload(upload);
    }

    /// Runs `upload` in the background, counted from now in the uploads a proxy's shutdown
    /// waits for.
    fn spawn_upload(&self, upload: impl std::future::Future<Output = ()> + Send + 'static) {
        let Ok(h) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(image = %self.image, "boot profile dropped: no runtime to upload it");
            return;
        };
        let uploads = self.uploads.clone();
        uploads.n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        h.spawn(async move {
            upload.await;
            uploads.n.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            uploads.done.notify_waiters();
        });
    }

    /// The end of a refining recording ([`Recording::refine`]): the hot pages again, this
    /// restore's touched pages first (in its order) and then those of `profile`'s bundle it
    /// did not touch, if it touched any the bundle lacked; their chunks are fetched into the
    /// cache where missing (the bundle is made from whole chunks, to carry their pages'
    /// chaining values).
    fn finish_refining(&self, st: RecState, mut profile: BootProfile, hot: &hot::HotState) {
        let Some(shared) = self.shared.upgrade() else { return };
        // The bundle's table (kept by the state even once its pages are dropped).
        let Some((_, announced)) = hot.announced() else { return };
        let known: HashSet<u64> = announced.iter().copied().collect();
        let added = st.pages.iter().filter(|p| !known.contains(p)).count();
        if added == 0 {
            tracing::debug!(image = %self.image, pages = st.pages.len(), "every RAM page the restored guest touched was a hot page");
            return;
        }
        let mut pages = st.pages;
        pages.extend(announced.into_iter().filter(|p| !st.seen_pages.contains(p)));
        let (source, manifest, image) = (self.source.clone(), self.manifest.clone(), self.image.clone());
        let conc = shared.config.profile_prefetch_concurrency.max(1);
        let weak = self.shared.clone();
        drop(shared);
        let upload = async move {
            use futures::StreamExt;
            let wanted = hot::ram_chunks_of(&manifest, &pages);
            let fetched = match weak.upgrade() {
                Some(sh) => {
                    futures::stream::iter(wanted)
                        .map(|(_, h, len)| {
                            let sh = sh.clone();
                            async move { sh.cache.contains(&h) || sh.chunk(h, len, crate::cache::Access::Prefetch).await.is_ok() }
                        })
                        .buffer_unordered(conc)
                        .all(std::future::ready)
                        .await
                }
                None => false,
            };
            let built = match (fetched, weak.upgrade()) {
                (true, Some(sh)) => {
                    let m = manifest.clone();
                    tokio::task::spawn_blocking(move || hot::build_bundle(&sh.cache, &m, &pages)).await.ok().flatten()
                }
                _ => None,
            };
            match built {
                Some((bundle, n)) => {
                    let len = bundle.len();
                    match source.put_hot_pages(&image, bundle).await {
                        Ok(()) => {
                            tracing::info!(image = %image, pages = n, added, bundle_bytes = len, "hot pages refined: pages this restore had to fetch were added");
                            profile.hot_pages = n;
                            if let Err(e) = source.put_profile(&image, &profile).await {
                                tracing::warn!(image = %image, "boot profile upload failed: {e}");
                            }
                        }
                        Err(e) => tracing::warn!(image = %image, "refined hot pages upload failed (the bundle stays as it was): {e}"),
                    }
                }
                None => tracing::debug!(image = %image, added, "hot pages not refined: their chunks could not all be read"),
            }
        };
        self.spawn_upload(upload);
    }
}

/// The parts of disk chunks a boot read, from the blocks recorded per chunk: every chunk of
/// `chunks` on the disk of which some block was not read, with the runs of blocks that were
/// (a chunk read whole, or with no block recorded, is left whole).
fn parts(manifest: &Manifest, block: u32, chunks: &[u64], blocks: &std::collections::HashMap<u64, Vec<u64>>) -> Vec<ChunkPart> {
    let disk = manifest.disk.chunks.len() as u64;
    let mut out = Vec::new();
    for &chunk in chunks.iter().filter(|&&c| c < disk) {
        let Some(bits) = blocks.get(&chunk) else { continue };
        let len = manifest.disk.chunk_len(manifest.chunk_size, chunk as usize);
        let n = len.div_ceil(block);
        let read = |i: u32| bits[(i / 64) as usize] & (1 << (i % 64)) != 0;
        if (0..n).all(read) {
            continue;
        }
        let mut ranges: Vec<ByteRange> = Vec::new();
        for i in (0..n).filter(|&i| read(i)) {
            let (off, end) = (i * block, ((i + 1) * block).min(len));
            match ranges.last_mut() {
                Some(r) if r.offset + r.len == off => r.len = end - r.offset,
                _ => ranges.push(ByteRange { offset: off, len: end - off }),
            }
        }
        out.push(ChunkPart { chunk, ranges });
    }
    out
}

/// Waits until the fetches in flight of the chunks holding `pages` are stored: a RAM fault is
/// answered before its chunk file is written, and the hot-page bundle is made from the cache's
/// files.
async fn settle(shared: &Shared, manifest: &Manifest, pages: &[u64]) {
    for (_, hash, len) in hot::ram_chunks_of(manifest, pages) {
        if !shared.cache.contains(&hash) && shared.cache.cached_or_coming(&hash) {
            let _ = shared.chunk(hash, len, crate::cache::Access::Prefetch).await;
        }
    }
}
