//! The host chunk cache: verified chunks stored uncompressed under `cache_dir`, one file per
//! chunk, keyed by chunk hash (a chunk shared by several images is stored and fetched once).
//!
//! * Size-bounded with exact LRU eviction; a chunk being served when it is evicted stays readable
//!   through the open file descriptor, so a cache smaller than one image still serves correctly.
//! * Chunk files are written to `tmp/` and renamed into `chunks/xx/HASH`, so a crash never leaves
//!   a partial chunk visible. The index is rebuilt from the directory at open; files found at
//!   open are verified against their hash by a background pass started with the proxy
//!   ([`ChunkCache::spawn_verify`]) or, if a read comes first, by that read. A damaged file
//!   (truncated, overwritten, misnamed) is dropped and counted in `verify_failures`; its chunk is
//!   fetched again when next read.
//! * A full file system (ENOSPC, EDQUOT) while storing a chunk: the partial temp file is removed
//!   (it was never visible), least recently used chunks are evicted and the bound is lowered to
//!   what the file system holds (logged once per lowering), and the write is tried again; only
//!   when nothing is left to evict does the fetch fail, with [`CacheError::NoSpace`].
//! * Concurrent misses on one chunk share one fetch (single-flight); a failed fetch is reported
//!   to every waiter and forgotten, never cached.
//! * Hits take a short mutex to find the chunk's open file descriptor; reads are `pread`s done
//!   by the caller without any lock.
//! * Partial chunks (random reads, see `service.rs`): a chunk can be fetched block by block
//!   (`vgrid_storeclient::tree`: each run of blocks comes with the chaining values of all the
//!   chunk's blocks and is verified here against the chunk's hash before it is written) into a
//!   sparse file in `tmp/`, with the blocks present kept in memory ([`Partial`]). Readers read
//!   only blocks present. When every block is present the file is renamed into `chunks/` like
//!   a whole fetched chunk; a whole chunk stored meanwhile replaces it. Partial chunks count
//!   against the bound (the bytes of their blocks present) and are evicted like chunks; they do
//!   not survive a restart (`tmp/` is emptied at open).
//! * The files in `tmp/` come from `spare/`, where a background thread keeps a few empty ones
//!   (`spare.rs`): creating a file can cost a miss ~0.3 ms on ext4 without a journal.
//! * The directory is locked (`flock` on `cache_dir/lock`) so two processes never share it.

use crate::source::SourceError;
use crate::stats::{CacheStats, Counters};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;
use vgrid_api::ChunkHash;

mod partial;
mod spare;
pub(crate) use partial::Partial;
use partial::PartialEntry;

/// Errors of the chunk cache; each names the directory, file or chunk concerned.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("cache directory {dir} is in use by another process (lock on {dir}/lock is held)")]
    Locked { dir: PathBuf },
    #[error("cache {path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        /// Shared: one failed fetch answers every reader waiting for it.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// `source` names the chunk and the source.
    #[error("{source}")]
    Fetch {
        hash: ChunkHash,
        #[source]
        source: SourceError,
    },
    #[error("chunk {hash}: received bytes hash to {actual}; refusing to cache or serve them")]
    Corrupt { hash: ChunkHash, actual: ChunkHash },
    #[error("refusing to cache or serve part of a chunk: {0}")]
    CorruptRange(#[source] vgrid_storeclient::tree::TreeError),
    #[error("chunk {hash}: received {actual} bytes, the manifest says {expected}")]
    Length { hash: ChunkHash, expected: u32, actual: usize },
    #[error("chunk {hash}: its fetch ended without an answer (the proxy is stopping)")]
    Abandoned { hash: ChunkHash },
    /// The cache's file system is full although every chunk that could be evicted was.
    #[error(
        "cache {dir}: no space left to store chunk {hash} ({len} bytes) although every evictable chunk was evicted ({cached} bytes still cached, in use by readers): the file system holding the cache is full; free space there or give the cache another directory: {source}"
    )]
    NoSpace {
        dir: PathBuf,
        hash: ChunkHash,
        len: u32,
        cached: u64,
        #[source]
        source: Arc<std::io::Error>,
    },
}

