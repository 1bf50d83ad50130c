//! Feasibility: whether a class of hosts, then a host, can take a request (built-in checks,
//! the owner's policy, the user's requirement), and why not when none can.

use super::expr::{Expr, Outcome, Scope};
use super::table::{Class, HostEntry, HostRead, Inner, Refused, RequestKey, Verdict, READS_IMAGE, READS_USER};
use super::types::{HostState, NoMatch, PlaceOptions, Refusal};
use cel::common::value::Val;
use crossbeam_epoch::Guard;
use std::collections::HashMap;
use std::sync::Arc;
use vgrid_api::grid::{HostAd, PlacementRequest};

/// Most cached owner-policy verdicts before the cache is cleared.
const MAX_POLICY_CACHE: usize = 65536;

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

/// The static verdicts of every class for one kind of request, and the feasible classes with
/// their cumulative member counts (a feasible host is a position in `0..total`).
pub(super) struct Feasible {
    /// By class id (`None`: feasible, or an empty class slot).
    pub(super) verdicts: Vec<Verdict>,
    /// Feasible class ids, each with the end of its members' positions.
    pub(super) classes: Vec<(u32, usize)>,
    pub(super) total: usize,
}

/// What a class verdict depends on: the requirement, the arch, the size, and the request fields
/// some owner policy reads.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct FeasibleKey {
    require: u64,
    arch: Option<String>,
    cpus: u32,
    memory_mib: u64,
    user: Option<String>,
    image: Option<String>,
}

impl FeasibleKey {
    pub(super) fn of(policy_reads: u8, req: &PlacementRequest, opts: &PlaceOptions, require: Option<&Expr>) -> FeasibleKey {
        FeasibleKey {
            require: require.map_or(0, |r| r.id),
            arch: opts.arch.clone(),
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            user: (policy_reads & READS_USER != 0).then(|| req.user.clone()),
            image: (policy_reads & READS_IMAGE != 0).then(|| req.image.clone()),
        }
    }
}

impl Inner {
    /// Every class's static verdict for this request.
    pub(super) fn feasible(&self, ctx: &mut PlaceCtx<'_>, policy_cache: &mut HashMap<RequestKey, Verdict>) -> Feasible {
        let mut verdicts = Vec::with_capacity(self.classes.len());
        let mut classes = Vec::new();
        let mut total = 0usize;
        for (id, c) in self.classes.iter().enumerate() {
            let Some(c) = c else {
                verdicts.push(None);
                continue;
            };
            let v = class_check(c, policy_cache, ctx);
            if v.is_none() {
                total += c.members.len();
                classes.push((id as u32, total));
            }
            verdicts.push(v);
        }
        Feasible { verdicts, classes, total }
    }

    /// One refusal per host, in host-name order (the slow path, taken only when nothing fits).
    /// `fits` is set when some host fits after all (capacity freed since the placement looked).
    pub(super) fn explain(&self, feasible: &Feasible, req: &PlacementRequest, require: Option<&Expr>, fits: &mut bool) -> NoMatch {
        let mut names: Vec<(&str, usize)> = self.by_name.iter().map(|(n, &s)| (n.as_str(), s)).collect();
        names.sort_unstable();
        let mut refusals = Vec::with_capacity(names.len());
        let guard = crossbeam_epoch::pin();
        for (name, slot) in names {
            let Some(h) = self.host(slot) else { continue };
            let class = self.class(h.class).map(|c| c.val.as_ref());
            let (clause, detail, transient) = match refusal(h, &guard, class, feasible, req, require) {
                Some(r) => r,
                None => {
                    *fits = true;
                    ("none".into(), "fits".into(), true)
                }
            };
            refusals.push(Refusal { host: name.to_string(), clause, detail, transient });
        }
        NoMatch { refusals }
    }
}

