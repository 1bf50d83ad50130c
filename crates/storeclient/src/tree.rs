//! BLAKE3 subtrees of a chunk: verify part of a chunk against the chunk's hash.
//!
//! A block of 2^k × 1 KiB at an offset aligned to its size is a whole subtree of BLAKE3's tree,
//! so the chaining values (CVs) of all of a chunk's blocks merge to the chunk's hash, and each
//! block's bytes hash to its CV. A reader holding the chunk's hash (from the manifest) can then
//! verify any run of blocks with the CVs of every block: the CVs must merge to the hash, the
//! bytes must hash to their CVs. Used by the hot-page bundles (pages of a saved RAM) and by
//! ranged chunk reads (`GET /chunks/{hash}/range`, see [`encode_range`] / [`decode_range`]).

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};
use vgrid_api::ChunkHash;

pub use blake3::hazmat::ChainingValue;

/// zstd level of a ranged answer (made per request: fast).
const RANGE_LEVEL: i32 = 1;

/// Why a ranged answer or a set of blocks was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("chunk {hash}: blocks of {block} bytes in a chunk of {chunk_len} bytes are not whole BLAKE3 subtrees (the block a power of two of at least 1 KiB, the chunk a power of two at least twice the block)")]
    Geometry { hash: ChunkHash, block: u32, chunk_len: u32 },
    #[error("chunk {hash}: range of {len} bytes at {offset} is not whole {block}-byte blocks inside the {chunk_len}-byte chunk")]
    Range { hash: ChunkHash, offset: u32, len: u32, block: u32, chunk_len: u32 },
    #[error("chunk {hash}: ranged answer is not valid: {cause}")]
    Malformed { hash: ChunkHash, cause: String },
    #[error("chunk {hash}: the block chaining values do not merge to the chunk's hash")]
    TreeMismatch { hash: ChunkHash },
    #[error("chunk {hash}: block {block} does not hash to its chaining value")]
    BlockMismatch { hash: ChunkHash, block: u32 },
}

/// Whether blocks of `block` bytes are whole subtrees of a chunk of `chunk_len` bytes, at
/// least two of them (a chunk of one block is its own root: verify it whole).
pub fn geometry_ok(block: u32, chunk_len: u32) -> bool {
    block.is_power_of_two() && chunk_len.is_power_of_two() && block as usize >= blake3::CHUNK_LEN && chunk_len > block
}

/// Checks that `[offset, offset+len)` is whole blocks inside a chunk of `chunk_len` bytes.
pub fn check_range(hash: &ChunkHash, chunk_len: u32, block: u32, offset: u32, len: u32) -> Result<(), TreeError> {
    if !geometry_ok(block, chunk_len) {
        return Err(TreeError::Geometry { hash: *hash, block, chunk_len });
    }
    let ok = len > 0 && offset.is_multiple_of(block) && len.is_multiple_of(block) && offset as u64 + len as u64 <= chunk_len as u64;
    if !ok {
        return Err(TreeError::Range { hash: *hash, offset, len, block, chunk_len });
    }
    Ok(())
}

/// The chaining value of block `index` (of `block` bytes) within its chunk.
pub fn block_cv(index: u32, block: u32, bytes: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index as u64 * block as u64);
    h.update(bytes);
    h.finalize_non_root()
}

/// The CVs of every block of `data` (a whole chunk, `geometry_ok`).
pub fn block_cvs(data: &[u8], block: u32) -> Vec<ChainingValue> {
    data.chunks(block as usize).enumerate().map(|(i, b)| block_cv(i as u32, block, b)).collect()
}

/// The root hash of a chunk made of `cvs.len()` (a power of two, at least 2) whole blocks.
pub fn root_of(cvs: &[ChainingValue]) -> ChunkHash {
    assert!(cvs.len() >= 2 && cvs.len().is_power_of_two(), "root_of needs a power of two of at least 2 subtrees");
    let mut level: Vec<ChainingValue> = cvs.to_vec();
    while level.len() > 2 {
        level = level.chunks(2).map(|p| merge_subtrees_non_root(&p[0], &p[1], Mode::Hash)).collect();
    }
    ChunkHash(*merge_subtrees_root(&level[0], &level[1], Mode::Hash).as_bytes())
}

