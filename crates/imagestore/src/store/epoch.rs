//! Volumes' fencing epochs and fenced commits, both through one object per volume,
//! `volumes/NAME/epoch`, holding `EPOCH` or `EPOCH VERSION`: the epoch in force and the last
//! version number a fenced commit reserved. Every change of it is a conditional write
//! (created if absent, else updated only if its e-tag is still the one read, `If-Match`), so
//! image servers sharing a bucket order their raises and commits on it:
//!
//! * [`ImageStore::raise_epoch`] writes a higher epoch, then *seals* the reserved version if
//!   its manifest has not landed (writes it first, as a copy of the version before it, with a
//!   conditional create).
//! * a fenced commit reads the object, refuses an older epoch, seals the previous reservation
//!   if it never landed, reserves the next version with a conditional write of the epoch it
//!   read and the new number, and only then creates that version's manifest (conditional
//!   create). A raise between its read and its reservation makes the reservation fail (read
//!   again: refused); a raise after it seals the number, so the late manifest is refused too.
//!
//! So once `raise_epoch` has returned, no commit carrying an older epoch lands: either it landed
//! before (and the new holder sees it), or it is refused. On a local directory (no conditional
//! update) one server alone uses the store and its commit lock orders the same steps.

use object_store::{PutMode, PutOptions, PutPayload, UpdateVersion};
use vgrid_api::manifest::validate_name;
use vgrid_api::{ImageRef, Manifest};

use super::{epoch_path, manifest_path, now_secs, ImageStore, StoreError};

/// How many times a volume's epoch object is read again after another server changed it
/// between our read and our conditional write.
const EPOCH_CONFLICTS: u32 = 100;

/// What `volumes/NAME/epoch` holds, and the version of the object it was read at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub epoch: u64,
    /// The last version a fenced commit reserved (0: none).
    pub reserved: u32,
}

impl Head {
    fn parse(s: &str) -> Option<Head> {
        let mut it = s.split_whitespace();
        let epoch = it.next()?.parse().ok()?;
        let reserved = match it.next() {
            Some(v) => v.parse().ok()?,
            None => 0,
        };
        Some(Head { epoch, reserved })
    }
    fn render(&self) -> String {
        format!("{} {}", self.epoch, self.reserved)
    }
}

/// The result of one conditional write of the epoch object.
enum Cas {
    Done,
    /// Another server changed it since our read.
    Conflict,
}

