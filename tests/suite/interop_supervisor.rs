//! The real OpAMP supervisor running a real OpenTelemetry Collector, against
//! the controller on a real git repository: the pair that `interop/build.sh`
//! builds into `interop/bin/`, configured with the supervisor configs shipped
//! in `deploy/supervisor/`. Everything on 127.0.0.1.

use crate::common;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::gitops::{GitRepo, Observer, fleet_yaml, serve_config, state_dir};
use common::process::{Controller, any_port, assert_resumed};
use common::{Body, TestServer, eventually_within, http_request, wait_agents_at};
use opamp_gitops::fleet::RemoteConfigState;
use opamp_gitops::model::{CommitId, ConfigHash, GroupName, InstanceUid};
use opamp_gitops::reconcile::{Phase, canary_order};

/// Real processes start slowly (the supervisor runs the collector once to
/// learn its description): conditions get this long.
const PATIENCE: Duration = Duration::from_secs(120);

/// The collectors' apply window: the supervisor reports APPLIED this long
/// after a config arrives (when the collector is healthy by then).
const APPLY_WINDOW: &str = "2s";

fn interop_bin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the real supervisor and collector with interop/build.sh \
         (scripts/test does that before running the tests)",
        path.display()
    );
    path
}

/// A free port below the ephemeral range, so that no process's own
/// outgoing or ephemeral bind (the supervisor and collector make several)
/// can take it between now and the collector's start.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = u64::from(std::process::id()) * 7919 + NEXT.fetch_add(1, Ordering::Relaxed) * 104_729;
    (0..1000u64)
        .map(|i| 20_000 + ((seed + i * 6_151) % 10_000) as u16)
        .find(|port| TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free port between 20000 and 30000")
}

/// Polls `f` until it returns `Some`, for up to [`PATIENCE`]: for what only
/// the real processes know (their ports), which nothing publishes.
async fn wait_for<T>(what: &str, f: impl AsyncFnMut() -> Option<T>) -> T {
    eventually_within(PATIENCE, what, f).await
}

/// Whether something answers HTTP on `port`, and with what status.
async fn http_status(port: u16, path: &str) -> Option<u16> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    tokio::net::TcpStream::connect(addr).await.ok()?;
    Some(http_request(addr, "GET", path, &[], Body::Empty).await.status)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    WebSocket,
    Http,
}

/// One supervisor and the collector it runs, with storage of its own that
/// survives restarts, and two ports of its own for its collector's config
/// (`OTLP_PORT`, `HEALTH_PORT`).
struct Pair {
    name: String,
    transport: Transport,
    dir: tempfile::TempDir,
    opamp: SocketAddr,
    otlp_port: u16,
    health_port: u16,
    /// The attributes the shipped configs take from the environment.
    role: &'static str,
    service_name: &'static str,
    /// Over TLS, trusting this CA file, with this bearer token.
    secure: Option<(PathBuf, String)>,
    child: Option<Child>,
}

impl Pair {
    fn start(name: &str, transport: Transport, opamp: SocketAddr) -> Pair {
        Pair::start_as(name, transport, opamp, ("otelcol-agent", "app"))
    }

    /// A pair whose supervisor reports `service.name` and `agent.role` as given.
    fn start_as(
        name: &str,
        transport: Transport,
        opamp: SocketAddr,
        (service_name, role): (&'static str, &'static str),
    ) -> Pair {
        Pair::launch(name, transport, opamp, (service_name, role), None)
    }

    /// A pair whose supervisor connects over wss:// (or https://), trusting
    /// the CA in `ca_file`, and sends `token` as its bearer token.
    fn start_secure(name: &str, transport: Transport, opamp: SocketAddr, ca_file: &Path, token: &str) -> Pair {
        let secure = Some((ca_file.to_path_buf(), token.to_string()));
        Pair::launch(name, transport, opamp, ("otelcol-agent", "app"), secure)
    }