/// Verifies `bytes`, whole blocks starting at block `first`, against `hash` with the CVs of
/// every block of the chunk: the CVs must merge to `hash` and each block hash to its CV.
pub fn verify_blocks(hash: &ChunkHash, block: u32, cvs: &[ChainingValue], first: u32, bytes: &[u8]) -> Result<(), TreeError> {
    let n = bytes.len().checked_div(block as usize).unwrap_or(usize::MAX);
    if block == 0
        || cvs.len() < 2
        || !cvs.len().is_power_of_two()
        || !bytes.len().is_multiple_of(block as usize)
        || first as usize + n > cvs.len()
    {
        return Err(TreeError::Malformed {
            hash: *hash,
            cause: format!("{} bytes at block {first} with {} chaining values of {block}-byte blocks", bytes.len(), cvs.len()),
        });
    }
    if root_of(cvs) != *hash {
        return Err(TreeError::TreeMismatch { hash: *hash });
    }
    for (k, b) in bytes.chunks(block as usize).enumerate() {
        let i = first + k as u32;
        if block_cv(i, block, b) != cvs[i as usize] {
            return Err(TreeError::BlockMismatch { hash: *hash, block: i });
        }
    }
    Ok(())
}

/// The answer to a ranged read of chunk `data` (whole, verified): zstd of the CVs of all of
/// its `block`-byte blocks (32 bytes each) followed by the bytes of `[offset, offset+len)`.
pub fn encode_range(hash: &ChunkHash, data: &[u8], block: u32, offset: u32, len: u32) -> Result<Vec<u8>, TreeError> {
    let chunk_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    check_range(hash, chunk_len, block, offset, len)?;
    encode_range_with(hash, data, &block_cvs(data, block), block, offset, len)
}

/// [`encode_range`] with the chunk's block CVs at hand (e.g. from
/// [`crate::codec::decode_with_blocks`]).
pub fn encode_range_with(
    hash: &ChunkHash,
    data: &[u8],
    cvs: &[ChainingValue],
    block: u32,
    offset: u32,
    len: u32,
) -> Result<Vec<u8>, TreeError> {
    let chunk_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    check_range(hash, chunk_len, block, offset, len)?;
    if cvs.len() != (chunk_len / block) as usize {
        return Err(TreeError::Malformed { hash: *hash, cause: format!("{} chaining values for {} blocks", cvs.len(), chunk_len / block) });
    }
    let mut plain = Vec::with_capacity(cvs.len() * 32 + len as usize);
    for cv in cvs {
        plain.extend_from_slice(cv);
    }
    plain.extend_from_slice(&data[offset as usize..(offset + len) as usize]);
    crate::zstd_ctx::compress(&plain, RANGE_LEVEL).map_err(|e| TreeError::Malformed { hash: *hash, cause: format!("compressing: {e}") })
}

/// Verified blocks of a chunk: the CVs of every block of the chunk and the bytes of a run of
/// blocks.
#[derive(Debug, Clone)]
pub struct RangeBlocks {
    pub cvs: Vec<ChainingValue>,
    pub data: Vec<u8>,
}

