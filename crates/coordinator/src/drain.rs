//! Draining a host: taking it out of service (`vgrid host drain NAME`) before its agent stops
//! for good. The host gets no new placement (the scheduler refuses it, naming the drain), then
//! each of its VMs is live-migrated to a host that can take it ([`Coordinator::migrate`]), or,
//! when none can or the migration fails, suspended to the image servers
//! ([`Coordinator::suspend`]). The drain and each VM's outcome are a record in the state store
//! (`records/drains/HOST`, a [`Drain`]), so a restarted coordinator keeps the host out of
//! service and goes on with the VMs not yet handled ([`Coordinator::recover_drains`], from
//! `reconcile`). `vgrid host undrain NAME` removes the record: the host is placed on again.
//!
//! A feature over the core: it changes VMs only through the core's and the features' own
//! operations (migrate, suspend), never their records directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vgrid_api::grid::{Drain, DrainStep, DrainedVm};
use vgrid_api::migrate::{MigrationStatus, VmMigrate};
use vgrid_api::vm::{VmRecord, VmState};

use crate::lifecycle::{now, Coordinator, CoordinatorError};
use crate::state::StateError;

/// The state store table of drains, keyed by host name.
const DRAINS: &str = "drains";
/// How long a drain waits for VMs of the host that are in a passing state (starting, stopping,
/// suspending, a host not answering) to settle before it gives up on them.
const SETTLE: Duration = Duration::from_secs(600);
/// How often a drain looks at a migration or a settling VM.
const POLL: Duration = Duration::from_millis(500);

/// The store key of `host`'s drain record: a placement on the host commits only while it is
/// absent ([`crate::lifecycle`]'s guard), whichever coordinator places.
pub(crate) fn drain_key(host: &str) -> String {
    crate::state::records::record_key(DRAINS, host)
}

/// The host whose drain record `key` is, if it is one.
pub(crate) fn drained_host(key: &str) -> Option<&str> {
    key.strip_prefix(&crate::state::records::record_prefix(DRAINS)).filter(|h| !h.is_empty() && !h.contains('/'))
}

impl Coordinator {
    /// Follows the drain records in the store, whoever writes them: a drain or an undrain on
    /// another coordinator takes the host out of (or back into) this scheduler's service at
    /// once. Started by [`Coordinator::new`]; ends with the coordinator.
    pub(crate) async fn follow_drains(weak: std::sync::Weak<Coordinator>) {
        use futures::StreamExt;
        let prefix = crate::state::records::record_prefix(DRAINS);
        loop {
            let Some(c) = weak.upgrade() else { return };
            let store = c.state.store().clone();
            let Ok(at) = store.revision().await else { return };
            // What the store says now (a drain or undrain missed while not watching)...
            if let Ok((rows, _)) = c.state.records().list_records(DRAINS).await {
                let drained: std::collections::HashSet<&str> = rows.iter().map(|(h, _)| h.as_str()).collect();
                for h in c.registry.hosts() {
                    c.sched.set_draining(&h.ad.name, drained.contains(h.ad.name.as_str()));
                }
                for h in &drained {
                    c.sched.set_draining(h, true);
                }
            }
            drop(c);
            // ...then every change after it.
            let Ok(mut changes) = store.watch(&prefix, at + 1).await else { return };
            while let Some(ev) = changes.next().await {
                let Ok(ev) = ev else { break };
                let Some(c) = weak.upgrade() else { return };
                if let Some(host) = drained_host(&ev.key) {
                    let draining = ev.kind == crate::state::EventKind::Put;
                    if c.sched.set_draining(host, draining) {
                        tracing::info!(host, draining, "drain record changed in the store");
                    }
                }
            }
        }
    }

