//! `/api/v1/volumes`: the user's volumes (see `crate::volumes`). Creating and importing one
//! goes to an image server directly (`vgrid volume create|import`), like an image.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Extension;
use vgrid_api::rest::GcReport;
use vgrid_api::volume::{SnapshotCreate, VolumeCommitted, VolumeInfo};
use vgrid_api::ErrorBody;
use vgrid_trust::json::{Json, JsonRejection};

use super::ApiError;
use crate::auth::Principal;
use crate::volumes::Asker;
use crate::Coordinator;

/// A path's volume name not of the documented shape is a 400.
fn checked(name: &str) -> Result<(), ApiError> {
    vgrid_api::manifest::validate_name(name).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("volume {name:?}: {e}")))
}

fn asker(p: &Principal) -> Asker<'_> {
    Asker { user: &p.user, admin: p.admin }
}

/// The caller's volumes (an admin's: all), with their versions, the image servers that hold
/// them and the VM that holds each read-write.
#[utoipa::path(get, path = "/api/v1/volumes", responses((status = 200, body = [VolumeInfo])))]
pub async fn list_volumes(
    State(c): State<Arc<Coordinator>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Vec<VolumeInfo>>, ApiError> {
    Ok(Json(c.list_volumes(asker(&p)).await?))
}

/// One volume.
#[utoipa::path(get, path = "/api/v1/volumes/{name}", params(("name" = String, Path, description = "volume name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")),
    responses((status = 200, body = VolumeInfo), (status = 404, body = ErrorBody)))]
pub async fn get_volume(
    State(c): State<Arc<Coordinator>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<VolumeInfo>, ApiError> {
    checked(&name)?;
    Ok(Json(c.volume_info(&name, asker(&p)).await?))
}

/// Removes a volume (every version) unless a VM holds it read-write.
#[utoipa::path(delete, path = "/api/v1/volumes/{name}", params(("name" = String, Path, description = "volume name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")),
    responses((status = 200, body = GcReport), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "attached read-write to a VM")))]
pub async fn delete_volume(
    State(c): State<Arc<Coordinator>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<GcReport>, ApiError> {
    checked(&name)?;
    Ok(Json(c.remove_volume(&name, asker(&p)).await?))
}

/// Publishes the writes of the running VM that holds the volume as its next version (the
/// guest is paused while they are read).
#[utoipa::path(post, path = "/api/v1/volumes/{name}/commit", params(("name" = String, Path, description = "volume name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")),
    responses((status = 200, body = VolumeCommitted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "its VM is not running")))]
pub async fn commit_volume(
    State(c): State<Arc<Coordinator>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<VolumeCommitted>, ApiError> {
    checked(&name)?;
    Ok(Json(c.commit_volume(&name, asker(&p)).await?))
}

/// A named, immutable copy of the volume's latest version (committed first when a running VM
/// holds it); attached read-only only.
#[utoipa::path(post, path = "/api/v1/volumes/{name}/snapshot", params(("name" = String, Path, description = "volume name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")),
    request_body = SnapshotCreate,
    responses((status = 201, body = VolumeInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the snapshot's name is taken")))]
pub async fn snapshot_volume(
    State(c): State<Arc<Coordinator>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: Result<Json<SnapshotCreate>, JsonRejection>,
) -> Result<(StatusCode, Json<VolumeInfo>), ApiError> {
    checked(&name)?;
    let Json(req) = body?;
    Ok((StatusCode::CREATED, Json(c.snapshot_volume(&name, &req.snapshot, asker(&p)).await?)))
}
