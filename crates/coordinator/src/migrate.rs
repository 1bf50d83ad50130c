//! Live migration, coordinator side (the reconciliation of records with hosts' reports is
//! `reconcile`'s; it hands an interrupted migration to [`Coordinator::migration_interrupted`]).
//!
//! Destination first. The scheduler reserves capacity on the destination (`--to`
//! pins `host.name`; otherwise any host matching the VM's requirement other than the source),
//! the destination prepares an incoming QEMU (`POST /host/v1/migrate/incoming`), the source
//! mirrors its overlay and sends memory (`POST /host/v1/vms/{id}/migrate`, polled), and only
//! when the destination reports the guest running (`.../finish`) does the record's host change
//! and the source QEMU go. Anything else leaves the VM running at the source, the record on the
//! source, the destination's QEMU killed and its reservation released. Read-write volumes
//! travel like the root disk (their overlays mirrored by the source); the destination gets
//! fresh epochs, raised once it has taken over, which fences the source.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vgrid_api::grid::{HostState, PlacementRequest};
use vgrid_api::host::{FinishRequest, IncomingReady, IncomingRequest, LaunchRequest, Launched, SendRequest, MAX_CONSOLE_HISTORY};
use vgrid_api::migrate::{Migration, MigrationStatus, VmMigrate, DEFAULT_DOWNTIME_MS, DEFAULT_MAX_SECONDS, MAX_BANDWIDTH_MIB};
use vgrid_api::vm::{VmRecord, VmState};

use crate::hosts::{HostCallError, HostClient};
use crate::lifecycle::admission::{explain, launch_request, placement_request};
use crate::lifecycle::admit::place_error;
use crate::lifecycle::guard::Admit;
use crate::lifecycle::records::CAS_RETRIES;
use crate::lifecycle::table::{Event, MigrationOutcome};
use crate::lifecycle::{Coordinator, CoordinatorError};
use crate::sched::{PlaceError, PlaceOptions, Placement};

impl HostClient {
    pub async fn migrate_incoming(&self, req: &IncomingRequest) -> Result<IncomingReady, HostCallError> {
        let r: Option<IncomingReady> = self.call(self.http.post(self.u("/host/v1/migrate/incoming")).json(req)).await?;
        r.ok_or_else(|| self.empty("migrate incoming"))
    }

    pub async fn migrate_finish(&self, id: &str, console_history: String) -> Result<Launched, HostCallError> {
        let body = FinishRequest { console_history };
        let r: Option<Launched> = self.call(self.http.post(self.u(&format!("/host/v1/migrate/incoming/{id}/finish"))).json(&body)).await?;
        r.ok_or_else(|| self.empty("migrate finish"))
    }

    pub async fn migrate_abort(&self, id: &str) -> Result<(), HostCallError> {
        self.call::<serde_json::Value>(self.http.delete(self.u(&format!("/host/v1/migrate/incoming/{id}")))).await?;
        Ok(())
    }

    pub async fn migrate_send(&self, id: &str, req: &SendRequest) -> Result<Migration, HostCallError> {
        let r: Option<Migration> = self.call(self.http.post(self.u(&format!("/host/v1/vms/{id}/migrate"))).json(req)).await?;
        r.ok_or_else(|| self.empty("migrate"))
    }

    pub async fn migrate_status(&self, id: &str) -> Result<Migration, HostCallError> {
        let r: Option<Migration> = self.call(self.http.get(self.u(&format!("/host/v1/vms/{id}/migrate")))).await?;
        r.ok_or_else(|| self.empty("migrate status"))
    }

    pub async fn migrate_cancel(&self, id: &str) -> Result<Migration, HostCallError> {
        let r: Option<Migration> = self.call(self.http.delete(self.u(&format!("/host/v1/vms/{id}/migrate")))).await?;
        r.ok_or_else(|| self.empty("migrate cancel"))
    }
}

/// The host part of an agent's URL (`http://HOST:PORT/...`): where its QEMUs are reached.
fn url_host(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6).to_string();
    }
    authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority).to_string()
}

