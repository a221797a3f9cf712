//! Agent tokens: refused without one (401 over HTTP, a refused WebSocket
//! upgrade), revoked by editing the file with no restart, bad tokens rate
//! limited per source, and a uid bound to the identity it was first seen
//! under so no client can report for another agent.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;

use common::{Body, SUPERVISOR_CAPS, TestServer, heartbeat, hello, http_request, remote_status, uid16};
use opamp_gitops::app::ServeConfig;
use opamp_gitops::opamp::codec;
use opamp_gitops::proto::{AgentToServer, ServerToAgent};
use prost::Message as _;
use sha2::Digest;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn entry(name: &str, token: &str) -> String {
    format!(
        "- {{name: {name}, sha256: {}}}\n",
        hex::encode(sha2::Sha256::digest(token.as_bytes()))
    )
}

fn write_tokens(path: &Path, entries: &[(&str, &str)]) {
    let text: String = entries.iter().map(|(n, t)| entry(n, t)).collect();
    // Replaced as tools do it, so a watcher never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

async fn server_with_tokens(dir: &Path, entries: &[(&str, &str)]) -> TestServer {
    let path = dir.join("agents.yaml");
    write_tokens(&path, entries);
    TestServer::start_with(ServeConfig {
        agent_tokens: Some(path),
        ..ServeConfig::local()
    })
    .await
}

/// POSTs `msg` with `token` (if any): the status, and the reply when 200.
async fn post_as(addr: SocketAddr, msg: &AgentToServer, token: Option<&str>) -> (u16, Option<ServerToAgent>) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/x-protobuf")];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth.as_str()));
    }
    let r = http_request(
        addr,
        "POST",
        "/v1/opamp",
        &headers,
        Body::Plain(codec::encode_http(msg, false).to_vec()),
    )
    .await;
    let reply = (r.status == 200).then(|| ServerToAgent::decode(&r.body[..]).unwrap());
    (r.status, reply)
}

/// A WebSocket upgrade with `token`: the HTTP status of the answer.
async fn upgrade_as(addr: SocketAddr, token: Option<&str>) -> u16 {
    let mut request = format!("ws://{addr}/v1/opamp").into_client_request().unwrap();
    if let Some(t) = token {
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade failed otherwise: {e}"),
    }
}

#[tokio::test]
async fn agents_need_a_token_and_a_revoked_one_stops_working_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_tokens(dir.path(), &[("edge", "edge-secret"), ("apps", "apps-secret")]).await;
    let addr = server.opamp_addr();

    assert_eq!(post_as(addr, &hello(&uid16(1), 0), None).await.0, 401);
    assert_eq!(post_as(addr, &hello(&uid16(1), 0), Some("guess")).await.0, 401);
    assert_eq!(upgrade_as(addr, None).await, 401);
    assert_eq!(upgrade_as(addr, Some("guess")).await, 401);
    assert!(
        server.fleet().snapshot().get(&uid_of(1)).is_none(),
        "nothing refused was recorded"
    );

    let (status, reply) = post_as(addr, &hello(&uid16(1), 0), Some("edge-secret")).await;
    assert_eq!(status, 200);
    assert_eq!(reply.unwrap().instance_uid, uid16(1));
    assert_eq!(upgrade_as(addr, Some("apps-secret")).await, 101);

    // Revoke `edge` by editing the file: its next request is refused.
    write_tokens(&dir.path().join("agents.yaml"), &[("apps", "apps-secret")]);
    common::eventually("the revocation to take effect", async || {
        let (status, _) = post_as(addr, &heartbeat(&uid16(1), 1, SUPERVISOR_CAPS), Some("edge-secret")).await;
        (status == 401).then_some(())
    })
    .await;
    assert_eq!(post_as(addr, &hello(&uid16(2), 0), Some("apps-secret")).await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_source_that_keeps_guessing_is_turned_away() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_tokens(dir.path(), &[("edge", "edge-secret")]).await;
    let addr = server.opamp_addr();
    let mut statuses = vec![];
    for i in 0..25 {
        statuses.push(post_as(addr, &hello(&uid16(1), 0), Some(&format!("guess-{i}"))).await.0);
    }
    assert!(statuses[..20].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[20..].iter().all(|s| *s == 429), "{statuses:?}");
    // Even the right token waits out the window from that source.
    assert_eq!(post_as(addr, &hello(&uid16(1), 0), Some("edge-secret")).await.0, 429);
    let metrics = String::from_utf8(server.api_get("/metrics").await.body).unwrap();
    assert!(
        metrics.contains("opamp_gitops_opamp_refused_total{reason=\"invalid_token\"} 20"),
        "{metrics}"
    );
    assert!(
        metrics.contains("opamp_gitops_opamp_refused_total{reason=\"rate_limited\"} 6"),
        "{metrics}"
    );
    server.stop().await;
}

