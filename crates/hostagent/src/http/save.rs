//! `/host/v1/vms/{id}/snapshot`, `/suspend` and `/saving`: saving a VM as a warm image.

use std::sync::Arc;

use vgrid_api::host::{SaveRequest, VmPresence};
use vgrid_api::vm::SavedImage;
use vgrid_api::ErrorBody;

use super::HttpError;
use crate::agent::Agent;

type Body = Result<vgrid_trust::json::Json<SaveRequest>, vgrid_trust::json::JsonRejection>;

async fn save(agent: Arc<Agent>, id: String, body: Body, suspend: bool) -> axum::response::Response {
    use axum::response::IntoResponse;
    let req = match body {
        Ok(vgrid_trust::json::Json(r)) => r,
        Err(e) => return HttpError::body("save request", e).into_response(),
    };
    // Its own task: a caller that goes away (a coordinator restart) must not cancel a save
    // halfway, which would leave the guest paused.
    let task = tokio::spawn(async move { crate::save::save_vm(&agent, &id, &req, suspend).await });
    match task.await {
        Ok(Ok(s)) => axum::Json(s).into_response(),
        Ok(Err(e)) => HttpError::from(e).into_response(),
        Err(e) => HttpError(axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("save task failed: {e}")).into_response(),
    }
}

/// `GET /host/v1/vms/{id}/saving`: whether a snapshot or suspend of the VM is in progress, and
/// whether its QEMU runs, and whether the host knows it at all (launching or present).
#[utoipa::path(get, path = "/host/v1/vms/{id}/saving", params(("id" = String, Path, description = "VM id")), responses((status = 200, body = VmPresence)))]
pub(super) async fn saving(
    axum::extract::State(a): axum::extract::State<Arc<Agent>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (saving, running, exited) = match a.vm(&id) {
        Some(vm) => (crate::overlay::is_saving(vm.runtime_dir()), vm.exit_info().is_none(), vm.exit_info().is_some()),
        None => (false, false, false),
    };
    // Known: launching (admitted) or present; a coordinator that restarted right after it
    // sent a launch learns whether the launch ever arrived.
    let known = a.vm(&id).is_some() || a.resources().is_admitted(&id);
    axum::Json(VmPresence { saving, running, known, exited }).into_response()
}

/// `POST /host/v1/vms/{id}/snapshot`: save the VM as a warm image; it keeps running.
#[utoipa::path(post, path = "/host/v1/vms/{id}/snapshot", params(("id" = String, Path, description = "VM id")), request_body = SaveRequest, responses((status = 200, body = SavedImage), (status = 409, body = ErrorBody, description = "the VM cannot be saved now"), (status = 500, body = ErrorBody, description = "QEMU failed to save"), (status = 502, body = ErrorBody, description = "the image server refused or failed the upload")))]
pub(super) async fn snapshot(
    axum::extract::State(a): axum::extract::State<Arc<Agent>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: Body,
) -> axum::response::Response {
    save(a, id, body, false).await
}

/// `POST /host/v1/vms/{id}/suspend`: save the VM as an image and end its QEMU.
#[utoipa::path(post, path = "/host/v1/vms/{id}/suspend", params(("id" = String, Path, description = "VM id")), request_body = SaveRequest, responses((status = 200, body = SavedImage), (status = 409, body = ErrorBody, description = "the VM cannot be saved now"), (status = 500, body = ErrorBody, description = "QEMU failed to save"), (status = 502, body = ErrorBody, description = "the image server refused or failed the upload")))]
pub(super) async fn suspend(
    axum::extract::State(a): axum::extract::State<Arc<Agent>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: Body,
) -> axum::response::Response {
    save(a, id, body, true).await
}
