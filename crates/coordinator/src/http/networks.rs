//! `/api/v1/networks`: network definitions and their leases (see `crate::networks`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Extension;
use vgrid_api::net::{Network, NetworkCreate, NetworkInfo};
use vgrid_api::ErrorBody;
use vgrid_trust::json::{Json, JsonRejection};

use super::ApiError;
use crate::auth::Principal;
use crate::networks::Asker;
use crate::Coordinator;

/// A path's network name not of the documented shape is a 400 (see `vgrid_api::openapi`).
fn checked(name: &str) -> Result<(), ApiError> {
    vgrid_api::net::check_network_name(name).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

fn asker(p: &Principal) -> Asker<'_> {
    Asker { user: &p.user, admin: p.admin }
}

/// The networks the caller may see: every site network, and the caller's own tunnel networks
/// (an admin sees all), each with the hosts attached and the leases.
#[utoipa::path(get, path = "/api/v1/networks",
    responses((status = 200, body = [NetworkInfo])))]
pub async fn list_networks(
    State(c): State<Arc<Coordinator>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Vec<NetworkInfo>>, ApiError> {
    Ok(Json(c.list_networks(asker(&p)).await?))
}

/// Defines a network: a site network (admins only; its range must not overlap another's) or
/// the caller's own tunnel network.
#[utoipa::path(post, path = "/api/v1/networks", request_body = NetworkCreate,
    responses((status = 201, body = Network), (status = 409, body = ErrorBody, description = "a network of that name exists, or the range overlaps another site network's")))]
pub async fn create_network(
    State(c): State<Arc<Coordinator>>,
    Extension(p): Extension<Principal>,
    body: Result<Json<NetworkCreate>, JsonRejection>,
) -> Result<(StatusCode, Json<Network>), ApiError> {
    let Json(req) = body?;
    Ok((StatusCode::CREATED, Json(c.create_network(req, asker(&p)).await?)))
}

/// One network with the hosts attached to it and its leases.
#[utoipa::path(get, path = "/api/v1/networks/{name}", params(("name" = String, Path, description = "network name", pattern = "^[a-z][a-z0-9_-]{0,31}$")),
    responses((status = 200, body = NetworkInfo)))]
pub async fn get_network(
    State(c): State<Arc<Coordinator>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<NetworkInfo>, ApiError> {
    checked(&name)?;
    Ok(Json(c.network_info(&name, asker(&p)).await?))
}

/// Removes a network no VM holds an address or MAC on (its owner or an admin).
#[utoipa::path(delete, path = "/api/v1/networks/{name}", params(("name" = String, Path, description = "network name", pattern = "^[a-z][a-z0-9_-]{0,31}$")),
    responses((status = 200, body = Network), (status = 409, body = ErrorBody, description = "a VM holds an address or MAC on it")))]
pub async fn delete_network(
    State(c): State<Arc<Coordinator>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Network>, ApiError> {
    checked(&name)?;
    Ok(Json(c.delete_network(&name, asker(&p)).await?))
}
