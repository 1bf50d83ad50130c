//! [`ChunkSource`] over one image server, through `vgrid_storeclient::StoreClient` (which
//! verifies every chunk and retries a bounded number of times).

use crate::source::{Cause, ChunkSource, RangeBlocks, SourceError};
use futures::future::BoxFuture;
use vgrid_api::rest::BootProfile;
use vgrid_api::{ChunkHash, ImageRef, Manifest};
use vgrid_storeclient::{ClientError, StoreClient};

/// One image server as a chunk source. Combine several with [`crate::Servers`].
#[derive(Debug, Clone)]
pub struct StoreSource {
    client: StoreClient,
    /// The server answered a ranged read "no such endpoint" (an older image server): fetch
    /// whole chunks from it.
    no_ranges: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl StoreSource {
    pub fn new(client: StoreClient) -> Self {
        StoreSource { client, no_ranges: Default::default() }
    }

    /// A source for the image server at `base_url` with the client's default retries.
    pub fn from_url(base_url: &str) -> Result<Self, SourceError> {
        StoreClient::new(base_url).map(Self::new).map_err(|e| SourceError::Unavailable {
            what: "image server client".into(),
            source_name: base_url.to_string(),
            cause: Cause::new(e),
        })
    }

    pub fn client(&self) -> &StoreClient {
        &self.client
    }

    fn map(&self, what: String, e: ClientError) -> SourceError {
        let source_name = self.client.base_url().to_string();
        match e {
            ClientError::NotFound { .. } => SourceError::NotFound { what, source_name },
            ClientError::Corrupt { cause, .. } => SourceError::Corrupt { what, source_name, cause: cause.into() },
            ClientError::BadResponse { cause, .. } => SourceError::Corrupt { what, source_name, cause: cause.into() },
            other => SourceError::Unavailable { what, source_name, cause: Cause::new(other) },
        }
    }
}

impl ChunkSource for StoreSource {
    fn manifest<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Manifest, SourceError>> {
        Box::pin(async move { self.client.manifest(image).await.map_err(|e| self.map(format!("image {image}"), e)) })
    }

    fn chunk<'a>(&'a self, hash: &'a ChunkHash, limit: usize) -> BoxFuture<'a, Result<Vec<u8>, SourceError>> {
        Box::pin(async move { self.client.chunk(hash, limit).await.map_err(|e| self.map(format!("chunk {hash}"), e)) })
    }

    fn chunk_range<'a>(
        &'a self,
        hash: &'a ChunkHash,
        chunk_len: u32,
        block: u32,
        offset: u32,
        len: u32,
    ) -> BoxFuture<'a, Result<Option<RangeBlocks>, SourceError>> {
        use std::sync::atomic::Ordering::Relaxed;
        Box::pin(async move {
            if self.no_ranges.load(Relaxed) {
                return Ok(None);
            }
            match self.client.chunk_range(hash, chunk_len, block, offset, len).await {
                Ok(r) => Ok(Some(r)),
                Err(e) if e.is_no_such_endpoint() => {
                    tracing::info!(server = %self.client.base_url(), "image server serves no chunk ranges (an older version): fetching whole chunks from it");
                    self.no_ranges.store(true, Relaxed);
                    Ok(None)
                }
                Err(e) => Err(self.map(format!("chunk {hash} (bytes {offset}..{})", offset + len), e)),
            }
        })
    }

    fn profile<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Option<BootProfile>, SourceError>> {
        Box::pin(async move {
            match self.client.profile(image).await {
                Ok(p) => Ok(Some(p)),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(self.map(format!("boot profile of image {image}"), e)),
            }
        })
    }

    fn put_profile<'a>(&'a self, image: &'a ImageRef, profile: &'a BootProfile) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(
            async move { self.client.put_profile(image, profile).await.map_err(|e| self.map(format!("boot profile of image {image}"), e)) },
        )
    }

    fn hot_pages<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Option<crate::source::ByteStream>, SourceError>> {
        Box::pin(async move {
            match self.client.hot_pages_stream(image).await {
                Ok(b) => {
                    use futures::StreamExt;
                    let this = self.clone();
                    let what = format!("hot pages of image {image}");
                    Ok(Some(b.map(move |r| r.map_err(|e| this.map(what.clone(), e))).boxed()))
                }
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(self.map(format!("hot pages of image {image}"), e)),
            }
        })
    }

    fn put_hot_pages<'a>(&'a self, image: &'a ImageRef, bundle: bytes::Bytes) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(
            async move { self.client.put_hot_pages(image, bundle).await.map_err(|e| self.map(format!("hot pages of image {image}"), e)) },
        )
    }

    fn describe(&self) -> String {
        self.client.base_url().to_string()
    }
}
