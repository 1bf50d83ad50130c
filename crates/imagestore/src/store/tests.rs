//! Unit tests of the image store (`super`): versions, uploads, garbage collection, volumes' fencing.

use super::*;
use object_store::memory::InMemory;
use vgrid_api::{Blob, Boot, ImageMeta};

fn mem() -> Arc<ImageStore> {
    Arc::new(ImageStore::new(Arc::new(InMemory::new())))
}

fn manifest(name: &str, version: u32, chunks: Vec<Option<ChunkHash>>) -> Manifest {
    Manifest {
        schema: 1,
        name: name.into(),
        version,
        created: 0,
        chunk_size: 4096,
        disk: Blob { size: chunks.len() as u64 * 4096, chunks },
        meta: ImageMeta { os: String::new(), arch: "x86_64".into(), boot: Boot::Firmware, volume: None },
        parent: None,
        state: None,
    }
}

async fn put(s: &ImageStore, id: &UploadId, data: &[u8]) -> ChunkHash {
    let (h, z) = codec::encode(data);
    s.put_chunk(id, &h, Bytes::from(z)).await.unwrap();
    h
}

#[tokio::test]
async fn versions_are_assigned_uniquely_and_explicit_ones_are_immutable() {
    let s = mem();
    let id = s.begin_upload();
    let h = put(&s, &id, &[1u8; 4096]).await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { s.put_manifest(manifest("img", 0, vec![Some(h)])).await.unwrap().version }));
    }
    let mut vs: Vec<u32> = futures::future::join_all(tasks).await.into_iter().map(|r| r.unwrap()).collect();
    vs.sort();
    assert_eq!(vs, vec![1, 2, 3, 4, 5, 6]);
    let e = s.put_manifest(manifest("img", 3, vec![Some(h)])).await.unwrap_err();
    assert!(matches!(e, StoreError::ImageExists(_)), "{e}");
    assert!(e.to_string().contains("img@3"));
    assert_eq!(s.put_manifest(manifest("img", 10, vec![None])).await.unwrap().version, 10);
    assert_eq!(s.get_manifest(&"img".parse().unwrap()).await.unwrap().version, 10);
    s.commit(&id, manifest("other", 0, vec![])).await.unwrap();
    assert_eq!(s.live_uploads(), 0);
}

#[tokio::test]
async fn a_volume_commit_is_fenced_by_its_epoch_and_kinds_do_not_mix() {
    let s = mem();
    let vol = |v: u32| {
        let mut m = manifest("data", v, vec![None, None]);
        m.meta.volume = Some(vgrid_api::volume::VolumeMeta::default());
        m
    };
    assert_eq!(s.put_manifest(vol(0)).await.unwrap().version, 1);
    assert_eq!(s.volume_epoch("data").await.unwrap(), 0);
    assert_eq!(s.raise_epoch("data", 7).await.unwrap(), 7);
    // Never lowered.
    assert_eq!(s.raise_epoch("data", 5).await.unwrap(), 7);
    let id = s.begin_upload();
    let e = s.commit_fenced(&id, vol(0), Some(6)).await.unwrap_err();
    assert!(matches!(e, StoreError::Fenced { epoch: 6, current: 7, .. }), "{e}");
    assert!(e.to_string().contains("epoch 6 is older than the volume's 7"), "{e}");
    // The head did not move.
    assert_eq!(s.versions("data").await.unwrap(), vec![1]);
    let id = s.begin_upload();
    assert_eq!(s.commit_fenced(&id, vol(0), Some(7)).await.unwrap().version, 2);
    // An image version over the volume's name, and a volume over an image's, are refused.
    let e = s.put_manifest(manifest("data", 0, vec![None])).await.unwrap_err();
    assert!(e.to_string().contains("data is a volume, not an image"), "{e}");
    s.put_manifest(manifest("img", 0, vec![None])).await.unwrap();
    let mut v = vol(0);
    v.name = "img".into();
    let e = s.put_manifest(v).await.unwrap_err();
    assert!(e.to_string().contains("img is an image, not a volume"), "{e}");
}

#[tokio::test]
async fn uploads_are_verified_and_sessions_checked() {
    let s = mem();
    let id = s.begin_upload();
    let (h, _) = codec::encode(b"right");
    let (_, z) = codec::encode(b"wrong");
    let e = s.put_chunk(&id, &h, Bytes::from(z)).await.unwrap_err();
    assert!(matches!(e, StoreError::BadUpload { .. }) && e.to_string().contains(&h.to_hex()), "{e}");
    assert!(!s.has_chunk(&h).await.unwrap());
    let ghost = UploadId("ghost".into());
    let e = s.missing(&ghost, &[h]).await.unwrap_err();
    assert!(matches!(e, StoreError::UploadNotFound(_)) && e.to_string().contains("ghost"), "{e}");
    s.abort_upload(&id).unwrap();
    assert!(s.abort_upload(&id).is_err());
}

