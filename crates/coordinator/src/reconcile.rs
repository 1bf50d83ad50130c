//! Reconciliation: what the coordinator's records become when what hosts report, or what a
//! restart left half-done, says otherwise. A feature on the core (it sends lifecycle events
//! through [`Coordinator::apply`] and never writes a record itself), called from the top:
//!
//! * [`Coordinator::heartbeat`], a host's heartbeat as the HTTP handler takes it: the core
//!   registers the host and its advertisement, `accounting` records its usage, then the records
//!   of the VMs on that host are reconciled with its report ([`plan_reconcile`]: missing ones
//!   `lost` or `stopped`, `unknown` ones it runs `running` again, stuck ones settled, the
//!   orphans listed, never killed);
//! * [`Coordinator::recover_interrupted`], started by whoever opens the coordinator, right after
//!   [`Coordinator::new`]: each VM found mid-operation is queued again, its launch settled from
//!   its host (running: adopted; never arrived: sent again; neither in time: failed), watched
//!   again, or handed to the feature whose operation it was in (`suspend`: a save under way;
//!   `migrate`: a migration whose driver died with the coordinator).

use std::sync::Arc;
use std::time::Duration;

use vgrid_api::host::{HostHeartbeat, VmReport};
use vgrid_api::migrate::MigrationStatus;
use vgrid_api::vm::{VmRecord, VmState};

use crate::lifecycle::table::Event;
use crate::lifecycle::{now, Coordinator, CoordinatorError};

/// A record absent from its host's report is `lost` only once it has been in its state this
/// long (a heartbeat may have been composed before a launch finished).
pub const REPORT_GRACE: Duration = Duration::from_secs(10);
/// A VM `starting` for longer than this is resolved from its host's report.
pub const STUCK_STARTING: Duration = Duration::from_secs(15 * 60);
/// Slack after a migration's own maximum duration before a heartbeat resolves it.
pub const STUCK_MIGRATING_SLACK: Duration = Duration::from_secs(120);

impl Coordinator {
    /// A host heartbeat: records the ad (refused, with nothing recorded, when its owner policy
    /// is not valid CEL) and the usage it reports, reconciles the records of the VMs on the
    /// host with its report; VMs of a returning host that it still runs are running again.
    /// Answers the image servers the host should use.
    pub async fn heartbeat(&self, hb: HostHeartbeat) -> Result<Vec<String>, CoordinatorError> {
        let name = hb.ad.name.clone();
        self.advertise(hb.ad.clone()).await?;
        let running: Vec<String> = hb.vms.iter().filter(|v| !v.incoming).map(|v| v.id.clone()).collect();
        let records = self.records().await.unwrap_or_default();
        if let Err(e) = self.accounting().record(&name, &hb.usage, |id| records.iter().find(|v| v.id == id).cloned()).await {
            tracing::error!(host = %name, "cannot record usage: {e}");
        }
        let report = hb.vms.clone();
        let waiting = hb.waiting.clone();
        let returned = self.registry.host_beat(hb);
        // Every coordinator registers the host (hosts heartbeat to all of them); the leader
        // alone changes records from its report, so that two coordinators never act on one
        // report twice (their writes are compare-and-swap through the lifecycle table anyway).
        let leads = self.is_leader();
        let orphans = self.reconcile(&name, &report, &records, leads).await;
        self.registry.set_orphans(&name, orphans);
        if leads {
            self.image_waits(&name, &waiting, &records).await;
        }
        if returned && leads {
            tracing::info!(host = %name, "host ready");
            for vm in &records {
                if vm.host.as_deref() == Some(name.as_str()) && vm.state == VmState::Unknown && running.contains(&vm.id) {
                    let _ = self.apply(&vm.id, Event::HostBack).await;
                }
            }
        }
        Ok(self.registry.image_server_urls())
    }

    /// Reconciles the `records` of VMs on `host` with its heartbeat's report; returns the
    /// orphans (QEMUs the host runs that no record places there). Only the orphans when not
    /// `act` (a coordinator that does not lead).
    pub(crate) async fn reconcile(&self, host: &str, report: &[VmReport], records: &[VmRecord], act: bool) -> Vec<String> {
        let plan = plan_reconcile(host, report, records, now());
        for (id, action) in plan.actions.into_iter().filter(|_| act) {
            if let Action::Lost(reason) = &action {
                tracing::warn!(vm = %id, host, "{reason}");
            }
            let _ = self.apply(&id, action.event()).await;
        }
        plan.orphans
    }

    /// Starts the recovery of what the coordinator was doing when it stopped: VMs that were
    /// starting are settled from their host ([`Coordinator::recover_launch`]), queued ones are queued again, running ones are watched again
    /// once their host reports in, interrupted suspends, resumes and migrations are settled
    /// (in the background), so a restart neither loses nor duplicates a VM. Called once, right
    /// after [`Coordinator::new`].
    pub async fn recover_interrupted(self: &Arc<Self>) -> Result<(), CoordinatorError> {
        for vm in self.records().await? {
            // Work this process holds already (a coordinator that has just become leader).
            if !self.in_hand(&vm.id) {
                self.clone().restarted(vm).await;
            }
        }
        // Drained hosts stay out of service; drains under way go on.
        self.recover_drains().await
    }