impl Coordinator {
    /// Starts a live migration of a running VM; returns its record (`migrating`). The CLI
    /// follows `VmRecord::migration` until it is no longer `active`.
    pub async fn migrate(self: &Arc<Self>, key: &str, req: VmMigrate) -> Result<VmRecord, CoordinatorError> {
        let rec = self.get(key).await?;
        let downtime_ms = req.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS);
        let max_seconds = req.max_seconds.unwrap_or(DEFAULT_MAX_SECONDS);
        if !(1..=60_000).contains(&downtime_ms) {
            return Err(CoordinatorError::BadRequest(format!("downtime limit {downtime_ms} ms is out of range 1-60000")));
        }
        if !(1..=86_400).contains(&max_seconds) {
            return Err(CoordinatorError::BadRequest(format!("maximum duration {max_seconds} s is out of range 1-86400")));
        }
        if let Some(b) = req.max_bandwidth_mib.filter(|b| !(1..=MAX_BANDWIDTH_MIB).contains(b)) {
            return Err(CoordinatorError::BadRequest(format!("max bandwidth {b} MiB/s is out of range 1-{MAX_BANDWIDTH_MIB}")));
        }
        if rec.state != VmState::Running {
            return Err(CoordinatorError::Conflict(format!("VM {} is {}; only a running VM can migrate", rec.id, rec.state.as_str())));
        }
        let source = rec.host.clone().unwrap_or_default();
        if let Some(to) = &req.to {
            if *to == source {
                return Err(CoordinatorError::BadRequest(format!("VM {} already runs on host {to}", rec.id)));
            }
            if self.registry.host(to).is_none() {
                return Err(CoordinatorError::UnknownHost(to.clone()));
            }
        }
        match self.registry.host(&source) {
            Some(h) if h.state == HostState::Ready => {}
            _ => return Err(CoordinatorError::Conflict(format!("the VM's host {source} is not answering"))),
        }
        if rec.config.net.forwards().next().is_some() {
            tracing::info!(vm = %rec.id, "migrating a VM with port forwards: the destination binds the same host ports");
        }
        // A resumed VM runs from its saved image (its disk holds the guest's writes from before
        // the suspend): the destination must open that one, not the image it was created from.
        let image = rec.running_image().map_err(CoordinatorError::Image)?;
        let manifest = self.resolve_image(&image).await?;
        let require = match &req.to {
            Some(to) => format!("host.name == {to:?}"),
            None => match &rec.require {
                Some(r) if !r.trim().is_empty() => format!("({r}) && host.name != {source:?}"),
                _ => format!("host.name != {source:?}"),
            },
        };
        let preq = placement_request(&rec.owner, &manifest, &rec.config, &Some(require), &rec.rank);
        let opts = PlaceOptions { arch: Some(manifest.meta.arch.clone()) };