#[tokio::test]
async fn gc_respects_manifests_and_live_pins_only() {
    let s = Arc::new(ImageStore::new(Arc::new(InMemory::new())).with_session_ttl(Duration::from_millis(100)));
    let id = s.begin_upload();
    let a = put(&s, &id, &[1u8; 4096]).await;
    let b = put(&s, &id, &[2u8; 4096]).await;
    let m = s.commit(&id, manifest("keep", 0, vec![Some(a)])).await.unwrap();
    // `b` was uploaded but is referenced by nothing now that the session ended.
    assert_eq!(s.gc().await.unwrap().chunks_freed, 1);
    assert!(s.has_chunk(&a).await.unwrap() && !s.has_chunk(&b).await.unwrap());

    // A live session's dedup pin keeps `a` through the delete of its only image.
    let id2 = s.begin_upload();
    assert!(s.missing(&id2, &[a]).await.unwrap().is_empty());
    assert_eq!(s.delete(&m.image_ref()).await.unwrap().chunks_freed, 0);
    assert!(s.has_chunk(&a).await.unwrap());
    // Once the session expires, the pin goes and so does the chunk.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.gc().await.unwrap().chunks_freed, 1);
    assert!(s.commit(&id2, manifest("late", 0, vec![Some(a)])).await.is_err());
    assert_eq!(s.chunk_stats().await.unwrap().0, 0);
}

/// A chunk upload that was verifying when its session was aborted and the garbage collected
/// writes nothing afterwards: it would be an orphan outliving the collection meant to take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_under_way_when_its_session_is_aborted_leaves_no_orphan() {
    let s = mem();
    let id = s.begin_upload();
    // The collector's side of the guard, held while the upload verifies its chunk.
    let collecting = s.gc_guard.write().await;
    let (h, z) = codec::encode(&[7u8; 4096]);
    let upload = tokio::spawn({
        let (s, id) = (s.clone(), id.clone());
        async move { s.put_chunk(&id, &h, Bytes::from(z)).await }
    });
    // The upload is waiting for the guard once it has pinned (touched) its session.
    while !upload.is_finished() && s.sessions.lock().unwrap()[&id].pins.is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.abort_upload(&id).unwrap();
    drop(collecting);
    let e = upload.await.unwrap().unwrap_err();
    assert!(matches!(e, StoreError::UploadNotFound(_)), "{e}");
    assert!(!s.has_chunk(&h).await.unwrap());
    assert_eq!(s.chunk_stats().await.unwrap().0, 0);
}

#[tokio::test]
async fn warm_image_state_chunks_are_checked_kept_and_freed_with_it() {
    let s = mem();
    let id = s.begin_upload();
    let base = put(&s, &id, &[1u8; 4096]).await;
    let parent = s.commit(&id, manifest("base", 0, vec![Some(base), None])).await.unwrap();
    // A warm child: one new disk chunk, the parent's other one, and a state blob.
    let id = s.begin_upload();
    let changed = put(&s, &id, &[2u8; 4096]).await;
    let st = put(&s, &id, &[3u8; 4096]).await;
    let meta = vgrid_api::StateMeta {
        qemu_version: "10.0.2".into(),
        machine: "pc".into(),
        cpus: 1,
        memory_mib: 256,
        accel: "tcg".into(),
        saved: 0,
        loader_roms: None,
    };
    let mut warm = manifest("warm", 0, vec![Some(base), Some(changed)]);
    warm.parent = Some(parent.image_ref());
    warm.state = Some(vgrid_api::SavedState { blob: Blob { size: 4096 + 100, chunks: vec![Some(st), None] }, meta, ram: None });
    // A state chunk that is not stored is refused like a missing disk chunk.
    let (ghost, _) = codec::encode(b"never uploaded");
    let mut bad = warm.clone();
    bad.state.as_mut().unwrap().blob.chunks[1] = Some(ghost);
    assert!(matches!(s.put_manifest(bad).await, Err(StoreError::MissingChunks { .. })));
    let warm = s.commit(&id, warm).await.unwrap();
    assert_eq!(s.gc().await.unwrap().chunks_freed, 0, "state chunks are referenced");
    let back = s.get_manifest(&warm.image_ref()).await.unwrap();
    assert_eq!(back.state, warm.state);
    assert_eq!(back.parent, Some(parent.image_ref()));
    // Deleting the warm image frees its own chunks, not the parent's.
    assert_eq!(s.delete(&warm.image_ref()).await.unwrap().chunks_freed, 2);
    assert!(s.has_chunk(&base).await.unwrap() && !s.has_chunk(&st).await.unwrap() && !s.has_chunk(&changed).await.unwrap());
}

