//! The block proxy of one host: resolves images, opens exports, stages images, reads blobs.

use crate::cache::{self, ChunkCache};
use crate::config::ProxyConfig;
use crate::error::{ProxyError, ReadError};
use crate::export::{self, Export};
use crate::profile::Recording;
use crate::service::{self, Shared};
use crate::source::ChunkSource;
use crate::stats::CacheStats;
use crate::wait::ChunkWait;
use futures::stream::StreamExt;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use vgrid_api::{Blob, Boot, ChunkHash, ImageRef, Manifest};

/// What [`BlockProxy::pull`] did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PullReport {
    /// The image version pulled.
    pub image: ImageRef,
    /// Distinct stored chunks of the image (disk, kernel, initrd).
    pub chunks_total: u64,
    /// Chunks that had to be fetched.
    pub chunks_fetched: u64,
    /// Chunks that were already in the cache.
    pub chunks_cached: u64,
    /// Bytes of all distinct stored chunks.
    pub bytes_total: u64,
    /// Bytes fetched.
    pub bytes_fetched: u64,
    pub elapsed_secs: f64,
}

/// Largest blob [`BlockProxy::read_blob`] loads into memory.
pub const MAX_BLOB_IN_MEMORY: u64 = 1 << 30;

/// What a first opening waits for before fetching what its profile brings
/// ([`BlockProxy::open_export_holding`]).
pub type Hold = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The block proxy of one host. Create with [`BlockProxy::new`]; share the `Arc`.
pub struct BlockProxy {
    pub(crate) shared: Arc<Shared>,
    manifests_dir: PathBuf,
    /// Open exports by export name, so that all connections to one name see one version.
    exports: Mutex<HashMap<String, Weak<Export>>>,
    /// Versioned manifests already resolved.
    manifests: Mutex<HashMap<ImageRef, Arc<Manifest>>>,
    /// Image versions whose first opening (in this process) already happened.
    opened: Mutex<HashSet<ImageRef>>,
    /// Boot-profile recordings in progress, by image version.
    recordings: Mutex<HashMap<ImageRef, Weak<Recording>>>,
    shutdown: CancellationToken,
}

impl BlockProxy {
    /// Opens the cache (locking its directory) and prepares the proxy. Serves nothing until
    /// [`serve_unix`](Self::serve_unix) or [`serve_tcp`](Self::serve_tcp) is called.
    pub fn new(config: ProxyConfig, source: Arc<dyn ChunkSource>) -> Result<Arc<BlockProxy>, ProxyError> {
        let cache = ChunkCache::open(&config.cache_dir, config.cache_max_bytes, config.max_open_files)?;
        let manifests_dir = config.cache_dir.join("manifests");
        std::fs::create_dir_all(&manifests_dir).map_err(|e| ProxyError::ManifestStore { path: manifests_dir.clone(), source: e })?;
        drop_damaged_manifests(&manifests_dir);
        let cache = Arc::new(cache);
        // Chunk files left by an earlier run are checked in the background from now on.
        cache.spawn_verify();
        Ok(Arc::new(BlockProxy {
            shared: Arc::new(Shared::new(cache, source, config)),
            manifests_dir,
            exports: Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
            opened: Mutex::new(HashSet::new()),
            recordings: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
        }))
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.shared.config
    }

