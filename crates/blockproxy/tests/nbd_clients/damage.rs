//! The host cache's own disk: full (a small tmpfs the test mounts: evictions, then a clear
//! error, never a partial chunk), and damaged while the proxy was down (found at start by
//! hash, dropped, fetched again; reads byte-exact). (In `nbd_clients.rs`, whose fixture this
//! uses; mounting needs root, which CI and the development machines have.)

use super::*;
use vgrid_api::ChunkHash;

/// A tmpfs of `size` mounted at `dir`, unmounted (lazily) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let o =
            std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).output().unwrap();
        assert!(
            o.status.success(),
            "mounting a {size} tmpfs at {} (this test needs root): {}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn chunk_file(cache: &Path, h: &ChunkHash) -> PathBuf {
    let hex = h.to_hex();
    cache.join("chunks").join(&hex[..2]).join(hex)
}

/// Every chunk file in the cache directory holds the bytes its name is the hash of, and no
/// temp file is left: returns how many chunk files there are.
fn assert_cache_sound(cache: &Path) -> usize {
    let mut n = 0;
    for sub in std::fs::read_dir(cache.join("chunks")).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let name: ChunkHash = p.file_name().unwrap().to_str().unwrap().parse().unwrap();
            assert_eq!(ChunkHash::of(&std::fs::read(&p).unwrap()), name, "{} holds other bytes than its name says", p.display());
            n += 1;
        }
    }
    let tmp: Vec<_> = std::fs::read_dir(cache.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "temp files left in {}: {tmp:?}", cache.join("tmp").display());
    n
}

