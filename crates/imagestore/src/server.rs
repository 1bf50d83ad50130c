//! The image server's HTTP API, all under `/store/v1`:
//!
//! | method | path | body / answer |
//! | --- | --- | --- |
//! | GET | `/images` | `[ImageSummary]` |
//! | GET, DELETE | `/images/{name}` and `/images/{name}/{version}` | `Manifest` / `GcReport` |
//! | GET, PUT | `/images/{name}/{version}/profile` | `BootProfile` |
//! | GET, PUT | `/images/{name}/{version}/profile/hot` | hot-page bundle (`hotpages`), zstd |
//! | GET, HEAD | `/chunks/{hash}` | zstd bytes, `ETag: "<hash>"`, immutable |
//! | GET | `/chunks/{hash}/range?offset=&len=&block=` | zstd of the chunk's block chaining values + the range (`tree`) |
//! | POST | `/gc` | `GcReport` (collect unreferenced chunks now) |
//! | POST | `/uploads` | `UploadCreated` |
//! | DELETE | `/uploads/{id}` | abort |
//! | POST | `/uploads/{id}/missing` | `[hash]` -> `[hash]` |
//! | PUT | `/uploads/{id}/chunks/{hash}` | zstd bytes |
//! | POST | `/uploads/{id}/commit` | `Manifest` (version 0 = next) -> stored `Manifest` |
//!
//! Every error is a JSON [`ErrorBody`] whose `error` names the object and the cause and whose
//! `detail` is `{"kind": ..., "object": ...}` (see [`ErrorKind`]): 400 for a request not of the
//! documented shape, 422 for a well-formed one whose content is refused. The OpenAPI document
//! ([`ApiDoc`]) is served at `/store/openapi.json`, to every caller.

use crate::error::StoreError;
use crate::store::ImageStore;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use vgrid_api::openapi::Binary;
use vgrid_api::rest::{BootProfile, ByteRange, ChunkPart, ErrorKind, GcReport, ImageOwner, ImageSummary, UploadCreated, UploadId};
use vgrid_api::volume::Epoch;
use vgrid_api::{ChunkHash, ErrorBody, ImageRef, Manifest};

