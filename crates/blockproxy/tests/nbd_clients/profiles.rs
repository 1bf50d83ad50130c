//! Boot profiles (`nbd_clients.rs`'s fixture): recorded by a first boot, uploaded when the
//! window ends or the host stops, prefetched by the next host that opens the image.

use super::*;

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
    let reads: Vec<String> = chunks.iter().flat_map(|i| ["-c".to_string(), format!("read {} 4k", i * CHUNK)]).collect();
    let mut args = vec!["-r", "-f", "raw"];
    args.extend(reads.iter().map(String::as_str));
    args.push(u);
    ok("qemu-io", &args).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_profile_is_recorded_then_prefetched() {
    let f = Fixture::new("bootme").await;
    // Ends by the chunk limit (deterministic), not by the clock.
    let (_proxy, _server, u) = recording_proxy(&f, "cache1", "nbd.sock", "bootme", Some(4));
    // One client session touching chunks 25, 2, then 25 again, then 40: the profile is the
    // first-touch order of stored chunks.
    read_chunks(&u, &[25, 2, 25, 40]).await;
    // A second session within the window: its new chunk is appended.
    read_chunks(&u, &[41]).await;
    // The recording reached its limit: the profile is uploaded.
    let client = StoreClient::new(&f.server.url()).unwrap();
    let image = f.manifest.image_ref();
    let profile = uploaded_profile(&client, &image).await.expect("boot profile was never uploaded");
    assert_eq!(profile.chunks, vec![25, 2, 40, 41]);

    // A fresh host opening the image prefetches those chunks, even when that first opening
    // closes at once (qemu-img probing the image to create a guest's overlay, before QEMU's
    // own opening, which is not a first one).
    let proxy2 = f.proxy("cache2", 1 << 30);
    drop(proxy2.open_export("bootme").await.unwrap());
    let want: Vec<_> = [25usize, 2, 40, 41].iter().map(|i| f.manifest.disk.chunks[*i].unwrap()).collect();
    assert!(all_cached_soon(&proxy2, &want).await, "profile chunks were not prefetched");
    assert_eq!(proxy2.stats().prefetched, 4);
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
    let want: Vec<_> = [7usize, 3, 30].iter().map(|i| f.manifest.disk.chunks[*i].unwrap()).collect();
    assert!(all_cached_soon(&proxy2, &want).await, "the second host did not prefetch the profile");
    server2.shutdown().await;
    proxy2.finish_recordings();
    proxy2.flush_profiles(Duration::from_secs(5)).await;
    assert_eq!(client.profile(&image).await.unwrap().chunks, vec![7, 3, 30], "a host with a profile replaced it");
}
