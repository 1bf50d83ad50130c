#![allow(dead_code)]
//! Shared fixture: a real image server on a loopback port over a temp data dir.

use bytes::Bytes;
use std::sync::Arc;
use vgrid_api::{Blob, Boot, ChunkHash, ImageMeta, Manifest};
use vgrid_imagestore::ImageStore;
use vgrid_storeclient::codec;
use vgrid_storeclient::{RetryPolicy, StoreClient};

pub struct Server {
    pub dir: tempfile::TempDir,
    pub store: Arc<ImageStore>,
    pub url: String,
    pub client: StoreClient,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start() -> Server {
    start_with(|s| s).await
}

pub async fn start_with(f: impl FnOnce(ImageStore) -> ImageStore) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    start_full(dir, &data, f).await
}

/// A server whose store lives in `data` (which may be outside `dir`).
pub async fn start_full(dir: tempfile::TempDir, data: &std::path::Path, f: impl FnOnce(ImageStore) -> ImageStore) -> Server {
    let store = Arc::new(f(ImageStore::open_local(data).unwrap()));
    let (addr, task) = vgrid_imagestore::server::spawn(store.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let url = format!("http://{addr}");
    let client =
        StoreClient::with_retry(&url, RetryPolicy { first_backoff: std::time::Duration::from_millis(50), ..Default::default() }).unwrap();
    Server { dir, store, url, client, task }
}

impl Server {
    /// Count of chunk files on disk.
    pub fn chunk_files(&self) -> usize {
        walk(&self.dir.path().join("data/chunks"))
    }
    pub fn chunk_file(&self, h: &ChunkHash) -> std::path::PathBuf {
        let hex = h.to_hex();
        self.dir.path().join("data/chunks").join(&hex[..2]).join(&hex)
    }
}

fn walk(p: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(p) else { return 0 };
    rd.map(|e| {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            walk(&e.path())
        } else {
            1
        }
    })
    .sum()
}

/// Deterministic pseudo-random chunk contents.
pub fn chunk_data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Uploads the given chunks through a session and commits a firmware-boot manifest whose disk
/// is those chunks in order (`None` = zero chunk).
pub async fn upload_image(c: &StoreClient, name: &str, chunk_size: u32, chunks: &[Option<Vec<u8>>]) -> Manifest {
    let id = c.begin_upload().await.unwrap();
    let mut hashes = Vec::new();
    let mut encoded = Vec::new();
    for ch in chunks {
        match ch {
            Some(d) => {
                let (h, z) = codec::encode(d);
                hashes.push(Some(h));
                encoded.push((h, z));
            }
            None => hashes.push(None),
        }
    }
    let all: Vec<ChunkHash> = encoded.iter().map(|(h, _)| *h).collect();
    let missing = c.missing(&id, &all).await.unwrap();
    for (h, z) in &encoded {
        if missing.contains(h) {
            c.put_chunk(&id, h, Bytes::from(z.clone())).await.unwrap();
        }
    }
    let last_len = chunks.last().and_then(|c| c.as_ref()).map(|d| d.len() as u64).unwrap_or(chunk_size as u64);
    let size = (chunks.len() as u64 - 1) * chunk_size as u64 + last_len;
    let m = manifest(name, chunk_size, Blob { size, chunks: hashes });
    c.commit(&id, &m).await.unwrap()
}

pub fn manifest(name: &str, chunk_size: u32, disk: Blob) -> Manifest {
    Manifest {
        schema: 1,
        name: name.into(),
        version: 0,
        created: 0,
        chunk_size,
        disk,
        meta: ImageMeta { os: "test".into(), arch: "x86_64".into(), boot: Boot::Firmware, volume: None },
        parent: None,
        state: None,
    }
}
