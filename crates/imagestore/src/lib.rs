//! vgrid image store and image server: images as manifests plus blake3-addressed,
//! zstd-compressed chunks kept in an `object_store`, served over HTTP with immutable caching.
//! This crate owns the on-store layout and the image server's HTTP API (server and client);
//! it must never know about hosts, VMs or NBD.

pub mod codec;
pub mod store;

pub use store::{ImageStore, StoreError, UploadId};
pub mod server;
pub mod client;

pub use client::{ClientError, RetryPolicy, StoreClient};
pub mod import;

pub use import::{export_blob, export_image, import_file, Format, ImportError, ImportOptions};
