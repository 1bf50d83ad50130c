//! The host table: host entries (each with its own lock over what heartbeats and placements
//! change), their classes (hosts with equal static attributes), the image-cache index and the
//! sharded reservation map.

use super::expr::{self, Expr};
use super::types::{HostState, Placement, Reservation, ReservationId};
use super::view::{AdVals, HostView};
use cel::common::value::Val;
use crossbeam_epoch::{self as epoch, Atomic, Guard, Owned, Shared};
use crossbeam_utils::CachePadded;
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use vgrid_api::grid::{HostAd, PlacementRequest};

#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct ClassKey {
    pub(super) arch: String,
    pub(super) accel: String,
    pub(super) qemu_version: String,
    pub(super) network_modes: Vec<String>,
    pub(super) networks: Vec<String>,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) cpus: u32,
    pub(super) memory_mib: u64,
    pub(super) policy: Option<String>,
}

impl ClassKey {
    pub(super) fn of(ad: &HostAd) -> ClassKey {
        ClassKey {
            arch: ad.arch.clone(),
            accel: ad.accel.clone(),
            qemu_version: ad.qemu_version.clone(),
            network_modes: ad.network_modes.clone(),
            networks: ad.networks.clone(),
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
pub(super) struct RequestKey {
    pub(super) policy: u64,
    pub(super) user: Option<String>,
    pub(super) image: Option<String>,
    pub(super) cpus: Option<u32>,
    pub(super) memory_mib: Option<u64>,
}

impl RequestKey {
    pub(super) fn of(policy: &Expr, req: &PlacementRequest) -> RequestKey {
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
pub(super) struct Refused {
    pub(super) clause: String,
    pub(super) detail: String,
    pub(super) transient: bool,
}

/// The static verdict of a class for one request: `None` when feasible.
pub(super) type Verdict = Option<Arc<Refused>>;

/// A hasher for u64 ids (a multiply, as in FxHash): the id maps are on the hot path.
#[derive(Default, Clone, Copy)]
pub(super) struct IdHasher(u64);
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
pub(super) type IdMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;

pub(super) struct Class {
    pub(super) key: ClassKey,
    pub(super) members: Vec<usize>,
    /// `host` with the class attributes only.
    pub(super) val: Box<dyn Val>,
    pub(super) policy: Option<Arc<Expr>>,
}

/// One host: its name and class (changed only under the table's write lock); what a heartbeat
/// or a placement changes, behind the host's own lock ([`HostLive`]); and the same values
/// published for placements to score without that lock ([`HostEntry::read`]).
///
/// Scoring writes nothing another thread reads: two threads scoring the same hosts keep their
/// cache lines shared instead of taking turns at each host's lock word, which is what cost two
/// placing threads most (bench/README.md, `bench/scheduler`). Only reserving takes the lock, and
/// checks again a host whose version moved since it was scored. The published values are a
/// sequence lock over atomics (a reader retries while a change is being published); the ad is a
/// pointer a heartbeat swaps, the old ad freed once no placement can still hold it (epochs).
pub(super) struct HostEntry {
    pub(super) name: String,
    pub(super) class: u32,
    live: Mutex<HostLive>,
    /// Even while stable, odd while a change is published; +2 per change: the host's version.
    seq: AtomicU64,
    reserved_cpus: AtomicU32,
    reserved_mem: AtomicU64,
    held_count: AtomicU32,
    /// [`LOST`] and [`DRAINING`].
    flags: AtomicU8,
    ad: Atomic<AdBlock>,
}

const LOST: u8 = 1;
const DRAINING: u8 = 2;

/// What changes from heartbeat to heartbeat and placement to placement, behind the host's lock
/// (the ad is the entry's, swapped under this lock).
pub(super) struct HostLive {
    pub(super) state: HostState,
    /// Taken out of service (`vgrid host drain`).
    pub(super) draining: bool,
    pub(super) reserved_cpus: u32,
    pub(super) reserved_mem: u64,
    /// Outstanding reservations on this host. Whoever removes one from the reservation map
    /// (release, expiry, the next ad for a confirmed one) takes it out of here.
    pub(super) held: Vec<ReservationId>,
}

/// An ad with the values of it that `host` borrows (see `view.rs`).
pub(super) struct AdBlock {
    pub(super) ad: HostAd,
    pub(super) own: AdVals,
}

impl AdBlock {
    pub(super) fn of(ad: HostAd) -> AdBlock {
        AdBlock { own: AdVals::of(&ad), ad }
    }
}

impl std::ops::Deref for AdBlock {
    type Target = HostAd;
    fn deref(&self) -> &HostAd {
        &self.ad
    }
}

/// A host as a placement reads it: the values of one version.
pub(super) struct HostRead<'g> {
    pub(super) ad: &'g AdBlock,
    pub(super) state: HostState,
    pub(super) draining: bool,
    pub(super) reserved_cpus: u32,
    pub(super) reserved_mem: u64,
    pub(super) held_count: u32,
    /// Bumped by every change: a placement that checked the host at version v reserves on it
    /// without checking again if it is still at v.
    pub(super) version: u64,
}

impl HostEntry {
    pub(super) fn new(name: String, class: u32, ad: HostAd, draining: bool) -> HostEntry {
        let live = HostLive { state: HostState::Ready, draining, reserved_cpus: 0, reserved_mem: 0, held: Vec::new() };
        HostEntry {
            name,
            class,
            flags: AtomicU8::new(flags_of(&live)),
            live: Mutex::new(live),
            seq: AtomicU64::new(0),
            reserved_cpus: AtomicU32::new(0),
            reserved_mem: AtomicU64::new(0),
            held_count: AtomicU32::new(0),
            ad: Atomic::new(AdBlock::of(ad)),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, HostLive> {
        // Every mutation completes before anything that can panic: a poisoned lock is usable.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ad as published (swapped only under the host's lock).
    pub(super) fn ad<'g>(&self, guard: &'g Guard) -> &'g AdBlock {
        // Never null (set at creation, swapped for another); freed only after every guard
        // that could have loaded it is gone.
        unsafe { self.ad.load(Ordering::Acquire, guard).deref() }
    }

    /// The host's published values, without its lock: what scoring reads. Retried while a
    /// change is being published; after a few tries (a writer preempted mid-change) read under
    /// the lock instead, which waits for the writer rather than spinning on it.
    pub(super) fn read<'g>(&self, guard: &'g Guard) -> HostRead<'g> {
        for _ in 0..4 {
            let version = self.seq.load(Ordering::Acquire);
            if version & 1 == 0 {
                let flags = self.flags.load(Ordering::Relaxed);
                let r = HostRead {
                    ad: self.ad(guard),
                    state: if flags & LOST != 0 { HostState::Lost } else { HostState::Ready },
                    draining: flags & DRAINING != 0,
                    reserved_cpus: self.reserved_cpus.load(Ordering::Relaxed),
                    reserved_mem: self.reserved_mem.load(Ordering::Relaxed),
                    held_count: self.held_count.load(Ordering::Relaxed),
                    version,
                };
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == version {
                    return r;
                }
            }
            std::hint::spin_loop();
        }
        let live = self.lock();
        self.read_locked(&live, guard)
    }

    /// The host's values with its lock held (`live` is the guard's content).
    pub(super) fn read_locked<'g>(&self, live: &HostLive, guard: &'g Guard) -> HostRead<'g> {
        HostRead {
            ad: self.ad(guard),
            state: live.state,
            draining: live.draining,
            reserved_cpus: live.reserved_cpus,
            reserved_mem: live.reserved_mem,
            held_count: live.held.len() as u32,
            version: self.seq.load(Ordering::Relaxed),
        }
    }

    /// Publishes a change made under the host's lock (`live` is the guard's content), with the
    /// host's new ad if one came: checks made before are void, placements score the new values.
    pub(super) fn publish(&self, live: &HostLive, ad: Option<AdBlock>) {
        // Pinned before the change begins: pinning may free older ads, which readers should not
        // wait for.
        let guard = ad.is_some().then(epoch::pin);
        let v = self.seq.load(Ordering::Relaxed);
        self.seq.store(v + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.reserved_cpus.store(live.reserved_cpus, Ordering::Relaxed);
        self.reserved_mem.store(live.reserved_mem, Ordering::Relaxed);
        self.held_count.store(live.held.len() as u32, Ordering::Relaxed);
        self.flags.store(flags_of(live), Ordering::Relaxed);
        if let (Some(ad), Some(guard)) = (ad, &guard) {
            let old = self.ad.swap(Owned::new(ad), Ordering::AcqRel, guard);
            // Placements that loaded the old ad hold guards: it is freed after them.
            unsafe { guard.defer_destroy(old) };
        }
        self.seq.store(v + 2, Ordering::Release);
    }
}

impl Drop for HostEntry {
    fn drop(&mut self) {
        let guard = epoch::pin();
        let old = self.ad.swap(Shared::null(), Ordering::AcqRel, &guard);
        if !old.is_null() {
            unsafe { guard.defer_destroy(old) };
        }
    }
}

fn flags_of(live: &HostLive) -> u8 {
    (if live.state == HostState::Ready { 0 } else { LOST }) | (if live.draining { DRAINING } else { 0 })
}

impl HostRead<'_> {
    pub(super) fn free_cpus(&self) -> u32 {
        self.ad.free_cpus.saturating_sub(self.reserved_cpus)
    }
    pub(super) fn free_mem(&self) -> u64 {
        self.ad.free_memory_mib.saturating_sub(self.reserved_mem)
    }
    /// `host` as CEL sees it (free figures after reservations), with the class's value.
    pub(super) fn view<'a>(&'a self, class: &'a dyn Val) -> HostView<'a> {
        let ad = self.ad;
        HostView {
            class,
            own: &ad.own,
            free_cpus: self.free_cpus() as u64,
            free_memory_mib: self.free_mem(),
            running_vms: ad.running_vms.saturating_add(self.held_count) as u64,
            load_avg: ad.load_avg,
            load_now: ad.load_now,
            load_predicted: ad.load_predicted,
            cpu_cap: ad.cpu_cap,
            free_cpu_share: ad.free_cpu_share,
        }
    }
}

/// Which request fields some owner policy reads (besides cpus and memory, always in the key
/// of a class verdict).
pub(super) const READS_USER: u8 = 1;
pub(super) const READS_IMAGE: u8 = 2;

/// The host table. Placements hold it shared (read); only what changes its shape (a host
/// joining, leaving or changing class, a drain) holds it exclusively.
#[derive(Default)]
pub(super) struct Inner {
    pub(super) hosts: Vec<Option<HostEntry>>,
    pub(super) free_slots: Vec<usize>,
    pub(super) by_name: HashMap<String, usize>,
    /// Classes by id (slots reused once empty).
    pub(super) classes: Vec<Option<Class>>,
    pub(super) free_classes: Vec<u32>,
    pub(super) class_ids: HashMap<ClassKey, u32>,
    /// Changes whenever a class's members change (cached class verdicts go stale).
    pub(super) generation: u64,
    /// `READS_*` of the owner policies of every class so far.
    pub(super) policy_reads: u8,
    /// Hosts taken out of service (`vgrid host drain`), known or not yet registered.
    pub(super) draining: HashSet<String>,
}

impl Inner {
    pub(super) fn join_class(&mut self, key: ClassKey, slot: usize, policy: Option<Arc<Expr>>) -> u32 {
        self.generation += 1;
        if let Some(&id) = self.class_ids.get(&key) {
            if let Some(c) = self.classes.get_mut(id as usize).and_then(Option::as_mut) {
                c.members.push(slot);
                return id;
            }
        }
        if let Some(p) = &policy {
            self.policy_reads |= match &p.fields {
                None => READS_USER | READS_IMAGE,
                Some(f) => (if f.contains("user") { READS_USER } else { 0 }) | (if f.contains("image") { READS_IMAGE } else { 0 }),
            };
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
        self.classes[id as usize] = Some(Class { key, members: vec![slot], val, policy });
        id
    }

    pub(super) fn leave_class(&mut self, id: u32, slot: usize) {
        self.generation += 1;
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

    pub(super) fn class(&self, id: u32) -> Option<&Class> {
        self.classes.get(id as usize).and_then(Option::as_ref)
    }

    pub(super) fn host(&self, slot: usize) -> Option<&HostEntry> {
        self.hosts.get(slot).and_then(Option::as_ref)
    }

    pub(super) fn host_named(&self, name: &str) -> Option<&HostEntry> {
        self.by_name.get(name).and_then(|&s| self.host(s))
    }
}

/// image -> (1 - cached fraction, slot) of hosts holding some of it: best first.
#[derive(Default)]
pub(super) struct CacheIndex(pub(super) HashMap<String, BTreeSet<(u32, usize)>>);

impl CacheIndex {
    pub(super) fn add(&mut self, slot: usize, cache: &BTreeMap<String, f64>) {
        for (image, frac) in cache {
            if *frac > 0.0 {
                self.0.entry(image.clone()).or_default().insert((cache_key(*frac), slot));
            }
        }
    }

    pub(super) fn remove(&mut self, slot: usize, cache: &BTreeMap<String, f64>) {
        for (image, frac) in cache {
            if let Some(set) = self.0.get_mut(image) {
                set.remove(&(cache_key(*frac), slot));
                if set.is_empty() {
                    self.0.remove(image);
                }
            }
        }
    }
}

/// Outstanding reservations, in shards by block of ids. A placing thread takes its ids a block
/// at a time ([`Reservations::next_id`]), so what one thread reserves goes into one shard and
/// two threads placing at once do not write each other's shards (nor a shared id counter) on
/// every placement; each shard has its own cache lines.
pub(super) struct Reservations {
    shards: [CachePadded<Mutex<IdMap<Reservation>>>; SHARDS],
    /// The first id of the next block not handed to a thread.
    next_block: CachePadded<AtomicU64>,
    /// This table among the schedulers of the process (a thread's block is for one table).
    table: u64,
}

const SHARDS: usize = 16;
/// Ids a thread takes at a time.
const ID_BLOCK: u64 = 256;

impl Default for Reservations {
    fn default() -> Self {
        static TABLES: AtomicU64 = AtomicU64::new(1);
        Reservations {
            shards: std::array::from_fn(|_| CachePadded::new(Mutex::default())),
            next_block: CachePadded::new(AtomicU64::new(0)),
            table: TABLES.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl Reservations {
    pub(super) fn shard(&self, id: ReservationId) -> MutexGuard<'_, IdMap<Reservation>> {
        self.shards[((id / ID_BLOCK) % SHARDS as u64) as usize].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new reservation id, from this thread's block of them (ids are unique, not ordered
    /// across threads; the first is 1).
    pub(super) fn next_id(&self) -> ReservationId {
        thread_local! {
            /// (table, next id, end of the block)
            static BLOCK: Cell<(u64, u64, u64)> = const { Cell::new((0, 0, 0)) };
        }
        BLOCK.with(|b| {
            let (table, next, end) = b.get();
            if table == self.table && next < end {
                b.set((table, next + 1, end));
                return next;
            }
            let start = self.next_block.fetch_add(ID_BLOCK, Ordering::Relaxed).max(1);
            let end = start - start % ID_BLOCK + ID_BLOCK;
            b.set((self.table, start + 1, end));
            start
        })
    }

    pub(super) fn all(&self) -> Vec<Reservation> {
        let mut v: Vec<Reservation> =
            self.shards.iter().flat_map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect::<Vec<_>>()).collect();
        v.sort_by_key(|r| r.id);
        v
    }
}

/// Holds the request's cpus and memory on a host (its lock held) under reservation `id`.
pub(super) fn reserve(
    h: &HostEntry,
    live: &mut HostLive,
    ad: &AdBlock,
    slot: usize,
    id: ReservationId,
    req: &PlacementRequest,
) -> (Placement, Reservation) {
    live.reserved_cpus += req.cpus;
    live.reserved_mem += req.memory_mib;
    live.held.push(id);
    h.publish(live, None);
    let placement = Placement { host: h.name.clone(), url: ad.url.clone(), reservation: id };
    let r =
        Reservation { id, host: h.name.clone(), cpus: req.cpus, memory_mib: req.memory_mib, confirmed: false, since: Instant::now(), slot };
    (placement, r)
}

/// Gives a reservation's capacity back to its host, if the host still holds it.
pub(super) fn unhold(h: &HostEntry, r: &Reservation) {
    let mut live = h.lock();
    if let Some(i) = live.held.iter().position(|&x| x == r.id) {
        live.held.swap_remove(i);
        live.reserved_cpus = live.reserved_cpus.saturating_sub(r.cpus);
        live.reserved_mem = live.reserved_mem.saturating_sub(r.memory_mib);
        h.publish(&live, None);
    }
}

pub(super) fn class_value(k: &ClassKey) -> Box<dyn Val> {
    use expr::val;
    val::map(vec![
        ("arch", val::string(&k.arch)),
        ("accel", val::string(&k.accel)),
        ("qemu_version", val::string(&k.qemu_version)),
        ("network_modes", val::strings(&k.network_modes)),
        ("networks", val::strings(&k.networks)),
        ("labels", val::string_map(&k.labels)),
        ("cpus", val::int(k.cpus as u64)),
        ("memory_mib", val::int(k.memory_mib)),
    ])
}

/// Orders a host in an image's cache index: most cached first.
pub(super) fn cache_key(frac: f64) -> u32 {
    let f = if frac.is_finite() { frac.clamp(0.0, 1.0) } else { 0.0 };
    ((1.0 - f) * 1_000_000.0) as u32
}
