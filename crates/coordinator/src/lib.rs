//! vgrid coordinator: the public REST API (axum, OpenAPI at `/api/openapi.json`), durable state
//! (redb), and the VM lifecycle `pending → starting → running → stopping → stopped | failed`.
//! Single-node for now: it drives the host agent running in the same process. It must never
//! touch QEMU, NBD or chunk storage directly: those belong to the host agent and image store.

pub mod api;
pub mod lifecycle;
pub mod sched;
pub mod state;

pub use lifecycle::{Coordinator, CoordinatorError};
