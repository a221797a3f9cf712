//! The OpAMP wire, end to end: the real server on 127.0.0.1, real WebSocket
//! and HTTP clients, real protobuf.

use crate::common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use opamp_gitops::app::ServeConfig;
use opamp_gitops::desired::AgentAttributes;
use opamp_gitops::opamp::codec;
use opamp_gitops::proto::{AgentToServer, ServerToAgent};
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message;

const SERVER_CAPS: u64 = 0x7;
const LEGACY_UID: &[u8] = b"01ARZ3NDEKTSV4RRFFQ69G5FAV";

#[tokio::test]
async fn websocket_with_and_without_the_header_byte() {
    let server = TestServer::start().await;
    let uid = uid16(1);
    let mut ws = server.ws().await;
    let first = ws.exchange(&hello(&uid, 0)).await;
    assert_eq!(first.instance_uid.as_ref(), &uid[..]);
    assert_eq!(first.capabilities, SERVER_CAPS, "capabilities in the first reply");
    assert!(!full_state_requested(&first), "the first message carried everything");

    ws.send_headerless(&heartbeat(&uid, 1, hello(&uid, 0).capabilities))
        .await;
    let second = ws.recv().await;
    assert_eq!(second.instance_uid.as_ref(), &uid[..]);
    assert_eq!(second.capabilities, 0, "capabilities only in the first WebSocket reply");
    assert_eq!(second.flags, 0);

    // A text frame is ignored, a ping is answered, and the agent carries on.
    ws.ws.send(Message::Text("hello".into())).await.unwrap();
    ws.ws.send(Message::Ping(Bytes::from_static(b"p"))).await.unwrap();
    let pong = tokio::time::timeout(DEADLINE, futures_util::StreamExt::next(&mut ws.ws))
        .await
        .expect("a pong in time");
    assert!(
        matches!(&pong, Some(Ok(Message::Pong(p))) if &p[..] == b"p"),
        "expected a pong, got {pong:?}"
    );
    let third = ws.exchange(&heartbeat(&uid, 2, hello(&uid, 0).capabilities)).await;
    assert_eq!(third.instance_uid.as_ref(), &uid[..]);
    let rec = server.wait_agent(&uid, |r| r.liveness.sequence_num() == 2).await;
    assert!(rec.connected);
    ws.close().await;
    server.stop().await;
}

#[tokio::test]
async fn http_plain_gzip_and_chunked_bodies() {
    let server = TestServer::start().await;
    let addr = server.opamp_addr();
    let uid = uid16(2);
    let caps = hello(&uid, 0).capabilities;

    let plain = post(addr, &hello(&uid, 0), Post::default()).await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("content-type"), Some("application/x-protobuf"));
    assert_eq!(plain.header("content-encoding"), None);
    let reply = plain.server_to_agent();
    assert_eq!(reply.instance_uid.as_ref(), &uid[..]);
    assert_eq!(reply.capabilities, SERVER_CAPS);

    let how = Post {
        gzip_body: true,
        accept_gzip: true,
        ..Post::default()
    };
    let gz = post(addr, &heartbeat(&uid, 1, caps), how).await;
    assert_eq!(
        gz.header("content-encoding"),
        None,
        "a reply of a few bytes stays plain, gzip allowed or not"
    );
    let reply = gz.server_to_agent();
    assert_eq!(reply.capabilities, SERVER_CAPS, "capabilities in every HTTP reply");
    assert_eq!(reply.flags, 0);

    let how = Post {
        chunked: true,
        ..Post::default()
    };
    let chunked = post(addr, &heartbeat(&uid, 2, caps), how).await;
    assert_eq!(chunked.server_to_agent().instance_uid.as_ref(), &uid[..]);
    let how = Post {
        chunked: true,
        gzip_body: true,
        ..Post::default()
    };
    let both = post(addr, &heartbeat(&uid, 3, caps), how).await;
    assert_eq!(both.server_to_agent().flags, 0);

    let rec = server.wait_agent(&uid, |r| r.liveness.sequence_num() == 3).await;
    assert_eq!(rec.transport, opamp_gitops::fleet::Transport::Http);
    assert_eq!(rec.attribute("host.name"), Some("test-host"));

    // A reply worth compressing (a config of some KiB) is gzipped when allowed.
    let config = bundle(&[("", &"key: value\n".repeat(200))]);
    let instance = opamp_gitops::model::InstanceUid::from_wire(&uid).unwrap();
    server.fleet().push(instance, config.clone()).await.unwrap();
    let how = Post {
        accept_gzip: true,
        ..Post::default()
    };
    let pushed = post(addr, &heartbeat(&uid, 4, caps), how).await;
    assert_eq!(pushed.header("content-encoding"), Some("gzip"));
    assert_eq!(&pushed.body[..2], &[0x1f, 0x8b]);
    let remote = pushed.server_to_agent().remote_config.expect("the pushed config");
    assert_eq!(remote.config_hash.as_ref(), config.hash().as_bytes());

    // An empty POST is an empty AgentToServer: a bad (empty) uid, still 200.
    let empty = post_raw(addr, Vec::new()).await;
    let err = empty.server_to_agent().error_response.expect("an error response");
    assert_eq!(err.r#type, 1, "BadRequest");
    server.stop().await;
}

