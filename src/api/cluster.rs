//! The API of a replica (`serve --store`): `GET /api/v1/cluster`, and every
//! other `/api/v1/` call forwarded to the leader, which plans and so knows
//! every rollout; the answer is the leader's, whichever replica was asked.

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

use super::{ApiState, error};
use crate::cluster::Cluster;

/// How long a forwarded call may take: a long poll is held for a minute at most.
const FORWARD_TIMEOUT: std::time::Duration = super::wait::MAX_WAIT.saturating_add(std::time::Duration::from_secs(15));
/// Marks a forwarded request, so it is never forwarded twice.
const FORWARDED: &str = "opamp-gitops-forwarded-by";

/// A replica's cluster, and the client its API forwards with.
#[derive(Clone)]
pub struct ClusterApi {
    pub cluster: Cluster,
    client: Client<HttpsConnector<HttpConnector>, Body>,
}

impl ClusterApi {
    /// Forwards over plain HTTP, or over HTTPS as `tls` says (trusting the
    /// replicas' CA, `--replica-ca`, or the system's certificates).
    pub fn new(cluster: Cluster, tls: rustls::ClientConfig) -> Self {
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        ClusterApi {
            cluster,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

/// `{"replica", "leader", "epoch", "replicas": [{"id", "agents", "last_seen", "alive", "api_url"}]}`.
pub async fn show(State(state): State<ApiState>) -> Response {
    let Some(c) = &state.cluster else {
        return error(
            StatusCode::NOT_FOUND,
            "this controller is not a replica (serve --store)",
        );
    };
    let members = c.cluster.members.borrow().clone();
    let (leader, epoch) = members.leader.clone().unzip();
    Json(json!({
        "replica": c.cluster.replica,
        "leader": leader,
        "epoch": epoch,
        "replicas": members.replicas.iter().map(|r| json!({
            "id": r.id,
            "agents": r.agents,
            "last_seen": crate::rfc3339::format(r.last_seen),
            "alive": r.alive,
            "api_url": r.api_url,
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// On a replica that does not lead, sends `/api/v1/` calls (but the cluster's
/// own) to the leader and answers what it answers.
pub async fn forward(State(state): State<ApiState>, mut request: Request, next: Next) -> Response {
    let Some(c) = &state.cluster else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    if !path.starts_with("/api/v1/") || path == "/api/v1/cluster" || c.cluster.holds_lease() {
        return next.run(request).await;
    }
    if request.headers().contains_key(FORWARDED) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the replica this call was forwarded to does not lead any more; try again",
        );
    }
    let members = c.cluster.members.borrow().clone();
    let Some(base) = members
        .leader_api()
        .filter(|_| members.leader.as_ref().is_some_and(|(id, _)| *id != c.cluster.replica))
    else {
        let mut answer = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no replica leads the cluster right now; try again in a few seconds",
        );
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return answer;
    };
    let target = format!(
        "{}{}",
        base.trim_end_matches('/'),
        request.uri().path_and_query().map_or(path, |p| p.as_str())
    );
    let Ok(uri) = target.parse() else {
        return error(
            StatusCode::BAD_GATEWAY,
            &format!("the leader's address {base} is not a URL"),
        );
    };
    // The `Host` header stays the caller's: the leader checks a browser's
    // `Origin` against it, as this replica did.
    *request.uri_mut() = uri;
    if let Ok(me) = HeaderValue::from_str(&c.cluster.replica) {
        request.headers_mut().insert(FORWARDED, me);
    }
    match tokio::time::timeout(FORWARD_TIMEOUT, c.client.request(request)).await {
        Ok(Ok(answer)) => answer.map(Body::new),
        Ok(Err(e)) => error(
            StatusCode::BAD_GATEWAY,
            &format!("the leader at {base} did not answer: {e}"),
        ),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!("the leader at {base} did not answer within {FORWARD_TIMEOUT:?}"),
        ),
    }
}
