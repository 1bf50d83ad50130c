//! vgrid image server: images as manifests plus blake3-addressed, zstd-compressed chunks kept
//! in an `object_store`, served over HTTP with immutable caching. This crate owns the on-store
//! layout and the image server's HTTP API (server side only: its client, the chunk codec and
//! import/export live in `vgrid-storeclient`, which hosts use without linking this crate); it
//! must never know about hosts, VMs or NBD.
//!
//! * [`store`]: [`ImageStore`] over any `ObjectStore` (local filesystem by default): chunks,
//!   manifests, boot profiles, upload sessions and a garbage collector that is safe against
//!   concurrent imports. Chunks are verified with `vgrid_storeclient::codec`; those it served
//!   ranges of lately stay decoded in memory (`store/recent.rs`).
//! * [`shared`]: what several image servers on one bucket (`--store s3://…`) keep in the bucket
//!   instead of in memory: upload pins and the garbage-collection lease.
//! * [`error`]: [`StoreError`], what the store and the shared bucket refuse and why.
//! * [`server`]: the `/store/v1` HTTP API and its OpenAPI document ([`server::router`], [`server::serve`],
//!   [`server::spawn`]).

pub mod error;
pub mod server;
pub mod shared;
pub mod store;

pub use error::StoreError;
pub use store::ImageStore;
