//! Feasibility: whether a class of hosts, then a host, can take a request (built-in checks,
//! the owner's policy, the user's requirement), and why not when none can.

use super::expr::{Expr, Outcome, Scope};
use super::table::{Class, Inner, Refused, RequestKey, Verdict};
use super::types::{HostState, NoMatch, PlaceOptions, Refusal};
use cel::common::value::Val;
use std::collections::HashMap;
use std::sync::Arc;
use vgrid_api::grid::{HostAd, PlacementRequest};

/// Most cached verdicts per class before its cache is cleared.
const MAX_CLASS_CACHE: usize = 1024;
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

impl Inner {
    /// The static verdict of class `id` for this request (memoised for this placement).
    pub(super) fn class_verdict(&mut self, id: u32, ctx: &mut PlaceCtx<'_>) -> Verdict {
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

    /// Dynamic checks of one host: state, free capacity, host-scope clauses.
    pub(super) fn host_fits(&mut self, slot: usize, req: &PlacementRequest, require: Option<&Expr>, host_clauses: bool) -> bool {
        let Some(h) = self.hosts[slot].as_mut() else { return false };
        if self.draining.contains(&h.ad.name) {
            return false;
        }
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
    pub(super) fn explain(&mut self, req: &PlacementRequest, opts: &PlaceOptions, require: Option<&Expr>) -> NoMatch {
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
            if self.draining.contains(&name) {
                let detail =
                    format!("host is draining (taken out of service by `vgrid host drain`; `vgrid host undrain {name}` puts it back)");
                refusals.push(refuse("draining", detail, true));
                continue;
            }
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
pub(super) struct PlaceCtx<'a> {
    req: &'a PlacementRequest,
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

fn request_value(req: &PlacementRequest) -> Box<dyn Val> {
    use super::expr::val;
    val::map(vec![
        ("user", val::string(&req.user)),
        ("image", val::string(&req.image)),
        ("cpus", val::int(req.cpus as u64)),
        ("memory_mib", val::int(req.memory_mib)),
    ])
}