#[tokio::test]
async fn summaries_count_stored_bytes() {
    let s = mem();
    let id = s.begin_upload();
    let a = put(&s, &id, &[1u8; 4096]).await;
    let mut m = manifest("sum", 0, vec![Some(a), None, Some(a)]);
    m.disk.size = 2 * 4096 + 10;
    let m = s.commit(&id, m).await.unwrap();
    let l = s.list().await.unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].stored_bytes, 4096 + 10);
    assert_eq!(l[0].version, m.version);
    assert_eq!(l[0].boot, "firmware");
}

// ------------------------------------------------ several servers on one bucket (crate::shared)

/// Image `name` of one stored chunk of `fill` bytes, through an upload session of `s`.
async fn one_chunk_image(s: &ImageStore, name: &str, fill: u8) -> ChunkHash {
    let id = s.begin_upload();
    let h = put(s, &id, &[fill; 4096]).await;
    s.commit(&id, manifest(name, 0, vec![Some(h)])).await.unwrap();
    h
}

async fn pins_left(objects: &Arc<dyn ObjectStore>) -> usize {
    let v: Vec<_> = objects.list(Some(&Path::from("uploads"))).try_collect().await.unwrap();
    v.len()
}

#[tokio::test]
async fn a_collection_on_one_server_keeps_the_chunks_an_upload_on_another_relies_on() {
    let objects: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let a = ImageStore::shared(objects.clone(), "a");
    let b = ImageStore::shared(objects.clone(), "b");
    let h = one_chunk_image(&a, "one", 7).await;
    // b's import finds the chunk stored and will reference it instead of uploading it...
    let id = b.begin_upload();
    assert_eq!(b.missing(&id, &[h]).await.unwrap(), vec![]);
    // ...while a deletes the only image that used it and collects.
    let r = a.delete(&"one".parse().unwrap()).await.unwrap();
    assert_eq!(r.chunks_freed, 0, "a collected a chunk b's upload relies on");
    let m = b.commit(&id, manifest("two", 0, vec![Some(h)])).await.unwrap();
    assert_eq!(a.get_chunk(&h, 4096).await.unwrap(), vec![7; 4096]);
    // The commit removes b's pins; then the chunk lives by its manifest alone.
    for _ in 0..100 {
        if pins_left(&objects).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pins_left(&objects).await, 0, "the committed session's pins stay in the bucket");
    let r = a.delete(&m.image_ref()).await.unwrap();
    assert_eq!(r.chunks_freed, 1, "the chunk outlived every reference");

    // The same interleaving with stores that do not share their sessions loses the chunk:
    // what the bucket-side pins are for.
    let a = ImageStore::new(objects.clone());
    let b = ImageStore::new(objects.clone());
    let h = one_chunk_image(&a, "three", 9).await;
    let id = b.begin_upload();
    assert_eq!(b.missing(&id, &[h]).await.unwrap(), vec![]);
    assert_eq!(a.delete(&"three".parse().unwrap()).await.unwrap().chunks_freed, 1);
    let e = b.commit(&id, manifest("four", 0, vec![Some(h)])).await.unwrap_err();
    assert!(matches!(e, StoreError::MissingChunks { .. }), "{e}");
}

#[tokio::test]
async fn an_upload_waits_while_another_server_collects_and_a_second_collector_is_refused() {
    let objects: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let b = ImageStore::shared(objects.clone(), "b");
    let h = one_chunk_image(&b, "one", 3).await;
    // Server c holds the collection lease for 1.5 s more.
    let until = std::time::SystemTime::now() + Duration::from_millis(1500);
    let ms = until.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let lease = serde_json::json!({"holder": "c", "expires_ms": ms}).to_string();
    objects.put(&Path::from("gc/lease"), PutPayload::from(lease)).await.unwrap();
    let e = b.gc().await.unwrap_err();
    assert!(matches!(&e, StoreError::GcBusy { holder, .. } if holder == "c"), "{e}");
    assert!(e.to_string().contains("image server c"), "{e}");
    // An upload's pins go in, then it waits for c's collection to end before it looks.
    let id = b.begin_upload();
    assert_eq!(b.missing(&id, &[h]).await.unwrap(), vec![]);
    assert!(std::time::SystemTime::now() >= until, "the upload looked while c was collecting");
    // c never released its lease (it died): b takes the expired one over, collects, releases.
    let r = b.gc().await.unwrap();
    assert_eq!(r.chunks_freed, 0);
    assert!(matches!(objects.head(&Path::from("gc/lease")).await, Err(object_store::Error::NotFound { .. })), "the lease was not released");
}

