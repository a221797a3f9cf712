//! The built binary: `opamp-gitops simulate --agents 2000` against
//! `opamp-gitops serve` shows 2,000 connected agents in the API, and SIGTERM
//! stops the agents with `agent_disconnect`.

mod common;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_2000_agents_against_serve() {
    let (opamp, api) = (free_port(), free_port());
    let _server = Proc(
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

    let started = Instant::now();
    let mut sim = Proc(
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
    let exit = tokio::task::spawn_blocking(move || {
        let status = sim.0.wait();
        (sim, status)
    });
    let (_sim, status) = tokio::time::timeout(Duration::from_secs(20), exit)
        .await
        .expect("simulate exits in time")
        .expect("join");
    assert!(status.expect("wait").success(), "simulate exits 0 after SIGTERM");
    wait_counts(api, Duration::from_secs(10), |c, t| c == 0 && t == AGENTS).await;
}
