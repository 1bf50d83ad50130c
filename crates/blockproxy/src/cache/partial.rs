//! Partial chunks of the host chunk cache (see the notes of `cache.rs`): a chunk fetched
//! block by block for random reads, each run of blocks verified against the chunk's hash
//! before it is written, renamed into `chunks/` once complete.

use super::{io_err, is_no_space, CacheError, ChunkCache, ChunkFile, Counters, Entry};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vgrid_api::ChunkHash;

/// A partial chunk in the index: its place in the LRU order and its bytes present.
pub(super) struct PartialEntry {
    pub(super) p: Arc<Partial>,
    pub(super) tick: u64,
    pub(super) bytes: u64,
}

/// A chunk fetched block by block: a sparse file in `tmp/` holding the blocks present, each
/// verified against the chunk's hash before it was written. Reads of present blocks go through
/// [`Partial::chunk_file`] (the descriptor stays valid after eviction or completion).
pub(crate) struct Partial {
    hash: ChunkHash,
    len: u32,
    block: u32,
    file: Arc<File>,
    pub(super) path: PathBuf,
    present: Mutex<Vec<bool>>,
    /// One ranged fetch of the chunk at a time: a reader that waited finds its blocks present.
    pub(crate) fetching: tokio::sync::Mutex<()>,
}

impl Partial {
    /// The blocks covering bytes `[start, end)` of the chunk.
    fn blocks(&self, start: u32, end: u32) -> std::ops::Range<usize> {
        (start / self.block) as usize..end.div_ceil(self.block).min(self.len / self.block) as usize
    }

    /// True when every block covering `[start, end)` is present.
    pub(crate) fn has(&self, start: u32, end: u32) -> bool {
        let present = self.present.lock().unwrap();
        present[self.blocks(start, end)].iter().all(|&b| b)
    }

    /// The runs of missing blocks covering `[start, end)`: (first block, count).
    pub(crate) fn missing(&self, start: u32, end: u32) -> Vec<(u32, u32)> {
        let present = self.present.lock().unwrap();
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for i in self.blocks(start, end) {
            if present[i] {
                continue;
            }
            match runs.last_mut() {
                Some((f, n)) if *f + *n == i as u32 => *n += 1,
                _ => runs.push((i as u32, 1)),
            }
        }
        runs
    }

    /// The chunk's length in bytes.
    pub(super) fn len(&self) -> u32 {
        self.len
    }

    /// The chunk's file, to read blocks that are present (and only those).
    pub(crate) fn chunk_file(&self) -> ChunkFile {
        ChunkFile { file: self.file.clone(), len: self.len }
    }
}

impl ChunkCache {
    /// True when some blocks of chunk `hash` are here as a partial chunk.
    pub(crate) fn has_partial(&self, hash: &ChunkHash) -> bool {
        self.inner.lock().unwrap().partials.contains_key(hash)
    }

    /// The partial chunk of `hash` (`len` bytes, fetched in blocks of `block` bytes), made
    /// (an empty sparse file) if there is none; `None` when the chunk is cached whole or a
    /// whole fetch of it is under way (read it whole).
    pub(crate) fn partial(&self, hash: &ChunkHash, len: u32, block: u32) -> Result<Option<Arc<Partial>>, CacheError> {
        {
            let mut g = self.inner.lock().unwrap();
            if g.map.contains_key(hash) || g.inflight.contains_key(hash) {
                return Ok(None);
            }
            if let Some(e) = g.partials.get(hash) {
                let p = e.p.clone();
                g.touch_partial(hash);
                return Ok(Some(p));
            }
        }
        let (path, file) = self.spares.take().map_err(|e| io_err(&self.tmp_dir, "create a file in", e))?;
        if let Err(e) = file.set_len(len as u64) {
            let _ = std::fs::remove_file(&path);
            return Err(io_err(&path, "size", e));
        }
        let blocks = (len / block) as usize;
        let p = Arc::new(Partial {
            hash: *hash,
            len,
            block,
            file: Arc::new(file),
            path: path.clone(),
            present: Mutex::new(vec![false; blocks]),
            fetching: tokio::sync::Mutex::new(()),
        });
        let mut g = self.inner.lock().unwrap();
        if g.map.contains_key(hash) || g.inflight.contains_key(hash) || g.partials.contains_key(hash) {
            let other = g.partials.get(hash).map(|e| e.p.clone());
            drop(g);
            let _ = std::fs::remove_file(&path);
            return Ok(other);
        }
        // Each partial chunk holds its file open: past half of `max_open_files` of them, the
        // least recently used one goes (its readers keep their descriptor).
        if g.partials.len() >= (self.max_open_files / 2).max(8) {
            let oldest = g.lru.values().find(|h| g.partials.contains_key(*h)).copied();
            if let Some(old) = oldest.and_then(|h| g.remove_partial(&h)) {
                let _ = std::fs::remove_file(&old.path);
                Counters::add(&self.counters.evictions, 1);
            }
        }
        g.tick += 1;
        let tick = g.tick;
        g.lru.insert(tick, *hash);
        g.partials.insert(*hash, PartialEntry { p: p.clone(), tick, bytes: 0 });
        Ok(Some(p))
    }