/// A bucket whose reads answer after `delay` (what they read may be stale by then): one image
/// server's view of a shared bucket, slow to act on what it read.
#[derive(Debug)]
struct SlowReads {
    inner: Arc<dyn ObjectStore>,
    delay: Duration,
}

impl std::fmt::Display for SlowReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlowReads({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for SlowReads {
    async fn put_opts(&self, p: &Path, payload: PutPayload, o: PutOptions) -> object_store::Result<object_store::PutResult> {
        self.inner.put_opts(p, payload, o).await
    }
    async fn put_multipart_opts(
        &self,
        p: &Path,
        o: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(p, o).await
    }
    async fn get_opts(&self, p: &Path, o: object_store::GetOptions) -> object_store::Result<object_store::GetResult> {
        let r = self.inner.get_opts(p, o).await;
        tokio::time::sleep(self.delay).await;
        r
    }
    async fn delete(&self, p: &Path) -> object_store::Result<()> {
        self.inner.delete(p).await
    }
    fn list(&self, p: Option<&Path>) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(p)
    }
    async fn list_with_delimiter(&self, p: Option<&Path>) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(p).await
    }
    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }
    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

/// Two image servers on one bucket raising a volume's epoch at once, both reading it before
/// either writes: the one asking less (slow to act on its read) writes last. Each raise is a
/// conditional write, so that late write is refused, read again, and the higher epoch stays
/// (a plain write would lower it and let the older holder commit). Then the same from nothing
/// (both creating the object), and many raises from both at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_epoch_raises_on_one_bucket_keep_the_highest() {
    let bucket: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let server = |ms| Arc::new(ImageStore::new(Arc::new(SlowReads { inner: bucket.clone(), delay: Duration::from_millis(ms) })));
    let (slow, fast) = (server(300), server(30));
    for (vol, low, high) in [("fresh", 5, 6), ("fresh", 8, 9), ("other", 1, 2)] {
        let (a, b) = tokio::join!(slow.raise_epoch(vol, low), fast.raise_epoch(vol, high));
        assert_eq!((a.unwrap(), b.unwrap()), (high, high), "{vol}: raising to {low} and {high} at once");
        assert_eq!(fast.volume_epoch(vol).await.unwrap(), high, "{vol}: the higher epoch is in force");
    }
    let tasks: Vec<_> = (1..=16u64)
        .map(|i| {
            let s = if i % 2 == 0 { slow.clone() } else { fast.clone() };
            tokio::spawn(async move { (100 + i, s.raise_epoch("many", 100 + i).await.unwrap()) })
        })
        .collect();
    for (asked, got) in futures::future::join_all(tasks).await.into_iter().map(|r| r.unwrap()) {
        assert!(got >= asked, "raising to {asked} answered {got}");
    }
    assert_eq!(slow.volume_epoch("many").await.unwrap(), 116);
    // On the local filesystem (no conditional update) it is raised too.
    let dir = tempfile::tempdir().unwrap();
    let local = ImageStore::new(Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap()));
    assert_eq!(local.raise_epoch("vol", 3).await.unwrap(), 3);
    assert_eq!(local.raise_epoch("vol", 2).await.unwrap(), 3);
    assert_eq!(local.volume_epoch("vol").await.unwrap(), 3);
}

/// A bucket where every request waits a random 0..`max_us` µs first, and writes of manifests
/// `manifest_lag` more: one server's view of a shared bucket, its requests interleaving with
/// another's at random (or its manifest writes arriving late).
#[derive(Debug)]
struct Jitter {
    inner: Arc<dyn ObjectStore>,
    max_us: u64,
    manifest_lag: Duration,
}

impl Jitter {
    async fn wait(&self) {
        tokio::time::sleep(Duration::from_micros(rand::random::<u64>() % self.max_us.max(1))).await;
    }
}

impl std::fmt::Display for Jitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Jitter({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Jitter {
    async fn put_opts(&self, p: &Path, payload: PutPayload, o: PutOptions) -> object_store::Result<object_store::PutResult> {
        self.wait().await;
        if p.as_ref().starts_with("manifests/") {
            tokio::time::sleep(self.manifest_lag).await;
        }
        self.inner.put_opts(p, payload, o).await
    }
    async fn put_multipart_opts(
        &self,
        p: &Path,
        o: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(p, o).await
    }
    async fn get_opts(&self, p: &Path, o: object_store::GetOptions) -> object_store::Result<object_store::GetResult> {
        self.wait().await;
        self.inner.get_opts(p, o).await
    }
    async fn delete(&self, p: &Path) -> object_store::Result<()> {
        self.wait().await;
        self.inner.delete(p).await
    }
    fn list(&self, p: Option<&Path>) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(p)
    }
    async fn list_with_delimiter(&self, p: Option<&Path>) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(p).await
    }
    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }
    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

