use super::*;
use std::time::Duration;

fn data(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn open(dir: &Path, max: u64) -> Arc<ChunkCache> {
    Arc::new(ChunkCache::open(dir, max, 64).unwrap())
}

/// More chunks than `max_open_files`: the open descriptors stay bounded (the least
/// recently used half is closed when the bound is passed), and every chunk still reads
/// back whole, reopened when its descriptor was closed.
#[test]
fn open_chunk_files_stay_bounded_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let c = ChunkCache::open(tmp.path(), 1 << 30, 16).unwrap();
    let chunks: Vec<Vec<u8>> = (0..60).map(|i| data(i, 512)).collect();
    let hashes: Vec<ChunkHash> = chunks.iter().map(|d| ChunkHash::of(d)).collect();
    for (h, d) in hashes.iter().zip(&chunks) {
        drop(c.insert(h, d).unwrap());
        assert!(c.inner.lock().unwrap().open_fds <= 16);
    }
    for round in 0..3 {
        for (i, h) in hashes.iter().enumerate().rev() {
            let f = c.get(h).unwrap_or_else(|| panic!("chunk {i} gone in round {round}"));
            let mut buf = vec![0u8; 512];
            f.read_at(&mut buf, 0).unwrap();
            assert_eq!(buf, chunks[i], "chunk {i}, round {round}");
            drop(f);
            let open = c.inner.lock().unwrap().open_fds;
            assert!(open <= 16, "{open} chunk files open, the bound is 16");
        }
    }
}

#[test]
fn insert_get_evict_and_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 3000);
    let chunks: Vec<Vec<u8>> = (0..4).map(|i| data(i, 1000)).collect();
    let hashes: Vec<ChunkHash> = chunks.iter().map(|d| ChunkHash::of(d)).collect();
    let held = c.insert(&hashes[0], &chunks[0]).unwrap();
    c.insert(&hashes[1], &chunks[1]).unwrap();
    c.insert(&hashes[2], &chunks[2]).unwrap();
    assert!(c.get(&hashes[0]).is_some()); // 0 is now most recent
    c.insert(&hashes[3], &chunks[3]).unwrap(); // evicts 1, the least recent
    assert!(!c.contains(&hashes[1]));
    assert!(c.contains(&hashes[0]) && c.contains(&hashes[2]) && c.contains(&hashes[3]));
    let s = c.stats();
    assert_eq!((s.chunks_cached, s.bytes_cached, s.evictions), (3, 3000, 1));
    // A held descriptor survives eviction.
    c.insert(&hashes[1], &chunks[1]).unwrap();
    let mut buf = vec![0u8; 1000];
    held.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, chunks[0]);
    // Bad bytes never enter.
    assert!(matches!(c.insert(&hashes[0], &chunks[1]), Err(CacheError::Corrupt { .. })));
    // A second process cannot open the same directory.
    let err = ChunkCache::open(tmp.path(), 3000, 64).err().unwrap();
    assert!(err.to_string().contains(&tmp.path().display().to_string()), "{err}");
    drop(held);
    drop(c);
    // Reopen: index rebuilt; a corrupted file is detected on first read.
    let present: Vec<usize> =
        (0..4).filter(|i| tmp.path().join("chunks").join(&hashes[*i].to_hex()[..2]).join(hashes[*i].to_hex()).exists()).collect();
    assert_eq!(present.len(), 3);
    let victim = present[0];
    let p = tmp.path().join("chunks").join(&hashes[victim].to_hex()[..2]).join(hashes[victim].to_hex());
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let c = open(tmp.path(), 3000);
    assert_eq!(c.stats().chunks_cached, 3);
    assert!(c.get(&hashes[victim]).is_none());
    assert_eq!(c.stats().verify_failures, 1);
    for i in &present[1..] {
        let f = c.get(&hashes[*i]).unwrap();
        f.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, chunks[*i]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_fetch_once_and_failures_are_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 1 << 20);
    let d = data(7, 5000);
    let h = ChunkHash::of(&d);
    let calls = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let c = c.clone();
        let d = d.clone();
        let calls = calls.clone();
        tasks.push(tokio::spawn(async move {
            c.get_or_fetch(&h, 5000, Access::Read, move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(d)
            })
            .await
        }));
    }
    for t in tasks {
        let f = t.await.unwrap().unwrap();
        let mut buf = vec![0u8; 5000];
        f.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, d);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(c.stats().fetches, 1);

    let d2 = data(9, 100);
    let h2 = ChunkHash::of(&d2);
    let bad = c.get_or_fetch(&h2, 100, Access::Read, || async { Ok(vec![1u8; 100]) }).await.unwrap_err();
    assert!(matches!(bad, CacheError::Corrupt { .. }), "{bad}");
    let failed = c
        .get_or_fetch(&h2, 100, Access::Read, || async {
            Err(SourceError::Unavailable { what: "x".into(), source_name: "test".into(), cause: "down".into() })
        })
        .await
        .unwrap_err();
    assert!(failed.to_string().contains("down"), "{failed}");
    let d2c = d2.clone();
    let ok = c.get_or_fetch(&h2, 100, Access::Read, move || async move { Ok(d2c) }).await.unwrap();
    assert_eq!(ok.len(), 100);
    let short = c.get_or_fetch(&ChunkHash::of(b"zz"), 100, Access::Read, || async { Ok(b"zz".to_vec()) }).await;
    assert!(matches!(short, Err(CacheError::Length { .. })));
}

