//! Volumes' fencing epochs (`volumes/NAME/epoch`): read, and raised with a conditional write so
//! that image servers sharing a bucket never lower one.

use object_store::{PutMode, PutOptions, PutPayload};
use vgrid_api::manifest::validate_name;

use super::{epoch_path, ImageStore, StoreError};

/// How many times a volume's epoch is read again after another server changed it between our
/// read and our conditional write ([`ImageStore::raise_epoch`]).
const EPOCH_CONFLICTS: u32 = 100;

impl ImageStore {
    /// The fencing epoch of volume `name` (0: never attached read-write).
    pub async fn volume_epoch(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self.read_number(&epoch_path(name), || format!("epoch of volume {name}")).await?.0)
    }

    /// Raises volume `name`'s epoch to `epoch` (never lowers it): from now on only commits
    /// carrying `epoch` or newer are accepted. Returns the epoch now in force.
    ///
    /// A conditional write in the bucket (created if absent, else updated only if its e-tag is
    /// still the one read, `If-Match`), read again on a conflict: two image servers raising it
    /// at once cannot both win, and a lower epoch never overwrites a higher one.
    pub async fn raise_epoch(&self, name: &str, epoch: u64) -> Result<u64, StoreError> {
        validate_name(name).map_err(StoreError::BadName)?;
        let _c = self.commit_lock.lock().await;
        let what = || format!("epoch of volume {name}");
        let mut conflicts = 0;
        loop {
            let (current, version) = self.read_number(&epoch_path(name), what).await?;
            if epoch <= current {
                return Ok(current);
            }
            let mode = match version {
                Some(v) => PutMode::Update(v),
                None => PutMode::Create,
            };
            let put = PutOptions { mode, ..Default::default() };
            match self.objects.put_opts(&epoch_path(name), PutPayload::from(epoch.to_string()), put).await {
                Ok(_) => break,
                Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. })
                    if conflicts < EPOCH_CONFLICTS =>
                {
                    // Another server wrote it since our read: read it again.
                    conflicts += 1;
                }
                Err(object_store::Error::NotImplemented) => {
                    // A local directory (no conditional update): one server alone uses it,
                    // and the commit lock orders its raises.
                    self.objects
                        .put(&epoch_path(name), PutPayload::from(epoch.to_string()))
                        .await
                        .map_err(|e| StoreError::backend("write", what(), e))?;
                    break;
                }
                Err(e) => return Err(StoreError::backend("write", what(), e)),
            }
        }
        tracing::info!(volume = %name, epoch, conflicts, "volume epoch raised");
        Ok(epoch)
    }
}
