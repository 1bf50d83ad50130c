//! Hot pages of warm images: the pages of a saved RAM that a restored guest touched first,
//! recorded at an image's first restore and sent to later restores as one verified bundle
//! (`vgrid_imagestore::hotpages`) instead of the whole chunks around them.
//!
//! While a bundle loads, reads of that image's saved RAM wait for it (briefly): it is small and
//! on its way, while the chunk a read would fetch instead is 16 times the page. Reads of pages
//! not in the bundle go through the chunk cache as before.

use crate::export::Shared;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vgrid_api::{ImageRef, Manifest};
use vgrid_imagestore::hotpages::{self, HotChunk, HotPages, HOT_PAGE_SIZE};

/// How long a read of a saved RAM waits for its image's bundle to load.
const LOAD_WAIT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub(crate) enum Phase {
    Loading,
    Ready(Arc<HotPages>),
    /// Failed or dropped: reads go through the chunks.
    Gone,
}

/// The hot pages of one image version on this host.
pub(crate) struct HotState {
    phase: tokio::sync::watch::Sender<Phase>,
}

/// What a read of a saved RAM gets from the hot pages.
pub(crate) enum HotRead {
    /// Every page of the range: its bytes.
    Data(Vec<u8>),
    /// The bundle is loading: wait with [`HotState::wait`], then ask again.
    Wait(Arc<HotState>),
    /// Not (all) hot: read the chunks.
    No,
}

impl HotState {
    fn new() -> Arc<HotState> {
        Arc::new(HotState { phase: tokio::sync::watch::channel(Phase::Loading).0 })
    }

    /// Waits (at most [`LOAD_WAIT`]) until the bundle is loaded or has failed.
    pub(crate) async fn wait(&self) {
        let mut rx = self.phase.subscribe();
        let _ = tokio::time::timeout(LOAD_WAIT, rx.wait_for(|p| !matches!(p, Phase::Loading))).await;
    }

    /// The bytes of `[offset, offset+len)` if every page of it is hot.
    fn read(self: &Arc<Self>, offset: u64, len: u64) -> HotRead {
        let pages = match &*self.phase.borrow() {
            Phase::Ready(p) => p.clone(),
            Phase::Loading => return HotRead::Wait(self.clone()),
            Phase::Gone => return HotRead::No,
        };
        let ps = pages.page_size as u64;
        let (first, last) = (offset / ps, (offset + len - 1) / ps);
        if !(first..=last).all(|p| pages.pages.contains_key(&p)) {
            return HotRead::No;
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = offset;
        while pos < offset + len {
            let page = &pages.pages[&(pos / ps)];
            let at = (pos % ps) as usize;
            let n = (page.len() - at).min((offset + len - pos) as usize);
            out.extend_from_slice(&page[at..at + n]);
            pos += n as u64;
        }
        HotRead::Data(out)
    }
}

impl Shared {
    /// What the hot pages of `image` hold for a read of its saved RAM.
    pub(crate) fn hot_read(&self, image: &ImageRef, offset: u64, len: u64) -> HotRead {
        let st = self.hot.lock().unwrap().get(image).cloned();
        match st {
            Some(s) => s.read(offset, len),
            None => HotRead::No,
        }
    }

    /// Forgets the hot pages of `image` (its saved RAM is cached whole, or no longer served).
    pub(crate) fn drop_hot(&self, image: &ImageRef) {
        if let Some(s) = self.hot.lock().unwrap().remove(image) {
            s.phase.send_replace(Phase::Gone);
        }
    }