        // The destination's read-write volumes: the same versions under fresh epochs, raised
        // once it has taken over (the source, fenced, can no longer commit).
        let volumes = self.volumes_with_fresh_epochs(&rec.config.volumes).await?;
        let (rec, placement) = self.begin_migration(&rec.id, &source, &preq, &opts, downtime_ms, max_seconds).await?;
        tracing::info!(vm = %rec.id, from = %source, to = %placement.host, downtime_ms, max_seconds, "live migration started");
        let dest = HostClient::new(&placement.host, &placement.url, self.http.clone());
        let mut launch = launch_request(&rec, rec.saved_image.is_some().then(|| manifest.image_ref()));
        launch.config.volumes = volumes;
        let me = self.clone();
        let id = rec.id.clone();
        let bw = req.max_bandwidth_mib;
        tokio::spawn(async move {
            let _held = me.hold(&id);
            let t0 = Instant::now();
            let outcome = me.drive(&id, &source, &dest, launch, downtime_ms, max_seconds, bw, t0).await;
            if let Err((status, msg)) = outcome {
                tracing::warn!(vm = %id, "migration {}: {msg}", status.as_str());
                // Back to the source; `unknown` if that host is silent now (it was lost while
                // the record was `migrating`, which a lost host does not change).
                let source_answers = me.registry.host(&source).map(|h| h.state == HostState::Ready).unwrap_or(false);
                let elapsed_ms = t0.elapsed().as_millis() as u64;
                let outcome = MigrationOutcome::Abandoned { status, error: msg, elapsed_ms, source: source.clone(), source_answers };
                let _ = me.apply(&id, Event::MigrationEnded { outcome }).await;
            }
            // The record (on the destination if it moved) holds the capacity from now on.
            me.refresh_host(&dest.name).await;
            me.refresh_host(&source).await;
        });
        Ok(rec)
    }

    /// Reserves a destination for running VM `id` on `source` and writes it `migrating`
    /// there, admitted against the destination's capacity in the store (placing again when
    /// it is full after all). Only one migration (or stop, or suspend) wins: the table refuses
    /// the others.
    async fn begin_migration(
        &self,
        id: &str,
        source: &str,
        preq: &PlacementRequest,
        opts: &PlaceOptions,
        downtime_ms: u64,
        max_seconds: u64,
    ) -> Result<(VmRecord, Placement), CoordinatorError> {
        let mut last = None;
        for _ in 0..CAS_RETRIES {
            let placement = self.sched.place_with(preq, opts);
            match &placement {
                Ok(_) => crate::metrics::placed("migrate"),
                Err(e) => crate::metrics::refused("migrate", e),
            }
            let placement = match placement {
                Ok(p) => p,
                Err(PlaceError::NoMatch(nm)) => {
                    return Err(CoordinatorError::Capacity(format!("no destination for VM {id}: {}", explain(&nm))))
                }
                Err(e) => return Err(place_error(e)),
            };
            let ev = Event::MigrationStarted {
                from: source.to_string(),
                to: placement.host.clone(),
                downtime_limit_ms: downtime_ms,
                max_seconds,
            };
            // Only from `running` on the source it was read on.
            let event = |v: &VmRecord| (v.host.as_deref() == Some(source)).then(|| ev.clone());
            match self.transact(id, event, |_| {}, Some(&Admit::default())).await {
                Ok(w) if w.rec.state == VmState::Migrating && w.from == VmState::Running => {
                    self.hand_over(&placement).await;
                    return Ok((w.rec, placement));
                }
                Ok(w) => {
                    let _ = self.sched.release(placement.reservation);
                    return Err(CoordinatorError::Conflict(format!("VM {id} is {} now", w.rec.state.as_str())));
                }
                Err(e) => {
                    let _ = self.sched.release(placement.reservation);
                    match e {
                        CoordinatorError::Capacity(_) => {
                            self.refresh_host(&placement.host).await;
                            last = Some(e);
                        }
                        CoordinatorError::Transition { source: t, .. } => {
                            return Err(CoordinatorError::Conflict(format!("VM {id} is {} now", t.from.as_str())))
                        }
                        e => return Err(e),
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| CoordinatorError::Contended(id.to_string())))
    }

    /// Runs one migration to its end. `Ok` once the record has moved to the destination.
    #[allow(clippy::too_many_arguments)]
    async fn drive(
        self: &Arc<Self>,
        id: &str,
        source: &str,
        dest: &HostClient,
        launch: LaunchRequest,
        downtime_ms: u64,
        max_seconds: u64,
        max_bandwidth_mib: Option<u64>,
        t0: Instant,
    ) -> Result<(), (MigrationStatus, String)> {
        let fail = |e: String| (MigrationStatus::Failed, e);
        let volumes = launch.config.volumes.clone();
        let src = self.client(source).map_err(|e| fail(e.to_string()))?;
        let ready = dest
            .migrate_incoming(&IncomingRequest { launch, listen_host: url_host(&dest.url) })
            .await
            .map_err(|e| fail(format!("preparing the destination {}: {e}", dest.name)))?;
        let send = SendRequest { dest: ready, to: dest.name.clone(), downtime_ms, max_seconds, max_bandwidth_mib };
        if let Err(e) = src.migrate_send(id, &send).await {
            let _ = dest.migrate_abort(id).await;
            return Err(fail(format!("starting the migration on {source}: {e}")));
        }
        // Follow the source; the source enforces the maximum duration itself, this is the
        // coordinator's own guard on top.
        let guard = Duration::from_secs(max_seconds) + Duration::from_secs(60);
        let mut unreachable_since: Option<Instant> = None;
        let status = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            match src.migrate_status(id).await {
                Ok(st) => {
                    unreachable_since = None;
                    let step = Event::MigrationProgress { to: dest.name.clone(), step: st.phase.clone() };
                    let figures = |v: &mut VmRecord| {
                        if let Some(m) = v.migration.as_mut() {
                            apply(m, &st);
                        }
                    };
                    let _ = self.transact(id, |_| Some(step.clone()), figures, None).await;
                    if st.status != MigrationStatus::Active {
                        break st;
                    }
                    let stopped = self.record(id).await.ok().flatten().map(|v| v.state != VmState::Migrating).unwrap_or(true);
                    if stopped || t0.elapsed() > guard {
                        let _ = src.migrate_cancel(id).await;
                    }
                }
                Err(HostCallError::Refused { status: 404, .. }) => {
                    // The source agent restarted: it re-adopted the VM and cancelled the
                    // migration nobody drives any more.
                    let _ = dest.migrate_abort(id).await;
                    return Err(fail(format!("the source host {source} restarted during the migration")));
                }
                Err(e) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(30) {
                        let _ = dest.migrate_abort(id).await;
                        return Err(fail(format!("the source host {source} stopped answering: {e}")));
                    }
                }
            }
        };
        if status.status != MigrationStatus::Completed {
            let _ = dest.migrate_abort(id).await;
            return Err((status.status, status.error.unwrap_or_else(|| "no detail".into())));
        }
        // The source's QEMU is paused with everything sent: the destination must take over,
        // with what the guest printed so far (the source's console log is final now).
        let history = console_history(&src, id).await;
        match dest.migrate_finish(id, history).await {
            Ok(l) => {
                let elapsed_ms = Some(t0.elapsed().as_millis() as u64);
                let outcome = MigrationOutcome::Completed { host: dest.name.clone(), pid: l.pid, accel: Some(l.accel), elapsed_ms };
                let ended = Event::MigrationEnded { outcome };
                let figures = |v: &mut VmRecord| {
                    if let Some(m) = v.migration.as_mut() {
                        apply(m, &status);
                    }
                    v.config.volumes = volumes.clone();
                };
                let moved = self.transact(id, |_| Some(ended.clone()), figures, None).await.map(|w| w.rec);
                if let Ok(r) = &moved {
                    // Fences the source: its QEMU's end must not commit the volumes' writes,
                    // which run on at the destination (its agent skips them too).
                    if let Err(e) = self.fence_volumes(r).await {
                        tracing::warn!(vm = %id, "raising the migrated VM's volume epochs: {e}");
                    }
                }
                tracing::info!(vm = %id, from = %source, to = %dest.name, downtime_ms = ?status.downtime_ms,
                    total_ms = ?status.total_ms, "migration completed; the VM runs on the destination");
                crate::metrics::migrated(status.total_ms, status.downtime_ms);
                // The source QEMU (paused, postmigrate) goes with its runtime directory.
                if let Err(e) = src.remove(id).await {
                    tracing::warn!(vm = %id, "removing the migrated VM from {source}: {e}");
                }
                if moved.map(|v| v.state == VmState::Stopping).unwrap_or(false) {
                    // Stopped (forced) during the switchover: it must not keep running.
                    let _ = dest.stop(id, true).await;
                }
                Ok(())
            }
            Err(e) => {
                let _ = dest.migrate_abort(id).await;
                let resumed = src.migrate_cancel(id).await;
                Err(fail(format!(
                    "the destination {} did not take over ({e}); {}",
                    dest.name,
                    match resumed {
                        Ok(_) => "the guest runs on at the source".to_string(),
                        Err(e2) => format!("resuming it at the source failed too: {e2}"),
                    }
                )))
            }
        }
    }

    /// After a coordinator restart, a VM recorded as migrating: the driver is gone. If the
    /// destination already runs the VM (the restart fell between its take-over and the
    /// record's move), the migration completed: the record moves there and the source's
    /// paused QEMU goes. Otherwise cancel at the source (which resumes the guest if needed),
    /// drop the destination, follow it again at the source.
    pub(crate) async fn migration_interrupted(self: Arc<Self>, vm: VmRecord) {
        let _held = self.hold(&vm.id);
        let id = vm.id.clone();
        let to = vm.migration.as_ref().map(|m| m.to.clone());
        // Both hosts report in at their next heartbeat (bounded: a host that stays away is
        // resolved by the heartbeat reconciliation instead).
        let reported = |h: &Option<String>| h.as_ref().map(|h| self.registry.host(h).is_some()).unwrap_or(true);
        for _ in 0..60 {
            if reported(&vm.host) && reported(&to) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let taken_over = to
            .as_ref()
            .and_then(|h| self.registry.host(h))
            .and_then(|h| h.vms.iter().find(|r| r.id == id && !r.incoming).map(|r| (h.ad.name.clone(), r.pid)));
        if let Some((dest, pid)) = taken_over {
            tracing::info!(vm = %id, to = %dest, "the destination took over before the coordinator restarted: migration completed");
            let outcome = MigrationOutcome::Completed { host: dest.clone(), pid, accel: None, elapsed_ms: None };
            let _ = self.apply(&id, Event::MigrationEnded { outcome }).await;
            if let Some(src) = vm.host.as_ref().and_then(|h| self.client(h).ok()) {
                if let Err(e) = src.remove(&id).await {
                    tracing::warn!(vm = %id, "removing the migrated VM from its source {}: {e}", src.name);
                }
            }
            if let Some(h) = &vm.host {
                self.refresh_host(h).await;
            }
            self.refresh_host(&dest).await;
            self.watch(id).await;
            return;
        }
        if let Some(src) = vm.host.as_ref().and_then(|h| self.client(h).ok()) {
            let _ = src.migrate_cancel(&id).await;
        }
        if let Some(dest) = to.as_ref().and_then(|h| self.client(h).ok()) {
            let _ = dest.migrate_abort(&id).await;
        }
        let _ = self.apply(&id, Event::MigrationEnded { outcome: MigrationOutcome::Interrupted }).await;
        self.watch(id).await;
    }
}