impl CacheError {
    /// The chunk's image servers could not be reached (an outage, worth waiting for).
    pub fn is_outage(&self) -> bool {
        matches!(self, CacheError::Fetch { source, .. } if source.is_unavailable())
    }
}

/// `op` on `path` failed with `e`.
pub(crate) fn io_err(path: &Path, op: &'static str, e: std::io::Error) -> CacheError {
    CacheError::Io { path: path.to_path_buf(), op, source: Arc::new(e) }
}

/// An open, verified chunk file. Reading from it never takes a cache lock, and it stays valid
/// even if the chunk is evicted meanwhile.
#[derive(Clone, Debug)]
pub struct ChunkFile {
    file: Arc<File>,
    len: u32,
}

impl ChunkFile {
    /// Length of the chunk in bytes.
    pub fn len(&self) -> u32 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The open file (for `sendfile`).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }
    /// Fills `buf` from the chunk starting at `offset` (one `pread`, repeated on short reads).
    pub fn read_at(&self, buf: &mut [u8], offset: u32) -> std::io::Result<()> {
        if offset as u64 + buf.len() as u64 > self.len as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("read of {} bytes at {offset} beyond the {}-byte chunk", buf.len(), self.len),
            ));
        }
        self.file.read_exact_at(buf, offset as u64)
    }
}

type FetchOutcome = Option<Result<ChunkFile, CacheError>>;

struct Entry {
    len: u32,
    tick: u64,
    fd: Option<Arc<File>>,
    /// False for files found at open until their content has been hashed once.
    verified: bool,
}

#[derive(Default)]
struct Inner {
    map: HashMap<ChunkHash, Entry>,
    /// Entries whose file has not been verified yet (found at open).
    unverified: u64,
    lru: BTreeMap<u64, ChunkHash>,
    tick: u64,
    bytes: u64,
    open_fds: usize,
    /// Fetches under way; their waiters hold receivers (a fetch nobody waits for any more is
    /// abandoned).
    inflight: HashMap<ChunkHash, Arc<watch::Sender<FetchOutcome>>>,
    /// Chunks fetched in part (random reads); never also in `map`.
    partials: HashMap<ChunkHash, PartialEntry>,
}

impl Inner {
    fn touch(&mut self, hash: &ChunkHash) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.map.get_mut(hash) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, *hash);
        }
    }
    fn remove(&mut self, hash: &ChunkHash) -> Option<Entry> {
        let e = self.map.remove(hash)?;
        self.lru.remove(&e.tick);
        self.bytes -= e.len as u64;
        if e.fd.is_some() {
            self.open_fds -= 1;
        }
        if !e.verified {
            self.unverified -= 1;
        }
        Some(e)
    }
    /// Takes partial chunk `hash` out of the index (the caller unlinks its file).
    fn remove_partial(&mut self, hash: &ChunkHash) -> Option<Arc<Partial>> {
        let e = self.partials.remove(hash)?;
        self.lru.remove(&e.tick);
        self.bytes -= e.bytes;
        Some(e.p)
    }
    fn touch_partial(&mut self, hash: &ChunkHash) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.partials.get_mut(hash) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, *hash);
        }
    }
    /// Marks the entry of `hash` verified (its file's bytes hash to `hash`).
    fn set_verified(&mut self, hash: &ChunkHash) {
        if let Some(e) = self.map.get_mut(hash) {
            if !e.verified {
                e.verified = true;
                self.unverified -= 1;
            }
        }
    }
}

/// Whether `e` says the file system is full (or the user's quota on it is).
fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Why a chunk is wanted: reads count as hits/misses, prefetches as prefetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// A read whose waiters take the fetched bytes as soon as they are verified, in memory,
    /// while the chunk file is written (a guest's page fault on a lazily paged RAM: creating a
    /// file can cost more than the fetch, 0.5 ms on some file systems). A chunk that cannot be
    /// stored is then still answered, and the failure only logged and counted.
    ReadEarly,
    Prefetch,
}

impl Access {
    fn is_read(self) -> bool {
        matches!(self, Access::Read | Access::ReadEarly)
    }
}

