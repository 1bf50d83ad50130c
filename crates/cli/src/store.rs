//! The image server a user command talks to (`--image-server`, or one the coordinator knows),
//! with the user's login: shared by the user commands (`vgrid image ...`) and the
//! `vgrid image nbd` role launcher.

use anyhow::anyhow;
use clap::Args;
use vgrid_api::grid::ImageServerAd;
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
    /// Image server URL [default: the coordinator's own when it serves images (`vgrid up`),
    /// otherwise one of the image servers the coordinator knows (named on stderr)].
    #[arg(long = "image-server", env = "VGRID_IMAGE_SERVER")]
    pub image_server: Option<String>,
}

/// What a command needs an image server for: where to send a new image, or which holds one.
#[derive(Debug, Clone, Copy)]
pub enum Want<'a> {
    /// Any image server that takes uploads.
    Upload,
    /// One that holds this image (`NAME` or `NAME@VERSION`).
    Image(&'a str),
}

impl ServerArg {
    /// A client of the image server (see [`ServerArg::url`]), trusting its CA (pinned on first
    /// contact) and carrying the user's login.
    pub async fn client(&self, ctx: &Ctx, want: Want<'_>) -> anyhow::Result<StoreClient> {
        let url = self.url(ctx, want).await?;
        crate::trust::trust(&url)?;
        use_store_token(ctx).await;
        StoreClient::new(&url).map_err(|e| anyhow!("{e}"))
    }

    /// `--image-server` when given; otherwise the coordinator's URL when it serves images
    /// itself (`vgrid up`) or does not list image servers (a standalone image server); otherwise
    /// one of the image servers it lists, said on stderr. None listed is an error naming how to
    /// add one.
    pub async fn url(&self, ctx: &Ctx, want: Want<'_>) -> anyhow::Result<String> {
        if let Some(u) = &self.image_server {
            return Ok(u.trim_end_matches('/').to_string());
        }
        let ads = match ctx.api().get::<Vec<ImageServerAd>>("/api/v1/image-servers").await {
            Ok(ads) => ads,
            Err(e) => {
                tracing::debug!(error = %e, "no image server list at {}; using it as the image server", ctx.url);
                return Ok(ctx.url.clone());
            }
        };
        let ad = pick(&ctx.url, &ads, want).ok_or_else(|| {
            anyhow!(
                "the coordinator at {} knows no image server (none has sent a heartbeat): start one with \
                 `vgrid image-server --coordinator {}`, or name one with --image-server URL",
                ctx.url,
                ctx.url
            )
        })?;
        let url = ad.url.trim_end_matches('/').to_string();
        if url != ctx.url {
            eprintln!("image server {} ({url})", ad.name);
        }
        Ok(url)
    }
}

/// The image server for `want` among those the coordinator at `coordinator` lists: the
/// coordinator itself when it is one; for an image, the first (by name) advertising it, else the
/// first; for an upload, the one holding the fewest images (ties by name).
fn pick<'a>(coordinator: &str, ads: &'a [ImageServerAd], want: Want<'_>) -> Option<&'a ImageServerAd> {
    if let Some(own) = ads.iter().find(|a| a.url.trim_end_matches('/') == coordinator) {
        return Some(own);
    }
    match want {
        Want::Upload => ads.iter().min_by(|a, b| a.images.len().cmp(&b.images.len()).then(a.name.cmp(&b.name))),
        Want::Image(image) => {
            let (name, version) = match image.split_once('@') {
                Some((n, v)) => (n, v.parse::<u32>().ok()),
                None => (image, None),
            };
            let holds = |a: &&ImageServerAd| a.images.iter().any(|i| i.name == name && version.is_none_or(|v| i.version == v));
            ads.iter().find(holds).or_else(|| ads.first())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ad(name: &str, url: &str, images: &[(&str, u32)]) -> ImageServerAd {
        let images = images
            .iter()
            .map(|(n, v)| vgrid_api::rest::ImageSummary {
                name: n.to_string(),
                version: *v,
                size: 0,
                stored_bytes: 0,
                chunk_size: 65536,
                os: "linux".into(),
                arch: "x86_64".into(),
                boot: "kernel".into(),
                created: 0,
                warm: false,
                parent: None,
                owner: None,
                public: false,
                volume: None,
            })
            .collect();
        ImageServerAd { name: name.into(), url: url.into(), images }
    }

    #[test]
    fn picks_the_coordinator_itself_then_the_holder_then_the_emptiest() {
        let c = "https://127.0.0.1:7070";
        let a = ad("a", "https://127.0.0.1:1", &[("x", 1), ("y", 1)]);
        let b = ad("b", "https://127.0.0.1:2/", &[("y", 2)]);
        let ads = vec![a.clone(), b.clone()];
        assert_eq!(pick(c, &ads, Want::Upload).unwrap().name, "b");
        assert_eq!(pick(c, &ads, Want::Image("y@2")).unwrap().name, "b");
        assert_eq!(pick(c, &ads, Want::Image("y")).unwrap().name, "a");
        assert_eq!(pick(c, &ads, Want::Image("z")).unwrap().name, "a");
        assert_eq!(pick("https://127.0.0.1:2", &ads, Want::Image("x")).unwrap().name, "b");
        assert!(pick(c, &[], Want::Upload).is_none());
    }
}
