//! Volumes as the coordinator sees them: which VM holds one read-write (its claim,
//! `claims/volume/NAME`, written with the record, see `lifecycle::claims`), the fencing epoch
//! it grants with the claim (raised on the image servers before the VM starts, so that an
//! earlier holder's host can no longer commit), and the user's commands on them (list, show,
//! commit a running VM's writes, snapshot, remove). The volumes' data stays on the image
//! servers; this module never reads a chunk.

use vgrid_api::rest::{GcReport, ImageOwner, ImageSummary};
use vgrid_api::vm::{VmRecord, VmState};
use vgrid_api::volume::{VolumeAttach, VolumeCommitted, VolumeInfo, VolumeMeta};
use vgrid_api::{ImageRef, Manifest};
use vgrid_storeclient::StoreClient;

use crate::lifecycle::claims;
use crate::lifecycle::{Coordinator, CoordinatorError};

/// Who asks.
#[derive(Clone, Copy)]
pub struct Asker<'a> {
    pub user: &'a str,
    pub admin: bool,
}

fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(1)
}

fn unknown(name: &str) -> CoordinatorError {
    CoordinatorError::UnknownImage(format!("{name} (no image server has a volume of that name; see `vgrid volume ls`)"))
}

impl Coordinator {
    /// The image servers holding volume `name`, with its latest manifest and owner record. A
    /// server that does not answer is passed over when another has the volume (it may be a
    /// stale registration of a restarted one); its error is returned when none has it.
    async fn volume_on(&self, name: &str) -> Result<Vec<(StoreClient, Manifest, ImageOwner)>, CoordinatorError> {
        let servers = self.registry().image_server_urls();
        if servers.is_empty() {
            return Err(CoordinatorError::NoImageServer);
        }
        let mut out = Vec::new();
        let mut failure = None;
        for url in servers {
            let client = StoreClient::new(&url).map_err(CoordinatorError::ImageServer)?;
            let found = match client.manifest(&ImageRef { name: name.to_string(), version: None }).await {
                Ok(m) => client.owner(name).await.map(|o| Some((m, o))),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e),
            };
            match found {
                Ok(Some((m, o))) => out.push((client, m, o)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(volume = %name, server = %url, "image server did not answer: {e}");
                    failure = Some(e);
                }
            }
        }
        match failure {
            Some(e) if out.is_empty() => Err(CoordinatorError::NotOnReachable { image: format!("volume {name}"), source: e }),
            _ => Ok(out),
        }
    }

    /// The latest manifest and owner of volume `name`, refused when it is an image or when
    /// `who` may not `write` (or read) it.
    async fn volume_checked(&self, name: &str, who: Asker<'_>, write: bool) -> Result<(Manifest, ImageOwner), CoordinatorError> {
        let (_, m, owner) = self.volume_on(name).await?.into_iter().next().ok_or_else(|| unknown(name))?;
        if m.meta.volume.is_none() {
            return Err(CoordinatorError::Conflict(format!("{name} is an image, not a volume (see `vgrid image ls`)")));
        }
        let allowed = if write { owner.writable_by(who.user, who.admin) } else { owner.readable_by(who.user, who.admin) };
        if !allowed {
            return Err(CoordinatorError::Forbidden(format!(
                "volume {name} belongs to {}; {} may not {} it",
                owner.owner.as_deref().unwrap_or("nobody (admins only)"),
                who.user,
                if write { "write" } else { "read" }
            )));
        }
        Ok((m, owner))
    }

    /// Pins the attachments of a new VM of `who`: each volume exists and `who` may use it;
    /// a read-only one at the version asked for (else the latest); a read-write one at the
    /// latest, never a snapshot, with a fencing epoch newer than any granted before.
    pub(crate) async fn resolve_volumes(&self, volumes: &mut [VolumeAttach], who: Asker<'_>) -> Result<(), CoordinatorError> {
        for v in volumes.iter_mut() {
            let (head, _) = self.volume_checked(&v.name, who, !v.readonly).await?;
            if v.readonly {
                let r = v.image_ref();
                let m = if r.version.is_some() { self.resolve_image(&r).await? } else { head };
                v.version = Some(m.version);
                continue;
            }
            if let Some(VolumeMeta { snapshot_of: Some(of) }) = &head.meta.volume {
                return Err(CoordinatorError::Conflict(format!("volume {} is a snapshot of {of}: attach it read-only (:ro)", v.name)));
            }
            v.version = Some(head.version);
            v.epoch = Some(self.fresh_epoch(&v.name).await?);
        }
        Ok(())
    }

    /// A fencing epoch for volume `name` newer than any granted before.
    async fn fresh_epoch(&self, name: &str) -> Result<u64, CoordinatorError> {
        let mut epoch = now_micros();
        for (client, _, _) in self.volume_on(name).await? {
            let current = client.volume_epoch(name).await.map_err(CoordinatorError::ImageServer)?;
            epoch = epoch.max(current + 1);
        }
        Ok(epoch)
    }

    /// The attachments suspended VM `rec` resumes with: each read-write volume at its head
    /// (the version its suspend committed; it holds the volume's claim, so nobody else
    /// committed since) with a fresh epoch; read-only ones as they were.
    pub(crate) async fn volumes_for_resume(&self, rec: &VmRecord) -> Result<Vec<VolumeAttach>, CoordinatorError> {
        let mut out = rec.config.volumes.clone();
        for v in out.iter_mut().filter(|v| !v.readonly) {
            let (_, head, _) = self.volume_on(&v.name).await?.into_iter().next().ok_or_else(|| unknown(&v.name))?;
            v.version = Some(head.version);
            v.epoch = Some(self.fresh_epoch(&v.name).await?);
        }
        Ok(out)
    }

    /// `volumes` with fresh epochs for their read-write attaches (the destination of a live
    /// migration: raised once it has taken over, which fences the source).
    pub(crate) async fn volumes_with_fresh_epochs(&self, volumes: &[VolumeAttach]) -> Result<Vec<VolumeAttach>, CoordinatorError> {
        let mut out = volumes.to_vec();
        for v in out.iter_mut().filter(|v| !v.readonly) {
            v.epoch = Some(self.fresh_epoch(&v.name).await?);
        }
        Ok(out)
    }

    /// Raises the epoch of `rec`'s read-write volumes on every image server holding them: from
    /// now on only this VM's commits are accepted.
    pub(crate) async fn fence_volumes(&self, rec: &VmRecord) -> Result<(), CoordinatorError> {
        for v in rec.config.volumes.iter().filter(|v| !v.readonly) {
            let Some(epoch) = v.epoch else { continue };
            for (client, _, _) in self.volume_on(&v.name).await? {
                client.raise_epoch(&v.name, epoch).await.map_err(CoordinatorError::ImageServer)?;
            }
            tracing::info!(vm = %rec.id, volume = %v.name, epoch, "volume attached read-write");
        }
        Ok(())
    }

    /// Every volume `who` may see, with its versions, where it is and who holds it.
    pub async fn list_volumes(&self, who: Asker<'_>) -> Result<Vec<VolumeInfo>, CoordinatorError> {
        let mut out: Vec<VolumeInfo> = Vec::new();
        for url in self.registry().image_server_urls() {
            let client = StoreClient::new(&url).map_err(CoordinatorError::ImageServer)?;
            let list = client.list().await.map_err(CoordinatorError::ImageServer)?;
            let server = self.registry().image_servers().into_iter().find(|a| a.url == url).map(|a| a.name).unwrap_or(url.clone());
            for s in list.iter().filter(|s| s.volume.is_some()) {
                let owner = ImageOwner { owner: s.owner.clone(), public: s.public };
                if !owner.readable_by(who.user, who.admin) {
                    continue;
                }
                match out.iter_mut().find(|v| v.name == s.name) {
                    Some(v) => merge(v, s, &server),
                    None => out.push(info_of(s, &server)),
                }
            }
        }
        for v in out.iter_mut() {
            v.attached_rw = self.holder(&claims::volume_key(&v.name)).await?.map(|h| h.name);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// One volume.
    pub async fn volume_info(&self, name: &str, who: Asker<'_>) -> Result<VolumeInfo, CoordinatorError> {
        self.volume_checked(name, who, false).await?;
        self.list_volumes(who).await?.into_iter().find(|v| v.name == name).ok_or_else(|| unknown(name))
    }

    /// The VM holding volume `name` read-write, if any.
    async fn volume_holder(&self, name: &str) -> Result<Option<VmRecord>, CoordinatorError> {
        match self.holder(&claims::volume_key(name)).await? {
            Some(h) => Ok(self.record(&h.vm).await?),
            None => Ok(None),
        }
    }

    /// Commits the writes of the running VM that holds volume `name` (`vgrid volume commit`).
    pub async fn commit_volume(&self, name: &str, who: Asker<'_>) -> Result<VolumeCommitted, CoordinatorError> {
        self.volume_checked(name, who, true).await?;
        let Some(rec) = self.volume_holder(name).await? else {
            let (m, _) = self.volume_checked(name, who, false).await?;
            return Ok(VolumeCommitted { volume: m.image_ref().to_string(), chunks_changed: 0, uploaded_bytes: 0, paused_secs: 0.0 });
        };
        if rec.state == VmState::Suspended {
            // Its suspend committed its writes: the head is the guest's data.
            let (m, _) = self.volume_checked(name, who, false).await?;
            return Ok(VolumeCommitted { volume: m.image_ref().to_string(), chunks_changed: 0, uploaded_bytes: 0, paused_secs: 0.0 });
        }
        if rec.state != VmState::Running {
            return Err(CoordinatorError::Conflict(format!(
                "volume {name} is attached to VM {} which is {}: its writes are committed when it stops or is removed",
                rec.name,
                rec.state.as_str()
            )));
        }
        let host = rec.host.clone().unwrap_or_default();
        let c = self.client(&host)?.commit_volume(&rec.id, name).await?;
        tracing::info!(vm = %rec.id, volume = %c.volume, chunks = c.chunks_changed, "volume committed on request");
        Ok(c)
    }

    /// A named, immutable copy of volume `name`'s latest version (no data copied): committed
    /// first when a running VM holds it.
    pub async fn snapshot_volume(&self, name: &str, snapshot: &str, who: Asker<'_>) -> Result<VolumeInfo, CoordinatorError> {
        vgrid_api::manifest::validate_name(snapshot).map_err(CoordinatorError::Image)?;
        if !self.volume_on(snapshot).await?.is_empty() {
            return Err(CoordinatorError::Conflict(format!("{snapshot} exists already: choose another name for the snapshot")));
        }
        let holder = self.volume_holder(name).await?;
        if holder.as_ref().is_some_and(|r| r.state == VmState::Running) {
            self.commit_volume(name, who).await?;
        }
        let (head, owner) = self.volume_checked(name, who, true).await?;
        for (client, m, _) in self.volume_on(name).await? {
            let snap = Manifest {
                name: snapshot.to_string(),
                version: 0,
                created: 0,
                parent: Some(m.image_ref()),
                meta: vgrid_api::ImageMeta { volume: Some(VolumeMeta { snapshot_of: Some(m.image_ref()) }), ..m.meta.clone() },
                ..m.clone()
            };
            let up = client.begin_upload().await.map_err(CoordinatorError::ImageServer)?;
            client.commit(&up, &snap).await.map_err(CoordinatorError::ImageServer)?;
            client.set_owner(snapshot, &owner).await.map_err(CoordinatorError::ImageServer)?;
        }
        tracing::info!(volume = %head.image_ref(), %snapshot, "volume snapshot taken");
        self.volume_info(snapshot, who).await
    }

    /// Removes volume `name` (every version) from every image server, unless a VM holds it.
    pub async fn remove_volume(&self, name: &str, who: Asker<'_>) -> Result<GcReport, CoordinatorError> {
        self.volume_checked(name, who, true).await?;
        if let Some(rec) = self.volume_holder(name).await? {
            return Err(CoordinatorError::Conflict(format!(
                "volume {name} is attached read-write to VM {} ({}): stop or remove that VM first",
                rec.name,
                rec.state.as_str()
            )));
        }
        // Fenced first: a host of a VM that held it (lost, say) and comes back cannot commit a
        // version after the removal, which would bring the volume back.
        let epoch = self.fresh_epoch(name).await?;
        let mut total = GcReport::default();
        for (client, _, _) in self.volume_on(name).await? {
            client.raise_epoch(name, epoch).await.map_err(CoordinatorError::ImageServer)?;
            let r = client.delete(&ImageRef { name: name.to_string(), version: None }).await.map_err(CoordinatorError::ImageServer)?;
            total.chunks_freed += r.chunks_freed;
            total.bytes_freed += r.bytes_freed;
        }
        tracing::info!(volume = %name, freed = total.bytes_freed, "volume removed");
        Ok(total)
    }
}

impl Coordinator {
    /// Removes VM `rec`'s staging volumes (`remove_with_vm`: a `vm run --stage-in` without
    /// `--stage-out`) once it has ended, its read-write claim released and its host's last
    /// commit done. One already gone is fine. Returns, for each that could not be removed, a
    /// sentence naming it and the cause (also logged).
    pub(crate) async fn remove_staging(&self, rec: &VmRecord) -> Vec<String> {
        let mut failed = Vec::new();
        for v in rec.config.volumes.iter().filter(|v| v.remove_with_vm) {
            match self.remove_volume(&v.name, Asker { user: &rec.owner, admin: true }).await {
                Ok(r) => tracing::info!(vm = %rec.id, volume = %v.name, freed = r.bytes_freed, "staging volume removed with its VM"),
                Err(CoordinatorError::UnknownImage(_)) => {}
                Err(e) => {
                    tracing::warn!(vm = %rec.id, volume = %v.name, "staging volume not removed with its VM: {e}");
                    failed.push(format!("its staging volume {} was not removed ({e}): `vgrid volume rm {}`", v.name, v.name));
                }
            }
        }
        failed
    }
}

/// Refuses a warm-image snapshot (`vm snapshot`) of a VM with volumes: the image would hold
/// the guest's memory but not its volumes (suspend, migrate or stop it instead).
pub(crate) fn refuse_snapshot(rec: &VmRecord) -> Result<(), CoordinatorError> {
    if rec.config.volumes.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = rec.config.volumes.iter().map(|v| v.name.as_str()).collect();
    Err(CoordinatorError::Conflict(format!(
        "VM {} has volumes attached ({}): it cannot be saved as a warm image (the image would not hold their data); use `vgrid volume snapshot` for a volume, `vm suspend` for the VM",
        rec.name,
        names.join(", ")
    )))
}

fn info_of(s: &ImageSummary, server: &str) -> VolumeInfo {
    VolumeInfo {
        name: s.name.clone(),
        owner: s.owner.clone(),
        size: s.size,
        stored_bytes: s.stored_bytes,
        versions: vec![s.version],
        snapshot_of: s.volume.as_ref().and_then(|v| v.snapshot_of.as_ref()).map(|r| r.to_string()),
        attached_rw: None,
        servers: vec![server.to_string()],
    }
}

fn merge(v: &mut VolumeInfo, s: &ImageSummary, server: &str) {
    if !v.versions.contains(&s.version) {
        if s.version > v.versions.iter().copied().max().unwrap_or(0) {
            v.size = s.size;
            v.stored_bytes = s.stored_bytes;
        }
        v.versions.push(s.version);
        v.versions.sort_unstable();
    }
    if !v.servers.iter().any(|x| x == server) {
        v.servers.push(server.to_string());
    }
}