/// Largest request body accepted (a manifest of a very large image, or a chunk).
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// An error answer: status plus JSON body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, kind: &str, object: impl Into<String>, message: impl Into<String>) -> Self {
        let object: String = object.into();
        ApiError { status, body: ErrorBody { error: message.into(), detail: Some(serde_json::json!({ "kind": kind, "object": object })) } }
    }
    fn bad_request(object: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::BAD_REQUEST, object, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        use StoreError::*;
        let msg = e.to_string();
        let (status, kind, object) = match &e {
            ImageNotFound(r) => (StatusCode::NOT_FOUND, ErrorKind::NOT_FOUND, format!("image {r}")),
            ChunkNotFound(h) => (StatusCode::NOT_FOUND, ErrorKind::NOT_FOUND, format!("chunk {h}")),
            UploadNotFound(id) => (StatusCode::NOT_FOUND, ErrorKind::NOT_FOUND, format!("upload {id}")),
            ProfileNotFound(r) => (StatusCode::NOT_FOUND, ErrorKind::NOT_FOUND, format!("profile of image {r}")),
            HotPagesNotFound(r) => (StatusCode::NOT_FOUND, ErrorKind::NOT_FOUND, format!("hot pages of image {r}")),
            // Well-formed requests whose content is refused: 422 (400 is for a request that is
            // not of the documented shape).
            BadHotPages { image, .. } | NoSavedRam(image) => {
                (StatusCode::UNPROCESSABLE_ENTITY, ErrorKind::BAD_REQUEST, format!("hot pages of image {image}"))
            }
            ImageExists(r) => (StatusCode::CONFLICT, ErrorKind::CONFLICT, format!("image {r}")),
            Fenced { volume, .. } => (StatusCode::CONFLICT, ErrorKind::CONFLICT, format!("volume {volume}")),
            KindMismatch { name, .. } => (StatusCode::CONFLICT, ErrorKind::CONFLICT, format!("image {name}")),
            InvalidManifest { image, .. } => (StatusCode::UNPROCESSABLE_ENTITY, ErrorKind::BAD_REQUEST, format!("image {image}")),
            BadRange(e) => (StatusCode::BAD_REQUEST, ErrorKind::BAD_REQUEST, format!("chunk {}", range_hash(e))),
            BadName(cause) => (StatusCode::BAD_REQUEST, ErrorKind::BAD_REQUEST, cause.to_string()),
            BadProfile { image, .. } => (StatusCode::UNPROCESSABLE_ENTITY, ErrorKind::BAD_REQUEST, format!("profile of image {image}")),
            BadProfilePart { image, .. } => (StatusCode::UNPROCESSABLE_ENTITY, ErrorKind::BAD_REQUEST, format!("profile of image {image}")),
            BadUpload { hash, .. } => (StatusCode::UNPROCESSABLE_ENTITY, ErrorKind::BAD_REQUEST, format!("chunk {hash}")),
            MissingChunks { image, missing, .. } => {
                let shown: Vec<String> = missing.iter().take(100).map(|h| h.to_hex()).collect();
                return ApiError {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    body: ErrorBody {
                        error: msg,
                        detail: Some(serde_json::json!({
                            "kind": ErrorKind::MISSING_CHUNKS,
                            "object": format!("image {image}"),
                            "missing": shown,
                        })),
                    },
                };
            }
            ChunkCorrupt { hash, .. } => (StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::CHUNK_CORRUPT, format!("chunk {hash}")),
            CorruptManifest { image, .. } => (StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::INTERNAL, format!("image {image}")),
            CorruptEpoch { volume, .. } => (StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::INTERNAL, format!("epoch of volume {volume}")),
            Contended { object, .. } => (StatusCode::CONFLICT, ErrorKind::CONFLICT, object.clone()),
            GcBusy { .. } => (StatusCode::CONFLICT, ErrorKind::CONFLICT, "garbage collection".to_string()),
            Unsafe { store, .. } => (StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::INTERNAL, store.clone()),
            NoSpace { object } => (StatusCode::INSUFFICIENT_STORAGE, ErrorKind::NO_SPACE, object.clone()),
            Backend { object, .. } => (StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::INTERNAL, object.clone()),
        };
        ApiError::new(status, kind, object, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, error = %self.body.error, "image server request failed");
        } else {
            tracing::debug!(status = %self.status, error = %self.body.error, "image server request refused");
        }
        (self.status, Json(self.body)).into_response()
    }
}

type Res<T> = Result<T, ApiError>;
type St = State<Arc<ImageStore>>;

fn parse_name(name: &str) -> Res<()> {
    vgrid_api::manifest::validate_name(name).map_err(|e| ApiError::bad_request(format!("image {name}"), e.to_string()))
}
fn parse_ref(name: &str, version: Option<&str>) -> Res<ImageRef> {
    parse_name(name)?;
    let version = match version {
        None => None,
        Some(v) => Some(v.parse::<u32>().map_err(|_| {
            ApiError::bad_request(
                format!("image {name}@{v}"),
                format!("invalid version {v:?} of image {name}: expected a non-negative integer"),
            )
        })?),
    };
    Ok(ImageRef { name: name.to_string(), version })
}
fn parse_hash(s: &str) -> Res<ChunkHash> {
    s.parse().map_err(|e: vgrid_api::ManifestError| ApiError::bad_request(format!("chunk {s}"), e.to_string()))
}
fn body(what: &str, b: Result<Bytes, BytesRejection>) -> Res<Bytes> {
    b.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::new(
                e.status(),
                ErrorKind::BAD_REQUEST,
                what,
                format!("request body of {what} too large: the limit is {MAX_BODY} bytes"),
            );
        }
        ApiError::new(e.status(), ErrorKind::BAD_REQUEST, what, format!("request body of {what}: {}", e.body_text()))
    })
}
fn json_body<T: DeserializeOwned>(what: &str, b: Result<Bytes, BytesRejection>) -> Res<T> {
    let b = body(what, b)?;
    vgrid_api::json::from_slice(&b).map_err(|e| ApiError::bad_request(what, format!("malformed JSON body for {what}: {e}")))
}

/// The image server's router, all routes under `/store/v1`, open to every caller (a
/// standalone server without users, and in-process tests).
pub fn router(store: Arc<ImageStore>) -> Router {
    routes().merge(doc()).with_state(store).route_layer(axum::middleware::from_fn(
        |r: axum::extract::Request, n: axum::middleware::Next| vgrid_trust::metrics::track("image-server", r, n),
    ))
}

