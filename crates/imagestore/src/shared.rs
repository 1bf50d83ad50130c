//! Several image servers on one bucket (`--store s3://…`): what must not live in one process's
//! memory is kept in the bucket itself, beside the chunks.
//!
//! * `uploads/ID/pins-N`: chunks upload session `ID` relies on (already stored ones it will
//!   reference, and the ones it is about to upload), one object per batch, written **before** the
//!   session checks that those chunks exist.
//! * `uploads/ID/alive`: touched while the session is in use; a session none of whose objects
//!   changed within the session TTL is dead (its server crashed) and its pins no longer count.
//! * `gc/lease`: the one server collecting garbage, until when (created with a conditional
//!   create, taken over with a conditional update once expired, renewed while collecting).
//!
//! The protocol is Dekker's: an uploader writes its pins, then reads the lease (and waits while
//! a collection runs); a collector writes the lease, then reads the pins. Whatever the
//! interleaving, either the collector sees the pins and keeps those chunks, or the uploader
//! sees the lease, waits for the collection to end and only then checks which chunks exist (so
//! it uploads again what was collected). A commit writes its manifest before it removes its
//! pins, and a collector reads the pins before the manifests, so a chunk is always kept by one
//! or the other. The store must be strongly consistent for reads after writes and support
//! conditional creates (`If-None-Match: *`) and updates (`If-Match`): AWS S3, SeaweedFS, MinIO,
//! Garage and R2 do. Leases compare the holder's clock with the reader's: keep the servers'
//! clocks in sync (NTP) to well under the lease TTL.
//!
//! This module must never decide what to collect (that is [`crate::store`]'s garbage
//! collector); it only says which chunks other servers' sessions hold and who may collect.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::TryStreamExt;
use object_store::{path::Path, ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};
use vgrid_api::manifest::ChunkHash;
use vgrid_api::rest::UploadId;

use crate::error::StoreError;

/// How long a garbage collector's lease lasts unless renewed (it is renewed every third of it).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// How long an uploader waits for another server's collection to end before it gives up.
const GC_WAIT: Duration = Duration::from_secs(120);

