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

pub mod expr;
mod queue;
#[cfg(test)]
mod tests;

pub use expr::{Expr, ExprError, ExprKind, Outcome, Position, Scope};

use cel::common::value::Val;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::Notify;
use vgrid_api::grid::{HostAd, PlacementRequest};

/// Fewest feasible hosts scored per placement (when that many exist).
pub const MIN_SAMPLE: usize = 4;
/// Most hosts holding the image in cache that are scored besides the sample.
pub const MAX_CACHED_CANDIDATES: usize = 32;
/// Most compiled expressions kept (by source text).
const MAX_COMPILED: usize = 4096;
/// Most cached verdicts per class before its cache is cleared.
const MAX_CLASS_CACHE: usize = 1024;
/// Most cached owner-policy verdicts before the cache is cleared.
const MAX_POLICY_CACHE: usize = 65536;

pub type ReservationId = u64;

/// Whether a host takes placements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    Ready,
    /// Missed its heartbeats: nothing is placed on it until its next advertisement.
    Lost,
}

/// Why one host cannot take a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub host: String,
    /// The failing clause: its source text for a requirement or policy clause, or one of the
    /// built-in `state`, `arch`, `cpus`, `memory`, `free_cpus`, `free_memory_mib`.
    pub clause: String,
    /// What was found, e.g. `is false: host.labels.site is "ufl"`.
    pub detail: String,
    /// Whether the refusal may go away without the request changing (capacity frees, the host
    /// comes back, dynamic attributes change): a request refused only for such reasons waits.
    pub transient: bool,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: `{}` {}", self.host, self.clause, self.detail)
    }
}

/// No host can take the request now; one refusal per known host, ordered by host name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NoMatch {
    pub refusals: Vec<Refusal>,
}

impl NoMatch {
    /// Whether waiting could help: some host refused only for a transient reason, or there is
    /// no host at all yet.
    pub fn may_change(&self) -> bool {
        self.refusals.is_empty() || self.refusals.iter().any(|r| r.transient)
    }
}

impl fmt::Display for NoMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.refusals.is_empty() {
            return f.write_str("no host matches: no host has joined");
        }
        write!(f, "no host matches ({} hosts)", self.refusals.len())?;
        const SHOWN: usize = 20;
        for r in self.refusals.iter().take(SHOWN) {
            write!(f, "; {r}")?;
        }
        if self.refusals.len() > SHOWN {
            write!(f, "; and {} more", self.refusals.len() - SHOWN)?;
        }
        Ok(())
    }
}

impl std::error::Error for NoMatch {}

/// Why a placement failed.
#[derive(Debug, Error)]
pub enum PlaceError {
    /// The request's requirement or rank is not a valid expression (an HTTP 400).
    #[error("{0}")]
    Invalid(ExprError),
    /// No host can take it (now).
    #[error("{0}")]
    NoMatch(NoMatch),
    /// It waited for capacity and none came.
    #[error("no host could take the request within {}s: {last}", .waited.as_secs())]
    TimedOut { waited: Duration, last: NoMatch },
}

impl ExprError {
    /// The kind of expression the error is in.
    pub fn kind(&self) -> ExprKind {
        match self {
            ExprError::Empty { kind }
            | ExprError::Syntax { kind, .. }
            | ExprError::UnknownVariable { kind, .. }
            | ExprError::UnknownField { kind, .. }
            | ExprError::TooCostly { kind, .. } => *kind,
        }
    }
}

/// A reservation id that the scheduler does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("reservation {0} is unknown (released, expired, or its host was removed)")]
pub struct UnknownReservation(pub ReservationId);

/// Where a request was placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub host: String,
    /// The host agent's URL (from its advertisement).
    pub url: String,
    pub reservation: ReservationId,
}

/// Constraints of a placement that are not in [`PlacementRequest`].
#[derive(Debug, Clone, Default)]
pub struct PlaceOptions {
    /// The image's architecture: only hosts of this `arch` match.
    pub arch: Option<String>,
}