/// The host chunk cache. Create with [`ChunkCache::open`]; share as `Arc<ChunkCache>`.
pub struct ChunkCache {
    dir: PathBuf,
    chunks_dir: PathBuf,
    tmp_dir: PathBuf,
    /// The bound in force: the configured one, lowered when the file system filled up first.
    limit: AtomicU64,
    max_open_files: usize,
    inner: Mutex<Inner>,
    pub(crate) counters: Counters,
    /// Empty files in `spare/` made ahead for the chunks to come (see `spare.rs`).
    spares: spare::SpareFiles,
    _lock: File,
    /// Tests: milliseconds each fetched chunk's store is held back (a slow file system).
    #[cfg(test)]
    pub(crate) store_delay_ms: AtomicU64,
}

impl ChunkCache {
    /// Opens (creating if needed) the cache in `dir`, bounded to `max_bytes`, keeping at most
    /// `max_open_files` chunk files open. Fails if another process holds the directory.
    pub fn open(dir: impl AsRef<Path>, max_bytes: u64, max_open_files: usize) -> Result<ChunkCache, CacheError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, "create directory", e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, "open lock file", e))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(CacheError::Locked { dir });
            }
            return Err(io_err(&lock_path, "lock", e));
        }
        let chunks_dir = dir.join("chunks");
        let tmp_dir = dir.join("tmp");
        // Leftover temp files are chunks whose writing was interrupted: drop them.
        if tmp_dir.exists() {
            std::fs::remove_dir_all(&tmp_dir).map_err(|e| io_err(&tmp_dir, "clean temp directory", e))?;
        }
        std::fs::create_dir_all(&tmp_dir).map_err(|e| io_err(&tmp_dir, "create directory", e))?;
        // Spare files of the last run: made again.
        let spare_dir = dir.join("spare");
        if spare_dir.exists() {
            std::fs::remove_dir_all(&spare_dir).map_err(|e| io_err(&spare_dir, "clean spare directory", e))?;
        }
        std::fs::create_dir_all(&spare_dir).map_err(|e| io_err(&spare_dir, "create directory", e))?;
        for i in 0..=255u8 {
            let d = chunks_dir.join(format!("{i:02x}"));
            std::fs::create_dir_all(&d).map_err(|e| io_err(&d, "create directory", e))?;
        }
        let cache = ChunkCache {
            dir,
            chunks_dir,
            tmp_dir: tmp_dir.clone(),
            limit: AtomicU64::new(max_bytes),
            max_open_files: max_open_files.max(16),
            inner: Mutex::new(Inner::default()),
            counters: Counters::default(),
            spares: spare::SpareFiles::new(spare_dir, tmp_dir.clone()),
            _lock: lock,
            #[cfg(test)]
            store_delay_ms: AtomicU64::new(0),
        };
        cache.load_index()?;
        Ok(cache)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The size bound in bytes: the configured one, or lower once the cache's file system
    /// filled up before the cache reached it.
    pub fn max_bytes(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    fn load_index(&self) -> Result<(), CacheError> {
        let mut found: Vec<(std::time::SystemTime, ChunkHash, u32)> = Vec::new();
        for sub in std::fs::read_dir(&self.chunks_dir).map_err(|e| io_err(&self.chunks_dir, "list", e))? {
            let sub = sub.map_err(|e| io_err(&self.chunks_dir, "list", e))?.path();
            if !sub.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&sub).map_err(|e| io_err(&sub, "list", e))? {
                let f = f.map_err(|e| io_err(&sub, "list", e))?;
                let path = f.path();
                let Some(hash) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<ChunkHash>().ok()) else {
                    continue;
                };
                let meta = f.metadata().map_err(|e| io_err(&path, "stat", e))?;
                if meta.len() == 0 || meta.len() > vgrid_api::MAX_CHUNK_SIZE as u64 || path != self.chunk_path(&hash) {
                    tracing::warn!(path = %path.display(), bytes = meta.len(), "removing malformed cache file (empty, too long or misplaced)");
                    Counters::add(&self.counters.verify_failures, 1);
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                found.push((mtime, hash, meta.len() as u32));
            }
        }
        found.sort();
        let mut inner = self.inner.lock().unwrap();
        for (_, hash, len) in found {
            inner.tick += 1;
            let tick = inner.tick;
            inner.map.insert(hash, Entry { len, tick, fd: None, verified: false });
            inner.lru.insert(tick, hash);
            inner.bytes += len as u64;
            inner.unverified += 1;
        }
        let n = inner.map.len();
        self.evict(&mut inner, None);
        tracing::info!(dir = %self.dir.display(), chunks = n, bytes = inner.bytes, "chunk cache opened");
        Ok(())
    }

    fn chunk_path(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.chunks_dir.join(&hex[..2]).join(hex)
    }

    /// Evicts least recently used chunks until within the bound, never `keep`.
    fn evict(&self, inner: &mut Inner, keep: Option<&ChunkHash>) {
        let limit = self.limit.load(Ordering::Relaxed);
        while inner.bytes > limit {
            let victim = inner.lru.values().find(|h| Some(*h) != keep).copied();
            let Some(victim) = victim else { break };
            if let Some(p) = inner.remove_partial(&victim) {
                let _ = std::fs::remove_file(&p.path);
                Counters::add(&self.counters.evictions, 1);
                continue;
            }
            inner.remove(&victim);
            // Unlink under the lock so a concurrent re-insert of the same chunk (rename, also
            // under the lock) can never be undone by this eviction.
            let _ = std::fs::remove_file(self.chunk_path(&victim));
            Counters::add(&self.counters.evictions, 1);
        }
    }

    /// Past `max_open_files` open chunk files, takes the least recently used half's descriptors
    /// out of the cache; the caller drops them (closes the files) after releasing the lock, so
    /// hundreds of `close` calls never stall every reader.
    #[must_use]
    fn purge_fds(&self, inner: &mut Inner) -> Vec<Arc<File>> {
        let mut closed = Vec::new();
        if inner.open_fds <= self.max_open_files {
            return closed;
        }
        let target = self.max_open_files / 2;
        let Inner { map, lru, open_fds, .. } = inner;
        for h in lru.values() {
            if *open_fds <= target {
                break;
            }
            if let Some(e) = map.get_mut(h) {
                if let Some(fd) = e.fd.take() {
                    *open_fds -= 1;
                    closed.push(fd);
                }
            }
        }
        closed
    }

    /// True if the chunk is cached (no LRU update, no counters).
    pub fn contains(&self, hash: &ChunkHash) -> bool {
        self.inner.lock().unwrap().map.contains_key(hash)
    }

    /// True if the chunk is cached or a whole fetch of it is under way (readahead skips it).
    pub(crate) fn cached_or_coming(&self, hash: &ChunkHash) -> bool {
        let g = self.inner.lock().unwrap();
        g.map.contains_key(hash) || g.inflight.contains_key(hash)
    }

    /// How many of `hashes` are here, in chunks: a chunk cached whole counts 1, a partial chunk
    /// (fetched in part by random and short sequential reads) the fraction of its bytes present.
    /// One lock for all of them (no LRU update, no counters).
    pub fn held<'a>(&self, hashes: impl IntoIterator<Item = &'a ChunkHash>) -> f64 {
        let g = self.inner.lock().unwrap();
        hashes
            .into_iter()
            .map(|h| if g.map.contains_key(h) { 1.0 } else { g.partials.get(h).map_or(0.0, |e| e.bytes as f64 / e.p.len() as f64) })
            .sum()
    }

    /// The cached chunk, or `None` on a miss. Counts a hit.
    pub fn get(&self, hash: &ChunkHash) -> Option<ChunkFile> {
        let f = self.lookup(hash)?;
        Counters::add(&self.counters.hits, 1);
        crate::metrics::hits(1);
        Some(f)
    }

    /// Like [`ChunkCache::get`] without counting (see [`ChunkCache::count_hits`]).
    pub(crate) fn get_uncounted(&self, hash: &ChunkHash) -> Option<ChunkFile> {
        self.lookup(hash)
    }

    pub(crate) fn count_hits(&self, n: u64) {
        Counters::add(&self.counters.hits, n);
        crate::metrics::hits(n);
    }

    /// Counts a ranged fetch of part of a chunk (a read's miss, or a prefetch) and its bytes.
    pub(crate) fn count_range_fetch(&self, took: std::time::Duration, bytes: u64, access: Access) {
        if access.is_read() {
            Counters::add(&self.counters.misses, 1);
            crate::metrics::miss();
        } else {
            Counters::add(&self.counters.prefetched, 1);
        }
        self.counters.record_fetch(took, bytes);
    }

    /// Counts a fetch that failed.
    pub(crate) fn count_fetch_error(&self) {
        Counters::add(&self.counters.fetch_errors, 1);
    }

    fn lookup(&self, hash: &ChunkHash) -> Option<ChunkFile> {
        let verified;
        let len;
        {
            let mut g = self.inner.lock().unwrap();
            let e = g.map.get(hash)?;
            len = e.len;
            verified = e.verified;
            if let (true, Some(fd)) = (e.verified, &e.fd) {
                let f = ChunkFile { file: fd.clone(), len };
                g.touch(hash);
                return Some(f);
            }
        }
        // Slow path: open the file (and verify it if it predates this process).
        let path = self.chunk_path(hash);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %path.display(), "cached chunk unreadable, dropping it: {e}");
                let mut g = self.inner.lock().unwrap();
                if g.map.get(hash).is_some_and(|e| e.fd.is_none()) {
                    g.remove(hash);
                }
                return None;
            }
        };
        if !verified {
            let mut data = Vec::with_capacity(len as usize);
            let ok = (&file).read_to_end(&mut data).is_ok() && data.len() == len as usize && ChunkHash::of(&data) == *hash;
            if !ok {
                tracing::error!(path = %path.display(), chunk = %hash, "cached chunk file is corrupt; dropping it");
                Counters::add(&self.counters.verify_failures, 1);
                let mut g = self.inner.lock().unwrap();
                if g.map.get(hash).is_some_and(|e| !e.verified) {
                    g.remove(hash);
                    let _ = std::fs::remove_file(&path);
                }
                return None;
            }
        }
        let file = Arc::new(file);
        let mut g = self.inner.lock().unwrap();
        g.set_verified(hash);
        let opened = match g.map.get_mut(hash) {
            Some(e) if e.fd.is_none() => {
                e.fd = Some(file.clone());
                true
            }
            // Open already, or evicted meanwhile (our descriptor still reads the right bytes).
            _ => false,
        };
        if opened {
            g.open_fds += 1;
        }
        g.touch(hash);
        let closed = self.purge_fds(&mut g);
        drop(g);
        drop(closed);
        Some(ChunkFile { file, len })
    }

    /// Verifies `data` against `hash` and stores it. Blocking (file I/O). When the file system
    /// is full, evicts and lowers the bound until the chunk fits (see the module's notes);
    /// [`CacheError::NoSpace`] when nothing is left to evict.
    pub fn insert(&self, hash: &ChunkHash, data: &[u8]) -> Result<ChunkFile, CacheError> {
        let actual = ChunkHash::of(data);
        if actual != *hash {
            return Err(CacheError::Corrupt { hash: *hash, actual });
        }
        self.insert_verified(hash, data)
    }

    /// [`ChunkCache::insert`] of `data` already verified against `hash`.
    fn insert_verified(&self, hash: &ChunkHash, data: &[u8]) -> Result<ChunkFile, CacheError> {
        let len = data.len() as u32;
        loop {
            match self.store(hash, data) {
                Ok(f) => return Ok(f),
                Err((path, op, e)) if is_no_space(&e) => {
                    let cached = self.make_room(hash, len, &e);
                    if let Some(cached) = cached {
                        return Err(CacheError::NoSpace { dir: self.dir.clone(), hash: *hash, len, cached, source: Arc::new(e) });
                    }
                    tracing::debug!(path = %path.display(), op, "no space left; retrying after eviction");
                }
                Err((path, op, e)) => return Err(io_err(&path, op, e)),
            }
        }
    }

    /// After the file system refused a chunk of `len` bytes: lowers the bound below what is
    /// cached and evicts down to it (never `keep`). `Some(bytes still cached)` when nothing
    /// could be evicted (the chunk cannot be stored), else `None` (try again).
    fn make_room(&self, keep: &ChunkHash, len: u32, e: &std::io::Error) -> Option<u64> {
        let mut g = self.inner.lock().unwrap();
        let evictable = g.map.keys().chain(g.partials.keys()).any(|h| h != keep);
        if !evictable {
            return Some(g.bytes);
        }
        let before = (g.bytes, g.map.len() + g.partials.len());
        let limit = g.bytes.saturating_sub(2 * len as u64);
        let old = self.limit.fetch_min(limit, Ordering::Relaxed);
        self.evict(&mut g, Some(keep));
        let evicted = before.1 - g.map.len() - g.partials.len();
        if evicted == 0 {
            return Some(g.bytes);
        }
        Counters::add(&self.counters.disk_full_evictions, evicted as u64);
        if limit < old {
            tracing::warn!(
                dir = %self.dir.display(),
                "the cache's file system is full ({e}) with {} bytes cached: evicted {evicted} chunks ({} bytes) and keeping the cache under {} bytes from now on (was {})",
                before.0,
                before.0 - g.bytes,
                self.limit.load(Ordering::Relaxed),
                old
            );
        }
        None
    }

    /// Writes `data` to a temp file and renames it to the chunk's path (a partial file is never
    /// visible: it is removed when writing fails), then indexes it. The error says which path
    /// and step failed.
    fn store(&self, hash: &ChunkHash, data: &[u8]) -> Result<ChunkFile, (PathBuf, &'static str, std::io::Error)> {
        let len = data.len() as u32;
        let (tmp, mut f) = self.spares.take().map_err(|e| (self.tmp_dir.clone(), "create a file in", e))?;
        if let Err(e) = f.write_all(data) {
            drop(f);
            let _ = std::fs::remove_file(&tmp);
            return Err((tmp, "write", e));
        }
        let file = Arc::new(f);
        let path = self.chunk_path(hash);
        let mut g = self.inner.lock().unwrap();
        if let Err(e) = std::fs::rename(&tmp, &path) {
            drop(g);
            let _ = std::fs::remove_file(&tmp);
            return Err((path, "rename into place", e));
        }
        // A partial fetch of the chunk is superseded (its readers keep their descriptor).
        if let Some(p) = g.remove_partial(hash) {
            let _ = std::fs::remove_file(&p.path);
        }
        if let Some(e) = g.map.get_mut(hash) {
            // Inserted concurrently (same bytes), or found at open and not verified yet (the
            // rename just replaced that file, whatever it held): keep one entry, make it usable.
            let old = std::mem::replace(&mut e.len, len);
            g.bytes = g.bytes - old as u64 + len as u64;
            g.set_verified(hash);
        } else {
            g.tick += 1;
            let tick = g.tick;
            g.map.insert(*hash, Entry { len, tick, fd: Some(file.clone()), verified: true });
            g.lru.insert(tick, *hash);
            g.bytes += len as u64;
            g.open_fds += 1;
        }
        g.touch(hash);
        self.evict(&mut g, Some(hash));
        let closed = self.purge_fds(&mut g);
        drop(g);
        drop(closed);
        Ok(ChunkFile { file, len })
    }

    /// The chunk from the cache, or fetched with `fetch` (called only if no fetch of this chunk
    /// is in flight; the fetch runs as its own task, so a cancelled caller never strands the
    /// other waiters). The fetched bytes are verified against `hash` and must be `len` long.
    /// The fetch bounds its own time (one try, or a read's wait: see `service.rs`).
    pub async fn get_or_fetch<F, Fut>(
        self: &Arc<Self>,
        hash: &ChunkHash,
        len: u32,
        access: Access,
        fetch: F,
    ) -> Result<ChunkFile, CacheError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, SourceError>> + Send + 'static,
    {
        let mut fetch = Some(fetch);
        loop {
            if let Some(f) = self.lookup(hash) {
                if access.is_read() {
                    Counters::add(&self.counters.hits, 1);
                    crate::metrics::hits(1);
                }
                return Ok(f);
            }
            let mut rx = {
                let mut g = self.inner.lock().unwrap();
                if g.map.contains_key(hash) {
                    continue; // inserted meanwhile
                }
                if let Some(tx) = g.inflight.get(hash) {
                    if access.is_read() {
                        Counters::add(&self.counters.misses, 1);
                        crate::metrics::miss();
                        Counters::add(&self.counters.coalesced, 1);
                    }
                    tx.subscribe()
                } else {
                    let Some(fetch) = fetch.take() else {
                        // Our own earlier fetch was abandoned without a result (cannot happen
                        // unless the runtime shuts down); give up rather than spin.
                        return Err(CacheError::Abandoned { hash: *hash });
                    };
                    let (tx, rx) = watch::channel(None);
                    let tx = Arc::new(tx);
                    g.inflight.insert(*hash, tx.clone());
                    drop(g);
                    match access {
                        Access::Read | Access::ReadEarly => {
                            Counters::add(&self.counters.misses, 1);
                            crate::metrics::miss();
                        }
                        Access::Prefetch => Counters::add(&self.counters.prefetched, 1),
                    }
                    self.spawn_fetch(*hash, len, fetch(), tx, access == Access::ReadEarly);
                    rx
                }
            };
            let settled = match rx.wait_for(|v| v.is_some()).await {
                Ok(v) => v.clone(),
                Err(_) => None, // the fetch ended without an answer (abandoned): retry
            };
            if let Some(outcome) = settled {
                if access != Access::ReadEarly && outcome.is_ok() && !self.contains(hash) {
                    // Joined a fetch that answered its reads before storing the chunk: this
                    // access wants it stored (a hot-page bundle is built from the cache's files).
                    while rx.changed().await.is_ok() {}
                    if let Some(f) = self.lookup(hash) {
                        return Ok(f);
                    }
                }
                return outcome;
            }
        }
    }

    /// Runs the fetch of `hash` as its own task; when every waiter has gone (e.g. the reads of
    /// a client that disconnected while they waited for an image server) it is abandoned.
    fn spawn_fetch<Fut>(self: &Arc<Self>, hash: ChunkHash, len: u32, fut: Fut, tx: Arc<watch::Sender<FetchOutcome>>, early: bool)
    where
        Fut: Future<Output = Result<Vec<u8>, SourceError>> + Send + 'static,
    {
        let this = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let fetched = tokio::select! {
                r = fut => Some(r),
                _ = tx.closed() => None,
            };
            let Some(fetched) = fetched else {
                let mut g = this.inner.lock().unwrap();
                if g.inflight.get(&hash).is_some_and(|t| Arc::ptr_eq(t, &tx)) {
                    g.inflight.remove(&hash);
                }
                tracing::debug!(chunk = %hash, "fetch abandoned: nobody waits for it any more");
                return;
            };
            // A RAM fault's fetch answers its reads from memory once verified (`answer_early`),
            // then stores the chunk like any other; only its failure is no longer theirs.
            let mut answered = false;
            let res = match fetched {
                Err(e) => Err(CacheError::Fetch { hash, source: e }),
                Ok(data) if data.len() != len as usize => Err(CacheError::Length { hash, expected: len, actual: data.len() }),
                Ok(data) => {
                    let took = started.elapsed();
                    answered = early && ChunkHash::of(&data) == hash && this.answer_early(hash, &data, took, &tx);
                    let c = this.clone();
                    let store = move || {
                        #[cfg(test)]
                        std::thread::sleep(std::time::Duration::from_millis(c.store_delay_ms.load(Ordering::Relaxed)));
                        if answered {
                            c.insert_verified(&hash, &data)
                        } else {
                            c.insert(&hash, &data)
                        }
                    };
                    let t1 = Instant::now();
                    let stored = tokio::task::spawn_blocking(store).await;
                    tracing::trace!(chunk = %hash, fetch_us = took.as_micros() as u64, store_us = t1.elapsed().as_micros() as u64, "chunk fetched and stored");
                    match stored {
                        Ok(r) => {
                            if r.is_ok() && !answered {
                                this.counters.record_fetch(took, len as u64);
                            }
                            r
                        }
                        Err(e) => Err(io_err(&this.dir, "store chunk", std::io::Error::other(e))),
                    }
                }
            };
            if res.is_err() {
                Counters::add(&this.counters.fetch_errors, 1);
            }
            this.inner.lock().unwrap().inflight.remove(&hash);
            match res {
                Err(e) if answered => {
                    tracing::warn!(chunk = %hash, "a read of this chunk was answered from memory, but the chunk could not be stored: {e}")
                }
                _ if answered => {}
                res => {
                    let _ = tx.send(Some(res));
                }
            }
        });
    }

    /// For a [`Access::ReadEarly`] fetch whose bytes (`data`, verified against `hash`) came
    /// after `took`: hands them to its waiters in an anonymous in-memory file before the chunk
    /// file is written. False (nothing sent) when no such file can be made: the caller then
    /// stores first, as for any fetch.
    fn answer_early(&self, hash: ChunkHash, data: &[u8], took: std::time::Duration, tx: &watch::Sender<FetchOutcome>) -> bool {
        let Ok(mem) = memfd_with(data) else { return false };
        self.counters.record_fetch(took, data.len() as u64);
        let _ = tx.send(Some(Ok(ChunkFile { file: Arc::new(mem), len: data.len() as u32 })));
        tracing::trace!(chunk = %hash, fetch_us = took.as_micros() as u64, "chunk answered from memory before it is stored");
        true
    }

    /// Verifies, on a thread of its own, every chunk file found at open that no read has
    /// verified yet: a damaged one (its bytes do not hash to its name) is dropped and counted in
    /// `verify_failures`, so it is fetched again when read. The thread holds the cache only
    /// while it checks one file, and stops when the cache is gone.
    pub fn spawn_verify(self: &Arc<Self>) {
        let todo: Vec<ChunkHash> = {
            let g = self.inner.lock().unwrap();
            g.map.iter().filter(|(_, e)| !e.verified).map(|(h, _)| *h).collect()
        };
        if todo.is_empty() {
            return;
        }
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("cache-verify".into()).spawn(move || {
            let started = Instant::now();
            let (mut checked, mut dropped) = (0u64, 0u64);
            for hash in &todo {
                let Some(cache) = weak.upgrade() else { return };
                match cache.verify_one(hash) {
                    Some(true) => checked += 1,
                    Some(false) => {
                        checked += 1;
                        dropped += 1;
                    }
                    None => {}
                }
            }
            if let Some(cache) = weak.upgrade() {
                tracing::info!(
                    dir = %cache.dir.display(),
                    "verified the {checked} chunk files found at start in {:.1} s: {dropped} damaged, dropped (fetched again when read)",
                    started.elapsed().as_secs_f64()
                );
            }
        });
        if let Err(e) = spawned {
            // Reads still verify each file first; only the early check is lost.
            tracing::warn!(dir = %self.dir.display(), "cannot start the check of cached chunks: {e}");
        }
    }

    /// Verifies the file of `hash` if it is still unverified: `Some(true)` good, `Some(false)`
    /// damaged (dropped), `None` nothing to do.
    fn verify_one(&self, hash: &ChunkHash) -> Option<bool> {
        let len = {
            let g = self.inner.lock().unwrap();
            let e = g.map.get(hash)?;
            if e.verified {
                return None;
            }
            e.len
        };
        let path = self.chunk_path(hash);
        let ok = std::fs::read(&path).map(|d| d.len() == len as usize && ChunkHash::of(&d) == *hash).unwrap_or(false);
        let mut g = self.inner.lock().unwrap();
        if g.map.get(hash).is_none_or(|e| e.verified) {
            return None; // verified by a read, or gone, meanwhile
        }
        if ok {
            g.set_verified(hash);
        } else {
            tracing::error!(path = %path.display(), chunk = %hash, "cached chunk file is damaged; dropping it");
            Counters::add(&self.counters.verify_failures, 1);
            g.remove(hash);
            let _ = std::fs::remove_file(&path);
        }
        Some(ok)
    }

    /// Counters and contents of the cache.
    pub fn stats(&self) -> CacheStats {
        let (bytes, chunks, unverified) = {
            let g = self.inner.lock().unwrap();
            (g.bytes, g.map.len() as u64, g.unverified)
        };
        let mut s = self.counters.snapshot(bytes, chunks, self.max_bytes());
        s.unverified = unverified;
        s
    }
}

/// An anonymous in-memory file (`memfd_create`) holding `data`.
fn memfd_with(data: &[u8]) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: a constant NUL-terminated name; the descriptor returned is owned by the File.
    let fd = unsafe { libc::memfd_create(c"vgrid-chunk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(data)?;
    Ok(f)
}

#[cfg(test)]
mod tests;