/// The tail (at most `MAX_CONSOLE_HISTORY` bytes) of a VM's console log on `host`; empty
/// when the host does not answer (the migration goes on without it).
async fn console_history(host: &HostClient, id: &str) -> String {
    let mut out = String::new();
    let mut offset = -(MAX_CONSOLE_HISTORY as i64);
    for _ in 0..64 {
        match host.console(id, offset).await {
            Ok(c) if !c.data.is_empty() => {
                out.push_str(&c.data);
                offset = c.next as i64;
            }
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(vm = %id, "console history from {}: {e}", host.name);
                break;
            }
        }
    }
    out
}

/// Copies what the source host reports of a migration (phase and QEMU's figures) into the
/// record's.
fn apply(m: &mut Migration, st: &Migration) {
    m.phase = st.phase.clone();
    m.downtime_ms = st.downtime_ms.or(m.downtime_ms);
    m.total_ms = st.total_ms.or(m.total_ms);
    m.disk_bytes = st.disk_bytes.or(m.disk_bytes);
    m.ram_transferred_bytes = st.ram_transferred_bytes.or(m.ram_transferred_bytes);
    m.ram_remaining_bytes = st.ram_remaining_bytes.or(m.ram_remaining_bytes);
    m.dirty_sync_count = st.dirty_sync_count.or(m.dirty_sync_count);
    m.cpu_throttle_percentage = st.cpu_throttle_percentage.or(m.cpu_throttle_percentage);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_host_parts() {
        assert_eq!(url_host("http://127.0.0.1:7072"), "127.0.0.1");
        assert_eq!(url_host("http://h1.example:80/x"), "h1.example");
        assert_eq!(url_host("http://[::1]:7072"), "::1");
    }
}
