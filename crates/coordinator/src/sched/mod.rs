//! Matchmaking and scheduling: which host takes a VM.
//!
//! A match needs both sides: the user's requirement (CEL over `host`) and the host owner's
//! policy (CEL over `request`), after built-in checks (host state, arch, cpus and memory after
//! outstanding reservations). Hosts whose static attributes are equal form a *class*; a clause
//! that reads only class attributes is evaluated once per class (the verdicts of every class
//! cached per kind of request), dynamic clauses per host. Among the feasible hosts, a bounded sample (log2 of the host count, at least
//! [`MIN_SAMPLE`]) plus the hosts holding the image in cache are scored, and the best one gets a
//! [`Reservation`] of the request's cpus and memory, held until the host reports the VM (see
//! [`Scheduler::confirm`]) or the placement fails ([`Scheduler::release`]). No host is ever given
//! more than its advertised free figures minus its outstanding reservations. Placements run in
//! parallel (see [`Scheduler`]). See docs/scheduler.md.
//!
//! Files: this one is the public [`Scheduler`] API; `types.rs` its answers ([`Placement`],
//! [`NoMatch`], [`PlaceError`], [`Reservation`]...); `table.rs` the host table and its classes;
//! `feasibility.rs` which classes and hosts can take a request, and why not; `scoring.rs`
//! sampling, ranking and reserving; `queue.rs` requests waiting for capacity; `expr.rs` CEL;
//! `view.rs` `host` as CEL sees it.

pub mod expr;
mod feasibility;
mod queue;
mod scoring;
mod table;
#[cfg(test)]
pub(crate) mod tests;
mod types;
mod view;

pub use expr::{Expr, ExprError, ExprKind, Outcome, Position, Scope};
pub use scoring::{sample_size, MAX_CACHED_CANDIDATES, MIN_SAMPLE};
pub use types::{HostState, NoMatch, PlaceError, PlaceOptions, Placement, Refusal, Reservation, ReservationId, UnknownReservation};

use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};
use feasibility::{Feasible, FeasibleKey, PlaceCtx};
use scoring::Attempt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use table::{AdBlock, CacheIndex, ClassKey, HostEntry, Inner, RequestKey, Reservations, Verdict};
use tokio::sync::Notify;
use vgrid_api::grid::{HostAd, PlacementRequest};

/// Most compiled expressions kept (by source text).
const MAX_COMPILED: usize = 4096;
/// Most cached class verdicts (by kind of request) before the cache is cleared.
const MAX_FEASIBLE: usize = 4096;
/// Most attempts of one placement that lose every fitting host to concurrent placements.
const MAX_ATTEMPTS: usize = 8;
/// Attempts while the explanation finds a host that fits after all (contention, not a refusal).
const MAX_ATTEMPTS_WHILE_FITTING: usize = 1000;

