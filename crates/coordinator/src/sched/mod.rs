//! Matchmaking and scheduling: which host takes a VM.
//!
//! A match needs both sides: the user's requirement (CEL over `host`) and the host owner's
//! policy (CEL over `request`), after built-in checks (host state, arch, cpus and memory after
//! outstanding reservations). Hosts whose static attributes are equal form a *class*; a clause
//! that reads only class attributes is evaluated once per class and cached, dynamic clauses per
//! host. Among the feasible hosts, a bounded sample (log2 of the host count, at least
//! [`MIN_SAMPLE`]) plus the hosts holding the image in cache are scored, and the best one gets a
//! [`Reservation`] of the request's cpus and memory, held until the host reports the VM (see
//! [`Scheduler::confirm`]) or the placement fails ([`Scheduler::release`]). No host is ever given
//! more than its advertised free figures minus its outstanding reservations.
//! See docs/scheduler.md.
//!
//! Files: this one is the public [`Scheduler`] API; `types.rs` its answers ([`Placement`],
//! [`NoMatch`], [`PlaceError`], [`Reservation`]...); `table.rs` the host table and its classes;
//! `feasibility.rs` which classes and hosts can take a request, and why not; `scoring.rs`
//! sampling, ranking and reserving; `queue.rs` requests waiting for capacity; `expr.rs` CEL.

pub mod expr;
mod feasibility;
mod queue;
mod scoring;
mod table;
#[cfg(test)]
pub(crate) mod tests;
mod types;

pub use expr::{Expr, ExprError, ExprKind, Outcome, Position, Scope};
pub use scoring::{sample_size, MAX_CACHED_CANDIDATES, MIN_SAMPLE};
pub use types::{HostState, NoMatch, PlaceError, PlaceOptions, Placement, Refusal, Reservation, ReservationId, UnknownReservation};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use table::{ClassKey, HostEntry, Inner};
use tokio::sync::Notify;
use vgrid_api::grid::{HostAd, PlacementRequest};

/// Most compiled expressions kept (by source text).
const MAX_COMPILED: usize = 4096;

/// The scheduler: host ads, classes, reservations. Thread-safe; share it in an `Arc`.
pub struct Scheduler {
    inner: Mutex<Inner>,
    /// Compiled expressions by kind (requirement, rank, policy) and source.
    compiled: Mutex<[HashMap<String, Arc<Expr>>; 3]>,
    /// Woken when capacity may have freed (release, new ad, host back).
    freed: Notify,
    /// Requests waiting for capacity, in arrival order (see `queue.rs`).
    queue: Mutex<queue::WaitQueue>,
    /// A pass over the queue is running / capacity changed since the last pass began.
    draining: std::sync::atomic::AtomicBool,
    drain_again: std::sync::atomic::AtomicBool,
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler::new()
    }
}

