//! Counters of the host chunk cache, readable while the proxy runs.

use crate::wait::ChunkWait;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Number of log2 latency buckets (bucket `i` holds fetches that took < 2^i microseconds).
const BUCKETS: usize = 40;

pub(crate) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub coalesced: AtomicU64,
    pub fetches: AtomicU64,
    pub fetch_errors: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub evictions: AtomicU64,
    pub disk_full_evictions: AtomicU64,
    pub verify_failures: AtomicU64,
    pub prefetched: AtomicU64,
    latency_sum_us: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            fetch_errors: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            disk_full_evictions: AtomicU64::new(0),
            verify_failures: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            latency_sum_us: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub fn record_fetch(&self, took: Duration, bytes: u64) {
        let us = took.as_micros().min(u64::MAX as u128) as u64;
        self.fetches.fetch_add(1, Relaxed);
        self.bytes_fetched.fetch_add(bytes, Relaxed);
        self.latency_sum_us.fetch_add(us, Relaxed);
        let bucket = (64 - us.leading_zeros() as usize).min(BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Relaxed);
    }

    fn percentile(&self, counts: &[u64; BUCKETS], total: u64, p: f64) -> f64 {
        if total == 0 {
            return 0.0;
        }
        let want = ((total as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                // Upper bound of the bucket: fetches in bucket i took < 2^i µs.
                return (1u64 << i) as f64 / 1000.0;
            }
        }
        (1u64 << (BUCKETS - 1)) as f64 / 1000.0
    }

    pub fn snapshot(&self, bytes_cached: u64, chunks_cached: u64, max_bytes: u64) -> CacheStats {
        let counts: [u64; BUCKETS] = std::array::from_fn(|i| self.latency[i].load(Relaxed));
        let fetches = self.fetches.load(Relaxed);
        let sum = self.latency_sum_us.load(Relaxed);
        CacheStats {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            coalesced: self.coalesced.load(Relaxed),
            fetches,
            fetch_errors: self.fetch_errors.load(Relaxed),
            bytes_fetched: self.bytes_fetched.load(Relaxed),
            fetch_latency_mean_ms: if fetches == 0 { 0.0 } else { sum as f64 / fetches as f64 / 1000.0 },
            fetch_latency_p50_ms: self.percentile(&counts, fetches, 0.50),
            fetch_latency_p99_ms: self.percentile(&counts, fetches, 0.99),
            fetch_latency_histogram: counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| LatencyBucket { below_ms: (1u64 << i) as f64 / 1000.0, count: *c })
                .collect(),
            bytes_cached,
            chunks_cached,
            max_bytes,
            evictions: self.evictions.load(Relaxed),
            disk_full_evictions: self.disk_full_evictions.load(Relaxed),
            verify_failures: self.verify_failures.load(Relaxed),
            unverified: 0,
            prefetched: self.prefetched.load(Relaxed),
            fetch_waits: 0,
            waiting_now: 0,
            longest_wait_ms: 0,
            waiting: Vec::new(),
        }
    }
}

/// One bucket of the fetch latency histogram.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencyBucket {
    /// Fetches in this bucket took less than this many milliseconds (and at least half of it).
    pub below_ms: f64,
    pub count: u64,
}

/// A snapshot of the host chunk cache's counters (since the proxy started) and contents.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CacheStats {
    /// Chunk lookups served from the cache.
    pub hits: u64,
    /// Chunk lookups that had to wait for a fetch (their own or a coalesced one).
    pub misses: u64,
    /// Misses that joined a fetch already in flight for the same chunk.
    pub coalesced: u64,
    /// Chunk fetches from image servers that succeeded.
    pub fetches: u64,
    /// Chunk fetches that failed (after the source's retries) or returned bad bytes.
    pub fetch_errors: u64,
    /// Plain (uncompressed) bytes of fetched chunks.
    pub bytes_fetched: u64,
    pub fetch_latency_mean_ms: f64,
    /// Upper bound of the histogram bucket holding the median fetch.
    pub fetch_latency_p50_ms: f64,
    /// Upper bound of the histogram bucket holding the 99th percentile fetch.
    pub fetch_latency_p99_ms: f64,
    /// Non-empty log2 buckets of fetch latency.
    pub fetch_latency_histogram: Vec<LatencyBucket>,
    /// Bytes of chunks now in the cache.
    pub bytes_cached: u64,
    /// Chunks now in the cache.
    pub chunks_cached: u64,
    /// Size bound of the cache: the configured one, or lower once the cache's file system
    /// filled up first.
    pub max_bytes: u64,
    /// Chunks evicted to stay within `max_bytes`.
    pub evictions: u64,
    /// Of `evictions`, those made because the cache's file system was full.
    pub disk_full_evictions: u64,
    /// Cached chunk files found damaged after a restart (by the check at start or a first
    /// read: truncated, overwritten, empty or misplaced) and dropped.
    pub verify_failures: u64,
    /// Chunk files found at start that are not verified yet (the check at start runs in the
    /// background; 0 once it is done).
    pub unverified: u64,
    /// Chunks fetched by readahead or boot-profile prefetch.
    pub prefetched: u64,
    /// Chunk fetches of guests' reads that waited for unreachable image servers (each
    /// counted once, however many reads shared it). The block proxy fills these four in;
    /// [`crate::ChunkCache::stats`] leaves them empty.
    pub fetch_waits: u64,
    /// Chunk fetches waiting now.
    pub waiting_now: u64,
    /// The longest wait so far (ended or not), in milliseconds.
    pub longest_wait_ms: u64,
    /// The fetches waiting now: which image and chunk, which servers failed, for how long.
    pub waiting: Vec<ChunkWait>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_from_histogram() {
        let c = Counters::default();
        for _ in 0..98 {
            c.record_fetch(Duration::from_micros(900), 10);
        }
        c.record_fetch(Duration::from_millis(100), 10);
        c.record_fetch(Duration::from_millis(100), 10);
        let s = c.snapshot(0, 0, 0);
        assert_eq!(s.fetches, 100);
        assert_eq!(s.bytes_fetched, 1000);
        assert_eq!(s.fetch_latency_p50_ms, 1.024);
        assert_eq!(s.fetch_latency_p99_ms, 131.072);
        assert_eq!(s.fetch_latency_histogram.iter().map(|b| b.count).sum::<u64>(), 100);
    }
}
