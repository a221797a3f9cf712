//! The controller's connection limits against a real flood: sockets that
//! never speak cannot take the API, health or a new agent down, and are
//! closed when they stay quiet.

// Not part of the suite binary: the floods below take nearly every file
// descriptor this process may open, which would starve the other tests.
#[path = "suite/common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::gitops::{GitRepo, collector_config};
use common::process::{Controller, free_addr};
use common::{DEADLINE, WsAgent, hello, http_request, uid16};

/// Opens up to `n` sockets to `addr` that never send a byte, as many as this
/// process's file descriptors allow (keeping some for the test itself), 64
/// connects at a time.
async fn flood(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    use futures_util::StreamExt;
    let limit = rlimit::increase_nofile_limit(u64::MAX).expect("the open file limit");
    let n = n.min(usize::try_from(limit).unwrap_or(usize::MAX).saturating_sub(512));
    futures_util::stream::iter(0..n)
        .map(|_| tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)))
        .buffer_unordered(64)
        // A connect may time out while the server's accept queue is full.
        .filter_map(|r| async move { r.ok().and_then(Result::ok) })
        .collect()
        .await
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Health, readiness and a new agent all answer.
async fn still_serves(controller: &Controller, opamp: SocketAddr) {
    let health = http_request(controller.api, "GET", "/healthz", &[], common::Body::Empty).await;
    assert_eq!(health.status, 200);
    let ready = http_request(controller.api, "GET", "/readyz", &[], common::Body::Empty).await;
    assert_eq!(ready.status, 200, "{}", String::from_utf8_lossy(&ready.body));
    let mut agent = WsAgent::connect(opamp).await;
    let reply = agent.exchange(&hello(&uid16(7), 0)).await;
    assert_eq!(reply.instance_uid, uid16(7));
    agent.close().await;
}

/// A ready controller (a child process) with `args`, on a repository of
/// one group; its state directory lives as long as the controller.
struct Started {
    controller: Controller,
    opamp: SocketAddr,
    api: SocketAddr,
    _dirs: (GitRepo, tempfile::TempDir),
}

async fn started(args: &[&str]) -> Started {
    let repo = GitRepo::new();
    repo.commit_edge("  waves: [100%]\n", &collector_config("a"), "first");
    let state = tempfile::tempdir().unwrap();
    let (opamp, api) = (free_addr(), free_addr());
    let controller = Controller::start(repo.path(), state.path(), (opamp, api), "edge", args).await;
    controller.wait_ready().await;
    Started {
        controller,
        opamp,
        api,
        _dirs: (repo, state),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_cannot_lock_out_the_api_health_or_a_new_agent() {
    // The process-wide cap (the open-file limit less a reserve), one source.
    let Started { controller, opamp, .. } =
        started(&["--max-connections-per-source", "0", "--first-request-timeout", "1h"]).await;
    let sockets = flood(opamp, 20_000).await;
    assert!(sockets.len() > 15_000, "only {} sockets opened", sockets.len());
    still_serves(&controller, opamp).await;
    assert!(
        open_fds(controller.pid()) < 20_000 - 512,
        "{} fds",
        open_fds(controller.pid())
    );
    drop(sockets);
    controller.kill().await;

    // The default per-source cap: one address cannot hold more than a quarter.
    let Started { controller, opamp, .. } = started(&[]).await;
    let sockets = flood(opamp, 10_000).await;
    still_serves(&controller, opamp).await;
    assert!(open_fds(controller.pid()) < 6_000, "{} fds", open_fds(controller.pid()));
    drop(sockets);
}

#[tokio::test]
async fn a_socket_that_never_sends_a_request_is_closed() {
    let Started {
        controller, opamp, api, ..
    } = started(&["--first-request-timeout", "1s"]).await;
    let ends = tokio::task::spawn_blocking(move || {
        let mut sockets: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(opamp).unwrap()).collect();
        sockets.push(TcpStream::connect(api).unwrap());
        sockets
            .into_iter()
            .map(|mut s| {
                s.set_read_timeout(Some(DEADLINE)).unwrap();
                let mut byte = [0u8; 1];
                s.read(&mut byte).map(|n| n == 0)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(
        ends.iter().all(|e| matches!(e, Ok(true))),
        "every quiet socket is closed by the server: {ends:?}"
    );
    still_serves(&controller, opamp).await;
}

/// Peak resident memory of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// A gzip body of about 16 KiB that inflates to 16 MiB: an AgentToServer
/// whose description holds eight million empty attributes.
fn amplification_body() -> Vec<u8> {
    use prost::encoding::encode_varint;
    let attributes = [0x12u8, 0x00].repeat(8 << 20); // field 2, empty, eight million times
    let mut description = vec![0x1a]; // AgentToServer field 3
    encode_varint(attributes.len() as u64, &mut description);
    let mut raw = description;
    raw.extend_from_slice(&attributes);
    let mut gz = Vec::new();
    flate2::read::GzEncoder::new(&raw[..], flate2::Compression::best())
        .read_to_end(&mut gz)
        .unwrap();
    gz
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_decode_into_gigabytes_are_refused_within_a_memory_bound() {
    let Started { controller, opamp, .. } = started(&[]).await;
    let body = amplification_body();
    assert!(body.len() < 64 << 10, "{} bytes", body.len());
    let before = peak_rss_kib(controller.pid());
    let requests = (0..8).map(|_| {
        let body = body.clone();
        tokio::spawn(async move {
            http_request(
                opamp,
                "POST",
                "/v1/opamp",
                &[("Content-Type", "application/x-protobuf"), ("Content-Encoding", "gzip")],
                common::Body::Plain(body),
            )
            .await
        })
    });
    for r in futures_util::future::join_all(requests).await {
        assert_eq!(r.unwrap().status, 413);
    }
    let grew_mib = (peak_rss_kib(controller.pid()) - before) / 1024;
    // Eight inflated bodies of 16 MiB at once, and nothing decoded from them.
    assert!(grew_mib < 8 * 16 + 64, "peak memory grew by {grew_mib} MiB");
    still_serves(&controller, opamp).await;
}

#[tokio::test]
async fn a_websocket_that_stops_reading_is_closed() {
    use opamp_gitops::app::ServeConfig;
    let config = ServeConfig {
        heartbeat_interval: Duration::from_millis(200),
        ..ServeConfig::local()
    };
    let server = common::TestServer::start_with(config).await;
    let uid = uid16(9);
    let mut agent = WsAgent::connect(server.opamp_addr()).await;
    agent.exchange(&hello(&uid, 0)).await;
    // A config far larger than the socket buffers: the write cannot finish
    // while the agent reads nothing.
    let big = "x".repeat(12 << 20);
    let pushed = server
        .fleet()
        .push(
            opamp_gitops::model::InstanceUid::from_wire(&uid).unwrap(),
            common::bundle(&[("", &big)]),
        )
        .await
        .unwrap();
    assert_eq!(pushed, opamp_gitops::model::PushOutcome::Sent);
    let gone = server.wait_agent(&uid, |r| !r.connected).await;
    assert!(gone.disconnected_at.is_some());
    drop(agent);
    server.stop().await;
}
