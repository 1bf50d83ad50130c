//! HTTP client of the image server API (`/store/v1`, served by `vgrid-imagestore`).
//!
//! Every chunk it returns has been verified against its hash. Connection errors, timeouts and
//! 5xx answers are retried a bounded number of times with backoff ([`RetryPolicy`]); a 404, a
//! refused request or a corrupt chunk is not retried (a hash mismatch is retried once, in case
//! the bytes were damaged in transit, then reported).

use crate::codec;
use bytes::Bytes;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use std::time::Duration;
use vgrid_api::rest::{BootProfile, ErrorKind, GcReport, ImageOwner, ImageSummary, UploadCreated};
use vgrid_api::{ChunkHash, ErrorBody, ImageRef, Manifest};

pub use vgrid_api::rest::UploadId;

/// Errors of [`StoreClient`]; each names the server URL and the object. Their causes stay text:
/// often the server's own message; `Unreachable`'s is the whole chain of the HTTP error, and the
/// block proxy takes `Corrupt`'s and `BadResponse`'s as its own error's cause (`cause.into()`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("{object} not found on image server {url}: {message}")]
    NotFound { url: String, object: String, message: String },
    #[error("chunk {hash} from image server {url} is corrupt: {cause}")]
    Corrupt { url: String, hash: ChunkHash, cause: String },
    #[error("image server {url} unreachable while fetching {object} ({attempts} attempts): {cause}")]
    Unreachable { url: String, object: String, attempts: u32, cause: String },
    #[error("image server {url} refused {object} (HTTP {status}): {message}")]
    Server { url: String, object: String, status: u16, message: String },
    #[error("image server {url} sent an invalid answer for {object}: {cause}")]
    BadResponse { url: String, object: String, cause: String },
}

impl ClientError {
    /// True for [`ClientError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::NotFound { .. })
    }
    /// A 404 saying the server has no such endpoint (an older image server), not that the
    /// object is missing.
    pub fn is_no_such_endpoint(&self) -> bool {
        matches!(self, ClientError::NotFound { message, .. } if message.starts_with("no such endpoint"))
    }
    /// HTTP status of a [`ClientError::Server`] answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Server { status, .. } => Some(*status),
            ClientError::NotFound { .. } => Some(404),
            _ => None,
        }
    }
}

/// How hard the client tries before giving up on a request.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Total tries of a retryable request (at least 1).
    pub attempts: u32,
    /// Wait before the second try; tripled for each further one.
    pub first_backoff: Duration,
    /// A try fails when nothing arrives from the server for this long (a stalled server or
    /// connection). A slow transfer that still moves goes on: over a thin link many chunk
    /// fetches share the bandwidth, and a deadline on the whole answer would cut them all
    /// half-way and fetch them again, forever.
    pub request_timeout: Duration,
    /// Connect timeout of each try.
    pub connect_timeout: Duration,
}

impl Default for RetryPolicy {
    /// 4 tries over about 3 s (0.3 + 0.9 + 1.8 s of backoff), 60 s per try.
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            first_backoff: Duration::from_millis(300),
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// A chunk fetched and verified: the compressed bytes as served, and the plain bytes.
#[derive(Debug, Clone)]
pub struct FetchedChunk {
    pub compressed: Bytes,
    pub data: Vec<u8>,
}

/// Client of one image server.
#[derive(Debug, Clone)]
pub struct StoreClient {
    base: String,
    http: reqwest::Client,
    retry: RetryPolicy,
    /// Commit new images as readable by every user (admins and grid nodes only).
    public: bool,
    /// When bytes last came from the server (shared by the client's clones).
    heard: std::sync::Arc<Heard>,
}

/// When a client last received bytes from its server, for any request: a transfer that
/// shares a thin link with others may wait long for its own bytes while the link is busy with
/// theirs; whether the link moves at all is what tells a slow server from a gone one.
/// Nanoseconds since [`Heard::epoch`] (0: never).
#[derive(Debug, Default)]
struct Heard(std::sync::atomic::AtomicU64);

impl Heard {
    /// The process's first use of this clock.
    fn epoch() -> std::time::Instant {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        *EPOCH.get_or_init(std::time::Instant::now)
    }
    fn now(&self) {
        let at = Heard::epoch().elapsed().as_nanos().max(1) as u64;
        self.0.fetch_max(at, std::sync::atomic::Ordering::Relaxed);
    }
    fn quiet_for(&self) -> Option<Duration> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            at => Some(Heard::epoch().elapsed().saturating_sub(Duration::from_nanos(at))),
        }
    }
}

