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
    /// `repo` as `--repo` takes it: a path or a URL; `extra` arguments
    /// are added.
    async fn start(id: &str, repo: &str, pg: &Postgres, opamp: SocketAddr, extra: &[&str]) -> Replica {
        let state = tempfile::tempdir().expect("temp dir");
        let url = pg.url();
        let mut args = vec![
            "--repo",
            repo,
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
            // Tells whose notes are whose.
            "--notes-author-name",
            id,
        ];
        args.extend(extra);
        let serve = Serve::start_within(&args, (opamp, any_port()), PATIENCE).await;
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

/// Waits until a replica leads, as the cluster seen from `api` says and as
/// the leader itself says; answers its id.
async fn settled_leader(replicas: &[Replica], api: SocketAddr, what: &str, pred: impl Fn(&str) -> bool) -> String {
    // The leader listed and the one that knows it leads, read together: a
    // lease row may still name a replica that has just let it go.
    let what = format!("{what}, that knows it leads");
    common::eventually_within(PATIENCE, &what, async || {
        let c = cluster(api).await;
        let id = live_leader(&c).filter(|id| pred(id))?.to_string();
        let leader = replicas.iter().find(|r| r.id == id).expect("a listed replica leads");
        (metric_at(leader.api(), "opamp_gitops_cluster_leader").await == 1).then_some(id)
    })
    .await
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

/// The replica that leads, when its own lease runs too (so the others
/// forward to it).
fn live_leader(c: &serde_json::Value) -> Option<&str> {
    let leader = c["leader"].as_str()?;
    c["replicas"]
        .as_array()?
        .iter()
        .any(|r| r["id"] == leader && r["alive"] == true)
        .then_some(leader)
}

async fn post(api: SocketAddr, path: &str) -> u16 {
    http_request(api, "POST", path, &[], Body::Empty).await.status
}

/// Promotes the rollout of `hash` that [`at_wave_two`] left at wave 2
/// through wave 3, whose bake is promoted too, to complete, on `api`.
async fn promote_to_complete(api: SocketAddr, hash: &str) {
    assert_eq!(post(api, "/api/v1/groups/edge/promote").await, 200);
    wait_group_at(api, "edge", "wave 3 applied", PATIENCE, |g| {
        g["rollout"]["wave"] == 3 && g["agents"]["applied"] == AGENTS
    })
    .await;
    assert_eq!(post(api, "/api/v1/groups/edge/promote").await, 200);
    let done = wait_group_at(api, "edge", "complete", PATIENCE, |g| {
        g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == AGENTS
    })
    .await;
    assert_eq!(done["config_hash"], hash);
}

/// AGENTS simulated agents that connect to `addr`; the token stops them.
fn simulated_agents(addr: SocketAddr) -> (simulate::Simulation, CancellationToken) {
    let mut config = simulate::Config::new(format!("ws://{addr}/v1/opamp"), AGENTS as usize);
    config.apply_delay = Duration::from_millis(20);
    let stop = CancellationToken::new();
    (simulate::start(config, stop.clone()).expect("simulation starts"), stop)
}

/// Three replicas of `repo` (as `--repo` takes it), and the one that leads.
async fn three_replicas(repo: &str, pg: &Postgres) -> (Vec<Replica>, Balancer, String) {
    let mut replicas = Vec::new();
    for id in ["r1", "r2", "r3"] {
        replicas.push(Replica::start(id, repo, pg, any_port(), &[]).await);
    }
    let balancer = Balancer::start(replicas.iter().map(|r| r.serve.opamp).collect()).await;
    wait_cluster(replicas[0].api(), "three live replicas", |c| {
        c["replicas"]
            .as_array()
            .is_some_and(|r| r.iter().filter(|r| r["alive"] == true).count() == 3)
    })
    .await;
    let leader = settled_leader(&replicas, replicas[0].api(), "a leader", |_| true).await;
    (replicas, balancer, leader)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_rolls_out_in_waves_over_the_agents_of_three_replicas() {
    let pg = Postgres::start();
    let repo = GitRepo::new();
    let v1 = collector_config("v1");
    repo.commit_edge("  waves: [100%]\n  bake: 0s\n", &v1, "v1");
    let (replicas, balancer, leader) = three_replicas(repo.path().to_str().expect("utf-8"), &pg).await;

    let (_sim, stop) = simulated_agents(balancer.addr);
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

    // A pause made on a follower takes effect, also from the web page (a
    // browser sends its page's origin).
    let origin = format!("http://{}", follower.api());
    let paused = http_request(
        follower.api(),
        "POST",
        "/api/v1/groups/edge/pause",
        &[("Origin", &origin)],
        Body::Empty,
    )
    .await;
    assert_eq!(paused.status, 200, "{}", String::from_utf8_lossy(&paused.body));
    let paused = wait_group_at(replicas[0].api(), "edge", "paused", PATIENCE, |g| {
        g["rollout"]["phase"] == "paused"
    })
    .await;
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

    promote_to_complete(replicas[2].api(), &h2).await;
    // The agents that applied v2 were held by all three replicas.
    assert!(["r1", "r2", "r3"].iter().all(|id| connected_on(&spread, id) > 0));
    stop.cancel();
}

/// The value of `name` (with its labels, as in `name{label="v"}`) in the
/// `/metrics` of `api`; 0 when absent.
async fn metric_at(api: SocketAddr, name: &str) -> u64 {
    let r = http_request(api, "GET", "/metrics", &[], Body::Empty).await;
    let text = String::from_utf8_lossy(&r.body);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

const WAVE_PUSHES: &str = "opamp_gitops_pushes_total{reason=\"wave\"}";

/// Commits v1 to every agent, then v2 in waves of 1, half and all with a bake
/// that never ends by itself, and promotes it to wave 2. Answers the group then.
async fn at_wave_two(
    repo: &GitRepo,
    replicas: &[Replica],
    leader: &str,
    sim_addr: SocketAddr,
) -> (serde_json::Value, String, CancellationToken, simulate::Simulation) {
    let api = replicas.iter().find(|r| r.id != leader).expect("a follower").api();
    let (sim, stop) = simulated_agents(sim_addr);
    wait_cluster(api, "agents on every replica", |c| {
        ["r1", "r2", "r3"].iter().all(|id| connected_on(c, id) > 0)
            && ["r1", "r2", "r3"].iter().map(|id| connected_on(c, id)).sum::<u64>() == AGENTS
    })
    .await;
    let v2 = collector_config("v2");
    repo.commit_edge("  waves: [1, 50%, 100%]\n  bake: 1h\n", &v2, "v2");
    let h2 = edge_hash(&v2).to_string();
    for r in replicas {
        assert_eq!(post(r.api(), "/api/v1/sync").await, 200);
    }
    wait_group_at(api, "edge", "wave 1 applied", PATIENCE, |g| {
        g["config_hash"] == h2.as_str() && g["agents"]["applied"] == 1
    })
    .await;
    assert_eq!(post(api, "/api/v1/groups/edge/promote").await, 200);
    let group = wait_group_at(api, "edge", "wave 2 applied", PATIENCE, |g| {
        g["rollout"]["wave"] == 2 && g["agents"]["applied"] == AGENTS / 2
    })
    .await;
    (group, h2, stop, sim)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_leader_is_replaced_and_the_rollout_goes_on_from_the_same_wave() {
    let pg = Postgres::start();
    let repo = GitRepo::new();
    repo.commit_edge("  waves: [100%]\n  bake: 0s\n", &collector_config("v1"), "v1");
    // A remote: each replica fetches it (every hour, or when asked), so the
    // followers' copies lag behind the leader's, which is the one synced.
    let url = format!("file://{}", repo.path().display());
    let (mut replicas, balancer, leader) = three_replicas(&url, &pg).await;
    let (before, h2, stop, _sim) = at_wave_two(&repo, &replicas, &leader, balancer.addr).await;

    // SIGKILL during wave 2's bake: nothing of the leader's shutdown runs.
    let dead = replicas.iter().position(|r| r.id == leader).expect("the leader");
    let killed = tokio::time::Instant::now();
    replicas.remove(dead).serve.kill().await;
    let api = replicas[0].api();
    let id = settled_leader(&replicas, api, "another leader", |l| l != leader).await;
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_secs(3 + 5),
        "a new leader within TTL + 5 s, took {took:?}"
    );
    let new_leader = replicas.iter().find(|r| r.id == id).expect("a live replica leads");

    // The dead replica's agents reconnect to the others.
    wait_cluster(api, "every agent on the two live replicas", |c| {
        replicas.iter().map(|r| connected_on(c, &r.id)).sum::<u64>() == AGENTS
    })
    .await;
    let after = wait_group_at(
        api,
        "edge",
        "the rollout resumed with every agent back",
        PATIENCE,
        |g| g["agents"]["applied"] == AGENTS / 2 && g["agents"]["offline"] == 0,
    )
    .await;
    common::process::assert_resumed(&before, &after);
    common::let_pass_at(new_leader.api(), Duration::from_secs(1), PATIENCE).await;
    assert_eq!(
        metric_at(new_leader.api(), WAVE_PUSHES).await,
        0,
        "no agent of a completed wave is pushed again"
    );

    promote_to_complete(api, &h2).await;
    assert_eq!(
        metric_at(new_leader.api(), WAVE_PUSHES).await,
        AGENTS - AGENTS / 2,
        "only wave 3's agents were pushed by the new leader"
    );
    stop.cancel();
}

/// The note on `commit`, once there is one.
fn note_of(repo: &GitRepo, commit: &str) -> Option<String> {
    let out = std::process::Command::new("git")
        .current_dir(repo.path())
        .args(["notes", "--ref=opamp-gitops", "show", commit])
        .output()
        .expect("git runs");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How many notes commits `author` made.
fn notes_by(repo: &GitRepo, author: &str) -> usize {
    common::gitops::git(repo.path(), &["log", "--format=%an", "refs/notes/opamp-gitops"])
        .lines()
        .filter(|a| *a == author)
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_paused_past_its_lease_writes_nothing_when_it_wakes_and_steps_down() {
    let pg = Postgres::start();
    let repo = GitRepo::new();
    let v1 = collector_config("v1");
    repo.commit_edge("  waves: [100%]\n  bake: 0s\n", &v1, "v1");
    let (replicas, balancer, leader) = three_replicas(repo.path().to_str().expect("utf-8"), &pg).await;
    let (_sim, stop) = simulated_agents(balancer.addr);
    let follower = replicas.iter().find(|r| r.id != leader).expect("a follower");
    let h1 = edge_hash(&v1).to_string();
    wait_group_at(follower.api(), "edge", "v1 on all agents", PATIENCE, |g| {
        g["config_hash"] == h1.as_str() && g["agents"]["applied"] == AGENTS
    })
    .await;
    assert!(notes_by(&repo, &leader) > 0, "the leader wrote v1's note");

    // v2 with a short bake: when the paused leader wakes, its bake is long
    // over and, were it still to act, it would open the next wave.
    let v2 = collector_config("v2");
    let c2 = repo.commit_edge("  waves: [1, 100%]\n  bake: 2s\n", &v2, "v2");
    let h2 = edge_hash(&v2).to_string();
    for r in &replicas {
        assert_eq!(post(r.api(), "/api/v1/sync").await, 200);
    }
    // Paused once the note of the applied canary is written: nothing else
    // is to be written until the bake ends, so no write is under way.
    common::eventually_within(PATIENCE, "the leader's note of the canary applied", async || {
        let note = note_of(&repo, c2.as_str())?;
        let author = common::gitops::git(repo.path(), &["log", "-1", "--format=%an", "refs/notes/opamp-gitops"]);
        (author.trim() == leader && note.contains("applied: 1,") && note.contains("wave: 1\n")).then_some(())
    })
    .await;
    let paused = replicas.iter().find(|r| r.id == leader).expect("the leader");
    paused.serve.signal("STOP");
    let notes_before = notes_by(&repo, &leader);
    let old_epoch = cluster(follower.api()).await["epoch"].as_i64().expect("an epoch");
    settled_leader(&replicas, follower.api(), "another leader", |l| l != leader).await;
    let new_epoch = cluster(follower.api()).await["epoch"].as_i64().expect("an epoch");
    assert!(new_epoch > old_epoch, "a new holder, a new epoch");
    // The new leader goes on with the rollout (its agents on the paused
    // replica are offline meanwhile; the canary may be one of them).
    wait_group_at(follower.api(), "edge", "the rollout taken over", PATIENCE, |g| {
        g["config_hash"] == h2.as_str() && g["agents"]["offline"].as_u64().is_some_and(|n| n > 0)
    })
    .await;

    paused.serve.signal("CONT");
    // Once awake, its agents are back and it delivers the new leader's
    // pushes, so the rollout completes on every agent.
    wait_group_at(follower.api(), "edge", "v2 complete on all agents", PATIENCE, |g| {
        g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == AGENTS
    })
    .await;
    common::eventually_within(PATIENCE, "the woken replica to step down", async || {
        (metric_at(paused.api(), "opamp_gitops_cluster_epoch").await == new_epoch as u64
            && metric_at(paused.api(), "opamp_gitops_cluster_leader").await == 0)
            .then_some(())
    })
    .await;
    assert_eq!(
        notes_by(&repo, &leader),
        notes_before,
        "no note written after the lease was lost"
    );
    assert_eq!(
        pg.sql("SELECT epoch FROM opamp_rollout_state"),
        new_epoch.to_string(),
        "the rollout state belongs to the new leader's epoch"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_mid_rollout_loses_nothing_and_the_rollout_completes() {
    let pg = Postgres::start();
    let repo = GitRepo::new();
    repo.commit_edge("  waves: [100%]\n  bake: 0s\n", &collector_config("v1"), "v1");
    let (replicas, balancer, leader) = three_replicas(repo.path().to_str().expect("utf-8"), &pg).await;
    let (before, h2, stop, _sim) = at_wave_two(&repo, &replicas, &leader, balancer.addr).await;
    let leading = replicas.iter().find(|r| r.id == leader).expect("the leader");

    // Down long enough for the leader to let its lease go.
    pg.stop();
    common::eventually_within(PATIENCE, "the leader to step down", async || {
        (metric_at(leading.api(), "opamp_gitops_cluster_leader").await == 0).then_some(())
    })
    .await;
    pg.up();

    let api = replicas[0].api();
    settled_leader(&replicas, api, "a leader again", |_| true).await;
    let after = wait_group_at(api, "edge", "the rollout back, every agent listed", PATIENCE, |g| {
        g["agents"]["applied"] == AGENTS / 2 && g["agents"]["offline"] == 0
    })
    .await;
    common::process::assert_resumed(&before, &after);
    promote_to_complete(api, &h2).await;
    stop.cancel();
}

/// The manifests in `deploy/kubernetes/`: three replicas whose arguments
/// `serve` accepts, each named after its pod and advertising its pod's
/// address, the database URL from the Secret, and services that select them.
#[test]
fn the_kubernetes_manifests_run_three_replicas_that_serve_accepts() {
    use clap::Parser as _;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let docs: Vec<serde_yaml_ng::Value> = ["statefulset.yaml", "services.yaml"]
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(dir.join(f)).expect("a manifest");
            serde_yaml_ng::Deserializer::from_str(&text)
                .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
                .collect::<Vec<serde_yaml_ng::Value>>()
        })
        .collect();
    let set = docs.iter().find(|d| d["kind"] == "StatefulSet").expect("a StatefulSet");
    assert_eq!(set["spec"]["replicas"], 3);
    let labels = &set["spec"]["template"]["metadata"]["labels"];
    let container = &set["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| {
            a.as_str()
                .expect("text")
                .replace("$(POD_NAME)", "opamp-gitops-1")
                .replace("$(POD_IP)", "10.0.0.7")
        })
        .collect();
    // The database URL comes from the environment (the Secret).
    let from_env = "--store=postgres://opamp@db:5432/opamp".to_string();
    let command_line = std::iter::once("opamp-gitops".to_string())
        .chain(args)
        .chain([from_env]);
    let cli = opamp_gitops::cli::Cli::try_parse_from(command_line)
        .unwrap_or_else(|e| panic!("serve refuses the manifest's arguments: {e}"));
    let opamp_gitops::cli::Command::Serve(serve) = cli.command else {
        panic!("the container runs serve")
    };
    assert_eq!(serve.replica_id.as_deref(), Some("opamp-gitops-1"));
    assert_eq!(serve.advertise_api.as_deref(), Some("http://10.0.0.7:4321"));
    let store = container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "OPAMP_GITOPS_STORE")
        .expect("the database URL in the environment");
    assert_eq!(store["valueFrom"]["secretKeyRef"]["name"], "opamp-gitops-store");
    let services: Vec<_> = docs.iter().filter(|d| d["kind"] == "Service").collect();
    assert_eq!(services.len(), 3);
    for s in services {
        assert_eq!(&s["spec"]["selector"], labels, "{s:?} selects the replicas");
    }
}

/// The fencing of the rollout state, against the database alone: once a
/// newer epoch has claimed it, a save of an older one changes nothing.
#[tokio::test]
async fn a_save_of_an_older_epoch_changes_nothing_once_a_newer_one_claimed_the_state() {
    use opamp_gitops::cluster::{Database, DbError, Fence, StateStore, db::Db};
    use opamp_gitops::model::GroupName;
    use opamp_gitops::reconcile::{GroupState, RolloutState};

    let pg = Postgres::start();
    let tls = opamp_gitops::tls::client_trusting(None).expect("the system's certificates");
    let database = Database::new(pg.url(), tls);
    Db::connect(&database)
        .await
        .expect("connects")
        .migrate()
        .await
        .expect("tables");
    let lead = |holder: &str, epoch: i64| {
        pg.sql(&format!(
            "UPDATE opamp_leader SET holder = '{holder}', epoch = {epoch}, expires_at = now() + interval '1 minute'"
        ))
    };
    let fence = |epoch| Fence {
        epoch,
        until: tokio::time::Instant::now() + Duration::from_secs(60),
    };
    let state = |group: &str| {
        let mut s = RolloutState::default();
        s.groups.insert(GroupName::new(group), GroupState::default());
        s
    };

    lead("r1", 1);
    let mut first = StateStore::new(database.clone(), "r1".into());
    assert_eq!(first.claim(fence(1)).await.expect("claimed"), None, "nothing saved yet");
    first.save(fence(1), &state("a")).await.expect("saved by the leader");

    lead("r2", 2);
    let mut second = StateStore::new(database, "r2".into());
    assert_eq!(second.claim(fence(2)).await.expect("claimed"), Some(state("a")));
    assert!(matches!(first.save(fence(1), &state("b")).await, Err(DbError::Fenced)));
    assert!(
        matches!(first.claim(fence(1)).await, Err(DbError::Fenced)),
        "an older epoch cannot claim it back"
    );
    assert_eq!(
        second.claim(fence(2)).await.expect("claimed again"),
        Some(state("a")),
        "the old leader's save was refused"
    );

    // A fence that has run out saves nothing, even for the holder.
    let stale = Fence {
        epoch: 2,
        until: tokio::time::Instant::now(),
    };
    assert!(matches!(second.save(stale, &state("c")).await, Err(DbError::Fenced)));
}

/// With `--tls-cert`, a replica that does not lead forwards to the leader
/// over HTTPS, trusting the replicas' CA (`--replica-ca`).
#[tokio::test(flavor = "multi_thread")]
async fn replicas_with_tls_forward_to_the_leader_over_https() {
    use common::certs::{Ca, https_request, server_files};
    let pg = Postgres::start();
    let repo = GitRepo::new();
    let head = repo.commit_edge("  waves: [100%]\n  bake: 0s\n", &collector_config("v1"), "v1");
    let ca = Ca::new("replicas");
    let dir = tempfile::tempdir().expect("temp dir");
    let files = server_files(dir.path(), &ca, None);
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).expect("write the CA");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    let (cert, key, roots) = (path(&files.cert), path(&files.key), path(&dir.path().join("ca.pem")));
    let tls = ["--tls-cert", &cert, "--tls-key", &key, "--replica-ca", &roots];
    let repo_arg = path(repo.path());
    let mut replicas = Vec::new();
    for id in ["r1", "r2"] {
        replicas.push(Replica::start(id, &repo_arg, &pg, any_port(), &tls).await);
    }
    let leader = common::eventually_within(PATIENCE, "a leader both replicas see", async || {
        let mut seen = Vec::new();
        for r in &replicas {
            let c = https_request(&ca, r.api(), "GET", "/api/v1/cluster").await;
            let c: serde_json::Value = serde_json::from_slice(&c.body).expect("JSON");
            seen.push(live_leader(&c).map(str::to_string));
        }
        (seen[0].is_some() && seen[0] == seen[1]).then(|| seen[0].clone().expect("a leader"))
    })
    .await;
    // The follower's own driver has planned nothing: the groups are the leader's.
    let follower = replicas.iter().find(|r| r.id != leader).expect("a follower");
    let groups = common::eventually_within(PATIENCE, "the leader's groups through the follower", async || {
        let r = https_request(&ca, follower.api(), "GET", "/api/v1/groups").await;
        let g: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        (r.status == 200 && g["commit"] == head.as_str()).then_some(g)
    })
    .await;
    assert_eq!(groups["groups"][0]["name"], "edge", "{groups}");
}

/// PostgreSQL over TLS (`sslmode=require`): a replica that trusts the
/// server's CA (`--store-ca`) leads over encrypted connections; one that
/// does not cannot connect.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_reaches_postgres_over_tls_trusting_the_given_ca() {
    use common::certs::Ca;
    use opamp_gitops::cluster::{Database, db::Db};
    let ca = Ca::new("postgres");
    let pg = Postgres::start_tls(&ca);
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode=require", pg.port);

    let untrusted = Database::new(url.clone(), opamp_gitops::tls::client_trusting(None).expect("roots"));
    let refused = Db::connect(&untrusted)
        .await
        .err()
        .expect("a server of an unknown CA is refused");
    assert!(
        format!("{refused:?}").to_lowercase().contains("certificate"),
        "{refused:?}"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).expect("write the CA");
    let repo = GitRepo::new();
    repo.commit_edge("  waves: [100%]\n  bake: 0s\n", &collector_config("v1"), "v1");
    let state = tempfile::tempdir().expect("temp dir");
    let args = [
        "--repo",
        repo.path().to_str().expect("utf-8"),
        "--state-dir",
        state.path().to_str().expect("utf-8"),
        "--store",
        &url,
        "--store-ca",
        ca_file.to_str().expect("utf-8"),
        "--lease-ttl",
        "3s",
        "--startup-grace",
        "0s",
    ];
    let serve = Serve::start_within(&args, (any_port(), any_port()), PATIENCE).await;
    common::eventually_within(PATIENCE, "the replica to lead", async || {
        (metric_at(serve.api, "opamp_gitops_cluster_leader").await == 1).then_some(())
    })
    .await;
    let encrypted: u32 = pg
        .sql("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND a.datname = 'postgres'")
        .parse()
        .expect("a count");
    assert!(encrypted >= 3, "the replica's connections are encrypted: {encrypted}");
}
