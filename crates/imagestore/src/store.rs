//! The image store: manifests, boot profiles and content-addressed chunks in an `ObjectStore`.
//!
//! Layout (all paths relative to the store root):
//!
//! * `chunks/<first 2 hex digits>/<64 hex digits>`: a chunk, zstd-compressed ([`codec::encode`]).
//! * `manifests/<name>/<version>.json`: one image version. Writing it is the only thing that
//!   makes an image visible.
//! * `profiles/<name>/<version>.json`: the boot profile ([`BootProfile`]) of an image version.
//! * `counters/<name>`: the highest version number ever assigned to `name`, so that a version
//!   number is never reused after a delete (hosts cache manifests by `name@version`).
//!
//! Garbage collection and imports are made safe against each other by *upload sessions*: an
//! import asks which chunks are missing ([`ImageStore::missing`]), and the chunks found present
//! are pinned in its session, as is every chunk it uploads. GC deletes only chunks referenced by
//! no manifest and pinned by no live session, and runs under a lock that excludes `missing`,
//! chunk uploads and commits. A session idle for longer than its time-to-live expires; its pins
//! go with it, so an import killed half way leaves orphans that the next GC collects.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{local::LocalFileSystem, path::Path, ObjectStore, PutMode, PutOptions, PutPayload};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vgrid_api::manifest::validate_name;
use vgrid_api::rest::{BootProfile, GcReport, ImageOwner, ImageSummary, UploadId};
use vgrid_api::{ChunkHash, ImageRef, Manifest, MAX_CHUNK_SIZE};
use vgrid_storeclient::codec::{self, ChunkError};

use crate::error::{StoreError, Unreadable};

/// How long an upload session may stay idle before it expires (and its pins with it).
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(3600);

struct Session {
    pins: HashSet<ChunkHash>,
    last_used: Instant,
    /// On a shared bucket: the chunks pinned there, the pin batches written, and when the
    /// session last marked itself alive there.
    bucket_pins: HashSet<ChunkHash>,
    batches: u64,
    touched: Option<Instant>,
}

/// Images as manifests plus content-addressed chunks over any [`ObjectStore`].
pub struct ImageStore {
    objects: Arc<dyn ObjectStore>,
    /// Write-held by GC; read-held by `missing`, chunk uploads and commits.
    gc_guard: tokio::sync::RwLock<()>,
    /// Serialises version assignment within this process (`PutMode::Create` guards across
    /// processes).
    commit_lock: tokio::sync::Mutex<()>,
    sessions: Mutex<HashMap<UploadId, Session>>,
    session_ttl: Duration,
    /// Set when other image servers may share the objects: pins and the GC lease in the bucket.
    bucket: Option<crate::shared::Bucket>,
    /// Chunks ranged reads were served from lately, decoded (see `recent.rs`).
    recent: recent::Recent,
}

/// Bytes of decoded chunks kept for ranged reads ([`recent::Recent`]): 128 chunks of 256 KiB.
const RECENT_RANGE_BYTES: usize = 32 << 20;

fn chunk_path(h: &ChunkHash) -> Path {
    let hex = h.to_hex();
    Path::from(format!("chunks/{}/{}", &hex[..2], hex))
}
fn manifest_path(name: &str, version: u32) -> Path {
    Path::from(format!("manifests/{name}/{version}.json"))
}
fn profile_path(name: &str, version: u32) -> Path {
    Path::from(format!("profiles/{name}/{version}.json"))
}

fn hot_pages_path(name: &str, version: u32) -> Path {
    Path::from(format!("profiles/{name}/{version}.hot"))
}
fn epoch_path(name: &str) -> Path {
    Path::from(format!("volumes/{name}/epoch"))
}

fn kind(m: &Manifest) -> &'static str {
    if m.meta.volume.is_some() {
        "a volume"
    } else {
        "an image"
    }
}