    /// Verifies `blocks` (from block `first` on) against the chunk's hash, writes them into
    /// partial chunk `p` and marks them present; once every block is, the chunk becomes a
    /// cached chunk like a whole fetched one. Blocking (file I/O). A full file system evicts
    /// like [`ChunkCache::insert`].
    pub(crate) fn put_blocks(&self, p: &Arc<Partial>, first: u32, blocks: &vgrid_storeclient::tree::RangeBlocks) -> Result<(), CacheError> {
        let n = (p.len / p.block) as usize;
        if blocks.cvs.len() != n {
            return Err(CacheError::CorruptRange(vgrid_storeclient::tree::TreeError::Malformed {
                hash: p.hash,
                cause: format!("{} chaining values for a chunk of {n} blocks", blocks.cvs.len()),
            }));
        }
        vgrid_storeclient::tree::verify_blocks(&p.hash, p.block, &blocks.cvs, first, &blocks.data).map_err(CacheError::CorruptRange)?;
        let len = blocks.data.len() as u32;
        loop {
            match p.file.write_all_at(&blocks.data, first as u64 * p.block as u64) {
                Ok(()) => break,
                Err(e) if is_no_space(&e) => {
                    if let Some(cached) = self.make_room(&p.hash, len, &e) {
                        return Err(CacheError::NoSpace { dir: self.dir.clone(), hash: p.hash, len, cached, source: Arc::new(e) });
                    }
                }
                Err(e) => return Err(io_err(&p.path, "write", e)),
            }
        }
        let mut g = self.inner.lock().unwrap();
        let (added, complete) = {
            let mut present = p.present.lock().unwrap();
            let range = first as usize..first as usize + blocks.data.len() / p.block as usize;
            let added = present[range.clone()].iter().filter(|&&b| !b).count() as u64 * p.block as u64;
            present[range].fill(true);
            (added, present.iter().all(|&b| b))
        };
        // Still indexed (not evicted nor superseded by the whole chunk meanwhile)?
        let indexed = g.partials.get(&p.hash).is_some_and(|e| Arc::ptr_eq(&e.p, p));
        if !indexed {
            return Ok(());
        }
        g.partials.get_mut(&p.hash).expect("indexed").bytes += added;
        g.bytes += added;
        g.touch_partial(&p.hash);
        if complete {
            g.remove_partial(&p.hash);
            let path = self.chunk_path(&p.hash);
            if let Err(e) = std::fs::rename(&p.path, &path) {
                drop(g);
                tracing::warn!(path = %path.display(), chunk = %p.hash, "completed partial chunk not stored: rename failed: {e}");
                let _ = std::fs::remove_file(&p.path);
                return Ok(());
            }
            g.tick += 1;
            let tick = g.tick;
            g.map.insert(p.hash, Entry { len: p.len, tick, fd: Some(p.file.clone()), verified: true });
            g.lru.insert(tick, p.hash);
            g.bytes += p.len as u64;
            g.open_fds += 1;
        }
        self.evict(&mut g, Some(&p.hash));
        let closed = self.purge_fds(&mut g);
        drop(g);
        drop(closed);
        Ok(())
    }
}