#[tokio::test]
async fn legacy_uid_is_accepted_and_echoed_and_bad_uids_are_refused() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    let reply = ws.exchange(&hello(LEGACY_UID, 0)).await;
    assert_eq!(reply.instance_uid.as_ref(), LEGACY_UID);
    assert!(reply.error_response.is_none());
    // Another legacy agent over plain HTTP (the same uid over HTTP would
    // count as that agent moving off its WebSocket).
    let http_uid = b"01ARZ3NDEKTSV4RRFFQ69G5FAW";
    let http = post(server.opamp_addr(), &hello(http_uid, 0), Post::default())
        .await
        .server_to_agent();
    assert_eq!(http.instance_uid.as_ref(), http_uid);
    server.wait_agent(http_uid, |r| r.connected).await;
    let agents = server.api_json("/api/v1/agents").await;
    assert_eq!(agents["agents"][0]["instance_uid"], "01ARZ3NDEKTSV4RRFFQ69G5FAV");
    assert_eq!(agents["agents"][1]["instance_uid"], "01ARZ3NDEKTSV4RRFFQ69G5FAW");
    let one = server.api_get("/api/v1/agents/01ARZ3NDEKTSV4RRFFQ69G5FAV").await;
    assert_eq!(one.status, 200);

    for bad in [&b"short"[..], &[0xff; 26][..], &[1; 17][..]] {
        let r = ws.exchange(&hello(bad, 0)).await;
        let e = r.error_response.expect("BadRequest for a bad uid");
        assert_eq!(e.r#type, 1);
        assert_eq!(r.instance_uid.as_ref(), bad, "echoed as sent");
        assert!(r.remote_config.is_none() && r.flags == 0);
        let h = post(server.opamp_addr(), &hello(bad, 0), Post::default())
            .await
            .server_to_agent();
        assert_eq!(h.error_response.map(|e| e.r#type), Some(1));
    }
    // The WebSocket survives a bad uid.
    let again = ws.exchange(&heartbeat(LEGACY_UID, 2, 0x7)).await;
    assert!(again.error_response.is_none());
    ws.close().await;
    server.stop().await;
}

#[tokio::test]
async fn sequence_gap_gets_exactly_one_report_full_state() {
    let server = TestServer::start().await;
    let uid = uid16(3);
    let mut ws = server.ws().await;
    // Known agent, no gap: ordinary messages never ask for full state.
    let caps = SUPERVISOR_CAPS;
    let mut seq = 0;
    assert!(!full_state_requested(&ws.exchange(&hello(&uid, seq)).await));
    for _ in 0..5 {
        seq += 1;
        assert!(!full_state_requested(&ws.exchange(&heartbeat(&uid, seq, caps)).await));
    }
    // A repeated number is a resend, not a lost message.
    assert!(!full_state_requested(&ws.exchange(&heartbeat(&uid, seq, caps)).await));
    // A gap may hide a lost report: we ask once, its full report satisfies us.
    seq += 10;
    assert!(full_state_requested(&ws.exchange(&heartbeat(&uid, seq, caps)).await));
    seq += 1;
    let full = AgentToServer {
        remote_config_status: Some(remote_status(&[0xaa; 32], 1, "")),
        ..hello(&uid, seq)
    };
    assert!(!full_state_requested(&ws.exchange(&full).await));
    for _ in 0..3 {
        seq += 1;
        assert!(!full_state_requested(&ws.exchange(&heartbeat(&uid, seq, caps)).await));
    }
    // A restarted agent starts its sequence again: asked once more.
    assert!(full_state_requested(&ws.exchange(&heartbeat(&uid, 0, caps)).await));

    // An unknown agent (say, after a controller restart) that sends only a
    // heartbeat is asked for everything, over HTTP too.
    let other = uid16(4);
    let r = post(server.opamp_addr(), &heartbeat(&other, 57, 0x1), Post::default())
        .await
        .server_to_agent();
    assert!(full_state_requested(&r));
    let r = post(server.opamp_addr(), &hello(&other, 58), Post::default())
        .await
        .server_to_agent();
    assert!(!full_state_requested(&r));
    ws.close().await;
    server.stop().await;
}

#[tokio::test]
async fn request_instance_uid_gets_a_new_uuid_v7() {
    let server = TestServer::start().await;
    let old = uid16(5);
    let mut ws = server.ws().await;
    let reply = ws
        .exchange(&AgentToServer {
            flags: 0x1,
            ..hello(&old, 0)
        })
        .await;
    assert_eq!(
        reply.instance_uid.as_ref(),
        &old[..],
        "the reply still echoes the old uid"
    );
    let new = reply.agent_identification.expect("a new uid").new_instance_uid;
    assert_eq!(new.len(), 16);
    assert_eq!(new[6] >> 4, 7, "UUID version 7");
    // The agent switches over on the same connection: the old uid goes offline.
    let r = ws.exchange(&hello(&new, 1)).await;
    assert_eq!(r.instance_uid, new);
    server.wait_agent(&old, |r| !r.connected).await;
    server.wait_agent(&new, |r| r.connected).await;
    ws.close().await;
    server.stop().await;
}

#[tokio::test]
async fn oversized_messages_get_413_or_close_1009_and_others_carry_on() {
    let config = ServeConfig {
        max_message_bytes: 64 * 1024,
        ..ServeConfig::local()
    };
    let server = TestServer::start_with(config).await;
    let addr = server.opamp_addr();
    let good = uid16(6);
    let mut bystander = server.ws().await;
    bystander.exchange(&hello(&good, 0)).await;

    let big = AgentToServer {
        effective_config: Some(effective_config(&"x".repeat(100 * 1024))),
        ..hello(&uid16(7), 0)
    };
    assert_eq!(post(addr, &big, Post::default()).await.status, 413);
    let chunked = Post {
        chunked: true,
        ..Post::default()
    };
    assert_eq!(
        post(addr, &big, chunked).await.status,
        413,
        "chunked bodies are capped too"
    );
    // Gzip shrinks it below the limit on the wire; the limit applies after inflating.
    let gz = Post {
        gzip_body: true,
        ..Post::default()
    };
    assert!(codec::encode_http(&big, true).len() < 64 * 1024);
    assert_eq!(post(addr, &big, gz).await.status, 413);

    let mut ws = server.ws().await;
    ws.send(&big).await;
    assert_eq!(ws.end().await, WsEnd::Closed(Some(1009)));

    // Everyone else still works.
    let r = bystander.exchange(&heartbeat(&good, 1, 0x7)).await;
    assert_eq!(r.instance_uid.as_ref(), &good[..]);
    let r = post(addr, &hello(&uid16(8), 0), Post::default()).await;
    assert_eq!(r.server_to_agent().instance_uid.as_ref(), &uid16(8)[..]);
    let metrics = server.api_get("/metrics").await;
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(
        text.contains("opamp_gitops_opamp_oversized_messages_total{transport=\"http\"} 3"),
        "{text}"
    );
    assert!(text.contains("opamp_gitops_opamp_oversized_messages_total{transport=\"websocket\"} 1"));
    bystander.close().await;
    server.stop().await;
}

#[tokio::test]
async fn malformed_messages_close_one_websocket_and_get_bad_request_over_http() {
    let server = TestServer::start().await;
    let addr = server.opamp_addr();
    let mut ws = server.ws().await;
    ws.send_raw(vec![0x00, 0x0a, 0xff, 0xff]).await;
    assert_eq!(ws.end().await, WsEnd::Closed(Some(1007)));

    let r = post_raw(addr, vec![0x0a, 0xff, 0xff]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/x-protobuf"));
    let reply = r.server_to_agent();
    assert_eq!(reply.error_response.map(|e| e.r#type), Some(1));
    assert_eq!(reply.capabilities, 0, "an error reply carries nothing else");

    let text = String::from_utf8(server.api_get("/metrics").await.body).unwrap();
    assert!(text.contains("opamp_gitops_opamp_decode_errors_total{transport=\"websocket\"} 1"));
    assert!(text.contains("opamp_gitops_opamp_decode_errors_total{transport=\"http\"} 1"));
    ws.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_body_that_cannot_be_read_gets_bad_request_in_protobuf() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start().await;
    let addr = server.opamp_addr();
    // A chunked body whose chunk size is not hex: the body stream fails.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /v1/opamp HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n\x0a\x02ab\r\nzz\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut raw))
        .await
        .expect("an answer in time")
        .expect("read");
    let r = parse_response(&raw);
    let reply = r.server_to_agent();
    assert_eq!(reply.error_response.map(|e| e.r#type), Some(1), "BadRequest");
    server.stop().await;
}

/// Random bytes, truncated messages and mangled messages, 1,000 over each
/// transport: the server answers or closes each, and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_bad_payloads_never_stop_the_server() {
    let server = TestServer::start().await;
    let addr = server.opamp_addr();
    let valid = AgentToServer {
        remote_config_status: Some(remote_status(&[3; 32], 3, "failed")),
        ..hello(&uid16(9), 0)
    }
    .encode_to_vec();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let payloads: Vec<Vec<u8>> = (0..1000)
        .map(|i| match i % 3 {
            0 => {
                let len = rng.below(300);
                rng.bytes(len)
            }
            1 => valid[..rng.below(valid.len())].to_vec(),
            _ => {
                let mut v = valid.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(v.len());
                    v[at] = rng.next() as u8;
                }
                v
            }
        })
        .collect();

    let payloads = std::sync::Arc::new(payloads);
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let payloads = payloads.clone();
        tasks.push(tokio::spawn(async move {
            for (i, p) in payloads.iter().enumerate().filter(|(i, _)| i % 8 == worker) {
                let r = post_raw(addr, p.clone()).await;
                assert_eq!(r.status, 200, "payload {i}");
                assert_eq!(r.header("content-type"), Some("application/x-protobuf"));
                ServerToAgent::decode(&r.body[..]).expect("a reply that decodes");

                let mut ws = WsAgent::connect(addr).await;
                // With and without the header byte.
                let framed = if i % 2 == 0 {
                    let mut f = vec![0];
                    f.extend_from_slice(p);
                    f
                } else {
                    p.clone()
                };
                ws.send_raw(framed).await;
                // Either a reply (it decoded) or a close; never a hang.
                match tokio::time::timeout(DEADLINE, futures_util::StreamExt::next(&mut ws.ws)).await {
                    Ok(Some(Ok(Message::Binary(b)))) => {
                        assert_eq!(b[0], 0);
                        ServerToAgent::decode(&b[1..]).expect("a reply that decodes");
                    }
                    Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => {}
                    other => panic!("payload {i}: unexpected {other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }

    let uid = uid16(10);
    let mut ws = server.ws().await;
    assert_eq!(ws.exchange(&hello(&uid, 0)).await.instance_uid.as_ref(), &uid[..]);
    let r = post(addr, &hello(&uid16(11), 0), Post::default()).await;
    assert!(r.server_to_agent().error_response.is_none());
    ws.close().await;
    server.stop().await;
}

#[tokio::test]
async fn other_methods_are_refused_and_the_path_is_exact() {
    let server = TestServer::start().await;
    let r = http_request(server.opamp_addr(), "GET", "/v1/opamp", &[], Body::Empty).await;
    assert_eq!(r.status, 405);
    let r = http_request(server.opamp_addr(), "POST", "/v1/other", &[], Body::Plain(vec![])).await;
    assert_eq!(r.status, 404);
    // Charset or no Content-Type at all: still OpAMP.
    let msg = hello(&uid16(12), 0).encode_to_vec();
    let r = http_request(
        server.opamp_addr(),
        "POST",
        "/v1/opamp",
        &[("Content-Type", "application/x-protobuf; charset=utf-8")],
        Body::Plain(msg),
    )
    .await;
    assert_eq!(r.server_to_agent().instance_uid.as_ref(), &uid16(12)[..]);
    let msg = hello(&uid16(13), 0).encode_to_vec();
    let r = http_request(server.opamp_addr(), "POST", "/v1/opamp", &[], Body::Plain(msg)).await;
    assert_eq!(
        r.server_to_agent().instance_uid.as_ref(),
        &uid16(13)[..],
        "no Content-Type at all"
    );
    server.wait_agent(&uid16(13), |r| r.connected).await;
    server.stop().await;
}

#[tokio::test]
async fn an_http_connection_left_idle_is_closed_and_a_quiet_websocket_is_not() {
    let idle = Duration::from_millis(500);
    let config = ServeConfig {
        idle_timeout: idle,
        ..ServeConfig::local()
    };
    let server = TestServer::start_with(config).await;
    let mut ws = server.ws().await;
    ws.exchange(&hello(&uid16(11), 0)).await;
    let ws_quiet_since = Instant::now();

    // Requests closer together than the idle timeout keep the connection,
    // for longer than the timeout in all.
    let uid = uid16(12);
    let mut agent = KeepAlive::connect(server.opamp_addr()).await;
    let started = Instant::now();
    for seq in 0..4 {
        assert_eq!(agent.post(&heartbeat(&uid, seq, 0x7)).await, 200);
        if seq < 3 {
            tokio::time::sleep(idle / 2).await;
        }
    }
    assert!(started.elapsed() > idle, "the requests spanned the idle timeout");
    let answered = Instant::now();
    agent.closed_within(DEADLINE).await;
    assert!(
        answered.elapsed() >= idle,
        "closed {:?} after the last answer",
        answered.elapsed()
    );
    let metrics = String::from_utf8(server.api_get("/metrics").await.body).unwrap();
    assert!(
        metrics.contains("opamp_gitops_opamp_connections_closed_total{reason=\"idle\"} 1"),
        "{metrics}"
    );

    // The WebSocket said nothing for longer, and is still open: its
    // heartbeats watch it.
    assert!(ws_quiet_since.elapsed() > 2 * idle);
    let reply = ws.exchange(&heartbeat(&uid16(11), 1, 0x7)).await;
    assert_eq!(reply.instance_uid.as_ref(), &uid16(11)[..]);
    ws.close().await;
    server.stop().await;
}
