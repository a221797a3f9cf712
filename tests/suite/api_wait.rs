//! The API's long polls over real sockets: `?after=N&wait=…` on the group
//! and agent lists answers once the version moves or when the wait runs out
//! (shutdown ending a wait is a unit test of `api::wait`); malformed
//! parameters are a 400.

use crate::common;

use std::time::{Duration, Instant};

use common::gitops::{GitRepo, collector_config, serve_config, state_dir};
use common::{Body, KeepAlive, TestServer, hello, http_request, uid16};

async fn get(server: &TestServer, path: &str) -> (u16, serde_json::Value) {
    let r = server.api_get(path).await;
    (r.status, serde_json::from_slice(&r.body).expect("JSON"))
}

#[tokio::test]
async fn the_groups_answer_waits_for_the_next_plan_and_a_version_not_reached_is_answered_at_once() {
    let repo = GitRepo::new();
    repo.commit_edge("  waves: [100%]\n  bake: 0s\n", &collector_config("v1"), "v1");
    let (_tmp, state) = state_dir();
    let server = TestServer::start_with(serve_config(repo.path(), &state)).await;
    let planned = server
        .wait_group("edge", "planned once", |g| g["rollout"].is_object())
        .await;
    assert_eq!(planned["name"], "edge");

    let (code, now) = get(&server, "/api/v1/groups").await;
    assert_eq!(code, 200);
    let v = now["version"].as_u64().expect("a version");
    assert!(v >= 1, "planned at least once: {now}");
    // Held until the next plan (one reconcile tick, 100 ms, at most).
    let (code, next) = get(&server, &format!("/api/v1/groups?after={v}&wait=30s")).await;
    assert_eq!(code, 200);
    assert!(next["version"].as_u64() > Some(v), "{next}");
    assert_eq!(next["groups"][0]["name"], "edge");
    // A version from another process (a restart): answered at once.
    let started = Instant::now();
    let (code, other) = get(&server, "/api/v1/groups?after=999999&wait=30s").await;
    assert_eq!(code, 200);
    assert!(other["version"].as_u64() < Some(999_999), "{other}");
    assert!(started.elapsed() < Duration::from_secs(30), "not held for the wait");
    server.stop().await;
}

#[tokio::test]
async fn the_agents_answer_carries_a_new_agent_and_a_wait_runs_out_unchanged() {
    let server = TestServer::start().await;
    let (code, empty) = get(&server, "/api/v1/agents").await;
    assert_eq!(code, 200);
    assert_eq!(empty["agents"], serde_json::json!([]));
    let v = empty["version"].as_u64().expect("a version");

    // Nothing changes: the answer comes when the wait runs out, version unchanged.
    let started = Instant::now();
    let (code, same) = get(&server, &format!("/api/v1/agents?after={v}&wait=300ms")).await;
    assert_eq!(code, 200);
    assert!(started.elapsed() >= Duration::from_millis(300), "held for the wait");
    assert_eq!(same["version"].as_u64(), Some(v));

    // An agent connects while a long poll is (likely) held: it answers with the agent.
    let path = format!("/api/v1/agents?after={v}&wait=30s");
    let held = tokio::spawn({
        let api = server.api_addr();
        async move { http_request(api, "GET", &path, &[], Body::Empty).await }
    });
    let mut ws = server.ws().await;
    ws.exchange(&hello(&uid16(7), 0)).await;
    let r = held.await.expect("the request");
    assert_eq!(r.status, 200);
    let listed: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    assert!(listed["version"].as_u64() > Some(v), "{listed}");
    assert_eq!(listed["agents"].as_array().map(Vec::len), Some(1), "{listed}");
    ws.close().await;
    server.stop().await;
}

#[tokio::test]
async fn malformed_parameters_are_refused() {
    let server = TestServer::start().await;
    for path in [
        "/api/v1/groups?after=soon",
        "/api/v1/agents?after=-1",
        "/api/v1/groups?after=1&wait=forever",
    ] {
        let (code, body) = get(&server, path).await;
        assert_eq!(code, 400, "{path}: {body}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_long_poll_longer_than_the_idle_timeout_is_answered_then_the_idle_connection_closed() {
    let idle = Duration::from_millis(300);
    let server = TestServer::start_with(opamp_gitops::app::ServeConfig {
        idle_timeout: idle,
        ..opamp_gitops::app::ServeConfig::local()
    })
    .await;
    let mut client = KeepAlive::connect(server.api_addr()).await;
    let (code, body) = client.request("GET", "/api/v1/agents", &[], b"").await;
    assert_eq!(code, 200);
    let v = serde_json::from_slice::<serde_json::Value>(&body).expect("JSON")["version"]
        .as_u64()
        .expect("a version");

    // A request in flight is not idle: held for three idle timeouts, answered.
    let started = Instant::now();
    let path = format!("/api/v1/agents?after={v}&wait=900ms");
    let (code, _) = client.request("GET", &path, &[], b"").await;
    assert_eq!(code, 200);
    assert!(started.elapsed() >= 3 * idle, "held for the wait");

    let answered = Instant::now();
    client.closed_within(common::DEADLINE).await;
    assert!(answered.elapsed() >= idle, "closed {:?} after", answered.elapsed());
    let metrics = String::from_utf8(server.api_get("/metrics").await.body).unwrap();
    assert!(
        metrics.contains("opamp_gitops_api_connections_closed_total{reason=\"idle\"} 1"),
        "{metrics}"
    );
    server.stop().await;
}
