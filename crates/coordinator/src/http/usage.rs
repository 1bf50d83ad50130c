//! `GET /api/v1/usage`: resource use per VM and per user (see `crate::accounting`).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use vgrid_api::usage::UsageReport;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Only this user's VMs.
    #[serde(default)]
    pub user: Option<String>,
    /// Start of the period, seconds since the Unix epoch (to the minute) [default: everything].
    #[serde(default)]
    pub since: Option<u64>,
}

/// Resource use per VM and per user: CPU-seconds (cgroup counters), memory MiB-seconds, bytes
/// the guests read from their disks, bytes fetched from image servers, bytes stored.
#[utoipa::path(get, path = "/api/v1/usage", params(UsageQuery),
    responses((status = 200, body = UsageReport), (status = 500, body = vgrid_api::ErrorBody)))]
pub async fn get_usage(
    State(c): State<Arc<crate::Coordinator>>,
    axum::Extension(p): axum::Extension<crate::auth::Principal>,
    vgrid_trust::caller::JsonQuery(q): vgrid_trust::caller::JsonQuery<UsageQuery>,
) -> Result<Json<UsageReport>, super::ApiError> {
    let mut user = q.user.filter(|u| !u.is_empty());
    if !p.admin {
        // A user sees their own usage only.
        if let Some(u) = &user {
            p.check_owner(&format!("the usage of {u}"), u)?;
        }
        user = Some(p.user.clone());
    }
    let r = c.accounting().report(user.as_deref(), q.since.unwrap_or(0)).await.map_err(crate::CoordinatorError::from)?;
    Ok(Json(r))
}
