//! Launching a placed VM on its host (and settling a launch nobody heard the end of), watching it until its QEMU ends (through host outages),
//! stopping and removing it, and its console.

use std::sync::Arc;
use std::time::Duration;

use vgrid_api::grid::HostState;
use vgrid_api::host::{ExitInfo, LaunchRequest, RESTORE_TIMEOUT};
use vgrid_api::vm::{Accel, ConsoleChunk, VmRecord, VmState};

use super::table::{Event, ExitKind};
use super::{Coordinator, CoordinatorError};
use crate::hosts::{HostCallError, HostClient};

/// How long a launch interrupted by a coordinator restart may take to show up running on its
/// host before the VM is failed.
pub const LAUNCH_RECOVERY: Duration = Duration::from_secs(300);

impl Coordinator {
    /// Sends `req` to its host and follows the VM. A launch the host refuses is the resume's
    /// failure when it restored a saved image (`on_resume_failed`), else the VM's; a launch
    /// the host does not answer is settled from the host ([`Coordinator::recover_launch`]).
    pub(crate) async fn run(self: Arc<Self>, client: HostClient, req: LaunchRequest) {
        let id = req.id.clone();
        let _held = self.hold(&id);
        let launching = self.hold(&format!("launch:{id}"));
        let t0 = std::time::Instant::now();
        if self.apply(&id, Event::LaunchSent).await.is_err() {
            // Stopped or removed before its launch went out: nothing runs anywhere.
            return;
        }
        match client.launch(&req).await {
            Ok(l) => {
                let rec = self.apply(&id, Event::Launched { pid: l.pid, accel: l.accel }).await;
                match rec {
                    Ok(r) if r.state == VmState::Running => {
                        tracing::info!(vm = %id, host = %client.name, pid = l.pid, accel = %l.accel, "VM running");
                        if req.restore.is_some() {
                            crate::metrics::resumed(t0.elapsed().as_secs_f64());
                        }
                        self.watch(id).await;
                    }
                    Err(CoordinatorError::UnknownVm(_)) => {
                        // Removed while it was starting.
                        let _ = client.stop(&id, true).await;
                        let _ = client.remove(&id).await;
                    }
                    _ => {
                        // Stopped while it was starting: it must not keep running.
                        tracing::info!(vm = %id, "VM was stopped while starting; killing it");
                        let _ = client.stop(&id, true).await;
                        let _ = client.release(&id).await;
                        let _ = self.apply(&id, Event::KilledWhileStarting).await;
                    }
                }
            }
            Err(e) if !matches!(e, HostCallError::Refused { .. }) => {
                // No answer (the agent died, the link broke): the launch may have happened.
                // Settled from the host once it answers again, as after a coordinator restart:
                // adopted if it runs, sent again if it never arrived, failed otherwise.
                tracing::warn!(vm = %id, host = %client.name, "no answer to the launch ({e}); settling it from the host");
                drop(launching);
                Box::pin(self.recover_launch(id)).await;
            }
            Err(e) => {
                tracing::warn!(vm = %id, "VM failed to start: {e}");
                let _ = client.stop(&id, true).await;
                let _ = client.release(&id).await;
                if self.resume_failed(&req, &client.name, &e.to_string()).await {
                    return;
                }
                let _ = self.apply(&id, Event::LaunchFailed { reason: e.to_string() }).await;
            }
        }
    }

