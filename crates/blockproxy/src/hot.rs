//! Hot pages of warm images: the pages of a saved RAM that a restored guest touched first,
//! recorded at an image's first restore and sent to later restores as one verified bundle
//! (`vgrid_storeclient::hotpages`) instead of the whole chunks around them.
//!
//! The bundle is decoded as it streams in: its table says which pages will come, in the order
//! the first guest touched them, and each chunk's pages are served as soon as they are
//! verified. A read of an announced page that has not arrived yet waits for it (briefly: it is
//! on its way, while the chunk a read would fetch instead is 16 times the page); reads of other
//! pages go through the chunk cache at once.

use crate::cache::ChunkCache;
use crate::source::ChunkSource;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vgrid_api::{ChunkHash, ImageRef, Manifest, SavedRam};
use vgrid_storeclient::hotpages::{self, HotChunk, HOT_PAGE_SIZE};

/// How long a read of a saved RAM waits for announced hot pages.
pub(crate) const LOAD_WAIT: Duration = Duration::from_secs(3);
/// A bundle that sends nothing for this long is abandoned (its announced pages not yet
/// arrived are then read through the chunks).
const STALL: Duration = Duration::from_secs(2);
/// Hot pages that served no read this long after their load are dropped (the restore that
/// asked for them failed, or loaded the RAM whole instead of mapping it).
pub(crate) const UNUSED_FOR: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Inner {
    page_size: u64,
    /// The pages the bundle's table announced (`None`: the table has not arrived).
    announced: Option<HashSet<u64>>,
    /// The same pages in the table's order (chunks in the order the first guest touched them).
    order: Vec<u64>,
    pages: HashMap<u64, bytes::Bytes>,
    /// No more pages will come (all arrived, or the load failed or was dropped).
    done: bool,
}

/// The hot pages of one image version on this host.
pub(crate) struct HotState {
    inner: Mutex<Inner>,
    /// Reads answered from these pages.
    served: std::sync::atomic::AtomicU64,
    /// Bumped at every change, for waiting readers.
    changes: tokio::sync::watch::Sender<u64>,
}

/// What a read of a saved RAM gets from the hot pages.
pub(crate) enum HotRead {
    /// Every page of the range: its bytes.
    Data(Vec<u8>),
    /// Pages of the range are announced and still on their way.
    Wait,
    /// Not (all) hot: read the chunks.
    No,
}

impl HotState {
    fn update(&self, f: impl FnOnce(&mut Inner)) {
        f(&mut self.inner.lock().unwrap());
        self.changes.send_modify(|n| *n += 1);
    }