enum Body {
    None,
    Json(Vec<u8>),
    Raw(Bytes),
}

impl StoreClient {
    /// A client of the image server at `base_url` (e.g. `http://10.0.0.5:7400`), default retries.
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        Self::with_retry(base_url, RetryPolicy::default())
    }

    /// A client with an explicit retry policy.
    pub fn with_retry(base_url: &str, retry: RetryPolicy) -> Result<Self, ClientError> {
        let base = base_url.trim_end_matches('/').to_string();
        let bad = |cause: String| ClientError::BadResponse { url: base.clone(), object: "client setup".into(), cause };
        if reqwest::Url::parse(&base).is_err() {
            return Err(bad(format!("{base_url:?} is not a valid URL")));
        }
        let http = vgrid_trust::tls::client_builder()
            .read_timeout(retry.request_timeout)
            .connect_timeout(retry.connect_timeout)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(StoreClient {
            base,
            http,
            retry: RetryPolicy { attempts: retry.attempts.max(1), ..retry },
            public: false,
            heard: Default::default(),
        })
    }

    /// Images committed through this client are public (allowed to admins and grid nodes).
    pub fn public(mut self, public: bool) -> Self {
        self.public = public;
        self
    }

    /// Who image `name` belongs to.
    pub async fn owner(&self, name: &str) -> Result<ImageOwner, ClientError> {
        let object = format!("owner of image {name}");
        let resp = self.send(Method::GET, &format!("/owners/{name}"), &object, Body::None, true).await?;
        self.json(resp, &object).await
    }

    /// Records who image `name` belongs to (admins and the coordinator).
    pub async fn set_owner(&self, name: &str, o: &ImageOwner) -> Result<(), ClientError> {
        let object = format!("owner of image {name}");
        let body = Body::Json(serde_json::to_vec(o).expect("serialises"));
        self.send(Method::PUT, &format!("/owners/{name}"), &object, body, true).await?;
        Ok(())
    }

    /// Volume `name`'s fencing epoch (0: never attached read-write).
    pub async fn volume_epoch(&self, name: &str) -> Result<u64, ClientError> {
        let object = format!("epoch of volume {name}");
        let resp = self.send(Method::GET, &format!("/volumes/{name}/epoch"), &object, Body::None, true).await?;
        let e: vgrid_api::volume::Epoch = self.json(resp, &object).await?;
        Ok(e.epoch)
    }

    /// Raises volume `name`'s fencing epoch to `epoch` (the coordinator); answers the epoch in
    /// force.
    pub async fn raise_epoch(&self, name: &str, epoch: u64) -> Result<u64, ClientError> {
        let object = format!("epoch of volume {name}");
        let body = Body::Json(serde_json::to_vec(&vgrid_api::volume::Epoch { epoch }).expect("serialises"));
        let resp = self.send(Method::PUT, &format!("/volumes/{name}/epoch"), &object, body, true).await?;
        let e: vgrid_api::volume::Epoch = self.json(resp, &object).await?;
        Ok(e.epoch)
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}/store/v1{}", self.base, path)
    }

    /// Sends a request, retrying connection errors, timeouts and 5xx answers when `retry`.
    /// Returns the successful response or the mapped error.
    async fn send(&self, method: Method, path: &str, object: &str, body: Body, retry: bool) -> Result<reqwest::Response, ClientError> {
        let url = self.url(path);
        let attempts = if retry { self.retry.attempts } else { 1 };
        let mut backoff = self.retry.first_backoff;
        let mut last: Option<ClientError> = None;
        for attempt in 1..=attempts {
            if attempt > 1 {
                tokio::time::sleep(backoff).await;
                backoff *= 3;
            }
            let mut req = self.http.request(method.clone(), &url);
            // A user's login token (`vgrid_trust::tls::set_bearer`, CLI commands); grid nodes
            // prove themselves by certificate instead.
            if let Some(t) = vgrid_trust::tls::bearer() {
                req = req.bearer_auth(t);
            }
            req = match &body {
                Body::None => req,
                Body::Json(j) => req.header("content-type", "application/json").body(j.clone()),
                Body::Raw(b) => req.header("content-type", "application/zstd").body(b.clone()),
            };
            let sent = req.send().await;
            if sent.is_ok() {
                self.heard.now();
            }
            match sent {
                Err(e) => {
                    tracing::debug!(%url, attempt, error = %e, "image server request failed");
                    last = Some(ClientError::Unreachable {
                        url: self.base.clone(),
                        object: object.to_string(),
                        attempts: attempt,
                        cause: error_chain(&e),
                    });
                }
                Ok(resp) if resp.status().is_success() || resp.status() == StatusCode::NOT_MODIFIED => return Ok(resp),
                Ok(resp) => {
                    let status = resp.status();
                    let err = self.error_from(resp, object).await;
                    let transient = status.is_server_error()
                        && status != StatusCode::INSUFFICIENT_STORAGE
                        && !matches!(err, ClientError::Corrupt { .. });
                    if !transient {
                        return Err(err);
                    }
                    tracing::debug!(%url, attempt, %status, "image server answered with a server error");
                    last = Some(err);
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    async fn error_from(&self, resp: reqwest::Response, object: &str) -> ClientError {
        let status = resp.status();
        let text = resp.bytes().await.unwrap_or_default();
        let parsed: Option<ErrorBody> = serde_json::from_slice(&text).ok();
        let kind = parsed.as_ref().and_then(|b| b.detail.as_ref()).and_then(|d| d.get("kind")).and_then(|k| k.as_str()).map(str::to_string);
        let message = match parsed {
            Some(b) => b.error,
            None if text.is_empty() => status.canonical_reason().unwrap_or("error").to_string(),
            None => String::from_utf8_lossy(&text[..text.len().min(500)]).into_owned(),
        };
        if status == StatusCode::NOT_FOUND {
            return ClientError::NotFound { url: self.base.clone(), object: object.to_string(), message };
        }
        if kind.as_deref() == Some(ErrorKind::CHUNK_CORRUPT) {
            if let Some(hash) = object.strip_prefix("chunk ").and_then(|h| h.parse().ok()) {
                return ClientError::Corrupt { url: self.base.clone(), hash, cause: message };
            }
        }
        ClientError::Server { url: self.base.clone(), object: object.to_string(), status: status.as_u16(), message }
    }

    async fn json<T: DeserializeOwned>(&self, resp: reqwest::Response, object: &str) -> Result<T, ClientError> {
        let b = self.bytes(resp, object).await?;
        serde_json::from_slice(&b).map_err(|e| ClientError::BadResponse {
            url: self.base.clone(),
            object: object.to_string(),
            cause: e.to_string(),
        })
    }

    /// The whole body of `resp`, noting each piece's arrival ([`StoreClient::quiet_for`]).
    async fn bytes(&self, mut resp: reqwest::Response, object: &str) -> Result<Bytes, ClientError> {
        let mut body = bytes::BytesMut::with_capacity(resp.content_length().unwrap_or(0).min(64 << 20) as usize);
        loop {
            match resp.chunk().await {
                Ok(Some(piece)) => {
                    self.heard.now();
                    body.extend_from_slice(&piece);
                }
                Ok(None) => return Ok(body.freeze()),
                Err(e) => {
                    return Err(ClientError::Unreachable {
                        url: self.base.clone(),
                        object: object.to_string(),
                        attempts: 1,
                        cause: format!("reading the answer: {}", error_chain(&e)),
                    })
                }
            }
        }
    }

    /// How long since bytes last came from the server, for any request of this client or its
    /// clones (`None`: none yet). A transfer that has waited long for its own bytes while this
    /// is short shares a busy link; it is not stalled.
    pub fn quiet_for(&self) -> Option<Duration> {
        self.heard.quiet_for()
    }

    fn ref_path(r: &ImageRef) -> String {
        match r.version {
            Some(v) => format!("/images/{}/{}", r.name, v),
            None => format!("/images/{}", r.name),
        }
    }

    /// Every image version the server holds.
    pub async fn list(&self) -> Result<Vec<ImageSummary>, ClientError> {
        let resp = self.send(Method::GET, "/images", "image list", Body::None, true).await?;
        self.json(resp, "image list").await
    }

    /// The manifest of `NAME@VERSION` (latest when no version), validated.
    pub async fn manifest(&self, r: &ImageRef) -> Result<Manifest, ClientError> {
        let object = format!("image {r}");
        let resp = self.send(Method::GET, &Self::ref_path(r), &object, Body::None, true).await?;
        let b = self.bytes(resp, &object).await?;
        let m = Manifest::from_json(&b).map_err(|e| ClientError::BadResponse {
            url: self.base.clone(),
            object: object.clone(),
            cause: e.to_string(),
        })?;
        if m.name != r.name || r.version.is_some_and(|v| v != m.version) {
            return Err(ClientError::BadResponse {
                url: self.base.clone(),
                object,
                cause: format!("asked for {r}, got manifest of {}", m.image_ref()),
            });
        }
        Ok(m)
    }

    /// A chunk's plain bytes, verified against its hash; `limit` bounds the decompressed size
    /// (the image's chunk size).
    pub async fn chunk(&self, hash: &ChunkHash, limit: usize) -> Result<Vec<u8>, ClientError> {
        Ok(self.fetch_chunk(hash, limit).await?.data)
    }

    /// A chunk's compressed bytes as served plus its verified plain bytes.
    pub async fn fetch_chunk(&self, hash: &ChunkHash, limit: usize) -> Result<FetchedChunk, ClientError> {
        let object = format!("chunk {hash}");
        let path = format!("/chunks/{hash}");
        let mut tries = 0;
        loop {
            tries += 1;
            let resp = self.send(Method::GET, &path, &object, Body::None, true).await?;
            let compressed = self.bytes(resp, &object).await?;
            match codec::decode(hash, &compressed, limit) {
                Ok(data) => return Ok(FetchedChunk { compressed, data }),
                Err(e) if tries < 2 => {
                    tracing::warn!(chunk = %hash, url = %self.base, error = %e, "chunk failed verification; fetching it again");
                }
                Err(e) => {
                    tracing::error!(chunk = %hash, url = %self.base, error = %e, "chunk failed verification");
                    return Err(ClientError::Corrupt { url: self.base.clone(), hash: *hash, cause: e.to_string() });
                }
            }
        }
    }

    /// Bytes `[offset, offset+len)` of chunk `hash` (`chunk_len` bytes long, per the manifest),
    /// whole `block`-byte blocks, verified through the chunk's BLAKE3 tree
    /// ([`crate::tree::decode_range`]); the answer carries the chaining values of every block.
    /// An image server without ranged reads answers `NotFound` ("no such endpoint"): see
    /// [`ClientError::is_no_such_endpoint`].
    pub async fn chunk_range(
        &self,
        hash: &ChunkHash,
        chunk_len: u32,
        block: u32,
        offset: u32,
        len: u32,
    ) -> Result<crate::tree::RangeBlocks, ClientError> {
        let object = format!("chunk {hash}");
        if let Err(e) = crate::tree::check_range(hash, chunk_len, block, offset, len) {
            return Err(ClientError::Server { url: self.base.clone(), object, status: 400, message: e.to_string() });
        }
        let path = format!("/chunks/{hash}/range?offset={offset}&len={len}&block={block}");
        let mut tries = 0;
        loop {
            tries += 1;
            let resp = self.send(Method::GET, &path, &object, Body::None, true).await?;
            let z = self.bytes(resp, &object).await?;
            match crate::tree::decode_range(hash, chunk_len, block, offset, len, &z) {
                Ok(r) => return Ok(r),
                Err(e) if tries < 2 => {
                    tracing::warn!(chunk = %hash, url = %self.base, error = %e, "chunk range failed verification; fetching it again");
                }
                Err(e) => {
                    tracing::error!(chunk = %hash, url = %self.base, error = %e, "chunk range failed verification");
                    return Err(ClientError::Corrupt { url: self.base.clone(), hash: *hash, cause: e.to_string() });
                }
            }
        }
    }

    /// True when the server stores the chunk.
    pub async fn has_chunk(&self, hash: &ChunkHash) -> Result<bool, ClientError> {
        match self.send(Method::HEAD, &format!("/chunks/{hash}"), &format!("chunk {hash}"), Body::None, true).await {
            Ok(_) => Ok(true),
            Err(ClientError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes one version (or all versions) of an image; the server then collects garbage.
    pub async fn delete(&self, r: &ImageRef) -> Result<GcReport, ClientError> {
        let object = format!("image {r}");
        let resp = self.send(Method::DELETE, &Self::ref_path(r), &object, Body::None, false).await?;
        self.json(resp, &object).await
    }

    /// Runs garbage collection on the server now (it also runs after every delete).
    pub async fn gc(&self) -> Result<GcReport, ClientError> {
        let resp = self.send(Method::POST, "/gc", "garbage collection", Body::None, false).await?;
        self.json(resp, "garbage collection").await
    }

    /// The boot profile of an image version (`r.version` of `None` means latest).
    pub async fn profile(&self, r: &ImageRef) -> Result<BootProfile, ClientError> {
        let m;
        let r = match r.version {
            Some(_) => r,
            None => {
                m = self.manifest(r).await?.image_ref();
                &m
            }
        };
        let object = format!("boot profile of image {r}");
        let resp = self.send(Method::GET, &format!("{}/profile", Self::ref_path(r)), &object, Body::None, true).await?;
        self.json(resp, &object).await
    }

    /// The hot-page bundle of an image version (`r.version` must be set), unverified: check
    /// it with [`crate::hotpages::decode`] against the manifest.
    pub async fn hot_pages(&self, r: &ImageRef) -> Result<Bytes, ClientError> {
        let object = format!("hot pages of image {r}");
        let resp = self.send(Method::GET, &format!("{}/profile/hot", Self::ref_path(r)), &object, Body::None, true).await?;
        self.bytes(resp, &object).await
    }

    /// [`StoreClient::hot_pages`] as it arrives (for [`crate::hotpages::decode_stream`]).
    pub async fn hot_pages_stream(
        &self,
        r: &ImageRef,
    ) -> Result<futures::stream::BoxStream<'static, Result<Bytes, ClientError>>, ClientError> {
        use futures::StreamExt;
        let object = format!("hot pages of image {r}");
        let resp = self.send(Method::GET, &format!("{}/profile/hot", Self::ref_path(r)), &object, Body::None, true).await?;
        let (base, heard) = (self.base.clone(), self.heard.clone());
        Ok(resp
            .bytes_stream()
            .map(move |b| {
                if b.is_ok() {
                    heard.now();
                }
                b.map_err(|e| ClientError::Unreachable {
                    url: base.clone(),
                    object: object.clone(),
                    attempts: 1,
                    cause: format!("reading the answer: {}", error_chain(&e)),
                })
            })
            .boxed())
    }

    /// Stores the hot-page bundle of an image version (`r.version` must be set).
    pub async fn put_hot_pages(&self, r: &ImageRef, bundle: Bytes) -> Result<(), ClientError> {
        let object = format!("hot pages of image {r}");
        self.send(Method::PUT, &format!("{}/profile/hot", Self::ref_path(r)), &object, Body::Raw(bundle), true).await?;
        Ok(())
    }

    /// Stores the boot profile of an image version (`r.version` must be set).
    pub async fn put_profile(&self, r: &ImageRef, p: &BootProfile) -> Result<(), ClientError> {
        let object = format!("boot profile of image {r}");
        if r.version.is_none() {
            return Err(ClientError::Server {
                url: self.base.clone(),
                object,
                status: 400,
                message: "a boot profile belongs to one image version: give NAME@VERSION".into(),
            });
        }
        let body = Body::Json(serde_json::to_vec(p).expect("profile serialises"));
        self.send(Method::PUT, &format!("{}/profile", Self::ref_path(r)), &object, body, true).await?;
        Ok(())
    }

    /// Starts an upload session.
    pub async fn begin_upload(&self) -> Result<UploadId, ClientError> {
        let resp = self.send(Method::POST, "/uploads", "upload session", Body::None, true).await?;
        let c: UploadCreated = self.json(resp, "upload session").await?;
        Ok(UploadId(c.id))
    }

    /// Abandons an upload session (nothing becomes visible).
    pub async fn abort_upload(&self, id: &UploadId) -> Result<(), ClientError> {
        self.send(Method::DELETE, &format!("/uploads/{id}"), &format!("upload {id}"), Body::None, true).await?;
        Ok(())
    }

    /// Of `hashes`, those the server lacks; the present ones are pinned in the session.
    pub async fn missing(&self, id: &UploadId, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, ClientError> {
        let object = format!("missing chunks of upload {id}");
        let body = Body::Json(serde_json::to_vec(hashes).expect("hashes serialise"));
        let resp = self.send(Method::POST, &format!("/uploads/{id}/missing"), &object, body, true).await?;
        self.json(resp, &object).await
    }

    /// Uploads one compressed chunk (as made by [`codec::encode`]) in a session.
    pub async fn put_chunk(&self, id: &UploadId, hash: &ChunkHash, compressed: Bytes) -> Result<(), ClientError> {
        let object = format!("chunk {hash}");
        self.send(Method::PUT, &format!("/uploads/{id}/chunks/{hash}"), &object, Body::Raw(compressed), true).await?;
        Ok(())
    }

    /// Commits the session: the server checks every chunk exists and stores the manifest
    /// (version 0 = next version). Returns the stored manifest. Not retried.
    pub async fn commit(&self, id: &UploadId, m: &Manifest) -> Result<Manifest, ClientError> {
        self.commit_fenced(id, m, None).await
    }

    /// [`StoreClient::commit`] of a volume's version by the holder of fencing epoch `epoch`
    /// (refused with 409 when the volume's epoch is newer).
    pub async fn commit_fenced(&self, id: &UploadId, m: &Manifest, epoch: Option<u64>) -> Result<Manifest, ClientError> {
        let object = format!("image {}", m.name);
        let body = Body::Json(serde_json::to_vec(m).expect("manifest serialises"));
        let q = match (self.public, epoch) {
            (true, Some(e)) => format!("?public=true&epoch={e}"),
            (true, None) => "?public=true".to_string(),
            (false, Some(e)) => format!("?epoch={e}"),
            (false, None) => String::new(),
        };
        let resp = self.send(Method::POST, &format!("/uploads/{id}/commit{q}"), &object, body, false).await?;
        let b = self.bytes(resp, &object).await?;
        Manifest::from_json(&b).map_err(|e| ClientError::BadResponse { url: self.base.clone(), object, cause: e.to_string() })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}