/// The router with access control when `users` (a coordinator's token check) is given:
/// - nobody without a login token or a grid certificate (401);
/// - grid nodes (hosts, the coordinator) and admins: everything;
/// - users: chunks (content-addressed), uploads, the list (filtered to what they may read),
///   public and own images; changing or deleting their own only; GC and owner records for
///   admins only (403 otherwise). A user's first commit of a name makes it theirs.
pub fn router_with(store: Arc<ImageStore>, users: Option<vgrid_trust::caller::Users>) -> Router {
    let Some(users) = users else { return router(store) };
    routes()
        .layer(axum::middleware::from_fn_with_state(store.clone(), gate))
        .layer(axum::middleware::from_fn_with_state(users, vgrid_trust::caller::identify_layer))
        .merge(doc())
        .with_state(store)
        .route_layer(axum::middleware::from_fn(|r: axum::extract::Request, n: axum::middleware::Next| {
            vgrid_trust::metrics::track("image-server", r, n)
        }))
}

fn forbid(what: &str, why: String) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", what, why).into_response()
}

async fn gate(State(s): St, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::http::Method;
    use vgrid_trust::caller::{caller_of, Caller};
    let c = caller_of(&req);
    let path = req.uri().path().trim_start_matches("/store/v1/").to_string();
    let what = format!("{} /store/v1/{path}", req.method());
    let user = match &c {
        Caller::Anonymous => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                &what,
                format!("{what} needs a login token (`vgrid login`) or a grid certificate"),
            )
            .into_response()
        }
        c if c.is_privileged() => return next.run(req).await,
        c => c.user().unwrap_or_default().to_string(),
    };
    let seg: Vec<&str> = path.split('/').collect();
    let method = req.method().clone();
    match seg.as_slice() {
        ["images", name, ..] => {
            let o = match s.owner(name).await {
                Ok(o) => o,
                Err(e) => return ApiError::from(e).into_response(),
            };
            let read = method == Method::GET || method == Method::HEAD;
            let allowed = if read { o.readable_by(&user, false) } else { o.writable_by(&user, false) };
            // An image that does not exist is a 404 below, not a 403.
            let exists = s.get_manifest(&ImageRef { name: name.to_string(), version: None }).await.is_ok();
            if !allowed && exists {
                tracing::warn!(%user, image = %name, %what, "refused: not the owner");
                let owner = o.owner.as_deref().unwrap_or("nobody (admins only)");
                return forbid(
                    &format!("image {name}"),
                    format!("image {name} belongs to {owner}; {user} may not {}", if read { "read it" } else { "change it" }),
                );
            }
        }
        ["gc"] => return forbid("gc", format!("{user} may not run garbage collection: admins only")),
        ["volumes", name, "epoch"] if method == Method::PUT => {
            return forbid(&format!("volume {name}"), format!("{user} may not move the epoch of volume {name}: the coordinator does"))
        }
        ["owners", name] if method == Method::PUT => {
            return forbid(&format!("image {name}"), format!("{user} may not change who image {name} belongs to: admins only"))
        }
        _ => {}
    }
    next.run(req).await
}

/// The image server's OpenAPI document, served at `/store/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "vgrid image server API", description = "Images as manifests plus blake3-addressed, zstd-compressed chunks."),
    paths(list_images, get_latest, get_version, delete_all, delete_version, get_profile, put_profile, get_hot_pages, put_hot_pages,
        get_chunk, head_chunk, get_chunk_range, run_gc, begin_upload, abort_upload, missing, put_chunk, commit, get_owner, put_owner, get_epoch, put_epoch),
    components(schemas(ErrorBody, ImageSummary, Manifest, GcReport, BootProfile, ChunkPart, ByteRange, UploadCreated, ImageOwner, ChunkHash, Epoch)),
    modifiers(&CONTRACT),
    security(("bearer" = []), ("node_certificate" = []))
)]
pub struct ApiDoc;

/// What this API answers besides each route's own statuses (see [`vgrid_api::openapi::Contract`]).
const CONTRACT: vgrid_api::openapi::Contract = vgrid_api::openapi::Contract { body_limit: MAX_BODY };

/// `/store/openapi.json`, open to every caller like the coordinator's document.
fn doc() -> Router<Arc<ImageStore>> {
    Router::new().route("/store/openapi.json", get(|| async { Json(vgrid_api::openapi::served(&<ApiDoc as utoipa::OpenApi>::openapi())) }))
}