fn lease_path() -> Path {
    Path::from("gc/lease")
}
fn uploads_root() -> Path {
    Path::from("uploads")
}
fn alive_path(id: &UploadId) -> Path {
    Path::from(format!("uploads/{id}/alive"))
}
fn pins_path(id: &UploadId, batch: u64) -> Path {
    Path::from(format!("uploads/{id}/pins-{batch:08}"))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Lease {
    holder: String,
    expires_ms: u64,
}

/// The bucket-side state of the image servers sharing one store.
#[derive(Clone)]
pub(crate) struct Bucket {
    objects: Arc<dyn ObjectStore>,
    /// This server's name, shown to the others (in a lease, in a session's `alive`).
    server: String,
    lease_ttl: Duration,
}

/// The garbage-collection lease while this server holds it; [`GcLease::release`] gives it back.
pub(crate) struct GcLease {
    objects: Arc<dyn ObjectStore>,
    renew: tokio::task::JoinHandle<()>,
}

impl GcLease {
    pub(crate) async fn release(self) {
        self.renew.abort();
        if let Err(e) = self.objects.delete(&lease_path()).await {
            tracing::warn!(error = %e, "could not release the garbage-collection lease; it expires by itself");
        }
    }
}

impl Drop for GcLease {
    fn drop(&mut self) {
        self.renew.abort();
    }
}

impl Bucket {
    pub(crate) fn new(objects: Arc<dyn ObjectStore>, server: String, lease_ttl: Duration) -> Self {
        Bucket { objects, server, lease_ttl }
    }

    /// Records that session `id` relies on `hashes` (batch `batch` of the session), then waits
    /// while another server collects garbage. Only after this returns may the session check
    /// which of `hashes` exist.
    pub(crate) async fn pin(&self, id: &UploadId, batch: u64, hashes: &[ChunkHash]) -> Result<(), StoreError> {
        let body: String = hashes.iter().map(|h| format!("{}\n", h.to_hex())).collect();
        self.objects
            .put(&pins_path(id, batch), PutPayload::from(body))
            .await
            .map_err(|e| StoreError::backend("write", format!("pins of upload {id}"), e))?;
        self.wait_for_collection().await
    }

    /// Marks session `id` as in use now.
    pub(crate) async fn touch(&self, id: &UploadId) -> Result<(), StoreError> {
        self.objects
            .put(&alive_path(id), PutPayload::from(self.server.clone()))
            .await
            .map_err(|e| StoreError::backend("write", format!("liveness of upload {id}"), e))?;
        Ok(())
    }

    /// Removes session `id`'s objects (after its commit or abort). Best effort: what is left
    /// only keeps chunks alive until the session counts as dead.
    pub(crate) async fn forget(&self, id: &UploadId) {
        let prefix = Path::from(format!("uploads/{id}"));
        let objects: Vec<_> = match self.objects.list(Some(&prefix)).try_collect().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(upload = %id, error = %e, "could not list the session's pins to remove them");
                return;
            }
        };
        for o in objects {
            if let Err(e) = self.objects.delete(&o.location).await {
                tracing::warn!(upload = %id, object = %o.location, error = %e, "could not remove a pin object");
            }
        }
    }

    async fn read_lease(&self) -> Result<Option<(Lease, UpdateVersion)>, StoreError> {
        match self.objects.get(&lease_path()).await {
            Ok(r) => {
                let version = UpdateVersion { e_tag: r.meta.e_tag.clone(), version: r.meta.version.clone() };
                let b = r.bytes().await.map_err(|e| StoreError::backend("read", "garbage-collection lease", e))?;
                // An unreadable lease (torn write) counts as expired: its holder renews it.
                let lease = serde_json::from_slice(&b).unwrap_or(Lease { holder: "?".into(), expires_ms: 0 });
                Ok(Some((lease, version)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::backend("read", "garbage-collection lease", e)),
        }
    }

    /// Waits while a live lease is held by any server (this one included: a collection in this
    /// process holds it too), up to [`GC_WAIT`].
    async fn wait_for_collection(&self) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + GC_WAIT;
        let mut logged = false;
        loop {
            let lease = match self.read_lease().await? {
                Some((l, _)) if l.expires_ms > now_ms() => l,
                _ => return Ok(()),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::GcBusy { holder: lease.holder, seconds: lease.expires_ms.saturating_sub(now_ms()) / 1000 + 1 });
            }
            if !logged {
                tracing::info!(holder = %lease.holder, "upload waits for a garbage collection on another server");
                logged = true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn lease_body(&self) -> PutPayload {
        let l = Lease { holder: self.server.clone(), expires_ms: now_ms() + self.lease_ttl.as_millis() as u64 };
        PutPayload::from(serde_json::to_vec(&l).expect("lease serialises"))
    }

    /// Takes the garbage-collection lease: refused with [`StoreError::GcBusy`] while another
    /// server holds a live one. The returned lease renews itself until released.
    pub(crate) async fn acquire(&self) -> Result<GcLease, StoreError> {
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.objects.put_opts(&lease_path(), self.lease_body(), create).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                let Some((lease, version)) = self.read_lease().await? else {
                    // Released between our create and our read: try once more.
                    return Box::pin(self.acquire()).await;
                };
                if lease.expires_ms > now_ms() {
                    return Err(StoreError::GcBusy { holder: lease.holder, seconds: (lease.expires_ms - now_ms()) / 1000 + 1 });
                }
                tracing::warn!(holder = %lease.holder, "taking over an expired garbage-collection lease");
                let update = PutOptions { mode: PutMode::Update(version), ..Default::default() };
                match self.objects.put_opts(&lease_path(), self.lease_body(), update).await {
                    Ok(_) => {}
                    Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => {
                        let holder = self.read_lease().await?.map(|(l, _)| l.holder).unwrap_or_else(|| "?".into());
                        return Err(StoreError::GcBusy { holder, seconds: self.lease_ttl.as_secs() });
                    }
                    Err(e) => return Err(StoreError::backend("take over", "garbage-collection lease", e)),
                }
            }
            Err(e) => return Err(StoreError::backend("create", "garbage-collection lease", e)),
        }
        let objects = self.objects.clone();
        let body = {
            let me = self.clone();
            move || me.lease_body()
        };
        let every = self.lease_ttl / 3;
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = objects.put(&lease_path(), body()).await {
                    tracing::warn!(error = %e, "could not renew the garbage-collection lease");
                }
            }
        });
        Ok(GcLease { objects: self.objects.clone(), renew })
    }

    /// The chunks pinned by live sessions of every server. Objects of dead sessions (nothing
    /// of theirs changed within `session_ttl`) are removed on the way.
    pub(crate) async fn live_pins(&self, session_ttl: Duration) -> Result<HashSet<ChunkHash>, StoreError> {
        let all: Vec<_> =
            self.objects.list(Some(&uploads_root())).try_collect().await.map_err(|e| StoreError::backend("list", "upload pins", e))?;
        let mut sessions: HashMap<String, Vec<object_store::ObjectMeta>> = HashMap::new();
        for o in all {
            let id = {
                let mut parts = o.location.parts();
                let (Some(_), Some(id)) = (parts.next(), parts.next()) else { continue };
                id.as_ref().to_string()
            };
            sessions.entry(id).or_default().push(o);
        }
        let mut pins = HashSet::new();
        for (id, objects) in sessions {
            let newest: SystemTime = objects.iter().map(|o| o.last_modified).max().expect("a session has objects").into();
            let age = SystemTime::now().duration_since(newest).unwrap_or_default();
            if age > session_ttl {
                tracing::info!(upload = %id, "removing the pins of a dead upload session");
                for o in &objects {
                    let _ = self.objects.delete(&o.location).await;
                }
                continue;
            }
            for o in objects.iter().filter(|o| o.location.filename().is_some_and(|f| f.starts_with("pins-"))) {
                let body = match self.objects.get(&o.location).await {
                    Ok(r) => r.bytes().await.map_err(|e| StoreError::backend("read", format!("pins of upload {id}"), e))?,
                    // Removed by its commit since the listing: its manifest keeps the chunks.
                    Err(object_store::Error::NotFound { .. }) => continue,
                    Err(e) => return Err(StoreError::backend("read", format!("pins of upload {id}"), e)),
                };
                for line in String::from_utf8_lossy(&body).lines() {
                    match line.trim().parse::<ChunkHash>() {
                        Ok(h) => {
                            pins.insert(h);
                        }
                        Err(_) if line.trim().is_empty() => {}
                        // A pin we cannot read: collect nothing rather than guess.
                        Err(_) => {
                            return Err(StoreError::backend(
                                "parse",
                                format!("pins of upload {id}"),
                                object_store::Error::Generic { store: "pins", source: format!("not a chunk hash: {line:?}").into() },
                            ))
                        }
                    }
                }
            }
        }
        Ok(pins)
    }
}

