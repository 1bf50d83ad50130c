//! The host agent's HTTP API (`/host/v1/...`), spoken by the coordinator: every handler, the
//! router, who may call it, and the one mapping from the agent's errors to status codes
//! ([`HttpError`]). Handlers parse the request, call the agent and encode its answer; what
//! they do is in the feature modules, which know nothing of HTTP.
//!
//! - [`vms`]: launch, stop, wait for, release and remove VMs; their console (log pages and a
//!   WebSocket); cache statistics, usage, and explicit staging (`pull`) with NDJSON progress.
//! - [`save`]: snapshot and suspend (warm images), and whether a save is in progress.
//! - [`migrate`]: both ends of a live migration.

mod migrate;
mod save;
mod vms;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use vgrid_api::ErrorBody;

use crate::agent::{Agent, AgentError};

/// An error answer: its status and the `ErrorBody` text.
pub(crate) struct HttpError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1, detail: None })).into_response()
    }
}

impl From<AgentError> for HttpError {
    fn from(e: AgentError) -> Self {
        let code = match &e {
            AgentError::UnknownVm(_) => StatusCode::NOT_FOUND,
            AgentError::NoKvm { .. } => StatusCode::BAD_REQUEST,
            AgentError::Admission(crate::resources::AdmissionError::Invalid { .. }) => StatusCode::BAD_REQUEST,
            AgentError::Admission(_) => StatusCode::CONFLICT,
            AgentError::Migration { .. } | AgentError::Network(_) => StatusCode::CONFLICT,
            AgentError::Proxy(vgrid_blockproxy::ProxyError::ImageNotFound { .. }) => StatusCode::NOT_FOUND,
            AgentError::Save(crate::error::SaveError::BadName(_)) => StatusCode::BAD_REQUEST,
            AgentError::Save(crate::error::SaveError::Upload { .. }) => StatusCode::BAD_GATEWAY,
            AgentError::Save(crate::error::SaveError::Save { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
            AgentError::Restore(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        HttpError(code, e.to_string())
    }
}

/// The host API. With `users` (always, outside in-process tests) only the coordinator (its
/// grid certificate) or an admin (a login token) may call it: 401 for anybody else without
/// credentials, 403 with others'.
pub fn router(agent: Arc<Agent>, users: Option<vgrid_trust::caller::Users>) -> Router {
    let r = routes(agent);
    match users {
        Some(u) => r
            .layer(axum::middleware::from_fn(only_coordinator))
            .layer(axum::middleware::from_fn_with_state(u, vgrid_trust::caller::identify_layer)),
        None => r,
    }
}

async fn only_coordinator(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use vgrid_trust::caller::{caller_of, refuse, Caller};
    let c = caller_of(&req);
    if c.is_node_or_admin(vgrid_trust::NodeRole::Coordinator) {
        return next.run(req).await;
    }
    let what = format!("{} {}", req.method(), req.uri().path());
    tracing::warn!(caller = %c.describe(), %what, "refused a host API request");
    match c {
        Caller::Anonymous => refuse(
            StatusCode::UNAUTHORIZED,
            format!("{what}: the host API answers its coordinator (by certificate) or an admin (by token)"),
        ),
        c => {
            refuse(StatusCode::FORBIDDEN, format!("{what}: {} may not use the host API; only the coordinator and admins may", c.describe()))
        }
    }
}

fn routes(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/host/v1/cache/stats", get(vms::stats))
        .route("/host/v1/usage", get(vms::usage))
        .route("/host/v1/pull/{image}", post(vms::pull))
        .route("/host/v1/vms", get(vms::list).post(vms::launch))
        .route("/host/v1/vms/{id}", axum::routing::delete(vms::remove))
        .route("/host/v1/vms/{id}/stop", post(vms::stop))
        .route("/host/v1/vms/{id}/wait", get(vms::wait))
        .route("/host/v1/vms/{id}/release", post(vms::release))
        .route("/host/v1/vms/{id}/snapshot", post(save::snapshot))
        .route("/host/v1/vms/{id}/suspend", post(save::suspend))
        .route("/host/v1/vms/{id}/saving", get(save::saving))
        .route("/host/v1/vms/{id}/console", get(vms::console))
        .route("/host/v1/vms/{id}/console/ws", get(vms::console_ws))
        .merge(migrate::routes())
        .with_state(agent)
}