fn routes() -> Router<Arc<ImageStore>> {
    Router::new()
        .route("/store/v1/images", get(list_images))
        .route("/store/v1/images/{name}", get(get_latest).delete(delete_all))
        .route("/store/v1/images/{name}/{version}", get(get_version).delete(delete_version))
        .route("/store/v1/images/{name}/{version}/profile", get(get_profile).put(put_profile))
        .route("/store/v1/images/{name}/{version}/profile/hot", get(get_hot_pages).put(put_hot_pages))
        .route("/store/v1/chunks/{hash}", get(get_chunk).head(head_chunk))
        .route("/store/v1/chunks/{hash}/range", get(get_chunk_range))
        .route("/store/v1/gc", post(run_gc))
        .route("/store/v1/uploads", post(begin_upload))
        .route("/store/v1/uploads/{id}", axum::routing::delete(abort_upload))
        .route("/store/v1/uploads/{id}/missing", post(missing))
        .route("/store/v1/uploads/{id}/chunks/{hash}", put(put_chunk))
        .route("/store/v1/uploads/{id}/commit", post(commit))
        .route("/store/v1/owners/{name}", get(get_owner).put(put_owner))
        .route("/store/v1/volumes/{name}/epoch", get(get_epoch).put(put_epoch))
        // Not a router-wide fallback: the router is merged into others (`vgrid up`), and axum
        // refuses to merge two routers that both have one.
        .route("/store/v1/{*rest}", axum::routing::any(no_such_endpoint))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

#[utoipa::path(get, path = "/store/v1/owners/{name}", params(("name" = String, Path, description = "image name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")), responses((status = 200, body = ImageOwner)))]
async fn get_owner(State(s): St, Path(name): Path<String>) -> Res<Json<ImageOwner>> {
    parse_name(&name)?;
    Ok(Json(s.owner(&name).await?))
}

#[utoipa::path(put, path = "/store/v1/owners/{name}", params(("name" = String, Path, description = "image name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")), request_body = ImageOwner, responses((status = 200, body = ImageOwner)))]
async fn put_owner(State(s): St, Path(name): Path<String>, b: Result<Bytes, BytesRejection>) -> Res<Json<ImageOwner>> {
    parse_name(&name)?;
    let o: ImageOwner = json_body(&format!("owner of image {name}"), b)?;
    s.set_owner(&name, &o).await?;
    Ok(Json(o))
}

/// The fencing epoch of a volume (0: never attached read-write).
#[utoipa::path(get, path = "/store/v1/volumes/{name}/epoch", params(("name" = String, Path, description = "volume name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")), responses((status = 200, body = Epoch)))]
async fn get_epoch(State(s): St, Path(name): Path<String>) -> Res<Json<Epoch>> {
    parse_name(&name)?;
    Ok(Json(Epoch { epoch: s.volume_epoch(&name).await? }))
}

/// Raises a volume's fencing epoch (the coordinator, when it grants a read-write attach):
/// commits with an older epoch are refused from then on. Never lowers it; answers the epoch in
/// force.
#[utoipa::path(put, path = "/store/v1/volumes/{name}/epoch", params(("name" = String, Path, description = "volume name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")), request_body = Epoch, responses((status = 200, body = Epoch)))]
async fn put_epoch(State(s): St, Path(name): Path<String>, b: Result<Bytes, BytesRejection>) -> Res<Json<Epoch>> {
    parse_name(&name)?;
    let e: Epoch = json_body(&format!("epoch of volume {name}"), b)?;
    Ok(Json(Epoch { epoch: s.raise_epoch(&name, e.epoch).await? }))
}

async fn no_such_endpoint(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorKind::NOT_FOUND, uri.path(), format!("no such endpoint: {}", uri.path()))
}

/// Serves the image server API on `listener` until the process ends.
pub async fn serve(store: Arc<ImageStore>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, "image server listening");
    }
    axum::serve(listener, router(store)).await
}

#[utoipa::path(get, path = "/store/v1/images", responses((status = 200, body = [ImageSummary], description = "every image the caller may read")))]
async fn list_images(State(s): St, c: Option<axum::Extension<vgrid_trust::caller::Caller>>) -> Res<Response> {
    let mut v = s.list().await?;
    if let Some(axum::Extension(c)) = c {
        if !c.is_privileged() {
            let u = c.user().unwrap_or_default();
            v.retain(|i| ImageOwner { owner: i.owner.clone(), public: i.public }.readable_by(u, false));
        }
    }
    Ok(Json(v).into_response())
}

