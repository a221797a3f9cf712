//! The built binary: `opamp-gitops simulate --agents 2000` against
//! `opamp-gitops serve` shows 2,000 connected agents in the API, and SIGTERM
//! stops the agents with `agent_disconnect`; `--duration` stops thousands of
//! agents promptly; more agents than the machine holds, and bad options, are
//! refused with exit status 2 before anything starts.

use crate::common;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Body, http_request};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_opamp-gitops");
const AGENTS: usize = 2000;

/// A port nobody listens on right now.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Kills the child when the test ends, however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connected and total agents the API lists.
async fn connected(api: SocketAddr) -> Option<(usize, usize)> {
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        http_request(api, "GET", "/api/v1/agents", &[], Body::Empty),
    )
    .await
    .ok()?;
    if r.status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
    let agents = v["agents"].as_array()?;
    Some((agents.iter().filter(|a| a["connected"] == true).count(), agents.len()))
}

/// Polls until `pred` holds for the (connected, total) counts, or the deadline.
async fn wait_counts(api: SocketAddr, within: Duration, pred: impl Fn(usize, usize) -> bool) -> (usize, usize) {
    let deadline = Instant::now() + within;
    let mut last = (0, 0);
    loop {
        if let Some(counts) = connected(api).await {
            last = counts;
            if pred(counts.0, counts.1) {
                return counts;
            }
        }
        assert!(
            Instant::now() < deadline,
            "deadline passed; last counts (connected, total) = {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `opamp-gitops serve` on free ports, and its (OpAMP, API) addresses once the API listens.
async fn serve() -> (Proc, SocketAddr, SocketAddr) {
    let (opamp, api) = (free_port(), free_port());
    let server = Proc(
        Command::new(BIN)
            .args([
                "serve",
                "--opamp-listen",
                &opamp.to_string(),
                "--api-listen",
                &api.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("serve starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(api).await.is_err() {
        assert!(Instant::now() < deadline, "serve never listened on {api}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (server, opamp, api)
}

/// Waits (in a blocking task) for the child to exit, at most `within`.
async fn exit_within(child: Proc, within: Duration) -> std::process::ExitStatus {
    let exit = tokio::task::spawn_blocking(move || {
        let mut child = child;
        let status = child.0.wait();
        (child, status)
    });
    let (_child, status) = tokio::time::timeout(within, exit)
        .await
        .expect("simulate exits in time")
        .expect("join");
    status.expect("wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_2000_agents_against_serve() {
    let (_server, opamp, api) = serve().await;

    let started = Instant::now();
    let sim = Proc(
        Command::new(BIN)
            .args([
                "simulate",
                "--server",
                &format!("ws://{opamp}/v1/opamp"),
                "--agents",
                &AGENTS.to_string(),
                "--duration",
                "5m",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("simulate starts"),
    );
    wait_counts(api, Duration::from_secs(10), |c, _| c == AGENTS).await;
    eprintln!("{AGENTS} agents connected after {:?}", started.elapsed());

    // SIGTERM: every agent says goodbye, so the server marks them offline at once.
    let pid = sim.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
    assert!(killed.success());
    let status = exit_within(sim, Duration::from_secs(20)).await;
    assert!(status.success(), "simulate exits 0 after SIGTERM");
    wait_counts(api, Duration::from_secs(10), |c, t| c == 0 && t == AGENTS).await;
}

/// `--duration` ends a large simulation promptly, goodbyes included, and it
/// exits 0 once its agents have connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_stops_thousands_of_agents_promptly() {
    let (_server, opamp, api) = serve().await;
    let agents = 3000;
    let sim = Proc(
        Command::new(BIN)
            .args([
                "simulate",
                "--server",
                &opamp.to_string(),
                "--agents",
                &agents.to_string(),
                "--duration",
                "4s",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("simulate starts"),
    );
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
    let mut command = tokio::process::Command::new(BIN);
    command
        .arg("simulate")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("simulate exits in time")
        .expect("simulate runs")
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
