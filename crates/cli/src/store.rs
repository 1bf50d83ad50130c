//! The image server a user command talks to (`--image-server`, by default the coordinator's
//! URL), with the user's login: shared by the user commands (`vgrid image ...`) and the
//! `vgrid image nbd` role launcher.

use anyhow::anyhow;
use clap::Args;
use vgrid_storeclient::StoreClient;

use crate::Ctx;

/// Sends, from every image server client of this process, the login token image servers of
/// the grid check with the coordinator (logging in with the local key when there is none); none
/// when the coordinator cannot be reached (a standalone image server has no users).
pub async fn use_store_token(ctx: &Ctx) {
    let api = ctx.api();
    // Asking who we are confirms the saved token (an unknown or expired one, e.g. from an
    // earlier coordinator at this address, is replaced by a fresh login), so image servers are
    // never handed a token the coordinator will not vouch for.
    let token = match api.get::<vgrid_api::auth::UserInfo>("/api/v1/whoami").await {
        Ok(_) => api.token(),
        Err(e) => {
            tracing::debug!(error = %e, "no login for the image servers");
            None
        }
    };
    vgrid_trust::tls::set_bearer(token);
}

#[derive(Args, Debug)]
pub struct ServerArg {
    /// Image server URL [default: the coordinator URL, which `vgrid up` also serves images on].
    #[arg(long = "image-server", env = "VGRID_IMAGE_SERVER")]
    pub image_server: Option<String>,
}

impl ServerArg {
    /// A client of the image server, trusting its CA (pinned on first contact) and carrying
    /// the user's login.
    pub async fn client(&self, ctx: &Ctx) -> anyhow::Result<StoreClient> {
        let url = self.image_server.clone().unwrap_or_else(|| ctx.url.clone());
        crate::trust::trust(&url)?;
        use_store_token(ctx).await;
        StoreClient::new(&url).map_err(|e| anyhow!("{e}"))
    }
}
