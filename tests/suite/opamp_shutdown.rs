//! Graceful shutdown: in-process through the cancellation token, and the
//! real binary through SIGTERM.

use crate::common;

use std::time::Duration;

use common::*;
use opamp_gitops::app::ServeConfig;
use opamp_gitops::opamp::codec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn cancel_closes_websockets_and_finishes_inflight_http() {
    let server = TestServer::start().await;
    let addr = server.opamp_addr();
    let uid = uid16(40);
    let mut ws = server.ws().await;
    ws.exchange(&hello(&uid, 0)).await;

    // An HTTP request in flight: headers and half its chunked body sent.
    let http_uid = uid16(41);
    let body = codec::encode_http(&hello(&http_uid, 0), false);
    let (a, b) = body.split_at(body.len() / 2);
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/opamp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-protobuf\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(format!("{:x}\r\n", a.len()).as_bytes()).await.unwrap();
    tcp.write_all(a).await.unwrap();
    tcp.write_all(b"\r\n").await.unwrap();
    tcp.flush().await.unwrap();
    // The server has started on the request before it is told to stop.
    http_requests_started(&server, 1).await;

    let shutdown = server.running.shutdown.clone();
    let stopping = tokio::spawn(server.stop());
    assert_eq!(
        ws.end().await,
        WsEnd::Closed(Some(1001)),
        "WebSockets get a close frame"
    );
    shutdown.cancelled().await;

    tcp.write_all(format!("{:x}\r\n", b.len()).as_bytes()).await.unwrap();
    tcp.write_all(b).await.unwrap();
    tcp.write_all(b"\r\n0\r\n\r\n").await.unwrap();
    let mut raw = Vec::new();
    let read = tokio::time::timeout(DEADLINE, async {
        // Read the head and the body; the connection may stay open until we stop reading.
        let mut buf = [0u8; 4096];
        loop {
            let n = tcp.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if raw.len() >= end + 4 + len {
                    break;
                }
            }
        }
    });
    read.await.expect("the in-flight request is answered");
    let head = String::from_utf8_lossy(&raw);
    assert!(head.starts_with("HTTP/1.1 200"), "got {head}");

    tokio::time::timeout(DEADLINE, stopping)
        .await
        .expect("shutdown in time")
        .expect("no panic");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed after shutdown"
    );
}

/// Waits until the server has started on `n` HTTP OpAMP requests.
async fn http_requests_started(server: &TestServer, n: u32) {
    let line = format!("opamp_gitops_opamp_messages_received_total{{transport=\"http\"}} {n}\n");
    eventually("the server to start on the request", async || {
        let text = String::from_utf8(server.api_get("/metrics").await.body).unwrap();
        text.contains(&line).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_half_sent_body_does_not_hold_shutdown_past_the_drain_deadline() {
    let config = ServeConfig {
        drain_deadline: Duration::from_millis(300),
        ..ServeConfig::local()
    };
    let server = TestServer::start_with(config).await;
    let addr = server.opamp_addr();
    // Declares 100 bytes, sends 10, then goes quiet (and keeps the connection open).
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = format!("POST /v1/opamp HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 100\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&[0u8; 10]).await.unwrap();
    tcp.flush().await.unwrap();
    http_requests_started(&server, 1).await;

    tokio::time::timeout(DEADLINE, server.running.stop())
        .await
        .expect("shutdown ends at the drain deadline, not when the client does")
        .expect("clean shutdown");
    drop(tcp);
}

#[tokio::test]
async fn sigterm_stops_serve_cleanly_with_exit_status_zero() {
    use common::process::{Serve, any_port};
    let serve = Serve::start(&[], (any_port(), any_port())).await;
    let mut ws = WsAgent::connect(serve.opamp).await;
    ws.exchange(&hello(&uid16(42), 0)).await;
    serve.signal("TERM");
    assert_eq!(ws.end().await, WsEnd::Closed(Some(1001)));
    let exit = serve.exit_within(DEADLINE).await;
    assert_eq!(exit.code(), Some(0), "clean exit");
}

#[tokio::test]
async fn a_task_that_dies_stops_the_controller_with_its_name_instead_of_staying_ready() {
    use common::gitops::{GitRepo, collector_config, serve_config, state_dir};
    let repo = GitRepo::new();
    repo.commit_edge("  waves: [100%]\n", &collector_config("v1"), "v1");
    let (_tmp, state) = state_dir();
    let server = TestServer::start_with(serve_config(repo.path(), &state)).await;
    let api = server.api_addr();
    server
        .until("ready", async || {
            (server.api_get("/readyz").await.status == 200).then_some(())
        })
        .await;

    assert!(!server.running.abort_task("no-such-task"));
    assert!(server.running.abort_task("git"), "the git task is supervised");
    let ended = tokio::time::timeout(DEADLINE, server.running.wait())
        .await
        .expect("the controller stops by itself");
    let error = ended.expect_err("a dead task is an error").to_string();
    assert!(error.contains("the git task stopped unexpectedly"), "{error}");
    assert!(
        TcpStream::connect(api).await.is_err(),
        "the API is down: nothing answers ready over a dead git loop"
    );
}
