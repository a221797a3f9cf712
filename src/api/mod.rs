//! The HTTP API on `--api-listen`: health, the agent inventory and metrics.
//! Handlers read snapshots and `watch` values; they never lock the core.

pub mod agents;
pub mod health;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

pub use agents::{Assignment, Assignments};
pub use health::Readiness;

use crate::fleet::FleetHandle;
use crate::metrics::Metrics;

/// What the API reads. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub fleet: FleetHandle,
    pub metrics: Arc<Metrics>,
    pub readiness: watch::Receiver<Readiness>,
    /// Per-agent group, desired hash and state, published by the reconciler.
    pub assignments: watch::Receiver<Arc<Assignments>>,
}

/// The API's routes. More routes can be merged into the returned router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/api/v1/agents", get(agents::list))
        .route("/api/v1/agents/{uid}", get(agents::one))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    let text = state.metrics.render(&state.fleet.snapshot());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
}
