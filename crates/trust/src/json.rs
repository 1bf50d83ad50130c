//! [`Json`]: the JSON body and answer of every role's handlers. As an answer it is axum's
//! `Json`. As a body it is read like axum's, but by [`vgrid_api::json`] (integral floats are
//! integers: `"cpus": 18.0` is 18, as JSON Schema says; objects only from JSON objects), and an
//! optional body (`Option<Json<T>>`) may also be empty or `null` for "none". The rejection says what is wrong
//! with the body; each role turns it into its own error answer (400, or 413 over its limit).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, OptionalFromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A JSON request body or answer (see the module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T> std::ops::Deref for Json<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Why a JSON body was refused.
#[derive(Debug)]
pub enum JsonRejection {
    /// The request does not say `Content-Type: application/json` (or `application/...+json`).
    NotJson,
    /// The body could not be read: over the route's limit (413), or the connection failed.
    Read(BytesRejection),
    /// The body is not JSON of the expected shape.
    Shape(serde_json::Error),
}

impl JsonRejection {
    /// The status axum's own `Json` would answer (415, the read's, or 400).
    pub fn status(&self) -> StatusCode {
        match self {
            JsonRejection::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            JsonRejection::Read(r) => r.status(),
            JsonRejection::Shape(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// What is wrong, for an error answer.
    pub fn body_text(&self) -> String {
        match self {
            JsonRejection::NotJson => "expected a request with `Content-Type: application/json`".into(),
            JsonRejection::Read(r) => r.body_text(),
            JsonRejection::Shape(e) => e.to_string(),
        }
    }
}

impl std::fmt::Display for JsonRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.body_text())
    }
}

impl std::error::Error for JsonRejection {}

impl IntoResponse for JsonRejection {
    fn into_response(self) -> Response {
        crate::caller::refuse(self.status(), self.body_text())
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = JsonRejection;

    async fn from_request(req: Request, state: &S) -> Result<Self, JsonRejection> {
        if !is_json(req.headers()) {
            return Err(not_json(req, state).await);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(JsonRejection::Read)?;
        vgrid_api::json::from_slice(&bytes).map(Json).map_err(JsonRejection::Shape)
    }
}

/// An optional body: none without a `Content-Type`, or when the body is empty or `null`.
impl<T: DeserializeOwned, S: Send + Sync> OptionalFromRequest<S> for Json<T> {
    type Rejection = JsonRejection;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, JsonRejection> {
        if req.headers().get(header::CONTENT_TYPE).is_none() {
            return Ok(None);
        }
        if !is_json(req.headers()) {
            return Err(not_json(req, state).await);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(JsonRejection::Read)?;
        if is_none(&bytes) {
            return Ok(None);
        }
        vgrid_api::json::from_slice(&bytes).map(|t| Some(Json(t))).map_err(JsonRejection::Shape)
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// The refusal of a body that is not JSON, read first (up to the route's limit) so that the
/// connection stays usable: a body left unread makes hyper close the connection after the
/// answer, under a client that may already be sending its next request on it.
async fn not_json<S: Send + Sync>(req: Request, state: &S) -> JsonRejection {
    match Bytes::from_request(req, state).await {
        Ok(_) => JsonRejection::NotJson,
        Err(e) => JsonRejection::Read(e),
    }
}

/// Whether the headers say the body is JSON: `application/json` or `application/*+json`,
/// parameters (`; charset=utf-8`) allowed.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match essence.split_once('/') {
        Some((ty, sub)) => ty == "application" && (sub == "json" || sub.ends_with("+json")),
        None => false,
    }
}

/// An optional body that says "none": nothing but white space, or `null`.
fn is_none(body: &[u8]) -> bool {
    let text = body.trim_ascii();
    text.is_empty() || text == b"null"
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Stop {
        force: bool,
        #[serde(default)]
        grace_secs: u32,
    }

    fn request(content_type: Option<&str>, body: &'static str) -> Request {
        let mut b = axum::http::Request::builder().method("POST").uri("/");
        if let Some(ct) = content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        b.body(Body::from(body)).unwrap()
    }

    async fn required(ct: Option<&str>, body: &'static str) -> Result<Stop, JsonRejection> {
        <Json<Stop> as FromRequest<()>>::from_request(request(ct, body), &()).await.map(|j| j.0)
    }

    async fn optional(ct: Option<&str>, body: &'static str) -> Result<Option<Stop>, JsonRejection> {
        <Json<Stop> as OptionalFromRequest<()>>::from_request(request(ct, body), &()).await.map(|j| j.map(|j| j.0))
    }

    #[tokio::test]
    async fn a_body_takes_integral_floats_for_integers() {
        let json = Some("application/json");
        assert_eq!(required(json, r#"{"force": true, "grace_secs": 30.0}"#).await.unwrap(), Stop { force: true, grace_secs: 30 });
        let e = required(json, r#"{"force": true, "grace_secs": 30.5}"#).await.unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(e.body_text().contains("30.5"), "{e}");
        let e = required(json, r#"{"force": "#).await.unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        for ct in ["application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json"] {
            assert!(required(Some(ct), r#"{"force": false}"#).await.is_ok(), "{ct}");
        }
        for ct in [None, Some("text/plain"), Some("application/jsonx"), Some("json")] {
            let e = required(ct, r#"{"force": false}"#).await.unwrap_err();
            assert_eq!(e.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
        }
    }

    #[tokio::test]
    async fn an_optional_body_may_be_absent_empty_or_null() {
        let json = Some("application/json");
        assert_eq!(optional(None, "anything").await.unwrap(), None);
        for none in ["", " \n", "null", " null\n"] {
            assert_eq!(optional(json, none).await.unwrap(), None, "{none:?}");
        }
        assert_eq!(optional(json, r#"{"force": true, "grace_secs": 1e1}"#).await.unwrap(), Some(Stop { force: true, grace_secs: 10 }));
        assert_eq!(optional(json, "[]").await.unwrap_err().status(), StatusCode::BAD_REQUEST);
        assert_eq!(optional(Some("text/plain"), "null").await.unwrap_err().status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn an_answer_is_axums_json() {
        let r = Json(serde_json::json!({"a": 1})).into_response();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }
}
