//! The web dashboard at `/ui/`: static pages and scripts embedded in the binary (`ui/` of this
//! crate, listed by `build.rs`), including the vendored xterm.js and noVNC (see
//! `ui/vendor/VENDORED.md`). The files are public; everything they show comes from the REST
//! API with the session cookie (`http::session`), which decides what the user may see.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

include!(concat!(env!("OUT_DIR"), "/ui_files.rs"));

/// What the pages may load and connect to: this origin only (xterm.js adds `<style>` elements).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `/` and `/ui` lead to the dashboard; `/ui/PATH` is a file of it.
pub(super) fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(|| async { file("index.html") }))
        .route("/ui/{*path}", get(|Path(p): Path<String>| async move { file(&p) }))
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, e)| e) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        _ => "text/plain; charset=utf-8",
    }
}

fn file(path: &str) -> Response {
    let Some((_, bytes)) = UI_FILES.iter().find(|(p, _)| *p == path) else {
        return (StatusCode::NOT_FOUND, format!("no file {path} in the dashboard")).into_response();
    };
    let mut r = (*bytes).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(path)));
    // Always revalidated: a new binary serves new files at the same paths.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dashboard_and_its_vendored_scripts_are_embedded() {
        for f in [
            "index.html",
            "app.js",
            "lib.js",
            "vm.js",
            "style.css",
            "vendor/xterm/xterm.mjs",
            "vendor/xterm/xterm.css",
            "vendor/novnc/core/rfb.js",
        ] {
            assert!(UI_FILES.iter().any(|(p, _)| *p == f), "{f} is not embedded");
        }
        assert_eq!(file("nope.js").status(), StatusCode::NOT_FOUND);
        assert_eq!(file("app.js").headers()[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
    }
}
