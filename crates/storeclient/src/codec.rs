//! Chunk encoding: blake3 of the plain bytes names a chunk; zstd compresses it at rest and on
//! the wire. Decoding always verifies the hash, so a corrupt or substituted chunk never passes.

use vgrid_api::ChunkHash;

/// zstd level for stored chunks: fast to write, decompresses at memory speed.
pub const ZSTD_LEVEL: i32 = 3;

/// zstd level for the chunks of a kernel or initrd at import: read whole by every first boot,
/// so worth compressing harder once (see `import.rs`).
pub const BOOT_FILE_LEVEL: i32 = 15;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {hash}: stored bytes are not valid zstd ({source})")]
    Decompress {
        hash: ChunkHash,
        #[source]
        source: std::io::Error,
    },
    #[error("chunk {hash}: content hashes to {actual}, the chunk is corrupt")]
    HashMismatch { hash: ChunkHash, actual: ChunkHash },
    #[error("chunk {hash}: decompresses to {actual} bytes, more than the {limit}-byte limit")]
    TooLarge { hash: ChunkHash, actual: usize, limit: usize },
}

/// True when every byte is zero (such chunks are never stored).
pub fn is_zero(data: &[u8]) -> bool {
    // Compare in word-sized steps; the compiler vectorises this.
    let (pre, mid, post) = unsafe { data.align_to::<u128>() };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Hashes and compresses a chunk.
pub fn encode(data: &[u8]) -> (ChunkHash, Vec<u8>) {
    let hash = ChunkHash::of(data);
    let z = crate::zstd_ctx::compress(data, ZSTD_LEVEL).expect("zstd compression of an in-memory buffer cannot fail");
    (hash, z)
}

/// Decompresses a stored chunk and verifies it against `hash`.
/// `limit` bounds the decompressed size (the image's chunk size).
pub fn decode(hash: &ChunkHash, stored: &[u8], limit: usize) -> Result<Vec<u8>, ChunkError> {
    let data = decompress(hash, stored, limit)?;
    let actual = ChunkHash::of(&data);
    if actual != *hash {
        return Err(ChunkError::HashMismatch { hash: *hash, actual });
    }
    Ok(data)
}

/// [`decode`], also answering the BLAKE3 chaining values of the chunk's `block`-byte blocks
/// when they are whole subtrees of it ([`crate::tree::geometry_ok`]); the hash is then verified
/// through them (one hashing pass for both).
pub fn decode_with_blocks(
    hash: &ChunkHash,
    stored: &[u8],
    limit: usize,
    block: u32,
) -> Result<(Vec<u8>, Option<Vec<crate::tree::ChainingValue>>), ChunkError> {
    let data = decompress(hash, stored, limit)?;
    if !crate::tree::geometry_ok(block, u32::try_from(data.len()).unwrap_or(u32::MAX)) {
        let actual = ChunkHash::of(&data);
        if actual != *hash {
            return Err(ChunkError::HashMismatch { hash: *hash, actual });
        }
        return Ok((data, None));
    }
    let cvs = crate::tree::block_cvs(&data, block);
    let actual = crate::tree::root_of(&cvs);
    if actual != *hash {
        return Err(ChunkError::HashMismatch { hash: *hash, actual });
    }
    Ok((data, Some(cvs)))
}

/// The plain bytes of a stored chunk, not verified yet.
fn decompress(hash: &ChunkHash, stored: &[u8], limit: usize) -> Result<Vec<u8>, ChunkError> {
    // Size the output buffer from the frame header when it states the content size (every
    // chunk written by `encode` does), so a 256 KiB chunk does not allocate `limit` bytes.
    let capacity = match zstd::zstd_safe::get_frame_content_size(stored) {
        Ok(Some(n)) if n > limit as u64 => return Err(ChunkError::TooLarge { hash: *hash, actual: n as usize, limit }),
        Ok(Some(n)) => n as usize,
        _ => limit,
    };
    crate::zstd_ctx::decompress_bounded(stored, capacity).map_err(|source| ChunkError::Decompress { hash: *hash, source })
}

/// Verifies that a stored chunk decompresses to at most `limit` bytes hashing to `hash`,
/// without keeping the plain bytes (streams them through the hasher). Returns the plain length.
pub fn verify(hash: &ChunkHash, stored: &[u8], limit: usize) -> Result<usize, ChunkError> {
    use std::io::Read;
    let bad = |source| ChunkError::Decompress { hash: *hash, source };
    if let Ok(Some(n)) = zstd::zstd_safe::get_frame_content_size(stored) {
        if n > limit as u64 {
            return Err(ChunkError::TooLarge { hash: *hash, actual: n as usize, limit });
        }
        // The frame states its size (every chunk `encode` wrote): decompressed in one call
        // with this thread's context, then hashed.
        let data = crate::zstd_ctx::decompress_bounded(stored, n as usize).map_err(bad)?;
        let actual = ChunkHash::of(&data);
        if actual != *hash {
            return Err(ChunkError::HashMismatch { hash: *hash, actual });
        }
        return Ok(data.len());
    }
    let dec = zstd::stream::read::Decoder::with_buffer(stored).map_err(bad)?;
    let mut dec = dec.take(limit as u64 + 1);
    let mut hasher = blake3::Hasher::new();
    let mut buf = [0u8; 64 * 1024];
    let mut total = 0usize;
    loop {
        let n = dec.read(&mut buf).map_err(bad)?;
        if n == 0 {
            break;
        }
        total += n;
        if total > limit {
            return Err(ChunkError::TooLarge { hash: *hash, actual: total, limit });
        }
        hasher.update(&buf[..n]);
    }
    let actual = ChunkHash(*hasher.finalize().as_bytes());
    if actual != *hash {
        return Err(ChunkError::HashMismatch { hash: *hash, actual });
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (h, mut z) = encode(&data);
        assert_eq!(decode(&h, &z, 1 << 20).unwrap(), data);
        let n = z.len();
        z[n / 2] ^= 0xff;
        assert!(decode(&h, &z, 1 << 20).is_err());
        let (h2, z2) = encode(b"other");
        assert!(matches!(decode(&h, &z2, 1 << 20), Err(ChunkError::HashMismatch { .. })));
        let _ = h2;
    }

    #[test]
    fn decode_enforces_limit_and_rejects_garbage() {
        let data = vec![7u8; 8192];
        let (h, z) = encode(&data);
        assert!(matches!(decode(&h, &z, 4096), Err(ChunkError::TooLarge { actual: 8192, .. })));
        let e = decode(&h, b"not zstd at all", 4096).unwrap_err();
        assert!(matches!(e, ChunkError::Decompress { .. }) && std::error::Error::source(&e).is_some(), "{e}");
        assert_eq!(decode(&h, &z, 8192).unwrap(), data);
    }

    #[test]
    fn verify_agrees_with_decode() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 7) as u8).collect();
        let (h, z) = encode(&data);
        assert_eq!(verify(&h, &z, 1 << 20).unwrap(), data.len());
        assert!(matches!(verify(&h, &z, 1000), Err(ChunkError::TooLarge { .. })));
        let (_, other) = encode(b"other");
        assert!(matches!(verify(&h, &other, 1 << 20), Err(ChunkError::HashMismatch { .. })));
        assert!(matches!(verify(&h, b"garbage", 1 << 20), Err(ChunkError::Decompress { .. })));
        let mut bad = z.clone();
        let n = bad.len();
        bad[n / 2] ^= 0x55;
        assert!(verify(&h, &bad, 1 << 20).is_err());
        // Bytes after the frame are not accepted by either.
        let mut two = z.clone();
        two.extend_from_slice(&z);
        assert!(verify(&h, &two, 1 << 20).is_err() && decode(&h, &two, 1 << 20).is_err());
    }

    #[test]
    fn decode_with_blocks_verifies_through_the_tree() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
        let (h, z) = encode(&data);
        let (d, cvs) = decode_with_blocks(&h, &z, 1 << 20, 4096).unwrap();
        assert_eq!((d, cvs), (data.clone(), Some(crate::tree::block_cvs(&data, 4096))));
        // Blocks that are not subtrees of it: the plain hash, no chaining values.
        assert_eq!(decode_with_blocks(&h, &z, 1 << 20, 1000).unwrap().1, None);
        let (_, other) = encode(&data[..32768]);
        assert!(matches!(decode_with_blocks(&h, &other, 1 << 20, 4096), Err(ChunkError::HashMismatch { .. })));
        assert!(matches!(decode_with_blocks(&h, &other, 1 << 20, 1000), Err(ChunkError::HashMismatch { .. })));
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&vec![0u8; 4097]));
        let mut v = vec![0u8; 4097];
        v[4096] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }

    proptest::proptest! {
        #[test]
        fn roundtrip_any(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20_000)) {
            let (h, z) = encode(&data);
            proptest::prop_assert_eq!(decode(&h, &z, 20_000).unwrap(), data.clone());
            proptest::prop_assert_eq!(verify(&h, &z, 20_000).unwrap(), data.len());
        }

        #[test]
        fn garbage_never_panics_nor_passes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2_000)) {
            let h = ChunkHash::of(b"some chunk");
            proptest::prop_assert!(decode(&h, &bytes, 1 << 16).is_err());
            proptest::prop_assert!(verify(&h, &bytes, 1 << 16).is_err());
        }
    }
}
