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
//! Layout (the whole zstd-compressed, decoded as it streams in): `VGHOTPG1`, page size (u32 LE),
//! chunk size (u32 LE), chunk count (u32 LE); then the table: per chunk its index in the RAM
//! blob (u64 LE), the count of pages sent (u32 LE) and their indices in the chunk (u32 LE
//! each); then per chunk, in table order: one 32-byte chaining value per page of the chunk,
//! then the bytes of the pages sent. A reader knows from the table which pages will come, and
//! uses each chunk's pages as soon as they are verified.

use crate::tree::{root_of, ChainingValue};
use std::collections::HashMap;
use vgrid_api::{Blob, ChunkHash};

/// The page size of hot pages (the guest's and the host's page size).
pub const HOT_PAGE_SIZE: u32 = 4096;
/// Largest decompressed bundle accepted.
pub const MAX_HOT_BYTES: usize = 64 << 20;
const MAGIC: &[u8; 8] = b"VGHOTPG1";
/// zstd level of a bundle: made once per image (in the background after the first restore;
/// 0.44 s of one CPU for a 3 MB bundle), fetched by every later restore before its guest
/// answers: 7% fewer bytes than level 9 (1.08 against 1.17 MB, the sample's bundle).
const LEVEL: i32 = 19;

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
    crate::tree::block_cv(p, page, bytes)
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
        out.extend_from_slice(&(c.pages.len() as u32).to_le_bytes());
        for &p in &c.pages {
            if p as usize >= per {
                return Err(HotPagesError::BadChunk { index: c.index, cause: format!("page {p} is past the chunk's {per} pages") });
            }
            out.extend_from_slice(&p.to_le_bytes());
        }
    }
    for c in chunks {
        for p in 0..per {
            let bytes = &c.data[p * page as usize..(p + 1) * page as usize];
            out.extend_from_slice(&page_cv(p as u32, page, bytes));
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

fn read_exact(r: &mut impl std::io::Read, buf: &mut [u8], what: &str) -> Result<(), HotPagesError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => HotPagesError::Malformed(format!("truncated in {what}")),
        _ => HotPagesError::Malformed(format!("reading {what}: {e}")),
    })
}

fn read_u32(r: &mut impl std::io::Read, what: &str) -> Result<u32, HotPagesError> {
    let mut b = [0u8; 4];
    read_exact(r, &mut b, what)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl std::io::Read, what: &str) -> Result<u64, HotPagesError> {
    let mut b = [0u8; 8];
    read_exact(r, &mut b, what)?;
    Ok(u64::from_le_bytes(b))
}