/// Decodes and verifies an answer of [`encode_range`] for chunk `hash` of `chunk_len` bytes.
pub fn decode_range(hash: &ChunkHash, chunk_len: u32, block: u32, offset: u32, len: u32, z: &[u8]) -> Result<RangeBlocks, TreeError> {
    check_range(hash, chunk_len, block, offset, len)?;
    let n = (chunk_len / block) as usize;
    let want = n * 32 + len as usize;
    let plain = crate::zstd_ctx::decompress_bounded(z, want + 1)
        .map_err(|e| TreeError::Malformed { hash: *hash, cause: format!("not zstd: {e}") })?;
    if plain.len() != want {
        return Err(TreeError::Malformed { hash: *hash, cause: format!("{} bytes, expected {want}", plain.len()) });
    }
    let cvs: Vec<ChainingValue> = plain[..n * 32].chunks(32).map(|c| c.try_into().expect("32 bytes")).collect();
    let data = plain[n * 32..].to_vec();
    verify_blocks(hash, block, &cvs, offset / block, &data)?;
    Ok(RangeBlocks { cvs, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(seed as u32) as u8 ^ seed).collect()
    }

    #[test]
    fn block_tree_matches_blake3_of_the_chunk() {
        for (chunk, block) in [(8192u32, 1024u32), (65536, 4096), (262144, 16384), (262144, 131072)] {
            let d = data(3, chunk as usize);
            assert_eq!(root_of(&block_cvs(&d, block)), ChunkHash::of(&d), "chunk {chunk} block {block}");
        }
    }

    #[test]
    fn a_range_roundtrips_and_a_tampered_byte_or_cv_is_refused() {
        let (cs, block) = (262144u32, 16384u32);
        let d = data(5, cs as usize);
        let h = ChunkHash::of(&d);
        let z = encode_range(&h, &d, block, 3 * block, 2 * block).unwrap();
        let r = decode_range(&h, cs, block, 3 * block, 2 * block, &z).unwrap();
        assert_eq!(r.data, &d[3 * block as usize..5 * block as usize]);
        assert_eq!(r.cvs.len(), 16);
        // Another chunk's hash: the tree does not merge to it.
        let other = ChunkHash::of(b"other");
        assert_eq!(decode_range(&other, cs, block, 3 * block, 2 * block, &z).unwrap_err(), TreeError::TreeMismatch { hash: other });
        // A byte of the range changed: its block is refused.
        let mut plain = zstd::bulk::decompress(&z, 1 << 20).unwrap();
        let mut bad = plain.clone();
        bad[16 * 32 + block as usize + 7] ^= 1;
        let e = decode_range(&h, cs, block, 3 * block, 2 * block, &zstd::bulk::compress(&bad, 1).unwrap()).unwrap_err();
        assert_eq!(e, TreeError::BlockMismatch { hash: h, block: 4 });
        // A CV changed (of a block not sent, too): the tree no longer merges to the hash.
        plain[9 * 32] ^= 1;
        let e = decode_range(&h, cs, block, 3 * block, 2 * block, &zstd::bulk::compress(&plain, 1).unwrap()).unwrap_err();
        assert_eq!(e, TreeError::TreeMismatch { hash: h });
        // Forged CVs that merge to another root with forged bytes: refused at the root.
        let mut forged = d.clone();
        forged[3 * block as usize] ^= 0x80;
        let z = encode_range(&h, &forged, block, 3 * block, block).unwrap();
        assert_eq!(decode_range(&h, cs, block, 3 * block, block, &z).unwrap_err(), TreeError::TreeMismatch { hash: h });
        // Truncated, garbage, too long.
        assert!(matches!(decode_range(&h, cs, block, 3 * block, 2 * block, b"junk"), Err(TreeError::Malformed { .. })));
        let z = encode_range(&h, &d, block, 3 * block, 2 * block).unwrap();
        assert!(matches!(decode_range(&h, cs, block, 3 * block, block, &z), Err(TreeError::Malformed { .. })));
    }

    #[test]
    fn unaligned_or_outside_ranges_are_refused_naming_the_chunk() {
        let h = ChunkHash::of(b"x");
        for (off, len) in [(1u32, 16384u32), (0, 100), (0, 0), (245760, 32768)] {
            let e = check_range(&h, 262144, 16384, off, len).unwrap_err();
            assert!(matches!(e, TreeError::Range { .. }) && e.to_string().contains(&h.to_hex()), "{e}");
        }
        for (chunk, block) in [(262144u32, 1000u32), (262144, 512), (16384, 16384), (200000, 16384)] {
            assert!(matches!(check_range(&h, chunk, block, 0, block), Err(TreeError::Geometry { .. })), "{chunk} {block}");
        }
        check_range(&h, 262144, 16384, 245760, 16384).unwrap();
    }
}
