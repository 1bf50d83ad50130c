//! vgrid block proxy: the compute host's data path. It serves images as read-only NBD exports
//! (over unix sockets and TCP) to QEMU and the NBD tools, reading through a size-bounded host
//! chunk cache on local disk that all guests share; misses fetch verified chunks from image
//! servers through a [`ChunkSource`] (a random read's miss only the blocks of the chunk it
//! covers, verified through the chunk's BLAKE3 tree). It also stages whole images (explicit
//! transfer), records and prefetches boot profiles (the blocks a boot read), and reads
//! sequential streams ahead.
//! This crate owns the NBD protocol, the host chunk cache and its directory; it must never write
//! to an image, serve bytes that were not verified against their hash, know about VMs or QEMU
//! processes, or talk to the coordinator.
//!
//! Entry points: [`BlockProxy::new`], then [`BlockProxy::serve_unix`] / [`BlockProxy::serve_tcp`],
//! [`BlockProxy::pull`], [`BlockProxy::read_blob`], [`BlockProxy::stats`].
//!
//! Files: `proxy` (the [`BlockProxy`]: images, exports, staging, blobs), `service` (the state
//! every export shares: cache, source, settings, uploads, hot pages), `export` (one image's
//! read path), `profile` (boot-profile recording), `hot` (hot pages of warm images), `cache`
//! (the host chunk cache; `cache/partial` its partially fetched chunks, `cache/spare` the empty files made ahead for them), `source` / `servers` / `store_source` (where chunks come from),
//! `wait` (the hard mount: a guest's read waits while its image servers are unreachable),
//! `server` + `protocol` (NBD; `busy` polls a connection that keeps the pace, `sndbuf` sizes a unix client's send buffer), `stats`, `metrics` (its Prometheus families), `config`, `error`. No file imports one that imports
//! it back.

mod busy;
pub mod cache;
mod config;
mod error;
pub mod export;
mod hot;
pub mod metrics;
mod profile;
pub mod protocol;
mod proxy;
mod server;
mod servers;
mod service;
mod sndbuf;
pub mod source;
mod stats;
mod store_source;
mod wait;

pub use cache::{CacheError, ChunkCache};
pub use config::{default_max_open_files, ProxyConfig, DEFAULT_FETCH_TIMEOUT, DEFAULT_RANGE_BLOCK};
pub use error::{ProxyError, ReadError};
pub use export::Export;
pub use proxy::{BlockProxy, Hold, PullReport, MAX_BLOB_IN_MEMORY};
pub use server::{ServerHandle, SocketAccess};
pub use servers::Servers;
pub use source::{Cause, ChunkSource, SourceError};
pub use stats::{CacheStats, LatencyBucket};
pub use store_source::StoreSource;
pub use wait::ChunkWait;
