//! The chunks ranged reads were served from lately, read, decompressed and verified once, with
//! the chaining values of their blocks. A booting guest reads most chunks it touches in
//! several pieces (files come in readahead-sized runs, and metadata near them), and without
//! this every piece read the chunk object again, decompressed all of it and hashed all of it
//! to answer a few KiB (a 4 KiB range request of a 256 KiB chunk: ~0.2 ms of the image
//! server's CPU). Bounded in bytes, least recently used first out; a chunk that garbage
//! collection deletes is dropped with everything else.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use vgrid_api::ChunkHash;
use vgrid_storeclient::tree::ChainingValue;

/// A verified chunk and the chaining values of its `block`-byte blocks.
pub(crate) struct Decoded {
    pub(crate) data: Vec<u8>,
    pub(crate) cvs: Vec<ChainingValue>,
}

impl Decoded {
    fn bytes(&self) -> usize {
        self.data.len() + 32 * self.cvs.len()
    }
}

/// The recently decoded chunks, keyed by hash and block size (the chaining values depend on
/// it).
pub(crate) struct Recent {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<(ChunkHash, u32), (Arc<Decoded>, u64)>,
    order: BTreeMap<u64, (ChunkHash, u32)>,
    tick: u64,
    bytes: usize,
}

impl Recent {
    pub(crate) fn new(max_bytes: usize) -> Recent {
        Recent { max_bytes, inner: Mutex::default() }
    }

    pub(crate) fn get(&self, hash: &ChunkHash, block: u32) -> Option<Arc<Decoded>> {
        let mut g = self.inner.lock().unwrap();
        let g = &mut *g;
        g.tick += 1;
        let (d, tick) = g.map.get_mut(&(*hash, block))?;
        g.order.remove(tick);
        *tick = g.tick;
        g.order.insert(g.tick, (*hash, block));
        Some(d.clone())
    }

    /// Keeps `d` (verified against `hash`), dropping the least recently used beyond the bound.
    pub(crate) fn put(&self, hash: ChunkHash, block: u32, d: Arc<Decoded>) {
        let size = d.bytes();
        if size > self.max_bytes {
            return;
        }
        let mut g = self.inner.lock().unwrap();
        let g = &mut *g;
        g.tick += 1;
        if let Some((old, tick)) = g.map.insert((hash, block), (d, g.tick)) {
            g.order.remove(&tick);
            g.bytes -= old.bytes();
        }
        g.order.insert(g.tick, (hash, block));
        g.bytes += size;
        while g.bytes > self.max_bytes {
            let Some((_, key)) = g.order.pop_first() else { break };
            if let Some((old, _)) = g.map.remove(&key) {
                g.bytes -= old.bytes();
            }
        }
    }

    pub(crate) fn clear(&self) {
        *self.inner.lock().unwrap() = Inner::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(n: usize) -> Arc<Decoded> {
        Arc::new(Decoded { data: vec![7; n], cvs: vec![[0; 32]; 2] })
    }

    #[test]
    fn keeps_the_most_recently_used_within_its_bound() {
        let r = Recent::new(3 * (1000 + 64));
        let h = |i: u8| ChunkHash::of(&[i]);
        for i in 0..3 {
            r.put(h(i), 4096, decoded(1000));
        }
        // Using chunk 0 makes chunk 1 the oldest: it goes when chunk 3 comes.
        assert!(r.get(&h(0), 4096).is_some());
        r.put(h(3), 4096, decoded(1000));
        assert!(r.get(&h(1), 4096).is_none());
        for i in [0, 2, 3] {
            assert!(r.get(&h(i), 4096).is_some(), "chunk {i}");
        }
        // Another block size is another entry; one larger than the bound is not kept.
        assert!(r.get(&h(0), 8192).is_none());
        r.put(h(9), 4096, decoded(10_000));
        assert!(r.get(&h(9), 4096).is_none());
        assert_eq!(r.inner.lock().unwrap().bytes, 3 * 1064);
        r.clear();
        assert!(r.get(&h(0), 4096).is_none());
    }
}