#[utoipa::path(get, path = "/store/v1/images/{name}", params(("name" = String, Path, description = "image name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")), responses((status = 200, body = Manifest, description = "the latest version's manifest")))]
async fn get_latest(State(s): St, Path(name): Path<String>, headers: HeaderMap) -> Res<Response> {
    let r = parse_ref(&name, None)?;
    Ok(manifest_response(&headers, &s.get_manifest(&r).await?))
}

#[utoipa::path(get, path = "/store/v1/images/{name}/{version}", params(("name" = String, Path, description = "image name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"), ("version" = u32, Path, description = "image version")), responses((status = 200, body = Manifest)))]
async fn get_version(State(s): St, Path((name, version)): Path<(String, String)>, headers: HeaderMap) -> Res<Response> {
    let r = parse_ref(&name, Some(&version))?;
    Ok(manifest_response(&headers, &s.get_manifest(&r).await?))
}

/// A manifest as JSON, zstd-compressed (`Content-Encoding: zstd`) for a client that accepts
/// it. Every VM start waits for its image's manifest, whose hex hashes and zero chunks shrink
/// ~4x so (a warm image's: 131 KB, 31 KB compressed, ~8 ms less at 100 Mbit/s).
fn manifest_response(headers: &HeaderMap, m: &Manifest) -> Response {
    let json = match serde_json::to_vec(m) {
        Ok(j) => j,
        Err(e) => {
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::INTERNAL, format!("image {}", m.image_ref()), e.to_string())
                .into_response()
        }
    };
    let json_type = (header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let vary = (header::VARY, HeaderValue::from_static("accept-encoding"));
    if accepts_zstd(headers) {
        if let Ok(z) = zstd::bulk::compress(&json, MANIFEST_ZSTD_LEVEL) {
            return ([json_type, vary, (header::CONTENT_ENCODING, HeaderValue::from_static("zstd"))], z).into_response();
        }
    }
    ([json_type, vary], json).into_response()
}

/// Whether `Accept-Encoding` lists zstd (and not with `q=0`).
fn accepts_zstd(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|e| {
        let mut parts = e.split(';').map(str::trim);
        parts.next().is_some_and(|t| t.eq_ignore_ascii_case("zstd")) && !parts.any(|p| p.replace(' ', "") == "q=0")
    })
}

/// zstd level of manifests on the wire (level 1: 131 KB -> 31 KB in well under a millisecond).
const MANIFEST_ZSTD_LEVEL: i32 = 1;

#[utoipa::path(delete, path = "/store/v1/images/{name}", params(("name" = String, Path, description = "image name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")), responses((status = 200, body = GcReport, description = "every version removed, unreferenced chunks freed")))]
async fn delete_all(State(s): St, Path(name): Path<String>) -> Res<Response> {
    let r = parse_ref(&name, None)?;
    Ok(Json(s.delete(&r).await?).into_response())
}

#[utoipa::path(delete, path = "/store/v1/images/{name}/{version}", params(("name" = String, Path, description = "image name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"), ("version" = u32, Path, description = "image version")), responses((status = 200, body = GcReport)))]
async fn delete_version(State(s): St, Path((name, version)): Path<(String, String)>) -> Res<Response> {
    let r = parse_ref(&name, Some(&version))?;
    Ok(Json(s.delete(&r).await?).into_response())
}

#[utoipa::path(get, path = "/store/v1/images/{name}/{version}/profile", params(("name" = String, Path, description = "image name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"), ("version" = u32, Path, description = "image version")), responses((status = 200, body = BootProfile)))]
async fn get_profile(State(s): St, Path((name, version)): Path<(String, String)>) -> Res<Json<BootProfile>> {
    let r = parse_ref(&name, Some(&version))?;
    Ok(Json(s.get_profile(&r).await?))
}

#[utoipa::path(get, path = "/store/v1/images/{name}/{version}/profile/hot", params(("name" = String, Path, description = "image name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"), ("version" = u32, Path, description = "image version")), responses((status = 200, body = Binary, content_type = "application/zstd", description = "the hot-page bundle")))]
async fn get_hot_pages(State(s): St, Path((name, version)): Path<(String, String)>) -> Res<Response> {
    let r = parse_ref(&name, Some(&version))?;
    let b = s.get_hot_pages(&r).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/zstd")], b).into_response())
}

