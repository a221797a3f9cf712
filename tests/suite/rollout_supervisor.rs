//! Rollouts against agents that behave like the real OpAMP supervisor: slow
//! HTTP polling, restarts mid-apply, agents that never report their status,
//! agents that leave without a word, strict failure budgets. The real
//! controller on a real git repository, agents over real sockets.

use crate::common;

use std::time::Duration;

use common::gitops::{
    GitRepo, Observer, RawAgent, collector_config, edge_hash, fleet_yaml, group_yaml, serve_config, simulate, state_dir,
};
use common::{Post, TestServer, WsAgent, description, healthy, post, remote_status, uid16};
use opamp_gitops::model::InstanceUid;
use opamp_gitops::proto::{AgentToServer, RemoteConfigStatuses};
use opamp_gitops::simulate::TransportKind;

const APPLIED: i32 = RemoteConfigStatuses::Applied as i32;
const APPLYING: i32 = RemoteConfigStatuses::Applying as i32;

/// The edge group (every simulated agent) under `policy`, running `config`.
fn commit_edge(repo: &GitRepo, policy: &str, config: &str, message: &str) {
    repo.commit(
        &[
            ("fleet.yaml", &fleet_yaml("1h")),
            ("groups/edge.yaml", &group_yaml(policy)),
            ("configs/edge.yaml", config),
        ],
        message,
    );
}

/// A controller on a new repository whose edge group runs `v1` under `policy`.
async fn controller_on(policy: &str, v1: &str) -> (GitRepo, tempfile::TempDir, TestServer) {
    let repo = GitRepo::new();
    commit_edge(&repo, policy, v1, "v1");
    let (tmp, state) = state_dir();
    let server = TestServer::start_with(serve_config(repo.path(), &state)).await;
    (repo, tmp, server)
}

/// Commits `config` under `policy` and waits until its rollout has ended
/// (whatever the outcome); answers the edge group then.
async fn roll_out(repo: &GitRepo, server: &TestServer, policy: &str, config: &str) -> serde_json::Value {
    commit_edge(repo, policy, config, "next");
    server.sync().await;
    let hash = edge_hash(config).to_string();
    // Generous: agents that restart, or poll slowly, take a while.
    server
        .wait_group_within(Duration::from_secs(60), "edge", "the rollout's end", |g| {
            g["config_hash"] == hash.as_str() && g["rollout"]["phase"] != "progressing"
        })
        .await
}

fn failures(group: &serde_json::Value) -> usize {
    group["rollout"]["failures"].as_array().map_or(0, Vec::len)
}

fn failures_of(group: &serde_json::Value) -> Vec<InstanceUid> {
    let list = group["rollout"]["failures"].as_array().cloned().unwrap_or_default();
    list.iter()
        .map(|f| InstanceUid::parse_text(f["agent"].as_str().expect("an agent")).expect("a uid"))
        .collect()
}

