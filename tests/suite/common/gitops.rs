//! End-to-end fixtures for rollouts: a real git repository in a temp dir, the
//! controller reading it, simulated agents, and an observer that records
//! every hash each agent reports.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use git2::{IndexAddOption, Repository, Signature};
use opamp_gitops::app::ServeConfig;
use opamp_gitops::fleet::RemoteConfigState;
use opamp_gitops::gitsrc::{Auth, GitConfig, RepoLocation};
use opamp_gitops::model::{CommitId, ConfigHash, InstanceUid};
use opamp_gitops::simulate::{self, Simulation};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use opamp_gitops::proto::{AgentToServer, ComponentHealth, RemoteConfigStatus};

use super::{Body, DEADLINE, SUPERVISOR_CAPS, TestServer, WsAgent, description, http_request};

/// A collector config that passes validation; `marker` makes each version distinct.
pub fn collector_config(marker: &str) -> String {
    format!(
        "# {marker}\nreceivers:\n  otlp:\n    protocols:\n      grpc: {{}}\nprocessors:\n  batch: {{}}\nexporters:\n  debug: {{}}\nservice:\n  pipelines:\n    traces:\n      receivers: [otlp]\n      processors: [batch]\n      exporters: [debug]\n"
    )
}

/// A group of the agents `simulate` starts (service.name otelcol-sim), with a
/// rollout policy block (YAML, indented under `rollout:`).
pub fn group_yaml(policy: &str) -> String {
    format!(
        "selector:\n  match_attributes:\n    service.name: otelcol-sim\nconfig:\n  \"\": configs/edge.yaml\nrollout:\n{policy}"
    )
}

/// A group selecting the agents with all of `attrs`, with its own config file
/// `configs/<name>.yaml` and a rollout policy block (as for [`group_yaml`]).
pub fn selected_group_yaml(name: &str, attrs: &[(&str, &str)], policy: &str) -> String {
    let attrs: String = attrs.iter().map(|(k, v)| format!("    {k}: {v}\n")).collect();
    format!("selector:\n  match_attributes:\n{attrs}config:\n  \"\": configs/{name}.yaml\nrollout:\n{policy}")
}

/// The fleet defaults: fast rollouts and a long reconcile interval unless a test says otherwise.
pub fn fleet_yaml(reconcile_interval: &str) -> String {
    format!(
        "rollout:\n  waves: [100%]\n  bake: 0s\n  apply_timeout: 5s\n  max_failures: 0\n  on_failure: rollback\nreconcile:\n  interval: {reconcile_interval}\n"
    )
}

/// Runs the `git` command in `dir`, expecting success; its output.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A working repository on disk; the controller reads its committed tree.
pub struct GitRepo {
    pub dir: tempfile::TempDir,
}

impl GitRepo {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Repository::init(dir.path()).expect("git init");
        GitRepo { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes the files (path, body) and commits everything.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> CommitId {
        self.commit_by(("Test", "test@example.com"), files, message)
    }

    /// [`GitRepo::commit`] with this author (name, email).
    pub fn commit_by(&self, (name, email): (&str, &str), files: &[(&str, &str)], message: &str) -> CommitId {
        for (path, body) in files {
            let full = self.path().join(path);
            std::fs::create_dir_all(full.parent().expect("a parent")).expect("mkdir");
            std::fs::write(full, body).expect("write");
        }
        let repo = Repository::open(self.path()).expect("open");
        let mut index = repo.index().expect("index");
        index.add_all(["*"], IndexAddOption::DEFAULT, None).expect("add");
        index.write().expect("write index");
        let tree = repo.find_tree(index.write_tree().expect("tree")).expect("tree");
        let sig = Signature::now(name, email).expect("sig");
        let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        let oid = repo
            .commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
            .expect("commit");
        CommitId::new(oid.to_string())
    }

    /// The standard layout: fleet.yaml, groups/edge.yaml, configs/edge.yaml.
    pub fn commit_edge(&self, policy: &str, config: &str, message: &str) -> CommitId {
        self.commit_edge_every("1h", policy, config, message)
    }

    /// The standard layout with this reconcile interval in fleet.yaml.
    pub fn commit_edge_every(&self, interval: &str, policy: &str, config: &str, message: &str) -> CommitId {
        self.commit(
            &[
                ("fleet.yaml", &fleet_yaml(interval)),
                ("groups/edge.yaml", &group_yaml(policy)),
                ("configs/edge.yaml", config),
            ],
            message,
        )
    }
}

/// The controller's settings for a test: fast ticks, no start-up grace.
pub fn serve_config(repo: &Path, state_dir: &Path) -> ServeConfig {
    let mut c = ServeConfig::local();
    c.git = Some(GitConfig {
        repo: RepoLocation::Local(repo.to_path_buf()),
        branch: None,
        subdir: None,
        state_dir: state_dir.to_path_buf(),
        poll_interval: Duration::from_secs(3600),
        auth: Auth::default(),
        webhook_secret_file: None,
    });
    c.reconcile_tick = Some(Duration::from_millis(100));
    c.startup_grace = Duration::ZERO;
    c
}

impl TestServer {
    /// Asks the controller to fetch now; answers the commit it reached.
    pub async fn sync(&self) -> String {
        let r = http_request(self.api_addr(), "POST", "/api/v1/sync", &[], Body::Empty).await;
        assert_eq!(r.status, 200, "sync: {}", String::from_utf8_lossy(&r.body));
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
        v["commit"].as_str().expect("a commit").to_string()
    }

