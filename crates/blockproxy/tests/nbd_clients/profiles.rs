//! Boot profiles (`nbd_clients.rs`'s fixture): recorded by a first boot, uploaded when the
//! window ends or the host stops, prefetched by the next host that opens the image.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_profile_is_recorded_then_prefetched() {
    let f = Fixture::new("bootme").await;
    let mut cfg = ProxyConfig::new(f.path("cache1"), 1 << 30);
    // Ends by the chunk limit (deterministic), not by the clock.
    cfg.profile_window = Duration::from_secs(600);
    cfg.profile_max_chunks = 4;
    cfg.readahead_chunks = 0;
    let proxy = BlockProxy::new(cfg, f.source()).unwrap();
    let sock = f.path("nbd.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    let u = uri("bootme", &sock);
    // One client session touching chunks 25, 2, then 25 again, then 40: the profile is the
    // first-touch order of stored chunks.
    ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            &format!("read {} 4k", 25 * CHUNK),
            "-c",
            &format!("read {} 4k", 2 * CHUNK),
            "-c",
            &format!("read {} 4k", 25 * CHUNK),
            "-c",
            &format!("read {} 4k", 40 * CHUNK),
            &u,
        ],
    )
    .await;
    // A second session within the window: its new chunk is appended.
    ok("qemu-io", &["-r", "-f", "raw", "-c", &format!("read {} 4k", 41 * CHUNK), &u]).await;
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
    let _ = ImageRef { name: String::new(), version: None };
}

/// A host that stops before a first boot's recording window has ended (the end of `vgrid up`,
/// its guests gone) uploads what the recording holds instead of losing it; a host opening an
/// image that has a profile never replaces it that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_host_uploads_the_profile_it_was_recording() {
    let f = Fixture::new("stopme").await;
    let mut cfg = ProxyConfig::new(f.path("cache1"), 1 << 30);
    cfg.profile_window = Duration::from_secs(600);
    cfg.readahead_chunks = 0;
    let proxy = BlockProxy::new(cfg, f.source()).unwrap();
    let sock = f.path("nbd.sock");
    let server = proxy.serve_unix(&sock).unwrap();
    let u = uri("stopme", &sock);
    // One client session reading chunks 7, 3, 7 again and 30.
    let reads: Vec<String> = [7u32, 3, 7, 30].iter().flat_map(|i| ["-c".to_string(), format!("read {} 4k", i * CHUNK)]).collect();
    let mut args = vec!["-r", "-f", "raw"];
    args.extend(reads.iter().map(String::as_str));
    args.push(&u);
    ok("qemu-io", &args).await;
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
    let mut cfg = ProxyConfig::new(f.path("cache2"), 1 << 30);
    cfg.profile_window = Duration::from_secs(600);
    cfg.readahead_chunks = 0;
    let proxy2 = BlockProxy::new(cfg, f.source()).unwrap();
    let sock2 = f.path("nbd2.sock");
    let server2 = proxy2.serve_unix(&sock2).unwrap();
    let u2 = uri("stopme", &sock2);
    ok("qemu-io", &["-r", "-f", "raw", "-c", &format!("read {} 4k", 50 * CHUNK), &u2]).await;
    let want: Vec<_> = [7usize, 3, 30].iter().map(|i| f.manifest.disk.chunks[*i].unwrap()).collect();
    assert!(all_cached_soon(&proxy2, &want).await, "the second host did not prefetch the profile");
    server2.shutdown().await;
    proxy2.finish_recordings();
    proxy2.flush_profiles(Duration::from_secs(5)).await;
    assert_eq!(client.profile(&image).await.unwrap().chunks, vec![7, 3, 30], "a host with a profile replaced it");
}