#[utoipa::path(put, path = "/store/v1/images/{name}/{version}/profile/hot", params(("name" = String, Path, description = "image name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"), ("version" = u32, Path, description = "image version")), request_body(content = Binary, content_type = "application/zstd"), responses((status = 204, description = "stored (every page verified)")))]
async fn put_hot_pages(State(s): St, Path((name, version)): Path<(String, String)>, b: Result<Bytes, BytesRejection>) -> Res<StatusCode> {
    let r = parse_ref(&name, Some(&version))?;
    let b = body(&format!("hot pages of image {r}"), b)?;
    s.put_hot_pages(&r, b).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/store/v1/images/{name}/{version}/profile", params(("name" = String, Path, description = "image name", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"), ("version" = u32, Path, description = "image version")), request_body = BootProfile, responses((status = 204, description = "stored")))]
async fn put_profile(State(s): St, Path((name, version)): Path<(String, String)>, b: Result<Bytes, BytesRejection>) -> Res<StatusCode> {
    let r = parse_ref(&name, Some(&version))?;
    let p: BootProfile = json_body(&format!("boot profile of image {r}"), b)?;
    s.put_profile(&r, &p).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn etag(h: &ChunkHash) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{h}\"")).expect("hex is a valid header value")
}

fn chunk_headers(h: &ChunkHash) -> [(header::HeaderName, HeaderValue); 3] {
    [
        (header::CONTENT_TYPE, HeaderValue::from_static("application/zstd")),
        (header::ETAG, etag(h)),
        (header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=31536000, immutable")),
    ]
}

fn matches_etag(headers: &HeaderMap, h: &ChunkHash) -> bool {
    let want = h.to_hex();
    headers.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').map(str::trim).any(|t| {
            let t = t.strip_prefix("W/").unwrap_or(t);
            t == "*" || t.trim_matches('"') == want
        })
    })
}

#[utoipa::path(get, path = "/store/v1/chunks/{hash}", params(("hash" = String, Path, description = "chunk hash (blake3, hex)", pattern = "^[0-9a-f]{64}$")), responses((status = 200, body = Binary, content_type = "application/zstd", description = "the chunk, zstd-compressed"), (status = 304, description = "If-None-Match matched"), (status = 500, body = ErrorBody, description = "the stored chunk is corrupt")))]
async fn get_chunk(State(s): St, Path(hash): Path<String>, headers: HeaderMap) -> Res<Response> {
    let h = parse_hash(&hash)?;
    if matches_etag(&headers, &h) {
        if !s.has_chunk(&h).await? {
            return Err(StoreError::ChunkNotFound(h).into());
        }
        return Ok((StatusCode::NOT_MODIFIED, chunk_headers(&h)).into_response());
    }
    let z = s.get_chunk_compressed(&h).await?;
    Ok((StatusCode::OK, chunk_headers(&h), z).into_response())
}

/// The chunk a ranged-read error is about.
fn range_hash(e: &vgrid_storeclient::tree::TreeError) -> ChunkHash {
    use vgrid_storeclient::tree::TreeError::*;
    match e {
        Geometry { hash, .. } | Range { hash, .. } | Malformed { hash, .. } | TreeMismatch { hash } | BlockMismatch { hash, .. } => *hash,
    }
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RangeQuery {
    /// First byte of the range in the chunk, a multiple of `block`.
    offset: u32,
    /// Bytes in the range, a positive multiple of `block`.
    len: u32,
    /// Block size: a power of two of at least 1024, less than the chunk's length (a chunk a
    /// power of two long).
    block: u32,
}

/// Part of a chunk, verifiable against the chunk's hash: zstd of the BLAKE3 chaining values of
/// all the chunk's `block`-byte blocks (32 bytes each, in order) followed by the bytes of
/// `[offset, offset+len)`.
#[utoipa::path(get, path = "/store/v1/chunks/{hash}/range", params(("hash" = String, Path, description = "chunk hash (blake3, hex)", pattern = "^[0-9a-f]{64}$"), RangeQuery), responses((status = 200, body = Binary, content_type = "application/zstd", description = "block chaining values and the range, zstd-compressed"), (status = 400, body = ErrorBody, description = "the range is not whole blocks inside the chunk"), (status = 500, body = ErrorBody, description = "the stored chunk is corrupt")))]
async fn get_chunk_range(
    State(s): St,
    Path(hash): Path<String>,
    vgrid_trust::caller::JsonQuery(q): vgrid_trust::caller::JsonQuery<RangeQuery>,
) -> Res<Response> {
    let h = parse_hash(&hash)?;
    let z = s.get_chunk_range(&h, q.block, q.offset, q.len).await?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, HeaderValue::from_static("application/zstd"))], z).into_response())
}