#[tokio::test]
async fn http_agents_polling_slower_than_apply_timeout_take_a_good_commit_through_every_wave() {
    // Agents poll every 3 s; apply_timeout is 1 s: a clock that started when
    // the push was queued would fail nearly every agent.
    let policy = "  waves: [1, 50%, 100%]\n  bake: 0s\n  apply_timeout: 1s\n";
    let (v1, v2) = (collector_config("v1"), collector_config("v2"));
    let (repo, _tmp, server) = controller_on(policy, &v1).await;
    let (_sim, stop) = simulate(&server, 4, |c| {
        c.transport = TransportKind::Http;
        c.server = format!("http://{}/v1/opamp", server.opamp_addr());
        c.heartbeat = Duration::from_secs(3);
    });
    let v1_hash = edge_hash(&v1).to_string();
    let g = server
        .wait_group("edge", "v1 on all four", |g| {
            g["config_hash"] == v1_hash.as_str()
                && g["rollout"]["phase"] != "progressing"
                && g["agents"]["applied"] == 4
        })
        .await;
    assert_eq!(g["rollout"]["phase"], "complete", "{g}");
    assert_eq!(failures(&g), 0, "{g}");

    let g = roll_out(&repo, &server, policy, &v2).await;
    assert_eq!(g["rollout"]["phase"], "complete", "{g}");
    assert_eq!(g["rollout"]["wave"], 3);
    assert_eq!(failures(&g), 0, "{g}");
    assert_eq!(g["agents"]["applied"], 4);
    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn an_agent_restarted_while_applying_is_pushed_once_more_and_the_rollout_completes() {
    let policy = "  waves: [100%]\n  bake: 0s\n  apply_timeout: 1s\n";
    let (v1, v2) = (collector_config("v1"), collector_config("v2"));
    let (repo, _tmp, server) = controller_on(policy, &v1).await;
    let attrs = [("service.name", "otelcol-sim")];
    let host = [("host.name", "restarts")];
    let mut agent = RawAgent::connect(&server, uid16(7), &attrs, &host, None).await;
    let (h1, _) = agent.next_push().await;
    agent
        .report(remote_status(h1.as_bytes(), APPLIED, ""), Some(healthy(true)))
        .await;
    server
        .wait_group("edge", "v1 complete", |g| g["rollout"]["phase"] == "complete")
        .await;

    commit_edge(&repo, policy, &v2, "v2");
    server.sync().await;
    let (h2, _) = agent.next_push().await;
    assert_eq!(h2, edge_hash(&v2));
    agent.report(remote_status(h2.as_bytes(), APPLYING, ""), None).await;
    // The supervisor is killed mid-apply and comes back on a new connection,
    // still saying APPLYING for the hash it saved.
    agent.close().await;
    let status = remote_status(h2.as_bytes(), APPLYING, "");
    let mut agent = RawAgent::connect(&server, uid16(7), &attrs, &host, Some(status)).await;
    // No push at first (it has the hash); once its apply clock runs out on
    // this connection, the target once more, which it answers at once.
    let (again, _) = agent.next_push().await;
    assert_eq!(again, h2);
    agent
        .report(remote_status(h2.as_bytes(), APPLIED, ""), Some(healthy(true)))
        .await;
    let g = server
        .wait_group("edge", "v2 complete", |g| {
            g["config_hash"] == h2.to_string().as_str() && g["rollout"]["phase"] == "complete"
        })
        .await;
    assert_eq!(failures(&g), 0, "{g}");
    server.stop().await;
}

#[tokio::test]
async fn agents_that_accept_remote_config_but_do_not_report_it_are_unsupported_and_do_not_block() {
    let policy = "  waves: [1, 100%]\n  bake: 0s\n  apply_timeout: 1s\n";
    let (v1, v2) = (collector_config("v1"), collector_config("v2"));
    let (repo, _tmp, server) = controller_on(policy, &v1).await;
    // The supervisor's defaults: AcceptsRemoteConfig without ReportsRemoteConfig.
    let silent = uid16(9);
    let mut ws = WsAgent::connect(server.opamp_addr()).await;
    ws.exchange(&AgentToServer {
        instance_uid: bytes::Bytes::copy_from_slice(&silent),
        capabilities: 0x1 | 0x2 | 0x4 | 0x800,
        agent_description: Some(description(
            &[("service.name", "otelcol-sim")],
            &[("host.name", "silent")],
        )),
        health: Some(healthy(true)),
        ..Default::default()
    })
    .await;
    let (_sim, stop) = simulate(&server, 3, |_| {});
    server
        .wait_group("edge", "v1 complete", |g| {
            g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == 3
        })
        .await;
    let uid = InstanceUid::from_wire(&silent).unwrap();
    let a = server
        .wait_agent_json(&uid, "unsupported", |a| a["state"] == "unsupported")
        .await;
    assert_eq!(
        a["unsupported_reason"],
        "accepts remote config but does not report its status (ReportsRemoteConfig is off)"
    );

    let g = roll_out(&repo, &server, policy, &v2).await;
    assert_eq!(g["rollout"]["phase"], "complete", "{g}");
    assert_eq!(g["agents"]["targeted"], 3, "not counted: {g}");
    // It was never offered a config: its replies carry none.
    let reply = ws
        .exchange(&AgentToServer {
            instance_uid: bytes::Bytes::copy_from_slice(&silent),
            sequence_num: 1,
            capabilities: 0x1 | 0x2 | 0x4 | 0x800,
            ..Default::default()
        })
        .await;
    assert!(reply.remote_config.is_none());
    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn an_http_agent_that_stops_polling_without_a_goodbye_goes_offline_and_does_not_block_its_wave() {
    let policy = "  waves: [100%]\n  bake: 0s\n  apply_timeout: 2s\n";
    let repo = GitRepo::new();
    let (v1, v2) = (collector_config("v1"), collector_config("v2"));
    commit_edge(&repo, policy, &v1, "v1");
    let (_tmp, state) = state_dir();
    let mut config = serve_config(repo.path(), &state);
    config.heartbeat_interval = Duration::from_millis(500);
    let server = TestServer::start_with(config).await;
    let (_sim, stop) = simulate(&server, 3, |c| {
        c.transport = TransportKind::Http;
        c.server = format!("http://{}/v1/opamp", server.opamp_addr());
        c.heartbeat = Duration::from_millis(300);
    });
    // A plain-HTTP agent that already runs v1, polls once more, then is gone.
    let gone = uid16(11);
    let hello = AgentToServer {
        instance_uid: bytes::Bytes::copy_from_slice(&gone),
        capabilities: common::SUPERVISOR_CAPS,
        agent_description: Some(description(
            &[("service.name", "otelcol-sim")],
            &[("host.name", "gone")],
        )),
        health: Some(healthy(true)),
        remote_config_status: Some(remote_status(edge_hash(&v1).as_bytes(), APPLIED, "")),
        ..Default::default()
    };
    post(server.opamp_addr(), &hello, Post::default())
        .await
        .server_to_agent();
    server
        .wait_group("edge", "v1 on four agents", |g| {
            g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == 4
        })
        .await;

    commit_edge(&repo, policy, &v2, "v2");
    server.sync().await;
    let uid = InstanceUid::from_wire(&gone).unwrap();
    let a = server
        .wait_agent_json(&uid, "offline", |a| a["connected"] == false)
        .await;
    assert_eq!(a["state"], "offline");
    let v2_hash = edge_hash(&v2).to_string();
    let g = server
        .wait_group("edge", "v2 ended", |g| {
            g["config_hash"] == v2_hash.as_str() && g["rollout"]["phase"] != "progressing"
        })
        .await;
    assert_eq!(g["rollout"]["phase"], "complete", "{g}");
    assert_eq!(failures(&g), 0, "never given the config: not a failure: {g}");
    assert_eq!(
        (g["agents"]["applied"].as_u64(), g["agents"]["offline"].as_u64()),
        (Some(3), Some(1))
    );
    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn a_one_percent_failure_budget_on_fifty_agents_halts_at_the_first_failure() {
    let policy = "  waves: [1, 100%]\n  bake: 0s\n  max_failures: 1%\n";
    let repo = GitRepo::new();
    let v1 = collector_config("v1");
    let bad = collector_config("v2 BREAK-ME");
    commit_edge(&repo, policy, &v1, "v1");
    let (_tmp, state) = state_dir();
    let server = TestServer::start_with(serve_config(repo.path(), &state)).await;
    let observer = Observer::start(&server);
    let (_sim, stop) = simulate(&server, 50, |c| c.fail_if_contains = Some("BREAK-ME".into()));
    server
        .wait_group("edge", "v1 on fifty agents", |g| {
            g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == 50
        })
        .await;

    commit_edge(&repo, policy, &bad, "bad");
    server.sync().await;
    let g = server
        .wait_group("edge", "halted", |g| g["rollout"]["phase"] == "halted")
        .await;
    assert_eq!(g["rollout"]["wave"], 1, "no wave after the canary: {g}");
    assert_eq!(failures(&g), 1);
    // Only the canary ever received the bad config.
    let bad_hash = edge_hash(&bad);
    let canary = failures_of(&g)[0].clone();
    observer.wait(&canary, bad_hash, |_| true).await;
    let agents: Vec<InstanceUid> = server.fleet().snapshot().agents.keys().cloned().collect();
    let reached: Vec<&InstanceUid> = agents.iter().filter(|u| observer.received(u, bad_hash)).collect();
    assert_eq!(reached, [&canary]);
    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn a_good_rollout_whose_agents_restart_during_the_bake_completes_without_a_failure() {
    // Half the agents restart every 2-6 s: a goodbye, then a new process that
    // resends its saved status and is unhealthy while its collector starts.
    let policy = "  waves: [1, 50%, 100%]\n  bake: 1s\n  apply_timeout: 5s\n";
    let (v1, v2) = (collector_config("v1"), collector_config("v2"));
    let (repo, _tmp, server) = controller_on("  waves: [100%]\n  bake: 0s\n", &v1).await;
    let (sim, stop) = simulate(&server, 4, |c| {
        c.restart_every = Some(Duration::from_secs(4));
        c.restart_fraction = 0.5;
        c.startup_time = Duration::from_millis(500);
    });
    let v1_hash = edge_hash(&v1).to_string();
    server
        .wait_group("edge", "v1 complete", |g| {
            g["config_hash"] == v1_hash.as_str() && g["rollout"]["phase"] == "complete"
        })
        .await;

    let before = sim.stats().borrow().restarts;
    let g = roll_out(&repo, &server, policy, &v2).await;
    assert_eq!(g["rollout"]["phase"], "complete", "{g}");
    assert_eq!(failures(&g), 0, "restarts are not failures: {g}");
    let during = sim.stats().borrow().restarts - before;
    assert!(during > 0, "agents restarted during the rollout");
    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn two_agents_sharing_one_uid_end_with_two_uids_both_in_sync() {
    let policy = "  waves: [100%]\n  bake: 0s\n";
    let (v1, v2) = (collector_config("v1"), collector_config("v2"));
    let (repo, _tmp, server) = controller_on(policy, &v1).await;
    // Two agents, the second a clone of the first: one uid, two hosts.
    let (_sim, stop) = simulate(&server, 2, |c| c.clone_fraction = 0.5);
    let g = server
        .wait_group("edge", "v1 on both", |g| {
            g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == 2
        })
        .await;
    assert_eq!(g["agents"]["targeted"], 2, "{g}");
    let metrics = String::from_utf8(server.api_get("/metrics").await.body).unwrap();
    assert_eq!(
        common::metric(&metrics, "opamp_gitops_opamp_uid_clashes_total"),
        Some(1)
    );

    commit_edge(&repo, policy, &v2, "v2");
    server.sync().await;
    let v2_hash = edge_hash(&v2).to_string();
    server
        .wait_group("edge", "v2 on both", |g| {
            g["config_hash"] == v2_hash.as_str() && g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == 2
        })
        .await;
    let agents = server.api_json("/api/v1/agents").await;
    let list = agents["agents"].as_array().unwrap();
    let connected: Vec<&serde_json::Value> = list.iter().filter(|a| a["connected"] == true).collect();
    assert_eq!(connected.len(), 2, "{agents}");
    assert_ne!(connected[0]["instance_uid"], connected[1]["instance_uid"]);
    assert!(connected.iter().all(|a| a["state"] == "in_sync"), "{agents}");
    stop.cancel();
    server.stop().await;
}