    /// The host chunk cache.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.shared.cache
    }

    /// Counters and contents of the host chunk cache, and the reads waiting for image servers.
    pub fn stats(&self) -> CacheStats {
        let mut s = self.shared.cache.stats();
        let waits = &self.shared.waits;
        s.waiting = waits.snapshot();
        s.waiting_now = s.waiting.len() as u64;
        s.fetch_waits = waits.started.load(std::sync::atomic::Ordering::Relaxed);
        s.longest_wait_ms = waits.longest_ms(&s.waiting);
        s
    }

    /// The chunk fetches waiting for image servers now (reads of guests that stall until a
    /// server answers), longest first.
    pub fn waiting(&self) -> Vec<ChunkWait> {
        self.shared.waits.snapshot()
    }

    /// Stops every server of this proxy: listeners close, connections end after their
    /// in-flight requests. Exports still held by callers keep working.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits (at most `timeout`) for boot-profile uploads under way: a host stopping right
    /// after its guests ended still leaves their profiles on the image server.
    pub async fn flush_profiles(&self, timeout: Duration) {
        let u = &self.shared.uploads;
        let deadline = tokio::time::Instant::now() + timeout;
        while u.n.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            let woke = u.done.notified();
            tokio::pin!(woke);
            woke.as_mut().enable();
            if u.n.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, woke).await.is_err() {
                tracing::warn!("boot profile uploads still under way at shutdown; not waiting longer");
                break;
            }
        }
    }

    /// Ends now every first recording of a boot profile still in its window (an image that had
    /// no profile when it was opened), uploading what it recorded, as the window's end would:
    /// for a host whose guests have all ended (the end of `vgrid up`), so that their boots'
    /// profiles are not lost with the process. Recordings whose lookup has not yet said the
    /// image has no profile are left alone (they must not replace one). Then wait for the
    /// uploads with [`flush_profiles`](Self::flush_profiles).
    pub fn finish_recordings(&self) {
        let recs: Vec<Arc<Recording>> = self.recordings.lock().unwrap().values().filter_map(Weak::upgrade).collect();
        for rec in recs.iter().filter(|r| r.is_first()) {
            rec.finish();
        }
    }

    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    fn local_manifest_path(&self, image: &ImageRef) -> PathBuf {
        self.manifests_dir.join(format!("{}@{}.json", image.name, image.version.unwrap_or(0)))
    }

    fn save_manifest(&self, m: &Manifest) {
        let path = self.local_manifest_path(&m.image_ref());
        if path.exists() {
            return;
        }
        let tmp = path.with_extension("json.tmp");
        let r = serde_json::to_vec(m)
            .map_err(|e| e.to_string())
            .and_then(|b| std::fs::write(&tmp, b).map_err(|e| e.to_string()))
            .and_then(|_| std::fs::rename(&tmp, &path).map_err(|e| e.to_string()));
        if let Err(e) = r {
            tracing::warn!(path = %path.display(), "cannot keep manifest locally: {e}");
        }
    }

    fn load_local_manifest(&self, image: &ImageRef) -> Option<Manifest> {
        let version = match image.version {
            Some(v) => v,
            None => {
                // Latest version known locally.
                let prefix = format!("{}@", image.name);
                std::fs::read_dir(&self.manifests_dir)
                    .ok()?
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter_map(|n| n.strip_prefix(&prefix)?.strip_suffix(".json")?.parse::<u32>().ok())
                    .max()?
            }
        };
        let path = self.local_manifest_path(&ImageRef { name: image.name.clone(), version: Some(version) });
        let bytes = std::fs::read(&path).ok()?;
        match Manifest::from_json(&bytes) {
            Ok(m) if m.name == image.name && m.version == version => Some(m),
            Ok(_) | Err(_) => {
                // Removed, so that the next answer of an image server is kept in its place.
                tracing::warn!(path = %path.display(), "removing a damaged local manifest");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// The manifest of `image` (latest version when unversioned). Versioned manifests are
    /// immutable and kept in memory and under `cache_dir/manifests` (so staged images can be
    /// served while no image server is reachable); an unversioned name asks the source and
    /// falls back to the latest local version only when the source is unreachable.
    pub async fn resolve(&self, image: &ImageRef) -> Result<Arc<Manifest>, ProxyError> {
        if image.version.is_some() {
            if let Some(m) = self.manifests.lock().unwrap().get(image) {
                return Ok(m.clone());
            }
            if let Some(m) = self.load_local_manifest(image) {
                let m = Arc::new(m);
                self.manifests.lock().unwrap().insert(image.clone(), m.clone());
                return Ok(m);
            }
        }
        let m = match self.shared.source.manifest(image).await {
            Ok(m) => m,
            Err(e) if e.is_not_found() => {
                return Err(ProxyError::ImageNotFound { image: image.clone(), servers: self.shared.source.describe() })
            }
            Err(e) => match self.load_local_manifest(image) {
                Some(m) => {
                    tracing::warn!(image = %image, "image servers unreachable, using local manifest of version {}: {e}", m.version);
                    m
                }
                None => return Err(ProxyError::ImageUnavailable { image: image.clone(), source: e }),
            },
        };
        if let Err(e) = m.validate() {
            return Err(ProxyError::InvalidManifest { image: image.clone(), source: e });
        }
        if m.name != image.name || image.version.is_some_and(|v| v != m.version) {
            return Err(ProxyError::WrongManifest { image: image.clone(), answered: m.image_ref() });
        }
        self.save_manifest(&m);
        let m = Arc::new(m);
        self.manifests.lock().unwrap().insert(m.image_ref(), m.clone());
        Ok(m)
    }

    /// Opens the export `name` (`IMAGE` or `IMAGE@VERSION`). While any holder keeps an export
    /// open, opening the same name again returns it (one version for all connections). The
    /// first opening of a version prefetches its boot profile, or starts recording one.
    pub async fn open_export(&self, name: &str) -> Result<Arc<Export>, ProxyError> {
        self.open_export_holding(name, None).await
    }

    /// [`BlockProxy::open_export`], but when this is the version's first opening, what its
    /// profile brings (a warm image's hot-page bundle, the profile's chunks) is fetched only once
    /// `hold` has ended; the profile itself is looked up at once. A restore opens its saved RAM
    /// so while its state is still on the way: the pager and QEMU start meanwhile, and the
    /// bundle does not compete with the state on the link.
    pub async fn open_export_holding(&self, name: &str, hold: Option<Hold>) -> Result<Arc<Export>, ProxyError> {
        if let Some(e) = self.exports.lock().unwrap().get(name).and_then(Weak::upgrade) {
            return Ok(e);
        }
        let (image_name, ram) = match name.strip_suffix(export::RAM_EXPORT_SUFFIX) {
            Some(n) => (n, true),
            None => (name, false),
        };
        let image: ImageRef =
            image_name.parse().map_err(|e: vgrid_api::ManifestError| ProxyError::BadExportName { name: name.to_string(), source: e })?;
        let manifest = self.resolve(&image).await?;
        let (blob, chunk_size) = if ram {
            match manifest.state.as_ref().and_then(|s| s.ram.as_ref()) {
                Some(r) => (r.blob.clone(), r.chunk_size),
                None => return Err(ProxyError::NoSavedRam { name: name.to_string(), image: manifest.image_ref() }),
            }
        } else {
            (manifest.disk.clone(), manifest.chunk_size)
        };
        let export = {
            let mut map = self.exports.lock().unwrap();
            if let Some(e) = map.get(name).and_then(Weak::upgrade) {
                return Ok(e);
            }
            let e = Export::new(name.to_string(), manifest.clone(), blob, chunk_size, ram, self.shared.clone());
            map.retain(|_, w| w.strong_count() > 0);
            map.insert(name.to_string(), Arc::downgrade(&e));
            e
        };
        if ram {
            // Boot profiles describe disk reads. A saved RAM is fetched whole in the
            // background: a guest faults its pages one at a time (its vCPU waits for each), so
            // the link is mostly idle between them.
            let n = self.shared.config.ram_prefetch_concurrency;
            if n > 0 {
                export.prefetch_all(n);
            }
        }
        let first_open = self.opened.lock().unwrap().insert(manifest.image_ref());
        if first_open {
            self.start_profile(&export, hold);
        } else if let Some(rec) = self.recordings.lock().unwrap().get(export.image()).and_then(Weak::upgrade) {
            // A later opening within the recording window of this version records too.
            export.attach_recording(rec);
        }
        Ok(export)
    }

    /// First opening of an image version: start recording its boot profile at once (so the
    /// first reads count), and look up an existing profile in the background (an unreachable
    /// image server must not delay the export); if there is one, drop the recording and
    /// prefetch the profile instead.
    fn start_profile(&self, export: &Arc<Export>, hold: Option<Hold>) {
        let cfg = &self.shared.config;
        let rec = if cfg.record_profiles {
            // A warm image's profile is what a restored guest touches at once (its RAM
            // first): a short window, uploaded in time for the next restore.
            let warm = export.manifest().state.as_ref().is_some_and(|s| s.ram.is_some());
            let window = if warm { cfg.ram_profile_window } else { cfg.profile_window };
            let rec = Recording::start(export.manifest().clone(), window, warm, &self.shared);
            export.attach_recording(rec.clone());
            self.recordings.lock().unwrap().insert(export.image().clone(), Arc::downgrade(&rec));
            Some(rec)
        } else {
            None
        };
        if !cfg.prefetch_profiles && rec.is_none() {
            return;
        }
        let prefetch = cfg.prefetch_profiles;
        let shared = self.shared.clone();
        let image = export.image().clone();
        let manifest = export.manifest().clone();
        tokio::spawn(async move {
            let found = shared.source.profile(&image).await;
            if let Some(hold) = hold {
                hold.await;
            }
            match found {
                Ok(Some(p)) => {
                    let hot = if prefetch && p.hot_pages > 0 {
                        // A warm image's hot pages: what its restored guest touches first.
                        shared.load_hot(manifest.clone(), p.hot_pages);
                        shared.hot_state(&image)
                    } else {
                        None
                    };
                    if let Some(rec) = &rec {
                        // A warm image restored with hot pages: what it fetches besides them
                        // refines them; any other image's profile stands.
                        match hot {
                            Some(hot) => rec.refine(p.clone(), hot),
                            None => rec.cancel(),
                        }
                    }
                    // Whether or not the opening that started this is still open: a first
                    // opening is often a probe (qemu-img creating the guest's overlay) that has
                    // closed by the time the image server answers, and the guest's own opening
                    // that follows is not a first one.
                    if prefetch {
                        tracing::info!(image = %image, chunks = p.chunks.len(), hot_pages = p.hot_pages, "prefetching boot profile");
                        export::prefetch_profile(shared, manifest, image, p);
                    }
                }
                Ok(None) => {
                    if let Some(rec) = &rec {
                        rec.mark_first();
                    }
                }
                Err(e) => tracing::warn!(image = %image, "cannot look up boot profile: {e}"),
            }
        });
    }

    /// Bytes of open export `name` (e.g. a saved RAM, `IMAGE@V/ram`) whose chunks are not in
    /// the cache (zero chunks count as present); `None` when no such export is open.
    pub fn uncached_bytes(&self, name: &str) -> Option<u64> {
        let e = self.exports.lock().unwrap().get(name).and_then(Weak::upgrade)?;
        Some(e.uncached_bytes())
    }

    /// Stages every chunk of `image` (disk, kernel, initrd) into the cache: the explicit-
    /// transfer mode. `progress(done_bytes, total_bytes)` is called as chunks arrive.
    /// Fails if the image's distinct chunks exceed the cache size.
    pub async fn pull(&self, image: &ImageRef, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<PullReport, ProxyError> {
        let started = Instant::now();
        let m = self.resolve(image).await?;
        let mut seen = HashSet::new();
        let mut wanted: Vec<(ChunkHash, u32)> = Vec::new();
        for (blob, cs) in blobs(&m) {
            for (i, c) in blob.chunks.iter().enumerate() {
                if let Some(h) = c {
                    if seen.insert(*h) {
                        wanted.push((*h, blob.chunk_len(cs, i)));
                    }
                }
            }
        }
        let bytes_total: u64 = wanted.iter().map(|w| w.1 as u64).sum();
        let cache = &self.shared.cache;
        if bytes_total > cache.max_bytes() {
            return Err(ProxyError::CacheTooSmall {
                image: m.image_ref(),
                needed: bytes_total,
                max: cache.max_bytes(),
                dir: cache.dir().to_path_buf(),
            });
        }
        type Wanted = Vec<(ChunkHash, u32)>;
        let (cached, to_fetch): (Wanted, Wanted) = wanted.iter().copied().partition(|(h, _)| cache.contains(h));
        let mut done: u64 = cached.iter().map(|w| w.1 as u64).sum();
        progress(done, bytes_total);
        let image_ref = m.image_ref();
        let mut results = futures::stream::iter(
            to_fetch.clone().into_iter().map(|(h, len)| async move { (h, len, self.shared.chunk(h, len, access_for_pull()).await) }),
        )
        .buffer_unordered(self.shared.config.pull_concurrency.max(1));
        let mut bytes_fetched = 0;
        while let Some((hash, len, r)) = results.next().await {
            if let Err(e) = r {
                let index = m.disk.chunks.iter().position(|c| *c == Some(hash)).unwrap_or(0) as u64;
                return Err(ReadError::Chunk { image: image_ref.clone(), index, hash, source: Box::new(e) }.into());
            }
            bytes_fetched += len as u64;
            done += len as u64;
            progress(done, bytes_total);
        }
        Ok(PullReport {
            image: image_ref,
            chunks_total: wanted.len() as u64,
            chunks_fetched: to_fetch.len() as u64,
            chunks_cached: cached.len() as u64,
            bytes_total,
            bytes_fetched,
            elapsed_secs: started.elapsed().as_secs_f64(),
        })
    }

    /// Chunk `index` of `manifest`'s disk, whole, through the cache, trying the image servers
    /// once: an outage is an error at once instead of a wait. For composing a snapshot or a
    /// volume commit over the chunks the guest wrote into (a guest that read only some blocks
    /// of a chunk left it partial here): such a caller needs the image servers for its upload
    /// anyway, and must not hold a paused guest for the fetch timeout.
    pub async fn disk_chunk_once(&self, manifest: &Manifest, index: usize) -> Result<Vec<u8>, ProxyError> {
        let image = manifest.image_ref();
        let len = manifest.disk.chunk_len(manifest.chunk_size, index);
        let Some(hash) = manifest.disk.chunks.get(index).copied().flatten() else {
            return Ok(vec![0u8; len as usize]);
        };
        let file = self
            .shared
            .chunk(hash, len, cache::Access::Read)
            .await
            .map_err(|e| ProxyError::Read(ReadError::Chunk { image: image.clone(), index: index as u64, hash, source: Box::new(e) }))?;
        let mut out = vec![0u8; len as usize];
        file.read_at(&mut out, 0)
            .map_err(|e| ProxyError::Read(ReadError::Io { image, index: index as u64, hash, source: std::sync::Arc::new(e) }))?;
        Ok(out)
    }

    /// The whole content of `blob` (a kernel or initrd of `manifest`) read through the cache.
    pub async fn read_blob(&self, manifest: &Manifest, blob: &Blob) -> Result<Vec<u8>, ProxyError> {
        self.read_blob_chunked(manifest, blob, manifest.chunk_size).await
    }

    /// [`BlockProxy::read_blob`] of a blob in chunks of `chunk_size` (a saved RAM's own).
    pub async fn read_blob_chunked(&self, manifest: &Manifest, blob: &Blob, chunk_size: u32) -> Result<Vec<u8>, ProxyError> {
        let image = manifest.image_ref();
        if blob.size > MAX_BLOB_IN_MEMORY {
            return Err(ProxyError::BlobTooLarge { image, size: blob.size, limit: MAX_BLOB_IN_MEMORY });
        }
        if blob.size == 0 {
            return Ok(Vec::new());
        }
        let n = blob.chunks.len() as u64;
        let files = self.shared.blob_chunks(&image, chunk_size, blob, 0, n - 1, crate::service::Miss::Whole).await?;
        let mut out = vec![0u8; blob.size as usize];
        service::copy_out(&image, blob, chunk_size, 0, &files, 0, &mut out)?;
        Ok(out)
    }

    /// Streams `blob` of `manifest` to the file `path` through the cache, `batch` chunks at a
    /// time (for blobs too large to hold in memory, e.g. a saved memory state).
    pub async fn write_blob_streaming(&self, manifest: &Manifest, blob: &Blob, path: &Path, batch: usize) -> Result<(), ProxyError> {
        use std::io::Write;
        let io = |e: std::io::Error| ProxyError::Cache(cache::io_err(path, "write blob", e));
        let mut f = std::fs::File::create(path).map_err(io)?;
        let cs = manifest.chunk_size as u64;
        let batch = batch.max(1);
        let mut i = 0usize;
        while i < blob.chunks.len() {
            let end = (i + batch).min(blob.chunks.len());
            let start = i as u64 * cs;
            let part = Blob { size: (blob.size - start).min((end - i) as u64 * cs), chunks: blob.chunks[i..end].to_vec() };
            let data = self.read_blob(manifest, &part).await?;
            f.write_all(&data).map_err(io)?;
            i = end;
        }
        f.flush().map_err(io)?;
        Ok(())
    }

    /// Writes `blob` of `manifest` to the file `path` (e.g. the kernel for direct boot).
    pub async fn write_blob(&self, manifest: &Manifest, blob: &Blob, path: &Path) -> Result<(), ProxyError> {
        let data = self.read_blob(manifest, blob).await?;
        tokio::fs::write(path, data).await.map_err(|e| ProxyError::Cache(cache::io_err(path, "write blob", e)))
    }

    /// How many hot pages of warm image `image` were loaded here (`None`: none, or still
    /// loading).
    pub fn hot_pages_loaded(&self, image: &ImageRef) -> Option<usize> {
        self.shared.hot_state(image)?.loaded()
    }

    /// The pages of warm image `image`'s saved RAM that its hot-page bundle announces, as the
    /// page size and the page numbers in the bundle's order (chunks in the order the first
    /// restored guest touched them), waiting up to `wait` for the bundle to start loading (its
    /// export's opening looks the profile up first) and for its table. `None`: no bundle came
    /// to load here, or its table did not come in time.
    pub async fn hot_pages_announced(&self, image: &ImageRef, wait: std::time::Duration) -> Option<(u64, Vec<u64>)> {
        let deadline = tokio::time::Instant::now() + wait;
        let st = loop {
            if let Some(st) = self.shared.hot_state(image) {
                break st;
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        };
        let mut changes = st.subscribe();
        loop {
            if let Some(a) = st.announced() {
                return Some(a);
            }
            if st.ended() {
                return None;
            }
            tokio::time::timeout_at(deadline, changes.changed()).await.ok()?.ok()?;
        }
    }
}

fn access_for_pull() -> cache::Access {
    cache::Access::Read
}

/// Every blob of `m` with its chunk size.
fn blobs(m: &Manifest) -> Vec<(&Blob, u32)> {
    let mut v = vec![&m.disk];
    if let Boot::Kernel { kernel, initrd, .. } = &m.meta.boot {
        v.push(kernel);
        if let Some(i) = initrd {
            v.push(i);
        }
    }
    if let Some(st) = &m.state {
        v.push(&st.blob);
    }
    let mut v: Vec<(&Blob, u32)> = v.into_iter().map(|b| (b, m.chunk_size)).collect();
    v.extend(m.state.iter().flat_map(|s| s.ram.iter().map(|r| (&r.blob, r.chunk_size))));
    v
}

/// Removes the kept manifests under `dir` that are damaged (not a valid manifest, or not the
/// image version their file name says, e.g. truncated or overwritten while the host was down):
/// the next resolve of that version asks an image server again and keeps its answer.
fn drop_damaged_manifests(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let path = e.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let Some(stem) = name.strip_suffix(".json") else {
            // A temp file of an interrupted save.
            let _ = std::fs::remove_file(&path);
            continue;
        };
        let good = std::fs::read(&path).ok().and_then(|b| Manifest::from_json(&b).ok()).is_some_and(|m| m.image_ref().to_string() == stem);
        if !good {
            tracing::warn!(path = %path.display(), "removing a damaged local manifest (fetched again when needed)");
            let _ = std::fs::remove_file(&path);
        }
    }
}