    /// What a VM found at startup needs: queued again, its launch, resume or suspend settled,
    /// its migration undone, or watched again.
    ///
    /// The VM is held in hand from now until its recovery task ends, so that a take-over that
    /// follows at once (another coordinator gone) leaves it to this one.
    async fn restarted(self: Arc<Self>, vm: VmRecord) {
        let held = self.hold(&vm.id);
        match vm.state {
            VmState::Pending if vm.host.is_none() => {
                // Queued when the coordinator stopped: queue it again.
                tokio::spawn(async move {
                    self.requeue(vm).await;
                    drop(held);
                });
            }
            VmState::Pending | VmState::Starting => {
                // Placed on a host, its launch (or a resume's restore) possibly sent: the host
                // may run it, be launching it, or never have heard of it.
                tokio::spawn(async move {
                    self.recover_launch(vm.id).await;
                    drop(held);
                });
            }
            VmState::Running | VmState::Stopping | VmState::Unknown | VmState::Suspending => {
                if vm.state == VmState::Suspending {
                    let me = self.clone();
                    let id = vm.id.clone();
                    tokio::spawn(async move { me.recover_suspending(id).await });
                }
                tokio::spawn(async move {
                    self.watch(vm.id.clone()).await;
                    drop(held);
                });
            }
            VmState::Migrating => {
                // The migration's driver died with the coordinator: undo it, keep watching.
                tokio::spawn(async move {
                    self.migration_interrupted(vm).await;
                    drop(held);
                });
            }
            VmState::Stopped | VmState::Failed | VmState::Suspended | VmState::Lost => {}
        }
    }
}

/// What a heartbeat changes about one record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    Lost(String),
    Stopped,
    Failed(String),
    Running(u32),
}

