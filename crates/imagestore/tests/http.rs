//! The image server's HTTP API and its client, against a real server on a loopback port.

mod common;

use bytes::Bytes;
use common::*;
use vgrid_api::rest::{BootProfile, ChunkPart};
use vgrid_api::{ChunkHash, ErrorBody, ImageRef};
use vgrid_storeclient::{codec, ClientError};

const CS: u32 = 4096;

fn r(s: &str) -> ImageRef {
    s.parse().unwrap()
}

#[tokio::test]
async fn upload_fetch_list_and_versions() {
    let s = start().await;
    let c = &s.client;
    let chunks = vec![Some(chunk_data(1, 4096)), None, Some(chunk_data(2, 100))];
    let m1 = upload_image(c, "alpha", CS, &chunks).await;
    assert_eq!(m1.version, 1);
    assert_eq!(m1.disk.size, 2 * 4096 + 100);
    let m2 = upload_image(c, "alpha", CS, &chunks).await;
    assert_eq!(m2.version, 2);

    assert_eq!(c.manifest(&r("alpha")).await.unwrap(), m2);
    assert_eq!(c.manifest(&r("alpha@1")).await.unwrap(), m1);
    let list = c.list().await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].stored_bytes, 4096 + 100);

    let h = m1.disk.chunks[2].unwrap();
    assert_eq!(c.chunk(&h, CS as usize).await.unwrap(), chunk_data(2, 100));
    assert!(c.has_chunk(&h).await.unwrap());
    assert!(!c.has_chunk(&ChunkHash::of(b"nope")).await.unwrap());

    // Versions are never reused after a delete.
    c.delete(&r("alpha@2")).await.unwrap();
    let m3 = upload_image(c, "alpha", CS, &chunks).await;
    assert_eq!(m3.version, 3);
}

