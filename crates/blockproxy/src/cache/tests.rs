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
