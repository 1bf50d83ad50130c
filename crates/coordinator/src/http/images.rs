//! The grid's images as the coordinator knows them from the image servers' advertisements:
//! what the dashboard's images page lists (the CLI asks an image server directly).

use axum::Extension;
use vgrid_api::grid::GridImage;
use vgrid_api::rest::ImageOwner;

use super::{ApiResult, Caller, Ctx};
use vgrid_trust::json::Json;

/// The image versions the caller may run (their own, public ones; admins: all), each once
/// with the image servers that advertise it, sorted by name and version. Volumes are listed
/// at `/api/v1/volumes`.
#[utoipa::path(get, path = "/api/v1/images", responses((status = 200, body = [GridImage])))]
pub(super) async fn list_images(axum::extract::State(c): Ctx, Extension(p): Caller) -> ApiResult<Vec<GridImage>> {
    let mut out: Vec<GridImage> = Vec::new();
    for ad in c.registry().image_servers() {
        for i in ad.images {
            let owner = ImageOwner { owner: i.owner.clone(), public: i.public };
            if i.volume.is_some() || !owner.readable_by(&p.user, p.admin) {
                continue;
            }
            match out.iter_mut().find(|g| g.image.name == i.name && g.image.version == i.version) {
                Some(g) => g.servers.push(ad.name.clone()),
                None => out.push(GridImage { image: i, servers: vec![ad.name.clone()] }),
            }
        }
    }
    out.sort_by(|a, b| (&a.image.name, a.image.version).cmp(&(&b.image.name, b.image.version)));
    Ok(Json(out))
}
