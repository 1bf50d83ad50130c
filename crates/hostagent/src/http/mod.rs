//! The host agent's HTTP API (`/host/v1/...`), spoken by the coordinator: every handler, the
//! router, who may call it, and the one mapping from the agent's errors to status codes
//! ([`HttpError`]), and its OpenAPI document ([`ApiDoc`], `/host/openapi.json`). Handlers parse the request, call the agent and encode its answer; what
//! they do is in the feature modules, which know nothing of HTTP.
//!
//! - [`vms`]: launch, stop, wait for, release and remove VMs; their console (log pages and a
//!   WebSocket); cache statistics, usage, and explicit staging (`pull`) with NDJSON progress.
//! - [`save`]: snapshot and suspend (warm images), and whether a save is in progress.
//! - [`migrate`]: both ends of a live migration.

mod migrate;
mod save;
mod tunnels;
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

impl HttpError {
    /// A body that could not be read (413 over [`MAX_BODY`]) or is not JSON of the documented
    /// shape (400), for the request `what`.
    pub(crate) fn body(what: &str, r: vgrid_trust::json::JsonRejection) -> HttpError {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return HttpError(r.status(), format!("{what}: the body is larger than {MAX_BODY} bytes"));
        }
        HttpError(StatusCode::BAD_REQUEST, format!("malformed {what}: {}", r.body_text()))
    }
}

impl From<AgentError> for HttpError {
    fn from(e: AgentError) -> Self {
        let code = match &e {
            AgentError::UnknownVm(_) => StatusCode::NOT_FOUND,
            // Well-formed requests this host refuses: 422 (400 is for a body that is not of
            // the documented shape).
            AgentError::NoKvm { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::Admission(crate::resources::AdmissionError::Invalid { .. }) => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::Admission(_) => StatusCode::CONFLICT,
            AgentError::Migration { .. } | AgentError::Network(_) => StatusCode::CONFLICT,
            AgentError::Proxy(vgrid_blockproxy::ProxyError::ImageNotFound { .. }) => StatusCode::NOT_FOUND,
            AgentError::Save(crate::error::SaveError::BadName(_)) => StatusCode::BAD_REQUEST,
            AgentError::Save(crate::error::SaveError::Upload { .. }) => StatusCode::BAD_GATEWAY,
            AgentError::Save(crate::error::SaveError::Save { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
            AgentError::Restore(_) => StatusCode::CONFLICT,
            AgentError::Volume { .. } => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        HttpError(code, e.to_string())
    }
}

/// The host API. With `users` (always, outside in-process tests) only the coordinator (its
/// grid certificate) or an admin (a login token) may call it: 401 for anybody else without
/// credentials, 403 with others'.
pub fn router(agent: Arc<Agent>, users: Option<vgrid_trust::caller::Users>) -> Router {
    // A user's direct tunnel link proves itself with the coordinator's ticket instead.
    let direct = Router::new().route("/host/v1/tunnels/{network}/direct", get(tunnels::direct)).with_state(agent.clone());
    let r = routes(agent);
    let r = match users {
        Some(u) => r
            .layer(axum::middleware::from_fn(only_coordinator))
            .layer(axum::middleware::from_fn_with_state(u, vgrid_trust::caller::identify_layer)),
        None => r,
    };
    // The document is open to every caller, like the coordinator's.
    r.merge(direct)
        .route("/host/openapi.json", get(|| async { Json(vgrid_api::openapi::served(&<ApiDoc as utoipa::OpenApi>::openapi())) }))
        .route_layer(axum::middleware::from_fn(|r: axum::extract::Request, n: axum::middleware::Next| {
            vgrid_trust::metrics::track("host", r, n)
        }))
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

/// The largest request body the host API reads (413 beyond): a launch or migration request,
/// or a migrating VM's console history.
pub const MAX_BODY: usize = vgrid_api::host::MAX_CONSOLE_HISTORY + 1024 * 1024;

/// The host API's OpenAPI document, served at `/host/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "vgrid host agent API", description = "What a compute host does for its coordinator: VMs, their consoles, saving and migrating them, the host cache."),
    paths(vms::stats, vms::usage, vms::pull, vms::list, vms::launch, vms::remove, vms::stop, vms::wait, vms::release, save::snapshot,
        save::suspend, save::saving, vms::console, migrate::incoming, migrate::incoming_abort, migrate::incoming_finish,
        migrate::send, migrate::send_status, migrate::send_cancel, tunnels::ticket, vms::commit_volume),
    components(schemas(ErrorBody, vgrid_api::volume::VolumeCommitted, vgrid_api::host::LaunchRequest, vgrid_api::host::Launched, vgrid_api::host::VmExit,
        vgrid_api::host::ExitInfo, vgrid_api::host::PullProgress, vgrid_api::host::HostUsage, vgrid_api::host::SaveRequest,
        vgrid_api::host::VmPresence, vgrid_api::host::IncomingRequest, vgrid_api::host::IncomingReady, vgrid_api::host::SendRequest,
        vgrid_api::host::FinishRequest, vgrid_api::grid::VmReport, vgrid_api::vm::ConsoleChunk, vgrid_api::vm::VmStop,
        vgrid_api::vm::SavedImage, vgrid_api::migrate::Migration, vgrid_api::tunnel::DirectTicket)),
    modifiers(&CONTRACT),
    security(("bearer" = []), ("node_certificate" = []))
)]
pub struct ApiDoc;

/// What this API answers besides each route's own statuses (see [`vgrid_api::openapi::Contract`]).
const CONTRACT: vgrid_api::openapi::Contract = vgrid_api::openapi::Contract { body_limit: MAX_BODY };

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
        .route("/host/v1/vms/{id}/volumes/{name}/commit", post(vms::commit_volume))
        .route("/host/v1/vms/{id}/console", get(vms::console))
        .route("/host/v1/vms/{id}/console/ws", get(vms::console_ws))
        .route("/host/v1/vms/{id}/vnc/ws", get(vms::vnc_ws))
        .route("/host/v1/vms/{id}/ssh/ws", get(vms::ssh_ws))
        .route("/host/v1/tunnels/tickets", post(tunnels::ticket))
        .merge(migrate::routes())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(agent)
}

#[cfg(test)]
mod tests {
    /// The document says what the server does: a launch or an incoming migration may find no
    /// image server with the image (404), and the optional bodies of stop and finish may be
    /// left out or `null` (the extractor takes both for "no options").
    #[test]
    fn the_document_lists_404_on_launches_and_nullable_optional_bodies() {
        let doc = vgrid_api::openapi::served(&<super::ApiDoc as utoipa::OpenApi>::openapi());
        for path in ["/host/v1/vms", "/host/v1/migrate/incoming"] {
            assert!(doc["paths"][path]["post"]["responses"].get("404").is_some(), "{path}: {}", doc["paths"][path]);
        }
        for path in ["/host/v1/vms/{id}/stop", "/host/v1/migrate/incoming/{id}/finish"] {
            let body = &doc["paths"][path]["post"]["requestBody"];
            assert_ne!(body["required"], true, "{path}: {body}");
            let schema = body["content"]["application/json"]["schema"].to_string();
            assert!(schema.contains(r#""type":"null""#), "{path}: {schema}");
        }
    }
}