    fn launch(
        name: &str,
        transport: Transport,
        opamp: SocketAddr,
        (service_name, role): (&'static str, &'static str),
        secure: Option<(PathBuf, String)>,
    ) -> Pair {
        let mut pair = Pair {
            name: name.to_string(),
            transport,
            dir: tempfile::tempdir().expect("temp dir"),
            opamp,
            otlp_port: free_port(),
            health_port: free_port(),
            role,
            service_name,
            secure,
            child: None,
        };
        pair.spawn();
        pair
    }

    /// The shipped supervisor config, with two settings for several
    /// collectors on one host: their own metrics endpoint off (they would
    /// all take port 8888), and a quick exit once orphaned.
    fn config(&self) -> PathBuf {
        let shipped = match self.transport {
            Transport::WebSocket => "supervisor-ws.yaml",
            Transport::Http => "supervisor-http.yaml",
        };
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deploy/supervisor")
                .join(shipped),
        )
        .expect("the shipped supervisor config");
        assert!(text.contains("\nagent:\n"), "the shipped config has an agent section");
        let mut text = text.replacen(
            "\nagent:\n",
            "\nagent:\n  args: [\"--set=service::telemetry::metrics::level=none\"]\n  orphan_detection_interval: 500ms\n",
            1,
        );
        if let Some((ca_file, token)) = &self.secure {
            // As docs/security.md tells an operator to set them.
            let server = format!(
                "\nserver:\n  headers:\n    Authorization: [\"Bearer {token}\"]\n  tls:\n    ca_file: {}\n",
                ca_file.display()
            );
            text = text.replacen("\nserver:\n", &server, 1);
        }
        let path = self.dir.path().join("supervisor.yaml");
        std::fs::write(&path, text).expect("write the supervisor config");
        path
    }

    /// Starts (or restarts) the supervisor on the same storage.
    fn spawn(&mut self) {
        let scheme = match (self.transport, self.secure.is_some()) {
            (Transport::WebSocket, false) => "ws",
            (Transport::Http, false) => "http",
            (Transport::WebSocket, true) => "wss",
            (Transport::Http, true) => "https",
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("supervisor.log"))
            .expect("log file");
        let child = Command::new(interop_bin("opampsupervisor"))
            .arg("--config")
            .arg(self.config())
            .env("OPAMP_ENDPOINT", format!("{scheme}://{}/v1/opamp", self.opamp))
            .env("CONFIG_APPLY_TIMEOUT", APPLY_WINDOW)
            .env("OTELCOL_EXECUTABLE", interop_bin("otelcol"))
            .env("SUPERVISOR_STORAGE_DIR", self.dir.path().join("storage"))
            .env("AGENT_ROLE", self.role)
            .env("SERVICE_NAME", self.service_name)
            .env("OTLP_PORT", self.otlp_port.to_string())
            .env("HEALTH_PORT", self.health_port.to_string())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("the supervisor starts");
        self.child = Some(child);
    }

    /// SIGKILL to the supervisor and its collector, as a service manager
    /// kills a service (the process group).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `--` first: without it `-<pgid>` may be read as an option.
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.kill();
            c.wait().expect("reaped");
        }
    }

    /// The instance uid the supervisor persisted (once it has started).
    fn uid(&self) -> Option<InstanceUid> {
        let state = std::fs::read_to_string(self.dir.path().join("storage/persistent_state.yaml")).ok()?;
        let id = state.lines().find_map(|l| l.trim().strip_prefix("instance_id:"))?;
        InstanceUid::parse_text(id.trim().trim_matches('"'))
    }

    /// The last lines of the supervisor's log and of its collector's.
    fn log_tail(&self) -> String {
        let tail = |file: &str| {
            let log = std::fs::read_to_string(self.dir.path().join(file)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(12)..].join("\n")
        };
        format!(
            "{}\n--- its collector ---\n{}",
            tail("supervisor.log"),
            tail("storage/agent.log")
        )
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- {} ({:?}) supervisor log tail ---\n{}",
                self.name,
                self.transport,
                self.log_tail()
            );
        }
    }
}