/// Why one host refuses the request now (`None`: it fits).
fn refusal(
    h: &HostEntry,
    guard: &Guard,
    class: Option<&dyn Val>,
    feasible: &Feasible,
    req: &PlacementRequest,
    require: Option<&Expr>,
) -> Option<(String, String, bool)> {
    let live = h.read(guard);
    if live.draining {
        let name = &h.name;
        let detail = format!("host is draining (taken out of service by `vgrid host drain`; `vgrid host undrain {name}` puts it back)");
        return Some(("draining".into(), detail, true));
    }
    if live.state != HostState::Ready {
        return Some(("state".into(), "host is lost (missed heartbeats)".into(), true));
    }
    if let Some(r) = feasible.verdicts.get(h.class as usize).cloned().unwrap_or_else(|| refused("state", "host vanished", true)) {
        return Some((r.clause.clone(), r.detail.clone(), r.transient));
    }
    if live.free_cpus() < req.cpus {
        let detail = format!(
            "{} cpus free ({} advertised, {} reserved), {} requested",
            live.free_cpus(),
            live.ad.free_cpus,
            live.reserved_cpus,
            req.cpus
        );
        return Some(("free_cpus".into(), detail, true));
    }
    if live.free_mem() < req.memory_mib {
        let detail = format!(
            "{} MiB free ({} advertised, {} reserved), {} requested",
            live.free_mem(),
            live.ad.free_memory_mib,
            live.reserved_mem,
            req.memory_mib
        );
        return Some(("free_memory_mib".into(), detail, true));
    }
    if let Some((clause, detail, transient)) = share_refusal(live.ad, req) {
        return Some((clause.into(), detail, transient));
    }
    if let (Some(r), Some(class)) = (require, class) {
        match r.check(&live.view(class), Some(Scope::Host)) {
            Outcome::True => {}
            Outcome::False { clause, detail, .. } | Outcome::Error { clause, detail, .. } => return Some((clause, detail, true)),
        }
    }
    None
}

/// Dynamic checks of one host: drain, state, free capacity, host-scope clauses.
pub(super) fn fits(live: &HostRead<'_>, class: &dyn Val, req: &PlacementRequest, require: Option<&Expr>, host_clauses: bool) -> bool {
    if live.draining || live.state != HostState::Ready || live.free_cpus() < req.cpus || live.free_mem() < req.memory_mib {
        return false;
    }
    if share_refusal(live.ad, req).is_some() {
        return false;
    }
    match require {
        Some(r) if host_clauses => r.check(&live.view(class), Some(Scope::Host)) == Outcome::True,
        _ => true,
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
pub(super) struct PlaceCtx<'a> {
    pub(super) req: &'a PlacementRequest,
    opts: &'a PlaceOptions,
    require: Option<&'a Expr>,
    /// `request` as CEL sees it, built when a policy first needs it.
    req_val: Option<Box<dyn Val>>,
    /// Policy id -> its verdict for this request (few distinct policies per placement).
    policies: Vec<(u64, Verdict)>,
}

impl<'a> PlaceCtx<'a> {
    pub(super) fn new(req: &'a PlacementRequest, opts: &'a PlaceOptions, require: Option<&'a Expr>) -> Self {
        PlaceCtx { req, opts, require, req_val: None, policies: Vec::new() }
    }
}

fn class_check(c: &Class, policy_cache: &mut HashMap<RequestKey, Verdict>, ctx: &mut PlaceCtx<'_>) -> Verdict {
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
        let verdict = verdict_of(r.check(c.val.as_ref(), Some(Scope::Class)), "");
        if verdict.is_some() {
            return verdict;
        }
    }
    None
}

fn request_value(req: &PlacementRequest) -> Box<dyn Val> {
    use super::expr::val;
    val::map(vec![
        ("user", val::string(&req.user)),
        ("image", val::string(&req.image)),
        ("cpus", val::int(req.cpus as u64)),
        ("memory_mib", val::int(req.memory_mib)),
    ])
}
