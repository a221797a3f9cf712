//! The git source's HTTP endpoints: `POST /api/v1/sync` and
//! `POST /api/v1/webhook`.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;
use tracing::{debug, warn};

use crate::gitsrc::webhook::{self, Delivery};
use crate::gitsrc::{GitHandle, SyncError};

/// Push payloads are small; this bounds what an unauthenticated sender can make us buffer.
const WEBHOOK_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// `POST /api/v1/sync` and `POST /api/v1/webhook`.
pub fn routes(handle: GitHandle) -> Router {
    Router::new()
        .route("/api/v1/sync", post(sync))
        .route(
            "/api/v1/webhook",
            post(webhook).layer(DefaultBodyLimit::max(WEBHOOK_BODY_LIMIT)),
        )
        .with_state(handle)
}

async fn sync(State(handle): State<GitHandle>) -> Response {
    match handle.sync().await {
        Ok(outcome) => Json(outcome).into_response(),
        Err(e) => {
            let code = match e {
                SyncError::Fetch(_) => StatusCode::BAD_GATEWAY,
                SyncError::Stopped => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (code, Json(json!({"error": e.to_string()}))).into_response()
        }
    }
}

async fn webhook(State(handle): State<GitHandle>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(secret) = handle.webhook_secret()
        && !webhook::signature_matches(secret, &body, header("x-hub-signature-256"))
    {
        warn!("webhook refused: bad or missing signature");
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "bad or missing X-Hub-Signature-256"})),
        )
            .into_response();
    }
    let branch = handle.status().borrow().branch.clone();
    match webhook::classify(header("x-github-event"), &body, branch.as_deref()) {
        Delivery::Ping => Json(json!({"status": "pong"})).into_response(),
        Delivery::Ignore { pushed } => {
            debug!(pushed = %pushed, "webhook for another ref ignored");
            Json(json!({"status": "ignored", "ref": pushed})).into_response()
        }
        Delivery::Fetch => {
            handle.trigger();
            (StatusCode::ACCEPTED, Json(json!({"status": "fetching"}))).into_response()
        }
    }
}