    /// Settles a VM placed but not running (`pending` with a host, or `starting`) whose launch
    /// nobody heard the end of: found so after a coordinator restart, or a launch its host did
    /// not answer (a new VM's launch or a suspended VM's restore, which may have reached the
    /// host all the same). Once the host answers:
    ///
    /// * it runs the VM (or ran it and it ended meanwhile): the launch happened; the record is
    ///   `running` (a resume: `resume_recovered`) and watched (which records an end that came
    ///   already), and its claims keep counting on that host (failing it would free capacity
    ///   the host still uses, and lose a VM that runs);
    /// * it does not know the VM, three answers in a row half a second apart (a launch still on
    ///   its way would have been admitted in between): the launch never arrived; it is sent
    ///   again, the same request (never to another host: it is placed there);
    /// * it knows the VM but does not run it by the deadline (the launch bound, 5 min; a
    ///   restore's, [`RESTORE_TIMEOUT`] + 60 s), or the host does not come back: a new VM is
    ///   `failed` with the reason (the host is told to stop it); a resume is `suspended` again
    ///   (its saved image is intact).
    pub(crate) async fn recover_launch(self: Arc<Self>, id: String) {
        let _held = self.hold(&id);
        let resume = match self.record(&id).await.ok().flatten() {
            Some(rec) => rec.saved_image.is_some() && rec.started.is_none(),
            None => return,
        };
        let bound = if resume { RESTORE_TIMEOUT + Duration::from_secs(60) } else { LAUNCH_RECOVERY };
        let deadline = tokio::time::Instant::now() + bound;
        let mut unknown = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Some(rec) = self.record(&id).await.ok().flatten() else { return };
            if !matches!(rec.state, VmState::Pending | VmState::Starting) || rec.started.is_some() {
                return;
            }
            let host = rec.host.clone().unwrap_or_default();
            let (client, presence, accel) = match self.registry.host(&host) {
                Some(h) if h.state == HostState::Ready => {
                    let c = HostClient::new(&h.ad.name, &h.ad.url, self.http.clone());
                    let p = c.saving(&id).await;
                    (Some(c), p, h.ad.accel.parse::<Accel>().ok())
                }
                _ => (None, None, None),
            };
            // Running, or ran and ended already (its watcher then records how it ended).
            if presence.is_some_and(|p| p.running || (p.exited && !resume)) {
                let pid = self.registry.host(&host).and_then(|h| h.vms.iter().find(|v| v.id == id).map(|v| v.pid)).unwrap_or(0);
                if rec.state == VmState::Pending && !resume {
                    // Its launch went out between the record's write and this one's.
                    let _ = self.apply(&id, Event::LaunchSent).await;
                }
                let event = if resume {
                    Event::ResumeRecovered { host: host.clone() }
                } else {
                    Event::Launched { pid, accel: rec.accel.or(rec.config.accel).or(accel).unwrap_or(Accel::Tcg) }
                };
                if self.apply(&id, event).await.is_ok() {
                    tracing::info!(vm = %id, host = %host, resume, "a launch interrupted by a coordinator restart completed: the VM runs");
                    tokio::spawn(self.clone().watch(id));
                }
                return;
            }
            unknown = if presence.is_some_and(|p| !p.known) { unknown + 1 } else { 0 };
            if self.in_hand(&format!("launch:{id}")) {
                // A task of this coordinator sends its launch (admitted here a moment before
                // this coordinator took over as leader): the launch is that task's.
                return;
            }
            if unknown >= 3 {
                if let Some(client) = client {
                    let restore = match rec.saved_image.as_deref().filter(|_| resume) {
                        None => Ok(None),
                        Some(saved) => self.resolve_saved(saved).await.map(|m| Some(m.image_ref())),
                    };
                    match restore {
                        Ok(restore) => {
                            tracing::info!(vm = %id, host = %host, resume,
                                "the launch never reached the host before the coordinator restarted; sending it again");
                            let launch = crate::lifecycle::admission::launch_request(&rec, restore);
                            self.clone().run(client, launch).await;
                            return;
                        }
                        Err(e) => tracing::warn!(vm = %id, "cannot send the launch again yet: {e}"),
                    }
                }
            }
            if tokio::time::Instant::now() > deadline {
                if resume {
                    let _ = self.apply(&id, Event::ResumeAbandoned { host: host.clone() }).await;
                    tracing::warn!(vm = %id, host = %host, "a resume interrupted by a coordinator restart did not complete; suspended again");
                } else {
                    if let Ok(c) = self.client(&host) {
                        let _ = c.stop(&id, true).await;
                        let _ = c.release(&id).await;
                    }
                    let event = if rec.state == VmState::Starting {
                        Event::LaunchFailed {
                            reason: format!(
                                "its launch went unanswered (the coordinator restarted or host {host} did not answer) and the host did not run it within {} s",
                                bound.as_secs()
                            ),
                        }
                    } else {
                        Event::CoordinatorRestarted
                    };
                    let _ = self.apply(&id, event).await;
                    tracing::warn!(vm = %id, host = %host, "a launch interrupted by a coordinator restart did not complete; failed");
                }
                return;
            }
        }
    }

    /// Whether the failed launch `req` was the resume of a suspended VM (its saved image is
    /// intact): then it is suspended again, with the reason.
    async fn resume_failed(&self, req: &LaunchRequest, host: &str, err: &str) -> bool {
        let Ok(Some(rec)) = self.record(&req.id).await else { return false };
        let resuming = req.restore.as_ref().is_some_and(|r| rec.saved_image.as_deref() == Some(r.to_string().as_str()));
        if !resuming || rec.started.is_some() {
            return false;
        }
        let _ = self.apply(&req.id, Event::ResumeFailed { host: host.to_string(), reason: err.to_string() }).await;
        true
    }

    /// Follows a placed VM until its QEMU exits, through host outages.
    pub(crate) async fn watch(self: Arc<Self>, id: String) {
        let _held = self.hold(&id);
        loop {
            let Some(rec) = self.record(&id).await.ok().flatten() else { return };
            if !rec.state.is_active() {
                return;
            }
            if matches!(rec.state, VmState::Pending | VmState::Starting) {
                // Launched (or resumed) anew since this watcher began: the QEMU it followed
                // is gone, and the task sending the launch watches the new one once it runs.
                // Following the VM to its new host now would find no VM there yet, an end.
                tracing::debug!(vm = %id, state = ?rec.state, "the QEMU followed is gone and the VM is launched anew; its launch watches it");
                return;
            }
            let host = rec.host.clone().unwrap_or_default();
            let client = match self.registry.host(&host) {
                Some(h) if h.state == HostState::Ready => HostClient::new(&h.ad.name, &h.ad.url, self.http.clone()),
                _ => {
                    // Unknown or lost host: wait for it to report in.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let watched = rec.pid;
            let waited = client.wait(&id).await;
            if waited.is_ok() && self.moved_or_migrating(&id, &host).await {
                continue;
            }
            if waited.is_ok() && self.replaced(&id, watched).await {
                return;
            }
            // The state now, not before the long poll: a stop may have begun meanwhile.
            let stopping = self.record(&id).await.ok().flatten().map(|v| v.state == VmState::Stopping).unwrap_or(false);
            match waited {
                Ok(exit) if exit.exit.code.is_some() || exit.exit.signal.is_some() || stopping || exit.present => {
                    let mut tail = exit.console_tail;
                    if let Some(c) = exit.cause {
                        tail.insert(0, format!("(host: {c})"));
                    }
                    self.exited(&client, &id, exit.exit, tail).await;
                    return;
                }
                Ok(_) => {
                    // The host answers but does not run this VM (it restarted without it).
                    let _ = client.release(&id).await;
                    let _ = self.apply(&id, Event::Vanished { host }).await;
                    return;
                }
                Err(e) => {
                    tracing::debug!(vm = %id, "waiting on host {host}: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Called by the watcher after its long poll on `host` returned: true when the VM has
    /// moved elsewhere (watch it there) or is migrating (its driver decides).
    async fn moved_or_migrating(&self, id: &str, host: &str) -> bool {
        match self.record(id).await.ok().flatten() {
            Some(v) if v.host.as_deref() != Some(host) => true,
            Some(v) if v.state == VmState::Migrating => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                true
            }
            _ => false,
        }
    }

    /// True when the QEMU this watcher followed (`watched`, its pid) is no longer the record's:
    /// it was saved and ended (suspend, which released it on the host), and the VM may already
    /// be resuming on the same host under a new QEMU with a watcher of its own. The old QEMU's
    /// end is then no news: applied late, it failed the resumed VM, and its release killed the
    /// new QEMU.
    async fn replaced(&self, id: &str, watched: Option<u32>) -> bool {
        let Some(pid) = watched else { return false };
        match self.record(id).await.ok().flatten() {
            // Being saved: the suspend ends this QEMU and releases it on the host itself (and
            // settles a save that fails). Acting on its end here raced with the resume that
            // may follow at once: the late `Exited` failed the resumed VM.
            Some(v) if v.state == VmState::Suspending => {
                tracing::debug!(vm = %id, "QEMU {pid} ended while it was being saved; the suspend settles it");
                true
            }
            // Pending: a resume was asked for and is being placed (its pid cleared).
            Some(v)
                if v.pid != Some(pid)
                    && matches!(v.state, VmState::Suspended | VmState::Pending | VmState::Starting | VmState::Running) =>
            {
                tracing::debug!(vm = %id, "QEMU {pid} ended after it was replaced; its end is not reported");
                true
            }
            _ => false,
        }
    }

    async fn exited(&self, client: &HostClient, id: &str, exit: ExitInfo, console: Vec<String>) {
        let _ = client.release(id).await;
        let kind = if exit.success() {
            // The guest powered itself off: a normal stop.
            ExitKind::PoweredOff
        } else {
            ExitKind::Crashed { exit: exit.to_string(), console }
        };
        // Its QEMU also ends when it is saved (suspend): the table keeps it suspending.
        if let Ok(w) = self.transact(id, |_| Some(Event::Exited { exit: kind.clone() }), |_| {}, None).await {
            if w.rec.state == VmState::Failed && w.from != VmState::Failed {
                tracing::warn!(vm = %id, "QEMU exited unexpectedly: {exit}");
            }
            if w.from.is_active() && !w.rec.state.is_active() && w.rec.state != VmState::Suspended {
                // Ended (the host released it: its volumes' last commit is done, and the
                // record's move released the claims): a stage-in-only staging volume goes.
                self.staging_removed(&w.rec).await;
            }
        }
    }

    /// [`Coordinator::remove_staging`] of an ended VM; a failure is added to its `reason`.
    async fn staging_removed(&self, rec: &VmRecord) {
        let failed = self.remove_staging(rec).await;
        if failed.is_empty() {
            return;
        }
        let note = failed.join("; ");
        let add = |r: &mut VmRecord| {
            r.reason = Some(match r.reason.take() {
                Some(before) if !before.contains(&note) => format!("{before}; {note}"),
                Some(before) => before,
                None => note.clone(),
            })
        };
        if let Err(e) = self.transact(&rec.id, |_| None, add, None).await {
            tracing::warn!(vm = %rec.id, "cannot record that its staging volume was not removed: {e}");
        }
    }

    /// Stops a VM: ACPI power-down (then quit after a timeout), or a kill with `force`.
    pub async fn stop(&self, key: &str, force: bool) -> Result<VmRecord, CoordinatorError> {
        let rec = self.get(key).await?;
        if rec.state == VmState::Migrating && !force {
            let to = rec.migration.as_ref().map(|m| m.to.clone()).unwrap_or_default();
            return Err(CoordinatorError::Conflict(format!(
                "VM {} is migrating to {to}; wait for the migration to end, or stop it with --force",
                rec.id
            )));
        }
        match rec.state {
            VmState::Stopped | VmState::Failed | VmState::Lost => return Ok(rec),
            VmState::Stopping if !force => return Ok(rec),
            VmState::Suspended | VmState::Suspending => {
                return Err(CoordinatorError::Conflict(format!(
                    "VM {} is {}: resume it (`vgrid vm resume`) or remove it (`vgrid vm rm`)",
                    rec.id,
                    rec.state.as_str()
                )))
            }
            _ => {}
        }
        if rec.host.is_none() {
            // Queued, never placed: nothing runs anywhere.
            return self.apply(&rec.id, Event::StoppedWhileQueued).await;
        }
        let host = rec.host.clone().unwrap_or_default();
        let client = self.client(&host);
        if rec.state == VmState::Unknown && !force {
            return Err(CoordinatorError::Conflict(format!(
                "VM {} is unknown: its host {host} is not answering; use --force to forget it",
                rec.id
            )));
        }
        self.apply(&rec.id, Event::StopRequested { force }).await?;
        match client {
            Ok(c) => {
                if let Err(e) = c.stop(&rec.id, force).await {
                    if !force {
                        return Err(e.into());
                    }
                    tracing::warn!(vm = %rec.id, "forced stop: host did not answer: {e}");
                }
            }
            Err(e) if !force => return Err(e),
            Err(_) => {}
        }
        // The watcher records `stopped`; wait for it briefly so callers see the end state (longer
        // with volumes read-write: their writes are committed before the host releases it).
        let rounds = if rec.config.volumes.iter().any(|v| !v.readonly) { 2400 } else { 100 };
        for _ in 0..rounds {
            let r = self.get(&rec.id).await?;
            if !r.state.is_active() {
                return Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.apply_by(&rec.id, |v| Event::StopTimedOut { force, ever_started: v.started.is_some() }).await
    }

    /// [`Coordinator::apply`] of an event chosen from the record as read.
    async fn apply_by(&self, id: &str, event: impl Fn(&VmRecord) -> Event) -> Result<VmRecord, CoordinatorError> {
        Ok(self.transact(id, |v| Some(event(v)), |_| {}, None).await?.rec)
    }

    /// Removes a VM: stops it if asked to and deletes its runtime directory and record.
    pub async fn remove(&self, key: &str, force: bool) -> Result<VmRecord, CoordinatorError> {
        let rec = self.get(key).await?;
        if rec.state.is_active() {
            if !force {
                return Err(CoordinatorError::Conflict(format!(
                    "VM {} is {}; stop it first or remove it with --force",
                    rec.id,
                    rec.state.as_str()
                )));
            }
            self.stop(&rec.id, true).await?;
        }
        // A suspended VM's old host only keeps its console log: failing to reach it is no reason
        // to keep the VM.
        let force = force || rec.state == VmState::Suspended;
        if let Some(host) = &rec.host {
            match self.client(host) {
                Ok(c) => {
                    if let Err(e) = c.remove(&rec.id).await {
                        if !force {
                            return Err(e.into());
                        }
                        tracing::warn!(vm = %rec.id, "removing on host {host}: {e}");
                    }
                }
                Err(e) if !force => return Err(e),
                Err(_) => {}
            }
        }
        self.delete_record(&rec.id).await?;
        if let Some(h) = &rec.host {
            self.refresh_host(h).await;
        }
        if let Some(img) = &rec.saved_image {
            self.delete_saved_image(img).await;
        }
        // A staging volume not removed when the VM ended (it was lost, stopped by force, or
        // the removal failed then): now, and a failure is said in the answer's `reason`.
        let mut rec = rec;
        let failed = self.remove_staging(&rec).await;
        if !failed.is_empty() {
            rec.reason = Some(format!("VM removed, but {}", failed.join("; ")));
        }
        tracing::info!(vm = %rec.id, "VM removed");
        Ok(rec)
    }

    /// A page of a VM's console log, from its host.
    pub async fn console(&self, key: &str, offset: i64) -> Result<ConsoleChunk, CoordinatorError> {
        let rec = self.get(key).await?;
        let Some(host) = &rec.host else { return Ok(ConsoleChunk { offset: 0, next: 0, data: String::new() }) };
        Ok(self.client(host)?.console(&rec.id, offset).await?)
    }

    /// The host's WebSocket URL of a running VM's `stream` (`console`, `vnc`).
    pub async fn stream_ws_url(&self, key: &str, stream: &str) -> Result<(VmRecord, String), CoordinatorError> {
        let rec = self.get(key).await?;
        if rec.state != VmState::Running {
            return Err(CoordinatorError::Conflict(format!("VM {} is {}, not running", rec.id, rec.state.as_str())));
        }
        let url = self.client(rec.host.as_deref().unwrap_or_default())?.stream_ws_url(&rec.id, stream);
        Ok((rec, url))
    }

    /// Stops every active VM placed on `host` (used when `vgrid up` shuts down).
    pub async fn stop_vms_on(&self, host: &str) {
        let vms: Vec<VmRecord> = self
            .records()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|v| v.state.is_active() && v.host.as_deref() == Some(host))
            .collect();
        let futs = vms.iter().map(|v| self.stop(&v.id, false));
        for (v, r) in vms.iter().zip(futures::future::join_all(futs).await) {
            if let Err(e) = r {
                tracing::warn!(vm = %v.id, "stopping at shutdown: {e}");
            }
        }
    }
}
