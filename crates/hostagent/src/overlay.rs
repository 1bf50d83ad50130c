//! A VM's qcow2 overlay as chunks, what a snapshot ([`crate::save`]) and a volume commit
//! ([`crate::volume`]) share: which ranges the guest wrote (`qemu-img map`), the chunks they
//! touch composed over the parent's (read through the host cache), encoded and uploaded through
//! an image server's upload session; and the guard that keeps one save or commit per VM at a
//! time.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::Deserialize;
use vgrid_api::rest::UploadId;
use vgrid_api::{ChunkHash, ImageRef, Manifest};
use vgrid_storeclient::codec;
use vgrid_storeclient::StoreClient;

use crate::ctx::HostCtx;
use crate::spec::DiskSource;

/// Present in a VM's runtime directory while it is being saved: an agent that adopts a QEMU
/// with it knows a save was cut short by the previous agent's end (see
/// `save::settle_after_restart`).
pub(crate) const SAVING_MARKER: &str = "saving";

/// One line of `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    #[serde(default = "yes")]
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    #[serde(default)]
    pub compressed: bool,
    #[serde(default)]
    pub offset: Option<u64>,
}

fn yes() -> bool {
    true
}

/// A range of the guest disk the overlay itself holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patch {
    /// Guest bytes at `file_offset` in the qcow2 file.
    Data { start: u64, length: u64, file_offset: u64 },
    /// The guest zeroed or discarded this range.
    Zero { start: u64, length: u64 },
}

impl Patch {
    fn range(&self) -> (u64, u64) {
        match *self {
            Patch::Data { start, length, .. } | Patch::Zero { start, length } => (start, start + length),
        }
    }
}

/// The ranges the overlay holds (depth 0), from its `qemu-img map` entries. Compressed
/// clusters (never written by QEMU for a guest) are refused.
pub fn overlay_patches(entries: &[MapEntry]) -> Result<Vec<Patch>, String> {
    let mut out = Vec::new();
    for e in entries.iter().filter(|e| e.depth == 0 && e.present) {
        if e.data {
            match (e.offset, e.compressed) {
                (Some(file_offset), false) => out.push(Patch::Data { start: e.start, length: e.length, file_offset }),
                _ => return Err(format!("overlay range {}+{} is compressed or has no file offset", e.start, e.length)),
            }
        } else if e.zero {
            out.push(Patch::Zero { start: e.start, length: e.length });
        }
    }
    Ok(out)
}

/// Indices of the chunks (of `chunk_size` bytes) that any patch touches.
pub fn touched_chunks(patches: &[Patch], chunk_size: u32) -> Vec<u64> {
    let cs = chunk_size as u64;
    let mut set = std::collections::BTreeSet::new();
    for p in patches {
        let (a, b) = p.range();
        if b > a {
            for i in a / cs..=(b - 1) / cs {
                set.insert(i);
            }
        }
    }
    set.into_iter().collect()
}

/// Lays the patches over `base`, the parent's bytes of chunk `index` (zeros for an elided
/// chunk), reading data patches from the overlay with `read_at(file_offset, buf)`.
pub fn compose_chunk(
    base: &mut [u8],
    index: u64,
    chunk_size: u32,
    patches: &[Patch],
    mut read_at: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let c0 = index * chunk_size as u64;
    let c1 = c0 + base.len() as u64;
    for p in patches {
        let (a, b) = p.range();
        let (lo, hi) = (a.max(c0), b.min(c1));
        if lo >= hi {
            continue;
        }
        let dst = &mut base[(lo - c0) as usize..(hi - c0) as usize];
        match *p {
            Patch::Zero { .. } => dst.fill(0),
            Patch::Data { start, file_offset, .. } => read_at(file_offset + (lo - start), dst)?,
        }
    }
    Ok(())
}

/// The export name (`IMAGE@VERSION`) of an `nbd+unix:///EXPORT?socket=…` disk.
pub fn export_of(disk: &DiskSource) -> Option<ImageRef> {
    match disk {
        DiskSource::Nbd { url } => {
            let rest = url.strip_prefix("nbd+unix:///")?;
            rest.split('?').next()?.parse().ok()
        }
        DiskSource::File { .. } => None,
    }
}