/// The scheduler: host ads, classes, reservations. Thread-safe; share it in an `Arc`.
///
/// Placements run in parallel: they hold the host table shared, evaluate and rank without
/// taking any lock (from each host's published values, see `table::HostEntry`), and reserve
/// under the chosen host's own lock, checking again a host that
/// changed since it was scored (optimistic: a placement that lost the host's capacity takes
/// the next candidate, or samples again). Only what changes the table's shape (a host joining,
/// leaving or changing class; a drain) holds it exclusively.
///
/// What every placement reads and little changes (the table, the cache index, the verdict and
/// expression caches) is behind sharded reader-writer locks: a reader takes only its thread's
/// shard, so placing threads do not write one shared lock word on every placement (as the
/// read side of `RwLock` does); a writer takes every shard.
pub struct Scheduler {
    inner: ShardedLock<Inner>,
    /// Hosts by cached image (see `CacheIndex`).
    cached: ShardedLock<CacheIndex>,
    reservations: Reservations,
    /// Class verdicts by kind of request, for table generation `.0`.
    feasible: ShardedLock<(u64, HashMap<FeasibleKey, Arc<Feasible>>)>,
    /// Owner-policy outcomes by policy and the request fields it reads.
    policy_cache: Mutex<HashMap<RequestKey, Verdict>>,
    /// Compiled expressions by kind (requirement, rank, policy) and source.
    compiled: ShardedLock<[HashMap<String, Arc<Expr>>; 3]>,
    /// Woken when capacity may have freed (release, new ad, host back), if anyone waits.
    freed: Notify,
    /// Requests in the queue (a release wakes nobody when there are none).
    queued: std::sync::atomic::AtomicUsize,
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
        Scheduler {
            inner: ShardedLock::default(),
            cached: ShardedLock::default(),
            reservations: Reservations::default(),
            feasible: ShardedLock::default(),
            policy_cache: Mutex::default(),
            compiled: ShardedLock::default(),
            freed: Notify::new(),
            queued: Default::default(),
            queue: Mutex::new(Default::default()),
            draining: Default::default(),
            drain_again: Default::default(),
        }
    }

    // A panic while holding a lock leaves consistent data behind (every mutation is completed
    // before anything that can fail), so a poisoned lock is still usable.
    fn read(&self) -> ShardedLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> ShardedLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the queued requests: capacity may have freed. The change is made before: a
    /// request queued after the check below sees it when it tries (both sides fenced).
    fn wake(&self) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if self.queued.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }

    fn cache_index(&self) -> ShardedLockReadGuard<'_, CacheIndex> {
        self.cached.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Compiles `source` as `kind`, or returns the copy compiled before.
    pub fn compile(&self, source: &str, kind: ExprKind) -> Result<Arc<Expr>, ExprError> {
        if let Some(e) = self.compiled.read().unwrap_or_else(|e| e.into_inner())[kind as usize].get(source) {
            return Ok(e.clone());
        }
        let expr = Arc::new(Expr::compile(source, kind)?);
        let mut caches = self.compiled.write().unwrap_or_else(|e| e.into_inner());
        let cache = &mut caches[kind as usize];
        if let Some(e) = cache.get(source) {
            return Ok(e.clone());
        }
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
        // A heartbeat of a known host whose class is unchanged: the table held shared.
        let inner = self.read();
        let same = inner.host_named(&ad.name).and_then(|h| inner.class(h.class)).is_some_and(|c| c.key == key);
        if same {
            let slot = inner.by_name[&ad.name];
            self.refresh(&inner, slot, ad);
            drop(inner);
            self.wake();
            return Ok(());
        }
        drop(inner);
        let mut g = self.write();
        let inner = &mut *g;
        let slot = match inner.by_name.get(&ad.name) {
            Some(&slot) => {
                let old_class = inner.host(slot).map(|h| h.class);
                if !old_class.and_then(|c| inner.class(c)).is_some_and(|c| c.key == key) {
                    if let Some(c) = old_class {
                        inner.leave_class(c, slot);
                    }
                    let c = inner.join_class(key, slot, policy);
                    if let Some(h) = inner.hosts[slot].as_mut() {
                        h.class = c;
                    }
                }
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
                let draining = inner.draining.contains(&ad.name);
                inner.hosts[slot] = Some(HostEntry::new(ad.name.clone(), class, HostAd::default(), draining));
                slot
            }
        };
        self.refresh(inner, slot, ad);
        drop(g);
        self.wake();
        Ok(())
    }

    /// Stores a known host's new ad (the table held): it is ready, its image-cache entries are
    /// re-indexed, its confirmed reservations dropped.
    fn refresh(&self, inner: &Inner, slot: usize, ad: HostAd) {
        let Some(h) = inner.host(slot) else { return };
        let guard = crossbeam_epoch::pin();
        let mut live = h.lock();
        let old = h.ad(&guard);
        if old.image_cache != ad.image_cache {
            let mut index = self.cached.write().unwrap_or_else(|e| e.into_inner());
            index.remove(slot, &old.image_cache);
            index.add(slot, &ad.image_cache);
        }
        // Confirmed reservations are in this ad now. One missing from the map is being
        // released: its release takes it out of `held`.
        let held = std::mem::take(&mut live.held);
        for id in held {
            let mut shard = self.reservations.shard(id);
            match shard.get(&id) {
                Some(r) if r.confirmed => {
                    let r = shard.remove(&id).expect("present");
                    drop(shard);
                    live.reserved_cpus = live.reserved_cpus.saturating_sub(r.cpus);
                    live.reserved_mem = live.reserved_mem.saturating_sub(r.memory_mib);
                }
                _ => live.held.push(id),
            }
        }
        live.state = HostState::Ready;
        h.publish(&live, Some(AdBlock::of(ad)));
    }

    /// Forgets a host and its reservations. Returns whether it was known.
    pub fn remove(&self, name: &str) -> bool {
        let mut g = self.write();
        let inner = &mut *g;
        let Some(slot) = inner.by_name.remove(name) else { return false };
        if let Some(h) = inner.hosts[slot].take() {
            inner.leave_class(h.class, slot);
            let live = h.lock();
            self.cached.write().unwrap_or_else(|e| e.into_inner()).remove(slot, &h.ad(&crossbeam_epoch::pin()).image_cache);
            for id in &live.held {
                self.reservations.shard(*id).remove(id);
            }
        }
        inner.free_slots.push(slot);
        true
    }

    /// Marks a host ready or lost. Returns whether it was known.
    pub fn set_state(&self, name: &str, state: HostState) -> bool {
        let g = self.read();
        let Some(h) = g.host_named(name) else { return false };
        let mut live = h.lock();
        live.state = state;
        h.publish(&live, None);
        drop(live);
        drop(g);
        if state == HostState::Ready {
            self.wake();
        }
        true
    }

    /// Takes a host out of service (`draining`: nothing is placed on it, a refusal says why)
    /// or puts it back (waking queued requests). The host need not be known yet (a restarted
    /// coordinator restores its drains before hosts beat). Returns whether it changed.
    pub fn set_draining(&self, name: &str, draining: bool) -> bool {
        let mut g = self.write();
        let changed = if draining { g.draining.insert(name.to_string()) } else { g.draining.remove(name) };
        if let Some(h) = g.host_named(name) {
            let mut live = h.lock();
            live.draining = draining;
            h.publish(&live, None);
        }
        drop(g);
        if changed && !draining {
            self.wake();
        }
        changed
    }

    /// Whether a host is draining.
    pub fn is_draining(&self, name: &str) -> bool {
        self.read().draining.contains(name)
    }

    /// A host's state, if it is known.
    pub fn state(&self, name: &str) -> Option<HostState> {
        self.read().host_named(name).map(|h| h.lock().state)
    }

    /// A host's free cpus and memory after outstanding reservations.
    pub fn free(&self, name: &str) -> Option<(u32, u64)> {
        self.read().host_named(name).map(|h| {
            let guard = crossbeam_epoch::pin();
            let live = h.read(&guard);
            (live.free_cpus(), live.free_mem())
        })
    }

    /// Number of known hosts.
    pub fn host_count(&self) -> usize {
        self.read().by_name.len()
    }

    /// Number of host classes.
    pub fn class_count(&self) -> usize {
        self.read().class_ids.len()
    }

    /// Outstanding reservations.
    pub fn reservations(&self) -> Vec<Reservation> {
        self.reservations.all()
    }

    /// The host reported the VM of this reservation running. The capacity stays held until the
    /// host's next advertisement (which includes the VM).
    pub fn confirm(&self, id: ReservationId) -> Result<(), UnknownReservation> {
        let mut shard = self.reservations.shard(id);
        let r = shard.get_mut(&id).ok_or(UnknownReservation(id))?;
        r.confirmed = true;
        Ok(())
    }

    /// Gives the capacity of a reservation back (placement failed, or the VM stopped before the
    /// host advertised it).
    pub fn release(&self, id: ReservationId) -> Result<Reservation, UnknownReservation> {
        let r = self.unreserve(id).ok_or(UnknownReservation(id))?;
        self.wake();
        Ok(r)
    }

    /// Takes a reservation out of the map, then its capacity off its host.
    fn unreserve(&self, id: ReservationId) -> Option<Reservation> {
        let r = self.reservations.shard(id).remove(&id)?;
        let g = self.read();
        if let Some(h) = g.host(r.slot) {
            table::unhold(h, &r);
        }
        Some(r)
    }

    /// Releases unconfirmed reservations older than `age` (a host that never answered).
    pub fn expire(&self, age: Duration) -> Vec<Reservation> {
        let now = Instant::now();
        let old: Vec<ReservationId> =
            self.reservations.all().into_iter().filter(|r| !r.confirmed && now.duration_since(r.since) >= age).map(|r| r.id).collect();
        let out: Vec<Reservation> = old.into_iter().filter_map(|id| self.unreserve(id)).collect();
        if !out.is_empty() {
            self.wake();
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
        // The common case: the request's expressions compiled and its class verdicts cached
        // before. They are borrowed under the caches' read guards (each thread reads its own
        // shard) rather than cloned out as `Arc`s, whose shared reference counts every placing
        // thread would otherwise write twice per placement (see bench/README.md, `bench/scheduler`).
        {
            let inner = self.read();
            let compiled = self.compiled.read().unwrap_or_else(|e| e.into_inner());
            let cached = |source: &Option<String>, kind: ExprKind| match source {
                Some(s) => compiled[kind as usize].get(s.as_str()).map(|e| Some(&**e)),
                None => Some(None),
            };
            if let (Some(require), Some(rank)) = (cached(&req.require, ExprKind::Requirement), cached(&req.rank, ExprKind::Rank)) {
                let key = FeasibleKey::of(inner.policy_reads, req, opts, require);
                let verdicts = self.feasible.read().unwrap_or_else(|e| e.into_inner());
                if verdicts.0 == inner.generation {
                    if let Some(feasible) = verdicts.1.get(&key) {
                        return self.place_attempts(&inner, feasible, req, require, rank);
                    }
                }
            }
        }
        let require = match &req.require {
            Some(s) => Some(self.compile(s, ExprKind::Requirement).map_err(PlaceError::Invalid)?),
            None => None,
        };
        let rank = match &req.rank {
            Some(s) => Some(self.compile(s, ExprKind::Rank).map_err(PlaceError::Invalid)?),
            None => None,
        };
        let inner = self.read();
        let feasible = self.feasible(&inner, req, opts, require.as_deref());
        self.place_attempts(&inner, &feasible, req, require.as_deref(), rank.as_deref())
    }

    /// Attempts at placing `req` on the table `inner` (held shared), with its class verdicts.
    fn place_attempts(
        &self,
        inner: &Inner,
        feasible: &Feasible,
        req: &PlacementRequest,
        require: Option<&Expr>,
        rank: Option<&Expr>,
    ) -> Result<Placement, PlaceError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.place_once(inner, feasible, req, require, rank) {
                Attempt::Placed(p) => return Ok(p),
                Attempt::Raced if attempts < MAX_ATTEMPTS => continue,
                Attempt::Raced | Attempt::Nothing => {}
            }
            // Nothing fits: say why, host by host. A host that fits by now (capacity freed
            // by a concurrent release) is worth another attempt: each such round means other
            // placements made progress, so keep trying (a refusal saying "fits" is no answer),
            // up to a bound against a pathological spin.
            let mut fits = false;
            let nm = inner.explain(feasible, req, require, &mut fits);
            if !fits || attempts >= MAX_ATTEMPTS_WHILE_FITTING {
                return Err(PlaceError::NoMatch(nm));
            }
        }
    }

    /// The class verdicts for this kind of request: cached per table generation.
    fn feasible(&self, inner: &Inner, req: &PlacementRequest, opts: &PlaceOptions, require: Option<&Expr>) -> Arc<Feasible> {
        let key = FeasibleKey::of(inner.policy_reads, req, opts, require);
        {
            let cache = self.feasible.read().unwrap_or_else(|e| e.into_inner());
            if cache.0 == inner.generation {
                if let Some(f) = cache.1.get(&key) {
                    return f.clone();
                }
            }
        }
        let mut ctx = PlaceCtx::new(req, opts, require);
        let f = Arc::new(inner.feasible(&mut ctx, &mut self.policy_cache.lock().unwrap_or_else(|e| e.into_inner())));
        let mut cache = self.feasible.write().unwrap_or_else(|e| e.into_inner());
        if cache.0 != inner.generation || cache.1.len() >= MAX_FEASIBLE {
            cache.0 = inner.generation;
            cache.1.clear();
        }
        cache.1.insert(key, f.clone());
        f
    }
}