impl Action {
    /// The lifecycle event of the action.
    pub(crate) fn event(self) -> Event {
        match self {
            Action::Lost(reason) => Event::SettledLost { reason },
            Action::Stopped => Event::SettledStopped,
            Action::Failed(reason) => Event::SettledFailed { reason },
            Action::Running(pid) => Event::SettledRunning { pid },
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub actions: Vec<(String, Action)>,
    pub orphans: Vec<String>,
}

/// The reconciliation of one heartbeat, as a pure function of the records and the report.
pub(crate) fn plan_reconcile(host: &str, report: &[VmReport], records: &[VmRecord], now: u64) -> Plan {
    let mut plan = Plan::default();
    let reported = |id: &str| report.iter().find(|r| r.id == id && !r.incoming);
    let age = |v: &VmRecord| now.saturating_sub(v.state_since.unwrap_or(0));
    for v in records.iter().filter(|v| v.host.as_deref() == Some(host)) {
        let here = reported(&v.id);
        match (v.state, here) {
            (VmState::Running | VmState::Unknown, None) if age(v) >= REPORT_GRACE.as_secs() => plan
                .actions
                .push((v.id.clone(), Action::Lost(format!("host {host} reported that it no longer runs this VM (its QEMU is gone)")))),
            (VmState::Stopping, None) if age(v) >= REPORT_GRACE.as_secs() => plan.actions.push((v.id.clone(), Action::Stopped)),
            (VmState::Unknown, Some(r)) => plan.actions.push((v.id.clone(), Action::Running(r.pid))),
            (VmState::Starting, here) if age(v) >= STUCK_STARTING.as_secs() => plan.actions.push((
                v.id.clone(),
                match here {
                    Some(r) => Action::Running(r.pid),
                    None => Action::Failed(format!("starting on host {host} took longer than {} s", STUCK_STARTING.as_secs())),
                },
            )),
            (VmState::Migrating, here) => {
                let bound = v.migration.as_ref().map(|m| m.max_seconds).unwrap_or(0) + STUCK_MIGRATING_SLACK.as_secs();
                if age(v) >= bound {
                    plan.actions.push((
                        v.id.clone(),
                        match here {
                            Some(r) => Action::Running(r.pid),
                            None => Action::Lost(format!("stuck migrating for {} s and host {host} no longer runs it", age(v))),
                        },
                    ));
                }
            }
            _ => {}
        }
    }
    for r in report {
        let known = records.iter().any(|v| {
            let m = v.migration.as_ref();
            v.id == r.id
                && v.state.is_active()
                && (if r.incoming {
                    // Received by a migration that the record says goes here.
                    v.state == VmState::Migrating && m.map(|m| m.to == host).unwrap_or(false)
                } else {
                    v.host.as_deref() == Some(host)
                        // The destination just took over (its report raced the record)...
                        || (v.state == VmState::Migrating && m.map(|m| m.to == host).unwrap_or(false))
                        // ...or the source has not removed its paused QEMU yet.
                        || m.map(|m| {
                            m.from == host
                                && m.status == MigrationStatus::Completed
                                && now.saturating_sub(m.finished.unwrap_or(0)) < REPORT_GRACE.as_secs()
                        })
                        .unwrap_or(false)
                })
        });
        if !known {
            plan.orphans.push(r.id.clone());
        }
    }
    plan.orphans.sort();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgrid_api::migrate::Migration;

    fn rec(id: &str, host: &str, state: VmState, since: u64) -> VmRecord {
        let config = vgrid_api::vm::VmConfig::new(vgrid_api::ImageRef { name: "sample".into(), version: Some(1) }).with_memory_mib(128);
        let mut r = VmRecord::new(id, id, "alice", config, 0);
        r.state = state;
        r.host = Some(host.into());
        r.state_since = Some(since);
        r
    }

    fn rep(id: &str, incoming: bool) -> VmReport {
        VmReport { id: id.into(), pid: 42, incoming }
    }

    #[test]
    fn missing_vms_become_lost_and_unknown_ones_are_orphans() {
        let now = 1000;
        let records = vec![
            rec("a", "h1", VmState::Running, 0),
            rec("b", "h1", VmState::Running, 0),
            rec("young", "h1", VmState::Running, now - 1),
            rec("other", "h2", VmState::Running, 0),
            rec("stopping", "h1", VmState::Stopping, 0),
            rec("unknown", "h1", VmState::Unknown, 0),
            rec("done", "h1", VmState::Stopped, 0),
        ];
        let report = vec![rep("a", false), rep("unknown", false), rep("stranger", false), rep("done", false), rep("other", false)];
        let p = plan_reconcile("h1", &report, &records, now);
        assert!(p.actions.iter().any(|(id, a)| id == "b" && matches!(a, Action::Lost(r) if r.contains("h1"))));
        assert!(!p.actions.iter().any(|(id, _)| id == "young" || id == "a" || id == "other" || id == "done"), "{:?}", p.actions);
        assert!(p.actions.contains(&("stopping".into(), Action::Stopped)));
        assert!(p.actions.contains(&("unknown".into(), Action::Running(42))));
        // Never killed, only listed: a VM with no record, one stopped, one recorded elsewhere.
        assert_eq!(p.orphans, vec!["done".to_string(), "other".to_string(), "stranger".to_string()]);
    }

    #[test]
    fn migrations_resolve_only_after_their_bound_and_incoming_vms_are_expected() {
        let mut m = rec("m", "h1", VmState::Migrating, 1000);
        m.migration = Some(Migration::begin("h1", "h2", 100, 60, 1000));
        let records = vec![m];
        // On the destination, the incoming QEMU is expected: no orphan.
        let p = plan_reconcile("h2", &[rep("m", true)], &records, 1010);
        assert!(p.orphans.is_empty() && p.actions.is_empty(), "{p:?}");
        // At the source, within the bound: nothing happens.
        let p = plan_reconcile("h1", &[rep("m", false)], &records, 1100);
        assert!(p.actions.is_empty());
        // Past the bound, the source's report decides.
        let p = plan_reconcile("h1", &[rep("m", false)], &records, 1000 + 60 + 121);
        assert_eq!(p.actions, vec![("m".to_string(), Action::Running(42))]);
        let p = plan_reconcile("h1", &[], &records, 1000 + 60 + 121);
        assert!(matches!(&p.actions[0].1, Action::Lost(_)));
    }

    #[test]
    fn a_vm_stuck_starting_is_settled_from_the_report_after_its_bound() {
        let bound = STUCK_STARTING.as_secs();
        let records = vec![rec("s1", "h1", VmState::Starting, 0), rec("s2", "h1", VmState::Starting, 0)];
        // Within the bound nothing happens, even when the host does not report it yet.
        assert!(plan_reconcile("h1", &[], &records, bound - 1).actions.is_empty());
        let p = plan_reconcile("h1", &[rep("s1", false)], &records, bound);
        assert!(p.actions.contains(&("s1".to_string(), Action::Running(42))), "{p:?}");
        assert!(p.actions.iter().any(|(id, a)| id == "s2" && matches!(a, Action::Failed(r) if r.contains("h1"))), "{p:?}");
        assert!(p.orphans.is_empty());
    }

    #[test]
    fn after_a_migration_neither_side_reports_an_orphan_while_the_record_catches_up() {
        let mut m = rec("m", "h2", VmState::Running, 1000);
        m.migration = Some(Migration {
            status: MigrationStatus::Completed,
            finished: Some(1000),
            downtime_ms: Some(20),
            total_ms: Some(800),
            ..Migration::begin("h1", "h2", 100, 60, 990)
        });
        let records = vec![m];
        // The source still reports its paused QEMU for a moment: not an orphan...
        assert!(plan_reconcile("h1", &[rep("m", false)], &records, 1002).orphans.is_empty());
        // ...but one that stays is.
        assert_eq!(plan_reconcile("h1", &[rep("m", false)], &records, 1000 + REPORT_GRACE.as_secs()).orphans, vec!["m"]);
    }
}