/// Decodes a bundle as it streams in from `compressed` (zstd), verifying every page against
/// `blob` (the saved RAM, of chunks of `chunk_size` bytes). `on_table` gets the page numbers
/// (offset / page size) the bundle announces, in order, before any page; `on_pages` gets each
/// chunk's pages once verified. Stops at the first error: pages already handed over are
/// verified and good; the rest never come.
pub fn decode_stream(
    compressed: impl std::io::Read,
    blob: &Blob,
    chunk_size: u32,
    mut on_table: impl FnMut(u32, &[u64]),
    mut on_pages: impl FnMut(Vec<(u64, bytes::Bytes)>),
) -> Result<(), HotPagesError> {
    let z = zstd::stream::read::Decoder::new(compressed).map_err(|e| HotPagesError::Malformed(format!("not zstd: {e}")))?;
    // Bounded: at most the pages of the whole saved RAM, plus their tree.
    let mut r = std::io::Read::take(z, MAX_HOT_BYTES as u64);
    let mut magic = [0u8; 8];
    read_exact(&mut r, &mut magic, "the header")?;
    if &magic != MAGIC {
        return Err(HotPagesError::Malformed("wrong magic".into()));
    }
    let page = read_u32(&mut r, "the header")?;
    let chunk = read_u32(&mut r, "the header")?;
    if chunk != chunk_size || !geometry_ok(page, chunk) {
        return Err(HotPagesError::Geometry { page, chunk });
    }
    let per = (chunk / page) as usize;
    let n = read_u32(&mut r, "the header")? as usize;
    if n > blob.chunks.len() {
        return Err(HotPagesError::Malformed(format!("{n} chunks announced, the saved RAM has {}", blob.chunks.len())));
    }
    let mut table: Vec<(u64, ChunkHash, Vec<u32>)> = Vec::with_capacity(n);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let index = read_u64(&mut r, "the table")?;
        let bad = |cause: String| HotPagesError::BadChunk { index, cause };
        let hash = match blob.chunks.get(index as usize) {
            None => return Err(bad(format!("the saved RAM has {} chunks", blob.chunks.len()))),
            Some(None) => return Err(bad("it is a zero chunk".into())),
            Some(Some(h)) => *h,
        };
        if blob.chunk_len(chunk_size, index as usize) != chunk_size {
            return Err(bad("a short last chunk".into()));
        }
        if !seen.insert(index) {
            return Err(bad("listed twice".into()));
        }
        let count = read_u32(&mut r, "the table")? as usize;
        if count > per {
            return Err(bad(format!("{count} pages sent, the chunk has {per}")));
        }
        let mut idx = Vec::with_capacity(count);
        for _ in 0..count {
            let p = read_u32(&mut r, "the table")?;
            if p as usize >= per || idx.contains(&p) {
                return Err(bad(format!("page {p} is past the chunk's {per} pages or listed twice")));
            }
            idx.push(p);
        }
        table.push((index, hash, idx));
    }
    let announced: Vec<u64> = table.iter().flat_map(|(i, _, ps)| ps.iter().map(move |&p| i * per as u64 + p as u64)).collect();
    on_table(page, &announced);
    let mut cv_bytes = vec![0u8; per * 32];
    for (index, hash, idx) in table {
        read_exact(&mut r, &mut cv_bytes, "chaining values")?;
        let cvs: Vec<ChainingValue> = cv_bytes.chunks(32).map(|c| c.try_into().unwrap()).collect();
        // A chunk of one page is its own root: the page must hash to the chunk's hash.
        if per > 1 && root_of(&cvs) != hash {
            return Err(HotPagesError::TreeMismatch { index, hash });
        }
        let mut pages = Vec::with_capacity(idx.len());
        for p in idx {
            let mut bytes = vec![0u8; page as usize];
            read_exact(&mut r, &mut bytes, "page bytes")?;
            let good = if per == 1 { ChunkHash::of(&bytes) == hash } else { page_cv(p, page, &bytes) == cvs[p as usize] };
            if !good {
                return Err(HotPagesError::PageMismatch { index, page: p });
            }
            pages.push((index * per as u64 + p as u64, bytes::Bytes::from(bytes)));
        }
        on_pages(pages);
    }
    let mut rest = [0u8; 1];
    match std::io::Read::read(&mut r, &mut rest) {
        Ok(0) => Ok(()),
        Ok(_) => Err(HotPagesError::Malformed("bytes after the last chunk".into())),
        Err(e) => Err(HotPagesError::Malformed(format!("reading the end: {e}"))),
    }
}

/// Decompresses a whole bundle and verifies every page against `blob` (the saved RAM, of
/// chunks of `chunk_size` bytes). Any mismatch refuses the whole bundle.
pub fn decode(compressed: &[u8], blob: &Blob, chunk_size: u32) -> Result<HotPages, HotPagesError> {
    let mut out = HotPages::default();
    decode_stream(compressed, blob, chunk_size, |ps, _| out.page_size = ps, |pages| out.pages.extend(pages))?;
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
            let cvs: Vec<_> =
                (0..per).map(|p| page_cv(p, HOT_PAGE_SIZE, &d[(p * HOT_PAGE_SIZE) as usize..((p + 1) * HOT_PAGE_SIZE) as usize])).collect();
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
        let blob = blob_of(std::slice::from_ref(&real), cs);
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
    fn a_stream_announces_its_pages_first_and_keeps_what_verified_before_a_bad_chunk() {
        let cs = 65536u32;
        let chunks = vec![data(1, cs as usize), data(2, cs as usize)];
        let blob = blob_of(&chunks, cs);
        let mut forged = chunks[1].clone();
        forged[0] ^= 1;
        let z = encode(
            HOT_PAGE_SIZE,
            cs,
            &[HotChunk { index: 0, data: &chunks[0], pages: vec![2, 1] }, HotChunk { index: 1, data: &forged, pages: vec![0] }],
        )
        .unwrap();
        let events = std::cell::RefCell::new(Vec::new());
        let r = decode_stream(
            &z[..],
            &blob,
            cs,
            |ps, announced| events.borrow_mut().push(format!("table {ps} {announced:?}")),
            |pages| events.borrow_mut().push(format!("pages {:?}", pages.iter().map(|p| p.0).collect::<Vec<_>>())),
        );
        assert_eq!(r, Err(HotPagesError::TreeMismatch { index: 1, hash: blob.chunks[1].unwrap() }));
        assert_eq!(events.into_inner(), vec!["table 4096 [2, 1, 16]".to_string(), "pages [2, 1]".to_string()]);
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