/// Capacity held for a placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reservation {
    pub id: ReservationId,
    pub host: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The host reported the VM running; held until the host's next advertisement, whose free
    /// figures include the VM.
    pub confirmed: bool,
    #[serde(skip)]
    pub since: Instant,
    /// The host's slot (valid while the reservation exists: removing a host drops them).
    #[serde(skip)]
    slot: usize,
}

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

#[derive(Clone, PartialEq, Eq, Hash)]
struct ClassKey {
    arch: String,
    accel: String,
    qemu_version: String,
    network_modes: Vec<String>,
    labels: BTreeMap<String, String>,
    cpus: u32,
    memory_mib: u64,
    policy: Option<String>,
}

impl ClassKey {
    fn of(ad: &HostAd) -> ClassKey {
        ClassKey {
            arch: ad.arch.clone(),
            accel: ad.accel.clone(),
            qemu_version: ad.qemu_version.clone(),
            network_modes: ad.network_modes.clone(),
            labels: ad.labels.clone(),
            cpus: ad.cpus,
            memory_mib: ad.memory_mib,
            policy: ad.policy.clone(),
        }
    }
}

/// The fields of a request that an owner policy reads (the others are `None`): the policy's
/// outcome is cached under it.
#[derive(Clone, PartialEq, Eq, Hash)]
struct RequestKey {
    policy: u64,
    user: Option<String>,
    image: Option<String>,
    cpus: Option<u32>,
    memory_mib: Option<u64>,
}

impl RequestKey {
    fn of(policy: &Expr, req: &PlacementRequest) -> RequestKey {
        let reads = |f: &str| policy.fields.as_ref().is_none_or(|fs| fs.contains(f));
        RequestKey {
            policy: policy.id,
            user: reads("user").then(|| req.user.clone()),
            image: reads("image").then(|| req.image.clone()),
            cpus: reads("cpus").then_some(req.cpus),
            memory_mib: reads("memory_mib").then_some(req.memory_mib),
        }
    }
}

/// Why a class or host refuses (without the host name).
#[derive(Debug)]
struct Refused {
    clause: String,
    detail: String,
    transient: bool,
}

/// The static verdict of a class for one request: `None` when feasible.
type Verdict = Option<Arc<Refused>>;

fn refused(clause: impl Into<String>, detail: impl Into<String>, transient: bool) -> Verdict {
    Some(Arc::new(Refused { clause: clause.into(), detail: detail.into(), transient }))
}

fn verdict_of(outcome: Outcome, prefix: &str) -> Verdict {
    match outcome {
        Outcome::True => None,
        Outcome::False { clause, detail, .. } | Outcome::Error { clause, detail, .. } => {
            refused(format!("{prefix}{clause}"), detail, false)
        }
    }
}

/// A hasher for u64 ids (a multiply, as in FxHash): the id maps are on the hot path.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);
impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ *b as u64).wrapping_mul(0x51_7C_C1_B7_27_22_0A_95);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7C_C1_B7_27_22_0A_95);
    }
}
type IdMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;

struct Class {
    key: ClassKey,
    members: Vec<usize>,
    /// `host` with the class attributes only.
    val: Box<dyn Val>,
    policy: Option<Arc<Expr>>,
    /// Requirement expr id -> verdict of its class clauses.
    req_cache: IdMap<Verdict>,
    /// Verdict for placement number `memo_epoch`.
    memo_epoch: u64,
    memo: Verdict,
}

struct HostEntry {
    ad: HostAd,
    state: HostState,
    class: u32,
    reserved_cpus: u32,
    reserved_mem: u64,
    /// Outstanding reservations on this host.
    held: Vec<ReservationId>,
    /// `host` as CEL sees it (free figures after reservations); rebuilt when stale.
    val: Option<Box<dyn Val>>,
}