#[utoipa::path(head, path = "/store/v1/chunks/{hash}", params(("hash" = String, Path, description = "chunk hash (blake3, hex)", pattern = "^[0-9a-f]{64}$")), responses((status = 200, description = "the chunk is stored")))]
async fn head_chunk(State(s): St, Path(hash): Path<String>) -> Res<Response> {
    let h = parse_hash(&hash)?;
    if !s.has_chunk(&h).await? {
        return Err(StoreError::ChunkNotFound(h).into());
    }
    Ok((StatusCode::OK, chunk_headers(&h)).into_response())
}

#[utoipa::path(post, path = "/store/v1/gc", responses((status = 200, body = GcReport)))]
async fn run_gc(State(s): St) -> Res<Response> {
    Ok(Json(s.gc().await?).into_response())
}

#[utoipa::path(post, path = "/store/v1/uploads", responses((status = 201, body = UploadCreated)))]
async fn begin_upload(State(s): St) -> Res<Response> {
    Ok((StatusCode::CREATED, Json(UploadCreated { id: s.begin_upload().0 })).into_response())
}

#[utoipa::path(delete, path = "/store/v1/uploads/{id}", params(("id" = String, Path, description = "upload session id")), responses((status = 204, description = "aborted")))]
async fn abort_upload(State(s): St, Path(id): Path<String>) -> Res<StatusCode> {
    s.abort_upload(&UploadId(id))?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/store/v1/uploads/{id}/missing", params(("id" = String, Path, description = "upload session id")), request_body = [ChunkHash], responses((status = 200, body = [ChunkHash], description = "the hashes the server lacks")))]
async fn missing(State(s): St, Path(id): Path<String>, b: Result<Bytes, BytesRejection>) -> Res<Json<Vec<ChunkHash>>> {
    let hashes: Vec<ChunkHash> = json_body(&format!("missing-chunk query of upload {id}"), b)?;
    Ok(Json(s.missing(&UploadId(id), &hashes).await?))
}

#[utoipa::path(put, path = "/store/v1/uploads/{id}/chunks/{hash}", params(("id" = String, Path, description = "upload session id"), ("hash" = String, Path, description = "chunk hash (blake3, hex)", pattern = "^[0-9a-f]{64}$")), request_body(content = Binary, content_type = "application/zstd"), responses((status = 204, description = "stored (verified against its hash)"), (status = 507, body = ErrorBody, description = "no space left")))]
async fn put_chunk(State(s): St, Path((id, hash)): Path<(String, String)>, b: Result<Bytes, BytesRejection>) -> Res<StatusCode> {
    let h = parse_hash(&hash)?;
    let z = body(&format!("chunk {h}"), b)?;
    s.put_chunk(&UploadId(id), &h, z).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct CommitQuery {
    /// Make the image readable by every user (admins and grid nodes only).
    #[serde(default)]
    public: bool,
    /// A volume's commit by the holder of this fencing epoch: refused (409) when the volume's
    /// epoch is newer.
    #[serde(default)]
    epoch: Option<u64>,
}

/// Commits an upload. A user's commit of a name nobody owns makes it theirs; of a name another
/// user owns is refused; `?public=true` (admins and grid nodes) makes it readable by all.
#[utoipa::path(post, path = "/store/v1/uploads/{id}/commit", params(("id" = String, Path, description = "upload session id"), CommitQuery), request_body = Manifest, responses((status = 200, body = Manifest, description = "the stored manifest (version 0 asks for the next)"), (status = 409, body = ErrorBody, description = "that version exists"), (status = 507, body = ErrorBody, description = "no space left")))]
async fn commit(
    State(s): St,
    Path(id): Path<String>,
    vgrid_trust::caller::JsonQuery(q): vgrid_trust::caller::JsonQuery<CommitQuery>,
    c: Option<axum::Extension<vgrid_trust::caller::Caller>>,
    b: Result<Bytes, BytesRejection>,
) -> Res<Json<Manifest>> {
    let b = body(&format!("commit of upload {id}"), b)?;
    let m = Manifest::from_json(&b).map_err(|e| {
        let status =
            if matches!(e, vgrid_api::ManifestError::Json(_)) { StatusCode::BAD_REQUEST } else { StatusCode::UNPROCESSABLE_ENTITY };
        ApiError::new(status, ErrorKind::BAD_REQUEST, format!("upload {id}"), format!("commit of upload {id}: invalid manifest: {e}"))
    })?;
    let caller = c.map(|e| e.0);
    let old = s.owner(&m.name).await?;
    let what = format!("image {}", m.name);
    let mut new = old.clone();
    if let Some(c) = &caller {
        let user = c.user().map(str::to_string);
        let admin = c.is_privileged();
        if q.public && !admin {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                &what,
                format!("{} may not publish images: admins only", c.describe()),
            ));
        }
        match (&old.owner, &user) {
            (Some(o), Some(u)) if o != u && !admin => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    &what,
                    format!("image {} belongs to {o}; {u} may not add versions to it", m.name),
                ))
            }
            (None, Some(u)) => new.owner = Some(u.clone()),
            _ => {}
        }
    }
    new.public |= q.public;
    if let Some(vgrid_trust::caller::Caller::User(u)) = &caller {
        if let Some(max) = u.max_stored_bytes {
            let used: u64 = s.list().await?.iter().filter(|i| i.owner.as_deref() == Some(u.name.as_str())).map(|i| i.stored_bytes).sum();
            let adds = ImageSummary::of(&m).stored_bytes;
            if used + adds > max {
                let b = |n: u64| format!("{:.1} MiB", n as f64 / 1048576.0);
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "quota",
                    &what,
                    format!(
                        "quota exceeded: user {} may store {} of images here; {} stored, image {} adds {}",
                        u.name,
                        b(max),
                        b(used),
                        m.name,
                        b(adds)
                    ),
                ));
            }
        }
    }
    let stored = s.commit_fenced(&UploadId(id), m, q.epoch).await?;
    if new != old {
        s.set_owner(&stored.name, &new).await?;
    }
    Ok(Json(stored))
}

