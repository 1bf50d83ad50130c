//! vgrid image store and image server: images as manifests plus blake3-addressed,
//! zstd-compressed chunks kept in an `object_store`, served over HTTP with immutable caching.
//! This crate owns the on-store layout and the image server's HTTP API (server and client);
//! it must never know about hosts, VMs or NBD.
//!
//! * [`codec`]: chunk encode/decode; decoding always verifies the blake3 hash.
//! * [`store`]: [`ImageStore`] over any `ObjectStore` (local filesystem by default): chunks,
//!   manifests, boot profiles, upload sessions and a garbage collector that is safe against
//!   concurrent imports.
//! * [`server`]: the `/store/v1` HTTP API ([`server::router`], [`server::serve`],
//!   [`server::spawn`]).
//! * [`client`]: [`StoreClient`], the API's client with bounded retries; every chunk it returns
//!   is verified.
//! * [`import`]: [`import_file`] (raw or qcow2 file -> image) and [`export_image`] /
//!   [`export_blob`] (image -> sparse raw file).

pub mod client;
pub mod codec;
pub mod hotpages;
pub mod import;
pub mod server;
pub mod store;

pub use client::{ClientError, FetchedChunk, RetryPolicy, StoreClient};
pub use import::{export_blob, export_image, import_file, Format, ImportError, ImportOptions};
pub use store::{ImageStore, StoreError, UploadId};