impl HostEntry {
    fn free_cpus(&self) -> u32 {
        self.ad.free_cpus.saturating_sub(self.reserved_cpus)
    }
    fn free_mem(&self) -> u64 {
        self.ad.free_memory_mib.saturating_sub(self.reserved_mem)
    }
    fn val(&mut self) -> &dyn Val {
        if self.val.is_none() {
            self.val = Some(host_value(&self.ad, self.free_cpus(), self.free_mem(), self.held.len() as u32));
        }
        self.val.as_deref().expect("set above")
    }
}

#[derive(Default)]
struct Inner {
    hosts: Vec<Option<HostEntry>>,
    free_slots: Vec<usize>,
    by_name: HashMap<String, usize>,
    /// Classes by id (slots reused once empty).
    classes: Vec<Option<Class>>,
    free_classes: Vec<u32>,
    class_ids: HashMap<ClassKey, u32>,
    /// Owner-policy outcomes by policy and the request fields it reads.
    policy_cache: HashMap<RequestKey, Verdict>,
    /// image -> (1 - cached fraction, slot) of hosts holding some of it: best first.
    cached: HashMap<String, BTreeSet<(u32, usize)>>,
    reservations: IdMap<Reservation>,
    next_reservation: ReservationId,
    epoch: u64,
    rng: u64,
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

impl Inner {
    fn rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn join_class(&mut self, key: ClassKey, slot: usize, policy: Option<Arc<Expr>>) -> u32 {
        if let Some(&id) = self.class_ids.get(&key) {
            if let Some(c) = self.classes.get_mut(id as usize).and_then(Option::as_mut) {
                c.members.push(slot);
                return id;
            }
        }
        let id = match self.free_classes.pop() {
            Some(id) => id,
            None => {
                self.classes.push(None);
                (self.classes.len() - 1) as u32
            }
        };
        let val = class_value(&key);
        self.class_ids.insert(key.clone(), id);
        self.classes[id as usize] =
            Some(Class { key, members: vec![slot], val, policy, req_cache: IdMap::default(), memo_epoch: 0, memo: None });
        id
    }

    fn leave_class(&mut self, id: u32, slot: usize) {
        let empty = match self.classes.get_mut(id as usize).and_then(Option::as_mut) {
            Some(c) => {
                if let Some(i) = c.members.iter().position(|&m| m == slot) {
                    c.members.swap_remove(i);
                }
                c.members.is_empty()
            }
            None => false,
        };
        if empty {
            if let Some(c) = self.classes[id as usize].take() {
                self.class_ids.remove(&c.key);
                self.free_classes.push(id);
            }
        }
    }

    fn index_cache(&mut self, slot: usize) {
        let Some(h) = self.hosts[slot].as_ref() else { return };
        for (image, frac) in &h.ad.image_cache {
            if *frac > 0.0 {
                self.cached.entry(image.clone()).or_default().insert((cache_key(*frac), slot));
            }
        }
    }

    fn unindex_cache(&mut self, slot: usize) {
        let Some(h) = self.hosts[slot].as_ref() else { return };
        for (image, frac) in &h.ad.image_cache {
            if let Some(set) = self.cached.get_mut(image) {
                set.remove(&(cache_key(*frac), slot));
                if set.is_empty() {
                    self.cached.remove(image);
                }
            }
        }
    }

    fn drop_reservation(&mut self, id: ReservationId) -> Option<Reservation> {
        let r = self.reservations.remove(&id)?;
        if let Some(h) = self.hosts.get_mut(r.slot).and_then(Option::as_mut) {
            h.reserved_cpus = h.reserved_cpus.saturating_sub(r.cpus);
            h.reserved_mem = h.reserved_mem.saturating_sub(r.memory_mib);
            if let Some(i) = h.held.iter().position(|&x| x == id) {
                h.held.swap_remove(i);
            }
            h.val = None;
        }
        Some(r)
    }