    pub async fn api_post(&self, path: &str) -> (u16, serde_json::Value) {
        let r = http_request(self.api_addr(), "POST", path, &[], Body::Empty).await;
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Waits until `GET /api/v1/groups` shows `group` satisfying `pred`; returns that group.
    pub async fn wait_group(
        &self,
        group: &str,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_group_within(DEADLINE * 2, group, what, pred).await
    }

    /// [`TestServer::wait_group`] with its own patience (agents that restart
    /// or poll slowly take a while).
    pub async fn wait_group_within(
        &self,
        patience: Duration,
        group: &str,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        super::wait_group_at(self.api_addr(), group, what, patience, pred).await
    }

    /// Waits until `GET /api/v1/agents` lists `uid` satisfying `pred`; returns that agent.
    pub async fn wait_agent_json(
        &self,
        uid: &InstanceUid,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let uid = uid.to_string();
        let what = format!("agent {uid} to reach {what}");
        self.wait_agents(&what, |agents| {
            agents
                .iter()
                .find(|a| a["instance_uid"] == uid.as_str())
                .filter(|a| pred(a))
                .cloned()
        })
        .await
    }

    /// Waits until `GET /api/v1/agents` lists agents that `pick` takes.
    pub async fn wait_agents<T>(&self, what: &str, pick: impl FnMut(&[serde_json::Value]) -> Option<T>) -> T {
        super::wait_agents_at(self.api_addr(), what, DEADLINE, pick).await
    }
}

/// Simulated agents (service.name otelcol-sim) against a server.
pub fn simulate(
    server: &TestServer,
    agents: usize,
    tweak: impl FnOnce(&mut simulate::Config),
) -> (Simulation, CancellationToken) {
    let mut config = simulate::Config::new(format!("ws://{}/v1/opamp", server.opamp_addr()), agents);
    config.apply_delay = Duration::from_millis(20);
    config.attrs.push(("host.name".into(), "sim-{index}".into()));
    tweak(&mut config);
    let cancel = CancellationToken::new();
    let sim = simulate::start(config, cancel.clone()).expect("simulation starts");
    (sim, cancel)
}

/// One reported (hash, status) and when it was first seen.
type Report = (Option<ConfigHash>, RemoteConfigState, Instant);

/// Every (hash, status) each agent reported, with when it was first seen.
#[derive(Clone)]
pub struct Observer {
    seen: Arc<Mutex<HashMap<InstanceUid, Vec<Report>>>>,
    /// Bumped after each snapshot is recorded, to wake waits.
    recorded: watch::Receiver<u64>,
    /// How long a wait may take.
    patience: Duration,
}

impl Observer {
    pub fn start(server: &TestServer) -> Self {
        let (recorded_tx, recorded) = watch::channel(0);
        let obs = Observer {
            seen: Arc::default(),
            recorded,
            patience: DEADLINE,
        };
        let mut rx = server.fleet().subscribe();
        let seen = obs.seen.clone();
        tokio::spawn(async move {
            loop {
                let snap = rx.borrow_and_update().clone();
                {
                    let mut seen = seen.lock().expect("observer lock");
                    for (uid, rec) in &snap.agents {
                        if let Some(s) = &rec.remote_config_status {
                            let log = seen.entry(uid.clone()).or_default();
                            if log.last().map(|(h, st, _)| (*h, *st)) != Some((s.hash, s.state)) {
                                log.push((s.hash, s.state, Instant::now()));
                            }
                        }
                    }
                }
                recorded_tx.send_modify(|n| *n += 1);
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        obs
    }

    /// Waits longer (real agents start slowly).
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// True when the agent ever reported `hash` (in any status): it received it.
    pub fn received(&self, uid: &InstanceUid, hash: ConfigHash) -> bool {
        self.first(uid, hash, |_| true).is_some()
    }

    /// When the agent first reported `hash` with a status `pred` accepts.
    pub fn first(
        &self,
        uid: &InstanceUid,
        hash: ConfigHash,
        pred: impl Fn(RemoteConfigState) -> bool,
    ) -> Option<Instant> {
        self.first_after(uid, hash, None, pred)
    }

    /// Like [`Observer::first`], counting only reports first seen at or after `after`.
    pub fn first_after(
        &self,
        uid: &InstanceUid,
        hash: ConfigHash,
        after: Option<Instant>,
        pred: impl Fn(RemoteConfigState) -> bool,
    ) -> Option<Instant> {
        let seen = self.seen.lock().expect("observer lock");
        seen.get(uid)?
            .iter()
            .find(|(h, st, t)| *h == Some(hash) && pred(*st) && after.is_none_or(|a| *t >= a))
            .map(|(_, _, t)| *t)
    }

    /// Waits until the agent has reported `hash` with a status `pred` accepts; answers when.
    pub async fn wait(&self, uid: &InstanceUid, hash: ConfigHash, pred: impl Fn(RemoteConfigState) -> bool) -> Instant {
        self.wait_after(uid, hash, None, pred).await
    }

    /// [`Observer::wait`] for a report first seen at or after `after`. The
    /// observer may lag the API by a snapshot: wait rather than look once.
    pub async fn wait_after(
        &self,
        uid: &InstanceUid,
        hash: ConfigHash,
        after: Option<Instant>,
        pred: impl Fn(RemoteConfigState) -> bool,
    ) -> Instant {
        let mut recorded = self.recorded.clone();
        let deadline = tokio::time::Instant::now() + self.patience;
        loop {
            recorded.mark_unchanged();
            if let Some(t) = self.first_after(uid, hash, after, &pred) {
                return t;
            }
            let next = tokio::time::timeout_at(deadline, recorded.changed()).await;
            assert!(matches!(next, Ok(Ok(()))), "agent {uid} never reported {hash}");
        }
    }
}

/// The config hash the controller computes for the edge group's single file.
pub fn edge_hash(config: &str) -> ConfigHash {
    super::bundle(&[("", config)]).hash()
}

/// A free temp dir for the controller's state.
pub fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().expect("temp dir");
    let p = d.path().join("state");
    (d, p)
}

/// The uids of the connected agents whose `host.name` starts with `prefix`.
pub fn hosts_named(server: &TestServer, prefix: &str) -> Vec<InstanceUid> {
    server
        .fleet()
        .snapshot()
        .agents
        .values()
        .filter(|r| {
            r.connected
                && r.description
                    .as_ref()
                    .and_then(|d| d.non_identifying.get("host.name"))
                    .is_some_and(|h| h.starts_with(prefix))
        })
        .map(|r| r.uid.clone())
        .collect()
}

/// A hand-driven agent over a raw WebSocket, for behaviour the simulator
/// does not have (ignoring pushes, never answering, turning unhealthy).
/// Replies to its reports are read and dropped; pushes are what it waits for.
pub struct RawAgent {
    pub ws: WsAgent,
    pub uid: InstanceUid,
    wire: Vec<u8>,
    seq: u64,
}

impl RawAgent {
    /// Connects and introduces itself with these attributes, healthy, with
    /// `status` as its remote config status (none for a fresh agent).
    pub async fn connect(
        server: &TestServer,
        wire_uid: Vec<u8>,
        identifying: &[(&str, &str)],
        non_identifying: &[(&str, &str)],
        status: Option<RemoteConfigStatus>,
    ) -> Self {
        let uid = InstanceUid::from_wire(&wire_uid).expect("a valid uid");
        let mut agent = RawAgent {
            ws: server.ws().await,
            uid,
            wire: wire_uid,
            seq: 0,
        };
        let hello = AgentToServer {
            agent_description: Some(description(identifying, non_identifying)),
            health: Some(super::healthy(true)),
            remote_config_status: status,
            ..agent.message()
        };
        agent.ws.send(&hello).await;
        agent
    }

    fn message(&mut self) -> AgentToServer {
        let msg = AgentToServer {
            instance_uid: bytes::Bytes::copy_from_slice(&self.wire),
            sequence_num: self.seq,
            capabilities: SUPERVISOR_CAPS,
            ..Default::default()
        };
        self.seq += 1;
        msg
    }

    /// Sends a remote config status, and health when given.
    pub async fn report(&mut self, status: RemoteConfigStatus, health: Option<ComponentHealth>) {
        let msg = AgentToServer {
            remote_config_status: Some(status),
            health,
            ..self.message()
        };
        self.ws.send(&msg).await;
    }

    /// Waits for the next pushed config; answers its hash and when it arrived.
    pub async fn next_push(&mut self) -> (ConfigHash, Instant) {
        loop {
            let m = self.ws.recv().await;
            if let Some(rc) = m.remote_config {
                let hash = ConfigHash::from_wire(&rc.config_hash).expect("a 32-byte hash");
                return (hash, Instant::now());
            }
        }
    }

    /// Closes the connection without a goodbye (no `agent_disconnect`).
    pub async fn close(self) {
        self.ws.close().await;
    }

    /// Expects no pushed config until `over` completes (replies to reports are fine).
    pub async fn expect_no_push_until(&mut self, over: impl Future<Output = ()>) {
        tokio::pin!(over);
        loop {
            tokio::select! {
                () = &mut over => return,
                m = self.ws.recv() => assert!(
                    m.remote_config.is_none(),
                    "expected no push, got one for {:?}",
                    m.remote_config.map(|rc| ConfigHash::from_wire(&rc.config_hash))
                ),
            }
        }
    }
}