fn uid_of(n: u8) -> opamp_gitops::model::InstanceUid {
    opamp_gitops::model::InstanceUid::from_wire(&uid16(n)).unwrap()
}

#[tokio::test]
async fn no_client_can_report_for_an_agent_bound_to_another_identity() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_tokens(dir.path(), &[("edge-1", "one"), ("edge-2", "two")]).await;
    let addr = server.opamp_addr();
    let a = uid16(10);
    assert_eq!(post_as(addr, &hello(&a, 0), Some("one")).await.0, 200);
    let before = server.wait_agent(&a, |r| r.liveness.sequence_num() == 0).await;
    assert_eq!(before.identity.as_ref().map(|i| &*i.name), Some("edge-1"));
    let shown = server.api_json(&format!("/api/v1/agents/{}", uid_of(10))).await;
    assert_eq!(shown["identity"], "edge-1");

    // Another token's holder reports FAILED under A's uid.
    let forged = AgentToServer {
        remote_config_status: Some(remote_status(&[7; 32], 3, "forged")),
        ..heartbeat(&a, 1, SUPERVISOR_CAPS)
    };
    assert_eq!(post_as(addr, &forged, Some("two")).await.0, 403);
    // A's own next report goes through; nothing of the forgery was applied.
    assert_eq!(
        post_as(addr, &heartbeat(&a, 1, SUPERVISOR_CAPS), Some("one")).await.0,
        200
    );
    let after = server.wait_agent(&a, |r| r.liveness.sequence_num() == 1).await;
    assert!(after.remote_config_status.is_none(), "{:?}", after.remote_config_status);
    let metrics = String::from_utf8(server.api_get("/metrics").await.body).unwrap();
    assert!(
        metrics.contains("opamp_gitops_opamp_refused_total{reason=\"impersonation\"} 1"),
        "{metrics}"
    );
    server.stop().await;
}

