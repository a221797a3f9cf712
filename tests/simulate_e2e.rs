//! Simulated agents against the real server, in-process on 127.0.0.1:0, over
//! both transports: they connect and show in the API, turn healthy once their
//! collector is up, apply a pushed config (APPLYING then APPLIED, effective
//! config reported), crash-loop on the fail text (FAILED, health false),
//! fail at once on invalid YAML, time out on a collector that never turns
//! healthy, go offline when they stop, come back with full state after a
//! server restart, restart their processes, and never loop over HTTP against
//! a server that repeats its config in every reply.

mod common;

use std::time::Duration;

use common::{DEADLINE, TestServer, bundle, eventually};
use opamp_gitops::app::ServeConfig;
use opamp_gitops::model::InstanceUid;
use opamp_gitops::simulate::{self, Config, Simulation, TransportKind};
use serde_json::Value;
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

async fn agents(server: &TestServer) -> Vec<Value> {
    let list = server.api_json("/api/v1/agents").await;
    list["agents"].as_array().cloned().unwrap_or_default()
}

/// Waits until `AGENTS` agents are listed and all satisfy `pred`.
async fn wait_all(server: &TestServer, what: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    eventually(what, async || {
        let list = agents(server).await;
        (list.len() == AGENTS && list.iter().all(&pred)).then_some(list)
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
    eventually("an agent to report APPLYING", async || {
        agents(&server)
            .await
            .iter()
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
