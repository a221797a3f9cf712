//! The real `opamp-gitops serve` binary as a child process, for tests that
//! kill it with SIGKILL and start it again on the same state.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Body, DEADLINE, http_request};

pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

pub struct Controller {
    child: Child,
    pub api: SocketAddr,
    /// The group `wait_group` and `promote` are about.
    group: &'static str,
    /// How long `wait_group` waits.
    patience: Duration,
}

impl Controller {
    /// `serve` on `repo`, with its state in `state`, listening on `(opamp,
    /// api)`, watching `group`; `args` are added to the command line.
    pub fn start(
        repo: &Path,
        state: &Path,
        (opamp, api): (SocketAddr, SocketAddr),
        group: &'static str,
        args: &[&str],
    ) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_opamp-gitops"))
            .args([
                "serve",
                "--repo",
                repo.to_str().expect("utf-8"),
                "--state-dir",
                state.to_str().expect("utf-8"),
            ])
            .args(["--opamp-listen", &opamp.to_string(), "--api-listen", &api.to_string()])
            .args(["--reconcile-tick", "100ms", "--poll-interval", "1h"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("serve starts");
        Controller {
            child,
            api,
            group,
            patience: DEADLINE * 2,
        }
    }

    pub async fn get(&self, path: &str) -> Option<String> {
        let connect = tokio::net::TcpStream::connect(self.api).await;
        connect.ok()?;
        let r = http_request(self.api, "GET", path, &[], Body::Empty).await;
        (r.status == 200).then(|| String::from_utf8_lossy(&r.body).into_owned())
    }

    /// Waits longer in [`Controller::wait_group`] (real agents start slowly).
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Waits until the group satisfies `pred`; returns it.
    pub async fn wait_group(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + self.patience;
        let mut last = String::new();
        loop {
            if let Some(body) = self.get("/api/v1/groups").await {
                last.clone_from(&body);
                let all: serde_json::Value = serde_json::from_str(&body).expect("JSON");
                if let Some(g) = all["groups"]
                    .as_array()
                    .and_then(|gs| gs.iter().find(|g| g["name"] == self.group))
                    && pred(g)
                {
                    return g.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "group {} never reached {what}: {last}",
                self.group
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the controller has planned twice more: a check that
    /// nothing happened since then means it looked and did nothing.
    pub async fn two_more_plans(&self) {
        let (plans, deadline) = (self.plans().await, Instant::now() + self.patience);
        while self.plans().await <= plans + 1 {
            assert!(Instant::now() < deadline, "the controller stopped planning");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `opamp_gitops_plans_total` of this process.
    pub async fn plans(&self) -> u64 {
        let metrics = self.get("/metrics").await.expect("metrics");
        super::metric(&metrics, "opamp_gitops_plans_total").expect("the plans counter")
    }

    /// `opamp_gitops_pushes_total{reason="wave"}` of this process.
    pub async fn wave_pushes(&self) -> u64 {
        let metrics = self.get("/metrics").await.expect("metrics");
        let line = metrics
            .lines()
            .find(|l| l.starts_with("opamp_gitops_pushes_total{reason=\"wave\"}"))
            .expect("the wave push counter");
        line.rsplit(' ').next().and_then(|n| n.parse().ok()).expect("a number")
    }

    pub fn promote(&self) {
        let out = Command::new(env!("CARGO_BIN_EXE_opamp-gitops"))
            .args([
                "rollout",
                "promote",
                self.group,
                "--server",
                &format!("http://{}", self.api),
            ])
            .output()
            .expect("rollout runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("promote accepted"));
    }

    pub fn kill(mut self) {
        // SIGKILL: no shutdown code runs.
        self.child.kill().expect("kill");
        self.child.wait().expect("reaped");
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
