//! The controller killed with SIGKILL mid-rollout and started again resumes
//! at the same wave, and the agents of the waves already done are not pushed
//! again. Runs the real binary; the agents are simulated in this process.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::gitops::{GitRepo, collector_config, edge_hash};
use common::process::{Controller, any_port, assert_resumed, free_addr};
use opamp_gitops::simulate;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_killed_controller_resumes_its_rollout_at_the_same_wave() {
    let repo = GitRepo::new();
    let v1 = collector_config("v1");
    repo.commit_edge("  waves: [100%]\n  bake: 0s\n", &v1, "v1");
    let state = tempfile::tempdir().expect("temp dir");
    let controller = Controller::start(
        repo.path(),
        state.path(),
        (any_port(), any_port()),
        "edge",
        &["--startup-grace", "0s"],
    )
    .await;
    let opamp = controller.opamp;

    let mut config = simulate::Config::new(format!("ws://{opamp}/v1/opamp"), 20);
    config.apply_delay = Duration::from_millis(20);
    let stop = CancellationToken::new();
    let _sim = simulate::start(config, stop.clone()).expect("simulation starts");
    let h1 = edge_hash(&v1).to_string();
    controller
        .wait_group("v1 on all 20", |g| {
            g["config_hash"] == h1.as_str() && g["agents"]["applied"] == 20
        })
        .await;

    // v2 in waves [1, 25%, 100%] with a bake that never ends by itself.
    // (v1 reached the agents in a wave or, if they connected after its
    // rollout, as a sync: count only what follows.)
    let v1_pushes = controller.wave_pushes().await;
    let v2 = collector_config("v2");
    repo.commit_edge("  waves: [1, 25%, 100%]\n  bake: 1h\n", &v2, "v2");
    let h2 = edge_hash(&v2).to_string();
    let before = controller.promote_to_wave_two(&h2, 5, v1_pushes).await;
    controller.kill().await;

    // The same state directory and OpAMP address; agents reconnect during
    // the start-up grace.
    let controller = Controller::start(
        repo.path(),
        state.path(),
        (opamp, any_port()),
        "edge",
        &["--startup-grace", "1s"],
    )
    .await;
    let api = controller.api;
    let after = controller
        .wait_group("the resumed rollout", |g| {
            g["config_hash"] == h2.as_str() && g["agents"]["targeted"] == 20
        })
        .await;
    assert_resumed(&before, &after);
    // Give the resumed controller a few plans: nobody of waves 1-2 is pushed again.
    controller
        .wait_group("wave 2 still applied", |g| {
            g["agents"]["applied"] == 5 && g["agents"]["pending"] == 15
        })
        .await;
    // Time passes and the controller plans: nobody of waves 1-2 is pushed
    // again. The rollout carries on from there: wave 3, then complete.
    controller.resume_to_complete(Duration::from_millis(500), 20, 15).await;

    // The command's refusals: a finished rollout, an unknown group, no controller.
    let rollout = |action: &str, group: &str, server: String| {
        Command::new(env!("CARGO_BIN_EXE_opamp-gitops"))
            .args(["rollout", action, group, "--server", &server])
            .output()
            .expect("rollout runs")
    };
    let idle = rollout("pause", "edge", format!("http://{api}"));
    assert_eq!(idle.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&idle.stderr).contains("no rollout in progress"));
    let unknown = rollout("resume", "nope", format!("http://{api}"));
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no group named nope"));
    let unreachable = rollout("pause", "edge", format!("http://{}", free_addr()));
    assert_eq!(unreachable.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&unreachable.stderr).contains("Connection refused"),
        "{unreachable:?}"
    );
    stop.cancel();
}
