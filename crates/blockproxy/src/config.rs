//! The settings of a block proxy.

use std::path::PathBuf;
use std::time::Duration;

/// The default bound of a read waiting for its image servers ([`ProxyConfig::fetch_timeout`]).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(600);

/// The default block size of ranged fetches ([`ProxyConfig::range_block`]).
pub const DEFAULT_RANGE_BLOCK: u32 = 16 * 1024;

/// Settings of a block proxy. [`ProxyConfig::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Directory of the host chunk cache (locked while the proxy runs).
    pub cache_dir: PathBuf,
    /// Size bound of the cache in bytes.
    pub cache_max_bytes: u64,
    /// Most chunk files kept open for serving (default [`default_max_open_files`]).
    pub max_open_files: usize,
    /// How long a read whose chunk cannot be fetched (every image server unreachable) waits
    /// for one to answer, trying them again with backoff (0.2 s doubling to 5 s), before the
    /// guest gets an I/O error: the hard mount's bound (default 10 min; `None`: for ever).
    /// Corrupt bytes and a chunk no reachable server has fail at once.
    pub fetch_timeout: Option<Duration>,
    /// One try of a fetch (every image server in turn, each with its client's retries) during
    /// which nothing at all comes from the image servers for this long (neither its bytes nor
    /// another fetch's) counts as an outage and is tried again (default 60 s). A slow try on a
    /// link that moves goes on: fetches sharing a thin link finish one after the other.
    pub fetch_attempt_timeout: Duration,
    /// Chunks fetched ahead of a sequential reader; 0 disables readahead (default 8).
    pub readahead_chunks: usize,
    /// Block size of ranged fetches (default 16 KiB, `$VGRID_RANGE_BLOCK`; 0: always whole chunks). A random read
    /// that misses the cache fetches only the blocks of its chunk it covers (verified through
    /// the chunk's BLAKE3 tree) instead of the whole chunk; sequential readers, prefetches and
    /// pulls fetch whole chunks. A power of two of at least 1 KiB.
    pub range_block: u32,
    /// Record a boot profile when an image without one is opened (default true).
    pub record_profiles: bool,
    /// How long a boot profile records after the export opens (default 60 s).
    pub profile_window: Duration,
    /// Most chunks in a boot profile (default 4096).
    pub profile_max_chunks: usize,
    /// Prefetch an image's boot profile when its export opens (default true).
    pub prefetch_profiles: bool,
    /// Concurrent fetches of a boot profile prefetch (default 4).
    pub profile_prefetch_concurrency: usize,
    /// Concurrent chunk fetches of a pull (default 8).
    pub pull_concurrency: usize,
    /// Chunk fetches in flight at once, for every reader together (default 16): a thin link
    /// shared by more fetches than that gives each too little to finish within
    /// `fetch_attempt_timeout`; the others wait for a slot, which does not count as a try.
    pub fetch_concurrency: usize,
    /// Recording window of the boot profile of a warm image with a saved RAM (default 3 s).
    pub ram_profile_window: Duration,
    /// Chunks of a saved RAM fetched at once in the background while its lazily restored
    /// guest runs, from 3 s after it started (default 2, `$VGRID_RAM_PREFETCH`; 0: only what the
    /// guest touches).
    pub ram_prefetch_concurrency: usize,
    /// How long a connection whose client sends each request right after the last reply (one
    /// read in flight at a time) polls for the next one before its task sleeps (default 50 us,
    /// `$VGRID_BUSY_POLL_US`; zero: never). It halves the latency of such reads on a VM host,
    /// at the price of up to this much CPU per request, only while the client keeps the pace.
    pub busy_poll: Duration,
    /// Connections that may poll at once (default half the CPUs, at least one).
    pub busy_pollers: usize,
}

/// Chunk files a proxy keeps open by default: half of this process's open-file limit (the rest
/// is for sockets, QEMU's descriptors and the like), between 256 and 65,536. A random reader of
/// an image with more chunks than this opens a file per read (`vgrid` raises its soft limit to
/// the hard one at start).
pub fn default_max_open_files() -> usize {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 { r.rlim_cur } else { 1024 };
    (soft.min(1 << 20) as usize / 2).clamp(256, 65_536)
}

/// `$VGRID_RANGE_BLOCK` if set and valid (0, or a power of two of at least 1 KiB), else the
/// default (an invalid value is logged, naming it).
fn range_block_from_env() -> u32 {
    let Ok(v) = std::env::var("VGRID_RANGE_BLOCK") else { return DEFAULT_RANGE_BLOCK };
    match v.trim().parse::<u32>() {
        Ok(b) if b == 0 || (b >= 1024 && b.is_power_of_two()) => b,
        _ => {
            tracing::warn!("VGRID_RANGE_BLOCK={v:?} is not 0 or a power of two of at least 1024 bytes: using {DEFAULT_RANGE_BLOCK}");
            DEFAULT_RANGE_BLOCK
        }
    }
}

impl ProxyConfig {
    pub fn new(cache_dir: impl Into<PathBuf>, cache_max_bytes: u64) -> Self {
        ProxyConfig {
            cache_dir: cache_dir.into(),
            cache_max_bytes,
            max_open_files: default_max_open_files(),
            fetch_timeout: Some(DEFAULT_FETCH_TIMEOUT),
            fetch_attempt_timeout: Duration::from_secs(60),
            readahead_chunks: 8,
            range_block: range_block_from_env(),
            record_profiles: true,
            profile_window: Duration::from_secs(60),
            profile_max_chunks: 4096,
            prefetch_profiles: true,
            profile_prefetch_concurrency: 4,
            pull_concurrency: 8,
            fetch_concurrency: 16,
            ram_profile_window: Duration::from_secs(3),
            ram_prefetch_concurrency: std::env::var("VGRID_RAM_PREFETCH").ok().and_then(|v| v.parse().ok()).unwrap_or(2),
            busy_poll: Duration::from_micros(std::env::var("VGRID_BUSY_POLL_US").ok().and_then(|v| v.parse().ok()).unwrap_or(50)),
            busy_pollers: std::thread::available_parallelism().map_or(1, |n| n.get() / 2),
        }
    }
}
