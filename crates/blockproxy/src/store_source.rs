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
                // A refusal of the range itself (not of the chunk: that is a 404, and access is
                // the same for the whole chunk): read the whole chunk instead of waiting.
                Err(e) if e.status().is_some_and(|s| (400..500).contains(&s) && s != 404) => {
                    tracing::debug!(server = %self.client.base_url(), chunk = %hash, "ranged read refused, reading the whole chunk: {e}");
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
    fn quiet_for(&self) -> Option<std::time::Duration> {
        self.client.quiet_for()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP server answering every request with `status` and JSON `{"error": message}`;
    /// counts the requests.
    async fn answering(status: &'static str, message: &'static str) -> (String, Arc<AtomicU32>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let n = Arc::new(AtomicU32::new(0));
        let count = n.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        let Ok(k) = s.read(&mut buf).await else { return };
                        if k == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..k]);
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let body = format!("{{\"error\":\"{message}\"}}");
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(format!("{head}{body}").as_bytes()).await;
                });
            }
        });
        (url, n)
    }

    /// An older image server (no ranged endpoint): whole chunks, and it is not asked again; a
    /// refused range: the whole chunk; a chunk it lacks: not found (the next server is tried).
    #[tokio::test]
    async fn servers_without_ranges_get_whole_chunk_reads() {
        let h = ChunkHash::of(b"x");
        let (url, n) = answering("404 Not Found", "no such endpoint: /store/v1/chunks/x/range").await;
        let s = StoreSource::from_url(&url).unwrap();
        assert!(s.chunk_range(&h, 65536, 16384, 0, 16384).await.unwrap().is_none());
        assert!(s.chunk_range(&h, 65536, 16384, 16384, 16384).await.unwrap().is_none());
        assert_eq!(n.load(Ordering::SeqCst), 1, "asked again after it said it has no ranges");

        let (url, n) = answering("400 Bad Request", "chunk x: range refused").await;
        let s = StoreSource::from_url(&url).unwrap();
        assert!(s.chunk_range(&h, 65536, 16384, 0, 16384).await.unwrap().is_none());
        assert!(s.chunk_range(&h, 65536, 16384, 0, 16384).await.unwrap().is_none());
        assert_eq!(n.load(Ordering::SeqCst), 2, "a refusal is not remembered");

        let (url, _) = answering("404 Not Found", "chunk x not found").await;
        let e = StoreSource::from_url(&url).unwrap().chunk_range(&h, 65536, 16384, 0, 16384).await.unwrap_err();
        assert!(e.is_not_found(), "{e}");
    }
}
