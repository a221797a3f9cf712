//! The git source's HTTP endpoints: `POST /api/v1/sync` and
//! `POST /api/v1/webhook`.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use crate::gitsrc::webhook::{self, Delivery};
use crate::gitsrc::{GitHandle, SyncError};

/// Push payloads are small; this bounds what an unauthenticated sender can make us buffer.
const WEBHOOK_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// Signed deliveries remembered, to refuse one sent again.
const REMEMBERED_DELIVERIES: usize = 4096;

/// The signatures of the newest signed deliveries. A signature covers the
/// whole body, so the same signature is the same delivery sent again.
#[derive(Default)]
struct Deliveries {
    order: VecDeque<[u8; 32]>,
    seen: HashSet<[u8; 32]>,
}

impl Deliveries {
    /// Remembers `signature`; false when it was seen before.
    fn first_time(&mut self, signature: &str) -> bool {
        let key: [u8; 32] = Sha256::digest(signature.as_bytes()).into();
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > REMEMBERED_DELIVERIES
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }
}

#[derive(Clone)]
struct Hooks {
    handle: GitHandle,
    deliveries: Arc<Mutex<Deliveries>>,
}

/// `POST /api/v1/sync` and `POST /api/v1/webhook`.
pub fn routes(handle: GitHandle) -> Router {
    Router::new()
        .route("/api/v1/sync", post(sync))
        .route(
            "/api/v1/webhook",
            post(webhook).layer(DefaultBodyLimit::max(WEBHOOK_BODY_LIMIT)),
        )
        .with_state(Hooks {
            handle,
            deliveries: Arc::default(),
        })
}

async fn sync(State(Hooks { handle, .. }): State<Hooks>) -> Response {
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

async fn webhook(State(hooks): State<Hooks>, headers: HeaderMap, body: Bytes) -> Response {
    let handle = &hooks.handle;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(secret) = handle.webhook_secret() {
        let signature = header("x-hub-signature-256");
        if !webhook::signature_matches(secret, &body, signature) {
            warn!("webhook refused: bad or missing signature");
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "bad or missing X-Hub-Signature-256"})),
            )
                .into_response();
        }
        let first = hooks
            .deliveries
            .lock()
            .expect("deliveries lock")
            .first_time(signature.unwrap_or_default());
        if !first {
            warn!("webhook refused: a delivery received before, sent again");
            return (
                StatusCode::CONFLICT,
                Json(json!({"error": "this delivery was received before"})),
            )
                .into_response();
        }
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