impl Scheduler {
    pub fn new() -> Scheduler {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15)
            | 1;
        Scheduler {
            inner: Mutex::new(Inner { rng: seed, next_reservation: 1, ..Default::default() }),
            compiled: Mutex::new(Default::default()),
            freed: Notify::new(),
            queue: Mutex::new(Default::default()),
            draining: Default::default(),
            drain_again: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data behind (every mutation is
        // completed before anything that can fail), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Compiles `source` as `kind`, or returns the copy compiled before.
    pub fn compile(&self, source: &str, kind: ExprKind) -> Result<Arc<Expr>, ExprError> {
        let mut caches = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        let cache = &mut caches[kind as usize];
        if let Some(e) = cache.get(source) {
            return Ok(e.clone());
        }
        let expr = Arc::new(Expr::compile(source, kind)?);
        if cache.len() >= MAX_COMPILED {
            cache.clear();
        }
        cache.insert(source.to_string(), expr.clone());
        Ok(expr)
    }

    /// Checks a request's expressions without placing it (for a 400 before anything else).
    pub fn validate(&self, req: &PlacementRequest) -> Result<(), ExprError> {
        if let Some(r) = &req.require {
            self.compile(r, ExprKind::Requirement)?;
        }
        if let Some(r) = &req.rank {
            self.compile(r, ExprKind::Rank)?;
        }
        Ok(())
    }

    /// Adds or refreshes a host's advertisement; the host is ready. Confirmed reservations on
    /// it are dropped: the new ad's free figures include their VMs. Refused (and the ad not
    /// stored) when the owner policy is not a valid expression.
    pub fn upsert(&self, ad: HostAd) -> Result<(), ExprError> {
        let policy = match &ad.policy {
            Some(p) => Some(self.compile(p, ExprKind::Policy)?),
            None => None,
        };
        let key = ClassKey::of(&ad);
        let mut g = self.lock();
        let inner = &mut *g;
        let slot = match inner.by_name.get(&ad.name) {
            Some(&slot) => {
                let old_class = inner.hosts[slot].as_ref().map(|h| h.class);
                let same = old_class.and_then(|c| inner.class(c)).is_some_and(|c| c.key == key);
                if !same {
                    if let Some(c) = old_class {
                        inner.leave_class(c, slot);
                    }
                    let c = inner.join_class(key, slot, policy);
                    if let Some(h) = inner.hosts[slot].as_mut() {
                        h.class = c;
                    }
                }
                inner.unindex_cache(slot);
                // Confirmed reservations are in this ad now.
                let done: Vec<ReservationId> = inner.hosts[slot]
                    .as_ref()
                    .map(|h| h.held.iter().copied().filter(|id| inner.reservations.get(id).is_some_and(|r| r.confirmed)).collect())
                    .unwrap_or_default();
                for id in done {
                    inner.drop_reservation(id);
                }
                let h = inner.hosts[slot].as_mut().expect("slot of a known host");
                h.ad = ad;
                h.state = HostState::Ready;
                h.val = None;
                slot
            }
            None => {
                let slot = match inner.free_slots.pop() {
                    Some(s) => s,
                    None => {
                        inner.hosts.push(None);
                        inner.hosts.len() - 1
                    }
                };
                let class = inner.join_class(key, slot, policy);
                inner.by_name.insert(ad.name.clone(), slot);
                inner.hosts[slot] =
                    Some(HostEntry { ad, state: HostState::Ready, class, reserved_cpus: 0, reserved_mem: 0, held: Vec::new(), val: None });
                slot
            }
        };
        inner.index_cache(slot);
        drop(g);
        self.freed.notify_waiters();
        Ok(())
    }

    /// Forgets a host and its reservations. Returns whether it was known.
    pub fn remove(&self, name: &str) -> bool {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(slot) = inner.by_name.remove(name) else { return false };
        inner.unindex_cache(slot);
        if let Some(h) = inner.hosts[slot].take() {
            inner.leave_class(h.class, slot);
            for id in h.held {
                inner.reservations.remove(&id);
            }
        }
        inner.free_slots.push(slot);
        true
    }

    /// Marks a host ready or lost. Returns whether it was known.
    pub fn set_state(&self, name: &str, state: HostState) -> bool {
        let mut g = self.lock();
        let Some(&slot) = g.by_name.get(name) else { return false };
        if let Some(h) = g.hosts[slot].as_mut() {
            h.state = state;
        }
        drop(g);
        if state == HostState::Ready {
            self.freed.notify_waiters();
        }
        true
    }

    /// Takes a host out of service (`draining`: nothing is placed on it, a refusal says why)
    /// or puts it back (waking queued requests). The host need not be known yet (a restarted
    /// coordinator restores its drains before hosts beat). Returns whether it changed.
    pub fn set_draining(&self, name: &str, draining: bool) -> bool {
        let mut g = self.lock();
        let changed = if draining { g.draining.insert(name.to_string()) } else { g.draining.remove(name) };
        drop(g);
        if changed && !draining {
            self.freed.notify_waiters();
        }
        changed
    }

    /// Whether a host is draining.
    pub fn is_draining(&self, name: &str) -> bool {
        self.lock().draining.contains(name)
    }

    /// A host's state, if it is known.
    pub fn state(&self, name: &str) -> Option<HostState> {
        let g = self.lock();
        g.by_name.get(name).and_then(|&s| g.hosts[s].as_ref()).map(|h| h.state)
    }

    /// A host's free cpus and memory after outstanding reservations.
    pub fn free(&self, name: &str) -> Option<(u32, u64)> {
        let g = self.lock();
        g.by_name.get(name).and_then(|&s| g.hosts[s].as_ref()).map(|h| (h.free_cpus(), h.free_mem()))
    }

    /// Number of known hosts.
    pub fn host_count(&self) -> usize {
        self.lock().by_name.len()
    }

    /// Number of host classes.
    pub fn class_count(&self) -> usize {
        self.lock().class_ids.len()
    }

    /// Outstanding reservations.
    pub fn reservations(&self) -> Vec<Reservation> {
        let mut v: Vec<Reservation> = self.lock().reservations.values().cloned().collect();
        v.sort_by_key(|r| r.id);
        v
    }

    /// The host reported the VM of this reservation running. The capacity stays held until the
    /// host's next advertisement (which includes the VM).
    pub fn confirm(&self, id: ReservationId) -> Result<(), UnknownReservation> {
        let mut g = self.lock();
        let r = g.reservations.get_mut(&id).ok_or(UnknownReservation(id))?;
        r.confirmed = true;
        Ok(())
    }

    /// Gives the capacity of a reservation back (placement failed, or the VM stopped before the
    /// host advertised it).
    pub fn release(&self, id: ReservationId) -> Result<Reservation, UnknownReservation> {
        let mut g = self.lock();
        let r = g.drop_reservation(id).ok_or(UnknownReservation(id))?;
        drop(g);
        self.freed.notify_waiters();
        Ok(r)
    }

    /// Releases unconfirmed reservations older than `age` (a host that never answered).
    pub fn expire(&self, age: Duration) -> Vec<Reservation> {
        let mut g = self.lock();
        let now = Instant::now();
        let old: Vec<ReservationId> =
            g.reservations.values().filter(|r| !r.confirmed && now.duration_since(r.since) >= age).map(|r| r.id).collect();
        let out: Vec<Reservation> = old.into_iter().filter_map(|id| g.drop_reservation(id)).collect();
        drop(g);
        if !out.is_empty() {
            self.freed.notify_waiters();
        }
        out
    }

    /// Places a request now: the best of a bounded sample of matching hosts, with its capacity
    /// reserved; or, when no host matches, one refusal per host.
    pub fn place(&self, req: &PlacementRequest) -> Result<Placement, PlaceError> {
        self.place_with(req, &PlaceOptions::default())
    }

    /// [`Scheduler::place`] with constraints beyond the request.
    pub fn place_with(&self, req: &PlacementRequest, opts: &PlaceOptions) -> Result<Placement, PlaceError> {
        let require = match &req.require {
            Some(s) => Some(self.compile(s, ExprKind::Requirement).map_err(PlaceError::Invalid)?),
            None => None,
        };
        let rank = match &req.rank {
            Some(s) => Some(self.compile(s, ExprKind::Rank).map_err(PlaceError::Invalid)?),
            None => None,
        };
        let mut g = self.lock();
        match g.place(req, opts, require.as_deref(), rank.as_deref()) {
            Some(p) => Ok(p),
            None => Err(PlaceError::NoMatch(g.explain(req, opts, require.as_deref()))),
        }
    }
}