/// Operator tokens: reads need `read`, controls `write`; the token's name is
/// recorded with the action in the API and the note; a state change a page
/// of another origin sends is refused even with a token.
#[tokio::test]
async fn operators_need_a_token_of_the_right_scope_and_their_name_is_recorded() {
    use common::gitops::{GitRepo, RawAgent, collector_config, edge_hash, serve_config, state_dir};
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("operators.yaml");
    std::fs::write(
        &tokens,
        format!(
            "- {{name: viewer, sha256: {}}}\n- {{name: ops, sha256: {}, scope: write}}\n",
            hex::encode(sha2::Sha256::digest(b"view-secret")),
            hex::encode(sha2::Sha256::digest(b"ops-secret"))
        ),
    )
    .unwrap();
    let repo = GitRepo::new();
    let policy = "  waves: [100%]\n  apply_timeout: 1h\n";
    repo.commit_edge(policy, &collector_config("v0"), "v0");
    let (_tmp, state) = state_dir();
    let mut config = serve_config(repo.path(), &state);
    config.api_tokens = Some(tokens);
    let server = TestServer::start_with(config).await;
    let mut agent = RawAgent::connect(&server, uid16(70), &[("service.name", "otelcol-sim")], &[], None).await;
    // Committed once the agent is known, v1's rollout counts it; never
    // applying, the agent keeps the rollout in progress.
    assert_eq!(agent.next_push().await.0, edge_hash(&collector_config("v0")));
    let v1 = collector_config("v1");
    let commit = repo.commit_edge(policy, &v1, "v1");
    let auth = [("Authorization", "Bearer ops-secret")];
    let synced = http_request(server.api_addr(), "POST", "/api/v1/sync", &auth, Body::Empty).await;
    assert_eq!(synced.status, 200);
    assert_eq!(agent.next_push().await.0, edge_hash(&v1));

    let api = server.api_addr();
    let call = |method: &'static str, path: &'static str, token: Option<&'static str>, origin: Option<&'static str>| async move {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        if let Some(o) = origin {
            headers.push(("Origin", o));
        }
        http_request(api, method, path, &headers, Body::Empty).await
    };
    assert_eq!(call("GET", "/healthz", None, None).await.status, 200);
    assert_eq!(call("GET", "/api/v1/agents", None, None).await.status, 401);
    assert_eq!(call("GET", "/api/v1/agents", Some("guess"), None).await.status, 401);
    assert_eq!(
        call("GET", "/api/v1/agents", Some("view-secret"), None).await.status,
        200
    );
    let pause = "/api/v1/groups/edge/pause";
    assert_eq!(call("POST", pause, None, None).await.status, 401);
    assert_eq!(call("POST", pause, Some("view-secret"), None).await.status, 403);
    assert_eq!(
        call("POST", "/api/v1/sync", Some("view-secret"), None).await.status,
        403
    );
    let forged = call("POST", pause, Some("ops-secret"), Some("https://evil.example")).await;
    assert_eq!(forged.status, 403, "a page of another origin cannot pause a rollout");
    let done = call("POST", pause, Some("ops-secret"), None).await;
    assert_eq!(done.status, 200, "{}", String::from_utf8_lossy(&done.body));
    let group: serde_json::Value = serde_json::from_slice(&done.body).unwrap();
    assert_eq!(group["rollout"]["actions"][0]["by"], "ops", "{group}");

    let note = common::eventually("the note to record who paused", async || {
        let out = std::process::Command::new("git")
            .args(["notes", "--ref=opamp-gitops", "show", &commit.to_string()])
            .current_dir(repo.path())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("by: ops").then_some(text)
    })
    .await;
    assert!(note.contains("{step: pause, at: "), "{note}");
    agent.close().await;
    server.stop().await;
}

