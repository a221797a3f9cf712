//! Notifications and commit statuses end to end: a real receiver and a
//! forge that checks every request against the GitHub or GitLab API, on
//! 127.0.0.1; the controller on a real repository with simulated agents. A
//! bad commit's halt reaches both; a receiver that is down gets every event
//! once it is back, in order; a controller killed before it could deliver
//! delivers after its restart.

use crate::common;

use std::time::Duration;

use axum::http::StatusCode;
use common::gitops::{GitRepo, collector_config, edge_hash, serve_config, simulate, state_dir};
use common::process::{Controller, any_port, free_addr};
use common::receivers::{Delivery, ForgeApi, ForgeServer, HookReceiver, Status};
use common::{Body, TestServer, http_request};
use opamp_gitops::backoff::Backoff;
use opamp_gitops::gitsrc::webhook::signature_matches;
use opamp_gitops::model::CommitId;
use opamp_gitops::notify::{Forge, ForgeProject, Hook, NotifyConfig};
use tokio_util::sync::CancellationToken;

const FAST: &str = "  waves: [100%]\n  bake: 0s\n";
/// A canary, then everyone; a failure halts and rolls back.
const CANARY: &str = "  waves: [1, 100%]\n  bake: 100ms\n  max_failures: 0\n  on_failure: rollback\n";
const BREAK: &str = "BREAK-ME";
const TOKEN: &str = "t0ken";

/// The events of `commit` a receiver was told, in order.
fn events_of<'a>(delivered: &'a [Delivery], commit: &CommitId) -> Vec<&'a Delivery> {
    delivered
        .iter()
        .filter(|d| d.json["commit"] == commit.as_str())
        .collect()
}

