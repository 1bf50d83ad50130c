//! Scoring: among the feasible hosts, a bounded sample (plus hosts holding the image) is
//! ranked, and the best one gets a reservation.

use super::expr::Expr;
use super::feasibility::{fits, Feasible};
use super::table::{self, HostRead, Inner};
use super::types::Placement;
use super::Scheduler;
use crossbeam_epoch::Guard;
use std::cell::Cell;
use vgrid_api::grid::PlacementRequest;

/// Fewest feasible hosts scored per placement (when that many exist).
pub const MIN_SAMPLE: usize = 4;
/// Most hosts holding the image in cache that are scored besides the sample.
pub const MAX_CACHED_CANDIDATES: usize = 32;

/// How one attempt at a placement ended.
pub(super) enum Attempt {
    Placed(Placement),
    /// Hosts fitted, but each lost its capacity to a concurrent placement before it was held.
    Raced,
    /// No feasible host fitted.
    Nothing,
}

/// A host that fitted, its score, and the version of the host it was checked at.
struct Candidate {
    slot: usize,
    user: f64,
    rank: DefaultRank,
    version: u64,
}

impl Scheduler {
    /// Samples the feasible hosts (the table held shared), scores those that fit, and reserves
    /// on the best one whose capacity is still there (checking again, under the host's lock,
    /// a host that changed since it was scored).
    pub(super) fn place_once(
        &self,
        inner: &Inner,
        feasible: &Feasible,
        req: &PlacementRequest,
        require: Option<&Expr>,
        rank: Option<&Expr>,
    ) -> Attempt {
        let total = feasible.total;
        if total == 0 {
            return Attempt::Nothing;
        }
        let host_clauses = require.is_some_and(|r| r.has_host_scope());
        let guard = crossbeam_epoch::pin();
        let consider = |slot: usize| -> Option<Candidate> {
            let h = inner.host(slot)?;
            let class = inner.class(h.class)?.val.as_ref();
            // The published values, not the lock: scoring writes nothing shared.
            let live = h.read(&guard);
            if !fits(&live, class, req, require, host_clauses) {
                return None;
            }
            let user = match rank {
                Some(r) => r.rank(&live.view(class)).unwrap_or(f64::NEG_INFINITY),
                None => 0.0,
            };
            Some(Candidate { slot, user, rank: DefaultRank::of(&live, &req.image), version: live.version })
        };
        let sample = sample_size(inner.by_name.len());
        let mut candidates: Vec<Candidate> = Vec::with_capacity(sample + 8);

        // The hosts holding most of the image, first (a few of them).
        let want = (sample / 2).clamp(2, MAX_CACHED_CANDIDATES);
        let cached: Vec<usize> =
            self.cache_index().0.get(&req.image).map(|set| set.iter().map(|&(_, s)| s).take(4 * want).collect()).unwrap_or_default();
        for slot in cached {
            if candidates.len() >= want {
                break;
            }
            let feasible_class = inner.host(slot).is_some_and(|h| matches!(feasible.verdicts.get(h.class as usize), Some(None)));
            if feasible_class {
                candidates.extend(consider(slot));
            }
        }

        // A bounded sample of the rest, visited in a random order (random start, random stride
        // coprime to the count), stopping after `sample` feasible hosts.
        let start = (rand() % total as u64) as usize;
        let stride = {
            let mut s = 1usize;
            for _ in 0..8 {
                let t = 1 + (rand() % total as u64) as usize;
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
            let ci = feasible.classes.partition_point(|&(_, end)| end <= pos);
            let (cid, _) = feasible.classes[ci];
            let begin = if ci == 0 { 0 } else { feasible.classes[ci - 1].1 };
            let Some(slot) = inner.class(cid).and_then(|c| c.members.get(pos - begin).copied()) else { break };
            let fitted = if candidates.iter().any(|c| c.slot == slot) {
                true
            } else if let Some(c) = consider(slot) {
                candidates.push(c);
                true
            } else {
                false
            };
            if fitted {
                found += 1;
                if found >= sample {
                    break;
                }
            }
            pos = (pos + stride) % total;
        }
        if candidates.is_empty() {
            return Attempt::Nothing;
        }

        // The best first (the user's rank, then the default rank); a host that lost its
        // capacity meanwhile gives way to the next.
        while !candidates.is_empty() {
            let mut best = 0;
            for (i, c) in candidates.iter().enumerate().skip(1) {
                let b = &candidates[best];
                if c.user > b.user || (c.user == b.user && c.rank.better_than(&b.rank)) {
                    best = i;
                }
            }
            let c = candidates.swap_remove(best);
            if let Some(p) = self.try_reserve(inner, &c, req, require, host_clauses, &guard) {
                return Attempt::Placed(p);
            }
        }
        Attempt::Raced
    }

    fn try_reserve(
        &self,
        inner: &Inner,
        c: &Candidate,
        req: &PlacementRequest,
        require: Option<&Expr>,
        host_clauses: bool,
        guard: &Guard,
    ) -> Option<Placement> {
        let h = inner.host(c.slot)?;
        let class = inner.class(h.class)?.val.as_ref();
        let mut live = h.lock();
        let now = h.read_locked(&live, guard);
        if now.version != c.version && !fits(&now, class, req, require, host_clauses) {
            return None;
        }
        let ad = now.ad;
        let id = self.reservations.next_id();
        let (placement, r) = table::reserve(h, &mut live, ad, c.slot, id, req);
        // Into the map before the host's lock goes: an ad finds every held id there (or being
        // released).
        self.reservations.shard(id).insert(id, r);
        Some(placement)
    }
}

/// A random number from this thread's generator (xorshift64*, seeded per thread).
fn rand() -> u64 {
    thread_local! {
        static RNG: Cell<u64> = const { Cell::new(0) };
    }
    RNG.with(|c| {
        let mut x = c.get();
        if x == 0 {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
            x = (t ^ (c as *const Cell<u64> as u64).rotate_left(32)) | 1;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
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
    fn of(h: &HostRead<'_>, image: &str) -> DefaultRank {
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
            vms: h.ad.running_vms.saturating_add(h.held_count),
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
