//! Suspend and resume on the coordinator, and warm images (`snapshot`).
//!
//! A snapshot asks the VM's host to save it as a new image (memory state + changed disk
//! chunks, the VM's image as parent); the VM keeps running. A suspend saves it the same way
//! into a private image named after the VM (`<id>.saved`), ends its QEMU and frees the host;
//! the record stays, `suspended`, naming the image. A resume places the VM again through the
//! scheduler (any matching host, `--require`, or `--host`) and launches the saved image there:
//! the host restores it with `-incoming` and the guest continues where it stopped. Removing the
//! VM deletes its saved image. A save that fails leaves the VM running; a resume that fails
//! leaves it suspended. A VM's read-write volumes are committed by its host as part of the
//! suspend (the guest paused); it keeps their claims while suspended, and resumes over their
//! heads (the versions just committed) under fresh epochs (`Coordinator::volumes_for_resume`).

use std::sync::Arc;

use vgrid_api::auth::Quota;
use vgrid_api::grid::HostState;
use vgrid_api::grid::PlacementRequest;
use vgrid_api::host::{SaveRequest, VmPresence, SAVE_TIMEOUT};
use vgrid_api::vm::{SavedImage, Suspended, VmRecord, VmResume, VmState};
use vgrid_api::ImageRef;

use crate::hosts::{HostCallError, HostClient};
use crate::lifecycle::admission::{check_quota, launch_request, placement_request, warm_requirement};
use crate::lifecycle::admit::place_error;
use crate::lifecycle::claims::{self, Totals};
use crate::lifecycle::guard::Admit;
use crate::lifecycle::records::CAS_RETRIES;
use crate::lifecycle::table::Event;
use crate::lifecycle::{Coordinator, CoordinatorError};
use crate::sched::{PlaceOptions, Placement};

/// Name of the private image a suspended VM is saved in.
pub fn saved_image_name(vm_id: &str) -> String {
    format!("{vm_id}.saved")
}

impl HostClient {
    /// Asks the host to save VM `id` as image `name`; with `suspend`, its QEMU ends afterwards.
    pub async fn save(&self, id: &str, name: &str, suspend: bool) -> Result<SavedImage, HostCallError> {
        let what = if suspend { "suspend" } else { "snapshot" };
        let req = self.http.post(self.u(&format!("/host/v1/vms/{id}/{what}"))).json(&SaveRequest { name: name.to_string() });
        let r: Option<SavedImage> = self.call(req).await?;
        r.ok_or_else(|| self.empty(what))
    }
}

/// The requirement of a resume: the user's `--require` and/or `--host`.
pub fn resume_requirement(req: &VmResume) -> Option<String> {
    let pin = req.host.as_ref().map(|h| format!("host.name == {h:?}"));
    match (req.require.clone().filter(|r| !r.trim().is_empty()), pin) {
        (None, p) => p,
        (r, None) => r,
        (Some(r), Some(p)) => Some(format!("({r}) && {p}")),
    }
}

/// Whether suspended VM `rec` may run again: its owner's quota (`used`: what their active VMs
/// hold), and host ports no other active VM forwards (`port_holder`: the name of the VM holding
/// a host port, if any). The error names the VM and the cause.
pub(crate) fn resume_admission(
    used: Totals,
    port_holder: impl Fn(u16) -> Option<String>,
    rec: &VmRecord,
    quota: &Quota,
) -> Result<(), CoordinatorError> {
    check_quota(used, &rec.owner, quota, rec.config.cpus, rec.config.memory_mib).map_err(|e| quota_refusal(rec, e))?;
    for f in rec.config.net.forwards() {
        if let Some(v) = port_holder(f.host) {
            return Err(CoordinatorError::Conflict(format!(
                "cannot resume VM {}: host port {} (forwarded to its guest port {}) is forwarded to VM {v} now; it stays suspended",
                rec.name, f.host, f.guest
            )));
        }
    }
    Ok(())
}

fn quota_refusal(rec: &VmRecord, e: CoordinatorError) -> CoordinatorError {
    match e {
        CoordinatorError::Quota(m) => CoordinatorError::Quota(format!("cannot resume VM {}: {m}; it stays suspended", rec.name)),
        e => e,
    }
}

impl Coordinator {
    async fn running_on(&self, key: &str, what: &str) -> Result<(VmRecord, HostClient), CoordinatorError> {
        let rec = self.get(key).await?;
        if rec.state != VmState::Running {
            return Err(CoordinatorError::Conflict(format!("VM {} is {}: only a running VM can be {what}", rec.id, rec.state.as_str())));
        }
        let host = rec.host.clone().unwrap_or_default();
        let client = self.client(&host)?;
        Ok((rec, client))
    }

