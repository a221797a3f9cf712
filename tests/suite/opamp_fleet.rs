//! The inventory and the push path end to end: connections, liveness, pushes
//! and what the API shows, against the real server over real sockets.

use crate::common;

use std::time::Duration;

use common::*;
use opamp_gitops::app::ServeConfig;
use opamp_gitops::fleet::{PushOutcome, Transport};
use opamp_gitops::model::{ConfigHash, InstanceUid};
use opamp_gitops::proto::{AgentDisconnect, AgentToServer, ComponentHealth};
use serde_json::json;

fn iuid(b: &[u8]) -> InstanceUid {
    InstanceUid::from_wire(b).unwrap()
}

#[tokio::test]
async fn a_second_websocket_replaces_the_first_without_going_offline() {
    let server = TestServer::start().await;
    let uid = uid16(20);
    let mut old = server.ws().await;
    old.exchange(&hello(&uid, 0)).await;
    let first = server.wait_agent(&uid, |r| r.connected).await;

    let mut new = server.ws().await;
    let reply = new.exchange(&hello(&uid, 0)).await;
    assert_eq!(reply.capabilities, 0x7, "a new connection gets capabilities again");
    assert_eq!(
        old.end().await,
        WsEnd::Closed(Some(1000)),
        "the old connection is closed"
    );
    // Wait for the old session to finish its teardown, then report on the new one.
    eventually("the old session to end", async || {
        let text = String::from_utf8(server.api_get("/metrics").await.body).unwrap();
        text.contains("opamp_gitops_opamp_websocket_connections 1")
            .then_some(())
    })
    .await;
    new.exchange(&AgentToServer {
        health: Some(healthy(true)),
        ..heartbeat(&uid, 1, hello(&uid, 0).capabilities)
    })
    .await;
    let rec = server.wait_agent(&uid, |r| r.liveness.sequence_num() == 1).await;
    assert!(
        rec.connected,
        "the replaced connection's end does not make the agent offline"
    );
    assert_eq!(rec.connection_epoch, first.connection_epoch + 1);
    assert_eq!(
        server
            .fleet()
            .push(iuid(&uid), bundle(&[("", "a: 1\n")]))
            .await
            .unwrap(),
        PushOutcome::Sent
    );
    assert!(
        new.recv().await.remote_config.is_some(),
        "pushes go to the new connection"
    );
    new.close().await;
    server.stop().await;
}

#[tokio::test]
async fn agent_disconnect_and_closing_mark_agents_offline() {
    let server = TestServer::start().await;
    let (a, b, c) = (uid16(21), uid16(22), uid16(23));
    let mut ws = server.ws().await;
    ws.exchange(&hello(&a, 0)).await;
    let bye = AgentToServer {
        agent_disconnect: Some(AgentDisconnect {}),
        ..heartbeat(&a, 1, SUPERVISOR_CAPS)
    };
    let reply = ws.exchange(&bye).await;
    assert_eq!(reply.flags, 0, "a goodbye is not asked for more");
    let rec = server.wait_agent(&a, |r| !r.connected).await;
    assert!(rec.disconnected_at.is_some());
    ws.close().await;

    post(server.opamp_addr(), &hello(&b, 0), Post::default()).await;
    server.wait_agent(&b, |r| r.connected).await;
    let bye = AgentToServer {
        agent_disconnect: Some(AgentDisconnect {}),
        ..heartbeat(&b, 1, SUPERVISOR_CAPS)
    };
    assert_eq!(post(server.opamp_addr(), &bye, Post::default()).await.status, 200);
    server.wait_agent(&b, |r| !r.connected).await;

    // A WebSocket that simply closes.
    let mut ws = server.ws().await;
    ws.exchange(&hello(&c, 0)).await;
    server.wait_agent(&c, |r| r.connected).await;
    ws.close().await;
    server.wait_agent(&c, |r| !r.connected).await;
    let api = server.api_json(&format!("/api/v1/agents/{}", iuid(&c))).await;
    assert_eq!(
        (api["connected"].clone(), api["state"].clone()),
        (json!(false), json!("offline"))
    );
    server.stop().await;
}