    /// Takes `host` out of service and starts moving its VMs away (in the background; follow
    /// it with [`Coordinator::drain_status`]). Draining a host that is draining already
    /// answers its drain (a finished one is started again for the VMs still there).
    pub async fn drain(self: &Arc<Self>, host: &str) -> Result<Drain, CoordinatorError> {
        let known = self.registry.host(host).is_some();
        let existing = self.drain_status(host).await?;
        if !known && existing.is_none() {
            return Err(CoordinatorError::UnknownHost(host.to_string()));
        }
        let d = match existing {
            Some(d) if d.finished.is_none() => {
                self.sched.set_draining(host, true);
                return Ok(d);
            }
            Some(mut d) => {
                // Again: the VMs that could not be moved are tried again.
                d.vms.retain(|v| v.step != DrainStep::Failed);
                d.finished = None;
                d
            }
            None => Drain { host: host.to_string(), started: now(), finished: None, vms: vec![] },
        };
        self.put_drain(&d).await?;
        self.sched.set_draining(host, true);
        tracing::info!(host, "draining host: no new placements; its VMs are moved away");
        tokio::spawn(self.clone().run_drain(host.to_string()));
        Ok(d)
    }

    /// Puts a drained (or draining) host back in service. Answers the drain as it was, if any.
    pub async fn undrain(&self, host: &str) -> Result<Option<Drain>, CoordinatorError> {
        let d = self.drain_status(host).await?;
        if d.is_none() && self.registry.host(host).is_none() {
            return Err(CoordinatorError::UnknownHost(host.to_string()));
        }
        self.state.records().delete_record(DRAINS, host).await?;
        self.sched.set_draining(host, false);
        tracing::info!(host, "host back in service");
        Ok(d)
    }

    /// The drain of `host`, if it is draining or drained.
    pub async fn drain_status(&self, host: &str) -> Result<Option<Drain>, CoordinatorError> {
        let Some(e) = self.state.records().get_record(DRAINS, host).await? else { return Ok(None) };
        serde_json::from_slice(&e.value)
            .map(Some)
            .map_err(|source| StateError::Corrupt { key: crate::state::records::record_key(DRAINS, host), source }.into())
    }

    /// At open (from `reconcile`): hosts drained before the restart stay out of service, and
    /// drains that were under way go on.
    pub async fn recover_drains(self: &Arc<Self>) -> Result<(), CoordinatorError> {
        for host in self.mark_drained().await? {
            if !self.in_hand(&format!("drain:{host}")) {
                tracing::info!(host, "a drain was under way when the coordinator stopped: going on with it");
                tokio::spawn(self.clone().run_drain(host));
            }
        }
        Ok(())
    }

    /// Takes the drained hosts out of this scheduler's service; returns those whose drain is
    /// under way (every coordinator does this when it opens, the leader drives the drains).
    pub async fn mark_drained(&self) -> Result<Vec<String>, CoordinatorError> {
        let (rows, _) = self.state.records().list_records(DRAINS).await?;
        let mut under_way = Vec::new();
        for (host, _) in rows {
            self.sched.set_draining(&host, true);
            if self.drain_status(&host).await?.is_some_and(|d| d.finished.is_none()) {
                under_way.push(host);
            }
        }
        Ok(under_way)
    }

    async fn put_drain(&self, d: &Drain) -> Result<(), CoordinatorError> {
        // A `Drain` is plain data: encoding it cannot fail.
        let value = serde_json::to_vec(d).unwrap_or_default();
        self.state.records().put_record(DRAINS, &d.host, value).await?;
        Ok(())
    }

    /// Records one VM's step; false when the drain was called off (`undrain`) meanwhile.
    async fn drain_step(&self, host: &str, vm: &VmRecord, step: DrainStep, to: Option<String>, detail: Option<String>) -> bool {
        let Ok(Some(mut d)) = self.drain_status(host).await else { return false };
        let item = DrainedVm { id: vm.id.clone(), name: vm.name.clone(), step, to, detail };
        match d.vms.iter_mut().find(|v| v.id == vm.id) {
            Some(v) => *v = item,
            None => d.vms.push(item),
        }
        tracing::info!(host, vm = %vm.id, step = step.as_str(), "drain");
        self.put_drain(&d).await.is_ok()
    }