    /// Fetches and verifies the hot-page bundle of warm image `manifest`, which its profile
    /// says has `n` pages; reads of its saved RAM wait for it meanwhile.
    pub(crate) fn load_hot(self: &Arc<Self>, manifest: Arc<Manifest>, n: u64) {
        let Some(ram) = manifest.state.as_ref().and_then(|s| s.ram.clone()) else { return };
        let image = manifest.image_ref();
        let st = HotState::new();
        self.hot.lock().unwrap().insert(image.clone(), st.clone());
        let shared = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let fetched = shared.source.hot_pages(&image).await;
            let took = started.elapsed();
            let phase = match fetched {
                Ok(Some(bundle)) => {
                    let len = bundle.len();
                    let decoded = tokio::task::spawn_blocking(move || hotpages::decode(&bundle, &ram.blob, ram.chunk_size)).await;
                    match decoded {
                        Ok(Ok(p)) => {
                            let bytes = p.pages.len() as u64 * p.page_size as u64;
                            shared.cache.counters.record_fetch(took, bytes);
                            tracing::info!(image = %image, pages = p.pages.len(), expected = n, bundle_bytes = len,
                                "hot pages loaded in {:.3} s", started.elapsed().as_secs_f64());
                            Phase::Ready(Arc::new(p))
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(image = %image, "hot pages refused, reading whole chunks instead: {e}");
                            Phase::Gone
                        }
                        Err(e) => {
                            tracing::warn!(image = %image, "hot pages: verification task failed: {e}");
                            Phase::Gone
                        }
                    }
                }
                Ok(None) => {
                    tracing::warn!(image = %image, "the boot profile names hot pages but the image server has none");
                    Phase::Gone
                }
                Err(e) => {
                    tracing::warn!(image = %image, "cannot fetch hot pages, reading whole chunks instead: {e}");
                    Phase::Gone
                }
            };
            st.phase.send_replace(phase);
        });
    }
}

/// Makes the hot-page bundle of `manifest`'s saved RAM from `pages` (page numbers in
/// first-touch order) and the chunks in the cache; chunks no longer cached are left out.
/// Returns the bundle and the number of pages in it.
pub(crate) fn build_bundle(shared: &Shared, manifest: &Manifest, pages: &[u64]) -> Option<(bytes::Bytes, u64)> {
    let ram = manifest.state.as_ref()?.ram.as_ref()?;
    let per = (ram.chunk_size / HOT_PAGE_SIZE) as u64;
    if per == 0 {
        return None;
    }
    let mut order: Vec<(u64, Vec<u32>)> = Vec::new();
    let mut at: HashMap<u64, usize> = HashMap::new();
    for &p in pages {
        let c = p / per;
        let i = *at.entry(c).or_insert_with(|| {
            order.push((c, Vec::new()));
            order.len() - 1
        });
        order[i].1.push((p % per) as u32);
    }
    let mut datas: Vec<(u64, Vec<u8>, Vec<u32>)> = Vec::new();
    for (c, ps) in order {
        let Some(Some(hash)) = ram.blob.chunks.get(c as usize) else { continue };
        if ram.blob.chunk_len(ram.chunk_size, c as usize) != ram.chunk_size {
            continue;
        }
        let Some(f) = shared.cache.get_uncounted(hash) else { continue };
        let mut buf = vec![0u8; ram.chunk_size as usize];
        if f.read_at(&mut buf, 0).is_err() {
            continue;
        }
        datas.push((c, buf, ps));
    }
    let chunks: Vec<HotChunk<'_>> = datas.iter().map(|(c, d, ps)| HotChunk { index: *c, data: d, pages: ps.clone() }).collect();
    let n: u64 = chunks.iter().map(|c| c.pages.len() as u64).sum();
    if n == 0 {
        return None;
    }
    match hotpages::encode(HOT_PAGE_SIZE, ram.chunk_size, &chunks) {
        Ok(b) => Some((b.into(), n)),
        Err(e) => {
            tracing::warn!(image = %manifest.image_ref(), "cannot make the hot-page bundle: {e}");
            None
        }
    }
}

impl crate::BlockProxy {
    /// How many hot pages of warm image `image` are loaded here (`None`: none, or still
    /// loading).
    pub fn hot_pages_loaded(&self, image: &ImageRef) -> Option<usize> {
        let st = self.shared.hot.lock().unwrap().get(image).cloned()?;
        let phase = st.phase.borrow().clone();
        match phase {
            Phase::Ready(p) => Some(p.pages.len()),
            _ => None,
        }
    }
}