#[tokio::test]
async fn an_http_agent_goes_offline_after_three_missed_heartbeats() {
    let config = ServeConfig {
        heartbeat_interval: Duration::from_millis(100),
        ..ServeConfig::local()
    };
    let server = TestServer::start_with(config).await;
    let uid = uid16(24);
    post(server.opamp_addr(), &hello(&uid, 0), Post::default()).await;
    // With intervals this short the online snapshot may already be replaced
    // by the offline one when we look: the offline record tells it all.
    let offline = server.wait_agent(&uid, |r| !r.connected).await;
    let silence = offline
        .disconnected_at
        .unwrap()
        .duration_since(offline.liveness.last_seen())
        .unwrap();
    assert!(
        silence > Duration::from_millis(300),
        "offline only after three intervals ({silence:?})"
    );
    // It comes back with a new epoch (and may go offline again before we look).
    let reply = post(
        server.opamp_addr(),
        &heartbeat(&uid, 1, SUPERVISOR_CAPS),
        Post::default(),
    )
    .await;
    assert!(reply.server_to_agent().error_response.is_none());
    let back = server
        .wait_agent(&uid, |r| r.connection_epoch == offline.connection_epoch + 1)
        .await;
    assert_eq!(back.liveness.sequence_num(), 1);
    assert!(back.liveness.last_seen() > offline.liveness.last_seen());
    server.stop().await;
}

#[tokio::test]
async fn a_silent_websocket_is_closed_after_three_unanswered_intervals() {
    let config = ServeConfig {
        heartbeat_interval: Duration::from_millis(100),
        ..ServeConfig::local()
    };
    let server = TestServer::start_with(config).await;
    let (quiet, live) = (uid16(34), uid16(35));
    let mut q = server.ws().await;
    q.exchange(&hello(&quiet, 0)).await;
    let mut l = server.ws().await;
    l.exchange(&hello(&live, 0)).await;
    // The live agent keeps reading, so its client answers the pings; the
    // quiet one (a half-open connection, as far as the server can tell) reads nothing.
    let reader = tokio::spawn(async move {
        let mut pings = 0;
        while let Some(Ok(frame)) = futures_util::StreamExt::next(&mut l.ws).await {
            if matches!(frame, tokio_tungstenite::tungstenite::Message::Ping(_)) {
                pings += 1;
                if pings == 6 {
                    break;
                }
            }
        }
        (l, pings)
    });
    let gone = server.wait_agent(&quiet, |r| !r.connected).await;
    let silence = gone
        .disconnected_at
        .unwrap()
        .duration_since(gone.liveness.last_seen())
        .unwrap();
    assert!(
        silence > Duration::from_millis(300),
        "closed only after three intervals ({silence:?})"
    );
    let (l, pings) = tokio::time::timeout(DEADLINE, reader).await.unwrap().unwrap();
    assert_eq!(pings, 6, "the answering connection stays open past three intervals");
    assert!(server.fleet().snapshot().get(&iuid(&live)).unwrap().connected);
    l.close().await;
    drop(q);
    server.stop().await;
}