fn kinds(deliveries: &[&Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| d.json["event"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Waits until the receiver was told `event` of `commit`; answers all it was told.
async fn until_told(hook: &HookReceiver, commit: &CommitId, event: &str) -> Vec<Delivery> {
    let what = format!("{event} of {commit}");
    hook.wait_for(&what, |h| {
        let all = h.delivered();
        kinds(&events_of(&all, commit))
            .iter()
            .any(|k| k == event)
            .then_some(all)
    })
    .await
}

/// Waits until the forge accepted a status `state` for `commit`; answers
/// the commit's statuses so far, oldest first.
async fn until_status(forge: &ForgeServer, commit: &CommitId, state: &str) -> Vec<Status> {
    let what = format!("{state} for {commit}");
    forge
        .wait_for(&what, |all| {
            let of: Vec<Status> = all.iter().filter(|s| s.sha == commit.as_str()).cloned().collect();
            of.iter().any(|s| s.state == state).then_some(of)
        })
        .await
}

/// A controller on `repo` that notifies `hook` (signed with the secret in
/// `secret`, if any) and sets statuses in `forge` for `project`
/// (`github:…`, `gitlab:…`), with fast retries.
async fn controller(
    repo: &GitRepo,
    state: &std::path::Path,
    hook: &HookReceiver,
    (forge, project): (&ForgeServer, &str),
    secret: Option<std::path::PathBuf>,
) -> TestServer {
    let mut config = serve_config(repo.path(), state);
    config.notify = NotifyConfig {
        hooks: vec![Hook::parse(&hook.url()).expect("a hook")],
        secret_file: secret,
        forge: Some(Forge {
            project: ForgeProject::parse(project).expect("a project"),
            api: forge.url(),
            token: TOKEN.into(),
        }),
        backoff: Backoff {
            min: Duration::from_millis(50),
            max: Duration::from_millis(200),
        },
        ..NotifyConfig::default()
    };
    TestServer::start_with(config).await
}

/// Waits until `agents` run `config` with its rollout complete.
async fn in_sync(server: &TestServer, config: &str, agents: usize) {
    let hash = edge_hash(config).to_string();
    server
        .wait_group("edge", "the config everywhere", |g| {
            g["config_hash"] == hash.as_str() && g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == agents
        })
        .await;
}

#[tokio::test]
async fn a_halted_rollout_is_told_to_the_receiver_and_the_forge() {
    let hook = HookReceiver::start().await;
    let forge = ForgeServer::start(ForgeApi::GitHub, "acme/fleet", TOKEN).await;
    let repo = GitRepo::new();
    let v1 = collector_config("v1");
    repo.commit_edge(FAST, &v1, "first config");
    let (tmp, state) = state_dir();
    let secret = tmp.path().join("notify-secret");
    std::fs::write(&secret, "s3cret\n").expect("write the secret");
    let server = controller(&repo, &state, &hook, (&forge, "github:acme/fleet"), Some(secret)).await;
    let (_sim, stop) = simulate(&server, 5, |c| c.fail_if_contains = Some(BREAK.into()));
    in_sync(&server, &v1, 5).await;

    let bad = repo.commit_edge(CANARY, &collector_config(BREAK), "edge: a config the agents refuse");
    assert_eq!(server.sync().await, bad.as_str());
    let told = until_told(&hook, &bad, "rollout_halted").await;
    let told = events_of(&told, &bad);
    assert_eq!(
        kinds(&told)[..3],
        ["rollout_started", "agents_failed", "rollout_halted"],
        "in the order they happened"
    );
    let link = format!("http://{}/api/v1/groups", server.api_addr());
    for d in &told {
        assert!(
            signature_matches(b"s3cret", &d.body, d.header("x-opamp-gitops-signature")),
            "signed with the secret: {:?}",
            d.headers
        );
        assert_eq!(d.header("x-opamp-gitops-event"), d.json["event"].as_str());
        assert_eq!(d.header("x-opamp-gitops-delivery"), d.json["id"].as_str());
        assert_eq!(d.header("content-type"), Some("application/json"));
        assert_eq!(d.json["group"], "edge");
        assert_eq!(d.json["change"]["author"], "Test <test@example.com>");
        assert_eq!(d.json["change"]["subject"], "edge: a config the agents refuse");
        assert_eq!(d.json["url"], link.as_str());
        assert_eq!(d.json["waves"], 2);
    }
    let failed = told[1];
    assert_eq!(failed.json["failures"].as_array().map(Vec::len), Some(1), "the canary");
    let error = failed.json["failures"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("contains \"BREAK-ME\": refusing to start"), "{error}");
    let halted = told[2];
    assert_eq!(
        (halted.json["wave"].as_u64(), halted.json["failed"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(halted.json["agents"]["targeted"], 5);
    assert_eq!(halted.json["failures"][0]["agent"], failed.json["failures"][0]["agent"]);

    let statuses = until_status(&forge, &bad, "failure").await;
    assert_eq!(statuses[0].state, "pending", "{statuses:#?}");
    assert_eq!(
        statuses[0].description,
        "rollout started: canary first to 5 agents in 2 waves"
    );
    let failure = statuses.iter().find(|s| s.state == "failure").expect("a failure");
    assert!(
        failure.description.starts_with("halted at wave 1 of 2: 1 agent failed"),
        "{failure:?}"
    );
    for s in &statuses {
        assert_eq!(
            (s.context.as_str(), s.target_url.as_str()),
            ("opamp-gitops/edge", link.as_str())
        );
    }
    assert!(forge.rejected().is_empty(), "{:?}", forge.rejected());
    let metrics = String::from_utf8_lossy(&server.api_get("/metrics").await.body).into_owned();
    assert!(
        metrics.contains("opamp_gitops_notify_sent_total{receiver=\"forge\"}"),
        "{metrics}"
    );
    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn a_receiver_that_was_down_gets_every_event_in_order() {
    let hook = HookReceiver::start().await;
    hook.fail_with(Some(StatusCode::SERVICE_UNAVAILABLE));
    let forge = ForgeServer::start(ForgeApi::GitLab, "ops%2Ffleet", TOKEN).await;
    let repo = GitRepo::new();
    let v1 = collector_config("v1");
    repo.commit_edge(FAST, &v1, "first config");
    let (_tmp, state) = state_dir();
    let server = controller(&repo, &state, &hook, (&forge, "gitlab:ops/fleet"), None).await;
    let (_sim, stop) = simulate(&server, 3, |_| {});
    in_sync(&server, &v1, 3).await;
    let v2 = collector_config("v2");
    let c2 = repo.commit_edge("  waves: [1, 100%]\n  bake: 0s\n", &v2, "edge: v2 in two waves");
    server.sync().await;
    in_sync(&server, &v2, 3).await;
    // Down all along: refused at least twice, nothing delivered.
    hook.wait_for("refused deliveries", |h| (h.refused() >= 2).then_some(()))
        .await;
    assert!(hook.delivered().is_empty());

    hook.fail_with(None);
    let told = until_told(&hook, &c2, "rollout_complete").await;
    assert_eq!(
        kinds(&events_of(&told, &c2)),
        ["rollout_started", "wave_opened", "rollout_complete"],
        "every event once, in order"
    );
    let first_v2 = told.iter().position(|d| d.json["commit"] == c2.as_str());
    assert!(
        told[..first_v2.unwrap_or(0)]
            .iter()
            .all(|d| d.json["commit"] != c2.as_str()),
        "v1's events came before v2's"
    );
    let metrics = String::from_utf8_lossy(&server.api_get("/metrics").await.body).into_owned();
    let retries = metrics
        .lines()
        .find_map(|l| l.strip_prefix("opamp_gitops_notify_retries_total{receiver=\"0\"} "))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(retries >= Some(2), "{metrics}");

    // GitLab: running once (it refuses running again: a second wave is no
    // news), then success, named after the group.
    let statuses = until_status(&forge, &c2, "success").await;
    let states: Vec<&str> = statuses.iter().map(|s| s.state.as_str()).collect();
    assert_eq!(states, ["running", "success"]);
    assert!(statuses.iter().all(|s| s.context == "opamp-gitops/edge"));
    assert!(
        forge.same_state() >= 1,
        "the second wave's running was refused as no change"
    );

    // An invalid commit: told once, and a failed status for the commit as a whole.
    let invalid = repo.commit(&[("groups/edge.yaml", "selector: [\n")], "edge: a broken group file");
    server.sync().await;
    let all = until_told(&hook, &invalid, "commit_invalid").await;
    let told = events_of(&all, &invalid);
    assert_eq!(told.len(), 1, "told once");
    assert_eq!(told[0].json["group"], serde_json::Value::Null);
    assert_eq!(told[0].json["change"]["author"], "Test <test@example.com>");
    let errors = told[0].json["errors"].as_array().expect("errors");
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e.starts_with("groups/edge.yaml:"))),
        "{errors:?}"
    );
    let failed = forge
        .wait_for("the invalid commit's status", |all| {
            all.iter().find(|s| s.sha == invalid.as_str()).cloned()
        })
        .await;
    assert_eq!(
        (failed.state.as_str(), failed.context.as_str()),
        ("failed", "opamp-gitops")
    );
    assert!(forge.rejected().is_empty(), "{:?}", forge.rejected());
    stop.cancel();
    server.stop().await;
}

#[tokio::test]
async fn a_controller_killed_before_it_could_tell_tells_after_its_restart() {
    // Nothing listens here yet: every delivery is refused a connection.
    let hook_addr = free_addr();
    let hook_url = format!("http://{hook_addr}/hook");
    let repo = GitRepo::new();
    let v1 = collector_config("v1");
    repo.commit_edge(FAST, &v1, "first config");
    let state = tempfile::tempdir().expect("temp dir");
    let args = |grace: &'static str| vec!["--startup-grace", grace, "--notify", hook_url.as_str()];
    let controller = Controller::start(repo.path(), state.path(), (any_port(), any_port()), "edge", &args("0s")).await;
    let opamp = controller.opamp;
    let mut config = opamp_gitops::simulate::Config::new(format!("ws://{opamp}/v1/opamp"), 3);
    config.apply_delay = Duration::from_millis(20);
    config.fail_if_contains = Some(BREAK.into());
    let stop = CancellationToken::new();
    let _sim = opamp_gitops::simulate::start(config, stop.clone()).expect("simulation starts");
    let h1 = edge_hash(&v1).to_string();
    controller
        .wait_group("v1 on all 3", |g| {
            g["config_hash"] == h1.as_str() && g["agents"]["applied"] == 3
        })
        .await;

    let bad = repo.commit_edge(CANARY, &collector_config(BREAK), "edge: a config the agents refuse");
    let sync = http_request(controller.api, "POST", "/api/v1/sync", &[], Body::Empty).await;
    assert_eq!(sync.status, 200);
    // Halted, and the canary rolled back: every event of the rollout is told
    // (into the outbox) before the state that follows it is saved.
    controller
        .wait_group("halted and rolled back", |g| {
            g["rollout"]["phase"] == "halted" && g["agents"]["failed"] == 0 && g["agents"]["applying"] == 0
        })
        .await;
    let outbox = state.path().join("outbox");
    let queued: usize = std::fs::read_dir(&outbox)
        .expect("an outbox")
        .map(|d| {
            std::fs::read_dir(d.expect("a receiver").path())
                .expect("its notices")
                .count()
        })
        .sum();
    assert!(
        queued >= 5,
        "v1's start and end, the bad commit's start, failure, halt...: {queued}"
    );
    controller.kill().await;

    let hook = HookReceiver::start_at(hook_addr).await;
    let controller = Controller::start(repo.path(), state.path(), (opamp, any_port()), "edge", &args("1s")).await;
    let told = until_told(&hook, &bad, "rolled_back").await;
    assert_eq!(
        kinds(&events_of(&told, &bad)),
        ["rollout_started", "agents_failed", "rollout_halted", "rolled_back"]
    );
    let ids: std::collections::HashSet<&str> = told.iter().filter_map(|d| d.json["id"].as_str()).collect();
    assert_eq!(ids.len(), told.len(), "each told once");
    let failed = events_of(&told, &bad)[1];
    let error = failed.json["failures"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains(BREAK), "{error}");
    // Delivered notices leave the outbox (files: nothing publishes them).
    common::eventually("an empty outbox", async || {
        let left: usize = std::fs::read_dir(&outbox)
            .ok()?
            .filter_map(|d| Some(std::fs::read_dir(d.ok()?.path()).ok()?.count()))
            .sum();
        (left == 0).then_some(())
    })
    .await;
    stop.cancel();
    controller.kill().await;
}
