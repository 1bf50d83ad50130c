//! Boot profiles (`nbd_clients.rs`'s fixture): recorded by a first boot, uploaded when the
//! window ends or the host stops, prefetched by the next host that opens the image.

use super::*;
use vgrid_api::rest::ChunkPart;

/// A host's proxy recording boot profiles for a long window (the tests end recordings by the
/// chunk limit, `max_chunks`, or by stopping), no readahead, serving `sock`; with the export
/// URI of image `name` on it.
fn recording_proxy(
    f: &Fixture,
    cache: &str,
    sock: &str,
    name: &str,
    max_chunks: Option<usize>,
) -> (Arc<BlockProxy>, vgrid_blockproxy::ServerHandle, String) {
    let mut cfg = ProxyConfig::new(f.path(cache), 1 << 30);
    cfg.profile_window = Duration::from_secs(600);
    cfg.readahead_chunks = 0;
    if let Some(n) = max_chunks {
        cfg.profile_max_chunks = n;
    }
    let proxy = BlockProxy::new(cfg, f.source()).unwrap();
    let sock = f.path(sock);
    let server = proxy.serve_unix(&sock).unwrap();
    (proxy, server, uri(name, &sock))
}

/// One qemu-io session on `u` reading 4 KiB at the start of each of `chunks`, in order.
async fn read_chunks(u: &str, chunks: &[u32]) {
    let reads: Vec<(u32, u32)> = chunks.iter().map(|i| (i * CHUNK, 4096)).collect();
    read_ranges(u, &reads).await;
}

/// One qemu-io session on `u` reading `(offset, len)` ranges, in order.
async fn read_ranges(u: &str, reads: &[(u32, u32)]) {
    let reads: Vec<String> = reads.iter().flat_map(|(o, n)| ["-c".to_string(), format!("read {o} {n}")]).collect();
    let mut args = vec!["-r", "-f", "raw"];
    args.extend(reads.iter().map(String::as_str));
    args.push(u);
    ok("qemu-io", &args).await;
}

/// True once `proxy` has prefetched `n` chunks (or parts of chunks), within 30 s.
async fn prefetched_soon(proxy: &BlockProxy, n: u64) -> bool {
    for _ in 0..300 {
        if proxy.stats().prefetched >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_profile_is_recorded_then_prefetched() {
    let f = Fixture::new("bootme").await;
    // Ends by the chunk limit (deterministic), not by the clock.
    let (_proxy, _server, u) = recording_proxy(&f, "cache1", "nbd.sock", "bootme", Some(4));
    // One client session touching chunks 25 (its first 16 KiB block), 2 (all of it), 25 again
    // (its third block), then 40 (its first block): the profile is the first-touch order of
    // stored chunks, with the blocks read of those read in part.
    let b = vgrid_blockproxy::DEFAULT_RANGE_BLOCK;
    read_ranges(&u, &[(25 * CHUNK, 4096), (2 * CHUNK, CHUNK), (25 * CHUNK + 2 * b + 100, 4096), (40 * CHUNK, 4096)]).await;
    // A second session within the window: its new chunk is appended.
    read_chunks(&u, &[41]).await;
    // The recording reached its limit: the profile is uploaded.
    let client = StoreClient::new(&f.server.url()).unwrap();
    let image = f.manifest.image_ref();
    let profile = uploaded_profile(&client, &image).await.expect("boot profile was never uploaded");
    assert_eq!(profile.chunks, vec![25, 2, 40, 41]);
    let part = |chunk, ranges: &[[u32; 2]]| ChunkPart { chunk, ranges: ranges.iter().map(|&r| r.into()).collect() };
    assert_eq!(profile.parts, vec![part(25, &[[0, b], [2 * b, b]]), part(40, &[[0, b]]), part(41, &[[0, b]])]);

    // A fresh host opening the image prefetches those chunks, even when that first opening
    // closes at once (qemu-img probing the image to create a guest's overlay, before QEMU's
    // own opening, which is not a first one): chunk 2 whole, the blocks read of the others.
    let (proxy2, _server2, u2) = recording_proxy(&f, "cache2", "nbd2.sock", "bootme", None);
    drop(proxy2.open_export("bootme").await.unwrap());
    assert!(prefetched_soon(&proxy2, 4).await, "profile chunks were not prefetched");
    assert!(all_cached_soon(&proxy2, &[f.manifest.disk.chunks[2].unwrap()]).await);
    let s = proxy2.stats();
    assert_eq!((s.prefetched, s.chunks_cached), (4, 1));
    assert_eq!(s.bytes_cached, (CHUNK + 4 * b) as u64, "more than the blocks read was prefetched");
    // The guest's reads of what the first boot read are hits; a read beyond it is a miss.
    let fetches = s.fetches;
    read_ranges(&u2, &[(25 * CHUNK, 4096), (25 * CHUNK + 2 * b, b), (2 * CHUNK, CHUNK), (41 * CHUNK + 8192, 8192)]).await;
    assert_eq!(proxy2.stats().fetches, fetches, "a read of a prefetched block fetched");
    read_ranges(&u2, &[(40 * CHUNK + 3 * b, 4096)]).await;
    assert_eq!(proxy2.stats().fetches, fetches + 1);
}

/// A host that stops before a first boot's recording window has ended (the end of `vgrid up`,
/// its guests gone) uploads what the recording holds instead of losing it; a host opening an
/// image that has a profile never replaces it that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_host_uploads_the_profile_it_was_recording() {
    let f = Fixture::new("stopme").await;
    let (proxy, server, u) = recording_proxy(&f, "cache1", "nbd.sock", "stopme", None);
    // One client session reading chunks 7, 3, 7 again and 30.
    read_chunks(&u, &[7, 3, 7, 30]).await;
    let client = StoreClient::new(&f.server.url()).unwrap();
    let image = f.manifest.image_ref();
    assert!(client.profile(&image).await.is_err(), "nothing uploaded while the window runs");
    server.shutdown().await;
    // The recording is finished once its lookup has said the image has none (it runs in the
    // background from the first opening).
    let mut uploaded = None;
    for _ in 0..100 {
        proxy.finish_recordings();
        proxy.flush_profiles(Duration::from_secs(5)).await;
        if let Ok(p) = client.profile(&image).await {
            uploaded = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let profile = uploaded.expect("a stopping host did not upload the profile it was recording");
    assert_eq!(profile.chunks, vec![7, 3, 30]);

    // A second host: the image has that profile; what its guest reads is not recorded, and its
    // stop leaves the profile as it was.
    let (proxy2, server2, u2) = recording_proxy(&f, "cache2", "nbd2.sock", "stopme", None);
    read_chunks(&u2, &[50]).await;
    assert!(prefetched_soon(&proxy2, 3).await, "the second host did not prefetch the profile");
    server2.shutdown().await;
    proxy2.finish_recordings();
    proxy2.flush_profiles(Duration::from_secs(5)).await;
    assert_eq!(client.profile(&image).await.unwrap().chunks, vec![7, 3, 30], "a host with a profile replaced it");
}
