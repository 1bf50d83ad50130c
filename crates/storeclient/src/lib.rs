//! vgrid store client: the client side of the image server's HTTP API (`/store/v1`), light
//! enough for every role that reads or writes images (hosts, block proxies, the coordinator and
//! the command line) without linking the server. It owns the HTTP client with bounded retries,
//! the chunk codec (encode, and decode that always verifies the blake3 hash), the hot-page
//! bundles of saved RAM (building and verifying them), and import/export of image files. It
//! must never store images itself (no `object_store`, no HTTP server: that is
//! `vgrid-imagestore`), never hand out an unverified chunk, and never know about hosts, VMs or
//! NBD.
//!
//! * [`codec`]: chunk encode/decode; decoding always verifies the blake3 hash.
//! * [`hotpages`]: hot-page bundles of a saved RAM: encoding and verified decoding.
//! * [`client`]: [`StoreClient`], the API's client with bounded retries; every chunk it returns
//!   is verified.
//! * [`tree`]: BLAKE3 subtrees of a chunk: verify a range of a chunk (ranged reads, hot pages)
//!   against the chunk's hash.
//! * [`import`]: [`import_file`] (raw or qcow2 file -> image) and [`export_image`] /
//!   [`export_blob`] (image -> sparse raw file).
//! * [`zstd_ctx`]: zstd with one context per thread, under both [`codec`] and [`tree`].

pub mod client;
pub mod codec;
pub mod hotpages;
pub mod import;
pub mod tree;
pub mod zstd_ctx;

pub use client::{ClientError, FetchedChunk, RetryPolicy, StoreClient};
pub use import::{export_blob, export_image, import_file, ConvertFailure, Format, ImportError, ImportOptions};
pub use vgrid_api::rest::UploadId;
