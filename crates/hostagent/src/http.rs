//! The host agent's HTTP endpoints (`/host/v1/...`): cache statistics and explicit staging
//! (`pull`) with NDJSON progress.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use vgrid_api::{ErrorBody, ImageRef};

use crate::agent::{Agent, PullProgress};

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/host/v1/cache/stats", get(stats))
        .route("/host/v1/pull/{image}", post(pull))
        .with_state(agent)
}

async fn stats(State(a): State<Arc<Agent>>) -> Response {
    Json(a.proxy().stats()).into_response()
}

async fn pull(State(a): State<Arc<Agent>>, Path(image): Path<String>) -> Response {
    let r: ImageRef = match image.parse() {
        Ok(r) => r,
        Err(e) => {
            let body = ErrorBody { error: format!("{e}"), detail: None };
            return (StatusCode::BAD_REQUEST, Json(body)).into_response();
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<PullProgress>(64);
    tokio::spawn(async move { a.pull(&r, tx).await });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let p = rx.recv().await?;
        let mut line = serde_json::to_vec(&p).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::io::Error>(line), rx))
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response()
}
