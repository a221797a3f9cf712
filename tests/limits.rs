//! The controller's limits against real abuse: sockets that never speak
//! cannot take the API, health or a new agent down, and are closed when they
//! stay quiet; bodies that inflate into gigabytes are refused; a repository
//! of hundreds of MiB is fetched within the documented memory bound.

// Not part of the suite binary: the floods below take nearly every file
// descriptor this process may open, which would starve the other tests.
#[path = "suite/common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::gitops::{GitRepo, collector_config, git};
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
    let fds = open_fds(controller.pid());
    assert!(fds < 20_000 - 512, "{fds} fds");
    drop(sockets);
    controller.kill().await;

    // The default per-source cap: one address cannot hold more than a quarter.
    let Started { controller, opamp, .. } = started(&[]).await;
    let sockets = flood(opamp, 10_000).await;
    still_serves(&controller, opamp).await;
    let fds = open_fds(controller.pid());
    assert!(fds < 6_000, "{fds} fds");
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

/// The blobs of [`large_repository`], each of this many MiB.
const BLOB_MIB: u64 = 8;

/// What a fetch may take beyond the controller's own memory
/// (docs/operations.md, Limits): the 64 MiB of mapped pack files and 16 MiB
/// of cached objects libgit2 is given, and twice the largest object.
const FETCH_BOUND_MIB: u64 = 64 + 16 + 2 * BLOB_MIB;

