//! Hot pages of a warm image's saved RAM: the 4 KiB pages a restored guest touched first, sent
//! to the next restoring host in one compressed bundle instead of the whole 64 KiB chunks
//! around them (a restored guest touches about one page in each of some hundreds of chunks).
//!
//! Every page is verified against its chunk's hash in the manifest through BLAKE3's tree: a
//! page of 2^k × 1 KiB at an aligned offset is a whole subtree of its chunk, so the bundle
//! carries, per chunk, the chaining values of all its pages; the pages sent must hash to their
//! chaining values and the chaining values must merge to the chunk's hash. A bundle from a
//! careless or hostile uploader can therefore only be refused, never put wrong bytes in a guest.
//!
//! Layout (the whole zstd-compressed): `VGHOTPG1`, page size (u32 LE), chunk size (u32 LE),
//! chunk count (u32 LE), then per chunk: its index in the RAM blob (u64 LE), one 32-byte
//! chaining value per page of the chunk, the count of pages sent (u32 LE), their indices in the
//! chunk (u32 LE each), then their bytes.

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode};
use std::collections::HashMap;
use vgrid_api::{Blob, ChunkHash};

/// The page size of hot pages (the guest's and the host's page size).
pub const HOT_PAGE_SIZE: u32 = 4096;
/// Largest decompressed bundle accepted.
pub const MAX_HOT_BYTES: usize = 64 << 20;
const MAGIC: &[u8; 8] = b"VGHOTPG1";
/// zstd level of a bundle: made once per image, fetched by every restore.
const LEVEL: i32 = 9;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HotPagesError {
    #[error("hot pages: not a valid bundle: {0}")]
    Malformed(String),
    #[error("hot pages: page size {page} with chunk size {chunk} is not usable (both powers of two, page at least 1 KiB, chunk a multiple of it)")]
    Geometry { page: u32, chunk: u32 },
    #[error("hot pages: chunk {index} is not a full stored chunk of the saved RAM ({cause})")]
    BadChunk { index: u64, cause: String },
    #[error("hot pages: chunk {index}: its page chaining values do not merge to the chunk's hash {hash}")]
    TreeMismatch { index: u64, hash: ChunkHash },
    #[error("hot pages: chunk {index}, page {page}: the bytes do not hash to the page's chaining value")]
    PageMismatch { index: u64, page: u32 },
}

/// Whether pages of `page` bytes are whole BLAKE3 subtrees of chunks of `chunk` bytes.
fn geometry_ok(page: u32, chunk: u32) -> bool {
    page.is_power_of_two() && chunk.is_power_of_two() && page as usize >= blake3::CHUNK_LEN && chunk >= page
}

/// The chaining value of page `p` (of `page` bytes) within its chunk.
fn page_cv(p: u32, page: u32, bytes: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(p as u64 * page as u64);
    h.update(bytes);
    h.finalize_non_root()
}

/// The root hash of a chunk made of `cvs.len()` (a power of two, at least 2) whole pages.
fn root_of(cvs: &[ChainingValue]) -> ChunkHash {
    let mut level: Vec<ChainingValue> = cvs.to_vec();
    while level.len() > 2 {
        level = level.chunks(2).map(|p| merge_subtrees_non_root(&p[0], &p[1], Mode::Hash)).collect();
    }
    ChunkHash(*merge_subtrees_root(&level[0], &level[1], Mode::Hash).as_bytes())
}

/// One chunk of the bundle as [`encode`] takes it: its index in the RAM blob, its plain bytes
/// (a full chunk), and the pages of it to send, in the order wanted.
pub struct HotChunk<'a> {
    pub index: u64,
    pub data: &'a [u8],
    pub pages: Vec<u32>,
}

/// Makes a bundle of pages of `page` bytes out of chunks of `chunk` bytes.
pub fn encode(page: u32, chunk: u32, chunks: &[HotChunk<'_>]) -> Result<Vec<u8>, HotPagesError> {
    if !geometry_ok(page, chunk) {
        return Err(HotPagesError::Geometry { page, chunk });
    }
    let per = (chunk / page) as usize;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&page.to_le_bytes());
    out.extend_from_slice(&chunk.to_le_bytes());
    out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for c in chunks {
        if c.data.len() != chunk as usize {
            return Err(HotPagesError::BadChunk { index: c.index, cause: format!("{} bytes, not {chunk}", c.data.len()) });
        }
        out.extend_from_slice(&c.index.to_le_bytes());
        for p in 0..per {
            let bytes = &c.data[p * page as usize..(p + 1) * page as usize];
            out.extend_from_slice(&page_cv(p as u32, page, bytes));
        }
        out.extend_from_slice(&(c.pages.len() as u32).to_le_bytes());
        for &p in &c.pages {
            if p as usize >= per {
                return Err(HotPagesError::BadChunk { index: c.index, cause: format!("page {p} is past the chunk's {per} pages") });
            }
            out.extend_from_slice(&p.to_le_bytes());
        }
        for &p in &c.pages {
            out.extend_from_slice(&c.data[p as usize * page as usize..(p as usize + 1) * page as usize]);
        }
    }
    zstd::bulk::compress(&out, LEVEL).map_err(|e| HotPagesError::Malformed(format!("compressing: {e}")))
}

