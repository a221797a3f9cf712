//! Rollouts end to end: the real controller reading a real git repository,
//! simulated agents over real sockets, short bake times and timeouts.

mod common;

use std::time::Duration;

use common::gitops::{GitRepo, Observer, collector_config, edge_hash, serve_config, simulate, state_dir};
use common::{TestServer, eventually};
use opamp_gitops::fleet::RemoteConfigState;
use opamp_gitops::model::{GroupName, InstanceUid};
use opamp_gitops::reconcile::canary_order;

const FAST: &str = "  waves: [100%]\n  bake: 0s\n";

/// Connected agents in the group's canary order.
fn canaries(server: &TestServer) -> Vec<InstanceUid> {
    let snap = server.fleet().snapshot();
    let uids = snap
        .agents
        .values()
        .filter(|r| r.connected)
        .map(|r| r.uid.clone())
        .collect();
    canary_order(&GroupName::new("edge"), uids)
}

/// Starts a controller on a repository whose first config has reached `n`
/// simulated agents; answers the pieces a test needs.
async fn fleet_in_sync(
    n: usize,
    tweak: impl FnOnce(&mut opamp_gitops::simulate::Config),
) -> (
    GitRepo,
    tempfile::TempDir,
    TestServer,
    Observer,
    tokio_util::sync::CancellationToken,
) {
    let repo = GitRepo::new();
    let v1 = collector_config("v1");
    repo.commit_edge(FAST, &v1, "first config");
    let (tmp, state) = state_dir();
    let server = TestServer::start_with(serve_config(repo.path(), &state)).await;
    let observer = Observer::start(&server);
    let (_sim, stop) = simulate(&server, n, tweak);
    let hash = edge_hash(&v1).to_string();
    server
        .wait_group("edge", "v1 everywhere", |g| {
            g["config_hash"] == hash.as_str() && g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == n
        })
        .await;
    (repo, tmp, server, observer, stop)
}

#[tokio::test]
async fn a_change_reaches_every_agent_wave_by_wave() {
    let (repo, _tmp, server, observer, stop) = fleet_in_sync(50, |_| {}).await;
    let order = canaries(&server);
    assert_eq!(order.len(), 50);

    let v2 = collector_config("v2");
    let bake = Duration::from_millis(400);
    repo.commit_edge("  waves: [1, 10%, 50%, 100%]\n  bake: 400ms\n", &v2, "v2 in waves");
    server.sync().await;
    let h2 = edge_hash(&v2);
    let done = server
        .wait_group("edge", "v2 complete", |g| {
            g["config_hash"] == h2.to_string().as_str() && g["rollout"]["phase"] == "complete"
        })
        .await;
    assert_eq!(
        (done["rollout"]["wave"].as_u64(), done["rollout"]["waves"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(done["agents"]["applied"], 50);

    // Waves cover the first 1, 5, 25 and 50 agents of the canary order. No
    // agent of a wave received v2 before every agent of the waves before it
    // had applied it and the bake had passed. (Observations lag the real
    // events by at most one snapshot interval, hence the slack.)
    let slack = Duration::from_millis(100);
    let received = |uid| observer.first(uid, h2, |_| true).expect("every agent received v2");
    let applied = |uid| {
        observer
            .first(uid, h2, |s| s == RemoteConfigState::Applied)
            .expect("every agent applied v2")
    };
    for (lo, hi) in [(0, 1), (1, 5), (5, 25), (25, 50)] {
        if lo == 0 {
            continue;
        }
        let previous_done = order[..lo].iter().map(applied).max().expect("a previous wave");
        let first_of_wave = order[lo..hi].iter().map(received).min().expect("a wave");
        assert!(
            first_of_wave + slack >= previous_done + bake,
            "wave {lo}..{hi} opened {:?} after the previous wave was applied, before the bake of {bake:?}",
            first_of_wave.saturating_duration_since(previous_done)
        );
    }
    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn http_agents_converge_like_websocket_agents() {
    let (repo, _tmp, server, _observer, stop) = fleet_in_sync(12, |c| {
        c.transport = opamp_gitops::cli::TransportKind::Http;
        c.server = c.server.replace("ws://", "http://");
        c.heartbeat = Duration::from_millis(100);
    })
    .await;
    let v2 = collector_config("v2");
    repo.commit_edge("  waves: [1, 50%, 100%]\n  bake: 100ms\n", &v2, "v2");
    server.sync().await;
    let h2 = edge_hash(&v2).to_string();
    let done = server
        .wait_group("edge", "v2 complete", |g| {
            g["config_hash"] == h2.as_str() && g["rollout"]["phase"] == "complete"
        })
        .await;
    assert_eq!(done["agents"]["applied"], 12);
    let agents = eventually("every agent in sync", async || {
        let all = server.api_json("/api/v1/agents").await;
        let list = all["agents"].as_array()?.clone();
        list.iter()
            .all(|a| a["state"] == "in_sync" && a["transport"] == "http")
            .then_some(list)
    })
    .await;
    assert!(
        agents
            .iter()
            .all(|a| a["desired_config_hash"] == h2.as_str() && a["group"] == "edge")
    );
    stop.cancel();
    server.stop().await;
}