#[tokio::test]
async fn a_push_reaches_a_websocket_at_once_and_an_http_agent_on_its_next_poll() {
    let server = TestServer::start().await;
    let fleet = server.fleet().clone();
    let config = bundle(&[("", "receivers: {otlp: {}}\n"), ("extra.yaml", "x: 1\n")]);

    let ws_uid = uid16(25);
    let mut ws = server.ws().await;
    ws.exchange(&hello(&ws_uid, 0)).await;
    assert_eq!(
        fleet.push(iuid(&ws_uid), config.clone()).await.unwrap(),
        PushOutcome::Sent
    );
    let pushed = ws.recv().await;
    assert_eq!(pushed.instance_uid.as_ref(), &ws_uid[..]);
    let rc = pushed.remote_config.expect("a remote config");
    assert_eq!(rc.config_hash.as_ref(), config.hash().as_bytes(), "32 raw bytes");
    let files = rc.config.unwrap().config_map;
    assert_eq!(files.len(), 2);
    assert_eq!(files[""].body.as_ref(), b"receivers: {otlp: {}}\n");
    assert_eq!(files["extra.yaml"].content_type, "text/yaml");
    let next = ws.exchange(&heartbeat(&ws_uid, 1, SUPERVISOR_CAPS)).await;
    assert!(next.remote_config.is_none(), "sent once");

    let http_uid = uid16(26);
    let addr = server.opamp_addr();
    let first = post(addr, &hello(&http_uid, 0), Post::default())
        .await
        .server_to_agent();
    assert!(first.remote_config.is_none(), "the server invents no pushes");
    let older = bundle(&[("", "old: 1\n")]);
    assert_eq!(fleet.push(iuid(&http_uid), older).await.unwrap(), PushOutcome::Queued);
    assert_eq!(
        fleet.push(iuid(&http_uid), config.clone()).await.unwrap(),
        PushOutcome::Queued
    );
    let how = Post {
        accept_gzip: true,
        ..Post::default()
    };
    let poll = post(addr, &heartbeat(&http_uid, 1, SUPERVISOR_CAPS), how)
        .await
        .server_to_agent();
    let rc = poll.remote_config.expect("the push rides on the reply");
    assert_eq!(
        rc.config_hash.as_ref(),
        config.hash().as_bytes(),
        "the newest push wins"
    );
    // That reply was lost: the agent never saw it. The next poll still carries the push.
    let poll = post(addr, &heartbeat(&http_uid, 2, SUPERVISOR_CAPS), Post::default())
        .await
        .server_to_agent();
    let rc = poll.remote_config.expect("offered again until the agent reports it");
    assert_eq!(rc.config_hash.as_ref(), config.hash().as_bytes());
    // Once the agent reports the hash (applying), it is not offered again.
    let applying = AgentToServer {
        remote_config_status: Some(remote_status(config.hash().as_bytes(), 2, "")),
        ..heartbeat(&http_uid, 3, SUPERVISOR_CAPS)
    };
    let poll = post(addr, &applying, Post::default()).await.server_to_agent();
    assert!(poll.remote_config.is_none(), "reported: no more offers");
    let poll = post(addr, &heartbeat(&http_uid, 4, SUPERVISOR_CAPS), Post::default())
        .await
        .server_to_agent();
    assert!(poll.remote_config.is_none());

    // Agents that cannot take it, or are not there, get nothing.
    let unsupported = uid16(27);
    post(addr, &heartbeat(&unsupported, 0, 0x1), Post::default()).await;
    assert_eq!(
        fleet.push(iuid(&unsupported), config.clone()).await.unwrap(),
        PushOutcome::NotAccepted
    );
    assert_eq!(
        fleet.push(iuid(&uid16(28)), config).await.unwrap(),
        PushOutcome::NotConnected
    );
    ws.close().await;
    server.stop().await;
}

#[tokio::test]
async fn the_newest_push_is_the_last_config_a_websocket_gets() {
    let server = TestServer::start().await;
    let fleet = server.fleet().clone();
    let uid = uid16(33);
    let mut ws = server.ws().await;
    let mut seq = 0;
    ws.exchange(&hello(&uid, seq)).await;
    // Larger than the socket buffers: while we do not read, the session is
    // stuck sending it, and what follows piles up behind it.
    let large = bundle(&[("", &"#".repeat(12 << 20))]);
    for round in 0..10 {
        assert_eq!(fleet.push(iuid(&uid), large.clone()).await.unwrap(), PushOutcome::Sent);
        // A report waiting while the pushes arrive.
        seq += 1;
        ws.send(&heartbeat(&uid, seq, SUPERVISOR_CAPS)).await;
        let bundles: Vec<_> = (0..8)
            .map(|i| bundle(&[("", &format!("round: {round}\npush: {i}\n"))]))
            .collect();
        let newest = bundles.last().unwrap().hash();
        let pushes = bundles.iter().map(|b| fleet.push(iuid(&uid), b.clone()));
        for outcome in futures_util::future::join_all(pushes).await {
            assert!(matches!(outcome.unwrap(), PushOutcome::Sent | PushOutcome::Queued));
        }
        // Reports whose replies are recognisable (a push never carries
        // agent_identification), until the newest config arrived and one more
        // report has been answered after it.
        let mut configs = Vec::new();
        let mut answered_after_newest = false;
        for _ in 0..5 {
            let newest_seen = configs.contains(&newest);
            seq += 1;
            ws.send(&AgentToServer {
                flags: 0x1,
                ..heartbeat(&uid, seq, SUPERVISOR_CAPS)
            })
            .await;
            loop {
                let m = ws.recv().await;
                if let Some(rc) = &m.remote_config {
                    configs.push(ConfigHash::from_wire(&rc.config_hash).expect("our hash"));
                }
                if m.agent_identification.is_some() {
                    break;
                }
            }
            if newest_seen {
                answered_after_newest = true;
                break;
            }
        }
        assert!(answered_after_newest, "round {round}: the newest push never arrived");
        assert_eq!(
            configs.last(),
            Some(&newest),
            "round {round}: an older push overtook the newest ({} configs)",
            configs.len()
        );
    }
    ws.close().await;
    server.stop().await;
}