    /// A receiver that sees every change after this call.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The bytes of `[offset, offset+len)` if every page of it is hot.
    pub(crate) fn read(&self, offset: u64, len: u64) -> HotRead {
        let g = self.inner.lock().unwrap();
        let Some(announced) = &g.announced else {
            return if g.done { HotRead::No } else { HotRead::Wait };
        };
        let ps = g.page_size;
        let (first, last) = (offset / ps, (offset + len - 1) / ps);
        if !(first..=last).all(|p| g.pages.contains_key(&p)) {
            let coming = !g.done && (first..=last).all(|p| announced.contains(&p));
            return if coming { HotRead::Wait } else { HotRead::No };
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = offset;
        while pos < offset + len {
            let page = &g.pages[&(pos / ps)];
            let at = (pos % ps) as usize;
            let n = (page.len() - at).min((offset + len - pos) as usize);
            out.extend_from_slice(&page[at..at + n]);
            pos += n as u64;
        }
        self.served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        HotRead::Data(out)
    }

    /// The announced pages in the bundle's order, with the page size, once the table is in.
    pub(crate) fn announced(&self) -> Option<(u64, Vec<u64>)> {
        let g = self.inner.lock().unwrap();
        g.announced.as_ref().map(|_| (g.page_size, g.order.clone()))
    }

    /// Whether no more pages will come.
    pub(crate) fn ended(&self) -> bool {
        self.inner.lock().unwrap().done
    }

    /// Pages loaded, once the load has ended.
    pub(crate) fn loaded(&self) -> Option<usize> {
        let g = self.inner.lock().unwrap();
        (g.done && g.announced.is_some()).then_some(g.pages.len())
    }

    pub(crate) fn new() -> Arc<HotState> {
        Arc::new(HotState { inner: Mutex::new(Inner::default()), served: Default::default(), changes: tokio::sync::watch::channel(0).0 })
    }

    /// No more pages will come (the load ended, failed, or was dropped).
    pub(crate) fn end(&self) {
        self.update(|g| g.done = true);
    }

    /// Whether no read was answered from these pages.
    pub(crate) fn unused(&self) -> bool {
        self.served.load(std::sync::atomic::Ordering::Relaxed) == 0
    }
}

/// Streams in and verifies the hot-page bundle of warm image `image` (saved RAM `ram`) from
/// `source` into `st`, which its profile says has `n` pages; reads of announced pages wait
/// for them meanwhile. Returns once the load has ended (its outcome is logged); the bytes
/// loaded count as a fetch of `cache`. False when the source had no bundle to send.
pub(crate) async fn load(
    st: &Arc<HotState>,
    source: &dyn ChunkSource,
    cache: &ChunkCache,
    image: &ImageRef,
    ram: SavedRam,
    n: u64,
) -> bool {
    use futures::StreamExt;
    let started = Instant::now();
    let mut stream = match source.hot_pages(image).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            tracing::warn!(image = %image, "the boot profile names hot pages but the image server has none");
            st.end();
            return false;
        }
        Err(e) => {
            tracing::warn!(image = %image, "cannot fetch hot pages, reading whole chunks instead: {e}");
            st.end();
            return false;
        }
    };
    // The decoder reads from a channel the stream feeds: it runs on a blocking thread.
    let (tx, rx) = std::sync::mpsc::channel::<Result<bytes::Bytes, String>>();
    let feed = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let b = match tokio::time::timeout(STALL, stream.next()).await {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(_) => {
                    let _ = tx.send(Err(format!("the image server sent nothing for {} s", STALL.as_secs())));
                    break;
                }
            };
            let r = b.map_err(|e| e.to_string());
            let failed = r.is_err();
            n += r.as_ref().map(|b| b.len() as u64).unwrap_or(0);
            if tx.send(r).is_err() || failed {
                break;
            }
        }
        n
    });
    let st2 = st.clone();
    let decoded = tokio::task::spawn_blocking(move || {
        let reader = ChannelReader { rx, cur: bytes::Bytes::new() };
        hotpages::decode_stream(
            reader,
            &ram.blob,
            ram.chunk_size,
            |ps, announced| {
                st2.update(|g| {
                    g.page_size = ps as u64;
                    g.announced = Some(announced.iter().copied().collect());
                    g.order = announced.to_vec();
                })
            },
            |pages| st2.update(|g| g.pages.extend(pages)),
        )
    })
    .await;
    let bundle_bytes = feed.await.unwrap_or(0);
    st.end();
    let took = started.elapsed();
    let (pages, bytes) = {
        let g = st.inner.lock().unwrap();
        (g.pages.len(), g.pages.len() as u64 * g.page_size)
    };
    cache.counters.record_fetch(took, bytes);
    match decoded {
        Ok(Ok(())) => {
            tracing::info!(image = %image, pages, expected = n, bundle_bytes, "hot pages loaded in {:.3} s", took.as_secs_f64())
        }
        Ok(Err(e)) => tracing::warn!(image = %image, pages_kept = pages, "hot pages refused, reading whole chunks instead: {e}"),
        Err(e) => tracing::warn!(image = %image, "hot pages: the decoding task failed: {e}"),
    }
    true
}

/// A blocking reader over byte buffers sent through a channel (an error ends it).
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Result<bytes::Bytes, String>>,
    cur: bytes::Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(Ok(b)) => self.cur = b,
                Ok(Err(e)) => return Err(std::io::Error::other(e)),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}

