//! Direct tunnel links (`crate::tunnel`): the coordinator hands this agent one-time tickets
//! (`POST /host/v1/tunnels/tickets`, coordinator only), and a user's `vgrid tunnel` opens
//! `GET /host/v1/tunnels/{network}/direct` with one (header `vgrid-tunnel-ticket`; no other
//! credential: the ticket is what the coordinator checked the user by).

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use vgrid_api::tunnel::{DirectTicket, MAX_TICKET, MIN_TICKET, TICKET_HEADER};
use vgrid_api::ErrorBody;
use vgrid_trust::json::{Json, JsonRejection};

use super::HttpError;
use crate::agent::Agent;

type Ctx = State<Arc<Agent>>;

/// Admits one direct link of a user's `vgrid tunnel` (409 when this host takes none).
#[utoipa::path(post, path = "/host/v1/tunnels/tickets", request_body = DirectTicket,
    responses((status = 200), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn ticket(State(a): Ctx, body: Result<Json<DirectTicket>, JsonRejection>) -> Result<Json<serde_json::Value>, HttpError> {
    let Json(t) = body.map_err(|r| HttpError::body("ticket", r))?;
    vgrid_api::net::check_network_name(&t.network).map_err(|e| HttpError(StatusCode::BAD_REQUEST, e.to_string()))?;
    if !(MIN_TICKET..=MAX_TICKET).contains(&t.ticket.len()) {
        return Err(HttpError(StatusCode::BAD_REQUEST, format!("a ticket has {MIN_TICKET}-{MAX_TICKET} characters")));
    }
    a.net.tunnels.admit(t)?;
    Ok(Json(serde_json::json!({})))
}

/// A user's direct link for tunnel network `network`, admitted by its ticket.
pub(super) async fn direct(State(a): Ctx, Path(network): Path<String>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    let Some(ticket) = headers.get(TICKET_HEADER).and_then(|v| v.to_str().ok()) else {
        let e = format!("a direct tunnel link needs the {TICKET_HEADER} header (vgrid tunnel gets one from the coordinator)");
        return HttpError(StatusCode::UNAUTHORIZED, e).into_response();
    };
    let owner = match a.net.tunnels.redeem(&network, ticket) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(network = %network, "refused a direct tunnel link: {e}");
            return HttpError(StatusCode::FORBIDDEN, format!("direct tunnel link to network {network:?}: {e}")).into_response();
        }
    };
    ws.read_buffer_size(vgrid_trust::tls::WS_READ_BUFFER)
        .on_upgrade(move |s| async move { a.net.tunnels.direct_link(network, owner, s).await })
}