    /// The static verdict of class `id` for this request (memoised for this placement).
    fn class_verdict(&mut self, id: u32, ctx: &mut PlaceCtx<'_>) -> Verdict {
        let epoch = self.epoch;
        let Some(c) = self.classes.get_mut(id as usize).and_then(Option::as_mut) else {
            return refused("state", "host vanished", true);
        };
        if c.memo_epoch == epoch {
            return c.memo.clone();
        }
        let verdict = class_check(c, &mut self.policy_cache, ctx);
        c.memo_epoch = epoch;
        c.memo = verdict.clone();
        verdict
    }

    fn class(&self, id: u32) -> Option<&Class> {
        self.classes.get(id as usize).and_then(Option::as_ref)
    }

    fn place(&mut self, req: &PlacementRequest, opts: &PlaceOptions, require: Option<&Expr>, rank: Option<&Expr>) -> Option<Placement> {
        self.epoch += 1;
        let mut ctx = PlaceCtx::new(req, opts, require);
        // Feasible classes and their member counts.
        let mut feasible: Vec<(u32, usize)> = Vec::new();
        let mut total = 0usize;
        for id in 0..self.classes.len() as u32 {
            if self.classes[id as usize].is_some() && self.class_verdict(id, &mut ctx).is_none() {
                let n = self.class(id).map_or(0, |c| c.members.len());
                total += n;
                feasible.push((id, total));
            }
        }
        if total == 0 {
            return None;
        }
        let need_host_clauses = require.is_some_and(|r| r.has_host_scope());
        let sample = sample_size(self.by_name.len());
        let mut candidates: Vec<usize> = Vec::with_capacity(sample + 8);

        // The hosts holding most of the image, first (a few of them).
        if let Some(set) = self.cached.get(&req.image) {
            let want = (sample / 2).clamp(2, MAX_CACHED_CANDIDATES);
            let slots: Vec<usize> = set.iter().map(|&(_, s)| s).take(4 * want).collect();
            for slot in slots {
                if candidates.len() >= want {
                    break;
                }
                let Some(class) = self.hosts[slot].as_ref().map(|h| h.class) else { continue };
                let memo_ok = self.class(class).is_some_and(|c| c.memo_epoch == self.epoch && c.memo.is_none());
                if memo_ok && self.host_fits(slot, req, require, need_host_clauses) {
                    candidates.push(slot);
                }
            }
        }

        // A bounded sample of the rest, visited in a random order (random start, random stride
        // coprime to the count), stopping after `sample` feasible hosts.
        let start = (self.rand() % total as u64) as usize;
        let stride = {
            let mut s = 1usize;
            for _ in 0..8 {
                let t = 1 + (self.rand() % total as u64) as usize;
                if gcd(t, total) == 1 {
                    s = t;
                    break;
                }
            }
            s
        };
        let mut found = 0usize;
        let mut pos = start;
        for _ in 0..total {
            let ci = feasible.partition_point(|&(_, end)| end <= pos);
            let (cid, end) = feasible[ci];
            let begin = if ci == 0 { 0 } else { feasible[ci - 1].1 };
            let slot = match self.class(cid) {
                Some(c) => c.members[pos - begin],
                None => break,
            };
            debug_assert!(pos < end);
            if self.host_fits(slot, req, require, need_host_clauses) {
                if !candidates.contains(&slot) {
                    candidates.push(slot);
                }
                found += 1;
                if found >= sample {
                    break;
                }
            }
            pos = (pos + stride) % total;
        }
        if candidates.is_empty() {
            return None;
        }

        // Score: the user's rank first (if any), then the default rank.
        let mut best: Option<(usize, f64, DefaultRank)> = None;
        for slot in candidates {
            let h = self.hosts[slot].as_mut().expect("candidate slot");
            let user = match rank {
                Some(r) => r.rank(h.val()).unwrap_or(f64::NEG_INFINITY),
                None => 0.0,
            };
            let d = DefaultRank::of(h, &req.image);
            let better = match &best {
                None => true,
                Some((_, bu, bd)) => user > *bu || (user == *bu && d.better_than(bd)),
            };
            if better {
                best = Some((slot, user, d));
            }
        }
        let (slot, _, _) = best?;
        let id = self.next_reservation;
        self.next_reservation += 1;
        let h = self.hosts[slot].as_mut().expect("chosen slot");
        h.reserved_cpus += req.cpus;
        h.reserved_mem += req.memory_mib;
        h.held.push(id);
        h.val = None;
        let placement = Placement { host: h.ad.name.clone(), url: h.ad.url.clone(), reservation: id };
        self.reservations.insert(
            id,
            Reservation {
                id,
                host: h.ad.name.clone(),
                cpus: req.cpus,
                memory_mib: req.memory_mib,
                confirmed: false,
                since: Instant::now(),
                slot,
            },
        );
        Some(placement)
    }

