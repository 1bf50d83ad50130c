//! The hard mount: reads while the image server is down wait for it and then get the exact
//! bytes (a disk read by nbdcopy, a saved RAM's page by qemu-io, sharing a chunk); reads of
//! cached chunks go on meanwhile; a bound on the wait ends it with an error naming the chunk
//! and the bound. (In `nbd_clients.rs`, whose fixture this uses.)

use super::*;

/// Polls the proxy's stats until `f` holds (at most 60 s, else a failure saying `what`).
async fn stats_until(proxy: &BlockProxy, what: &str, f: impl Fn(&vgrid_blockproxy::CacheStats) -> bool) -> vgrid_blockproxy::CacheStats {
    for _ in 0..600 {
        let s = proxy.stats();
        if f(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after 60 s waiting for {what}: {:?}", proxy.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_wait_for_a_restarted_image_server_and_get_exact_bytes() {
    let mut f = Fixture::new("outage").await;
    let (warm, ram_data) = commit_warm(&f).await;
    let mut cfg = ProxyConfig::new(f.path("cache"), 1 << 30);
    cfg.ram_prefetch_concurrency = 0;
    let proxy = BlockProxy::new(cfg, f.source()).unwrap();
    let sock = f.path("nbd.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    let disk = uri("outage", &sock);
    let ram = uri(&format!("{}/ram", warm.image_ref()), &sock);
    // Both exports open while the server is up (manifests known); chunk 0 cached.
    ok("qemu-io", &["-r", "-f", "raw", "-c", "read 0 64k", &disk]).await;
    let keep = proxy.open_export(&format!("{}/ram", warm.image_ref())).await.unwrap();

    f.server.stop();
    // A whole-disk copy and a read of the RAM's page 50 (its chunk 3: the disk's chunk 8,
    // which the copy reads too) wait for the server.
    let out = f.path("out.raw");
    let copy = tokio::spawn({
        let (disk, out) = (disk.clone(), out.clone());
        async move { run("nbdcopy", &[&disk, out.to_str().unwrap()]).await }
    });
    let page = tokio::spawn({
        let ram = ram.clone();
        async move { run("qemu-io", &["-r", "-f", "raw", "-c", &format!("read -v {} 16", 50 * 4096), &ram]).await }
    });
    let s = stats_until(&proxy, "reads waiting for the image server", |s| s.waiting_now > 0).await;
    let w = &s.waiting[0];
    assert!(w.image == format!("outage@{}", f.manifest.version) || w.image == warm.image_ref().to_string(), "{w:?}");
    assert_eq!(w.servers, vec![f.server.url()], "{w:?}");
    assert!(w.error.contains("could not be fetched"), "{w:?}");
    // A cached chunk is still served meanwhile.
    ok("qemu-io", &["-r", "-f", "raw", "-c", "read 0 64k", &disk]).await;

    tokio::time::sleep(Duration::from_secs(2)).await;
    f.server.restart();
    let o = copy.await.unwrap();
    assert!(o.status.success(), "nbdcopy failed across the outage: {}", text(&o));
    assert!(std::fs::read(&out).unwrap() == f.data, "the bytes read across the outage differ from the image");
    let o = page.await.unwrap();
    let hex: Vec<String> = ram_data[50 * 4096..50 * 4096 + 16].iter().map(|b| format!("{b:02x}")).collect();
    assert!(o.status.success() && text(&o).contains(&hex.join(" ")), "RAM page 50 across the outage: {}", text(&o));
    let s = proxy.stats();
    assert!(s.fetch_waits >= 1 && s.waiting_now == 0 && s.waiting.is_empty(), "{s:?}");
    assert!(s.longest_wait_ms > 0, "{s:?}");
    drop(keep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_wait_fails_the_read_naming_the_chunk_and_the_bound() {
    let mut f = Fixture::new("bounded").await;
    let mut cfg = ProxyConfig::new(f.path("cache"), 1 << 30);
    cfg.fetch_timeout = Some(Duration::from_secs(2));
    let proxy = BlockProxy::new(cfg, f.source()).unwrap();
    let sock = f.path("nbd.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    let u = uri("bounded", &sock);
    let export = proxy.open_export("bounded").await.unwrap();
    f.server.stop();

    let o = run("qemu-io", &["-r", "-f", "raw", "-c", &format!("read {} 64k", 3 * CHUNK), &u]).await;
    assert!(text(&o).contains("Input/output error"), "{}", text(&o));
    let err = export.read_at(4 * CHUNK as u64, &mut [0u8; 10]).await.unwrap_err().to_string();
    let hash = f.manifest.disk.chunks[4].unwrap();
    assert!(err.contains(&format!("image bounded@{}: chunk 4:", f.manifest.version)), "{err}");
    assert!(err.contains(&hash.to_hex()) && err.contains("within the fetch timeout of 2 s"), "{err}");
    assert!(err.contains(&f.server.url()), "the error names the server that failed: {err}");
    let s = proxy.stats();
    assert!(s.fetch_waits >= 2 && s.waiting_now == 0 && s.fetch_errors >= 2, "{s:?}");

    // Nothing of the failure was kept: the server back, the same reads succeed.
    f.server.restart();
    nbdcopy_equals(&u, &f.path("out.raw"), &f.data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_client_goes_away_stops_waiting() {
    let mut f = Fixture::new("gone").await;
    let proxy = f.proxy("cache", 1 << 30);
    let sock = f.path("nbd.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    let u = uri("gone", &sock);
    ok("qemu-io", &["-r", "-f", "raw", "-c", "read 0 64k", &u]).await;
    f.server.stop();
    let mut client =
        Command::new("qemu-io").args(["-r", "-f", "raw", "-c", &format!("read {} 64k", 5 * CHUNK), &u]).kill_on_drop(true).spawn().unwrap();
    stats_until(&proxy, "the read to wait", |s| s.waiting_now == 1).await;
    // The client dies: its read, and the fetch nobody else waits for, stop waiting.
    client.kill().await.unwrap();
    let s = stats_until(&proxy, "the wait to end with its client", |s| s.waiting_now == 0).await;
    assert_eq!(s.fetch_waits, 1, "{s:?}");
}

/// A random read (which fetches only the blocks it covers) waits through an outage the same
/// way, seen waiting for its chunk, and gets the exact bytes once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_read_waits_for_its_blocks_through_an_outage() {
    let mut f = Fixture::new("rndout").await;
    let proxy = f.proxy("cache", 1 << 30);
    let sock = f.path("nbd.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    let u = uri("rndout", &sock);
    ok("qemu-io", &["-r", "-f", "raw", "-c", "read 0 4k", &u]).await;
    let fetched = proxy.stats().bytes_fetched;
    f.server.stop();
    let off = 7 * CHUNK as usize + 20000;
    let read = tokio::spawn({
        let u = u.clone();
        async move { qemu_io_read(&u, off, 4096).await }
    });
    let s = stats_until(&proxy, "the random read waiting for the image server", |s| s.waiting_now > 0).await;
    assert_eq!((s.waiting[0].chunk, s.waiting[0].hash.clone()), (7, f.manifest.disk.chunks[7].unwrap().to_string()), "{s:?}");
    assert!(s.waiting[0].error.contains("could not be fetched"), "{s:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.server.restart();
    assert_eq!(read.await.unwrap(), &f.data[off..off + 4096]);
    let s = proxy.stats();
    assert!(s.fetch_waits >= 1 && s.waiting_now == 0, "{s:?}");
    assert!(s.bytes_fetched - fetched < CHUNK as u64 / 2, "the random read fetched its whole chunk: {s:?}");
}