    /// Moves the host's VMs away one by one until none is left (or those left could not be
    /// moved), then marks the drain finished.
    async fn run_drain(self: Arc<Self>, host: String) {
        let key = format!("drain:{host}");
        let _held = self.hold(&key);
        let t0 = Instant::now();
        loop {
            let Ok(Some(d)) = self.drain_status(&host).await else { return };
            let on_host: Vec<VmRecord> = match self.records().await {
                Ok(v) => v.into_iter().filter(|v| v.host.as_deref() == Some(host.as_str()) && v.state.is_active()).collect(),
                Err(e) => {
                    tracing::warn!(host, "drain: reading the VMs: {e}");
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            };
            let handled = |v: &VmRecord| d.vms.iter().any(|x| x.id == v.id && x.step.done());
            let todo: Vec<&VmRecord> = on_host.iter().filter(|v| !handled(v)).collect();
            let Some(vm) = todo.iter().find(|v| v.state == VmState::Running) else {
                if todo.is_empty() || t0.elapsed() > SETTLE {
                    for v in &todo {
                        let why = format!("still {} on {host} after {} s", v.state.as_str(), SETTLE.as_secs());
                        self.drain_step(&host, v, DrainStep::Failed, None, Some(why)).await;
                    }
                    self.finish_drain(&host).await;
                    return;
                }
                // Starting, stopping, suspending, migrating, its host silent: let it settle.
                tokio::time::sleep(POLL).await;
                continue;
            };
            if !self.drain_vm(&host, vm).await {
                return;
            }
        }
    }

    /// One running VM: migrated, else suspended. False when the drain was called off.
    async fn drain_vm(self: &Arc<Self>, host: &str, vm: &VmRecord) -> bool {
        let why_not = match self.migrate(&vm.id, VmMigrate::default()).await {
            Ok(rec) => {
                let to = rec.migration.as_ref().map(|m| m.to.clone());
                if !self.drain_step(host, vm, DrainStep::Migrating, to.clone(), None).await {
                    return false;
                }
                match self.migration_end(&vm.id).await {
                    Ok(to) => return self.drain_step(host, vm, DrainStep::Migrated, Some(to), None).await,
                    Err(why) => why,
                }
            }
            Err(e) => e.to_string(),
        };
        // Nowhere to go (or the migration failed): suspended to the image servers.
        tracing::info!(host, vm = %vm.id, "drain: not migrated ({why_not}); suspending it");
        if !self.drain_step(host, vm, DrainStep::Suspending, None, Some(why_not.clone())).await {
            return false;
        }
        match self.suspend(&vm.id).await {
            Ok(s) => {
                let detail = format!("saved as {}; not migrated: {why_not}", s.saved.image);
                self.drain_step(host, vm, DrainStep::Suspended, None, Some(detail)).await
            }
            Err(e) => {
                // It may have stopped meanwhile: then it is not on the host any more.
                let detail = format!("neither migrated ({why_not}) nor suspended ({e})");
                self.drain_step(host, vm, DrainStep::Failed, None, Some(detail)).await
            }
        }
    }

    /// Waits until the VM's migration ends: the destination host when it completed, else why
    /// not.
    async fn migration_end(&self, id: &str) -> Result<String, String> {
        loop {
            tokio::time::sleep(POLL).await;
            let rec = self.get(id).await.map_err(|e| e.to_string())?;
            let Some(m) = rec.migration.as_ref() else { return Err("the migration vanished from the record".into()) };
            match m.status {
                MigrationStatus::Active => continue,
                MigrationStatus::Completed => return Ok(m.to.clone()),
                s => return Err(format!("migration to {} {}: {}", m.to, s.as_str(), m.error.clone().unwrap_or_default())),
            }
        }
    }

    async fn finish_drain(&self, host: &str) {
        let Ok(Some(mut d)) = self.drain_status(host).await else { return };
        d.finished = Some(now());
        let moved = d.vms.iter().filter(|v| matches!(v.step, DrainStep::Migrated | DrainStep::Suspended)).count();
        let failed = d.failed().count();
        if self.put_drain(&d).await.is_ok() {
            if failed == 0 {
                tracing::info!(host, moved, "host drained: its agent may now be stopped");
            } else {
                tracing::warn!(host, moved, failed, "host drained, but {failed} VMs could not be moved away");
            }
        }
    }
}