#[tokio::test]
async fn the_api_shows_agents_exactly_as_they_reported() {
    let server = TestServer::start().await;
    let uid = uid16(29);
    let mut ws = server.ws().await;
    let msg = AgentToServer {
        capabilities: SUPERVISOR_CAPS | 0x2000,
        agent_description: Some(description(
            &[("service.name", "otelcol-gateway"), ("service.version", "0.120.0")],
            &[("host.name", "edge-1"), ("os.type", "linux")],
        )),
        health: Some(ComponentHealth {
            healthy: false,
            status: "StatusRecoverableError".into(),
            last_error: "exporter otlp: connection refused".into(),
            ..Default::default()
        }),
        remote_config_status: Some(remote_status(&[0xab; 32], 3, "bad key: foo")),
        effective_config: Some(effective_config("exporters: {otlp: {}}\n")),
        ..hello(&uid, 0)
    };
    ws.exchange(&msg).await;
    server.wait_agent(&uid, |r| r.health.is_some()).await;

    let list = server.api_json("/api/v1/agents").await;
    let agents = list["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1);
    let a = &agents[0];
    assert_eq!(a["instance_uid"], iuid(&uid).to_string());
    assert_eq!(a["connected"], true);
    assert_eq!(a["transport"], "websocket");
    assert!(a["last_seen"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        a["identifying_attributes"],
        json!({"service.name": "otelcol-gateway", "service.version": "0.120.0"})
    );
    assert_eq!(
        a["non_identifying_attributes"],
        json!({"host.name": "edge-1", "os.type": "linux"})
    );
    assert_eq!(
        a["capabilities"],
        json!([
            "ReportsStatus",
            "AcceptsRemoteConfig",
            "ReportsEffectiveConfig",
            "ReportsHealth",
            "ReportsRemoteConfig",
            "ReportsHeartbeat"
        ])
    );
    assert_eq!(
        a["health"],
        json!({"healthy": false, "status": "StatusRecoverableError", "last_error": "exporter otlp: connection refused"})
    );
    assert_eq!(
        a["remote_config_status"],
        json!({"status": "FAILED", "last_remote_config_hash": "ab".repeat(32), "error_message": "bad key: foo"})
    );
    assert_eq!(a["group"], json!(null));
    assert_eq!(a["desired_config_hash"], json!(null));
    assert_eq!(a["state"], "unmanaged");
    assert!(
        a.get("effective_config").is_none(),
        "bodies only in the single-agent answer"
    );

    let one = server.api_json(&format!("/api/v1/agents/{}", iuid(&uid))).await;
    assert_eq!(one["effective_config"], json!({"": "exporters: {otlp: {}}\n"}));
    assert_eq!(server.api_get("/api/v1/agents/not-a-uid").await.status, 400);
    let absent = InstanceUid::Uuid([0xee; 16]);
    assert_eq!(server.api_get(&format!("/api/v1/agents/{absent}")).await.status, 404);

    // A heartbeat without a transport change keeps everything.
    post(server.opamp_addr(), &hello(&uid16(30), 0), Post::default()).await;
    server.wait_agent(&uid16(30), |r| r.transport == Transport::Http).await;
    let list = server.api_json("/api/v1/agents").await;
    assert_eq!(list["agents"].as_array().unwrap().len(), 2);
    ws.close().await;
    server.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let server = TestServer::start().await;
    let h = server.api_get("/healthz").await;
    assert_eq!(h.status, 200);
    let r = server.api_get("/readyz").await;
    assert_eq!(r.status, 503);
    assert!(String::from_utf8_lossy(&r.body).contains("no commit loaded yet"));
    server
        .running
        .readiness
        .send_replace(opamp_gitops::api::Readiness::Ready(opamp_gitops::model::CommitId::new(
            "ab12",
        )));
    let r = server.api_get("/readyz").await;
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains(r#""commit":"ab12""#));

    let mut ws = server.ws().await;
    ws.exchange(&hello(&uid16(31), 0)).await;
    post(server.opamp_addr(), &hello(&uid16(32), 0), Post::default()).await;
    let text = server
        .until("both agents in the metrics", async || {
            let m = server.api_get("/metrics").await;
            assert_eq!(m.status, 200);
            let text = String::from_utf8(m.body).unwrap();
            (text.contains("opamp_gitops_agents_connected{transport=\"websocket\"} 1")
                && text.contains("opamp_gitops_agents_connected{transport=\"http\"} 1"))
            .then_some(text)
        })
        .await;
    assert!(text.contains("opamp_gitops_opamp_messages_received_total{transport=\"websocket\"} 1"));
    assert!(text.contains("opamp_gitops_opamp_messages_received_total{transport=\"http\"} 1"));
    ws.close().await;
    server.stop().await;
}