/// A bare repository `large.git` in `dir` (branch `main`): the standard
/// layout (group `edge`), then `blobs` commits that each add a blob of
/// [`BLOB_MIB`] random, incompressible bytes. `git fast-import` writes it
/// without looking for deltas, as a server sends files over
/// `core.bigFileThreshold`. Answers the tip.
fn large_repository(dir: &std::path::Path, blobs: u64) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let repo = dir.join("large.git");
    std::fs::create_dir_all(&repo).expect("mkdir");
    git(&repo, &["init", "--quiet", "--bare", "--initial-branch=main"]);
    git(&repo, &["config", "core.bigFileThreshold", "1m"]);
    let mut import = Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["-c", "core.compression=0", "-c", "fastimport.unpackLimit=0"])
        .args(["fast-import", "--quiet", "--big-file-threshold=1m"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("git fast-import runs");
    let mut stream = std::io::BufWriter::new(import.stdin.take().expect("stdin"));
    let mut commit = |n: u64, files: &[(&str, &[u8])]| {
        let message = format!("commit {n}");
        write!(
            stream,
            "commit refs/heads/main\ncommitter T <t@example.com> {} +0000\ndata {}\n{message}\n",
            1_700_000_000 + n,
            message.len()
        )
        .expect("write");
        for (path, body) in files {
            write!(stream, "M 100644 inline {path}\ndata {}\n", body.len()).expect("write");
            stream.write_all(body).expect("write");
            stream.write_all(b"\n").expect("write");
        }
        stream.write_all(b"\n").expect("write");
    };
    let (fleet, group) = (
        common::gitops::fleet_yaml("1h"),
        common::gitops::group_yaml("  waves: [100%]\n"),
    );
    let config = collector_config("large");
    commit(
        0,
        &[
            ("fleet.yaml", fleet.as_bytes()),
            ("groups/edge.yaml", group.as_bytes()),
            ("configs/edge.yaml", config.as_bytes()),
        ],
    );
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut blob = vec![0u8; usize::try_from(BLOB_MIB << 20).expect("fits")];
    for n in 1..=blobs {
        for chunk in blob.chunks_exact_mut(8) {
            // xorshift64: fast, and nothing in it a compressor or a delta can use.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        commit(n, &[(&format!("blobs/{n:04}.bin"), &blob)]);
    }
    drop(stream);
    assert!(import.wait().expect("fast-import ends").success());
    git(&repo, &["rev-parse", "main"]).trim().to_string()
}

/// The bytes of the files under `dir`.
fn disk_usage(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => disk_usage(&e.path()),
                    _ => e.metadata().map_or(0, |m| m.len()),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A controller started on `repo` (a URL) until it has loaded `tip`: its
/// peak resident memory in MiB, and the bytes its state directory holds.
/// Fails as soon as the peak reaches `ceiling_mib`.
async fn load_peak(repo: &str, tip: &str, ceiling_mib: u64) -> (u64, u64) {
    let state = tempfile::tempdir().unwrap();
    let controller = Controller::start_on(repo, state.path(), (free_addr(), free_addr()), "edge", &[])
        .await
        .with_patience(Duration::from_secs(90));
    let pid = controller.pid();
    let under_ceiling = async {
        loop {
            let peak = peak_rss_kib(pid) / 1024;
            assert!(
                peak < ceiling_mib,
                "{repo}: the peak reached {peak} MiB before the commit was loaded"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        () = controller.wait_ready() => {}
        () = under_ceiling => {}
    }
    let groups: serde_json::Value = serde_json::from_str(&controller.get("/api/v1/groups").await).unwrap();
    assert_eq!(groups["commit"], tip, "{groups}");
    let peak = peak_rss_kib(pid) / 1024;
    controller.kill().await;
    (peak, disk_usage(state.path()))
}

/// `git daemon` serving the repositories under `root` on 127.0.0.1 (killed
/// when dropped), once it accepts connections; its address.
async fn git_daemon(root: &std::path::Path) -> (tokio::process::Child, SocketAddr) {
    // `git daemon` would run `git-daemon` as a child of its own, which
    // killing it leaves running: run that directly.
    let exec_path = std::process::Command::new("git")
        .arg("--exec-path")
        .output()
        .expect("git runs");
    let exec_path = String::from_utf8_lossy(&exec_path.stdout).trim().to_string();
    let addr = free_addr();
    let daemon = tokio::process::Command::new(std::path::Path::new(&exec_path).join("git-daemon"))
        .args(["--reuseaddr", "--export-all", "--listen=127.0.0.1"])
        .arg(format!("--port={}", addr.port()))
        .arg(format!("--base-path={}", root.display()))
        .arg(root)
        // It says "the remote end hung up" of each probe below.
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("git-daemon runs");
    common::eventually("git daemon to listen", async || {
        tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
    })
    .await;
    (daemon, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetching_a_large_repository_stays_within_the_memory_bound() {
    let small_dir = tempfile::tempdir().unwrap();
    let small = large_repository(small_dir.path(), 0);
    let dir = tempfile::tempdir().unwrap();
    let tip = large_repository(dir.path(), 36);
    let size_mib = disk_usage(dir.path()) >> 20;
    assert!(size_mib >= 280, "the repository holds {size_mib} MiB");

    let url = |d: &tempfile::TempDir| format!("file://{}/large.git", d.path().display());
    let (baseline, _) = load_peak(&url(&small_dir), &small, u64::MAX).await;
    let ceiling = baseline + FETCH_BOUND_MIB;

    // On this machine: read in place, nothing copied.
    let (peak, copied) = load_peak(&url(&dir), &tip, ceiling).await;
    eprintln!("file://: peak {peak} MiB, {baseline} MiB on a small repository, {copied} bytes copied");
    assert!(peak < ceiling, "file://: the peak grew from {baseline} to {peak} MiB");
    assert!(
        copied < 1 << 20,
        "file://: {copied} bytes copied to the state directory"
    );

    // Over the network: the pack streams to disk.
    let (_daemon, addr) = git_daemon(dir.path()).await;
    let (peak, copied) = load_peak(&format!("git://{addr}/large.git"), &tip, ceiling).await;
    eprintln!("git://: peak {peak} MiB, {baseline} MiB on a small repository, {copied} bytes fetched");
    assert!(peak < ceiling, "git://: the peak grew from {baseline} to {peak} MiB");
    assert!(copied >> 20 >= 280, "git://: only {copied} bytes fetched");
}
