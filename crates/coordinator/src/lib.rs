//! vgrid coordinator: the public REST API (axum, OpenAPI at `/api/openapi.json`), durable state
//! (`state`: an async, revisioned key-value store with compare-and-swap and watches; redb or in
//! memory), the information service (hosts and image servers register by heartbeat), placement,
//! and the VM lifecycle `pending → starting → running → stopping → stopped | failed` (`unknown`
//! while its host is silent, `migrating` while it moves live, `lost` when its host no longer has
//! it), live migration between hosts and the reconciliation of records with host reports. It
//! speaks to host agents over their HTTP API only (bodies from `vgrid_api::host`) and to image
//! servers through `vgrid-storeclient`; it links no other role's crate (see `tests/house.rs`),
//! and must never touch QEMU, NBD or chunk storage directly: those belong to the host agent and
//! image store.

pub mod accounting;
mod admission;
pub mod api;
pub mod auth;
pub mod hosts;
pub mod images;
pub mod join;
pub mod lifecycle;
pub mod migrate;
pub mod mobile;
pub mod sched;
pub mod state;

pub use lifecycle::{Coordinator, CoordinatorError};