/// A new proxy on the cache directory `cache` once the previous one has let go of its lock.
async fn reopen(f: &Fixture, cache: &str) -> Arc<BlockProxy> {
    for _ in 0..100 {
        let mut cfg = ProxyConfig::new(f.path(cache), 1 << 30);
        cfg.fetch_timeout = Some(Duration::from_secs(30));
        match BlockProxy::new(cfg, f.source()) {
            Ok(p) => return p,
            Err(e) => {
                assert!(e.to_string().contains("in use by another process"), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("cache directory {cache} stayed locked after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_disk_evicts_then_fails_clearly_never_keeping_a_partial_chunk() {
    let f = Fixture::new("full").await;
    // 4 MiB of disk for 4.4 MiB of stored chunks, under a size bound of 1 GiB: the file system
    // fills first.
    let cache = f.path("cache");
    let _fs = Tmpfs::mount(&cache, "4m");
    let proxy = f.proxy("cache", 1 << 30);
    let sock = f.path("nbd.sock");
    let server = proxy.serve_unix(&sock).unwrap();
    let u = uri("full", &sock);
    let cmp = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", f.source_file.to_str().unwrap(), &u]).await;
    assert!(cmp.status.success(), "qemu-img compare: {}", text(&cmp));
    let o = run("qemu-io", &["-r", "-f", "raw", "-c", "read -P 0 640k 64k", "-c", &format!("read {} 64k", 40 * CHUNK), &u]).await;
    assert!(o.status.success() && !text(&o).contains("error"), "{}", text(&o));
    let s = proxy.stats();
    assert!(s.disk_full_evictions > 0, "the full file system made no evictions: {s:?}");
    assert!(s.max_bytes < 4 << 20 && s.bytes_cached <= s.max_bytes, "the bound was not lowered to what the disk holds: {s:?}");
    let files = assert_cache_sound(&cache);
    assert_eq!(files as u64, s.chunks_cached, "{s:?}");
    server.shutdown().await;
    proxy.shutdown();
    drop(proxy);
    // What it left is a sound cache: reopened, every file verifies and the image reads exact.
    let proxy = reopen(&f, "cache").await;
    let server = proxy.serve_unix(&sock).unwrap();
    let cmp = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", f.source_file.to_str().unwrap(), &u]).await;
    assert!(cmp.status.success(), "qemu-img compare after reopening: {}", text(&cmp));
    assert_eq!(proxy.stats().verify_failures, 0, "{:?}", proxy.stats());
    server.shutdown().await;
    proxy.shutdown();
    drop(proxy);

    // A file system too small for even one chunk: the read fails at once with an error that
    // says so, the proxy goes on, and no partial chunk is left to be served later.
    let tiny = f.path("tiny");
    let _tiny = Tmpfs::mount(&tiny, "32k");
    let proxy = f.proxy("tiny", 1 << 30);
    let sock = f.path("tiny.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    let u = uri("full", &sock);
    let o = run("qemu-io", &["-r", "-f", "raw", "-c", "read 0 64k", &u]).await;
    assert!(text(&o).contains("Input/output error"), "qemu-io should report EIO: {}", text(&o));
    let e = proxy.open_export("full").await.unwrap();
    let err = e.read_at(100, &mut [0u8; 10]).await.unwrap_err().to_string();
    assert!(err.contains("no space left") && err.contains(&tiny.display().to_string()) && err.contains("file system"), "{err}");
    assert_eq!(assert_cache_sound(&tiny), 0);
    // The last chunk (12345 bytes) fits: other reads still work.
    let last = f.data.len() - 100;
    let mut buf = [0u8; 100];
    e.read_at(last as u64, &mut buf).await.unwrap();
    assert_eq!(&buf[..], &f.data[last..]);
    assert_eq!(assert_cache_sound(&tiny), 1);
    println!(
        "FAULTS-FIGURES\tcache-disk-full\t{} evictions when the 4 MiB tmpfs filled, bound lowered to {} KiB, {files} files all verified, image byte-exact after reopening; on a 32 KiB tmpfs a read fails with EIO naming the file system, no partial chunk kept",
        s.disk_full_evictions,
        s.max_bytes / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_files_damaged_while_down_are_found_at_start_dropped_and_fetched_again() {
    let f = Fixture::new("dmg").await;
    let cache = f.path("cache");
    let proxy = f.proxy("cache", 1 << 30);
    let report = proxy.pull(&"dmg".parse().unwrap(), &|_, _| {}).await.unwrap();
    proxy.shutdown();
    drop(proxy);
    let stored: Vec<ChunkHash> = {
        let mut seen = std::collections::HashSet::new();
        f.manifest.disk.stored().filter(|h| seen.insert(**h)).copied().collect()
    };
    assert_eq!(report.chunks_fetched, stored.len() as u64);

    // While the proxy is down: one chunk file truncated, one overwritten with other bytes of
    // the same length, one emptied, one holding another chunk's bytes, and the kept manifest
    // (the cache's index of the image) truncated.
    let p: Vec<PathBuf> = stored.iter().map(|h| chunk_file(&cache, h)).collect();
    let len0 = std::fs::metadata(&p[0]).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p[0]).unwrap().set_len(len0 / 2).unwrap();
    let mut junk = vec![0u8; std::fs::metadata(&p[1]).unwrap().len() as usize];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut junk);
    std::fs::write(&p[1], &junk).unwrap();
    std::fs::write(&p[2], b"").unwrap();
    std::fs::copy(&p[4], &p[3]).unwrap();
    let manifest = cache.join("manifests").join(format!("{}.json", f.manifest.image_ref()));
    let text_m = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &text_m[..text_m.len() / 2]).unwrap();

    // Found at start, before anything reads: dropped, the others kept.
    let proxy = reopen(&f, "cache").await;
    let mut s = proxy.stats();
    for _ in 0..600 {
        if s.unverified == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = proxy.stats();
    }
    assert_eq!(s.unverified, 0, "the check at start did not finish in 60 s: {s:?}");
    assert_eq!(s.verify_failures, 4, "{s:?}");
    assert_eq!(s.chunks_cached, stored.len() as u64 - 4, "{s:?}");
    assert_eq!((s.hits, s.misses, s.fetches), (0, 0, 0), "found by a read, not at start: {s:?}");
    for q in &p[..4] {
        assert!(!q.exists(), "damaged {} is still there", q.display());
    }
    assert!(!manifest.exists(), "the damaged manifest is still there");
    assert_eq!(assert_cache_sound(&cache), stored.len() - 4);

    // Read through NBD: byte-exact, with exactly the four dropped chunks fetched again.
    let sock = f.path("nbd.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    let u = uri("dmg", &sock);
    let cmp = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", f.source_file.to_str().unwrap(), &u]).await;
    assert!(cmp.status.success(), "qemu-img compare: {}", text(&cmp));
    nbdcopy_equals(&u, &f.path("out.raw"), &f.data).await;
    let s = proxy.stats();
    assert_eq!((s.fetches, s.verify_failures), (4, 4), "{s:?}");
    assert_eq!(assert_cache_sound(&cache), stored.len());
    let kept = Manifest::from_json(&std::fs::read(&manifest).expect("the manifest is kept again")).unwrap();
    assert_eq!(kept.image_ref(), f.manifest.image_ref());
    println!(
        "FAULTS-FIGURES\tcache-damaged\t4 of {} chunk files and the manifest damaged while down: all found by the check at start (none by a read), dropped; the 4 fetched again on read; image byte-exact (qemu-img compare, nbdcopy)",
        stored.len()
    );
}