    /// Dynamic checks of one host: state, free capacity, host-scope clauses.
    fn host_fits(&mut self, slot: usize, req: &PlacementRequest, require: Option<&Expr>, host_clauses: bool) -> bool {
        let Some(h) = self.hosts[slot].as_mut() else { return false };
        if h.state != HostState::Ready || h.free_cpus() < req.cpus || h.free_mem() < req.memory_mib {
            return false;
        }
        if share_refusal(&h.ad, req).is_some() {
            return false;
        }
        match require {
            Some(r) if host_clauses => r.check(h.val(), Some(Scope::Host)) == Outcome::True,
            _ => true,
        }
    }

    /// One refusal per host, in host-name order (the slow path, taken only when nothing fits).
    fn explain(&mut self, req: &PlacementRequest, opts: &PlaceOptions, require: Option<&Expr>) -> NoMatch {
        let mut ctx = PlaceCtx::new(req, opts, require);
        let mut names: Vec<(String, usize)> = self.by_name.iter().map(|(n, &s)| (n.clone(), s)).collect();
        names.sort();
        let mut refusals = Vec::with_capacity(names.len());
        for (name, slot) in names {
            let refuse = |clause: &str, detail: String, transient: bool| Refusal {
                host: name.clone(),
                clause: clause.to_string(),
                detail,
                transient,
            };
            let Some(h) = self.hosts[slot].as_ref() else { continue };
            if h.state != HostState::Ready {
                refusals.push(refuse("state", "host is lost (missed heartbeats)".into(), true));
                continue;
            }
            let class = h.class;
            if let Some(r) = self.class_verdict(class, &mut ctx) {
                refusals.push(refuse(&r.clause, r.detail.clone(), r.transient));
                continue;
            }
            let h = self.hosts[slot].as_mut().expect("known slot");
            if h.free_cpus() < req.cpus {
                let detail = format!(
                    "{} cpus free ({} advertised, {} reserved), {} requested",
                    h.free_cpus(),
                    h.ad.free_cpus,
                    h.reserved_cpus,
                    req.cpus
                );
                refusals.push(refuse("free_cpus", detail, true));
                continue;
            }
            if h.free_mem() < req.memory_mib {
                let detail = format!(
                    "{} MiB free ({} advertised, {} reserved), {} requested",
                    h.free_mem(),
                    h.ad.free_memory_mib,
                    h.reserved_mem,
                    req.memory_mib
                );
                refusals.push(refuse("free_memory_mib", detail, true));
                continue;
            }
            if let Some((clause, detail, transient)) = share_refusal(&h.ad, req) {
                refusals.push(refuse(clause, detail, transient));
                continue;
            }
            if let Some(r) = require {
                match r.check(h.val(), Some(Scope::Host)) {
                    Outcome::True => {}
                    Outcome::False { clause, detail, .. } | Outcome::Error { clause, detail, .. } => {
                        refusals.push(refuse(&clause, detail, true));
                        continue;
                    }
                }
            }
            // It fits now (capacity freed between the two passes, which cannot happen under
            // the lock): say so rather than invent a reason.
            refusals.push(refuse("none", "fits".into(), true));
        }
        NoMatch { refusals }
    }
}

/// Admission control of a CPU reservation against the owner's cap (`--max-share`): the
/// failing built-in clause, what was found, and whether waiting could help.
fn share_refusal(ad: &HostAd, req: &PlacementRequest) -> Option<(&'static str, String, bool)> {
    if req.cpu_share <= 0.0 || ad.cpu_cap <= 0.0 {
        return None;
    }
    if req.cpu_share > ad.cpu_cap + 1e-9 {
        return Some((
            "cpu_share",
            format!(
                "a CPU reservation of {:.3} cores exceeds the owner's cap of {:.3} cores for all guests (--max-share)",
                req.cpu_share, ad.cpu_cap
            ),
            false,
        ));
    }
    if req.cpu_share > ad.free_cpu_share + 1e-9 {
        return Some((
            "free_cpu_share",
            format!(
                "a CPU reservation of {:.3} cores would exceed the owner's cap: {:.3} of {:.3} cores reserved, {:.3} free",
                req.cpu_share,
                (ad.cpu_cap - ad.free_cpu_share).max(0.0),
                ad.cpu_cap,
                ad.free_cpu_share
            ),
            true,
        ));
    }
    None
}

/// What one placement needs while it checks classes.
struct PlaceCtx<'a> {
    req: &'a PlacementRequest,
    opts: &'a PlaceOptions,
    require: Option<&'a Expr>,
    /// `request` as CEL sees it, built when a policy first needs it.
    req_val: Option<Box<dyn Val>>,
    /// Policy id -> its verdict for this request (few distinct policies per placement).
    policies: Vec<(u64, Verdict)>,
}

