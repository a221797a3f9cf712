//! Simulated agents against the real server, in-process on 127.0.0.1:0, over
//! both transports: they connect and show in the API, turn healthy once their
//! collector is up, apply a pushed config (APPLYING then APPLIED, effective
//! config reported), crash-loop on the fail text (FAILED, health false),
//! fail at once on invalid YAML, time out on a collector that never turns
//! healthy, go offline when they stop, come back with full state after a
//! server restart, restart their processes, and never loop over HTTP against
//! a server that repeats its config in every reply.

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use bytes::Bytes;
use common::{DEADLINE, TestServer, bundle};
use opamp_gitops::app::ServeConfig;
use opamp_gitops::model::InstanceUid;
use opamp_gitops::opamp::codec;
use opamp_gitops::proto::{
    AgentConfigFile, AgentConfigMap, AgentIdentification, AgentRemoteConfig, AgentToServer, RemoteConfigStatuses,
    ServerToAgent, any_value,
};
use opamp_gitops::simulate::{self, Config, Simulation, TransportKind};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const AGENTS: usize = 3;

fn config(server: &TestServer, transport: TransportKind) -> Config {
    let mut c = Config::new(server.opamp_addr().to_string(), AGENTS);
    c.transport = transport;
    // HTTP agents only hear of a push when they poll.
    c.heartbeat = Duration::from_millis(100);
    c.apply_delay = Duration::from_millis(300);
    c.startup_time = Duration::from_millis(50);
    c.config_apply_timeout = Duration::from_secs(2);
    c.fail_if_contains = Some("SIMULATED-FAILURE".into());
    c.unhealthy_if_contains = Some("SIMULATED-SICKNESS".into());
    c.attrs = vec![
        ("deployment.environment".into(), "e2e".into()),
        ("service.version".into(), "1.0".into()),
    ];
    c
}

/// Waits until `AGENTS` agents are listed and all satisfy `pred`.
async fn wait_all(server: &TestServer, what: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    server
        .wait_agents(what, |list| {
            (list.len() == AGENTS && list.iter().all(&pred)).then(|| list.to_vec())
        })
        .await
}

fn uid_of(agent: &Value) -> InstanceUid {
    InstanceUid::parse_text(agent["instance_uid"].as_str().expect("uid text")).expect("a uid")
}

fn status(agent: &Value) -> (&str, &str, &str) {
    let s = &agent["remote_config_status"];
    (
        s["status"].as_str().unwrap_or(""),
        s["last_remote_config_hash"].as_str().unwrap_or(""),
        s["error_message"].as_str().unwrap_or(""),
    )
}

async fn push_all(server: &TestServer, list: &[Value], files: &[(&str, &str)]) -> String {
    let b = bundle(files);
    for agent in list {
        server
            .fleet()
            .push(uid_of(agent), b.clone())
            .await
            .expect("fleet running");
    }
    b.hash().to_string()
}

async fn stop(sim: Simulation, cancel: CancellationToken) -> simulate::Summary {
    cancel.cancel();
    tokio::time::timeout(DEADLINE, sim.wait())
        .await
        .expect("agents stop in time")
        .expect("simulation ends cleanly")
}