    /// Saves a running VM as the warm image `name` (parent: the VM's image); it keeps running.
    pub async fn snapshot(&self, key: &str, name: &str) -> Result<SavedImage, CoordinatorError> {
        vgrid_api::manifest::validate_name(name).map_err(CoordinatorError::Image)?;
        let (rec, client) = self.running_on(key, "snapshotted").await?;
        crate::volumes::refuse_snapshot(&rec)?;
        tracing::info!(vm = %rec.id, image = name, "saving VM as a warm image");
        Ok(client.save(&rec.id, name, false).await?)
    }

    /// Saves a running VM into its private image and ends it on its host. When the host
    /// refuses, the VM keeps running and the error is returned; when it does not answer (its
    /// agent went away), the VM stays `suspending` until the host says what became of the
    /// save ([`CoordinatorError::Settling`], HTTP 504: follow the record).
    pub async fn suspend(self: &Arc<Self>, key: &str) -> Result<Suspended, CoordinatorError> {
        let t0 = std::time::Instant::now();
        let (rec, client) = self.running_on(key, "suspended").await?;
        let _held = self.hold(&rec.id);
        // Only one suspend (or migration, or stop) of a running VM wins: the table refuses the
        // others.
        self.apply(&rec.id, Event::SuspendRequested).await.map_err(|e| match e {
            CoordinatorError::Transition { source, .. } => {
                CoordinatorError::Conflict(format!("VM {} is {}: only a running VM can be suspended", rec.id, source.from.as_str()))
            }
            e => e,
        })?;
        let name = saved_image_name(&rec.id);
        match client.save(&rec.id, &name, true).await {
            Ok(saved) => {
                // Its QEMU has ended: the host forgets it now (overlay, taps, reserved
                // capacity), before the record says `suspended` and a resume may place it on
                // this host again; the watcher of the old QEMU then leaves it alone.
                if let Err(e) = client.release(&rec.id).await {
                    tracing::warn!(vm = %rec.id, "releasing the suspended VM on its host: {e}");
                }
                let old = rec.saved_image.clone();
                let out = self.apply(&rec.id, Event::Saved { image: saved.image.clone() }).await.unwrap_or(rec.clone());
                // The image it had resumed from (if any) is superseded.
                if let Some(old) = old.filter(|o| *o != saved.image) {
                    self.delete_saved_image(&old).await;
                }
                tracing::info!(vm = %rec.id, image = %saved.image, "VM suspended");
                crate::metrics::suspended(t0.elapsed().as_secs_f64());
                Ok(Suspended { vm: out, saved })
            }
            Err(e @ HostCallError::Refused { .. }) => {
                tracing::warn!(vm = %rec.id, "suspend failed, the VM keeps running: {e}");
                let _ = self.apply(&rec.id, Event::SaveFailed).await;
                Err(e.into())
            }
            Err(e) => {
                // No answer: the host's save may go on (or its agent died with it). What
                // happened is settled from the host once it answers again, as after a
                // coordinator restart; until then the VM stays `suspending`.
                tracing::warn!(vm = %rec.id, "the host did not answer the suspend ({e}); settling it from the host");
                tokio::spawn(self.clone().recover_suspending(rec.id.clone()));
                Err(CoordinatorError::Settling(format!(
                    "VM {} is being suspended but its host did not answer ({e}); the outcome is settled from the host when it answers again (see `vgrid vm show {}`)",
                    rec.id, rec.id
                )))
            }
        }
    }

    /// Places a suspended VM again and restores it there (in the background: the answer is
    /// the record as placed; it becomes `running` once restored). Like a create, it must fit
    /// the owner's `quota` (a suspended VM holds none) and its host ports must not be forwarded
    /// to another active VM; otherwise it stays suspended and nothing changes.
    pub async fn resume(self: &Arc<Self>, key: &str, req: &VmResume, quota: &Quota) -> Result<VmRecord, CoordinatorError> {
        let rec = self.get(key).await?;
        if rec.state != VmState::Suspended {
            return Err(CoordinatorError::Conflict(format!("VM {} is {}: only a suspended VM can be resumed", rec.id, rec.state.as_str())));
        }
        let saved = rec
            .saved_image
            .clone()
            .ok_or_else(|| CoordinatorError::Conflict(format!("VM {} is suspended but names no saved image", rec.id)))?;
        if let Some(h) = &req.host {
            if self.registry.host(h).is_none() {
                return Err(CoordinatorError::UnknownHost(h.clone()));
            }
        }
        let manifest = self.resolve_saved(&saved).await?;
        let require = warm_requirement(&manifest, resume_requirement(req));
        let preq = placement_request(&rec.owner, &manifest, &rec.config, &require, &rec.rank);
        self.sched.validate(&preq)?;
        let opts = PlaceOptions { arch: Some(manifest.meta.arch.clone()) };
        self.resume_precheck(&rec, quota).await?;
        let volumes = self.volumes_for_resume(&rec).await?;
        let old_host = rec.host.clone();
        let (rec, placed) = self.place_resume(&rec, &preq, &opts, quota, &volumes).await?;
        // Its read-write volumes' new epochs, raised before it starts: any earlier incarnation
        // (none holds uncommitted writes: its suspend committed them) is fenced.
        if let Err(e) = self.fence_volumes(&rec).await {
            tracing::warn!(vm = %rec.id, "raising the resumed VM's volume epochs: {e}");
        }
        tracing::info!(vm = %rec.id, image = %saved, host = %placed.host, "resuming VM");
        let launch = launch_request(&rec, Some(manifest.image_ref()));
        let client = HostClient::new(&placed.host, &placed.url, self.http.clone());
        let me = self.clone();
        tokio::spawn(async move { me.run(client, launch).await });
        // The host it was suspended on keeps only its old console log: remove it there.
        if let Some(old) = old_host.filter(|h| *h != placed.host) {
            if let Ok(c) = self.client(&old) {
                let id = rec.id.clone();
                tokio::spawn(async move {
                    if let Err(e) = c.remove(&id).await {
                        tracing::debug!(vm = %id, host = %c.name, "removing the old runtime directory: {e}");
                    }
                });
            }
        }
        Ok(rec)
    }