/// The chunks of `manifest`'s saved RAM that hold `pages`: (index, hash, length), each once.
pub(crate) fn ram_chunks_of(manifest: &Manifest, pages: &[u64]) -> Vec<(u64, ChunkHash, u32)> {
    let Some(ram) = manifest.state.as_ref().and_then(|s| s.ram.as_ref()) else { return Vec::new() };
    let per = (ram.chunk_size / HOT_PAGE_SIZE).max(1) as u64;
    let mut wanted: Vec<u64> = pages.iter().map(|p| p / per).collect();
    wanted.sort_unstable();
    wanted.dedup();
    wanted
        .into_iter()
        .filter_map(|i| Some((i, ram.blob.chunks.get(i as usize).copied().flatten()?, ram.blob.chunk_len(ram.chunk_size, i as usize))))
        .collect()
}

/// Makes the hot-page bundle of `manifest`'s saved RAM from `pages` (page numbers in
/// first-touch order) and the chunks in the cache; chunks no longer cached are left out.
/// Returns the bundle and the number of pages in it.
pub(crate) fn build_bundle(cache: &ChunkCache, manifest: &Manifest, pages: &[u64]) -> Option<(bytes::Bytes, u64)> {
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
        let Some(f) = cache.get_uncounted(hash) else { continue };
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

#[cfg(test)]
mod tests {
    use crate::source::{ByteStream, ChunkSource, SourceError};
    use crate::{BlockProxy, ProxyConfig};
    use futures::future::BoxFuture;
    use futures::StreamExt;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use vgrid_api::rest::BootProfile;
    use vgrid_api::{Blob, Boot, ChunkHash, ImageMeta, ImageRef, Manifest, SavedRam, SavedState, StateMeta};
    use vgrid_storeclient::hotpages::{encode, HotChunk};

    const CS: u32 = 65536;

    /// A warm image whose bundle is `bundle` (then nothing more when `stall`: a bundle cut
    /// short stalls) of `hot_pages` pages (none: the image has no profile yet); keeps what is
    /// uploaded to it.
    struct Warm {
        manifest: Manifest,
        chunks: Vec<Vec<u8>>,
        bundle: Vec<u8>,
        stall: bool,
        hot_pages: u64,
        put_bundles: std::sync::Mutex<Vec<bytes::Bytes>>,
        put_profiles: std::sync::Mutex<Vec<BootProfile>>,
        /// Profile lookups and bundle requests answered.
        lookups: std::sync::atomic::AtomicUsize,
        bundle_gets: std::sync::atomic::AtomicUsize,
    }

    impl Warm {
        fn new(manifest: Manifest, chunks: Vec<Vec<u8>>, bundle: Vec<u8>, stall: bool, hot_pages: u64) -> Arc<Warm> {
            Arc::new(Warm {
                manifest,
                chunks,
                bundle,
                stall,
                hot_pages,
                put_bundles: Default::default(),
                put_profiles: Default::default(),
                lookups: Default::default(),
                bundle_gets: Default::default(),
            })
        }
    }

    impl ChunkSource for Warm {
        fn manifest<'a>(&'a self, _: &'a ImageRef) -> BoxFuture<'a, Result<Manifest, SourceError>> {
            Box::pin(async move { Ok(self.manifest.clone()) })
        }
        fn chunk<'a>(&'a self, hash: &'a ChunkHash, _: usize) -> BoxFuture<'a, Result<Vec<u8>, SourceError>> {
            Box::pin(async move {
                self.chunks
                    .iter()
                    .find(|c| ChunkHash::of(c) == *hash)
                    .cloned()
                    .ok_or_else(|| SourceError::NotFound { what: format!("chunk {hash}"), source_name: "mem".into() })
            })
        }
        fn profile<'a>(&'a self, _: &'a ImageRef) -> BoxFuture<'a, Result<Option<BootProfile>, SourceError>> {
            self.lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Ok((self.hot_pages > 0).then(|| BootProfile { hot_pages: self.hot_pages, ..Default::default() })) })
        }
        fn put_profile<'a>(&'a self, _: &'a ImageRef, p: &'a BootProfile) -> BoxFuture<'a, Result<(), SourceError>> {
            self.put_profiles.lock().unwrap().push(p.clone());
            Box::pin(async { Ok(()) })
        }
        fn hot_pages<'a>(&'a self, _: &'a ImageRef) -> BoxFuture<'a, Result<Option<ByteStream>, SourceError>> {
            self.bundle_gets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let part = bytes::Bytes::from(self.bundle.clone());
            let stall = self.stall;
            Box::pin(async move {
                let s = futures::stream::iter([Ok(part)]);
                Ok(Some(if stall { s.chain(futures::stream::pending()).boxed() } else { s.boxed() }))
            })
        }
        fn put_hot_pages<'a>(&'a self, _: &'a ImageRef, bundle: bytes::Bytes) -> BoxFuture<'a, Result<(), SourceError>> {
            self.put_bundles.lock().unwrap().push(bundle);
            Box::pin(async { Ok(()) })
        }
        fn describe(&self) -> String {
            "mem".into()
        }
    }

    /// A proxy over `source` with its cache in a temp dir (kept while the dir lives), no
    /// background RAM fetch, and `tweak` applied to its configuration.
    fn proxy_over(source: Arc<Warm>, tweak: impl FnOnce(&mut ProxyConfig)) -> (tempfile::TempDir, Arc<BlockProxy>) {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = ProxyConfig::new(tmp.path().join("cache"), 1 << 30);
        cfg.ram_prefetch_concurrency = 0;
        tweak(&mut cfg);
        let proxy = BlockProxy::new(cfg, source).unwrap();
        (tmp, proxy)
    }

    /// Two stored 64 KiB chunks of a 1 MiB saved RAM (the rest zero) and a warm manifest.
    fn warm_image() -> (Manifest, Vec<Vec<u8>>) {
        let chunks: Vec<Vec<u8>> =
            (0..2u8).map(|k| (0..CS as usize).map(|i| (i as u8).wrapping_mul(7) ^ k.wrapping_add(1)).collect()).collect();
        // 1 MiB of RAM: two stored chunks, the rest zero.
        let mut rc: Vec<Option<ChunkHash>> = chunks.iter().map(|c| Some(ChunkHash::of(c))).collect();
        rc.resize(16, None);
        let ram = Blob { size: 1 << 20, chunks: rc };
        let manifest = Manifest {
            schema: 1,
            name: "w".into(),
            version: 1,
            created: 0,
            chunk_size: CS,
            disk: Blob { size: CS as u64, chunks: vec![None] },
            meta: ImageMeta { os: String::new(), arch: "x86_64".into(), boot: Boot::Firmware, volume: None },
            parent: None,
            state: Some(SavedState {
                blob: Blob { size: CS as u64, chunks: vec![Some(ChunkHash::of(&chunks[0]))] },
                meta: StateMeta {
                    qemu_version: "10.0.0".into(),
                    machine: "pc".into(),
                    cpus: 1,
                    memory_mib: 0,
                    accel: "tcg".into(),
                    saved: 0,
                    loader_roms: None,
                },
                ram: None,
            }),
        };
        let mut m = manifest;
        m.state.as_mut().unwrap().ram = Some(SavedRam { chunk_size: CS, blob: ram });
        m.state.as_mut().unwrap().meta.memory_mib = 1;
        (m, chunks)
    }

    /// The bundle of page 1 of chunk 0 and page 3 of chunk 1 (RAM pages 1 and 19) of `chunks`.
    fn two_page_bundle(chunks: &[Vec<u8>]) -> Vec<u8> {
        encode(
            4096,
            CS,
            &[HotChunk { index: 0, data: &chunks[0], pages: vec![1] }, HotChunk { index: 1, data: &chunks[1], pages: vec![3] }],
        )
        .unwrap()
    }

    /// A bundle that stalls half-way: the pages that came are served, a read of an announced
    /// page that never comes goes to the chunks after the stall limit, not forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_bundle_serves_what_came_and_gives_up_on_the_rest() {
        let (m, chunks) = warm_image();
        // The whole bundle (pages 1 of chunk 0 and 3 of chunk 1), cut after chunk 0's part.
        let whole = two_page_bundle(&chunks);
        let plain = zstd::bulk::decompress(&whole, 1 << 20).unwrap();
        let cut = 20 + (8 + 4 + 4) * 2 + 16 * 32 + 4096;
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut enc, &plain[..cut]).unwrap();
        std::io::Write::flush(&mut enc).unwrap();
        let first_part = enc.get_ref().clone();
        let source = Warm::new(m.clone(), chunks.clone(), first_part, true, 2);
        let (_tmp, proxy) = proxy_over(source, |cfg| cfg.record_profiles = false);
        let export = proxy.open_export("w@1/ram").await.unwrap();
        // The profile is looked up in the background (at a restore, long before the guest runs).
        for _ in 0..200 {
            if proxy.shared.hot_state(&m.image_ref()).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The table came whole: both pages announced, in the bundle's order (page 16 + 3 later).
        assert_eq!(proxy.hot_pages_announced(&m.image_ref(), Duration::from_secs(5)).await, Some((4096, vec![1, 19])));
        // Page 1 arrives: served from the bundle, its chunk not fetched.
        let got = export.hot_read(4096, 4096).await.expect("page 1 is hot");
        assert_eq!(&got[..], &chunks[0][4096..8192]);
        assert!(!proxy.cache().contains(&ChunkHash::of(&chunks[0])));
        // Page 16 + 3 is announced but never comes: given up within the stall limit (+ slack).
        let t0 = Instant::now();
        assert!(export.hot_read(19 * 4096, 4096).await.is_none());
        assert!(t0.elapsed() < Duration::from_secs(5), "waited {:?}", t0.elapsed());
        // ...and read exactly through the chunks; the load ended with the one page that came.
        let mut buf = vec![0u8; 4096];
        export.read_at(19 * 4096, &mut buf).await.unwrap();
        assert_eq!(&buf[..], &chunks[1][3 * 4096..4 * 4096]);
        assert_eq!(proxy.hot_pages_loaded(&m.image_ref()), Some(1));
        // A page never announced does not wait at all.
        let t0 = Instant::now();
        assert!(export.hot_read(5 * 4096, 4096).await.is_none());
        assert!(t0.elapsed() < Duration::from_millis(500));
    }

    /// A restore opens its saved RAM while its state is still on the way, holding the rest
    /// back: the profile is looked up at once, the hot-page bundle is asked for only once the
    /// hold has ended (it would compete with the state on the link), then served as usual.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_first_opening_fetches_its_hot_pages_only_after_the_hold() {
        use std::sync::atomic::Ordering::SeqCst;
        let (m, chunks) = warm_image();
        let bundle = two_page_bundle(&chunks);
        let source = Warm::new(m.clone(), chunks.clone(), bundle, false, 2);
        let (_tmp, proxy) = proxy_over(source.clone(), |cfg| cfg.record_profiles = false);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let hold: crate::Hold = Box::pin(async move {
            let _ = released.await;
        });
        let export = proxy.open_export_holding("w@1/ram", Some(hold)).await.unwrap();
        let t0 = Instant::now();
        while source.lookups.load(SeqCst) == 0 && t0.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(source.lookups.load(SeqCst), 1, "the profile is looked up during the hold");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(source.bundle_gets.load(SeqCst), 0, "no bundle asked for during the hold");
        assert!(proxy.shared.hot_state(&m.image_ref()).is_none());
        release.send(()).unwrap();
        assert_eq!(proxy.hot_pages_announced(&m.image_ref(), Duration::from_secs(5)).await, Some((4096, vec![1, 19])));
        assert_eq!(source.bundle_gets.load(SeqCst), 1);
        let got = export.hot_read(19 * 4096, 4096).await.expect("page 16 + 3 is hot");
        assert_eq!(&got[..], &chunks[1][3 * 4096..4 * 4096]);
    }

    /// A restore served by hot pages that touches pages its bundle lacks (each a chunk fetch
    /// while its guest waited) uploads the bundle again with them: its own touch order first,
    /// then the announced pages it did not touch. A restore that touched only hot pages
    /// uploads nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restore_that_fetched_pages_beyond_the_bundle_refines_it() {
        let (m, chunks) = warm_image();
        // The bundle has pages 1 and 2 of chunk 0.
        let bundle = encode(4096, CS, &[HotChunk { index: 0, data: &chunks[0], pages: vec![1, 2] }]).unwrap();
        let restore = |touch: Vec<u64>| {
            let (m, chunks, bundle) = (m.clone(), chunks.clone(), bundle.clone());
            async move {
                let source = Warm::new(m.clone(), chunks, bundle, false, 2);
                let (_tmp, proxy) = proxy_over(source.clone(), |cfg| cfg.ram_profile_window = Duration::from_secs(30));
                let export = proxy.open_export("w@1/ram").await.unwrap();
                assert_eq!(proxy.hot_pages_announced(&m.image_ref(), Duration::from_secs(5)).await, Some((4096, vec![1, 2])));
                let mut buf = vec![0u8; 4096];
                for p in touch {
                    export.read_at(p * 4096, &mut buf).await.unwrap();
                }
                // The guest is gone: the recording ends, its upload is waited for.
                drop(export);
                proxy.flush_profiles(Duration::from_secs(10)).await;
                let bundles = source.put_bundles.lock().unwrap().clone();
                let profiles = source.put_profiles.lock().unwrap().clone();
                (bundles, profiles)
            }
        };
        // Page 2 (hot), then 19 (chunk 1's page 3) and 5 (chunk 0, not in the bundle).
        let (bundles, profiles) = restore(vec![2, 19, 5]).await;
        assert_eq!(bundles.len(), 1, "one refined bundle");
        let mut order = Vec::new();
        let ram = m.state.as_ref().unwrap().ram.clone().unwrap();
        vgrid_storeclient::hotpages::decode_stream(&bundles[0][..], &ram.blob, CS, |_, t| order = t.to_vec(), |_| {}).unwrap();
        // Chunks in first-touch order (0, then 1), pages in each as touched: 2, 5, then 1.
        assert_eq!(order, vec![2, 5, 1, 19]);
        assert_eq!(profiles.iter().map(|p| p.hot_pages).collect::<Vec<_>>(), vec![4]);
        // Only hot pages touched: nothing uploaded.
        let (bundles, profiles) = restore(vec![1, 2, 1]).await;
        assert!(bundles.is_empty() && profiles.is_empty(), "{} bundles, {} profiles", bundles.len(), profiles.len());
    }

    /// A first restore's bundle has every page it touched, even when its last faults were
    /// answered from memory and their chunks are still being stored as its export closes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_restore_bundles_pages_whose_chunks_were_still_being_stored() {
        let (m, chunks) = warm_image();
        let source = Warm::new(m.clone(), chunks, Vec::new(), false, 0);
        let (_tmp, proxy) = proxy_over(source.clone(), |cfg| cfg.ram_profile_window = Duration::from_secs(30));
        proxy.cache().store_delay_ms.store(300, std::sync::atomic::Ordering::Relaxed);
        let export = proxy.open_export("w@1/ram").await.unwrap();
        let mut buf = vec![0u8; 4096];
        // Pages 3 (chunk 0) and 17 (chunk 1): each answered before its chunk is stored.
        for p in [3u64, 17] {
            export.read_at(p * 4096, &mut buf).await.unwrap();
        }
        drop(export);
        proxy.flush_profiles(Duration::from_secs(10)).await;
        let profiles = source.put_profiles.lock().unwrap().clone();
        assert_eq!(profiles.iter().map(|p| p.hot_pages).collect::<Vec<_>>(), vec![2], "{profiles:?}");
        let bundles = source.put_bundles.lock().unwrap().clone();
        let ram = m.state.as_ref().unwrap().ram.clone().unwrap();
        let mut order = Vec::new();
        vgrid_storeclient::hotpages::decode_stream(&bundles[0][..], &ram.blob, CS, |_, t| order = t.to_vec(), |_| {}).unwrap();
        assert_eq!(order, vec![3, 17]);
    }
}