/// Where an S3 store is and how to reach it: `s3://BUCKET[/PREFIX]`, an endpoint for
/// S3-compatible servers; credentials and region come from the usual `AWS_*` variables.
#[derive(Debug, Clone)]
pub struct S3Location {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
}

impl std::str::FromStr for S3Location {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("s3://").ok_or_else(|| format!("{s:?}: an S3 store is s3://BUCKET[/PREFIX]"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid {
            return Err(format!("{s:?}: {bucket:?} is not an S3 bucket name (3-63 of a-z, 0-9, '-', '.')"));
        }
        Ok(S3Location { bucket: bucket.into(), prefix: prefix.trim_matches('/').into(), endpoint: None })
    }
}

impl std::fmt::Display for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        if let Some(e) = &self.endpoint {
            write!(f, " at {e}")?;
        }
        Ok(())
    }
}

impl crate::ImageStore {
    /// A store in an S3 bucket that other image servers may share ([`crate::ImageStore::shared`]),
    /// as server `server`. Checks first that the bucket answers and honours conditional
    /// creates, without which two servers on it would not be safe.
    pub async fn open_s3(at: &S3Location, server: &str) -> Result<Self, StoreError> {
        use object_store::aws::AmazonS3Builder;
        use object_store::{BackoffConfig, RetryConfig};
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&at.bucket);
        if let Some(e) =
            at.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL").ok()).or_else(|| std::env::var("AWS_ENDPOINT").ok())
        {
            b = b.with_allow_http(e.starts_with("http://")).with_endpoint(e);
        }
        // Fail within seconds when the store is down (the caller gets an error naming it and
        // retries), rather than holding every request for minutes.
        b = b.with_retry(RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(5), backoff: BackoffConfig::default() });
        let s3 = b.build().map_err(|e| StoreError::backend("open", at.to_string(), e))?;
        let objects: Arc<dyn ObjectStore> =
            if at.prefix.is_empty() { Arc::new(s3) } else { Arc::new(object_store::prefix::PrefixStore::new(s3, at.prefix.as_str())) };
        check_conditional_create(&objects, at).await?;
        Ok(Self::shared(objects, server))
    }
}

/// Writes a probe object twice with a conditional create: the second must be refused.
async fn check_conditional_create(objects: &Arc<dyn ObjectStore>, at: &S3Location) -> Result<(), StoreError> {
    let probe = Path::from(format!("probe/{}", hex::encode(rand::random::<[u8; 8]>())));
    let create = || PutOptions { mode: PutMode::Create, ..Default::default() };
    objects
        .put_opts(&probe, PutPayload::from_static(b"1"), create())
        .await
        .map_err(|e| StoreError::backend("write a probe to", at.to_string(), e))?;
    let second = objects.put_opts(&probe, PutPayload::from_static(b"2"), create()).await;
    let _ = objects.delete(&probe).await;
    match second {
        Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(()),
        Ok(_) => Err(StoreError::Unsafe {
            store: at.to_string(),
            why: "it overwrote an object written with If-None-Match: * (a conditional create); several image servers on it could lose chunks. Use a server that supports conditional writes (AWS S3, SeaweedFS, MinIO, Garage, R2)".into(),
        }),
        Err(e) => Err(StoreError::backend("write a probe to", at.to_string(), e)),
    }
}
