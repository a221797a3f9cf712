//! Rollouts end to end: the real controller reading a real git repository,
//! simulated agents over real sockets, short bake times and timeouts.

use crate::common;

use std::time::Duration;

use common::gitops::{
    GitRepo, Observer, RawAgent, collector_config, edge_hash, fleet_yaml, group_yaml, hosts_named, selected_group_yaml,
    serve_config, simulate, state_dir,
};
use common::{SUPERVISOR_CAPS, TestServer, description, healthy, heartbeat, hello, remote_status, uid16};
use opamp_gitops::fleet::RemoteConfigState;
use opamp_gitops::model::{CommitId, ConfigHash, GroupName, InstanceUid};
use opamp_gitops::opamp::FIRST_REPLY_WAIT;
use opamp_gitops::proto::{AgentToServer, ComponentHealth, RemoteConfigStatuses};
use opamp_gitops::reconcile::{canary_order, order_key};
use std::time::Instant;

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
    let metrics = String::from_utf8_lossy(&server.api_get("/metrics").await.body).into_owned();
    let completed = common::metric(&metrics, "opamp_gitops_commit_to_complete_seconds_count");
    assert!(completed >= Some(2), "v1 and v2 completed: {completed:?}");

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
    for (lo, hi) in [(1, 5), (5, 25), (25, 50)] {
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
    let agents = server
        .wait_agents("every agent in sync", |list| {
            list.iter()
                .all(|a| a["state"] == "in_sync" && a["transport"] == "http")
                .then(|| list.to_vec())
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

const APPLIED: i32 = RemoteConfigStatuses::Applied as i32;
const FAILED: i32 = RemoteConfigStatuses::Failed as i32;

fn applied(s: RemoteConfigState) -> bool {
    s == RemoteConfigState::Applied
}

/// The group's rollout commit, as the API shows it.
fn rollout_commit(g: &serde_json::Value) -> &str {
    g["rollout"]["commit"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_failing_commit_halts_at_the_canary_and_rolls_it_back() {
    let (repo, _tmp, server, observer, stop) =
        fleet_in_sync(50, |c| c.fail_if_contains = Some("BREAK-ME".into())).await;
    let order = canaries(&server);
    let (v1, bad) = (collector_config("v1"), collector_config("BREAK-ME"));
    let (h1, hb) = (edge_hash(&v1), edge_hash(&bad));
    let policy = "  waves: [1, 10%, 50%, 100%]\n  bake: 100ms\n  max_failures: 0\n  on_failure: rollback\n";
    let sent = Instant::now();
    let c = repo.commit_edge(policy, &bad, "a config the agents refuse");
    assert_eq!(server.sync().await, c.as_str());

    let halted = server
        .wait_group("edge", "halted", |g| g["rollout"]["phase"] == "halted")
        .await;
    assert_eq!(rollout_commit(&halted), c.as_str());
    assert_eq!(
        (halted["rollout"]["wave"].as_u64(), halted["rollout"]["waves"].as_u64()),
        (Some(1), Some(4))
    );
    assert_eq!(halted["config_hash"], hb.to_string().as_str());
    assert_eq!(
        halted["stable_hash"],
        h1.to_string().as_str(),
        "stable stays the last completed config"
    );
    let failures = halted["rollout"]["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0]["agent"], order[0].to_string().as_str(), "the canary failed");
    let error = failures[0]["error"].as_str().expect("an error");
    assert!(error.contains("contains \"BREAK-ME\": refusing to start"), "{error}");

    // The canary is rolled back: it applies v1 again and is in sync with it.
    observer.wait_after(&order[0], h1, Some(sent), applied).await;
    let canary = server
        .wait_agent_json(&order[0], "in sync on v1", |a| a["state"] == "in_sync")
        .await;
    assert_eq!(canary["desired_config_hash"], h1.to_string().as_str());
    assert_eq!(canary["remote_config_status"]["status"], "APPLIED");

    // No further wave opens: a few bakes later it is still halted at wave 1,
    // and only the canary ever received the bad config.
    server.let_pass(Duration::from_millis(500)).await;
    let still = server.wait_group("edge", "halted", |_| true).await;
    assert_eq!(
        (still["rollout"]["phase"].as_str(), still["rollout"]["wave"].as_u64()),
        (Some("halted"), Some(1))
    );
    assert!(observer.received(&order[0], hb));
    for uid in &order[1..] {
        assert!(
            !observer.received(uid, hb),
            "{uid} is not the canary but received the bad config"
        );
    }

    // `git revert`: the stable config again. Nobody runs anything else, so it
    // completes at once, as a revert: one wave, stable and target equal.
    let r = repo.commit_edge(policy, &v1, "Revert \"a config the agents refuse\"");
    assert_eq!(server.sync().await, r.as_str());
    let reverted = server
        .wait_group("edge", "revert complete", |g| {
            rollout_commit(g) == r.as_str() && g["rollout"]["phase"] == "complete"
        })
        .await;
    assert_eq!(reverted["config_hash"], h1.to_string().as_str());
    assert_eq!(reverted["stable_hash"], h1.to_string().as_str());
    assert_eq!(reverted["rollout"]["waves"], 1);
    assert_eq!(reverted["rollout"]["failures"].as_array().map(Vec::len), Some(0));
    assert_eq!(reverted["agents"]["applied"], 50);
    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn a_revert_mid_rollout_reaches_every_changed_agent_at_once() {
    let (repo, _tmp, server, observer, stop) = fleet_in_sync(20, |_| {}).await;
    let order = canaries(&server);
    let (v1, v2) = (collector_config("v1"), collector_config("v2"));
    let (h1, h2) = (edge_hash(&v1), edge_hash(&v2));
    // A bake of an hour: only promote moves this rollout on.
    let policy = "  waves: [1, 20%, 100%]\n  bake: 1h\n";
    let c2 = repo.commit_edge(policy, &v2, "v2");
    server.sync().await;
    server
        .wait_group("edge", "the canary on v2", |g| {
            rollout_commit(g) == c2.as_str() && g["rollout"]["wave"] == 1 && g["agents"]["applied"] == 1
        })
        .await;
    let (status, _) = server.api_post("/api/v1/groups/edge/promote").await;
    assert_eq!(status, 200);
    server.wait_group("edge", "wave 2", |g| g["rollout"]["wave"] == 2).await;
    let (status, paused) = server.api_post("/api/v1/groups/edge/pause").await;
    assert_eq!((status, paused["rollout"]["phase"].as_str()), (200, Some("paused")));
    // Wave 2 covers 20% of 20: four agents run v2, the rest still run v1.
    server
        .wait_group("edge", "wave 2 applied", |g| g["agents"]["applied"] == 4)
        .await;
    for uid in &order[..4] {
        observer.wait(uid, h2, applied).await;
    }

    let sent = Instant::now();
    let r = repo.commit_edge(policy, &v1, "Revert \"v2\"");
    assert_eq!(server.sync().await, r.as_str());
    let done = server
        .wait_group("edge", "revert complete", |g| {
            rollout_commit(g) == r.as_str() && g["rollout"]["phase"] == "complete"
        })
        .await;
    // Every agent that ran v2 got v1 back together: no waves, no bake.
    let mut received = Vec::new();
    for uid in &order[..4] {
        observer.wait_after(uid, h1, Some(sent), applied).await;
        received.push(observer.first_after(uid, h1, Some(sent), |_| true).expect("v1 again"));
    }
    let first = *received.iter().min().expect("four agents");
    let last = *received.iter().max().expect("four agents");
    assert!(
        last - first < Duration::from_millis(500),
        "the revert reached them {:?} apart",
        last - first
    );
    for uid in &order[4..] {
        assert!(!observer.received(uid, h2), "{uid} never left v1");
    }
    assert_eq!(done["config_hash"], h1.to_string().as_str());
    assert_eq!(
        done["stable_hash"],
        h1.to_string().as_str(),
        "a revert: target and stable agree"
    );
    assert_eq!(
        (done["rollout"]["wave"].as_u64(), done["rollout"]["waves"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        done["rollout"]["actions"].as_array().map(Vec::len),
        Some(0),
        "a new rollout"
    );
    assert_eq!(done["agents"]["applied"], 20);
    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn agents_connecting_mid_rollout_get_stable_unless_their_place_is_in_an_opened_wave() {
    let (repo, _tmp, server, observer, stop) = fleet_in_sync(20, |_| {}).await;
    let order = canaries(&server);
    let group = GroupName::new("edge");
    let (v1, v2) = (collector_config("v1"), collector_config("v2"));
    let (h1, h2) = (edge_hash(&v1), edge_hash(&v2));
    let c2 = repo.commit_edge("  waves: [50%, 100%]\n  bake: 1h\n", &v2, "v2");
    server.sync().await;
    server
        .wait_group("edge", "wave 1 open", |g| {
            rollout_commit(g) == c2.as_str() && g["rollout"]["wave"] == 1
        })
        .await;
    let (status, _) = server.api_post("/api/v1/groups/edge/pause").await;
    assert_eq!(status, 200);
    server
        .wait_group("edge", "wave 1 applied", |g| g["agents"]["applied"] == 10)
        .await;

    // Wave 1 covers the first 10 of the 20 members; a late joiner is in it
    // when its key sorts before the first member not yet opened.
    let boundary = order_key(&group, &order[10]);
    let (_late, stop_late) = simulate(&server, 16, |c| {
        c.attrs.push(("host.name".into(), "late-{index}".into()))
    });
    let late = server
        .until("16 late joiners", async || {
            let l = hosts_named(&server, "late-");
            (l.len() == 16).then_some(l)
        })
        .await;
    let (mut inside, mut outside) = (0, 0);
    for uid in &late {
        let opened = order_key(&group, uid) < boundary;
        let (want, other, state) = if opened {
            inside += 1;
            (h2, h1, "in_sync")
        } else {
            outside += 1;
            (h1, h2, "pending")
        };
        observer.wait(uid, want, applied).await;
        assert!(
            !observer.received(uid, other),
            "{uid} (in an opened wave: {opened}) got the wrong config"
        );
        let a = server.wait_agent_json(uid, state, |a| a["state"] == state).await;
        assert_eq!(a["desired_config_hash"], want.to_string().as_str());
    }
    assert!(
        inside > 0 && outside > 0,
        "late joiners on both sides ({inside} in, {outside} out)"
    );
    let g = server.wait_group("edge", "paused", |_| true).await;
    assert_eq!(
        (g["rollout"]["phase"].as_str(), g["rollout"]["wave"].as_u64()),
        (Some("paused"), Some(1))
    );
    // Members of the unopened wave still wait on v1.
    for uid in &order[10..] {
        assert!(!observer.received(uid, h2), "{uid} waits for wave 2");
    }
    stop_late.cancel();
    stop.cancel();
    server.stop().await;
}

/// A controller on the standard layout (reconciling every `interval`) with
/// `config` in force and no agents yet, holding a first reply for the
/// config up to `first_reply_wait`.
async fn edge_without_agents(
    interval: &str,
    config: &str,
    first_reply_wait: Duration,
) -> (GitRepo, tempfile::TempDir, TestServer) {
    let repo = GitRepo::new();
    repo.commit_edge_every(interval, FAST, config, "v1");
    let (tmp, state) = state_dir();
    let mut serve = serve_config(repo.path(), &state);
    serve.first_reply_wait = first_reply_wait;
    let server = TestServer::start_with(serve).await;
    server
        .wait_group("edge", "complete with no agents", |g| {
            g["rollout"]["phase"] == "complete"
        })
        .await;
    (repo, tmp, server)
}

#[tokio::test]
async fn a_drifted_agent_is_pushed_again_each_reconcile_interval_until_it_complies() {
    let v1 = collector_config("v1");
    let h1 = edge_hash(&v1);
    let (_repo, _tmp, server) = edge_without_agents("1s", &v1, FIRST_REPLY_WAIT).await;

    // It claims to run something else.
    let other = [0xab; 32];
    let mut agent = RawAgent::connect(
        &server,
        uid16(41),
        &[("service.name", "otelcol-sim")],
        &[("host.name", "sim-raw")],
        Some(remote_status(&other, APPLIED, "")),
    )
    .await;
    let (hash, first) = agent.next_push().await;
    assert_eq!(hash, h1, "pushed the right config at once");
    // It ignores the push and keeps reporting the other hash.
    agent.report(remote_status(&other, APPLIED, ""), None).await;
    let (hash, second) = agent.next_push().await;
    assert_eq!(hash, h1);
    let gap = second - first;
    assert!(
        // Not before the interval; the upper bound leaves room for a busy machine.
        gap >= Duration::from_millis(900) && gap < Duration::from_secs(5),
        "pushed again after {gap:?}, the interval is 1s"
    );
    // It complies: no more pushes.
    agent
        .report(remote_status(h1.as_bytes(), APPLIED, ""), Some(healthy(true)))
        .await;
    agent
        .expect_no_push_until(server.let_pass(Duration::from_millis(1500)))
        .await;
    let a = server
        .wait_agent_json(&agent.uid, "in sync", |a| a["state"] == "in_sync")
        .await;
    assert_eq!(a["group"], "edge");
    agent.close().await;
    server.stop().await;
}

#[tokio::test]
async fn an_agent_that_comes_gets_its_first_config_in_the_reply_to_its_first_report() {
    let v1 = collector_config("v1");
    let h1 = edge_hash(&v1);
    // Room for a slow plan on a busy machine.
    let (_repo, _tmp, server) = edge_without_agents("1h", &v1, Duration::from_secs(5)).await;

    // One message answers its report and brings its config.
    let mut agent = server.ws().await;
    agent.send(&first_report(90, "otelcol-sim")).await;
    let first = agent.recv().await;
    assert_ne!(first.capabilities, 0, "the server's capabilities, in its first reply");
    let config = first.remote_config.expect("the config in the first reply");
    assert_eq!(ConfigHash::from_wire(&config.config_hash).expect("a hash"), h1);
    agent
        .send(&AgentToServer {
            remote_config_status: Some(remote_status(h1.as_bytes(), APPLIED, "")),
            ..heartbeat(&uid16(90), 1, SUPERVISOR_CAPS)
        })
        .await;
    let reply = agent.recv().await;
    assert!(reply.remote_config.is_none(), "the config came once");
    let uid = InstanceUid::from_wire(&uid16(90)).expect("a uid");
    server
        .wait_agent_json(&uid, "in sync", |a| a["state"] == "in_sync")
        .await;

    // An agent no group selects is never pushed a config: its reply comes
    // alone when the wait is over. One that speaks again meanwhile has it
    // first, before the answer to what it said next.
    let mut alone = server.ws().await;
    alone.send(&first_report(91, "something-else")).await;
    let reply = alone.recv().await;
    assert!(reply.remote_config.is_none() && reply.capabilities != 0, "{reply:?}");
    let mut eager = server.ws().await;
    eager.send(&first_report(92, "something-else")).await;
    eager
        .send(&AgentToServer {
            health: Some(healthy(false)),
            ..heartbeat(&uid16(92), 1, SUPERVISOR_CAPS)
        })
        .await;
    let (first, second) = (eager.recv().await, eager.recv().await);
    assert_ne!(first.capabilities, 0, "the first reply goes first: {first:?}");
    assert_eq!(second.capabilities, 0, "{second:?}");

    // One whose reply is held when the server stops has it before the close.
    let mut late = server.ws().await;
    late.send(&first_report(93, "something-else")).await;
    let uid = InstanceUid::from_wire(&uid16(93)).expect("a uid");
    server.wait_agent_json(&uid, "known", |_| true).await;
    for a in [agent, alone, eager] {
        a.close().await;
    }
    server.stop().await;
    let reply = late.recv().await;
    assert!(reply.remote_config.is_none() && reply.capabilities != 0, "{reply:?}");
}

#[tokio::test]
async fn a_first_reply_is_not_held_before_the_reconciler_plans() {
    let repo = GitRepo::new();
    repo.commit_edge(FAST, &collector_config("v1"), "v1");
    let (_tmp, state) = state_dir();
    let mut serve = serve_config(repo.path(), &state);
    // No plan within the test: the start-up grace outlasts it.
    serve.startup_grace = Duration::from_secs(3600);
    serve.first_reply_wait = Duration::from_secs(3600);
    let server = TestServer::start_with(serve).await;
    let mut agent = server.ws().await;
    agent.send(&first_report(94, "otelcol-sim")).await;
    let reply = agent.recv().await;
    assert!(reply.remote_config.is_none() && reply.capabilities != 0, "{reply:?}");
    agent.close().await;
    server.stop().await;
}

/// The whole first report of a new agent with this `service.name`.
fn first_report(n: u8, service: &str) -> AgentToServer {
    AgentToServer {
        agent_description: Some(description(&[("service.name", service)], &[("host.name", "new")])),
        ..hello(&uid16(n), 0)
    }
}

/// Commits `v2` for the edge group and waits for wave 1 of `policy` to open.
async fn wave_one(repo: &GitRepo, server: &TestServer, policy: &str, v2: &str) -> CommitId {
    let c2 = repo.commit_edge(policy, v2, "v2");
    server.sync().await;
    server
        .wait_group("edge", "wave 1 open", |g| {
            rollout_commit(g) == c2.as_str() && g["rollout"]["phase"] == "progressing" && g["rollout"]["wave"] == 1
        })
        .await;
    c2
}

#[tokio::test]
async fn pause_holds_a_rollout_past_its_bake_and_resume_continues_it() {
    let (repo, _tmp, server, observer, stop) = fleet_in_sync(10, |_| {}).await;
    let order = canaries(&server);
    let v2 = collector_config("v2");
    let h2 = edge_hash(&v2);
    let c2 = wave_one(&repo, &server, "  waves: [1, 50%, 100%]\n  bake: 1h\n", &v2).await;
    let (status, paused) = server.api_post("/api/v1/groups/edge/pause").await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(
        (paused["rollout"]["phase"].as_str(), paused["rollout"]["wave"].as_u64()),
        (Some("paused"), Some(1))
    );
    assert_eq!(paused["rollout"]["actions"][0]["action"], "pause");
    // Without API tokens, the actor is the one the request names, if any.
    assert_eq!(paused["rollout"]["actions"][0]["by"], "anonymous");
    // Pausing twice changes nothing.
    let (status, _) = server.api_post("/api/v1/groups/edge/pause").await;
    assert_eq!(status, 200);
    server
        .wait_group("edge", "canary applied", |g| g["agents"]["applied"] == 1)
        .await;

    // Shorten the bake (a policy change starts no rollout) and let it pass, paused.
    let bake = Duration::from_millis(200);
    repo.commit_edge("  waves: [1, 50%, 100%]\n  bake: 200ms\n", &v2, "shorter bake");
    server.sync().await;
    server.let_pass(bake * 3).await;
    let g = server.wait_group("edge", "paused", |_| true).await;
    assert_eq!(rollout_commit(&g), c2.as_str(), "a policy change is no new rollout");
    assert_eq!(
        (g["rollout"]["phase"].as_str(), g["rollout"]["wave"].as_u64()),
        (Some("paused"), Some(1))
    );
    for uid in &order[1..] {
        assert!(!observer.received(uid, h2), "no wave opens while paused");
    }

    let actor = [("X-Opamp-Gitops-Actor", "alice")];
    let answer = common::http_request(
        server.api_addr(),
        "POST",
        "/api/v1/groups/edge/resume",
        &actor,
        common::Body::Empty,
    )
    .await;
    let (status, resumed): (u16, serde_json::Value) =
        (answer.status, serde_json::from_slice(&answer.body).unwrap_or_default());
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["rollout"]["actions"][1]["by"], "alice", "{resumed}");
    assert_ne!(resumed["rollout"]["phase"], "paused");
    let done = server
        .wait_group("edge", "complete", |g| g["rollout"]["phase"] == "complete")
        .await;
    assert_eq!(done["agents"]["applied"], 10);
    let actions: Vec<&str> = done["rollout"]["actions"]
        .as_array()
        .expect("actions")
        .iter()
        .filter_map(|a| a["action"].as_str())
        .collect();
    assert_eq!(actions, ["pause", "resume"], "pausing twice is recorded once");
    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn promote_skips_the_bake_once_the_wave_is_applied() {
    let (repo, _tmp, server, _observer, stop) = fleet_in_sync(10, |_| {}).await;
    let (status, _) = server.api_post("/api/v1/groups/edge/promote").await;
    assert_eq!(status, 409, "no rollout in progress");
    let (status, _) = server.api_post("/api/v1/groups/nope/pause").await;
    assert_eq!(status, 404);

    let v2 = collector_config("v2");
    wave_one(&repo, &server, "  waves: [1, 50%, 100%]\n  bake: 1h\n", &v2).await;
    for (wave, applied) in [(1, 1), (2, 5)] {
        server
            .wait_group("edge", "wave applied", |g| {
                g["rollout"]["wave"] == wave && g["agents"]["applied"] == applied
            })
            .await;
        let (status, g) = server.api_post("/api/v1/groups/edge/promote").await;
        assert_eq!(status, 200, "{g}");
        server
            .wait_group("edge", "next wave", |g| g["rollout"]["wave"] == wave + 1)
            .await;
    }
    // Promote before the last wave is applied: it completes once it is.
    let (status, _) = server.api_post("/api/v1/groups/edge/promote").await;
    assert_eq!(status, 200);
    let done = server
        .wait_group("edge", "complete", |g| g["rollout"]["phase"] == "complete")
        .await;
    assert_eq!(done["agents"]["applied"], 10);
    let actions = done["rollout"]["actions"].as_array().expect("actions");
    assert_eq!(actions.len(), 3);
    assert!(actions.iter().all(|a| a["action"] == "promote" && a["at"].is_string()));
    let (status, body) = server.api_post("/api/v1/groups/edge/pause").await;
    assert_eq!(status, 409, "{body}");
    stop.cancel();
    server.stop().await;
}

/// A repository with the edge group (simulated agents) and a group "solo" of
/// the agents with `team: solo`, each on its own config.
fn commit_two_groups(repo: &GitRepo, solo_policy: &str, solo: &str, message: &str) -> CommitId {
    repo.commit(
        &[
            ("fleet.yaml", &fleet_yaml("1h")),
            ("groups/edge.yaml", &group_yaml(FAST)),
            ("configs/edge.yaml", &collector_config("v1")),
            (
                "groups/solo.yaml",
                &selected_group_yaml("solo", &[("team", "solo")], solo_policy),
            ),
            ("configs/solo.yaml", solo),
        ],
        message,
    )
}

/// A raw agent of the solo group that has applied `config`.
async fn solo_agent(server: &TestServer, n: u8, config: &str) -> RawAgent {
    let mut agent = RawAgent::connect(
        server,
        uid16(n),
        &[("service.name", "otelcol-contrib")],
        &[("host.name", &format!("solo-{n}")), ("team", "solo")],
        None,
    )
    .await;
    let (hash, _) = agent.next_push().await;
    assert_eq!(hash, edge_hash(config));
    agent
        .report(remote_status(hash.as_bytes(), APPLIED, ""), Some(healthy(true)))
        .await;
    agent
}

/// A controller on a repository whose solo group runs `s1` under `policy`,
/// with one raw agent of it per uid in `ns`, all having applied `s1`.
async fn solo_fleet(policy: &str, s1: &str, ns: &[u8]) -> (GitRepo, tempfile::TempDir, TestServer, Vec<RawAgent>) {
    let repo = GitRepo::new();
    commit_two_groups(&repo, policy, s1, "solo s1");
    let (tmp, state) = state_dir();
    let server = TestServer::start_with(serve_config(repo.path(), &state)).await;
    let mut agents = Vec::new();
    for &n in ns {
        agents.push(solo_agent(&server, n, s1).await);
    }
    server
        .wait_group("solo", "s1 applied", |g| {
            g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == ns.len()
        })
        .await;
    (repo, tmp, server, agents)
}

fn unhealthy(error: &str) -> ComponentHealth {
    ComponentHealth {
        healthy: false,
        last_error: error.into(),
        ..healthy(false)
    }
}

#[tokio::test]
async fn an_agent_unhealthy_after_applying_past_the_grace_fails_the_rollout() {
    let policy = "  waves: [100%]\n  bake: 0s\n  unhealthy_grace: 1s\n";
    let (s1, s2) = (collector_config("s1"), collector_config("s2"));
    let (repo, _tmp, server, mut agents) = solo_fleet(policy, &s1, &[42]).await;
    let mut agent = agents.remove(0);
    let (_sim, stop) = simulate(&server, 3, |_| {});
    let edge = server
        .wait_group("edge", "edge in sync", |g| g["agents"]["applied"] == 3)
        .await;

    let c2 = commit_two_groups(&repo, policy, &s2, "solo s2");
    server.sync().await;
    let (hash, _) = agent.next_push().await;
    assert_eq!(hash, edge_hash(&s2));
    let error = "exporter otlp: connection refused";
    agent
        .report(remote_status(hash.as_bytes(), APPLIED, ""), Some(unhealthy(error)))
        .await;
    let halted = server
        .wait_group("solo", "halted", |g| g["rollout"]["phase"] == "halted")
        .await;
    assert_eq!(rollout_commit(&halted), c2.as_str());
    let failures = halted["rollout"]["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0]["agent"], agent.uid.to_string().as_str());
    let shown = failures[0]["error"].as_str().expect("an error");
    assert!(shown.contains(error), "{shown}");
    // Rolled back to s1; the other group is untouched.
    let (hash, _) = agent.next_push().await;
    assert_eq!(hash, edge_hash(&s1));
    agent
        .report(remote_status(hash.as_bytes(), APPLIED, ""), Some(healthy(true)))
        .await;
    let back = server
        .wait_agent_json(&agent.uid, "in sync on s1", |a| a["state"] == "in_sync")
        .await;
    assert_eq!(back["desired_config_hash"], hash.to_string().as_str());
    let g = server.wait_group("solo", "halted", |_| true).await;
    assert_eq!(
        (g["rollout"]["phase"].as_str(), g["agents"]["failed"].as_u64()),
        (Some("halted"), Some(0))
    );
    let after = server.wait_group("edge", "edge", |_| true).await;
    assert_eq!(after["rollout"], edge["rollout"]);
    agent.close().await;
    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn an_agent_that_never_answers_a_push_fails_after_apply_timeout() {
    let policy = "  waves: [100%]\n  bake: 0s\n  apply_timeout: 1s\n";
    let (s1, s2) = (collector_config("s1"), collector_config("s2"));
    let (repo, _tmp, server, mut agents) = solo_fleet(policy, &s1, &[43]).await;
    let mut agent = agents.remove(0);

    commit_two_groups(&repo, policy, &s2, "solo s2");
    server.sync().await;
    let (hash, pushed) = agent.next_push().await;
    assert_eq!(hash, edge_hash(&s2));
    // Silence.
    let halted = server
        .wait_group("solo", "halted", |g| g["rollout"]["phase"] == "halted")
        .await;
    let waited = pushed.elapsed();
    assert!(waited >= Duration::from_millis(900), "failed {waited:?} after the push");
    let failures = halted["rollout"]["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0]["agent"], agent.uid.to_string().as_str());
    assert_eq!(failures[0]["error"], "not APPLIED within 1s of receiving the config");
    // It still runs s1, the stable config: nothing to roll back, no more pushes.
    agent
        .expect_no_push_until(server.let_pass(Duration::from_millis(300)))
        .await;
    agent.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_disconnected_wave_member_stops_blocking_after_apply_timeout() {
    let policy = "  waves: [100%]\n  bake: 0s\n  apply_timeout: 1s\n";
    let (s1, s2) = (collector_config("s1"), collector_config("s2"));
    let (repo, _tmp, server, mut agents) = solo_fleet(policy, &s1, &[44, 45]).await;
    let mut leaves = agents.remove(1);
    let mut stays = agents.remove(0);

    commit_two_groups(&repo, policy, &s2, "solo s2");
    server.sync().await;
    let h2 = edge_hash(&s2);
    let (hash, _) = stays.next_push().await;
    assert_eq!(hash, h2);
    stays
        .report(remote_status(h2.as_bytes(), APPLIED, ""), Some(healthy(true)))
        .await;
    let uid = leaves.uid.clone();
    let (hash, _) = leaves.next_push().await;
    assert_eq!(hash, h2);
    leaves.close().await;
    let gone = Instant::now();
    server
        .wait_group("solo", "waiting for the member that left", |g| {
            g["agents"]["offline"] == 1
        })
        .await;
    let done = server
        .wait_group("solo", "complete", |g| g["rollout"]["phase"] == "complete")
        .await;
    let waited = gone.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "stopped blocking {waited:?} after it left"
    );
    assert_eq!(
        done["rollout"]["failures"].as_array().map(Vec::len),
        Some(0),
        "leaving is no failure"
    );
    assert_eq!(done["stable_hash"], h2.to_string().as_str());

    // It gets s2 when it comes back.
    let mut back = RawAgent::connect(
        &server,
        uid16(45),
        &[("service.name", "otelcol-contrib")],
        &[("host.name", "solo-45"), ("team", "solo")],
        Some(remote_status(edge_hash(&s1).as_bytes(), APPLIED, "")),
    )
    .await;
    assert_eq!(back.uid, uid);
    let (hash, _) = back.next_push().await;
    assert_eq!(hash, h2);
    back.close().await;
    stays.close().await;
    server.stop().await;
}

/// A commit made while every agent of a group is away waits at its canary:
/// when the agents come back the canary alone gets it, and when it fails
/// the rollout halts before anyone else does.
#[tokio::test]
async fn a_commit_while_the_whole_group_is_away_still_meets_its_canary_first() {
    let repo = GitRepo::new();
    let policy = "  waves: [1, 100%]\n  bake: 0s\n  apply_timeout: 1s\n";
    let (v1, v2) = (collector_config("v1"), collector_config("v2 refused"));
    let (h1, h2) = (edge_hash(&v1), edge_hash(&v2));
    repo.commit_edge(policy, &v1, "v1");
    let (_tmp, state) = state_dir();
    let mut config = serve_config(repo.path(), &state);
    config.stall_after = Duration::from_secs(1);
    let server = TestServer::start_with(config).await;
    let wires: Vec<Vec<u8>> = (50..54).map(uid16).collect();
    let connect_all = || async {
        let mut agents = vec![];
        for wire in &wires {
            let status = Some(remote_status(h1.as_bytes(), APPLIED, ""));
            let agent = RawAgent::connect(&server, wire.clone(), &[("service.name", "otelcol-sim")], &[], status).await;
            agents.push(agent);
        }
        agents
    };
    let agents = connect_all().await;
    server
        .wait_group("edge", "v1 complete on four agents", |g| {
            g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == 4
        })
        .await;
    for a in agents {
        a.close().await;
    }
    server
        .wait_group("edge", "every agent away", |g| g["agents"]["offline"] == 4)
        .await;

    repo.commit_edge(policy, &v2, "v2 while everyone is away");
    server.sync().await;
    // Longer than apply_timeout: the away canary is left out of the count,
    // yet the rollout does not move past it.
    server.let_pass(Duration::from_secs(2)).await;
    let g = server
        .wait_group("edge", "the v2 rollout", |g| g["config_hash"] == h2.to_string())
        .await;
    assert_eq!(
        (g["rollout"]["phase"].as_str(), g["rollout"]["wave"].as_u64()),
        (Some("progressing"), Some(1)),
        "{g}"
    );
    // Waiting longer than --stall-after, it shows as stalled.
    assert_eq!(g["rollout"]["stalled"], true, "{g}");
    assert_eq!(g["rollout"]["waiting_since"], g["rollout"]["wave_opened"], "{g}");
    let metrics = String::from_utf8(server.api_get("/metrics").await.body).expect("utf-8");
    assert_eq!(
        common::metric(&metrics, "opamp_gitops_group_rollout_stalled{group=\"edge\"}"),
        Some(1),
        "{metrics}"
    );

    let mut agents = connect_all().await;
    let order = canary_order(&GroupName::new("edge"), agents.iter().map(|a| a.uid.clone()).collect());
    let canary = agents.iter().position(|a| a.uid == order[0]).unwrap();
    let (pushed, _) = agents[canary].next_push().await;
    assert_eq!(pushed, h2, "the canary gets v2");
    agents[canary]
        .report(remote_status(h2.as_bytes(), FAILED, "refused"), None)
        .await;
    server
        .wait_group("edge", "halted", |g| g["rollout"]["phase"] == "halted")
        .await;
    server.let_pass(Duration::from_millis(500)).await;
    let fleet = server.fleet().snapshot();
    for agent in agents.iter().filter(|a| a.uid != order[0]) {
        let rec = fleet.get(&agent.uid).expect("known");
        assert!(rec.connected);
        assert!(
            rec.delivered.is_none_or(|d| d.hash != h2),
            "{} never received v2: {:?}",
            agent.uid,
            rec.delivered
        );
    }
    server.stop().await;
}

/// An agent whose connection drops each time it is sent the config (as an
/// agent does with a config larger than it accepts) fails after three.
#[tokio::test]
async fn an_agent_that_drops_its_connection_on_every_push_is_counted_failed() {
    let repo = GitRepo::new();
    let policy = "  waves: [100%]\n  bake: 0s\n  apply_timeout: 1h\n";
    let (v1, v2) = (collector_config("v1"), collector_config("v2 too large"));
    let h1 = edge_hash(&v1);
    repo.commit_edge(policy, &v1, "v1");
    let (_tmp, state) = state_dir();
    let server = TestServer::start_with(serve_config(repo.path(), &state)).await;
    let connect = || async {
        let status = Some(remote_status(h1.as_bytes(), APPLIED, ""));
        RawAgent::connect(&server, uid16(60), &[("service.name", "otelcol-sim")], &[], status).await
    };
    let agent = connect().await;
    server
        .wait_group("edge", "v1 complete", |g| g["rollout"]["phase"] == "complete")
        .await;
    repo.commit_edge(policy, &v2, "v2");
    server.sync().await;
    let mut agent = agent;
    for _ in 0..3 {
        let (hash, _) = agent.next_push().await;
        assert_eq!(hash, edge_hash(&v2));
        agent.close().await;
        agent = connect().await;
    }
    let g = server
        .wait_group("edge", "halted", |g| g["rollout"]["phase"] == "halted")
        .await;
    let error = g["rollout"]["failures"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("closed each time the config reached it (3 times)"),
        "{g}"
    );
    agent.close().await;
    server.stop().await;
}

/// Messages the controller received so far, over both transports.
async fn messages_received(server: &TestServer) -> u64 {
    let text = String::from_utf8(server.api_get("/metrics").await.body).unwrap();
    text.lines()
        .filter(|l| l.starts_with("opamp_gitops_opamp_messages_received_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn plans_made(server: &TestServer) -> u64 {
    counter(server, "opamp_gitops_plans_total").await
}

/// A counter of the controller's `/metrics`.
async fn counter(server: &TestServer, name: &str) -> u64 {
    let text = String::from_utf8(server.api_get("/metrics").await.body).unwrap();
    common::metric(&text, name).unwrap_or_else(|| panic!("no {name}"))
}

/// A controller with no periodic plan, on a repository whose first commit
/// gives `v1` under `policy`, and `agents` simulated agents heartbeating
/// every 50 ms.
async fn untimed_fleet(
    policy: &str,
    v1: &str,
    agents: usize,
) -> (
    GitRepo,
    tempfile::TempDir,
    TestServer,
    opamp_gitops::simulate::Simulation,
    tokio_util::sync::CancellationToken,
) {
    let repo = GitRepo::new();
    repo.commit_edge(policy, v1, "first config");
    let (tmp, state) = state_dir();
    let mut config = serve_config(repo.path(), &state);
    config.reconcile_tick = None;
    let server = TestServer::start_with(config).await;
    let (sim, stop) = simulate(&server, agents, |c| c.heartbeat = Duration::from_millis(50));
    (repo, tmp, server, sim, stop)
}

/// Waits until the controller has received `n` more messages.
async fn let_messages_pass(server: &TestServer, n: u64) {
    let start = messages_received(server).await;
    common::eventually(&format!("{n} more messages"), async || {
        (messages_received(server).await >= start + n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn heartbeats_make_no_plan_and_no_snapshot_and_a_bake_ends_on_its_deadline() {
    let v1 = collector_config("v1");
    // The bake ends at the plan's deadline: no periodic plan is there to see it.
    let (_repo, _tmp, server, _sim, stop) = untimed_fleet("  waves: [1, 100%]\n  bake: 300ms\n", &v1, 10).await;
    let hash = edge_hash(&v1).to_string();
    server
        .wait_group("edge", "v1 everywhere after the bake", |g| {
            g["config_hash"] == hash.as_str() && g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == 10
        })
        .await;

    // Idle: every agent heartbeats, nothing changes. The last reports of the
    // rollout may still be settling; after them, nothing is planned.
    let_messages_pass(&server, 100).await;
    let plans = plans_made(&server).await;
    let snapshot = server.fleet().snapshot().version;
    let quiet_since = std::time::SystemTime::now();
    let_messages_pass(&server, 200).await;
    assert_eq!(plans_made(&server).await, plans, "heartbeats made plans");
    assert_eq!(
        server.fleet().snapshot().version,
        snapshot,
        "heartbeats made fleet snapshots"
    );
    // Yet the API shows each agent's newest heartbeat.
    let agents = server.api_json("/api/v1/agents").await;
    for a in agents["agents"].as_array().unwrap() {
        let seen = opamp_gitops::rfc3339::parse(a["last_seen"].as_str().unwrap()).unwrap();
        assert!(seen >= quiet_since, "{a}");
    }
    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn a_report_of_one_agent_is_planned_for_that_agent_alone() {
    let v1 = collector_config("v1");
    let (_repo, _tmp, server, _sim, stop) = untimed_fleet("  waves: [100%]\n  bake: 0s\n", &v1, 30).await;
    let h1 = edge_hash(&v1);
    let status = Some(remote_status(h1.as_bytes(), APPLIED, ""));
    let mut agent = RawAgent::connect(&server, uid16(70), &[("service.name", "otelcol-sim")], &[], status).await;
    server
        .wait_group("edge", "v1 on all 31 agents", |g| {
            g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == 31
        })
        .await;
    // The last reports of the rollout settle; heartbeats plan nothing.
    let_messages_pass(&server, 100).await;
    let (plans, full, decided) = (
        plans_made(&server).await,
        counter(&server, "opamp_gitops_plans_full_total").await,
        counter(&server, "opamp_gitops_plan_agents_total").await,
    );

    agent
        .report(
            remote_status(h1.as_bytes(), APPLIED, ""),
            Some(unhealthy("exporter failing")),
        )
        .await;
    let path = format!("/api/v1/agents/{}", agent.uid);
    common::eventually("the agent's report planned", async || {
        let a = server.api_json(&path).await;
        (a["state"] == "applying").then_some(())
    })
    .await;
    assert!(plans_made(&server).await > plans);
    assert_eq!(
        counter(&server, "opamp_gitops_plans_full_total").await,
        full,
        "a plan of the whole fleet"
    );
    let more = counter(&server, "opamp_gitops_plan_agents_total").await - decided;
    assert!((1..=2).contains(&more), "{more} agents decided for one report");
    stop.cancel();
    server.stop().await;
}