fn owner_path(name: &str) -> Path {
    Path::from(format!("owners/{name}.json"))
}
fn counter_path(name: &str) -> Path {
    Path::from(format!("counters/{name}"))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl ImageStore {
    /// A store over any object store (local filesystem, S3, in-memory...).
    pub fn new(objects: Arc<dyn ObjectStore>) -> Self {
        ImageStore {
            objects,
            gc_guard: tokio::sync::RwLock::new(()),
            commit_lock: tokio::sync::Mutex::new(()),
            sessions: Mutex::new(HashMap::new()),
            session_ttl: DEFAULT_SESSION_TTL,
            bucket: None,
            recent: recent::Recent::new(RECENT_RANGE_BYTES),
        }
    }

    /// A store whose objects other image servers share (one S3 bucket): upload sessions pin
    /// their chunks in the bucket and garbage collection takes a lease there, so that a
    /// collection on one server never deletes a chunk an upload on another is about to
    /// reference ([`crate::shared`]). `server` names this one in leases and logs.
    pub fn shared(objects: Arc<dyn ObjectStore>, server: impl Into<String>) -> Self {
        let mut s = Self::new(objects.clone());
        s.bucket = Some(crate::shared::Bucket::new(objects, server.into(), crate::shared::DEFAULT_LEASE_TTL));
        s
    }

    /// Whether this store coordinates with other servers through its bucket.
    pub fn is_shared(&self) -> bool {
        self.bucket.is_some()
    }

    /// A store on the local filesystem under `dir` (created if absent).
    pub fn open_local(dir: impl AsRef<std::path::Path>) -> Result<Self, StoreError> {
        let dir = dir.as_ref();
        let object = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::backend(
                "create data directory",
                object.clone(),
                object_store::Error::Generic { store: "LocalFileSystem", source: Box::new(e) },
            )
        })?;
        let fs = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| StoreError::backend("open data directory", object, e))?
            .with_automatic_cleanup(true);
        Ok(Self::new(Arc::new(fs)))
    }

    /// Sets how long an upload session may stay idle before it expires.
    pub fn with_session_ttl(mut self, ttl: Duration) -> Self {
        self.session_ttl = ttl;
        self
    }

    /// The underlying object store.
    pub fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.objects
    }

    // ---------------------------------------------------------------- chunks

    /// True when the chunk is stored (not verified).
    pub async fn has_chunk(&self, hash: &ChunkHash) -> Result<bool, StoreError> {
        match self.objects.head(&chunk_path(hash)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(StoreError::backend("stat", format!("chunk {hash}"), e)),
        }
    }

    async fn read_chunk_object(&self, hash: &ChunkHash) -> Result<Bytes, StoreError> {
        let r = self.objects.get(&chunk_path(hash)).await;
        let r = match r {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        match r {
            Ok(b) => Ok(b),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::ChunkNotFound(*hash)),
            Err(e) => Err(StoreError::backend("read", format!("chunk {hash}"), e)),
        }
    }

    fn corrupt(hash: &ChunkHash, cause: ChunkError) -> StoreError {
        tracing::error!(chunk = %hash, %cause, "stored chunk failed verification; refusing to serve it");
        StoreError::ChunkCorrupt { hash: *hash, cause }
    }

    /// A chunk's plain bytes, always verified against its hash. `limit` bounds the decompressed
    /// size (the image's chunk size).
    pub async fn get_chunk(&self, hash: &ChunkHash, limit: usize) -> Result<Vec<u8>, StoreError> {
        let z = self.read_chunk_object(hash).await?;
        let h = *hash;
        let r = tokio::task::spawn_blocking(move || codec::decode(&h, &z, limit)).await.expect("chunk decode task panicked");
        r.map_err(|cause| Self::corrupt(hash, cause))
    }

    /// A chunk's compressed bytes as stored, after verifying that they decode to `hash`.
    /// A corrupt chunk is an error (and an error log line), never bytes.
    pub async fn get_chunk_compressed(&self, hash: &ChunkHash) -> Result<Bytes, StoreError> {
        let z = self.read_chunk_object(hash).await?;
        let h = *hash;
        let z2 = z.clone();
        let r =
            tokio::task::spawn_blocking(move || codec::verify(&h, &z2, MAX_CHUNK_SIZE as usize)).await.expect("chunk decode task panicked");
        match r {
            Ok(_) => Ok(z),
            Err(cause) => Err(Self::corrupt(hash, cause)),
        }
    }

    /// Bytes `[offset, offset+len)` of a chunk with the chaining values of all of its
    /// `block`-byte blocks, zstd-compressed ([`vgrid_storeclient::tree::encode_range`]): the
    /// chunk is read and verified whole, the answer carries only the range. A range that is not
    /// whole blocks inside the chunk is [`StoreError::BadRange`].
    pub async fn get_chunk_range(&self, hash: &ChunkHash, block: u32, offset: u32, len: u32) -> Result<Bytes, StoreError> {
        use vgrid_storeclient::tree;
        let h = *hash;
        let decoded = self.recent.get(hash, block);
        let fresh = decoded.is_none();
        let z = if fresh { self.read_chunk_object(hash).await? } else { Bytes::new() };
        // One hashing pass: the block CVs verify the chunk and go into the answer.
        let r = tokio::task::spawn_blocking(move || {
            let d = match decoded {
                Some(d) => d,
                None => {
                    let (data, cvs) = codec::decode_with_blocks(&h, &z, MAX_CHUNK_SIZE as usize, block)?;
                    let Some(cvs) = cvs else {
                        return Ok(Err(tree::TreeError::Geometry { hash: h, block, chunk_len: data.len() as u32 }));
                    };
                    Arc::new(recent::Decoded { data, cvs })
                }
            };
            Ok(tree::encode_range_with(&h, &d.data, &d.cvs, block, offset, len).map(|z| (z, d)))
        })
        .await
        .expect("chunk range task panicked");
        match r {
            Err(cause) => Err(Self::corrupt(hash, cause)),
            Ok(Err(e)) => Err(StoreError::BadRange(e)),
            Ok(Ok((z, d))) => {
                if fresh {
                    self.recent.put(h, block, d);
                }
                Ok(Bytes::from(z))
            }
        }
    }

    // --------------------------------------------------------------- sessions

    /// Starts an upload session.
    pub fn begin_upload(&self) -> UploadId {
        let id = UploadId(hex::encode(rand::random::<[u8; 16]>()));
        let mut s = self.sessions.lock().unwrap();
        s.insert(
            id.clone(),
            Session { pins: HashSet::new(), last_used: Instant::now(), bucket_pins: HashSet::new(), batches: 0, touched: None },
        );
        tracing::debug!(upload = %id, "upload session started");
        id
    }

    /// Drops an upload session without writing anything; its uploaded chunks become garbage
    /// unless something else references them.
    pub fn abort_upload(&self, id: &UploadId) -> Result<(), StoreError> {
        let mut s = self.sessions.lock().unwrap();
        s.remove(id).map(|_| ()).ok_or_else(|| StoreError::UploadNotFound(id.clone()))?;
        self.forget_in_bucket(id);
        Ok(())
    }

    /// Removes a finished session's pins from a shared bucket, in the background.
    fn forget_in_bucket(&self, id: &UploadId) {
        if let (Some(b), Ok(rt)) = (&self.bucket, tokio::runtime::Handle::try_current()) {
            let (bucket, id) = (b.clone(), id.clone());
            rt.spawn(async move { bucket.forget(&id).await });
        }
    }

    /// On a shared bucket: pins `hashes` for session `id` there (those not pinned yet), marks
    /// the session alive, and waits while another server collects garbage. Must precede any
    /// check of whether those chunks exist. Nothing to do on a store of its own.
    async fn pin_in_bucket(&self, id: &UploadId, hashes: &[ChunkHash]) -> Result<(), StoreError> {
        let Some(bucket) = &self.bucket else { return Ok(()) };
        let (new, batch, touch) = {
            let mut s = self.sessions.lock().unwrap();
            let sess = s.get_mut(id).ok_or_else(|| StoreError::UploadNotFound(id.clone()))?;
            let new: Vec<ChunkHash> = hashes.iter().filter(|h| !sess.bucket_pins.contains(h)).copied().collect();
            let touch = sess.touched.is_none_or(|t| t.elapsed() > self.session_ttl / 4);
            if touch {
                sess.touched = Some(Instant::now());
            }
            if !new.is_empty() {
                sess.batches += 1;
            }
            (new, sess.batches, touch)
        };
        if touch {
            bucket.touch(id).await?;
        }
        if new.is_empty() {
            return Ok(());
        }
        bucket.pin(id, batch, &new).await?;
        if let Some(sess) = self.sessions.lock().unwrap().get_mut(id) {
            sess.bucket_pins.extend(new);
        }
        Ok(())
    }

    /// Number of live upload sessions.
    pub fn live_uploads(&self) -> usize {
        let mut s = self.sessions.lock().unwrap();
        self.expire(&mut s);
        s.len()
    }

    fn expire(&self, s: &mut HashMap<UploadId, Session>) {
        let ttl = self.session_ttl;
        s.retain(|id, sess| {
            let live = sess.last_used.elapsed() < ttl;
            if !live {
                tracing::info!(upload = %id, "upload session expired");
            }
            live
        });
    }

    /// Adds pins to a live session (touching it), or fails if it is unknown/expired.
    fn pin(&self, id: &UploadId, hashes: impl IntoIterator<Item = ChunkHash>) -> Result<(), StoreError> {
        let mut s = self.sessions.lock().unwrap();
        self.expire(&mut s);
        let sess = s.get_mut(id).ok_or_else(|| StoreError::UploadNotFound(id.clone()))?;
        sess.last_used = Instant::now();
        sess.pins.extend(hashes);
        Ok(())
    }

    /// Of `hashes`, those not in the store. The present ones are pinned in the session so that
    /// a concurrent GC cannot delete them before the session commits.
    pub async fn missing(&self, id: &UploadId, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, StoreError> {
        self.pin(id, std::iter::empty())?;
        let mut uniq: Vec<ChunkHash> = hashes.to_vec();
        uniq.sort();
        uniq.dedup();
        self.pin_in_bucket(id, &uniq).await?;
        let _g = self.gc_guard.read().await;
        let present: Vec<(ChunkHash, bool)> =
            futures::stream::iter(uniq).map(|h| async move { self.has_chunk(&h).await.map(|p| (h, p)) }).buffered(16).try_collect().await?;
        self.pin(id, present.iter().filter(|(_, p)| *p).map(|(h, _)| *h))?;
        Ok(present.into_iter().filter(|(_, p)| !*p).map(|(h, _)| h).collect())
    }

    /// Stores a compressed chunk in a session after verifying it decodes to `hash`.
    /// Storing a chunk that exists already is a no-op (content addressing).
    pub async fn put_chunk(&self, id: &UploadId, hash: &ChunkHash, compressed: Bytes) -> Result<(), StoreError> {
        self.pin(id, [*hash])?;
        self.pin_in_bucket(id, &[*hash]).await?;
        let h = *hash;
        let z = compressed.clone();
        tokio::task::spawn_blocking(move || codec::verify(&h, &z, MAX_CHUNK_SIZE as usize))
            .await
            .expect("chunk decode task panicked")
            .map_err(|cause| StoreError::BadUpload { hash: *hash, cause })?;
        let _g = self.gc_guard.read().await;
        // The session again, under the guard: one aborted (or expired) while this chunk was
        // being verified may have been collected already, and a chunk written now would be an
        // orphan that outlives the collection that should have taken it.
        self.pin(id, std::iter::empty())?;
        // One request, not a look then a write: a conditional create, where an existing chunk
        // (same name, so same content) is success.
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.objects.put_opts(&chunk_path(hash), PutPayload::from_bytes(compressed), create).await {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(StoreError::backend("write", format!("chunk {hash}"), e)),
        }
    }

    /// Verifies that every chunk the manifest references exists, writes the manifest (assigning
    /// the next version when `manifest.version` is 0) and ends the session.
    pub async fn commit(&self, id: &UploadId, manifest: Manifest) -> Result<Manifest, StoreError> {
        self.commit_fenced(id, manifest, None).await
    }

    /// [`ImageStore::commit`] of a volume's version by the holder of epoch `fence`: refused
    /// when the volume's epoch ([`ImageStore::raise_epoch`]) is newer.
    pub async fn commit_fenced(&self, id: &UploadId, manifest: Manifest, fence: Option<u64>) -> Result<Manifest, StoreError> {
        self.pin(id, std::iter::empty())?;
        let chunks: Vec<ChunkHash> = manifest.all_chunks().copied().collect();
        self.pin_in_bucket(id, &chunks).await?;
        let m = self.put_manifest_fenced(manifest, fence).await?;
        self.sessions.lock().unwrap().remove(id);
        // Only now: a collector reads the pins before the manifests.
        self.forget_in_bucket(id);
        tracing::info!(upload = %id, image = %m.image_ref(), "upload committed");
        Ok(m)
    }

    // -------------------------------------------------------------- manifests

    /// Writes a manifest after checking that all its chunks are stored. Version 0 means "assign
    /// the next version"; an explicit version that exists already is refused.
    ///
    /// Outside a session this is GC-safe only for chunks that some other manifest or session
    /// keeps alive; importers use [`ImageStore::commit`].
    pub async fn put_manifest(&self, manifest: Manifest) -> Result<Manifest, StoreError> {
        self.put_manifest_fenced(manifest, None).await
    }

    async fn put_manifest_fenced(&self, mut manifest: Manifest, fence: Option<u64>) -> Result<Manifest, StoreError> {
        manifest.validate().map_err(|cause| StoreError::InvalidManifest { image: manifest.name.clone(), cause })?;
        if manifest.created == 0 {
            manifest.created = now_secs();
        }
        let _g = self.gc_guard.read().await;
        let mut wanted: Vec<ChunkHash> = manifest.all_chunks().copied().collect();
        wanted.sort();
        wanted.dedup();
        let present: Vec<(ChunkHash, bool)> = futures::stream::iter(wanted)
            .map(|h| async move { self.has_chunk(&h).await.map(|p| (h, p)) })
            .buffered(16)
            .try_collect()
            .await?;
        let missing: Vec<ChunkHash> = present.into_iter().filter(|(_, p)| !*p).map(|(h, _)| h).collect();
        if let Some(first) = missing.first() {
            return Err(StoreError::MissingChunks { image: manifest.name.clone(), count: missing.len(), first: *first, missing });
        }
        let _c = self.commit_lock.lock().await;
        if let Some(last) = self.versions(&manifest.name).await?.last() {
            let head = self.get_manifest(&ImageRef { name: manifest.name.clone(), version: Some(*last) }).await?;
            if kind(&head) != kind(&manifest) {
                return Err(StoreError::KindMismatch { name: manifest.name.clone(), is: kind(&head), not: kind(&manifest) });
            }
        }
        let auto = manifest.version == 0;
        // A fenced commit: the epoch check and the write ordered against raise_epoch (epoch.rs).
        if let Some(epoch) = fence {
            manifest = self.put_volume_fenced(manifest, epoch).await?;
        }
        while fence.is_none() {
            if auto {
                let last = self.versions(&manifest.name).await?.last().copied().unwrap_or(0);
                manifest.version = last.max(self.counter(&manifest.name).await?) + 1;
            }
            let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
            let r = self
                .objects
                .put_opts(
                    &manifest_path(&manifest.name, manifest.version),
                    PutPayload::from(json),
                    PutOptions { mode: PutMode::Create, ..Default::default() },
                )
                .await;
            match r {
                Ok(_) => break,
                Err(object_store::Error::AlreadyExists { .. }) if auto => continue,
                Err(object_store::Error::AlreadyExists { .. }) => return Err(StoreError::ImageExists(manifest.image_ref())),
                Err(e) => return Err(StoreError::backend("write", format!("manifest of image {}", manifest.image_ref()), e)),
            }
        }
        if manifest.version > self.counter(&manifest.name).await? {
            // Best effort: the counter only stops version reuse after deletes.
            if let Err(e) = self.objects.put(&counter_path(&manifest.name), PutPayload::from(manifest.version.to_string())).await {
                tracing::warn!(image = %manifest.image_ref(), error = %e, "could not record the version counter");
            }
        }
        tracing::info!(image = %manifest.image_ref(), size = manifest.disk.size, "image stored");
        Ok(manifest)
    }

    /// The highest version ever assigned to `name` (`counters/NAME`, a decimal number; 0 when
    /// absent or unparsable: it only stops version reuse after deletes).
    async fn counter(&self, name: &str) -> Result<u32, StoreError> {
        match self.objects.get(&counter_path(name)).await {
            Ok(r) => {
                let b = r.bytes().await.map_err(|e| StoreError::backend("read", format!("version counter of {name}"), e))?;
                Ok(std::str::from_utf8(&b).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(0),
            Err(e) => Err(StoreError::backend("read", format!("version counter of {name}"), e)),
        }
    }

    /// Stored versions of image `name`, ascending.
    pub async fn versions(&self, name: &str) -> Result<Vec<u32>, StoreError> {
        let prefix = Path::from(format!("manifests/{name}"));
        let metas: Vec<_> = self
            .objects
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("list", format!("versions of image {name}"), e))?;
        let mut v: Vec<u32> = metas.iter().filter_map(|m| m.location.filename()?.strip_suffix(".json")?.parse().ok()).collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Resolves `NAME` (latest) or `NAME@VERSION` to a concrete version.
    pub async fn resolve(&self, r: &ImageRef) -> Result<ImageRef, StoreError> {
        validate_name(&r.name).map_err(StoreError::BadName)?;
        match r.version {
            Some(_) => Ok(r.clone()),
            None => match self.versions(&r.name).await?.last() {
                Some(v) => Ok(ImageRef { name: r.name.clone(), version: Some(*v) }),
                None => Err(StoreError::ImageNotFound(r.clone())),
            },
        }
    }

    /// The manifest of `NAME@VERSION`, or of the latest version when no version is given.
    pub async fn get_manifest(&self, r: &ImageRef) -> Result<Manifest, StoreError> {
        let r = self.resolve(r).await?;
        let v = r.version.expect("resolved");
        let res = match self.objects.get(&manifest_path(&r.name, v)).await {
            Ok(g) => g.bytes().await,
            Err(e) => Err(e),
        };
        let b = match res {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => return Err(StoreError::ImageNotFound(r)),
            Err(e) => return Err(StoreError::backend("read", format!("manifest of image {r}"), e)),
        };
        Manifest::from_json(&b).map_err(|e| StoreError::CorruptManifest { image: r, cause: Unreadable::Manifest(e) })
    }

    /// Every stored image version, by name then version.
    pub async fn list(&self) -> Result<Vec<ImageSummary>, StoreError> {
        let mut out = Vec::new();
        for (name, version) in self.all_versions().await? {
            let r = ImageRef { name, version: Some(version) };
            match self.get_manifest(&r).await {
                Ok(m) => {
                    let o = self.owner(&m.name).await?;
                    out.push(ImageSummary { owner: o.owner, public: o.public, ..ImageSummary::of(&m) })
                }
                // Deleted between listing and reading.
                Err(StoreError::ImageNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Who image `name` belongs to (no record: nobody, i.e. admins and grid nodes only).
    pub async fn owner(&self, name: &str) -> Result<ImageOwner, StoreError> {
        match self.objects.get(&owner_path(name)).await {
            Ok(g) => {
                let b = g.bytes().await.map_err(|e| StoreError::backend("read", format!("owner of image {name}"), e))?;
                serde_json::from_slice(&b).map_err(|e| StoreError::CorruptManifest {
                    image: ImageRef { name: name.into(), version: None },
                    cause: Unreadable::Owner(e),
                })
            }
            Err(object_store::Error::NotFound { .. }) => Ok(ImageOwner::default()),
            Err(e) => Err(StoreError::backend("read", format!("owner of image {name}"), e)),
        }
    }

    /// Records who image `name` belongs to.
    pub async fn set_owner(&self, name: &str, o: &ImageOwner) -> Result<(), StoreError> {
        vgrid_api::manifest::validate_name(name).map_err(|cause| StoreError::InvalidManifest { image: name.into(), cause })?;
        let b = serde_json::to_vec(o).expect("serialises");
        self.objects
            .put(&owner_path(name), PutPayload::from(b))
            .await
            .map_err(|e| StoreError::backend("write", format!("owner of image {name}"), e))?;
        Ok(())
    }

    async fn all_versions(&self) -> Result<Vec<(String, u32)>, StoreError> {
        let metas: Vec<_> = self
            .objects
            .list(Some(&Path::from("manifests")))
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("list", "manifests", e))?;
        let mut v: Vec<(String, u32)> = metas
            .iter()
            .filter_map(|m| {
                let parts: Vec<_> = m.location.parts().collect();
                if parts.len() != 3 {
                    return None;
                }
                let name = parts[1].as_ref().to_string();
                let ver = parts[2].as_ref().strip_suffix(".json")?.parse().ok()?;
                Some((name, ver))
            })
            .collect();
        v.sort();
        Ok(v)
    }

    /// Deletes one version (or, with no version, every version) of an image, its boot
    /// profiles, then collects the chunks nothing references any more.
    pub async fn delete(&self, r: &ImageRef) -> Result<GcReport, StoreError> {
        validate_name(&r.name).map_err(StoreError::BadName)?;
        let versions = match r.version {
            Some(v) => vec![v],
            None => self.versions(&r.name).await?,
        };
        if versions.is_empty() {
            return Err(StoreError::ImageNotFound(r.clone()));
        }
        for v in versions {
            let vr = ImageRef { name: r.name.clone(), version: Some(v) };
            // Existence check so that deleting an unknown version is a clear 404.
            match self.objects.head(&manifest_path(&r.name, v)).await {
                Ok(_) => {}
                Err(object_store::Error::NotFound { .. }) => return Err(StoreError::ImageNotFound(vr)),
                Err(e) => return Err(StoreError::backend("stat", format!("manifest of image {vr}"), e)),
            }
            self.objects
                .delete(&manifest_path(&r.name, v))
                .await
                .map_err(|e| StoreError::backend("delete", format!("manifest of image {vr}"), e))?;
            for path in [profile_path(&r.name, v), hot_pages_path(&r.name, v)] {
                match self.objects.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => tracing::warn!(image = %vr, error = %e, object = %path, "could not delete boot profile"),
                }
            }
            tracing::info!(image = %vr, "image deleted");
        }
        self.gc().await
    }

    /// Deletes every chunk that no manifest references and no live upload session pins.
    pub async fn gc(&self) -> Result<GcReport, StoreError> {
        let _g = self.gc_guard.write().await;
        // On a shared bucket: the lease first, then the other servers' pins (crate::shared).
        let lease = match &self.bucket {
            Some(b) => Some(b.acquire().await?),
            None => None,
        };
        let r = self.collect(lease.is_some()).await;
        if let Some(l) = lease {
            l.release().await;
        }
        r
    }

    async fn collect(&self, shared: bool) -> Result<GcReport, StoreError> {
        let mut keep: HashSet<ChunkHash> = HashSet::new();
        {
            let mut s = self.sessions.lock().unwrap();
            self.expire(&mut s);
            for sess in s.values() {
                keep.extend(sess.pins.iter().copied());
            }
        }
        if let (true, Some(b)) = (shared, &self.bucket) {
            // A margin over the TTL for the servers' clocks.
            keep.extend(b.live_pins(self.session_ttl + Duration::from_secs(60)).await?);
        }
        for (name, version) in self.all_versions().await? {
            let r = ImageRef { name, version: Some(version) };
            match self.get_manifest(&r).await {
                Ok(m) => keep.extend(m.all_chunks().copied()),
                Err(StoreError::ImageNotFound(_)) => {}
                // An unreadable manifest: we cannot know what it references, so collect nothing.
                Err(e) => {
                    tracing::error!(image = %r, error = %e, "garbage collection skipped: unreadable manifest");
                    return Err(e);
                }
            }
        }
        let chunks: Vec<_> =
            self.objects.list(Some(&Path::from("chunks"))).try_collect().await.map_err(|e| StoreError::backend("list", "chunks", e))?;
        let mut report = GcReport::default();
        // Nothing deleted stays servable from the decoded chunks either.
        self.recent.clear();
        for meta in chunks {
            let Some(hash) = meta.location.filename().and_then(|f| f.parse::<ChunkHash>().ok()) else {
                continue;
            };
            if keep.contains(&hash) {
                continue;
            }
            match self.objects.delete(&meta.location).await {
                Ok(()) => {
                    report.chunks_freed += 1;
                    report.bytes_freed += meta.size;
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(StoreError::backend("delete", format!("chunk {hash}"), e)),
            }
        }
        tracing::info!(chunks_freed = report.chunks_freed, bytes_freed = report.bytes_freed, "garbage collection done");
        Ok(report)
    }

    /// Number of stored chunks and their stored (compressed) bytes.
    pub async fn chunk_stats(&self) -> Result<(u64, u64), StoreError> {
        let mut n = 0;
        let mut bytes = 0;
        let mut s = self.objects.list(Some(&Path::from("chunks")));
        while let Some(m) = s.next().await {
            let m = m.map_err(|e| StoreError::backend("list", "chunks", e))?;
            n += 1;
            bytes += m.size;
        }
        Ok((n, bytes))
    }

    // --------------------------------------------------------------- profiles

    /// The bytes of an object kept beside an image version (latest when no version is given)
    /// at `path(name, version)`, with the version; `None` when the version exists without it.
    async fn beside(&self, r: &ImageRef, path: fn(&str, u32) -> Path, what: &str) -> Result<(ImageRef, Option<bytes::Bytes>), StoreError> {
        let r = self.resolve(r).await?;
        let v = r.version.expect("resolved");
        let res = match self.objects.get(&path(&r.name, v)).await {
            Ok(g) => g.bytes().await,
            Err(e) => Err(e),
        };
        match res {
            Ok(b) => Ok((r, Some(b))),
            Err(object_store::Error::NotFound { .. }) => {
                // Distinguish "no such image" from "image without one".
                self.get_manifest(&r).await?;
                Ok((r, None))
            }
            Err(e) => Err(StoreError::backend("read", format!("{what} of image {r}"), e)),
        }
    }

    /// The boot profile of an image version (latest when no version is given).
    pub async fn get_profile(&self, r: &ImageRef) -> Result<BootProfile, StoreError> {
        match self.beside(r, profile_path, "boot profile").await? {
            (r, Some(b)) => serde_json::from_slice(&b).map_err(|e| StoreError::CorruptManifest { image: r, cause: Unreadable::Profile(e) }),
            (r, None) => Err(StoreError::ProfileNotFound(r)),
        }
    }

    /// The hot-page bundle of an image version (see [`crate::hotpages`]), as stored.
    pub async fn get_hot_pages(&self, r: &ImageRef) -> Result<bytes::Bytes, StoreError> {
        match self.beside(r, hot_pages_path, "hot pages").await? {
            (_, Some(b)) => Ok(b),
            (r, None) => Err(StoreError::HotPagesNotFound(r)),
        }
    }

    /// Stores (replaces) the hot-page bundle of a warm image version with a saved RAM, after
    /// verifying every page in it against the manifest.
    pub async fn put_hot_pages(&self, r: &ImageRef, bundle: bytes::Bytes) -> Result<u64, StoreError> {
        let m = self.get_manifest(r).await?;
        let r = m.image_ref();
        let ram = m.state.as_ref().and_then(|s| s.ram.as_ref()).ok_or_else(|| StoreError::NoSavedRam(r.clone()))?;
        let pages = vgrid_storeclient::hotpages::decode(&bundle, &ram.blob, ram.chunk_size)
            .map_err(|cause| StoreError::BadHotPages { image: r.clone(), cause })?;
        self.objects
            .put(&hot_pages_path(&r.name, r.version.expect("concrete")), PutPayload::from(bundle))
            .await
            .map_err(|e| StoreError::backend("write", format!("hot pages of image {r}"), e))?;
        Ok(pages.pages.len() as u64)
    }

    /// Stores (replaces) the boot profile of an existing image version.
    pub async fn put_profile(&self, r: &ImageRef, profile: &BootProfile) -> Result<(), StoreError> {
        let m = self.get_manifest(r).await?;
        let r = m.image_ref();
        if let Some(&index) = profile.chunks.iter().find(|&&i| i >= m.profile_len()) {
            return Err(StoreError::BadProfile { image: r, index, chunks: m.profile_len() as usize });
        }
        let named: HashSet<u64> = profile.chunks.iter().copied().collect();
        for part in &profile.parts {
            let bad = |cause: String| StoreError::BadProfilePart { image: r.clone(), chunk: part.chunk, cause };
            let Some(Some(_)) = m.disk.chunks.get(part.chunk as usize) else {
                return Err(bad("not a stored chunk of the disk".into()));
            };
            if !named.contains(&part.chunk) {
                return Err(bad("not among the profile's chunks".into()));
            }
            if let Some(cause) = part.invalid(m.disk.chunk_len(m.chunk_size, part.chunk as usize)) {
                return Err(bad(cause));
            }
        }
        let json = serde_json::to_vec(profile).expect("profile serialises");
        self.objects
            .put(&profile_path(&r.name, r.version.expect("concrete")), PutPayload::from(json))
            .await
            .map_err(|e| StoreError::backend("write", format!("boot profile of image {r}"), e))?;
        Ok(())
    }
}

mod epoch;
mod recent;
#[cfg(test)]
mod tests;