impl ImageStore {
    /// The fencing epoch of volume `name` (0: never attached read-write).
    pub async fn volume_epoch(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self.read_head(name).await?.0.epoch)
    }

    pub(crate) async fn read_head(&self, name: &str) -> Result<(Head, Option<UpdateVersion>), StoreError> {
        let path = epoch_path(name);
        match self.objects.get(&path).await {
            Ok(r) => {
                let version = UpdateVersion { e_tag: r.meta.e_tag.clone(), version: r.meta.version.clone() };
                let b = r.bytes().await.map_err(|e| StoreError::backend("read", format!("epoch of volume {name}"), e))?;
                let text = String::from_utf8_lossy(&b);
                let head =
                    Head::parse(&text).ok_or_else(|| StoreError::CorruptEpoch { volume: name.into(), content: text.trim().into() })?;
                Ok((head, Some(version)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok((Head { epoch: 0, reserved: 0 }, None)),
            Err(e) => Err(StoreError::backend("read", format!("epoch of volume {name}"), e)),
        }
    }

    /// Writes `head` if the object is still at `version` (absent when `None`).
    async fn write_head(&self, name: &str, head: Head, version: Option<UpdateVersion>) -> Result<Cas, StoreError> {
        let what = || format!("epoch of volume {name}");
        let mode = match version {
            Some(v) => PutMode::Update(v),
            None => PutMode::Create,
        };
        let put = PutOptions { mode, ..Default::default() };
        match self.objects.put_opts(&epoch_path(name), PutPayload::from(head.render()), put).await {
            Ok(_) => Ok(Cas::Done),
            Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => Ok(Cas::Conflict),
            Err(object_store::Error::NotImplemented) => {
                // A local directory (no conditional update): one server alone uses it, and
                // the commit lock (held by every caller) orders its writes.
                self.objects
                    .put(&epoch_path(name), PutPayload::from(head.render()))
                    .await
                    .map_err(|e| StoreError::backend("write", what(), e))?;
                Ok(Cas::Done)
            }
            Err(e) => Err(StoreError::backend("write", what(), e)),
        }
    }

    /// Raises volume `name`'s epoch to `epoch` (never lowers it): from now on only commits
    /// carrying `epoch` or newer are accepted, and none carrying an older one lands after
    /// this returns (the version such a commit reserved is sealed). Returns the epoch now in
    /// force.
    pub async fn raise_epoch(&self, name: &str, epoch: u64) -> Result<u64, StoreError> {
        validate_name(name).map_err(StoreError::BadName)?;
        let _c = self.commit_lock.lock().await;
        let mut conflicts = 0;
        let head = loop {
            let (head, version) = self.read_head(name).await?;
            if epoch <= head.epoch {
                // Raised already (perhaps by a raise still sealing on another server).
                self.seal(name, head.reserved).await?;
                return Ok(head.epoch);
            }
            let raised = Head { epoch, ..head };
            match self.write_head(name, raised, version).await? {
                Cas::Done => break raised,
                Cas::Conflict => conflicts = self.conflict(name, conflicts)?,
            }
        };
        self.seal(name, head.reserved).await?;
        tracing::info!(volume = %name, epoch, conflicts, "volume epoch raised");
        Ok(epoch)
    }

    fn conflict(&self, name: &str, conflicts: u32) -> Result<u32, StoreError> {
        if conflicts >= EPOCH_CONFLICTS {
            return Err(StoreError::Contended { object: format!("epoch of volume {name}"), tries: conflicts });
        }
        Ok(conflicts + 1)
    }

    /// Makes sure reserved version `version` of volume `name` can no longer be written by the
    /// commit that reserved it: if its manifest has not landed, writes it (conditional create)
    /// as a copy of the latest version before it. The commit that loses that race is refused
    /// ([`ImageStore::commit_fenced`] then reads the epoch again).
    async fn seal(&self, name: &str, version: u32) -> Result<(), StoreError> {
        if version == 0 {
            return Ok(());
        }
        let r = ImageRef { name: name.into(), version: Some(version) };
        match self.objects.head(&manifest_path(name, version)).await {
            Ok(_) => return Ok(()),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(StoreError::backend("stat", format!("manifest of volume {r}"), e)),
        }
        let Some(before) = self.versions(name).await?.into_iter().rfind(|v| *v < version) else {
            tracing::warn!(volume = %r, "a reserved version cannot be sealed: the volume has no version before it");
            return Ok(());
        };
        let mut m = self.get_manifest(&ImageRef { name: name.into(), version: Some(before) }).await?;
        (m.version, m.created) = (version, now_secs());
        let json = serde_json::to_vec_pretty(&m).expect("manifest serialises");
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.objects.put_opts(&manifest_path(name, version), PutPayload::from(json), create).await {
            Ok(_) => tracing::warn!(volume = %r, copy_of = before, "a fenced-out commit's version sealed as a copy of the one before"),
            // The commit won: it landed before this seal, so before the raise returns.
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(StoreError::backend("write", format!("manifest of volume {r}"), e)),
        }
        Ok(())
    }

    /// Writes volume manifest `manifest` (version 0: the next one) as the holder of epoch
    /// `fence`, atomically against [`ImageStore::raise_epoch`] (see the module's comment).
    /// Called with the commit lock held and the chunks checked.
    pub(crate) async fn put_volume_fenced(&self, mut manifest: Manifest, fence: u64) -> Result<Manifest, StoreError> {
        let name = manifest.name.clone();
        let explicit = manifest.version;
        let mut conflicts = 0;
        loop {
            let (head, version) = self.read_head(&name).await?;
            if fence < head.epoch {
                return Err(StoreError::Fenced { volume: name, epoch: fence, current: head.epoch });
            }
            self.seal(&name, head.reserved).await?;
            manifest.version = match explicit {
                0 => {
                    let last = self.versions(&name).await?.last().copied().unwrap_or(0);
                    last.max(self.counter(&name).await?).max(head.reserved) + 1
                }
                v => v,
            };
            if let Cas::Conflict = self.write_head(&name, Head { epoch: head.epoch, reserved: manifest.version }, version).await? {
                conflicts = self.conflict(&name, conflicts)?;
                continue;
            }
            let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
            let create = PutOptions { mode: PutMode::Create, ..Default::default() };
            match self.objects.put_opts(&manifest_path(&name, manifest.version), PutPayload::from(json), create).await {
                Ok(_) => return Ok(manifest),
                Err(object_store::Error::AlreadyExists { .. }) if explicit != 0 => {
                    return Err(StoreError::ImageExists(manifest.image_ref()))
                }
                // Sealed by a raise (read again: refused) or taken by a commit of the same
                // holder through another server (reserve the next one).
                Err(object_store::Error::AlreadyExists { .. }) => conflicts = self.conflict(&name, conflicts)?,
                Err(e) => return Err(StoreError::backend("write", format!("manifest of image {}", manifest.image_ref()), e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Head;

    #[test]
    fn the_epoch_object_reads_old_and_new_forms() {
        assert_eq!(Head::parse("7"), Some(Head { epoch: 7, reserved: 0 }));
        assert_eq!(Head::parse("7 12\n"), Some(Head { epoch: 7, reserved: 12 }));
        assert_eq!(Head::parse(&Head { epoch: 3, reserved: 4 }.render()), Some(Head { epoch: 3, reserved: 4 }));
        assert_eq!(Head::parse("x"), None);
        assert_eq!(Head::parse(""), None);
    }
}