/// The chunks of `parent`'s disk that the qcow2 `overlay` over it touches, each composed:
/// the parent's chunk (read through the host cache) with the overlay's ranges laid over it.
/// The overlay must be quiescent (its guest paused or gone).
pub(crate) async fn compose_touched(ctx: &HostCtx, overlay: &Path, parent: &Manifest) -> Result<BTreeMap<u64, Vec<u8>>, String> {
    let out = tokio::process::Command::new(crate::vm::LaunchOptions::default().qemu_img)
        .args(["map", "-U", "--output=json"])
        .arg(overlay)
        .output()
        .await
        .map_err(|e| format!("qemu-img map {}: {e}", overlay.display()))?;
    if !out.status.success() {
        return Err(format!("qemu-img map {}: {}", overlay.display(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    let entries: Vec<MapEntry> = serde_json::from_slice(&out.stdout).map_err(|e| format!("qemu-img map output: {e}"))?;
    let patches = overlay_patches(&entries)?;
    let file = crate::qemu_user::open_file(overlay).map_err(|e| format!("{}: {e}", overlay.display()))?;
    let mut touched = BTreeMap::new();
    for index in touched_chunks(&patches, parent.chunk_size) {
        if index as usize >= parent.disk.chunks.len() {
            return Err(format!("the overlay holds data past the end of image {}", parent.image_ref()));
        }
        // The base chunk whole (the guest's reads may have fetched only some of its blocks):
        // one try of the image servers, which the upload needs anyway; an outage fails the
        // save now rather than after the fetch timeout with the guest paused.
        let mut buf = ctx
            .proxy()
            .disk_chunk_once(parent, index as usize)
            .await
            .map_err(|e| format!("the base of chunk {index} (the image servers are needed to save): {e}"))?;
        compose_chunk(&mut buf, index, parent.chunk_size, &patches, |off, dst| file.read_exact_at(dst, off))
            .map_err(|e| format!("reading {}: {e}", overlay.display()))?;
        touched.insert(index, buf);
    }
    Ok(touched)
}

/// Hashes (and compresses) chunks in a blocking thread; zero chunks are `None`.
pub(crate) async fn encode_all(chunks: Vec<Vec<u8>>) -> Vec<Option<(ChunkHash, Bytes)>> {
    tokio::task::spawn_blocking(move || {
        chunks
            .into_iter()
            .map(|c| {
                if codec::is_zero(&c) {
                    None
                } else {
                    let (h, z) = codec::encode(&c);
                    Some((h, Bytes::from(z)))
                }
            })
            .collect()
    })
    .await
    .expect("chunk encoding task panicked")
}

/// An upload session on the first image server that opens one.
pub(crate) struct Upload {
    pub(crate) client: StoreClient,
    pub(crate) id: UploadId,
    pub(crate) sent_bytes: u64,
    sent: HashSet<ChunkHash>,
}

impl Upload {
    pub(crate) async fn begin(urls: &[String]) -> Result<Upload, String> {
        let mut errors = Vec::new();
        for url in urls {
            let client = match StoreClient::new(url) {
                Ok(c) => c,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
            match client.begin_upload().await {
                Ok(id) => return Ok(Upload { client, id, sent_bytes: 0, sent: HashSet::new() }),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if errors.is_empty() {
            return Err("this host knows no image server".into());
        }
        Err(format!("no image server accepts an upload: {}", errors.join("; ")))
    }

    /// Uploads those of `chunks` the server lacks.
    pub(crate) async fn send(&mut self, chunks: &[(ChunkHash, Bytes)]) -> Result<(), String> {
        let hashes: Vec<ChunkHash> = chunks.iter().map(|c| c.0).collect();
        let missing: HashSet<ChunkHash> = self.client.missing(&self.id, &hashes).await.map_err(|e| e.to_string())?.into_iter().collect();
        for (h, z) in chunks {
            if missing.contains(h) && self.sent.insert(*h) {
                self.client.put_chunk(&self.id, h, z.clone()).await.map_err(|e| e.to_string())?;
                self.sent_bytes += z.len() as u64;
            }
        }
        Ok(())
    }

    /// Whether this session uploaded chunk `h` already.
    pub(crate) fn sent(&self, h: &ChunkHash) -> bool {
        self.sent.contains(h)
    }

    pub(crate) async fn abort(&self) {
        let _ = self.client.abort_upload(&self.id).await;
    }
}

/// Runtime directories of the VMs being saved: one save per VM at a time (a second one would
/// resume the guest under the first one's migration).
static SAVING: std::sync::Mutex<Option<HashSet<PathBuf>>> = std::sync::Mutex::new(None);

pub(crate) struct SaveGuard(PathBuf);

impl SaveGuard {
    /// Claims the save of the VM in `dir` and leaves [`SAVING_MARKER`] there until dropped.
    pub(crate) fn take(dir: &Path) -> Option<SaveGuard> {
        let mut s = SAVING.lock().unwrap();
        let g = s.get_or_insert_with(HashSet::new).insert(dir.to_path_buf()).then(|| SaveGuard(dir.to_path_buf()))?;
        if let Err(e) = std::fs::write(dir.join(SAVING_MARKER), b"") {
            tracing::warn!(dir = %dir.display(), "cannot mark the save in progress: {e}");
        }
        Some(g)
    }
}

impl Drop for SaveGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0.join(SAVING_MARKER));
        if let Some(s) = SAVING.lock().unwrap().as_mut() {
            s.remove(&self.0);
        }
    }
}

/// Whether the VM in runtime directory `dir` is being saved.
pub fn is_saving(dir: &Path) -> bool {
    SAVING.lock().unwrap().as_ref().is_some_and(|s| s.contains(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(json: &str) -> Vec<MapEntry> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn patches_come_from_depth_zero_only() {
        // Real `qemu-img map` output of an overlay (64 KiB clusters) over a raw base.
        let e = map(
            r#"[{ "start": 0, "length": 524288, "depth": 1, "present": true, "zero": false, "data": true, "compressed": false, "offset": 0},
{ "start": 524288, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 327680},
{ "start": 1048576, "length": 1048576, "depth": 1, "present": true, "zero": true, "data": false, "compressed": false, "offset": 1048576},
{ "start": 2097152, "length": 131072, "depth": 0, "present": true, "zero": true, "data": false, "compressed": false},
{ "start": 3145728, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 393216}]"#,
        );
        let p = overlay_patches(&e).unwrap();
        assert_eq!(
            p,
            vec![
                Patch::Data { start: 524288, length: 65536, file_offset: 327680 },
                Patch::Zero { start: 2097152, length: 131072 },
                Patch::Data { start: 3145728, length: 65536, file_offset: 393216 },
            ]
        );
        assert_eq!(touched_chunks(&p, 256 * 1024), vec![2, 8, 12]);
        assert_eq!(touched_chunks(&p, 1024 * 1024), vec![0, 2, 3]);
        let bad = map(r#"[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": true}]"#);
        assert!(overlay_patches(&bad).is_err());
    }

    #[test]
    fn compose_lays_patches_over_the_base() {
        let overlay: Vec<u8> = (0..200u32).map(|i| (i % 251) as u8 + 1).collect();
        let patches = vec![
            Patch::Data { start: 90, length: 20, file_offset: 100 }, // spans chunks 0 and 1
            Patch::Zero { start: 120, length: 5 },
        ];
        let read = |off: u64, dst: &mut [u8]| {
            dst.copy_from_slice(&overlay[off as usize..off as usize + dst.len()]);
            Ok(())
        };
        let mut c0 = vec![7u8; 100];
        compose_chunk(&mut c0, 0, 100, &patches, read).unwrap();
        assert_eq!(&c0[..90], &[7u8; 90][..]);
        assert_eq!(&c0[90..], &overlay[100..110]);
        let mut c1 = vec![9u8; 50]; // a short last chunk
        compose_chunk(&mut c1, 1, 100, &patches, read).unwrap();
        assert_eq!(&c1[..10], &overlay[110..120]);
        assert_eq!(&c1[10..20], &[9u8; 10][..]);
        assert_eq!(&c1[20..25], &[0u8; 5][..]);
        assert_eq!(&c1[25..], &[9u8; 25][..]);
        assert_eq!(touched_chunks(&patches, 100), vec![0, 1]);
    }

    #[test]
    fn export_names_parse() {
        let d = DiskSource::nbd_unix("/run/x/nbd.sock", "sample@3");
        assert_eq!(export_of(&d), Some(ImageRef { name: "sample".into(), version: Some(3) }));
        assert_eq!(export_of(&DiskSource::raw_file("/tmp/x.img")), None);
    }
}
