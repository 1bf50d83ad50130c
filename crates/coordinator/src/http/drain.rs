//! `/api/v1/hosts/{name}/drain`: taking a host out of service and back (admins; see
//! `crate::drain`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use vgrid_api::grid::Drain;

use super::{ApiError, Caller, Ctx};

/// Takes the host out of service: no new placement; each of its VMs is live-migrated to a host
/// that can take it, else suspended to the image servers (in the background: follow it with
/// `GET`). Admins only.
#[utoipa::path(post, path = "/api/v1/hosts/{name}/drain", params(("name" = String, Path)),
    responses((status = 202, body = Drain), (status = 403, body = vgrid_api::ErrorBody), (status = 404, body = vgrid_api::ErrorBody)))]
pub async fn drain_host(State(c): Ctx, Extension(p): Caller, Path(name): Path<String>) -> Result<(StatusCode, Json<Drain>), ApiError> {
    p.check_admin("draining hosts")?;
    Ok((StatusCode::ACCEPTED, Json(c.drain(&name).await?)))
}

/// The host's drain: each VM's step (`waiting`, `migrating`, `migrated`, `suspending`,
/// `suspended`, `failed`) and, once `finished` is set, the end. 404 when it is not draining.
#[utoipa::path(get, path = "/api/v1/hosts/{name}/drain", params(("name" = String, Path)),
    responses((status = 200, body = Drain), (status = 404, body = vgrid_api::ErrorBody)))]
pub async fn get_drain(State(c): Ctx, Path(name): Path<String>) -> Result<Json<Drain>, ApiError> {
    match c.drain_status(&name).await? {
        Some(d) => Ok(Json(d)),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("host {name} is not draining"))),
    }
}

/// Puts the host back in service; answers the drain it ends (404 when the host is unknown).
/// Admins only.
#[utoipa::path(delete, path = "/api/v1/hosts/{name}/drain", params(("name" = String, Path)),
    responses((status = 200, body = Option<Drain>), (status = 403, body = vgrid_api::ErrorBody), (status = 404, body = vgrid_api::ErrorBody)))]
pub async fn undrain_host(State(c): Ctx, Extension(p): Caller, Path(name): Path<String>) -> Result<Json<Option<Drain>>, ApiError> {
    p.check_admin("putting hosts back in service")?;
    Ok(Json(c.undrain(&name).await?))
}