/// Binds `addr` (use `127.0.0.1:0` for a free loopback port) and serves the API in a background
/// task. Returns the bound address and the task (abort it to stop). Handy for tests and for
/// `vgrid up`.
pub async fn spawn(
    store: Arc<ImageStore>,
    addr: std::net::SocketAddr,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((bound, tokio::spawn(serve(store, listener))))
}

/// Advertises this image server's images to a coordinator every `interval` (its heartbeat),
/// until the process ends; the coordinator's answer sets the pace from then on. A coordinator
/// that does not answer is retried at the same pace (the last one it asked for: a coordinator
/// that restarts forgets image servers, and one that asked for 1 s must not wait for 5).
pub async fn advertise_loop(store: Arc<ImageStore>, coordinator: String, name: String, url: String, interval: std::time::Duration) {
    let http = vgrid_trust::tls::client_builder().timeout(std::time::Duration::from_secs(10)).build().expect("HTTP client");
    let target = format!("{}/api/v1/image-servers/heartbeat", coordinator.trim_end_matches('/'));
    let mut failing = false;
    let mut pace = interval;
    loop {
        let result = async {
            let images = store.list().await.map_err(|e| e.to_string())?;
            let ad = vgrid_api::grid::ImageServerAd { name: name.clone(), url: url.clone(), images };
            let resp = http.post(&target).json(&ad).send().await.map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("HTTP {}", resp.status()));
            }
            // The coordinator says how often it wants to hear from us.
            let reply: serde_json::Value = resp.json().await.unwrap_or_default();
            Ok::<_, String>(reply["interval_secs"].as_u64().map(std::time::Duration::from_secs))
        }
        .await;
        match result {
            Ok(asked) => {
                if failing {
                    tracing::info!(coordinator = %coordinator, "coordinator reachable again");
                    failing = false;
                }
                pace = asked.filter(|d| !d.is_zero()).unwrap_or(interval);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(coordinator = %coordinator, "advertising images failed: {e}");
                }
                failing = true;
            }
        }
        tokio::time::sleep(pace).await;
    }
}
