//! The dashboard's login: a browser trades a token (`vgrid login --print-token`) for a session
//! cookie that the `authenticate` middleware accepts like `Authorization: Bearer`, so the
//! page's `fetch()` calls and WebSockets (which cannot set headers) are authenticated without
//! the token ever being in a URL or readable by the page's scripts. See `docs/dashboard.md`.
//!
//! The cookie is `HttpOnly` (no script reads it), `SameSite=Strict` (no other site's page
//! makes the browser send it) and `Secure` over TLS; besides, a request authenticated by it
//! that may change something (any method but GET and HEAD) or opens a WebSocket must carry an
//! `Origin` naming the host it was sent to (403 otherwise), so another origin cannot use it.

use axum::extract::{ConnectInfo, Request};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use vgrid_api::auth::{Session, SessionCreate};
use vgrid_api::ErrorBody;
use vgrid_trust::json::{Json, JsonRejection};
use vgrid_trust::tls::PeerInfo;

use super::{ApiError, Users};

/// The session cookie's name.
pub const COOKIE: &str = "vgrid_session";

/// How a request shows its token.
pub(super) enum Credential {
    Bearer(String),
    Cookie(String),
}

impl Credential {
    pub(super) fn token(&self) -> &str {
        match self {
            Credential::Bearer(t) | Credential::Cookie(t) => t,
        }
    }
}

/// The request's token: `Authorization: Bearer`, else the session cookie.
pub(super) fn credential(req: &Request) -> Option<Credential> {
    if let Some(t) = super::bearer(req) {
        return Some(Credential::Bearer(t.to_string()));
    }
    cookie(req.headers(), COOKIE).map(Credential::Cookie)
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v.trim_matches('"').to_string())
}

/// The host (and port) a request was sent to: `Host` (HTTP/1.1), else the URI's authority (HTTP/2).
fn target_host(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let h = headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string);
    h.or_else(|| uri.authority().map(|a| a.to_string()))
}

/// Whether `origin` (`scheme://host[:port]`) names `host`.
fn origin_is(origin: &str, host: &str) -> bool {
    origin.split_once("://").is_some_and(|(_, rest)| rest.trim_end_matches('/').eq_ignore_ascii_case(host))
}

/// A request authenticated by the cookie that may change something or opens a WebSocket must
/// come from a page of this origin (403 otherwise). Plain reads need no `Origin`.
pub(super) fn same_origin(req: &Request) -> Result<(), ApiError> {
    let reading = matches!(*req.method(), Method::GET | Method::HEAD) && !req.headers().contains_key(header::UPGRADE);
    if reading {
        return Ok(());
    }
    let origin = req.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok());
    match (origin, target_host(req.headers(), req.uri())) {
        (Some(o), Some(h)) if origin_is(o, &h) => Ok(()),
        (o, h) => Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "{} {} with the dashboard's session cookie must come from the dashboard's own origin (https://{}); its Origin is {}",
                req.method(),
                req.uri().path(),
                h.unwrap_or_default(),
                o.unwrap_or("missing")
            ),
        )),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `Set-Cookie` for the session: `token` for `max_age` seconds (0 and no token: cleared).
fn set_cookie(token: &str, max_age: u64, tls: bool) -> HeaderValue {
    let secure = if tls { "; Secure" } else { "" };
    HeaderValue::from_str(&format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"))
        .unwrap_or_else(|_| HeaderValue::from_static("vgrid_session=; Path=/; Max-Age=0"))
}

/// Whether the request came over TLS (every role serves through `vgrid_trust::tls::serve`,
/// which gives each request its connection's `PeerInfo`; in-process tests serve plain HTTP).
fn over_tls(req: &Request) -> bool {
    req.extensions().get::<ConnectInfo<PeerInfo>>().is_some()
}

/// A browser logs in: the token (checked like a bearer token) becomes an HttpOnly,
/// SameSite=Strict (and, over TLS, Secure) cookie that expires with the token.
#[utoipa::path(post, path = "/api/v1/auth/session", request_body = SessionCreate, security(()),
    responses((status = 200, body = Session, headers(("set-cookie" = String, description = "the session cookie"))),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody, description = "sent from another origin")))]
pub(super) async fn create_session(
    Extension(auth): Users,
    conn: Option<Extension<ConnectInfo<PeerInfo>>>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Json<SessionCreate>, JsonRejection>,
) -> Result<Response, ApiError> {
    // Another site's page may not log the browser in (as someone else) either.
    if let (Some(o), Some(h)) = (headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()), target_host(&headers, &uri)) {
        if !origin_is(o, &h) {
            return Err(ApiError(StatusCode::FORBIDDEN, format!("a session may be opened only from the dashboard's own origin, not {o}")));
        }
    }
    let tls = conn.is_some();
    let Json(r) = body?;
    let (p, expires) = auth.authenticate_until(r.token.trim()).await?;
    let mut resp = Json(Session { user: p.user, admin: p.admin, expires }).into_response();
    resp.headers_mut().insert(header::SET_COOKIE, set_cookie(r.token.trim(), expires.saturating_sub(now()), tls));
    Ok(resp)
}

/// Ends the caller's token (bearer or cookie) and clears the session cookie.
#[utoipa::path(post, path = "/api/v1/auth/logout", responses((status = 200)))]
pub(super) async fn logout(Extension(auth): Users, req: Request) -> Result<Response, ApiError> {
    if let Some(c) = credential(&req) {
        auth.revoke(c.token()).await?;
    }
    let mut resp = Json(serde_json::json!({})).into_response();
    resp.headers_mut().insert(header::SET_COOKIE, set_cookie("", 0, over_tls(&req)));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = axum::http::Request::builder().method(method).uri("/api/v1/vms/x/stop");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let r = req("GET", &[("cookie", "a=b; vgrid_session=vgt_abc ; c=d")]);
        assert!(matches!(credential(&r), Some(Credential::Cookie(t)) if t == "vgt_abc"));
        let r = req("GET", &[("cookie", "vgrid_session=vgt_abc"), ("authorization", "Bearer vgt_x")]);
        assert!(matches!(credential(&r), Some(Credential::Bearer(t)) if t == "vgt_x"));
        assert!(credential(&req("GET", &[("cookie", "vgrid_session=")])).is_none());
    }

    #[test]
    fn changes_and_websockets_with_the_cookie_need_this_origin() {
        let host = ("host", "127.0.0.1:7070");
        assert!(same_origin(&req("GET", &[host])).is_ok());
        assert!(same_origin(&req("POST", &[host, ("origin", "https://127.0.0.1:7070")])).is_ok());
        assert!(same_origin(&req("POST", &[host, ("origin", "https://evil.example")])).is_err());
        assert!(same_origin(&req("POST", &[host])).is_err());
        assert!(same_origin(&req("GET", &[host, ("upgrade", "websocket"), ("origin", "https://evil.example")])).is_err());
        assert!(same_origin(&req("GET", &[host, ("upgrade", "websocket"), ("origin", "https://127.0.0.1:7070")])).is_ok());
    }
}
