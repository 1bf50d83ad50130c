//! vgrid coordinator: the public REST API (axum, OpenAPI at `/api/openapi.json`), durable state
//! (`state`: an async, revisioned key-value store with compare-and-swap and watches; redb, etcd or in
//! memory), the information service (hosts and image servers register by heartbeat), placement,
//! and the VM lifecycle `pending → starting → running → stopping → stopped | failed` (`unknown`
//! while its host is silent, `migrating` while it moves live, `lost` when its host no longer has
//! it), live migration between hosts and the reconciliation of records with host reports. It
//! speaks to host agents over their HTTP API only (bodies from `vgrid_api::host`) and to image
//! servers through `vgrid-storeclient`; it links no other role's crate (see `tests/house.rs`),
//! and must never touch QEMU, NBD or chunk storage directly: those belong to the host agent and
//! image store. It must never change a VM's lifecycle state but through
//! [`Coordinator::apply`] (the table in `lifecycle::table`, written with compare-and-swap), and
//! never decide admission (quota, capacity, names, host ports) from process-local state: the
//! claims in the store decide, so that coordinators sharing a store never over-admit.
//!
//! Layers, each using only those above it:
//! * `state`: the store seam and its typed tables (knows records as data, no lifecycle);
//! * `lifecycle`: the core: records and their one write path (`records`), the transition table
//!   (`table`), claims (`claims`), admission and placement (`admit`), launching and watching a
//!   VM (`run`); with `sched` (placement), `hosts` (registry, host client), `networks` (network
//!   definitions, and the addresses and MACs admission gives interfaces); `lifecycle::admission` is
//!   the pure admission arithmetic;
//! * features on the core: `suspend` (snapshot, suspend, resume), `migrate` (live migration),
//!   `drain` (a host taken out of service: its VMs migrated away, else suspended),
//!   `waiting` (VMs stalled on image servers, as their hosts report
//!   them: their phase), `reconcile` (a host's heartbeat: the core registers it, then the records are reconciled
//!   with its report; and the recovery at open of what a restart left half-done, handing
//!   interrupted suspends, resumes and migrations to their features), `accounting`, `auth`,
//!   `join`, `images`, `volumes` (the one-writer claims of volumes, their fencing epochs and the
//!   user's volume commands), `relay` (the tunnel networks' Ethernet switches, joining hosts' and
//!   users' tunnel connections; it never sees a request). The core never calls them: `http` and whoever opens the coordinator
//!   (`Coordinator::new`, then `Coordinator::recover_interrupted`) do;
//! * `http`: every REST handler and the error → status mapping; no feature module knows axum.

pub mod accounting;
pub mod auth;
pub mod drain;
pub mod hosts;
pub mod http;
pub mod images;
pub mod join;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod migrate;
pub mod networks;
pub mod reconcile;
pub mod relay;
pub mod sched;
pub mod state;
pub mod suspend;
pub mod volumes;
pub mod waiting;

pub use lifecycle::{Coordinator, CoordinatorError};