    /// Refuses early (before placing) a resume the commit would refuse: the owner's quota, a
    /// host port another active VM forwards now.
    async fn resume_precheck(&self, rec: &VmRecord, quota: &Quota) -> Result<(), CoordinatorError> {
        let (rows, _) = self.state.store().range(&claims::owner_prefix(&rec.owner)).await?;
        let mut holders = Vec::new();
        for f in rec.config.net.forwards() {
            if let Some(h) = self.holder(&claims::port_key(f.host)).await?.filter(|h| h.vm != rec.id) {
                holders.push((f.host, h.name));
            }
        }
        let holder = |port: u16| holders.iter().find(|(p, _)| *p == port).map(|(_, n)| n.clone());
        resume_admission(claims::totals(&rows, &rec.id), holder, rec, quota)
    }

    /// Places suspended VM `rec` and writes it `pending` there, admitted against its owner's
    /// quota, its host ports and the host's capacity in the store (placing again when the host
    /// is full after all).
    async fn place_resume(
        &self,
        rec: &VmRecord,
        preq: &PlacementRequest,
        opts: &PlaceOptions,
        quota: &Quota,
        volumes: &[vgrid_api::volume::VolumeAttach],
    ) -> Result<(VmRecord, Placement), CoordinatorError> {
        let admit = Admit { quota: Some(quota.clone()) };
        let mut last = None;
        for _ in 0..CAS_RETRIES {
            let placed = self.sched.place_with(preq, opts).inspect_err(|e| crate::metrics::refused("resume", e)).map_err(place_error)?;
            crate::metrics::placed("resume");
            let ev = Event::ResumeRequested { host: placed.host.clone() };
            let pin = |v: &mut VmRecord| v.config.volumes = volumes.to_vec();
            let written = self.transact(&rec.id, |_| Some(ev.clone()), pin, Some(&admit)).await;
            match written {
                Ok(w) => {
                    self.hand_over(&placed).await;
                    return Ok((w.rec, placed));
                }
                Err(e) => {
                    let _ = self.sched.release(placed.reservation);
                    match e {
                        CoordinatorError::Capacity(_) => {
                            self.refresh_host(&placed.host).await;
                            last = Some(e);
                        }
                        CoordinatorError::Transition { source, .. } => {
                            return Err(CoordinatorError::Conflict(format!("VM {} is {} now", rec.id, source.from.as_str())))
                        }
                        CoordinatorError::Quota(_) => return Err(quota_refusal(rec, e)),
                        e => return Err(e),
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| CoordinatorError::Contended(rec.id.clone())))
    }

    /// After a coordinator restart, settles a VM that was `suspending`: the host finished (or
    /// abandoned) the save without anyone listening. Once its host reports in: if its QEMU is
    /// gone and a saved image newer than its start exists, it is `suspended` with that image;
    /// if QEMU is gone without one, `failed`; if QEMU still runs after the save timeout, the
    /// save failed and it is `running` again.
    pub(crate) async fn recover_suspending(self: Arc<Self>, id: String) {
        let _held = self.hold(&id);
        let deadline = tokio::time::Instant::now() + SAVE_TIMEOUT + std::time::Duration::from_secs(60);
        let name = saved_image_name(&id);
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let Some(rec) = self.record(&id).await.ok().flatten() else { return };
            if rec.state != VmState::Suspending {
                return;
            }
            let host = rec.host.clone().unwrap_or_default();
            let Some(h) = self.registry.host(&host) else { continue };
            if h.state != HostState::Ready {
                continue;
            }
            let client = HostClient::new(&h.ad.name, &h.ad.url, self.http.clone());
            let Some(VmPresence { saving, running: runs, .. }) = client.saving(&id).await else { continue };
            if saving || runs {
                // Still running and not saving: the save failed (or never started) and the
                // guest went on.
                if (!saving && runs) || tokio::time::Instant::now() > deadline {
                    let _ = self.apply(&id, Event::SaveInterrupted).await;
                    return;
                }
                continue;
            }
            let image = ImageRef { name: name.clone(), version: None };
            let saved = match self.resolve_image(&image).await {
                Ok(m) if m.state.as_ref().map(|s| s.meta.saved).unwrap_or(0) >= rec.started.unwrap_or(0) => Some(m),
                _ => None,
            };
            let event = match &saved {
                Some(m) => Event::Saved { image: m.image_ref().to_string() },
                None => Event::SaveLost,
            };
            let _ = self.apply(&id, event).await;
            tracing::info!(vm = %id, suspended = saved.is_some(), "settled a suspend interrupted by a coordinator restart");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_requirements_combine() {
        let r = |require: Option<&str>, host: Option<&str>| {
            resume_requirement(&VmResume { require: require.map(Into::into), host: host.map(Into::into) })
        };
        assert_eq!(r(None, None), None);
        assert_eq!(r(Some("host.cpus > 1"), None).as_deref(), Some("host.cpus > 1"));
        assert_eq!(r(None, Some("h2")).as_deref(), Some("host.name == \"h2\""));
        assert_eq!(r(Some("a || b"), Some("h2")).as_deref(), Some("(a || b) && host.name == \"h2\""));
        assert_eq!(saved_image_name("vm-0a"), "vm-0a.saved");
    }

    fn rec(id: &str, name: &str, owner: &str, state: VmState, forwards: &[(u16, u16)]) -> VmRecord {
        let forwards = forwards.iter().map(|&(host, guest)| vgrid_api::vm::Forward { host, guest }).collect();
        let config = vgrid_api::vm::VmConfig::new(ImageRef { name: "sample".into(), version: Some(1) }).with_forwards(forwards);
        let mut r = VmRecord::new(id, name, owner, config, 1);
        r.state = state;
        r.state_since = None;
        r.saved_image = Some(format!("{id}.saved@1"));
        r
    }

    /// `resume_admission` of `me` next to the records `all`, through the claims they hold.
    fn admission(all: &[VmRecord], me: &VmRecord, quota: &Quota) -> Result<(), CoordinatorError> {
        let held = claims::expected(all);
        let prefix = claims::owner_prefix(&me.owner);
        let rows: Vec<(String, crate::state::Entry)> = held
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, h)| (k.clone(), crate::state::Entry { value: crate::state::encode(h), create_revision: 1, mod_revision: 1 }))
            .collect();
        let holder = |port: u16| held.get(&claims::port_key(port)).filter(|h| h.vm != me.id).map(|h| h.name.clone());
        resume_admission(claims::totals(&rows, &me.id), holder, me, quota)
    }

    #[test]
    fn resume_is_admitted_like_a_create() {
        let me = rec("vm-1", "web", "alice", VmState::Suspended, &[(8080, 80)]);
        let other = rec("vm-2", "db", "alice", VmState::Running, &[]);
        let all = vec![me.clone(), other.clone()];
        // No quota, no conflict.
        admission(&all, &me, &Quota::default()).unwrap();
        // Quota: the suspended VM itself holds none; the running one does.
        let q = Quota { vms: Some(1), ..Default::default() };
        let e = admission(&all, &me, &q).unwrap_err().to_string();
        assert!(e.contains("cannot resume VM web") && e.contains("quota exceeded") && e.contains("stays suspended"), "{e}");
        assert!(matches!(admission(&all, &me, &q), Err(CoordinatorError::Quota(_))));
        let q = Quota { memory_mib: Some(512), ..Default::default() };
        admission(&all, &me, &q).unwrap();
        // Another user's VMs do not count against alice.
        let mut bobs = other.clone();
        bobs.owner = "bob".into();
        admission(&[me.clone(), bobs], &me, &Quota { vms: Some(1), ..Default::default() }).unwrap();
        // A host port another active VM forwards now is a conflict; a stopped one's is not.
        let mut taker = rec("vm-3", "proxy", "bob", VmState::Running, &[(8080, 8080)]);
        let e = admission(&[me.clone(), taker.clone()], &me, &Quota::default()).unwrap_err();
        assert!(matches!(e, CoordinatorError::Conflict(_)));
        let e = e.to_string();
        assert!(e.contains("host port 8080") && e.contains("forwarded to VM proxy") && e.contains("stays suspended"), "{e}");
        taker.state = VmState::Stopped;
        admission(&[me.clone(), taker], &me, &Quota::default()).unwrap();
    }
}
