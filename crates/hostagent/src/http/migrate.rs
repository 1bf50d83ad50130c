//! `/host/v1/migrate/...` and `/host/v1/vms/{id}/migrate`: live migration ([`crate::migrate`]).

use std::sync::Arc;
use std::time::Duration;

use vgrid_api::host::{FinishRequest, IncomingRequest, SendRequest};

use super::HttpError;
use crate::agent::Agent;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

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
    HttpError(StatusCode::BAD_REQUEST, format!("malformed migration request: {}", e.body_text()))
}

async fn incoming(State(a): Ctx, body: Result<Json<IncomingRequest>, JsonRejection>) -> Result<Response, HttpError> {
    let Json(req) = body.map_err(bad)?;
    crate::spec::validate_vm_id(&req.launch.id).map_err(|e| HttpError(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(Json(crate::migrate::incoming(&a, req).await?).into_response())
}

async fn incoming_finish(State(a): Ctx, Path(id): Path<String>, body: Option<Json<FinishRequest>>) -> Result<Response, HttpError> {
    let history = body.map(|b| b.0.console_history).unwrap_or_default();
    Ok(Json(crate::migrate::incoming_finish(&a, &id, Duration::from_secs(60), &history).await?).into_response())
}

async fn incoming_abort(State(a): Ctx, Path(id): Path<String>) -> Result<Response, HttpError> {
    a.incoming_abort(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn send(State(a): Ctx, Path(id): Path<String>, body: Result<Json<SendRequest>, JsonRejection>) -> Result<Response, HttpError> {
    let Json(req) = body.map_err(bad)?;
    Ok((StatusCode::ACCEPTED, Json(crate::migrate::send(&a, &id, req)?)).into_response())
}

async fn send_status(State(a): Ctx, Path(id): Path<String>) -> Result<Response, HttpError> {
    Ok(Json(crate::migrate::send_status(&a, &id)?).into_response())
}

async fn send_cancel(State(a): Ctx, Path(id): Path<String>) -> Result<Response, HttpError> {
    Ok(Json(crate::migrate::send_cancel(&a, &id).await?).into_response())
}
