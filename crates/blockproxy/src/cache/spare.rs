//! Empty files made ahead of need in the cache's `spare/`, so that a chunk miss does not create
//! one while a guest waits (it renames one into `tmp/`, which allocates no inode). Creating a
//! file on ext4 without a journal right after many were deleted (a cache evicting, the chunks
//! of a removed cache) scans the inode table for an inode not recently freed: perf of cold 4 KiB reads showed ~0.3 ms per `open(O_CREAT)` there, ~40% of a miss
//! on loopback. A background thread keeps [`TARGET`] of them; a miss takes one, or creates
//! its own when none is left. The thread ends with the cache, before the cache's directory
//! lock is released (a cache opened again on the directory empties `spare/`, which a file made
//! behind its back would keep from emptying).

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

/// Spare files kept ready.
const TARGET: usize = 32;
/// A take that leaves fewer than this starts a refill.
const LOW: usize = 16;

pub(super) struct Spares {
    /// Where the spares wait (emptied when the cache opens).
    dir: PathBuf,
    /// Where a taken one goes: the cache's `tmp/`.
    tmp: PathBuf,
    files: Mutex<Vec<(PathBuf, File)>>,
    refilling: AtomicBool,
    seq: AtomicU64,
    /// Set when the owner is dropped: the refill makes no more files.
    stopped: AtomicBool,
    /// The refill thread last started (held while one is started, so that [`SpareFiles`]'s
    /// drop either joins it or it sees `stopped`).
    worker: Mutex<Option<JoinHandle<()>>>,
}

/// The cache's spare files: [`Spares`], whose refill thread is stopped and joined on drop.
pub(super) struct SpareFiles(Arc<Spares>);

impl SpareFiles {
    /// Spares in `dir` (an empty directory), taken into `tmp`, filled in the background from
    /// now on.
    pub(super) fn new(dir: PathBuf, tmp: PathBuf) -> SpareFiles {
        let s = Arc::new(Spares {
            dir,
            tmp,
            files: Mutex::default(),
            refilling: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            worker: Mutex::new(None),
        });
        s.refill();
        SpareFiles(s)
    }

    /// See [`Spares::take`].
    pub(super) fn take(&self) -> std::io::Result<(PathBuf, File)> {
        self.0.take()
    }
}

impl Drop for SpareFiles {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Release);
        let worker = self.0.worker.lock().unwrap().take();
        if let Some(w) = worker {
            // At most one file create away: the thread checks `stopped` before each.
            let _ = w.join();
        }
    }
}

impl Spares {
    /// An empty file open for reading and writing, and its path in `tmp/`: a spare moved
    /// there, or one made there now when none is left.
    pub(super) fn take(self: &Arc<Self>) -> std::io::Result<(PathBuf, File)> {
        let (spare, left) = {
            let mut files = self.files.lock().unwrap();
            (files.pop(), files.len())
        };
        if left < LOW {
            self.refill();
        }
        let to = self.tmp.join(format!("t.{}", self.seq.fetch_add(1, Ordering::Relaxed)));
        if let Some((from, file)) = spare {
            match std::fs::rename(&from, &to) {
                Ok(()) => return Ok((to, file)),
                Err(e) => {
                    tracing::debug!(path = %from.display(), "spare file not moved: {e}");
                    let _ = std::fs::remove_file(&from);
                }
            }
        }
        Ok((to.clone(), Self::create(&to)?))
    }

    fn create(path: &std::path::Path) -> std::io::Result<File> {
        OpenOptions::new().read(true).write(true).create_new(true).open(path)
    }

    /// Tops the spares up to [`TARGET`] on a thread of its own (one refill at a time); stops
    /// when the cache is gone or a file cannot be made (the misses then make their own).
    fn refill(self: &Arc<Self>) {
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut worker = self.worker.lock().unwrap();
        let weak: Weak<Spares> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("cache-spares".into()).spawn(move || loop {
            let Some(s) = weak.upgrade() else { return };
            if s.stopped.load(Ordering::Acquire) || s.files.lock().unwrap().len() >= TARGET {
                s.refilling.store(false, Ordering::Release);
                return;
            }
            let path = s.dir.join(format!("s.{}", s.seq.fetch_add(1, Ordering::Relaxed)));
            match Self::create(&path) {
                Ok(f) => s.files.lock().unwrap().push((path, f)),
                Err(e) => {
                    tracing::debug!(dir = %s.dir.display(), "no spare file made: {e}");
                    s.refilling.store(false, Ordering::Release);
                    return;
                }
            }
        });
        match spawned {
            Ok(handle) => *worker = Some(handle),
            Err(_) => self.refilling.store(false, Ordering::Release),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn wait_for(s: &SpareFiles, n: usize) {
        let s = &s.0;
        let t = std::time::Instant::now();
        while s.files.lock().unwrap().len() < n {
            assert!(t.elapsed() < std::time::Duration::from_secs(10), "spares not refilled");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn spares_are_empty_files_refilled_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, tmp) = (dir.path().join("spare"), dir.path().join("tmp"));
        std::fs::create_dir(&pool).unwrap();
        std::fs::create_dir(&tmp).unwrap();
        let s = SpareFiles::new(pool.clone(), tmp.clone());
        wait_for(&s, TARGET);
        assert_eq!(std::fs::read_dir(&pool).unwrap().count(), TARGET);
        let mut taken = Vec::new();
        for _ in 0..TARGET + 5 {
            // More than were ready: the rest are made on the spot or by the refill.
            let (path, mut f) = s.take().unwrap();
            assert_eq!(path.parent(), Some(tmp.as_path()));
            assert_eq!(f.metadata().unwrap().len(), 0);
            f.write_all(b"chunk").unwrap();
            taken.push(path);
        }
        taken.sort();
        taken.dedup();
        assert_eq!(taken.len(), TARGET + 5, "a file was handed out twice");
        let mut back = String::new();
        File::open(&taken[0]).unwrap().read_to_string(&mut back).unwrap();
        assert_eq!(back, "chunk");
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), TARGET + 5);
        wait_for(&s, TARGET);
        // Gone with the cache: no refill outlives it.
        drop(s);
    }

    /// Dropped in the middle of a refill, the spares' thread is over when the drop returns:
    /// nothing more is made in the directory, which can be emptied and removed at once (a
    /// cache opened again on it does that: a file made behind its back failed a reopen with
    /// "clean spare directory: Directory not empty" in a full suite run of 2026-12-07). With
    /// the drop not stopping the thread, this test fails in every run.
    #[test]
    fn no_spare_file_is_made_after_the_drop() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let (pool, tmp) = (dir.path().join("spare"), dir.path().join("tmp"));
            std::fs::create_dir(&pool).unwrap();
            std::fs::create_dir(&tmp).unwrap();
            let s = SpareFiles::new(pool.clone(), tmp.clone());
            // Taken at once: the refill is running (or about to) when the drop comes.
            let _ = s.take().unwrap();
            let weak = Arc::downgrade(&s.0);
            drop(s);
            assert!(weak.upgrade().is_none(), "the refill thread still holds the spares");
            let n = std::fs::read_dir(&pool).unwrap().count();
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(std::fs::read_dir(&pool).unwrap().count(), n, "a spare file was made after the drop");
            std::fs::remove_dir_all(&pool).unwrap();
        }
    }
}