/// The group's collector config: an OTLP/HTTP receiver on the pair's own
/// port, `marker` to tell versions apart, `extra` appended at the top level.
fn collector_config(marker: &str, extensions: &str, debug: &str) -> String {
    format!(
        "# {marker}\n\
         receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:${{env:OTLP_PORT}}\n\
         processors:\n  batch: {{}}\n\
         exporters:\n  debug:{debug}\n\
         {extensions}\
         service:\n  pipelines:\n    traces:\n      receivers: [otlp]\n      processors: [batch]\n      exporters: [debug]\n"
    )
}

const HEALTH_CHECK: &str = "extensions:\n  health_check:\n    endpoint: 127.0.0.1:${env:HEALTH_PORT}\n";

fn group(policy: &str) -> String {
    format!(
        "selector:\n  match_attributes:\n    service.name: otelcol-agent\n    agent.role: app\nconfig:\n  \"\": configs/agents.yaml\nrollout:\n{policy}"
    )
}

fn commit(repo: &GitRepo, policy: &str, config: &str, message: &str) -> CommitId {
    repo.commit(
        &[
            ("fleet.yaml", &fleet_yaml("1h")),
            ("groups/agents.yaml", &group(policy)),
            ("configs/agents.yaml", config),
        ],
        message,
    )
}

/// A first commit whose one group selects nobody: the supervisors connect
/// and start before any config is pushed to them. (A config that reaches a
/// supervisor while it is still starting can be reported APPLIED without its
/// collector ever running it: the supervisor drops the restart signal.)
fn commit_before_the_fleet(repo: &GitRepo) {
    let nobody = group("  waves: [100%]\n").replace("agent.role: app", "agent.role: nobody");
    let config = collector_config("v0", "", " {}");
    repo.commit(
        &[
            ("fleet.yaml", &fleet_yaml("1h")),
            ("groups/agents.yaml", &nobody),
            ("configs/agents.yaml", &config),
        ],
        "before the fleet",
    );
}

/// Waits until every agent the API on `api` lists is connected and healthy, `n` of them.
async fn fleet_started(api: SocketAddr, n: usize) {
    wait_agents_at(api, "every supervisor to start its collector", PATIENCE, |agents| {
        (agents.len() == n
            && agents
                .iter()
                .all(|a| a["connected"] == true && a["health"]["healthy"] == true))
        .then_some(())
    })
    .await;
}

/// The controller in this process, offering a 1 s heartbeat so that plain-HTTP
/// supervisors poll (and receive pushes) every second instead of every 30.
async fn controller(repo: &GitRepo) -> (TestServer, tempfile::TempDir) {
    let (tmp, state) = state_dir();
    let mut config = serve_config(repo.path(), &state);
    config.offer_heartbeat_interval = Some(Duration::from_secs(1));
    (TestServer::start_with(config).await, tmp)
}

async fn wait_group(server: &TestServer, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    server.wait_group_within(PATIENCE, "agents", what, pred).await
}

fn hash_of(files: &[(&str, &str)]) -> ConfigHash {
    common::bundle(files).hash()
}

