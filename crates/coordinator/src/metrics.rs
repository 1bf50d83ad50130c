//! What the coordinator counts for Prometheus (`vgrid_trust::metrics` serves the page):
//! placements and refusals by reason, VMs by state, the scheduler's queue, each host's
//! heartbeat age, whether it leads, migration durations and downtimes, suspend and resume durations.

use std::sync::{Arc, OnceLock, Weak};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use vgrid_api::vm::VmState;
use vgrid_trust::metrics::{duration_buckets, labels, register, Labels};

use crate::lifecycle::Coordinator;
use crate::sched::PlaceError;

pub struct Metrics {
    placements: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    vms: Family<Labels, Gauge>,
    queue: Gauge,
    leader: Gauge,
    hosts: Family<Labels, Gauge>,
    heartbeat_age: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    migration: Histogram,
    downtime: Histogram,
    suspend: Histogram,
    resume: Histogram,
}

/// Every state a VM record can be in (each listed on the page, 0 when none is in it).
const STATES: [VmState; 11] = VmState::ALL;

pub fn m() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = Metrics {
            placements: Family::default(),
            refusals: Family::default(),
            vms: Family::default(),
            queue: Gauge::default(),
            leader: Gauge::default(),
            hosts: Family::default(),
            heartbeat_age: Family::default(),
            migration: duration_buckets(),
            downtime: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16)),
            suspend: duration_buckets(),
            resume: duration_buckets(),
        };
        register("vgrid_placements", "VMs placed on a host, by kind (run, migrate, resume)", m.placements.clone());
        register(
            "vgrid_placement_refusals",
            "Placements refused, by kind and reason (a built-in check such as free_memory_mib, requirement_or_policy, no_hosts, timed_out, invalid)",
            m.refusals.clone(),
        );
        register("vgrid_vms", "VM records by state", m.vms.clone());
        register("vgrid_scheduler_queue_length", "VM requests waiting for capacity", m.queue.clone());
        register(
            "vgrid_coordinator_leader",
            "1 while this coordinator leads the grid (runs the once-per-grid work), else 0",
            m.leader.clone(),
        );
        register("vgrid_hosts", "Registered hosts by state", m.hosts.clone());
        register("vgrid_host_heartbeat_age_seconds", "Seconds since each host's last heartbeat", m.heartbeat_age.clone());
        register("vgrid_migration_duration_seconds", "Live migrations that completed: total time", m.migration.clone());
        register("vgrid_migration_downtime_seconds", "Live migrations that completed: the guest's downtime", m.downtime.clone());
        register("vgrid_suspend_duration_seconds", "Suspends that completed: request to suspended", m.suspend.clone());
        register("vgrid_resume_duration_seconds", "Resumes that completed: launch on the new host to running", m.resume.clone());
        m
    })
}

/// Registers the coordinator's families and the scrape-time gauges read from `c`.
pub fn init(c: &Arc<Coordinator>) {
    vgrid_trust::metrics::init();
    m();
    let weak: Weak<Coordinator> = Arc::downgrade(c);
    vgrid_trust::metrics::on_scrape(move || {
        let weak = weak.clone();
        async move {
            if let Some(c) = weak.upgrade() {
                refresh(&c).await;
            }
        }
    });
}

async fn refresh(c: &Coordinator) {
    let m = m();
    m.queue.set(c.sched.waiting() as i64);
    m.leader.set(c.is_leader() as i64);
    if let Ok(vms) = c.list().await {
        for s in STATES {
            m.vms.get_or_create(&labels(&[("state", s.as_str())])).set(vms.iter().filter(|v| v.state == s).count() as i64);
        }
    }
    m.heartbeat_age.clear();
    m.hosts.clear();
    for h in c.registry.hosts() {
        m.heartbeat_age.get_or_create(&labels(&[("host", &h.ad.name)])).set(h.last_seen_secs);
        let state = format!("{:?}", h.state).to_lowercase();
        m.hosts.get_or_create(&labels(&[("state", &state)])).inc();
    }
}

/// A placement of `kind` (run, migrate, resume) was made.
pub fn placed(kind: &str) {
    m().placements.get_or_create(&labels(&[("kind", kind)])).inc();
}

/// A placement of `kind` was refused: counted once per reason it had (a refusal names a reason
/// per host; user expressions are one reason, so the label's values stay few).
pub fn refused(kind: &str, e: &PlaceError) {
    let mut reasons: Vec<&str> = match e {
        PlaceError::Invalid(_) => vec!["invalid"],
        PlaceError::TimedOut { .. } => vec!["timed_out"],
        PlaceError::NoMatch(nm) if nm.refusals.is_empty() => vec!["no_hosts"],
        PlaceError::NoMatch(nm) => nm.refusals.iter().map(|r| reason(&r.clause)).collect(),
    };
    reasons.sort_unstable();
    reasons.dedup();
    for r in reasons {
        m().refusals.get_or_create(&labels(&[("kind", kind), ("reason", r)])).inc();
    }
}

fn reason(clause: &str) -> &'static str {
    const BUILT_IN: [&str; 7] = ["state", "arch", "cpus", "memory", "free_cpus", "free_memory_mib", "draining"];
    BUILT_IN.iter().find(|b| **b == clause).copied().unwrap_or("requirement_or_policy")
}

/// A migration completed in `total_ms` with `downtime_ms` of downtime.
pub fn migrated(total_ms: Option<u64>, downtime_ms: Option<u64>) {
    if let Some(t) = total_ms {
        m().migration.observe(t as f64 / 1000.0);
    }
    if let Some(d) = downtime_ms {
        m().downtime.observe(d as f64 / 1000.0);
    }
}

/// A suspend completed after `secs`.
pub fn suspended(secs: f64) {
    m().suspend.observe(secs);
}

/// A resume's launch reached `running` after `secs` (from the launch sent to its host).
pub fn resumed(secs: f64) {
    m().resume.observe(secs);
}