fn volume_manifest(name: &str) -> Manifest {
    let mut m = manifest(name, 0, vec![None, None]);
    m.meta.volume = Some(vgrid_api::volume::VolumeMeta::default());
    m
}

/// `rounds` times: the holder of epoch k commits volume `name` through `stale` while `raiser`
/// raises the epoch to k+1 (starting a little later each round). Once the raise has returned
/// the versions are listed: the commit either landed before (its version is in that list, and
/// it was answered with success) or was refused as fenced, and nothing appears afterwards.
/// Returns how many commits landed and how many were refused.
async fn race_commits_against_raises(stale: Arc<ImageStore>, raiser: Arc<ImageStore>, name: &str, rounds: u64) -> (u32, u32) {
    stale.put_manifest(volume_manifest(name)).await.unwrap();
    let (mut landed, mut refused) = (0, 0);
    for k in 1..=rounds {
        assert_eq!(raiser.raise_epoch(name, k).await.unwrap(), k);
        let (s, n) = (stale.clone(), name.to_string());
        let commit = tokio::spawn(async move {
            let id = s.begin_upload();
            s.commit_fenced(&id, volume_manifest(&n), Some(k)).await
        });
        let (r, n) = (raiser.clone(), name.to_string());
        let raise = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_micros(k % 8 * 400)).await;
            assert_eq!(r.raise_epoch(&n, k + 1).await.unwrap(), k + 1);
            r.versions(&n).await.unwrap()
        });
        let at_raise = raise.await.unwrap();
        let committed = commit.await.unwrap();
        let after = raiser.versions(name).await.unwrap();
        assert_eq!(after, at_raise, "{name}, round {k}: a version appeared after the raise to {} returned ({committed:?})", k + 1);
        match committed {
            Ok(m) => {
                assert!(at_raise.contains(&m.version), "{name}, round {k}: commit answered {} but it is not listed", m.version);
                landed += 1;
            }
            Err(StoreError::Fenced { epoch, current, .. }) => {
                assert_eq!((epoch, current), (k, k + 1), "{name}, round {k}");
                refused += 1;
            }
            Err(e) => panic!("{name}, round {k}: the commit failed otherwise: {e}"),
        }
    }
    (landed, refused)
}

/// Fenced commits against epoch raises, atomically: two servers on one bucket (the stale
/// holder's commits through one, the raises through the other; each request delayed at random,
/// and also with the commit's manifest write arriving late, after its reservation), then one
/// server on a local directory. See also `tests/s3.rs` for the same on a real S3 server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_commit_never_lands_after_the_epoch_raise() {
    let bucket: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let server = |max_us, lag| Arc::new(ImageStore::new(Arc::new(Jitter { inner: bucket.clone(), max_us, manifest_lag: lag })));
    let (landed, refused) = race_commits_against_raises(server(800, Duration::ZERO), server(800, Duration::ZERO), "shared", 200).await;
    eprintln!("shared bucket: {landed} commits landed before the raise, {refused} refused");
    assert_eq!(landed + refused, 200);
    // The manifest write of every commit arrives 3 ms after its reservation: a raise in
    // between seals the reserved version, and the late write is refused.
    let (stale, raiser) = (server(100, Duration::from_millis(3)), server(100, Duration::ZERO));
    let (landed, refused) = race_commits_against_raises(stale, raiser.clone(), "late", 40).await;
    eprintln!("late manifest writes: {landed} landed, {refused} refused");
    assert!(refused > 0, "no commit was caught between its reservation and its manifest write");
    let m = raiser.get_manifest(&"late".parse().unwrap()).await.unwrap();
    assert!(m.meta.volume.is_some(), "a sealed version is a copy of the volume's version before it");
    let dir = tempfile::tempdir().unwrap();
    let local = Arc::new(ImageStore::new(Arc::new(Jitter {
        inner: Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap()),
        max_us: 800,
        manifest_lag: Duration::ZERO,
    })));
    let (landed, refused) = race_commits_against_raises(local.clone(), local, "local", 200).await;
    eprintln!("local directory: {landed} landed, {refused} refused");
    assert_eq!(landed + refused, 200);
}
