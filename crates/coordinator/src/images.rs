//! Who may use which image: every image name belongs to a user (or to nobody: admins and grid
//! nodes only) and may be public. The records live on the image servers
//! (`/store/v1/owners/{name}`); the coordinator checks them before it runs a VM from an image
//! or saves a VM into one, and records the VM's owner as the owner of what it saved.

use vgrid_api::rest::ImageOwner;
use vgrid_api::ImageRef;
use vgrid_storeclient::StoreClient;

use crate::lifecycle::{Coordinator, CoordinatorError};

/// Why an image may not be used.
pub enum Refusal {
    Forbidden(String),
    Failed(CoordinatorError),
}

impl From<CoordinatorError> for Refusal {
    fn from(e: CoordinatorError) -> Self {
        Refusal::Failed(e)
    }
}

impl Coordinator {
    /// The owner record of `name` on the first registered image server that has the image.
    async fn image_owner(&self, name: &str) -> Result<Option<ImageOwner>, CoordinatorError> {
        for url in self.registry().image_server_urls() {
            let Ok(client) = StoreClient::new(&url) else { continue };
            let r = ImageRef { name: name.to_string(), version: None };
            match client.manifest(&r).await {
                Ok(_) => return client.owner(name).await.map(Some).map_err(CoordinatorError::ImageServer),
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(CoordinatorError::ImageServer(e)),
            }
        }
        Ok(None)
    }

    /// May `user` run VMs from image `name`, which `server` holds?
    pub(crate) async fn check_image_read(&self, server: &StoreClient, name: &str, user: &str, admin: bool) -> Result<(), CoordinatorError> {
        let o = server.owner(name).await.map_err(CoordinatorError::ImageServer)?;
        if o.readable_by(user, admin) {
            return Ok(());
        }
        Err(CoordinatorError::Forbidden(format!(
            "image {name} belongs to {}; {user} may not run it",
            o.owner.as_deref().unwrap_or("nobody (admins only)")
        )))
    }

    /// May `user` save a VM as (a new version of) image `name`?
    pub async fn check_image_write(&self, name: &str, user: &str, admin: bool) -> Result<(), Refusal> {
        match self.image_owner(name).await? {
            Some(o) if !o.writable_by(user, admin) => Err(Refusal::Forbidden(format!(
                "image {name} belongs to {}; {user} may not save into it",
                o.owner.as_deref().unwrap_or("nobody (admins only)")
            ))),
            _ => Ok(()),
        }
    }

    /// Before saving a VM of `owner` into an image: refused when the owner already stores as
    /// much as the quota allows on some image server (as the servers last advertised). The
    /// saved image itself may go beyond it once: its size is known only when saved.
    pub fn check_stored_quota(&self, owner: &str, quota: &vgrid_api::auth::Quota) -> Result<(), Refusal> {
        let Some(max) = quota.stored_bytes else { return Ok(()) };
        for ad in self.registry().image_servers() {
            let used: u64 = ad.images.iter().filter(|i| i.owner.as_deref() == Some(owner)).map(|i| i.stored_bytes).sum();
            if used >= max {
                return Err(Refusal::Forbidden(format!(
                    "quota exceeded: user {owner} may store {max} bytes of images on each image server; {used} stored on {}",
                    ad.name
                )));
            }
        }
        Ok(())
    }

    /// Records `owner` as the owner of the image `image` (`NAME@VERSION`) a VM was saved into,
    /// on the image servers that hold it, unless it has an owner already.
    pub async fn own_saved_image(&self, image: &str, owner: &str) {
        let Ok(r) = image.parse::<ImageRef>() else { return };
        for url in self.registry().image_server_urls() {
            let Ok(client) = StoreClient::new(&url) else { continue };
            if client.manifest(&ImageRef { name: r.name.clone(), version: None }).await.is_err() {
                continue;
            }
            match client.owner(&r.name).await {
                Ok(o) if o.owner.is_some() => {}
                _ => {
                    let o = ImageOwner { owner: Some(owner.to_string()), public: false };
                    if let Err(e) = client.set_owner(&r.name, &o).await {
                        tracing::warn!(image = %r.name, %owner, server = %url, "recording the owner of a saved image failed: {e}");
                    }
                }
            }
        }
    }
}
