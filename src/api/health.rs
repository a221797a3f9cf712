//! Liveness and readiness. Readiness is whatever the parts that gate it
//! (the git source: "a commit is loaded") publish on a `watch` channel.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::ApiState;

/// Whether the controller is ready to serve its purpose, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady(String),
}

impl Readiness {
    /// The state at start-up, before any commit is loaded.
    pub fn initial() -> Self {
        Readiness::NotReady("no commit loaded yet".into())
    }
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

pub async fn readyz(State(state): State<ApiState>) -> Response {
    let readiness = state.readiness.borrow().clone();
    match readiness {
        Readiness::Ready => (StatusCode::OK, "ready\n".to_string()).into_response(),
        Readiness::NotReady(reason) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")).into_response()
        }
    }
}