impl<'a> PlaceCtx<'a> {
    fn new(req: &'a PlacementRequest, opts: &'a PlaceOptions, require: Option<&'a Expr>) -> Self {
        PlaceCtx { req, opts, require, req_val: None, policies: Vec::new() }
    }
}

fn class_check(c: &mut Class, policy_cache: &mut HashMap<RequestKey, Verdict>, ctx: &mut PlaceCtx<'_>) -> Verdict {
    let req = ctx.req;
    if let Some(arch) = &ctx.opts.arch {
        if &c.key.arch != arch {
            return refused("arch", format!("host is {}, the image is {arch}", c.key.arch), false);
        }
    }
    if req.cpus > c.key.cpus {
        return refused("cpus", format!("host has {} cpus, {} requested", c.key.cpus, req.cpus), false);
    }
    if req.memory_mib > c.key.memory_mib {
        return refused("memory", format!("host has {} MiB, {} requested", c.key.memory_mib, req.memory_mib), false);
    }
    if let Some(policy) = &c.policy {
        let verdict = match ctx.policies.iter().find(|(id, _)| *id == policy.id) {
            Some((_, v)) => v.clone(),
            None => {
                let key = RequestKey::of(policy, req);
                let v = match policy_cache.get(&key) {
                    Some(v) => v.clone(),
                    None => {
                        let val = ctx.req_val.get_or_insert_with(|| request_value(req));
                        let v = verdict_of(policy.check(val.as_ref(), None), "owner policy: ");
                        if policy_cache.len() >= MAX_POLICY_CACHE {
                            policy_cache.clear();
                        }
                        policy_cache.insert(key, v.clone());
                        v
                    }
                };
                ctx.policies.push((policy.id, v.clone()));
                v
            }
        };
        if verdict.is_some() {
            return verdict;
        }
    }
    if let Some(r) = ctx.require {
        let verdict = match c.req_cache.get(&r.id) {
            Some(v) => v.clone(),
            None => {
                let v = verdict_of(r.check(c.val.as_ref(), Some(Scope::Class)), "");
                if c.req_cache.len() >= MAX_CLASS_CACHE {
                    c.req_cache.clear();
                }
                c.req_cache.insert(r.id, v.clone());
                v
            }
        };
        if verdict.is_some() {
            return verdict;
        }
    }
    None
}

