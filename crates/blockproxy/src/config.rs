//! The settings of a block proxy.

use std::path::PathBuf;
use std::time::Duration;

/// Settings of a block proxy. [`ProxyConfig::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Directory of the host chunk cache (locked while the proxy runs).
    pub cache_dir: PathBuf,
    /// Size bound of the cache in bytes.
    pub cache_max_bytes: u64,
    /// Most chunk files kept open for serving (default 1024).
    pub max_open_files: usize,
    /// A chunk fetch (including the source's retries) that takes longer fails (default 60 s).
    pub fetch_timeout: Duration,
    /// Chunks fetched ahead of a sequential reader; 0 disables readahead (default 8).
    pub readahead_chunks: usize,
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
    /// Recording window of the boot profile of a warm image with a saved RAM (default 3 s).
    pub ram_profile_window: Duration,
    /// Chunks of a saved RAM fetched at once in the background while its lazily restored
    /// guest runs, from 3 s after it started (default 2, `$VGRID_RAM_PREFETCH`; 0: only what the
    /// guest touches).
    pub ram_prefetch_concurrency: usize,
}

impl ProxyConfig {
    pub fn new(cache_dir: impl Into<PathBuf>, cache_max_bytes: u64) -> Self {
        ProxyConfig {
            cache_dir: cache_dir.into(),
            cache_max_bytes,
            max_open_files: 1024,
            fetch_timeout: Duration::from_secs(60),
            readahead_chunks: 8,
            record_profiles: true,
            profile_window: Duration::from_secs(60),
            profile_max_chunks: 4096,
            prefetch_profiles: true,
            profile_prefetch_concurrency: 4,
            pull_concurrency: 8,
            ram_profile_window: Duration::from_secs(3),
            ram_prefetch_concurrency: std::env::var("VGRID_RAM_PREFETCH").ok().and_then(|v| v.parse().ok()).unwrap_or(2),
        }
    }
}