#[tokio::test]
async fn chunk_http_caching_headers_and_errors() {
    let s = start().await;
    let m = upload_image(&s.client, "img", CS, &[Some(chunk_data(5, 4096))]).await;
    let h = m.disk.chunks[0].unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/store/v1/chunks/{h}", s.url);
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/zstd");
    assert_eq!(resp.headers()["etag"].to_str().unwrap(), format!("\"{h}\""));
    assert!(resp.headers()["cache-control"].to_str().unwrap().contains("immutable"));
    let z = resp.bytes().await.unwrap();
    assert_eq!(codec::decode(&h, &z, 4096).unwrap(), chunk_data(5, 4096));

    let resp = http.get(&url).header("if-none-match", format!("\"{h}\"")).send().await.unwrap();
    assert_eq!(resp.status(), 304);

    let resp = http.head(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    let resp = http.get(format!("{}/store/v1/chunks/xyz", s.url)).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: ErrorBody = resp.json().await.unwrap();
    assert!(body.error.contains("xyz"), "{}", body.error);

    let absent = ChunkHash::of(b"absent");
    let resp = http.get(format!("{}/store/v1/chunks/{absent}", s.url)).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: ErrorBody = resp.json().await.unwrap();
    assert!(body.error.contains(&absent.to_hex()), "{}", body.error);
    let e = s.client.chunk(&absent, 4096).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[tokio::test]
async fn corrupt_chunk_is_never_served() {
    let s = start().await;
    let m = upload_image(&s.client, "img", CS, &[Some(chunk_data(9, 4096))]).await;
    let h = m.disk.chunks[0].unwrap();
    // Replace the stored chunk with a valid zstd frame of other content.
    let (_, other) = codec::encode(&chunk_data(10, 4096));
    std::fs::write(s.chunk_file(&h), other).unwrap();

    let resp = reqwest::get(format!("{}/store/v1/chunks/{h}", s.url)).await.unwrap();
    assert!(resp.status().is_server_error(), "{}", resp.status());
    let body: ErrorBody = resp.json().await.unwrap();
    assert!(body.error.contains(&h.to_hex()) && body.error.contains("corrupt"), "{}", body.error);

    match s.client.chunk(&h, 4096).await {
        Err(ClientError::Corrupt { hash, .. }) => assert_eq!(hash, h),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Garbage bytes too.
    std::fs::write(s.chunk_file(&h), b"garbage").unwrap();
    assert!(matches!(s.client.chunk(&h, 4096).await, Err(ClientError::Corrupt { .. })));
    assert!(s.store.get_chunk(&h, 4096).await.is_err());
}

#[tokio::test]
async fn unknown_image_and_malformed_json_are_json_4xx() {
    let s = start().await;
    let http = reqwest::Client::new();
    let resp = http.get(format!("{}/store/v1/images/ghost", s.url)).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: ErrorBody = resp.json().await.unwrap();
    assert!(body.error.contains("ghost"), "{}", body.error);
    let e = s.client.manifest(&r("ghost@4")).await.unwrap_err();
    assert!(e.is_not_found() && e.to_string().contains("ghost@4"), "{e}");

    let resp = http.get(format!("{}/store/v1/images/ghost/abc", s.url)).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let resp = http.get(format!("{}/store/v1/nothing/here", s.url)).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: ErrorBody = resp.json().await.unwrap();
    assert!(body.error.contains("/store/v1/nothing/here"), "{}", body.error);
    // The router merges into another that has its own fallback (as `vgrid up` does).
    let _merged = axum::Router::new().fallback(|| async { "other" }).merge(vgrid_imagestore::server::router(s.store.clone()));

    let id = s.client.begin_upload().await.unwrap();
    for (path, body) in [
        (format!("/store/v1/uploads/{id}/missing"), "[not json"),
        (format!("/store/v1/uploads/{id}/commit"), "{\"schema\":1}"),
        (format!("/store/v1/uploads/{id}/missing"), "[\"abc\"]"),
    ] {
        let resp = http.post(format!("{}{path}", s.url)).body(body).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{path}");
        let b: ErrorBody = resp.json().await.unwrap();
        assert!(!b.error.is_empty());
    }
    let resp = http.post(format!("{}/store/v1/uploads/nosuch/missing", s.url)).body("[]").send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let b: ErrorBody = resp.json().await.unwrap();
    assert!(b.error.contains("nosuch"), "{}", b.error);

    // A chunk uploaded under the wrong hash is refused.
    let (_, z) = codec::encode(b"some data");
    let wrong = ChunkHash::of(b"other data");
    let e = s.client.put_chunk(&id, &wrong, Bytes::from(z)).await.unwrap_err();
    assert_eq!(e.status(), Some(422), "{e}");
    assert!(e.to_string().contains(&wrong.to_hex()), "{e}");

    // Commit naming a chunk that is not stored fails and names it.
    let ghost = ChunkHash::of(b"never uploaded");
    let m = manifest("x", CS, vgrid_api::Blob { size: 10, chunks: vec![Some(ghost)] });
    let e = s.client.commit(&id, &m).await.unwrap_err();
    assert_eq!(e.status(), Some(422), "{e}");
    assert!(e.to_string().contains(&ghost.to_hex()), "{e}");
    assert!(s.client.list().await.unwrap().is_empty());
}

/// Owner records are named like images (the documented pattern: 400 otherwise), and a manifest
/// whose integers are written as floats (`"chunk_size": 4096.0`) is the manifest it means.
#[tokio::test]
async fn owner_names_are_checked_and_integral_floats_are_integers() {
    let s = start().await;
    let http = reqwest::Client::new();
    for bad in [".hidden", "-x", "a%20b", &"a".repeat(65)] {
        let resp = http.get(format!("{}/store/v1/owners/{bad}", s.url)).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
        let resp = http.put(format!("{}/store/v1/owners/{bad}", s.url)).body(r#"{"public": true}"#).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
    }
    let resp = http.get(format!("{}/store/v1/owners/fine_name-1.0", s.url)).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    let id = s.client.begin_upload().await.unwrap();
    let (h, z) = codec::encode(b"a chunk");
    s.client.put_chunk(&id, &h, Bytes::from(z)).await.unwrap();
    let m = manifest("floats", CS, vgrid_api::Blob { size: 7, chunks: vec![Some(h)] });
    let text = serde_json::to_string(&m).unwrap().replace(&format!("\"chunk_size\":{CS}"), &format!("\"chunk_size\":{CS}.0"));
    assert!(text.contains("4096.0"), "{text}");
    let resp = http.post(format!("{}/store/v1/uploads/{id}/commit", s.url)).body(text).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    assert_eq!(s.client.manifest(&r("floats")).await.unwrap().chunk_size, CS);
}

#[tokio::test]
async fn delete_frees_only_unshared_chunks() {
    let s = start().await;
    let shared = Some(chunk_data(100, 4096));
    upload_image(&s.client, "a", CS, &[shared.clone(), Some(chunk_data(101, 4096))]).await;
    upload_image(&s.client, "b", CS, &[shared.clone(), Some(chunk_data(102, 4096))]).await;
    assert_eq!(s.chunk_files(), 3);
    let rep = s.client.delete(&r("a")).await.unwrap();
    assert_eq!(rep.chunks_freed, 1);
    assert!(rep.bytes_freed > 0);
    assert_eq!(s.chunk_files(), 2);
    let e = s.client.delete(&r("a")).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let b = s.client.manifest(&r("b")).await.unwrap();
    for h in b.disk.stored() {
        s.client.chunk(h, 4096).await.unwrap();
    }
}

#[tokio::test]
async fn session_pins_survive_concurrent_delete() {
    let s = start().await;
    let a_chunks = vec![Some(chunk_data(200, 4096)), Some(chunk_data(201, 4096))];
    let a = upload_image(&s.client, "a", CS, &a_chunks).await;
    // Import of "b" shares chunk 0 of "a": the dedup check pins it...
    let id = s.client.begin_upload().await.unwrap();
    let shared = a.disk.chunks[0].unwrap();
    assert!(s.client.missing(&id, &[shared]).await.unwrap().is_empty());
    // ...so deleting "a" meanwhile frees only its other chunk.
    let rep = s.client.delete(&r("a")).await.unwrap();
    assert_eq!(rep.chunks_freed, 1);
    let m = manifest("b", CS, vgrid_api::Blob { size: 4096, chunks: vec![Some(shared)] });
    let b = s.client.commit(&id, &m).await.unwrap();
    assert_eq!(s.client.chunk(&b.disk.chunks[0].unwrap(), 4096).await.unwrap(), chunk_data(200, 4096));
}

#[tokio::test]
async fn interrupted_upload_is_invisible_and_collected() {
    let s = start_with(|st| st.with_session_ttl(std::time::Duration::from_millis(200))).await;
    let id = s.client.begin_upload().await.unwrap();
    for i in 0..3 {
        let (h, z) = codec::encode(&chunk_data(300 + i, 4096));
        s.client.put_chunk(&id, &h, Bytes::from(z)).await.unwrap();
    }
    assert_eq!(s.chunk_files(), 3);
    assert!(s.client.list().await.unwrap().is_empty());
    // While the session lives, GC keeps its chunks.
    assert_eq!(s.store.gc().await.unwrap().chunks_freed, 0);
    // Never committed: after the session expires, GC collects them.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(s.client.gc().await.unwrap().chunks_freed, 3);
    assert_eq!(s.chunk_files(), 0);
    let e = s.client.missing(&id, &[]).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[tokio::test]
async fn boot_profiles() {
    let s = start().await;
    upload_image(&s.client, "p", CS, &[Some(chunk_data(1, 4096)), Some(chunk_data(2, 4096))]).await;
    let e = s.client.profile(&r("p")).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    // Chunk 1 read in part: two ranges of it.
    let part = ChunkPart { chunk: 1, ranges: vec![[0, 1024].into(), [2048, 1024].into()] };
    let prof = BootProfile { chunks: vec![1, 0], parts: vec![part.clone()], hot_pages: 0 };
    s.client.put_profile(&r("p@1"), &prof).await.unwrap();
    assert_eq!(s.client.profile(&r("p")).await.unwrap(), prof);
    let e = s.client.put_profile(&r("p@1"), &BootProfile { chunks: vec![2], ..Default::default() }).await.unwrap_err();
    assert_eq!(e.status(), Some(422), "{e}");
    // A part beyond its chunk, overlapping, of a chunk the profile does not name: refused,
    // naming the chunk; the stored profile stays.
    for (bad, says) in [
        (ChunkPart { chunk: 1, ranges: vec![[3072, 2048].into()] }, "beyond the chunk's 4096 bytes"),
        (ChunkPart { chunk: 1, ranges: vec![[0, 2048].into(), [1024, 1024].into()] }, "out of order"),
        (ChunkPart { chunk: 1, ranges: vec![] }, "no ranges"),
        (ChunkPart { chunk: 5, ranges: vec![[0, 1024].into()] }, "not a stored chunk"),
    ] {
        let p = BootProfile { chunks: vec![1, 0], parts: vec![bad], hot_pages: 0 };
        let e = s.client.put_profile(&r("p@1"), &p).await.unwrap_err();
        assert_eq!(e.status(), Some(422), "{e}");
        assert!(e.to_string().contains(says) && e.to_string().contains("chunk"), "{e}");
    }
    let p = BootProfile { chunks: vec![0], parts: vec![part], hot_pages: 0 };
    let e = s.client.put_profile(&r("p@1"), &p).await.unwrap_err();
    assert!(e.to_string().contains("not among the profile's chunks"), "{e}");
    assert_eq!(s.client.profile(&r("p")).await.unwrap(), prof);
    let e = s.client.put_profile(&r("q@1"), &prof).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[tokio::test]
async fn unreachable_server_is_reported_after_bounded_retries() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let c = vgrid_storeclient::StoreClient::with_retry(
        &format!("http://{addr}"),
        vgrid_storeclient::RetryPolicy { attempts: 3, first_backoff: std::time::Duration::from_millis(10), ..Default::default() },
    )
    .unwrap();
    match c.chunk(&ChunkHash::of(b"x"), 4096).await {
        Err(ClientError::Unreachable { attempts, .. }) => assert_eq!(attempts, 3),
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

/// A server that answers chunk requests from a script, counting them: checks the client's retry
/// rules (5xx retried up to the limit, 404 and 400 not retried, a bad chunk fetched twice).
#[tokio::test]
async fn client_retry_rules() {
    use axum::http::StatusCode;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let good = chunk_data(1, 4096);
    let (flaky, z) = codec::encode(&good);
    let (_, wrong) = codec::encode(&chunk_data(2, 4096));
    let [gone, bad, down, refused] = [b"gone", b"bad_", b"down", b"refu"].map(|s| ChunkHash::of(s));
    let script: Arc<HashMap<String, &'static str>> = Arc::new(
        [(flaky, "flaky"), (gone, "gone"), (bad, "bad"), (down, "down"), (refused, "refused")]
            .into_iter()
            .map(|(h, b)| (h.to_hex(), b))
            .collect(),
    );
    let hits = Arc::new(AtomicUsize::new(0));
    let app = {
        let hits = hits.clone();
        axum::Router::new().route(
            "/store/v1/chunks/{hash}",
            axum::routing::get(move |axum::extract::Path(hash): axum::extract::Path<String>| {
                let (hits, script) = (hits.clone(), script.clone());
                let (z, wrong) = (z.clone(), wrong.clone());
                async move {
                    let n = hits.fetch_add(1, Ordering::SeqCst);
                    match script.get(&hash).copied().unwrap_or("refused") {
                        "flaky" if n < 2 => (StatusCode::SERVICE_UNAVAILABLE, Vec::new()),
                        "flaky" => (StatusCode::OK, z),
                        "gone" => (StatusCode::NOT_FOUND, br#"{"error":"chunk not found"}"#.to_vec()),
                        "bad" => (StatusCode::OK, wrong),
                        "down" => (StatusCode::SERVICE_UNAVAILABLE, Vec::new()),
                        _ => (StatusCode::BAD_REQUEST, br#"{"error":"no"}"#.to_vec()),
                    }
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, app).await });
    let c = vgrid_storeclient::StoreClient::with_retry(
        &format!("http://{addr}"),
        vgrid_storeclient::RetryPolicy { attempts: 4, first_backoff: std::time::Duration::from_millis(10), ..Default::default() },
    )
    .unwrap();
    let count = || hits.swap(0, Ordering::SeqCst);

    assert_eq!(c.chunk(&flaky, 4096).await.unwrap(), good);
    assert_eq!(count(), 3);

    assert!(c.chunk(&gone, 4096).await.unwrap_err().is_not_found());
    assert_eq!(count(), 1);

    let e = c.chunk(&bad, 4096).await.unwrap_err();
    assert!(matches!(e, ClientError::Corrupt { hash, .. } if hash == bad), "{e}");
    assert_eq!(count(), 2);

    let e = c.chunk(&down, 4096).await.unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    assert_eq!(count(), 4);

    let e = c.chunk(&refused, 4096).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert_eq!(count(), 1);
    task.abort();
}

#[tokio::test]
async fn ranged_chunk_reads_are_verified_and_bad_ranges_named() {
    let s = start().await;
    let (cs, block) = (65536u32, 4096u32);
    let data = chunk_data(11, cs as usize);
    let m = upload_image(&s.client, "img", cs, &[Some(data.clone())]).await;
    let h = m.disk.chunks[0].unwrap();
    let r = s.client.chunk_range(&h, cs, block, 3 * block, 2 * block).await.unwrap();
    assert_eq!(r.data, &data[3 * block as usize..5 * block as usize]);
    assert_eq!(r.cvs.len(), 16);
    // The answer carries far fewer bytes than the chunk.
    let url = format!("{}/store/v1/chunks/{h}/range?offset={}&len={block}&block={block}", s.url, 7 * block);
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap().len() < (block as usize + 16 * 32) + 64);
    // Unaligned, outside the chunk, a bad block size, a missing parameter: 400 naming the chunk.
    for q in [
        format!("offset=100&len={block}&block={block}"),
        format!("offset={cs}&len={block}&block={block}"),
        "offset=0&len=1000&block=1000".into(),
    ] {
        let resp = reqwest::get(format!("{}/store/v1/chunks/{h}/range?{q}", s.url)).await.unwrap();
        assert_eq!(resp.status(), 400, "{q}");
        let body: ErrorBody = resp.json().await.unwrap();
        assert!(body.error.contains(&h.to_hex()), "{q}: {}", body.error);
    }
    let resp = reqwest::get(format!("{}/store/v1/chunks/{h}/range?offset=0", s.url)).await.unwrap();
    assert_eq!(resp.status(), 400);
    // A chunk the server lacks is a 404 (not "no such endpoint"); a corrupt one is never served.
    let e = s.client.chunk_range(&ChunkHash::of(b"absent"), cs, block, 0, block).await.unwrap_err();
    assert!(e.is_not_found() && !e.is_no_such_endpoint(), "{e}");
    let (_, other) = codec::encode(&chunk_data(12, cs as usize));
    std::fs::write(s.chunk_file(&h), other).unwrap();
    // The chunk read above is still served from the copy the server verified (its recently
    // decoded chunks): the right bytes. Any decoding of the damaged file fails.
    let r = s.client.chunk_range(&h, cs, block, 0, block).await.unwrap();
    assert_eq!(r.data, &data[..block as usize]);
    assert!(s.client.chunk_range(&h, cs, 2 * block, 0, 2 * block).await.is_err());
}

/// Manifests go zstd-compressed to a client that accepts it (every VM start waits for one),
/// plain to one that does not or refuses it; the store client asks and decodes.
#[tokio::test]
async fn manifests_are_compressed_for_clients_that_accept_zstd() {
    let s = start().await;
    let chunks: Vec<Option<Vec<u8>>> = (0..64).map(|i| if i % 3 == 0 { None } else { Some(chunk_data(i, 4096)) }).collect();
    let m = upload_image(&s.client, "big", CS, &chunks).await;
    let json = serde_json::to_vec(&m).unwrap();
    // No automatic decoding here: the bytes on the wire are checked.
    let http = reqwest::Client::builder().no_zstd().build().unwrap();
    let url = format!("{}/store/v1/images/big/1", s.url);
    let get = |accept: Option<&'static str>| {
        let mut req = http.get(&url);
        if let Some(a) = accept {
            req = req.header("accept-encoding", a);
        }
        req.send()
    };
    let resp = get(Some("gzip, zstd")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-encoding"], "zstd");
    assert_eq!(resp.headers()["vary"], "accept-encoding");
    let body = resp.bytes().await.unwrap();
    assert!(body.len() < json.len(), "{} bytes compressed of {}", body.len(), json.len());
    assert_eq!(zstd::bulk::decompress(&body, 1 << 20).unwrap(), json);
    for accept in [None, Some("gzip"), Some("zstd;q=0")] {
        let resp = get(accept).await.unwrap();
        assert!(resp.headers().get("content-encoding").is_none(), "{accept:?}");
        assert_eq!(resp.bytes().await.unwrap(), json, "{accept:?}");
    }
    assert_eq!(s.client.manifest(&r("big@1")).await.unwrap(), m);
    assert_eq!(s.client.manifest(&r("big")).await.unwrap(), m);
}
