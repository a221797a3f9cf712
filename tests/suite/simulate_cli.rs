//! The built binary: `opamp-gitops simulate --agents 2000` against
//! `opamp-gitops serve` shows 2,000 connected agents in the API, and SIGTERM
//! stops the agents with `agent_disconnect`; `--duration` stops thousands of
//! agents promptly; more agents than the machine holds, and bad options, are
//! refused with exit status 2 before anything starts.

use crate::common;

use std::net::{SocketAddr, TcpListener};
use std::process::Stdio;
use std::time::Duration;

use common::process::{Serve, any_port};
use common::wait_agents_at;
use tokio::process::{Child, Command};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_opamp-gitops");
const AGENTS: usize = 2000;

/// A port nobody listens on right now.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Waits until `pred` holds for the (connected, total) counts the API lists, or the deadline.
async fn wait_counts(api: SocketAddr, within: Duration, pred: impl Fn(usize, usize) -> bool) -> (usize, usize) {
    wait_agents_at(api, "the expected agent counts", within, |agents| {
        let counts = (agents.iter().filter(|a| a["connected"] == true).count(), agents.len());
        pred(counts.0, counts.1).then_some(counts)
    })
    .await
}

/// `opamp-gitops serve` on free ports, once its API listens.
async fn serve() -> Serve {
    Serve::start(&[], (any_port(), any_port())).await
}

/// `opamp-gitops simulate` with `args` (killed when dropped).
fn simulate(args: &[&str]) -> Child {
    Command::new(BIN)
        .arg("simulate")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("simulate starts")
}

/// Waits for the child to exit, at most `within`.
async fn exit_within(mut child: Child, within: Duration) -> std::process::ExitStatus {
    tokio::time::timeout(within, child.wait())
        .await
        .expect("simulate exits in time")
        .expect("wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_2000_agents_against_serve() {
    let server = serve().await;
    let (opamp, api) = (server.opamp, server.api);

    let started = Instant::now();
    let sim = simulate(&[
        "--server",
        &format!("ws://{opamp}/v1/opamp"),
        "--agents",
        &AGENTS.to_string(),
        "--duration",
        "5m",
    ]);
    wait_counts(api, Duration::from_secs(10), |c, _| c == AGENTS).await;
    eprintln!("{AGENTS} agents connected after {:?}", started.elapsed());

    // SIGTERM: every agent says goodbye, so the server marks them offline at once.
    let pid = sim.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = exit_within(sim, Duration::from_secs(20)).await;
    assert!(status.success(), "simulate exits 0 after SIGTERM");
    wait_counts(api, Duration::from_secs(10), |c, t| c == 0 && t == AGENTS).await;
}

/// `--duration` ends a large simulation promptly, goodbyes included, and it
/// exits 0 once its agents have connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_stops_thousands_of_agents_promptly() {
    let server = serve().await;
    let (opamp, api) = (server.opamp, server.api);
    let agents = 3000;
    let sim = simulate(&[
        "--server",
        &opamp.to_string(),
        "--agents",
        &agents.to_string(),
        "--duration",
        "4s",
    ]);
    let started = Instant::now();
    // Generous: the point is that it ends by itself, not how fast a loaded machine is.
    let status = exit_within(sim, Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}");
    eprintln!(
        "{agents} agents with --duration 4s exited after {:?}",
        started.elapsed()
    );
    // However many connected in those seconds on a busy machine, all said goodbye.
    wait_counts(api, Duration::from_secs(10), |c, t| c == 0 && t > 0).await;
}

/// Runs `simulate` with `args` to completion, with a generous bound.
async fn simulate_cli(args: &[&str]) -> std::process::Output {
    let mut command = Command::new(BIN);
    command.arg("simulate").args(args);
    common::process::output_within(&mut command, Duration::from_secs(30)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_agents_and_bad_options_are_refused_before_anything_starts() {
    // Nothing listens there: a refused run must not even try.
    let server = free_port().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--agents", "1000000000"], "--agents 1000000000 needs"),
        (&["--clone-fraction", "1.5"], "must be from 0 to 1"),
        (&["--restart-fraction", "0.5"], "--restart-every"),
        (&["--config-apply-timeout", "0s"], "greater than zero"),
        (&["--profile", "slow"], "possible values: fast, supervisor"),
    ];
    for (args, error) in cases {
        let mut all = vec!["--server", server.as_str()];
        all.extend_from_slice(args);
        let out = simulate_cli(&all).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(error), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("simulate: "),
            "{args:?}: no progress, nothing started: {stderr}"
        );
    }
}