/// Set when dropped: shows that a fetch future was dropped.
struct Dropped(Arc<AtomicU64>);
impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.store(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_nobody_waits_for_is_abandoned() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 1 << 20);
    let d = data(3, 100);
    let h = ChunkHash::of(&d);
    let dropped = Arc::new(AtomicU64::new(0));
    // Two readers wait on a fetch that never ends (an image server that never comes back).
    let fetch = |dropped: Arc<AtomicU64>| {
        move || async move {
            let _guard = Dropped(dropped);
            std::future::pending::<Result<Vec<u8>, SourceError>>().await
        }
    };
    let a = tokio::spawn({
        let (c, f) = (c.clone(), fetch(dropped.clone()));
        async move { c.get_or_fetch(&h, 100, Access::Read, f).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = tokio::spawn({
        let (c, f) = (c.clone(), fetch(dropped.clone()));
        async move { c.get_or_fetch(&h, 100, Access::Read, f).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.abort();
    let _ = a.await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(dropped.load(Ordering::SeqCst), 0, "one reader still waits: the fetch goes on");
    b.abort();
    let _ = b.await;
    for _ in 0..100 {
        if dropped.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(dropped.load(Ordering::SeqCst), 1, "the fetch was not abandoned");
    assert!(c.inner.lock().unwrap().inflight.is_empty());
    // The next reader fetches again.
    let got = c.get_or_fetch(&h, 100, Access::Read, move || async move { Ok(d) }).await.unwrap();
    assert_eq!(got.len(), 100);
}

/// A read that takes its chunk early (a RAM page fault) gets the verified bytes, the chunk is
/// stored behind it and served from its file after; bytes that do not hash to the chunk are
/// refused as for any read, and never stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_read_gets_verified_bytes_and_the_chunk_is_stored_behind_it() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 1 << 20);
    let d = random(7, 65536);
    let h = ChunkHash::of(&d);
    let dc = d.clone();
    let got = c.get_or_fetch(&h, 65536, Access::ReadEarly, move || async move { Ok(dc) }).await.unwrap();
    let mut buf = vec![0u8; 65536];
    got.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, d);
    // The fetch's task stores the chunk, then leaves the in-flight table: wait for both (the
    // chunk can be in the map a moment before the task has come back from storing it).
    let settled = || c.contains(&h) && c.inner.lock().unwrap().inflight.is_empty();
    let t0 = std::time::Instant::now();
    while !settled() && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(c.contains(&h), "the chunk was not stored");
    assert_eq!(std::fs::read(c.chunk_path(&h)).unwrap(), d);
    assert!(c.inner.lock().unwrap().inflight.is_empty(), "the fetch never left the in-flight table");
    let s = c.stats();
    assert_eq!((s.misses, s.bytes_fetched, s.chunks_cached, s.fetch_errors), (1, 65536, 1, 0));
    // A second read finds the file: no fetch.
    let again = c.get_or_fetch(&h, 65536, Access::ReadEarly, || async { panic!("fetched twice") }).await.unwrap();
    again.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, d);
    // Forged bytes: refused, not stored.
    let h2 = ChunkHash::of(&random(8, 65536));
    let forged = random(9, 65536);
    let e = c.get_or_fetch(&h2, 65536, Access::ReadEarly, move || async move { Ok(forged) }).await.unwrap_err();
    assert!(matches!(e, CacheError::Corrupt { .. }), "{e}");
    assert!(!c.contains(&h2));
}

/// Blocks `first..first+n` of chunk `d` as a source answers them (the CVs of every block).
fn blocks(d: &[u8], block: u32, first: u32, n: u32) -> vgrid_storeclient::tree::RangeBlocks {
    let (a, b) = ((first * block) as usize, ((first + n) * block) as usize);
    vgrid_storeclient::tree::RangeBlocks { cvs: vgrid_storeclient::tree::block_cvs(d, block), data: d[a..b].to_vec() }
}

fn random(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A partial chunk takes only blocks that verify against the chunk's hash, serves the blocks
/// present, counts them against the bound, and becomes a cached chunk when complete; partial
/// chunks do not survive a restart.
#[test]
fn partial_chunks_verify_each_block_then_complete() {
    use vgrid_storeclient::tree::TreeError;
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 1 << 20);
    let (cs, block) = (16384u32, 4096u32);
    let d = random(1, cs as usize);
    let h = ChunkHash::of(&d);
    let p = c.partial(&h, cs, block).unwrap().unwrap();
    // A tampered byte, a tampered CV, a CV missing: refused, nothing present.
    let mut bad = blocks(&d, block, 1, 2);
    bad.data[block as usize + 5] ^= 1;
    assert!(matches!(c.put_blocks(&p, 1, &bad), Err(CacheError::CorruptRange(TreeError::BlockMismatch { block: 2, .. }))));
    let mut bad = blocks(&d, block, 1, 2);
    bad.cvs[0][3] ^= 1;
    assert!(matches!(c.put_blocks(&p, 1, &bad), Err(CacheError::CorruptRange(TreeError::TreeMismatch { .. }))));
    let mut bad = blocks(&d, block, 1, 2);
    bad.cvs.pop();
    assert!(matches!(c.put_blocks(&p, 1, &bad), Err(CacheError::CorruptRange(TreeError::Malformed { .. }))));
    // Good blocks shifted to another place do not verify there either.
    assert!(c.put_blocks(&p, 0, &blocks(&d, block, 1, 2)).is_err());
    assert!(!p.has(0, 1) && !p.has(cs - 1, cs));
    assert_eq!(c.stats().bytes_cached, 0);

    c.put_blocks(&p, 1, &blocks(&d, block, 1, 2)).unwrap();
    assert!(p.has(block, 3 * block) && p.has(block + 10, block + 20) && !p.has(0, block + 1));
    assert_eq!(p.missing(0, cs), vec![(0, 1), (3, 1)]);
    assert_eq!(p.missing(block, 3 * block), vec![]);
    let mut buf = vec![0u8; 2 * block as usize];
    p.chunk_file().read_at(&mut buf, block).unwrap();
    assert_eq!(buf, &d[block as usize..3 * block as usize]);
    let s = c.stats();
    assert_eq!((s.bytes_cached, s.chunks_cached), (2 * block as u64, 0));
    assert!(!c.contains(&h) && c.get(&h).is_none());
    assert!(Arc::ptr_eq(&p, &c.partial(&h, cs, block).unwrap().unwrap()));

    // The last blocks complete it: a cached chunk, its file renamed into chunks/.
    c.put_blocks(&p, 0, &blocks(&d, block, 0, 1)).unwrap();
    c.put_blocks(&p, 3, &blocks(&d, block, 3, 1)).unwrap();
    assert!(c.contains(&h));
    let mut all = vec![0u8; cs as usize];
    c.get(&h).unwrap().read_at(&mut all, 0).unwrap();
    assert_eq!(all, d);
    assert_eq!(std::fs::read(c.chunk_path(&h)).unwrap(), d);
    assert_eq!(std::fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 0);
    let s = c.stats();
    assert_eq!((s.bytes_cached, s.chunks_cached), (cs as u64, 1));
    assert!(c.partial(&h, cs, block).unwrap().is_none());

    // Another partial chunk is gone after a restart; the complete one stays.
    let d2 = random(2, cs as usize);
    let h2 = ChunkHash::of(&d2);
    let p2 = c.partial(&h2, cs, block).unwrap().unwrap();
    c.put_blocks(&p2, 2, &blocks(&d2, block, 2, 1)).unwrap();
    assert_eq!(c.stats().bytes_cached, cs as u64 + block as u64);
    // What an image holds of its chunks: the whole one counts 1, the partial one its quarter,
    // an absent one nothing.
    let absent = ChunkHash::of(b"absent");
    assert_eq!(c.held([&h, &h2, &absent]), 1.25);
    drop((p, p2, c));
    let c = open(tmp.path(), 1 << 20);
    let s = c.stats();
    assert_eq!((s.bytes_cached, s.chunks_cached), (cs as u64, 1));
    assert_eq!(std::fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 0);
    assert!(c.get(&h).is_some() && !c.contains(&h2));
}

/// Partial chunks are evicted least recently used first like chunks (a reader's descriptor
/// still reads their blocks), and a whole chunk stored replaces its partial one.
#[test]
fn partial_chunks_are_evicted_and_superseded_by_whole_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let (cs, block) = (16384u32, 4096u32);
    let c = open(tmp.path(), 5 * block as u64);
    let d: Vec<Vec<u8>> = (0..3).map(|i| random(10 + i, cs as usize)).collect();
    let h: Vec<ChunkHash> = d.iter().map(|x| ChunkHash::of(x)).collect();
    let p: Vec<Arc<Partial>> = (0..3).map(|i| c.partial(&h[i], cs, block).unwrap().unwrap()).collect();
    c.put_blocks(&p[0], 0, &blocks(&d[0], block, 0, 2)).unwrap();
    let held = p[0].chunk_file();
    c.put_blocks(&p[1], 0, &blocks(&d[1], block, 0, 2)).unwrap();
    assert_eq!(c.stats().evictions, 0);
    // The third partial chunk's blocks pass the bound: the least recent one goes.
    c.put_blocks(&p[2], 2, &blocks(&d[2], block, 2, 2)).unwrap();
    let s = c.stats();
    assert_eq!((s.evictions, s.bytes_cached), (1, 4 * block as u64));
    assert_eq!(std::fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 2);
    let mut buf = vec![0u8; 2 * block as usize];
    held.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, &d[0][..2 * block as usize]);
    let again = c.partial(&h[0], cs, block).unwrap().unwrap();
    assert!(!Arc::ptr_eq(&again, &p[0]) && again.missing(0, cs) == vec![(0, 4)]);
    // Blocks put into an evicted partial chunk still serve its reader, uncounted.
    c.put_blocks(&p[0], 2, &blocks(&d[0], block, 2, 1)).unwrap();
    assert!(p[0].has(0, 3 * block));
    assert_eq!(c.stats().bytes_cached, 4 * block as u64);
    drop(again);

    // The whole chunk of the second one arrives: its partial file goes, the chunk is cached.
    c.insert(&h[1], &d[1]).unwrap();
    assert!(c.contains(&h[1]) && c.partial(&h[1], cs, block).unwrap().is_none());
    assert!(!c.inner.lock().unwrap().partials.contains_key(&h[1]));
    let s = c.stats();
    assert!(s.bytes_cached <= 5 * block as u64, "{s:?}");
    // Blocks for a superseded partial chunk do not complete it into the index twice.
    c.put_blocks(&p[1], 2, &blocks(&d[1], block, 2, 2)).unwrap();
    assert_eq!(c.stats().chunks_cached, 1);
}