/// A token limited to one group: its agents join that group only, so a
/// token leaked from an edge host cannot fetch the gateways' config by
/// claiming a gateway's attributes.
#[tokio::test]
async fn a_token_limited_to_one_group_never_receives_another_groups_config() {
    use common::gitops::{GitRepo, collector_config, fleet_yaml, selected_group_yaml, serve_config, state_dir};
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("agents.yaml");
    let limited = |name: &str, token: &str, group: &str| {
        let sha = hex::encode(sha2::Sha256::digest(token.as_bytes()));
        format!("- {{name: {name}, sha256: {sha}, groups: [{group}]}}\n")
    };
    std::fs::write(
        &tokens,
        limited("edge-hosts", "edge-secret", "edge") + &limited("gateway-hosts", "gw-secret", "gateways"),
    )
    .unwrap();
    let repo = GitRepo::new();
    let policy = "  waves: [100%]\n";
    repo.commit(
        &[
            ("fleet.yaml", &fleet_yaml("1h")),
            (
                "groups/edge.yaml",
                &selected_group_yaml("edge", &[("service.name", "edge")], policy),
            ),
            (
                "groups/gateways.yaml",
                &selected_group_yaml("gateways", &[("service.name", "gateway")], policy),
            ),
            ("configs/edge.yaml", &collector_config("edge")),
            ("configs/gateways.yaml", &collector_config("gateways: secret endpoints")),
        ],
        "two groups",
    );
    let (_tmp, state) = state_dir();
    let mut config = serve_config(repo.path(), &state);
    config.agent_tokens = Some(tokens);
    let server = TestServer::start_with(config).await;
    let addr = server.opamp_addr();
    let as_gateway = |uid: &[u8]| AgentToServer {
        agent_description: Some(common::description(&[("service.name", "gateway")], &[])),
        ..hello(uid, 0)
    };

    // A gateway host with its own token gets the gateways' config.
    let (gw, thief) = (uid16(20), uid16(21));
    assert_eq!(post_as(addr, &as_gateway(&gw), Some("gw-secret")).await.0, 200);
    // The edge token, claiming to be a gateway.
    assert_eq!(post_as(addr, &as_gateway(&thief), Some("edge-secret")).await.0, 200);
    let config_of = async |uid: &[u8], token: &str, seq: u64| {
        let (code, reply) = post_as(addr, &heartbeat(uid, seq, SUPERVISOR_CAPS), Some(token)).await;
        assert_eq!(code, 200);
        reply.and_then(|r| r.remote_config)
    };
    let mut seq = 1;
    let pushed = common::eventually("the gateway's config", async || {
        seq += 1;
        config_of(&gw, "gw-secret", seq).await
    })
    .await;
    let body = &pushed.config.expect("a config map").config_map[""].body;
    assert!(String::from_utf8_lossy(body).contains("gateways: secret endpoints"));
    server.let_pass(std::time::Duration::from_millis(200)).await;
    for n in 1..4 {
        assert!(
            config_of(&thief, "edge-secret", n).await.is_none(),
            "the edge token never receives the gateways' config"
        );
    }
    let shown = server.api_json(&format!("/api/v1/agents/{}", uid_of(21))).await;
    assert_eq!(shown["state"], "unmanaged", "{shown}");
    assert_eq!(shown["groups_allowed"], serde_json::json!(["edge"]), "{shown}");
    server.stop().await;
}

/// A uid's binding is kept in the state directory: after a restart another
/// token still cannot report for it, until an operator drops the binding.
#[tokio::test]
async fn a_binding_survives_a_restart_until_an_operator_drops_it() {
    use common::gitops::{GitRepo, collector_config, serve_config, state_dir};
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("agents.yaml");
    write_tokens(&tokens, &[("edge-1", "one"), ("edge-2", "two")]);
    let repo = GitRepo::new();
    repo.commit_edge("  waves: [100%]\n", &collector_config("v1"), "v1");
    let (_tmp, state) = state_dir();
    let config = || {
        let mut c = serve_config(repo.path(), &state);
        c.agent_tokens = Some(tokens.clone());
        c
    };
    let a = uid16(30);
    let server = TestServer::start_with(config()).await;
    assert_eq!(post_as(server.opamp_addr(), &hello(&a, 0), Some("one")).await.0, 200);
    server.wait_agent(&a, |r| r.identity.is_some()).await;
    server.stop().await;
    let kept = state.join(opamp_gitops::app::BINDINGS_FILE);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777, 0o600);

    let server = TestServer::start_with(config()).await;
    let addr = server.opamp_addr();
    assert_eq!(
        post_as(addr, &hello(&a, 0), Some("two")).await.0,
        403,
        "still bound to edge-1 after the restart"
    );
    let path = format!("/api/v1/agents/{}/identity", uid_of(30));
    let dropped = http_request(server.api_addr(), "DELETE", &path, &[], Body::Empty).await;
    assert_eq!(dropped.status, 204);
    let again = http_request(server.api_addr(), "DELETE", &path, &[], Body::Empty).await;
    assert_eq!(again.status, 404, "nothing left to drop");
    assert_eq!(post_as(addr, &hello(&a, 0), Some("two")).await.0, 200, "bound afresh");
    let shown = server.api_json(&format!("/api/v1/agents/{}", uid_of(30))).await;
    assert_eq!(shown["identity"], "edge-2");
    server.stop().await;
}