/// How many feasible hosts are scored: log2(n), at least [`MIN_SAMPLE`].
pub fn sample_size(hosts: usize) -> usize {
    let log2 = (usize::BITS - hosts.max(1).leading_zeros()) as usize;
    log2.max(MIN_SAMPLE)
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The default rank: more of the image cached, then lower load per cpu, then fewer VMs
/// (running and reserved), then more free memory.
#[derive(Debug, Clone, Copy)]
struct DefaultRank {
    cached: f64,
    load: f64,
    vms: u32,
    free_mem: u64,
}

impl DefaultRank {
    fn of(h: &HostEntry, image: &str) -> DefaultRank {
        DefaultRank {
            cached: h.ad.image_cache.get(image).copied().filter(|f| f.is_finite()).unwrap_or(0.0),
            // The predicted load (next 30 s) where the host predicts, else its load average.
            load: {
                let l = if h.ad.load_predicted > 0.0 || h.ad.load_now > 0.0 { h.ad.load_predicted } else { h.ad.load_avg };
                if h.ad.cpus > 0 && l.is_finite() {
                    l / h.ad.cpus as f64
                } else {
                    0.0
                }
            },
            vms: h.ad.running_vms.saturating_add(h.held.len() as u32),
            free_mem: h.free_mem(),
        }
    }

    fn better_than(&self, o: &DefaultRank) -> bool {
        if self.cached != o.cached {
            return self.cached > o.cached;
        }
        if self.load != o.load {
            return self.load < o.load;
        }
        if self.vms != o.vms {
            return self.vms < o.vms;
        }
        self.free_mem > o.free_mem
    }
}

fn class_value(k: &ClassKey) -> Box<dyn Val> {
    use expr::val;
    val::map(vec![
        ("arch", val::string(&k.arch)),
        ("accel", val::string(&k.accel)),
        ("qemu_version", val::string(&k.qemu_version)),
        ("network_modes", val::strings(&k.network_modes)),
        ("labels", val::string_map(&k.labels)),
        ("cpus", val::int(k.cpus as u64)),
        ("memory_mib", val::int(k.memory_mib)),
    ])
}

fn host_value(ad: &HostAd, free_cpus: u32, free_mem: u64, reservations: u32) -> Box<dyn Val> {
    use expr::val;
    val::map(vec![
        ("name", val::string(&ad.name)),
        ("url", val::string(&ad.url)),
        ("arch", val::string(&ad.arch)),
        ("accel", val::string(&ad.accel)),
        ("qemu_version", val::string(&ad.qemu_version)),
        ("network_modes", val::strings(&ad.network_modes)),
        ("labels", val::string_map(&ad.labels)),
        ("cpus", val::int(ad.cpus as u64)),
        ("memory_mib", val::int(ad.memory_mib)),
        ("free_cpus", val::int(free_cpus as u64)),
        ("free_memory_mib", val::int(free_mem)),
        ("load_avg", val::double(ad.load_avg)),
        ("load_now", val::double(ad.load_now)),
        ("load_predicted", val::double(ad.load_predicted)),
        ("cpu_cap", val::double(ad.cpu_cap)),
        ("free_cpu_share", val::double(ad.free_cpu_share)),
        ("cgroups", val::string(&ad.cgroups)),
        ("running_vms", val::int(ad.running_vms.saturating_add(reservations) as u64)),
        ("image_cache", val::double_map(&ad.image_cache)),
    ])
}

fn request_value(req: &PlacementRequest) -> Box<dyn Val> {
    use expr::val;
    val::map(vec![
        ("user", val::string(&req.user)),
        ("image", val::string(&req.image)),
        ("cpus", val::int(req.cpus as u64)),
        ("memory_mib", val::int(req.memory_mib)),
    ])
}

/// Orders a host in an image's cache index: most cached first.
fn cache_key(frac: f64) -> u32 {
    let f = if frac.is_finite() { frac.clamp(0.0, 1.0) } else { 0.0 };
    ((1.0 - f) * 1_000_000.0) as u32
}
