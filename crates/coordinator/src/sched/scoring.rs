//! Scoring: among the feasible hosts, a bounded sample (plus hosts holding the image) is
//! ranked, and the best one gets a reservation.

use super::expr::Expr;
use super::feasibility::PlaceCtx;
use super::table::{HostEntry, Inner};
use super::types::{PlaceOptions, Placement};
use vgrid_api::grid::PlacementRequest;

/// Fewest feasible hosts scored per placement (when that many exist).
pub const MIN_SAMPLE: usize = 4;
/// Most hosts holding the image in cache that are scored besides the sample.
pub const MAX_CACHED_CANDIDATES: usize = 32;

impl Inner {
    pub(super) fn place(
        &mut self,
        req: &PlacementRequest,
        opts: &PlaceOptions,
        require: Option<&Expr>,
        rank: Option<&Expr>,
    ) -> Option<Placement> {
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
        Some(self.reserve(slot, req))
    }
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
