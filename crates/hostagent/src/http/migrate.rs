//! `/host/v1/migrate/...` and `/host/v1/vms/{id}/migrate`: live migration ([`crate::migrate`]).

use std::sync::Arc;
use std::time::Duration;

use vgrid_api::host::{FinishRequest, IncomingReady, IncomingRequest, Launched, SendRequest};
use vgrid_api::migrate::Migration;
use vgrid_api::ErrorBody;

use super::HttpError;
use crate::agent::Agent;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use vgrid_trust::json::Json;
use vgrid_trust::json::JsonRejection;

type Ctx = State<Arc<Agent>>;

/// `POST /host/v1/migrate/incoming`, `POST|DELETE /host/v1/migrate/incoming/{id}[/finish]`,
/// `POST|GET|DELETE /host/v1/vms/{id}/migrate`.
pub(super) fn routes() -> Router<Arc<Agent>> {
    Router::new()
        .route("/host/v1/migrate/incoming", post(incoming))
        .route("/host/v1/migrate/incoming/{id}", axum::routing::delete(incoming_abort))
        .route("/host/v1/migrate/incoming/{id}/finish", post(incoming_finish))
        .route("/host/v1/vms/{id}/migrate", post(send).get(send_status).delete(send_cancel))
}

fn bad(e: JsonRejection) -> HttpError {
    HttpError::body("migration request", e)
}

#[utoipa::path(post, path = "/host/v1/migrate/incoming", request_body = IncomingRequest, responses((status = 200, body = IncomingReady), (status = 404, body = ErrorBody, description = "no image server has the image"), (status = 409, body = ErrorBody, description = "not admitted"), (status = 502, body = ErrorBody, description = "no image server delivered the image")))]
pub(super) async fn incoming(State(a): Ctx, body: Result<Json<IncomingRequest>, JsonRejection>) -> Result<Response, HttpError> {
    let Json(req) = body.map_err(bad)?;
    crate::spec::validate_vm_id(&req.launch.id).map_err(|e| HttpError(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(Json(crate::migrate::incoming(&a, req).await?).into_response())
}

#[utoipa::path(post, path = "/host/v1/migrate/incoming/{id}/finish", params(("id" = String, Path, description = "VM id")), request_body(content = Option<FinishRequest>, description = "optional"), responses((status = 200, body = Launched), (status = 409, body = ErrorBody, description = "the migration did not complete")))]
pub(super) async fn incoming_finish(
    State(a): Ctx,
    Path(id): Path<String>,
    body: Result<Option<Json<FinishRequest>>, JsonRejection>,
) -> Result<Response, HttpError> {
    let history = body.map_err(bad)?.map(|b| b.0.console_history).unwrap_or_default();
    Ok(Json(crate::migrate::incoming_finish(&a, &id, Duration::from_secs(60), &history).await?).into_response())
}

#[utoipa::path(delete, path = "/host/v1/migrate/incoming/{id}", params(("id" = String, Path, description = "VM id")), responses((status = 204, description = "aborted")))]
pub(super) async fn incoming_abort(State(a): Ctx, Path(id): Path<String>) -> Result<Response, HttpError> {
    a.incoming_abort(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/host/v1/vms/{id}/migrate", params(("id" = String, Path, description = "VM id")), request_body = SendRequest, responses((status = 202, body = Migration), (status = 409, body = ErrorBody, description = "a migration of the VM is under way")))]
pub(super) async fn send(
    State(a): Ctx,
    Path(id): Path<String>,
    body: Result<Json<SendRequest>, JsonRejection>,
) -> Result<Response, HttpError> {
    let Json(req) = body.map_err(bad)?;
    Ok((StatusCode::ACCEPTED, Json(crate::migrate::send(&a, &id, req)?)).into_response())
}

#[utoipa::path(get, path = "/host/v1/vms/{id}/migrate", params(("id" = String, Path, description = "VM id")), responses((status = 200, body = Migration)))]
pub(super) async fn send_status(State(a): Ctx, Path(id): Path<String>) -> Result<Response, HttpError> {
    Ok(Json(crate::migrate::send_status(&a, &id)?).into_response())
}

#[utoipa::path(delete, path = "/host/v1/vms/{id}/migrate", params(("id" = String, Path, description = "VM id")), responses((status = 200, body = Migration)))]
pub(super) async fn send_cancel(State(a): Ctx, Path(id): Path<String>) -> Result<Response, HttpError> {
    Ok(Json(crate::migrate::send_cancel(&a, &id).await?).into_response())
}
