//! The HTTP API on `--api-listen`: health, the agent inventory, groups,
//! history, metrics and the web view at `/`.
//! Handlers read snapshots and `watch` values; they never lock the core.

pub mod agents;
pub mod auth;
pub mod cluster;
pub mod config_diff;
pub mod git;
pub mod groups;
pub mod health;
pub mod history;
pub mod wait;
pub mod web;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use health::Readiness;

use crate::driver::DriverHandle;
use crate::fleet::FleetHandle;
use crate::gitsrc::GitHandle;
use crate::telemetry::{self, Registry};

/// What the API reads. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub fleet: FleetHandle,
    /// The git source, when a repository was given: sync and webhook.
    pub git: Option<GitHandle>,
    /// The reconcile driver, when a repository was given: groups and rollout controls.
    pub driver: Option<DriverHandle>,
    /// Every metric of the controller, for `/metrics`.
    pub metrics: Arc<Registry>,
    pub readiness: watch::Receiver<Readiness>,
    /// Per-agent group, desired hash and state, published by the reconciler.
    pub assignments: watch::Receiver<crate::driver::Assignments>,
    /// Cancelled at shutdown: long polls answer at once.
    pub shutdown: CancellationToken,
    /// How long fetches may fail before the source is shown as stale.
    pub source_stale_after: std::time::Duration,
    /// How long a wave may wait for its agents before it shows as stalled.
    pub stall_after: std::time::Duration,
    /// Who may call: tokens and scopes.
    pub auth: auth::ApiAuth,
    /// In a replica: the cluster, and how calls reach the leader.
    pub cluster: Option<cluster::ClusterApi>,
}

/// The API's routes. More routes can be merged into the returned router.
pub fn router(state: ApiState) -> Router {
    let git_routes = state.git.clone().map(git::routes).unwrap_or_default();
    let auth = state.auth.clone();
    let forward = axum::middleware::from_fn_with_state(state.clone(), cluster::forward);
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/api/v1/agents", get(agents::list))
        .route("/api/v1/agents/{uid}", get(agents::one))
        .route("/api/v1/agents/{uid}/identity", delete(agents::unbind))
        .route("/api/v1/groups", get(groups::list))
        .route("/api/v1/groups/{name}/diff", get(config_diff::diff))
        .route("/api/v1/groups/{name}/pause", post(groups::pause))
        .route("/api/v1/groups/{name}/resume", post(groups::resume))
        .route("/api/v1/groups/{name}/promote", post(groups::promote))
        .route("/api/v1/history", get(history::list))
        .route("/api/v1/history/{commit}", get(history::one))
        .route("/api/v1/cluster", get(cluster::show))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(git_routes)
        .merge(web::routes())
        .layer(forward)
        .layer(axum::middleware::from_fn_with_state(auth, auth::require))
}

/// An error answer: `status` with `{"error": message}`.
pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, telemetry::CONTENT_TYPE)],
        state.metrics.encode(),
    )
}
