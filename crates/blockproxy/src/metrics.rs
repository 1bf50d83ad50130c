//! What the block proxy counts for Prometheus (`vgrid_trust::metrics` serves the page): chunk
//! cache hits and misses, chunk fetches, bytes and fetch latency per image server, NBD reads
//! and their latency, requests read by busy polling.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use vgrid_trust::metrics::{labels, latency_buckets, latency_family, register, HistogramFamily, Labels};

pub(crate) struct Metrics {
    hits: Counter,
    misses: Counter,
    fetches: Family<Labels, Counter>,
    fetch_bytes: Family<Labels, Counter>,
    fetch_seconds: HistogramFamily,
    nbd_reads: Counter,
    nbd_read_bytes: Counter,
    nbd_read_seconds: Histogram,
    nbd_busy_polled: Counter,
}

pub(crate) fn m() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = Metrics {
            hits: Counter::default(),
            misses: Counter::default(),
            fetches: Family::default(),
            fetch_bytes: Family::default(),
            fetch_seconds: latency_family(),
            nbd_reads: Counter::default(),
            nbd_read_bytes: Counter::default(),
            nbd_read_seconds: latency_buckets(),
            nbd_busy_polled: Counter::default(),
        };
        register("vgrid_chunk_cache_hits", "Chunk lookups served from the host chunk cache", m.hits.clone());
        register("vgrid_chunk_cache_misses", "Chunk lookups that waited for a fetch from an image server", m.misses.clone());
        register("vgrid_chunk_fetches", "Chunk fetches from each image server, by result (ok, error)", m.fetches.clone());
        register(
            "vgrid_chunk_fetch_bytes",
            "Bytes of chunks fetched from each image server (plain, after decompression)",
            m.fetch_bytes.clone(),
        );
        register("vgrid_chunk_fetch_seconds", "Latency of chunk fetches from each image server", m.fetch_seconds.clone());
        register("vgrid_nbd_reads", "NBD read requests answered", m.nbd_reads.clone());
        register("vgrid_nbd_read_bytes", "Bytes answered to NBD reads", m.nbd_read_bytes.clone());
        register("vgrid_nbd_read_seconds", "Latency of NBD reads (request to reply)", m.nbd_read_seconds.clone());
        register(
            "vgrid_nbd_busy_polled",
            "NBD requests read by busy polling (their client kept the pace; ProxyConfig::busy_poll)",
            m.nbd_busy_polled.clone(),
        );
        m
    })
}

/// Makes the block proxy's families appear on the page.
pub fn init() {
    m();
}

pub(crate) fn hits(n: u64) {
    m().hits.inc_by(n);
}

pub(crate) fn miss() {
    m().misses.inc();
}

/// A chunk fetch from `server` that took `took` and returned `bytes` (None: failed).
pub(crate) fn fetched(server: &str, took: Duration, bytes: Option<usize>) {
    let m = m();
    let result = if bytes.is_some() { "ok" } else { "error" };
    m.fetches.get_or_create(&labels(&[("server", server), ("result", result)])).inc();
    if let Some(b) = bytes {
        m.fetch_bytes.get_or_create(&labels(&[("server", server)])).inc_by(b as u64);
        m.fetch_seconds.get_or_create(&labels(&[("server", server)])).observe(took.as_secs_f64());
    }
}

pub(crate) fn nbd_read(len: u32, took: Duration) {
    let m = m();
    m.nbd_reads.inc();
    m.nbd_read_bytes.inc_by(len as u64);
    m.nbd_read_seconds.observe(took.as_secs_f64());
}

pub(crate) fn busy_polled() {
    m().nbd_busy_polled.inc();
}

/// NBD requests of this process read by busy polling so far.
pub fn nbd_busy_polled() -> u64 {
    m().nbd_busy_polled.get()
}