/// Verified hot pages: page number in the RAM blob (offset / page size) → its bytes.
#[derive(Debug, Default, Clone)]
pub struct HotPages {
    pub page_size: u32,
    pub pages: HashMap<u64, bytes::Bytes>,
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], HotPagesError> {
        if self.b.len() < n {
            return Err(HotPagesError::Malformed(format!("truncated in {what}")));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u32(&mut self, what: &str) -> Result<u32, HotPagesError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, HotPagesError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
}

/// Decompresses a bundle and verifies every page against `blob` (the saved RAM, of chunks of
/// `chunk_size` bytes). Any mismatch refuses the whole bundle.
pub fn decode(compressed: &[u8], blob: &Blob, chunk_size: u32) -> Result<HotPages, HotPagesError> {
    let plain = zstd::bulk::decompress(compressed, MAX_HOT_BYTES).map_err(|e| HotPagesError::Malformed(format!("not zstd or too large: {e}")))?;
    let mut r = Reader { b: &plain };
    if r.take(MAGIC.len(), "the header")? != MAGIC {
        return Err(HotPagesError::Malformed("wrong magic".into()));
    }
    let page = r.u32("the header")?;
    let chunk = r.u32("the header")?;
    if chunk != chunk_size || !geometry_ok(page, chunk) {
        return Err(HotPagesError::Geometry { page, chunk });
    }
    let per = (chunk / page) as usize;
    let n = r.u32("the header")?;
    let mut out = HotPages { page_size: page, pages: HashMap::new() };
    for _ in 0..n {
        let index = r.u64("a chunk index")?;
        let bad = |cause: String| HotPagesError::BadChunk { index, cause };
        let hash = match blob.chunks.get(index as usize) {
            None => return Err(bad(format!("the saved RAM has {} chunks", blob.chunks.len()))),
            Some(None) => return Err(bad("it is a zero chunk".into())),
            Some(Some(h)) => *h,
        };
        if blob.chunk_len(chunk_size, index as usize) != chunk_size {
            return Err(bad("a short last chunk".into()));
        }
        let cv_bytes = r.take(per * 32, "chaining values")?;
        let cvs: Vec<ChainingValue> = cv_bytes.chunks(32).map(|c| c.try_into().unwrap()).collect();
        let count = r.u32("a page count")? as usize;
        if count > per {
            return Err(bad(format!("{count} pages sent, the chunk has {per}")));
        }
        let mut idx = Vec::with_capacity(count);
        for _ in 0..count {
            let p = r.u32("a page index")?;
            if p as usize >= per {
                return Err(bad(format!("page {p} is past the chunk's {per} pages")));
            }
            idx.push(p);
        }
        // A chunk of one page is its own root: the page must hash to the chunk's hash.
        if per == 1 {
            for _ in &idx {
                let bytes = r.take(page as usize, "page bytes")?;
                if ChunkHash::of(bytes) != hash {
                    return Err(HotPagesError::PageMismatch { index, page: 0 });
                }
                out.pages.insert(index, bytes::Bytes::copy_from_slice(bytes));
            }
            continue;
        }
        if root_of(&cvs) != hash {
            return Err(HotPagesError::TreeMismatch { index, hash });
        }
        for p in idx {
            let bytes = r.take(page as usize, "page bytes")?;
            if page_cv(p, page, bytes) != cvs[p as usize] {
                return Err(HotPagesError::PageMismatch { index, page: p });
            }
            out.pages.insert(index * per as u64 + p as u64, bytes::Bytes::copy_from_slice(bytes));
        }
    }
    if !r.b.is_empty() {
        return Err(HotPagesError::Malformed(format!("{} bytes after the last chunk", r.b.len())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob_of(chunks: &[Vec<u8>], chunk: u32) -> Blob {
        Blob {
            size: chunks.len() as u64 * chunk as u64,
            chunks: chunks.iter().map(|c| if c.iter().all(|&b| b == 0) { None } else { Some(ChunkHash::of(c)) }).collect(),
        }
    }

    fn data(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(seed as u32) as u8 ^ seed).collect()
    }

    #[test]
    fn page_tree_matches_blake3_of_the_chunk() {
        for chunk in [4096u32, 8192, 65536, 262144] {
            let d = data(7, chunk as usize);
            let per = chunk / HOT_PAGE_SIZE;
            if per < 2 {
                continue;
            }
            let cvs: Vec<_> = (0..per).map(|p| page_cv(p, HOT_PAGE_SIZE, &d[(p * HOT_PAGE_SIZE) as usize..((p + 1) * HOT_PAGE_SIZE) as usize])).collect();
            assert_eq!(root_of(&cvs), ChunkHash::of(&d), "chunk size {chunk}");
        }
    }

    #[test]
    fn roundtrip_serves_exactly_the_pages_sent() {
        let cs = 65536u32;
        let chunks = vec![data(1, cs as usize), vec![0; cs as usize], data(2, cs as usize), data(3, cs as usize)];
        let blob = blob_of(&chunks, cs);
        let z = encode(
            HOT_PAGE_SIZE,
            cs,
            &[HotChunk { index: 2, data: &chunks[2], pages: vec![15, 0, 3] }, HotChunk { index: 0, data: &chunks[0], pages: vec![1] }],
        )
        .unwrap();
        let h = decode(&z, &blob, cs).unwrap();
        assert_eq!(h.pages.len(), 4);
        for (chunk, p) in [(2u64, 15u64), (2, 0), (2, 3), (0, 1)] {
            let n = chunk * 16 + p;
            let off = (p * 4096) as usize;
            assert_eq!(&h.pages[&n][..], &chunks[chunk as usize][off..off + 4096], "page {n}");
        }
    }

    #[test]
    fn a_forged_page_or_tree_is_refused() {
        let cs = 65536u32;
        let real = data(9, cs as usize);
        let blob = blob_of(&[real.clone()], cs);
        // A page changed after its chaining value was computed from the real chunk: the page
        // no longer matches. Encode from the forged data: the tree no longer matches the hash.
        let mut forged = real.clone();
        forged[5 * 4096 + 17] ^= 1;
        let z = encode(HOT_PAGE_SIZE, cs, &[HotChunk { index: 0, data: &forged, pages: vec![5] }]).unwrap();
        assert!(matches!(decode(&z, &blob, cs), Err(HotPagesError::TreeMismatch { index: 0, .. })));
        // Real chaining values with a forged page: splice the bytes of the plain bundle.
        let good = encode(HOT_PAGE_SIZE, cs, &[HotChunk { index: 0, data: &real, pages: vec![5] }]).unwrap();
        let mut plain = zstd::bulk::decompress(&good, MAX_HOT_BYTES).unwrap();
        let last = plain.len() - 1;
        plain[last] ^= 0x80;
        let z = zstd::bulk::compress(&plain, 3).unwrap();
        assert!(matches!(decode(&z, &blob, cs), Err(HotPagesError::PageMismatch { index: 0, page: 5 })));
    }

    #[test]
    fn malformed_bundles_are_clear_errors() {
        let cs = 65536u32;
        let real = data(4, cs as usize);
        let blob = blob_of(&[real.clone(), vec![0; cs as usize]], cs);
        assert!(matches!(decode(b"not zstd", &blob, cs), Err(HotPagesError::Malformed(_))));
        let z = zstd::bulk::compress(b"VGHOTPG1\x00\x10", 3).unwrap();
        assert!(matches!(decode(&z, &blob, cs), Err(HotPagesError::Malformed(_))));
        // Past the blob, a zero chunk, another chunk size, trailing bytes, truncation.
        let z = encode(HOT_PAGE_SIZE, cs, &[HotChunk { index: 5, data: &real, pages: vec![0] }]).unwrap();
        assert!(matches!(decode(&z, &blob, cs), Err(HotPagesError::BadChunk { index: 5, .. })));
        let z = encode(HOT_PAGE_SIZE, cs, &[HotChunk { index: 1, data: &real, pages: vec![0] }]).unwrap();
        assert!(matches!(decode(&z, &blob, cs), Err(HotPagesError::BadChunk { index: 1, .. })));
        let z = encode(HOT_PAGE_SIZE, cs, &[HotChunk { index: 0, data: &real, pages: vec![0] }]).unwrap();
        assert!(matches!(decode(&z, &blob, 32768), Err(HotPagesError::Geometry { .. })));
        let mut plain = zstd::bulk::decompress(&z, MAX_HOT_BYTES).unwrap();
        plain.push(0);
        assert!(matches!(decode(&zstd::bulk::compress(&plain, 3).unwrap(), &blob, cs), Err(HotPagesError::Malformed(_))));
        plain.truncate(plain.len() - 100);
        assert!(matches!(decode(&zstd::bulk::compress(&plain, 3).unwrap(), &blob, cs), Err(HotPagesError::Malformed(_))));
        assert!(matches!(encode(3000, cs, &[]), Err(HotPagesError::Geometry { .. })));
    }
}
