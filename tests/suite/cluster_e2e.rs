//! Three replicas on a real PostgreSQL, behind a load balancer, with
//! simulated agents spread over them: one rollout in waves across all of
//! them, the same answers from every replica's API, and a leader that dies.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::balancer::Balancer;
use common::gitops::{GitRepo, collector_config, edge_hash};
use common::postgres::Postgres;
use common::process::{Serve, any_port};
use common::{Body, follow, http_request, wait_group_at};
use opamp_gitops::simulate;
use tokio_util::sync::CancellationToken;

/// Real processes, a real database: waits are longer than in-process ones.
const PATIENCE: Duration = Duration::from_secs(30);
const AGENTS: u64 = 12;

struct Replica {
    id: String,
    serve: Serve,
    _state: tempfile::TempDir,
}

impl Replica {
    async fn start(id: &str, repo: &GitRepo, pg: &Postgres, opamp: SocketAddr) -> Replica {
        let state = tempfile::tempdir().expect("temp dir");
        let url = pg.url();
        let args = [
            "--repo",
            repo.path().to_str().expect("utf-8"),
            "--state-dir",
            state.path().to_str().expect("utf-8"),
            "--store",
            &url,
            "--replica-id",
            id,
            "--lease-ttl",
            "3s",
            "--startup-grace",
            "0s",
            "--reconcile-tick",
            "100ms",
            "--poll-interval",
            "1h",
        ];
        let serve = Serve::start(&args, (opamp, any_port())).await;
        Replica {
            id: id.to_string(),
            serve,
            _state: state,
        }
    }

    fn api(&self) -> SocketAddr {
        self.serve.api
    }
}

/// `GET /api/v1/cluster` on `api`.
async fn cluster(api: SocketAddr) -> serde_json::Value {
    let r = http_request(api, "GET", "/api/v1/cluster", &[], Body::Empty).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    serde_json::from_slice(&r.body).expect("JSON")
}

/// Waits until the cluster seen from `api` satisfies `pred`; answers it.
async fn wait_cluster(api: SocketAddr, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    common::eventually_within(PATIENCE, what, async || {
        let c = cluster(api).await;
        pred(&c).then_some(c)
    })
    .await
}

fn connected_on(c: &serde_json::Value, id: &str) -> u64 {
    c["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["id"] == id)
        .and_then(|r| r["agents"].as_u64())
        .unwrap_or(0)
}

async fn post(api: SocketAddr, path: &str) -> u16 {
    http_request(api, "POST", path, &[], Body::Empty).await.status
}

/// Three replicas, each holding some of the agents, and the one that leads.
async fn three_replicas(repo: &GitRepo, pg: &Postgres) -> (Vec<Replica>, Balancer, String) {
    let mut replicas = Vec::new();
    for id in ["r1", "r2", "r3"] {
        replicas.push(Replica::start(id, repo, pg, any_port()).await);
    }
    let balancer = Balancer::start(replicas.iter().map(|r| r.serve.opamp).collect()).await;
    let c = wait_cluster(replicas[0].api(), "a leader and three live replicas", |c| {
        c["leader"].is_string() && c["replicas"].as_array().is_some_and(|r| r.iter().filter(|r| r["alive"] == true).count() == 3)
    })
    .await;
    let leader = c["leader"].as_str().expect("a leader").to_string();
    (replicas, balancer, leader)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_rolls_out_in_waves_over_the_agents_of_three_replicas() {
    let pg = Postgres::start();
    let repo = GitRepo::new();
    let v1 = collector_config("v1");
    repo.commit_edge("  waves: [100%]\n  bake: 0s\n", &v1, "v1");
    let (replicas, balancer, leader) = three_replicas(&repo, &pg).await;

    let mut config = simulate::Config::new(format!("ws://{}/v1/opamp", balancer.addr), AGENTS as usize);
    config.apply_delay = Duration::from_millis(20);
    let stop = CancellationToken::new();
    let _sim = simulate::start(config, stop.clone()).expect("simulation starts");
    let spread = wait_cluster(replicas[0].api(), "agents on every replica", |c| {
        let on: Vec<u64> = ["r1", "r2", "r3"].iter().map(|id| connected_on(c, id)).collect();
        on.iter().sum::<u64>() == AGENTS && on.iter().all(|&n| n > 0)
    })
    .await;

    // v1 reaches the agents of every replica; asked of a follower, which
    // forwards to the leader.
    let follower = replicas.iter().find(|r| r.id != leader).expect("a follower");
    let h1 = edge_hash(&v1).to_string();
    wait_group_at(follower.api(), "edge", "v1 on all agents", PATIENCE, |g| {
        g["config_hash"] == h1.as_str() && g["agents"]["applied"] == AGENTS
    })
    .await;

    // v2 in waves of 1, half and all, with a bake that never ends by itself.
    let v2 = collector_config("v2");
    repo.commit_edge("  waves: [1, 50%, 100%]\n  bake: 1h\n", &v2, "v2");
    let h2 = edge_hash(&v2).to_string();
    for r in &replicas {
        assert_eq!(post(r.api(), "/api/v1/sync").await, 200);
    }
    wait_group_at(follower.api(), "edge", "wave 1 applied", PATIENCE, |g| {
        g["config_hash"] == h2.as_str() && g["agents"]["applied"] == 1
    })
    .await;

    // A pause made on a follower takes effect.
    assert_eq!(post(follower.api(), "/api/v1/groups/edge/pause").await, 200);
    let paused = wait_group_at(replicas[0].api(), "edge", "paused", PATIENCE, |g| g["rollout"]["phase"] == "paused").await;
    assert_eq!(paused["rollout"]["wave"], 1, "{paused}");
    assert_eq!(post(follower.api(), "/api/v1/groups/edge/resume").await, 200);
    assert_eq!(post(follower.api(), "/api/v1/groups/edge/promote").await, 200);
    let wave2 = wait_group_at(follower.api(), "edge", "wave 2 applied", PATIENCE, |g| {
        g["rollout"]["wave"] == 2 && g["agents"]["applied"] == AGENTS / 2
    })
    .await;

    // Every replica answers the same rollout and the same fleet.
    for r in &replicas {
        let g = wait_group_at(r.api(), "edge", "wave 2", PATIENCE, |g| g["rollout"]["wave"] == 2).await;
        assert_eq!(g["rollout"]["started"], wave2["rollout"]["started"], "{g}");
        let agents = follow(r.api(), "/api/v1/agents", "the whole fleet", PATIENCE, |all| {
            let list = all["agents"].as_array()?;
            (list.len() as u64 == AGENTS).then(|| list.clone())
        })
        .await;
        assert!(agents.iter().all(|a| a["connected"] == true), "{agents:?}");
    }

    // Promoted through wave 3, whose bake is promoted too.
    assert_eq!(post(replicas[2].api(), "/api/v1/groups/edge/promote").await, 200);
    wait_group_at(follower.api(), "edge", "wave 3 applied", PATIENCE, |g| {
        g["rollout"]["wave"] == 3 && g["agents"]["applied"] == AGENTS
    })
    .await;
    assert_eq!(post(replicas[2].api(), "/api/v1/groups/edge/promote").await, 200);
    let done = wait_group_at(follower.api(), "edge", "complete", PATIENCE, |g| {
        g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == AGENTS
    })
    .await;
    assert_eq!(done["config_hash"], h2.as_str());
    // The agents that applied v2 were held by all three replicas.
    assert!(["r1", "r2", "r3"].iter().all(|id| connected_on(&spread, id) > 0));
    stop.cancel();
}