/// The uids of the pairs, once each supervisor has persisted one and its
/// agent is connected.
async fn uids(server: &TestServer, pairs: &[Pair]) -> Vec<InstanceUid> {
    server
        .until_within(PATIENCE, "every supervisor to connect", async || {
            let uids: Option<Vec<InstanceUid>> = pairs.iter().map(Pair::uid).collect();
            let uids = uids?;
            let snap = server.fleet().snapshot();
            uids.iter()
                .all(|u| snap.get(u).is_some_and(|r| r.connected))
                .then_some(uids)
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_real_collectors_take_a_change_in_waves_refuse_a_bad_one_at_the_canary_and_revert() {
    let policy = "  waves: [1, 50%, 100%]\n  bake: 1s\n  apply_timeout: 30s\n";
    let repo = GitRepo::new();
    let v1 = collector_config("v1", "", " {}");
    commit_before_the_fleet(&repo);
    let (server, _state) = controller(&repo).await;
    let observer = Observer::start(&server);
    let kinds = [
        Transport::WebSocket,
        Transport::WebSocket,
        Transport::WebSocket,
        Transport::Http,
        Transport::Http,
        Transport::Http,
    ];
    let pairs: Vec<Pair> = kinds
        .iter()
        .enumerate()
        .map(|(i, t)| Pair::start(&format!("pair-{i}"), *t, server.opamp_addr()))
        .collect();
    let uids = uids(&server, &pairs).await;
    fleet_started(server.api_addr(), 6).await;
    commit(&repo, policy, &v1, "v1");
    server.sync().await;

    // 1. Every pair is listed with what its supervisor reports, in the group
    // its selector matches, in sync after the first rollout.
    let v1_hash = hash_of(&[("", &v1)]);
    wait_group(&server, "v1 on all six", |g| {
        g["config_hash"] == v1_hash.to_string().as_str()
            && g["rollout"]["phase"] == "complete"
            && g["agents"]["applied"] == 6
    })
    .await;
    for (pair, uid) in pairs.iter().zip(&uids) {
        let a = server.api_json(&format!("/api/v1/agents/{uid}")).await;
        assert_eq!(a["group"], "agents", "{}: {a}", pair.name);
        assert_eq!(a["state"], "in_sync", "{}: {a}", pair.name);
        assert_eq!(a["identifying_attributes"]["service.name"], "otelcol-agent");
        assert_eq!(a["non_identifying_attributes"]["agent.role"], "app");
        assert!(a["non_identifying_attributes"]["os.type"].is_string(), "{a}");
        let transport = match pair.transport {
            Transport::WebSocket => "websocket",
            Transport::Http => "http",
        };
        assert_eq!(a["transport"], transport);
        assert!(
            a["capabilities"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == "ReportsRemoteConfig")
        );
        assert_eq!(http_status(pair.health_port, "/").await, None, "no health_check yet");
        wait_for("the OTLP receiver of v1", async || {
            http_status(pair.otlp_port, "/v1/traces").await
        })
        .await;
    }

    // 2. A good change rolls out wave by wave, and each collector runs it.
    let v2 = collector_config("v2", HEALTH_CHECK, " {}");
    let v2 = v2.replace("service:\n", "service:\n  extensions: [health_check]\n");
    commit(&repo, policy, &v2, "v2: a health_check endpoint");
    server.sync().await;
    let v2_hash = hash_of(&[("", &v2)]);
    let g = wait_group(&server, "v2 ended", |g| {
        g["config_hash"] == v2_hash.to_string().as_str() && g["rollout"]["phase"] != "progressing"
    })
    .await;
    assert_eq!(g["rollout"]["phase"], "complete", "{g}");
    assert_eq!(g["rollout"]["waves"], 3);
    let order = canary_order(&GroupName::new("agents"), uids.clone());
    let applied_at = |u: &InstanceUid| {
        observer
            .first(u, v2_hash, |s| s == RemoteConfigState::Applied)
            .expect("applied v2")
    };
    let received_at = |u: &InstanceUid| observer.first(u, v2_hash, |_| true).expect("received v2");
    // Waves of 1, 3 and 6 agents: no agent of a wave received v2 before
    // every agent of the waves before it had applied it.
    for (wave, (done, next)) in [(0..1, 1..3), (0..3, 3..6)].into_iter().enumerate() {
        let last_applied = order[done].iter().map(applied_at).max().unwrap();
        for u in &order[next] {
            assert!(received_at(u) > last_applied, "wave {}: {u} got v2 too early", wave + 2);
        }
    }
    for (pair, uid) in pairs.iter().zip(&uids) {
        let a = server.api_json(&format!("/api/v1/agents/{uid}")).await;
        let effective = a["effective_config"][""].as_str().unwrap_or_default();
        assert!(effective.contains("health_check"), "{}: {effective}", pair.name);
        let status = wait_for("the health_check endpoint", async || {
            http_status(pair.health_port, "/").await
        })
        .await;
        assert_eq!(status, 200, "{}: v2 opened the health_check port", pair.name);
    }

    // 3. A change our checks pass but the collector refuses: the canary
    // fails, the rollout halts, the canary gets v2 back, nobody else sees it.
    let v3 = v2.replace("  debug: {}\n", "  debug:\n    verbosity: loud\n");
    assert_ne!(v3, v2);
    commit(&repo, policy, &v3, "v3: a verbosity the collector does not know");
    server.sync().await;
    let v3_hash = hash_of(&[("", &v3)]);
    let g = wait_group(&server, "v3 halted", |g| g["rollout"]["phase"] == "halted").await;
    assert_eq!(g["rollout"]["wave"], 1, "{g}");
    let failure = &g["rollout"]["failures"][0];
    assert_eq!(
        failure["agent"],
        order[0].to_string().as_str(),
        "the canary failed: {g}"
    );
    let error = failure["error"].as_str().unwrap_or_default();
    eprintln!("the supervisor's FAILED message: {error}");
    assert!(error.contains("exit"), "the supervisor says the collector exited: {g}");
    let canary = server
        .wait_agent_json(&order[0], "the canary back on v2, healthy, in sync", |a| {
            // The state is the next plan's verdict on what the agent reports.
            a["remote_config_status"]["last_remote_config_hash"] == v2_hash.to_string().as_str()
                && a["remote_config_status"]["status"] == "APPLIED"
                && a["health"]["healthy"] == true
                && a["state"] == "in_sync"
        })
        .await;
    assert_eq!(canary["state"], "in_sync", "{canary}");
    for u in &order[1..] {
        assert!(!observer.received(u, v3_hash), "{u} received the refused config");
    }

    // 4. git revert: the group is back to complete at once.
    let revert = commit(
        &repo,
        policy,
        &v2,
        "Revert \"v3: a verbosity the collector does not know\"",
    );
    server.sync().await;
    let g = wait_group(&server, "the revert complete", |g| {
        g["rollout"]["commit"] == revert.as_str() && g["rollout"]["phase"] == "complete"
    })
    .await;
    assert_eq!(
        (g["rollout"]["wave"].as_u64(), g["rollout"]["waves"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(g["agents"]["applied"], 6, "{g}");
    assert_eq!(g["config_hash"], v2_hash.to_string().as_str());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisors_killed_during_the_bake_or_while_applying_do_not_stop_a_good_rollout() {
    let policy = "  waves: [1, 100%]\n  bake: 3s\n  apply_timeout: 20s\n";
    let repo = GitRepo::new();
    let v1 = collector_config("v1", "", " {}");
    commit_before_the_fleet(&repo);
    let (server, _state) = controller(&repo).await;
    let observer = Observer::start(&server).with_patience(PATIENCE);
    let kinds = [Transport::WebSocket, Transport::WebSocket, Transport::Http];
    let mut pairs: Vec<Pair> = kinds
        .iter()
        .enumerate()
        .map(|(i, t)| Pair::start(&format!("pair-{i}"), *t, server.opamp_addr()))
        .collect();
    let uids = uids(&server, &pairs).await;
    fleet_started(server.api_addr(), 3).await;
    commit(&repo, policy, &v1, "v1");
    server.sync().await;
    wait_group(&server, "v1 on all three", |g| {
        g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == 3
    })
    .await;
    let order = canary_order(&GroupName::new("agents"), uids.clone());
    let pair_of = |u: &InstanceUid| uids.iter().position(|x| x == u).expect("a pair's uid");

    let v2 = collector_config("v2", "", "\n    verbosity: basic");
    commit(&repo, policy, &v2, "v2");
    server.sync().await;
    let v2_hash = hash_of(&[("", &v2)]);

    // The canary applied v2 and its wave bakes: its supervisor is killed
    // and comes back, resending its saved status, unhealthy at first.
    observer
        .wait(&order[0], v2_hash, |s| s == RemoteConfigState::Applied)
        .await;
    let canary = pair_of(&order[0]);
    pairs[canary].kill();
    pairs[canary].spawn();

    // In the next wave, one supervisor is killed while it applies v2.
    let second = pair_of(&order[1]);
    observer
        .wait(&order[1], v2_hash, |s| s == RemoteConfigState::Applying)
        .await;
    pairs[second].kill();
    pairs[second].spawn();

    let v2_text = v2_hash.to_string();
    let g = wait_group(&server, "v2 ended", |g| {
        g["config_hash"] == v2_text.as_str() && g["rollout"]["phase"] != "progressing"
    })
    .await;
    assert_eq!(g["rollout"]["phase"], "complete", "{g}");
    assert_eq!(g["rollout"]["failures"].as_array().map(Vec::len), Some(0), "{g}");
    for u in &uids {
        server
            .wait_agent_json(u, "in sync on v2", |a| {
                a["state"] == "in_sync" && a["remote_config_status"]["last_remote_config_hash"] == v2_text.as_str()
            })
            .await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_killed_mid_rollout_resumes_at_the_same_wave_with_the_real_pairs() {
    let repo = GitRepo::new();
    let v1 = collector_config("v1", "", " {}");
    commit_before_the_fleet(&repo);
    let state = tempfile::tempdir().expect("temp dir");
    let start = async |opamp, grace: &'static str| {
        let args = ["--startup-grace", grace, "--offer-heartbeat-interval", "1s"];
        Controller::start(repo.path(), state.path(), (opamp, any_port()), "agents", &args)
            .await
            .with_patience(PATIENCE)
    };
    let controller = start(any_port(), "0s").await;
    let opamp = controller.opamp;
    let _pairs: Vec<Pair> = (0..3)
        .map(|i| Pair::start(&format!("pair-{i}"), Transport::WebSocket, opamp))
        .collect();
    fleet_started(controller.api, 3).await;
    commit(&repo, "  waves: [100%]\n  bake: 0s\n", &v1, "v1");
    controller
        .wait_group("v1 on all three", |g| {
            g["rollout"]["phase"] == "complete" && g["agents"]["applied"] == 3
        })
        .await;

    // v2 in waves of 1, 2 and 3 agents, with a bake that never ends by itself.
    let v1_pushes = controller.wave_pushes().await;
    let v2 = collector_config("v2", "", "\n    verbosity: basic");
    commit(&repo, "  waves: [1, 2, 100%]\n  bake: 1h\n", &v2, "v2");
    let h2 = hash_of(&[("", &v2)]).to_string();
    let before = controller.promote_to_wave_two(&h2, 2, v1_pushes).await;
    controller.kill().await;

    // The same state and OpAMP address; the supervisors reconnect during the
    // start-up grace.
    let controller = start(opamp, "5s").await;
    let after = controller
        .wait_group("the resumed rollout", |g| {
            g["config_hash"] == h2.as_str() && g["agents"]["applied"] == 2 && g["agents"]["pending"] == 1
        })
        .await;
    assert_resumed(&before, &after);
    // Plans after that: nobody of waves 1-2 was pushed again; then wave 3
    // and complete, with only its agent pushed.
    let done = controller.resume_to_complete(Duration::ZERO, 3, 1).await;
    assert_eq!(done["rollout"]["failures"].as_array().map(Vec::len), Some(0), "{done}");
}

/// The example repository's groups select the agents the shipped supervisor
/// configs describe: an app agent, a host-metrics agent and a gateway, told
/// apart by the environment the configs read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_repository_selects_the_agents_the_shipped_supervisor_configs_describe() {
    let repo = GitRepo::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("example-repo");
    let mut files = vec![];
    for dir in ["", "groups", "configs", "configs/common"] {
        for entry in std::fs::read_dir(example.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() && path.extension().is_some_and(|e| e == "yaml") {
                let rel = path.strip_prefix(&example).unwrap().to_str().unwrap().to_string();
                files.push((rel, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let files: Vec<(&str, &str)> = files.iter().map(|(p, b)| (p.as_str(), b.as_str())).collect();
    repo.commit(&files, "the example repository");
    let (server, _state) = controller(&repo).await;
    let kinds = [
        ("otelcol-agent", "app", "app-trace-agents"),
        ("otelcol-agent", "infra", "infra-metrics-agents"),
        ("otelcol-gateway", "app", "edge-gateways"),
    ];
    let pairs: Vec<Pair> = kinds
        .iter()
        .enumerate()
        .map(|(i, (service, role, _))| {
            Pair::start_as(
                &format!("pair-{i}"),
                Transport::WebSocket,
                server.opamp_addr(),
                (service, role),
            )
        })
        .collect();
    let uids = uids(&server, &pairs).await;
    let groups = wait_agents_at(
        server.api_addr(),
        "each agent to be placed in a group",
        PATIENCE,
        |agents| {
            let placed: Option<Vec<String>> = uids
                .iter()
                .map(|u| {
                    let a = agents.iter().find(|a| a["instance_uid"] == u.to_string())?;
                    a["group"].as_str().map(String::from)
                })
                .collect();
            placed
        },
    )
    .await;
    let expected: Vec<&str> = kinds.iter().map(|(_, _, g)| *g).collect();
    assert_eq!(groups, expected);
    drop(pairs);
    server.stop().await;
}

/// Real supervisors over TLS with agent tokens: with the right token, one
/// over wss:// and one polling over https:// connect, are bound to the
/// token's name and take a rollout; one with a wrong token is refused and
/// never gets a config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_supervisors_connect_over_wss_and_https_with_a_token_and_one_with_a_wrong_token_gets_nothing() {
    use sha2::Digest as _;
    let certs = tempfile::tempdir().expect("temp dir");
    let ca = common::certs::Ca::new("fleet CA");
    let tls = common::certs::server_files(certs.path(), &ca, None);
    let ca_file = certs.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).expect("write the CA");
    let tokens = certs.path().join("agents.yaml");
    let digest = hex::encode(sha2::Sha256::digest(b"edge-secret"));
    std::fs::write(&tokens, format!("- {{name: edge-hosts, sha256: {digest}}}\n")).expect("write the tokens");

    let repo = GitRepo::new();
    commit_before_the_fleet(&repo);
    let (_tmp, state) = state_dir();
    let mut config = serve_config(repo.path(), &state);
    config.tls = Some(tls);
    config.agent_tokens = Some(tokens);
    config.offer_heartbeat_interval = Some(Duration::from_secs(1));
    let server = TestServer::start_with(config).await;
    let opamp = server.opamp_addr();
    let good = [
        Pair::start_secure("good-wss", Transport::WebSocket, opamp, &ca_file, "edge-secret"),
        Pair::start_secure("good-https", Transport::Http, opamp, &ca_file, "edge-secret"),
    ];
    let bad = Pair::start_secure("bad", Transport::WebSocket, opamp, &ca_file, "guessed");
    for uid in uids(&server, &good).await {
        let record = server.wait_agent(uid.as_bytes(), |r| r.identity.is_some()).await;
        assert_eq!(
            record.identity.as_ref().map(|i| &*i.name),
            Some("edge-hosts"),
            "bound to the token's name"
        );
    }

    // The API is on TLS too: the controller is asked in this process.
    let v1 = collector_config("v1", "", " {}");
    commit(&repo, "  waves: [100%]\n  apply_timeout: 30s\n", &v1, "v1");
    let git = server.running.git.as_ref().expect("a git source");
    git.sync().await.expect("the commit is read");
    let driver = server.running.driver.as_ref().expect("a driver");
    let v1_hash = hash_of(&[("", &v1)]);
    server
        .until_within(PATIENCE, "v1 applied over wss:// and https://", async || {
            let status = driver.status();
            let g = status.groups.get(&GroupName::new("agents"))?;
            (g.config_hash == v1_hash && g.phase == Phase::Complete && g.agents.applied == 2).then_some(())
        })
        .await;

    // The supervisor with the wrong token was answered 401 (its log says
    // so) and is not an agent of the fleet.
    eventually_within(PATIENCE, "the wrong token to be refused", async || {
        let log = std::fs::read_to_string(bad.dir.path().join("supervisor.log")).ok()?;
        log.contains("Server responded with status=401 Unauthorized")
            .then_some(())
    })
    .await;
    let bad_uid = bad.uid().expect("the refused supervisor made its uid");
    let fleet = server.fleet().snapshot();
    assert!(fleet.get(&bad_uid).is_none(), "the wrong token is refused");
    assert_eq!(
        fleet.sorted().len(),
        2,
        "only the supervisors with the right token are agents"
    );
    server.stop().await;
}
