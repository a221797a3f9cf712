//! The real `opamp-gitops serve` binary as a child process, for tests that
//! kill it with SIGKILL and start it again on the same state. It is waited
//! for through what it says: its "listening" log line, then the API's long
//! polls.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::task::JoinHandle;

use super::{DEADLINE, follow, http_request, let_pass_at, wait_group_at};

pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

/// Any free port on 127.0.0.1, chosen by the controller as it binds.
pub fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A `serve` child process (killed when dropped) whose log shows on the
/// test's stderr.
pub struct Serve {
    child: tokio::process::Child,
    /// Where agents connect (the bound address, port resolved).
    pub opamp: SocketAddr,
    /// Where the API listens (the bound address, port resolved).
    pub api: SocketAddr,
}

impl Serve {
    /// Runs `opamp-gitops serve` with `args`, listening on `(opamp, api)`
    /// (port 0 for any), and waits until it listens.
    pub async fn start(args: &[&str], addrs: (SocketAddr, SocketAddr)) -> Self {
        Serve::start_within(args, addrs, DEADLINE).await
    }

    /// [`Serve::start`], waiting at most `patience` for it to listen (a test
    /// that starts many processes at once starts them slowly).
    pub async fn start_within(args: &[&str], (opamp, api): (SocketAddr, SocketAddr), patience: Duration) -> Self {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_opamp-gitops"));
        command
            .arg("serve")
            .args(args)
            .args(["--opamp-listen", &opamp.to_string(), "--api-listen", &api.to_string()]);
        Serve::run_within(command, patience).await
    }

    /// Runs `command`, which runs `serve` (however: through a shell, say),
    /// and waits until it listens.
    pub async fn run(command: tokio::process::Command) -> Self {
        Serve::run_within(command, DEADLINE).await
    }

    async fn run_within(mut command: tokio::process::Command, patience: Duration) -> Self {
        let mut child = command
            // The app's info lines say where it listens; everything else only warnings.
            .env("RUST_LOG", "warn,opamp_gitops::app=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("serve starts");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addrs) = listening(&line)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addrs);
                }
                eprintln!("serve: {line}");
            }
        });
        let (opamp, api) = tokio::time::timeout(patience, rx)
            .await
            .expect("serve listens in time")
            .expect("serve says where it listens before it exits");
        Serve { child, opamp, api }
    }

    /// Sends `signal` (`TERM`, `KILL`...) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("still running").to_string();
        let sent = Command::new("kill").args([&format!("-{signal}"), &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
    }

    /// Waits for the process to exit by itself, at most `within`.
    pub async fn exit_within(mut self, within: Duration) -> ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("serve did not exit within {within:?}"))
            .expect("wait")
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }
}

/// `after` a restart, the group shows the rollout it showed `before`: the
/// same one (same start), at the same wave, still in progress.
pub fn assert_resumed(before: &serde_json::Value, after: &serde_json::Value) {
    assert_eq!(
        after["rollout"]["wave"], before["rollout"]["wave"],
        "resumes at the wave it had opened: {after}"
    );
    assert_eq!(
        after["rollout"]["started"], before["rollout"]["started"],
        "the same rollout, not a new one: {after}"
    );
    assert_eq!(after["rollout"]["phase"], "progressing", "{after}");
}

/// Runs `command` to completion; its output. One that outlives `within` is
/// killed and fails the test with what it printed so far.
pub async fn output_within(command: &mut tokio::process::Command, within: Duration) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the command starts");
    let stdout = read_all(child.stdout.take().expect("stdout"));
    let stderr = read_all(child.stderr.take().expect("stderr"));
    let status = match tokio::time::timeout(within, child.wait()).await {
        Ok(status) => status.expect("wait"),
        Err(_) => {
            child.kill().await.expect("kill");
            let (out, err) = (stdout.await.expect("reader"), stderr.await.expect("reader"));
            let (out, err) = (String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
            panic!("{command:?} ran longer than {within:?}; it printed:\n{out}\nand on stderr:\n{err}");
        }
    };
    std::process::Output {
        status,
        stdout: stdout.await.expect("stdout reader"),
        stderr: stderr.await.expect("stderr reader"),
    }
}

/// Reads a pipe to its end in a task of its own.
fn read_all(mut pipe: impl AsyncRead + Send + Unpin + 'static) -> JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        pipe.read_to_end(&mut bytes).await.expect("read the output");
        bytes
    })
}

/// The addresses in the app's `listening opamp=… api=…` log line.
fn listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    if !line.contains("listening") {
        return None;
    }
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|a| a.parse().ok())
    };
    Some((field("opamp=")?, field("api=")?))
}

/// A controller on a repository, watching one group.
pub struct Controller {
    serve: Serve,
    /// Where agents connect.
    pub opamp: SocketAddr,
    /// Where the API listens.
    pub api: SocketAddr,
    /// The group `wait_group` and `promote` are about.
    group: &'static str,
    /// How long `wait_group` waits.
    patience: Duration,
}