async fn supervisor_lifecycle(transport: TransportKind, transport_name: &str) {
    let server = TestServer::start().await;
    let cancel = CancellationToken::new();
    let sim = simulate::start(config(&server, transport), cancel.clone()).expect("starts");

    let list = wait_all(&server, "agents to connect", |a| a["connected"] == true).await;
    for a in &list {
        assert_eq!(a["transport"], transport_name);
        assert_eq!(a["identifying_attributes"]["service.name"], "otelcol-sim");
        assert_eq!(a["identifying_attributes"]["service.version"], "1.0");
        assert_eq!(
            a["identifying_attributes"]["service.instance.id"], a["instance_uid"],
            "service.instance.id is the uid"
        );
        let host = a["non_identifying_attributes"]["host.name"]
            .as_str()
            .expect("host.name");
        assert!(host.starts_with("sim-"), "{host}");
        assert_eq!(a["non_identifying_attributes"]["deployment.environment"], "e2e");
        let caps: Vec<&str> = a["capabilities"]
            .as_array()
            .expect("caps")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for cap in [
            "ReportsStatus",
            "AcceptsRemoteConfig",
            "ReportsEffectiveConfig",
            "ReportsHealth",
            "ReportsRemoteConfig",
        ] {
            assert!(caps.contains(&cap), "{cap} in {caps:?}");
        }
        assert!(
            a["remote_config_status"].is_null(),
            "UNSET, no status before any config"
        );
    }
    wait_all(&server, "collectors to turn healthy", |a| {
        a["health"]["healthy"] == true
    })
    .await;

    // A good config: APPLYING (visible for the apply delay), then APPLIED with the effective config.
    let good = "receivers:\n  otlp: {}\nexporters:\n  debug: {}\n";
    let hash = push_all(&server, &list, &[("", good)]).await;
    server
        .wait_agents("an agent to report APPLYING", |list| {
            list.iter()
                .any(|a| status(a) == ("APPLYING", hash.as_str(), ""))
                .then_some(())
        })
        .await;
    let list = wait_all(&server, "APPLIED", |a| status(a) == ("APPLIED", hash.as_str(), "")).await;
    for a in &list {
        let one = server
            .api_json(&format!("/api/v1/agents/{}", a["instance_uid"].as_str().expect("uid")))
            .await;
        assert_eq!(one["effective_config"][""], good, "effective config is the pushed file");
        assert_eq!(one["health"]["healthy"], true);
    }

    // The fail text: the collector exits, FAILED at once, health false with
    // the exit; the effective config is the last one the collector ran.
    let failing = push_all(
        &server,
        &list,
        &[("", "processors: {batch: {}}\n# SIMULATED-FAILURE\n")],
    )
    .await;
    let list = wait_all(&server, "FAILED for the fail text", |a| {
        let (s, h, e) = status(a);
        s == "FAILED" && h == failing && e.contains("exited unexpectedly") && e.contains("SIMULATED-FAILURE")
    })
    .await;
    for a in &list {
        let one = server
            .api_json(&format!("/api/v1/agents/{}", a["instance_uid"].as_str().expect("uid")))
            .await;
        assert_eq!(one["effective_config"][""], good, "the last config the collector ran");
        assert_eq!(one["health"]["healthy"], false, "it crash-loops");
        let error = one["health"]["last_error"].as_str().unwrap_or_default();
        assert!(error.contains("exited unexpectedly"), "{error}");
    }

    // Back to a good config: healthy and APPLIED again.
    let again = push_all(&server, &list, &[("", "receivers:\n  otlp: {}\n")]).await;
    let list = wait_all(&server, "APPLIED again", |a| {
        status(a) == ("APPLIED", again.as_str(), "") && a["health"]["healthy"] == true
    })
    .await;

    // A collector that never turns healthy: FAILED at the config apply timeout.
    let sick = push_all(
        &server,
        &list,
        &[("", "exporters: {otlp: {endpoint: SIMULATED-SICKNESS}}\n")],
    )
    .await;
    let list = wait_all(&server, "FAILED at the apply timeout", |a| {
        status(a) == ("FAILED", sick.as_str(), "Config apply timeout exceeded") && a["health"]["healthy"] == false
    })
    .await;

    // Invalid YAML in a named file: FAILED at once, the collector untouched.
    let invalid = push_all(&server, &list, &[("", good), ("extra.yaml", "exporters: [unclosed\n")]).await;
    wait_all(&server, "FAILED for invalid YAML", |a| {
        let (s, h, e) = status(a);
        s == "FAILED" && h == invalid && e.starts_with("cannot parse config named extra.yaml: ")
    })
    .await;

    // Stopping sends agent_disconnect: offline at once, not after missed heartbeats.
    let summary = stop(sim, cancel).await;
    assert_eq!(summary.stats.connected, 0);
    assert_eq!(summary.stats.failed, AGENTS);
    assert!(summary.stats.connects >= AGENTS as u64);
    wait_all(&server, "agents to go offline", |a| a["connected"] == false).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_agents_apply_fail_and_disconnect() {
    supervisor_lifecycle(TransportKind::Ws, "websocket").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_agents_apply_fail_and_disconnect() {
    supervisor_lifecycle(TransportKind::Http, "http").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reconnect_with_full_state_after_a_server_restart() {
    let first = TestServer::start().await;
    let addr = first.opamp_addr();
    let cancel = CancellationToken::new();
    let sim = simulate::start(config(&first, TransportKind::Ws), cancel.clone()).expect("starts");
    let mut stats = sim.stats();
    let list = wait_all(&first, "agents to connect", |a| a["connected"] == true).await;
    let good = "receivers: {otlp: {}}\n";
    let hash = push_all(&first, &list, &[("", good)]).await;
    wait_all(&first, "APPLIED", |a| status(a).0 == "APPLIED").await;
    first.stop().await;
    tokio::time::timeout(DEADLINE, stats.wait_for(|s| s.connected == 0))
        .await
        .expect("agents notice in time")
        .expect("simulation running");

    // A new server on the same address knows nothing; the agents tell it everything.
    let second = TestServer::start_with(ServeConfig {
        opamp_listen: addr,
        ..ServeConfig::local()
    })
    .await;
    let list = wait_all(&second, "agents to reconnect", |a| {
        a["connected"] == true && status(a) == ("APPLIED", hash.as_str(), "") && a["health"]["healthy"] == true
    })
    .await;
    for a in &list {
        assert_eq!(a["identifying_attributes"]["service.name"], "otelcol-sim");
        let one = second
            .api_json(&format!("/api/v1/agents/{}", a["instance_uid"].as_str().expect("uid")))
            .await;
        assert_eq!(one["effective_config"][""], good);
    }
    let summary = stop(sim, cancel).await;
    assert!(summary.stats.connects >= 2 * AGENTS as u64, "{summary}");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agents_come_back_with_their_uid_status_and_config() {
    let server = TestServer::start().await;
    let cancel = CancellationToken::new();
    let mut c = config(&server, TransportKind::Ws);
    c.apply_delay = Duration::from_millis(50);
    // The first restart comes at least 750ms after the start: the push below
    // is applied long before, so no restart catches an agent APPLYING.
    c.restart_every = Some(Duration::from_millis(1500));
    let sim = simulate::start(c, cancel.clone()).expect("starts");
    let mut stats = sim.stats();
    let list = wait_all(&server, "agents to connect healthy", |a| {
        a["connected"] == true && a["health"]["healthy"] == true
    })
    .await;
    let uids: BTreeSet<String> = list.iter().map(|a| a["instance_uid"].to_string()).collect();
    let good = "receivers: {otlp: {}}\n";
    let hash = push_all(&server, &list, &[("", good)]).await;
    wait_all(&server, "APPLIED", |a| status(a) == ("APPLIED", hash.as_str(), "")).await;

    tokio::time::timeout(DEADLINE, stats.wait_for(|s| s.restarts >= 2 * AGENTS as u64))
        .await
        .expect("agents restart in time")
        .expect("simulation running");
    let list = wait_all(&server, "agents back, healthy, still APPLIED", |a| {
        a["connected"] == true && a["health"]["healthy"] == true && status(a) == ("APPLIED", hash.as_str(), "")
    })
    .await;
    let again: BTreeSet<String> = list.iter().map(|a| a["instance_uid"].to_string()).collect();
    assert_eq!(again, uids, "a restart keeps the persisted uid");
    for a in &list {
        let one = server
            .api_json(&format!("/api/v1/agents/{}", a["instance_uid"].as_str().expect("uid")))
            .await;
        assert_eq!(
            one["effective_config"][""], good,
            "the new process runs the persisted config"
        );
    }
    let summary = stop(sim, cancel).await;
    // A restart caught by the stop may not have connected again.
    assert!(summary.stats.restarts >= 2 * AGENTS as u64, "{summary}");
    assert!(summary.stats.connects >= 2 * AGENTS as u64, "{summary}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_without_reports_remote_config_apply_but_report_no_status() {
    // opamp-gitops refuses to push to such agents (they cannot say whether
    // they applied anything), so a server that pushes anyway plays the part.
    let server = MiniServer::repeating(b"receivers: {otlp: {}}\n", [9; 32]).await;
    let mut c = Config::new(format!("http://{}/v1/opamp", server.addr), 1);
    c.transport = TransportKind::Http;
    c.heartbeat = Duration::from_millis(200);
    c.apply_delay = Duration::from_millis(20);
    c.startup_time = Duration::from_millis(20);
    c.no_config_status_fraction = 1.0;
    let cancel = CancellationToken::new();
    let sim = simulate::start(c, cancel.clone()).expect("starts");

    server
        .until("the pushed config running", |requests| {
            requests
                .iter()
                .any(|m| {
                    m.effective_config
                        .as_ref()
                        .and_then(|e| e.config_map.as_ref())
                        .and_then(|m| m.config_map.get(""))
                        .is_some_and(|f| f.body.as_ref() == b"receivers: {otlp: {}}\n")
                })
                .then_some(())
        })
        .await;
    let requests = server.requests();
    let caps = requests[0].capabilities;
    assert_eq!(caps & 0x2, 0x2, "accepts remote config");
    assert_eq!(caps & 0x1000, 0, "does not report it");
    for m in &requests {
        if let Some(s) = &m.remote_config_status {
            assert!(
                s.last_remote_config_hash.is_empty() && s.status() == RemoteConfigStatuses::Unset,
                "only the initial UNSET status, never one for a config: {s:?}"
            );
        }
    }
    stop(sim, cancel).await;
}

/// Every request a [`MiniServer`] got, in order, published as each arrives.
type Requests = Arc<watch::Sender<Vec<AgentToServer>>>;

/// A tiny plain-HTTP OpAMP server on 127.0.0.1:0 that answers every request
/// with `respond` and keeps every request.
struct MiniServer {
    addr: SocketAddr,
    requests: Requests,
}

type Respond = Arc<dyn Fn(&AgentToServer) -> ServerToAgent + Send + Sync>;

impl MiniServer {
    async fn start(respond: impl Fn(&AgentToServer) -> ServerToAgent + Send + Sync + 'static) -> Self {
        async fn opamp(State((requests, respond)): State<(Requests, Respond)>, body: Bytes) -> impl IntoResponse {
            let msg: AgentToServer = codec::decode_http(&body, None, 1 << 20).expect("an AgentToServer");
            let reply = respond(&msg);
            requests.send_modify(|all| all.push(msg));
            (
                [(CONTENT_TYPE, "application/x-protobuf")],
                codec::encode_http(&reply, false),
            )
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(watch::Sender::new(Vec::new()));
        let respond: Respond = Arc::new(respond);
        let app = axum::Router::new()
            .route("/v1/opamp", axum::routing::post(opamp))
            .with_state((requests.clone(), respond));
        tokio::spawn(async move { axum::serve(listener, app).await });
        MiniServer { addr, requests }
    }

    /// A server that puts this config (the main file) in every reply, as
    /// the opamp-go example server does.
    async fn repeating(body: &'static [u8], hash: [u8; 32]) -> Self {
        let remote = AgentRemoteConfig {
            config: Some(AgentConfigMap {
                config_map: HashMap::from([(
                    String::new(),
                    AgentConfigFile {
                        body: Bytes::from_static(body),
                        content_type: "text/yaml".into(),
                    },
                )]),
            }),
            config_hash: Bytes::copy_from_slice(&hash),
        };
        MiniServer::start(move |_| ServerToAgent {
            remote_config: Some(remote.clone()),
            ..ServerToAgent::default()
        })
        .await
    }

    fn requests(&self) -> Vec<AgentToServer> {
        self.requests.borrow().clone()
    }

    /// Looks at the requests as each arrives until `pick` takes them; fails after [`DEADLINE`].
    async fn until<T>(&self, what: &str, mut pick: impl FnMut(&[AgentToServer]) -> Option<T>) -> T {
        let mut found = None;
        let mut rx = self.requests.subscribe();
        let wait = rx.wait_for(|all| {
            found = pick(all);
            found.is_some()
        });
        tokio::time::timeout(DEADLINE, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("the server runs");
        found.expect("just found")
    }
}

fn remote_status(msg: &AgentToServer) -> Option<RemoteConfigStatuses> {
    msg.remote_config_status.as_ref().map(|s| s.status())
}

fn host_name(msg: &AgentToServer) -> Option<String> {
    let d = msg.agent_description.as_ref()?;
    d.non_identifying_attributes.iter().find_map(|kv| {
        match (kv.key.as_str(), kv.value.as_ref().and_then(|v| v.value.as_ref())) {
            ("host.name", Some(any_value::Value::StringValue(s))) => Some(s.clone()),
            _ => None,
        }
    })
}

/// Against a server that repeats its config in every reply (as the opamp-go
/// example server does), an HTTP agent sends its polls and its status
/// changes, and nothing more: a repeated hash is answered by nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_agent_does_not_loop_on_a_server_that_repeats_its_config() {
    let server = MiniServer::repeating(b"receivers: {otlp: {}}\n", [7; 32]).await;
    let mut c = Config::new(format!("http://{}/v1/opamp", server.addr), 1);
    c.transport = TransportKind::Http;
    c.heartbeat = Duration::from_millis(500);
    c.apply_delay = Duration::from_millis(50);
    c.startup_time = Duration::from_millis(50);
    let cancel = CancellationToken::new();
    let sim = simulate::start(c, cancel.clone()).expect("starts");

    let applied_at = server
        .until("APPLIED to be reported", |requests| {
            let i = requests
                .iter()
                .position(|m| remote_status(m) == Some(RemoteConfigStatuses::Applied))?;
            Some(i + 1)
        })
        .await;
    // One poll later: a loop would have sent hundreds of requests by then.
    server
        .until("a poll after APPLIED", |requests| {
            (requests.len() > applied_at).then_some(())
        })
        .await;
    let requests = server.requests();
    let kinds: Vec<String> = requests
        .iter()
        .map(|m| {
            format!(
                "#{} {:?} health={:?}",
                m.sequence_num,
                remote_status(m),
                m.health.as_ref().map(|h| h.healthy)
            )
        })
        .collect();
    // The first message (UNSET), APPLYING, healthy with APPLIED, then polls.
    assert_eq!(applied_at, 3, "{kinds:?}");
    assert!(requests.len() <= applied_at + 2, "{kinds:?}");
    assert_eq!(
        remote_status(&requests[0]),
        Some(RemoteConfigStatuses::Unset),
        "{kinds:?}"
    );
    assert_eq!(
        remote_status(&requests[1]),
        Some(RemoteConfigStatuses::Applying),
        "{kinds:?}"
    );
    assert!(requests[2].health.as_ref().is_some_and(|h| h.healthy), "{kinds:?}");
    for (i, m) in requests.iter().enumerate() {
        assert_eq!(m.sequence_num, i as u64, "{kinds:?}");
    }
    for poll in &requests[applied_at..] {
        assert_eq!(
            (
                remote_status(poll),
                poll.health.as_ref(),
                poll.effective_config.as_ref()
            ),
            (None, None, None),
            "{kinds:?}"
        );
    }
    stop(sim, cancel).await;
}

/// Clones share a uid but not a host name; a server that sees one uid with
/// two descriptions gives the newcomer a new uid, which it adopts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloned_agents_take_the_new_uid_a_server_assigns() {
    let first_host: Arc<Mutex<HashMap<Vec<u8>, String>>> = Arc::default();
    let hosts = Arc::clone(&first_host);
    let server = MiniServer::start(move |msg| {
        let Some(host) = host_name(msg) else {
            return ServerToAgent::default();
        };
        let mut hosts = hosts.lock().expect("hosts lock");
        let known = hosts.entry(msg.instance_uid.to_vec()).or_insert_with(|| host.clone());
        if *known == host {
            return ServerToAgent::default();
        }
        ServerToAgent {
            agent_identification: Some(AgentIdentification {
                new_instance_uid: Bytes::copy_from_slice(uuid::Uuid::now_v7().as_bytes()),
            }),
            ..ServerToAgent::default()
        }
    })
    .await;
    let mut c = Config::new(format!("http://{}/v1/opamp", server.addr), 4);
    c.transport = TransportKind::Http;
    c.heartbeat = Duration::from_millis(200);
    c.clone_fraction = 0.5;
    let cancel = CancellationToken::new();
    let sim = simulate::start(c, cancel.clone()).expect("starts");

    let first: BTreeMap<String, Vec<u8>> = server
        .until("all four hosts to introduce themselves", |requests| {
            let mut first = BTreeMap::new();
            for m in requests {
                if let Some(host) = host_name(m) {
                    first.entry(host).or_insert(m.instance_uid.to_vec());
                }
            }
            (first.len() == 4).then_some(first)
        })
        .await;
    let uids: BTreeSet<&Vec<u8>> = first.values().collect();
    assert_eq!(uids.len(), 2, "two pairs of clones: {first:?}");
    assert_eq!(first["sim-0"], first["sim-1"]);
    assert_eq!(first["sim-2"], first["sim-3"]);

    server
        .until("four uids, one per host", |requests| {
            let last: BTreeMap<String, Vec<u8>> = requests
                .iter()
                .filter_map(|m| Some((host_name(m)?, m.instance_uid.to_vec())))
                .collect();
            let distinct: BTreeSet<&Vec<u8>> = last.values().collect();
            (last.len() == 4 && distinct.len() == 4).then_some(())
        })
        .await;
    let hosts = first_host.lock().expect("hosts lock").clone();
    assert_eq!(hosts.len(), 4, "each uid now belongs to one host: {hosts:?}");
    stop(sim, cancel).await;
}