impl Controller {
    /// `serve` on `repo`, with its state in `state`, listening on `(opamp,
    /// api)` (port 0 for any), watching `group`; `args` are added to the
    /// command line. Returns once it listens.
    pub async fn start(
        repo: &Path,
        state: &Path,
        addrs: (SocketAddr, SocketAddr),
        group: &'static str,
        args: &[&str],
    ) -> Self {
        Controller::start_on(repo.to_str().expect("utf-8"), state, addrs, group, args).await
    }

    /// [`Controller::start`] on a repository given as `--repo` takes it: a
    /// path or a URL.
    pub async fn start_on(
        repo: &str,
        state: &Path,
        addrs: (SocketAddr, SocketAddr),
        group: &'static str,
        args: &[&str],
    ) -> Self {
        let state = state.to_str().expect("utf-8");
        let mut all = vec!["--repo", repo, "--state-dir", state];
        all.extend(["--reconcile-tick", "100ms", "--poll-interval", "1h"]);
        all.extend(args);
        let serve = Serve::start(&all, addrs).await;
        Controller {
            opamp: serve.opamp,
            api: serve.api,
            serve,
            group,
            patience: DEADLINE * 2,
        }
    }

    /// The process id of the controller.
    #[allow(dead_code, reason = "for tests/limits.rs, a binary of its own")]
    pub fn pid(&self) -> u32 {
        self.serve.child.id().expect("running")
    }

    /// Waits until the controller has loaded a commit (what `/readyz` reports),
    /// following the groups' long poll, which a change of the repository's
    /// status ends.
    #[allow(dead_code, reason = "for tests/limits.rs, a binary of its own")]
    pub async fn wait_ready(&self) {
        follow(self.api, "/api/v1/groups", "a commit loaded", self.patience, |all| {
            all["commit"].is_string().then_some(())
        })
        .await;
    }

    /// GET on the API, expecting 200; the body.
    pub async fn get(&self, path: &str) -> String {
        let r = http_request(self.api, "GET", path, &[], super::Body::Empty).await;
        assert_eq!(r.status, 200, "GET {path}: {}", String::from_utf8_lossy(&r.body));
        String::from_utf8_lossy(&r.body).into_owned()
    }

    /// Waits longer in [`Controller::wait_group`] (real agents start slowly).
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Waits until the group satisfies `pred`; returns it.
    pub async fn wait_group(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        wait_group_at(self.api, self.group, what, self.patience, pred).await
    }

    /// Waits until the controller has planned twice more once `d` has passed
    /// (see [`let_pass_at`]).
    pub async fn let_pass(&self, d: Duration) {
        let_pass_at(self.api, d, self.patience).await;
    }

    /// For a rollout of `hash` in waves of 1, `applied` and more, with a bake
    /// that never ends by itself: waits for the canary to apply it, promotes,
    /// and waits for wave 2's `applied` agents; checks that those alone were
    /// pushed since the counter stood at `wave_pushes`. Answers the group.
    pub async fn promote_to_wave_two(&self, hash: &str, applied: u64, wave_pushes: u64) -> serde_json::Value {
        self.wait_group("wave 1 applied", |g| {
            g["config_hash"] == hash && g["agents"]["applied"] == 1
        })
        .await;
        self.promote();
        let group = self
            .wait_group("wave 2 applied", |g| {
                g["rollout"]["wave"] == 2 && g["agents"]["applied"] == applied
            })
            .await;
        assert_eq!(
            self.wave_pushes().await - wave_pushes,
            applied,
            "one push per agent of waves 1 and 2"
        );
        group
    }

    /// After a restart on the rollout [`Controller::promote_to_wave_two`]
    /// opened: once `d` has passed and the controller planned twice more,
    /// nobody was pushed in a wave; then promoted through wave 3 (`agents`
    /// applied) to complete, only wave 3's `pushed` agents were. Answers the
    /// group then.
    pub async fn resume_to_complete(&self, d: Duration, agents: u64, pushed: u64) -> serde_json::Value {
        self.let_pass(d).await;
        assert_eq!(
            self.wave_pushes().await,
            0,
            "agents of completed waves are not pushed again"
        );
        self.promote();
        self.wait_group("wave 3 applied", |g| {
            g["rollout"]["wave"] == 3 && g["agents"]["applied"] == agents
        })
        .await;
        // The last wave bakes too: promote once more.
        self.promote();
        let done = self
            .wait_group("complete", |g| g["rollout"]["phase"] == "complete")
            .await;
        assert_eq!(
            self.wave_pushes().await,
            pushed,
            "only the last wave's agents were pushed"
        );
        done
    }

    /// `opamp_gitops_pushes_total{reason="wave"}` of this process.
    pub async fn wave_pushes(&self) -> u64 {
        let metrics = self.get("/metrics").await;
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

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(self) {
        self.serve.kill().await;
    }
}
