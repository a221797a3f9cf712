//! Shared test harness: the real server started in-process on 127.0.0.1:0,
//! raw WebSocket and plain-HTTP OpAMP clients, message builders, and waits
//! that wake on what the controller publishes (its watch channels
//! in-process, the API's long polls over HTTP) instead of polling.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use opamp_gitops::api::wait::published;
use opamp_gitops::app::{self, Running, ServeConfig};
use opamp_gitops::desired::ConfigBundle;
use opamp_gitops::fleet::{AgentRecord, FleetHandle};
use opamp_gitops::model::InstanceUid;
use opamp_gitops::opamp::codec;
use opamp_gitops::proto::{
    AgentConfigFile, AgentConfigMap, AgentDescription, AgentToServer, AnyValue, ComponentHealth, EffectiveConfig,
    KeyValue, RemoteConfigStatus, ServerToAgent, any_value,
};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// How long any single wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The longest a long poll is held: well within [`http_request`]'s deadline.
const LONG_POLL: Duration = Duration::from_secs(5);

/// ReportsStatus | AcceptsRemoteConfig | ReportsEffectiveConfig | ReportsHealth | ReportsRemoteConfig.
pub const SUPERVISOR_CAPS: u64 = 0x1 | 0x2 | 0x4 | 0x800 | 0x1000;

pub mod balancer;
pub mod browser;
pub mod certs;
pub mod gitops;
pub mod postgres;
pub mod process;
pub mod receivers;

// ---------------------------------------------------------------- server

/// A controller running in this process.
pub struct TestServer {
    pub running: Running,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(ServeConfig::local()).await
    }

    /// Starts with a modified config (listen addresses should stay on port 0).
    pub async fn start_with(config: ServeConfig) -> Self {
        let running = app::start(config, CancellationToken::new())
            .await
            .expect("server starts");
        TestServer { running }
    }

    pub fn opamp_addr(&self) -> SocketAddr {
        self.running.opamp_addr
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.running.api_addr
    }

    pub fn fleet(&self) -> &FleetHandle {
        &self.running.fleet
    }

    /// A new WebSocket agent connection.
    pub async fn ws(&self) -> WsAgent {
        WsAgent::connect(self.opamp_addr()).await
    }

    /// GET on the API.
    pub async fn api_get(&self, path: &str) -> HttpResponse {
        http_request(self.api_addr(), "GET", path, &[], Body::Empty).await
    }

    /// GET on the API, expecting 200 and JSON.
    pub async fn api_json(&self, path: &str) -> serde_json::Value {
        let r = self.api_get(path).await;
        assert_eq!(r.status, 200, "GET {path}: {}", String::from_utf8_lossy(&r.body));
        serde_json::from_slice(&r.body).expect("JSON body")
    }

    /// Waits until the newest snapshot has a record for `uid` that satisfies `pred`.
    pub async fn wait_agent(&self, uid: &[u8], pred: impl Fn(&AgentRecord) -> bool) -> Arc<AgentRecord> {
        let uid = InstanceUid::from_wire(uid).expect("a valid uid");
        let mut rx = self.fleet().subscribe();
        let found = tokio::time::timeout(DEADLINE, rx.wait_for(|s| s.get(&uid).is_some_and(|r| pred(r))))
            .await
            .unwrap_or_else(|_| panic!("agent {uid} never reached the expected state"))
            .expect("fleet alive");
        found.get(&uid).expect("just matched").clone()
    }

    /// Everything this controller publishes, to wake on.
    pub fn changes(&self) -> Changes {
        Changes {
            fleet: self.fleet().subscribe(),
            driver: self.running.driver.as_ref().map(|d| d.subscribe()),
            git: self.running.git.as_ref().map(|g| g.status()),
            readiness: self.running.readiness.subscribe(),
        }
    }

    /// Checks `f` again each time the controller publishes something (the
    /// fleet, the driver's status, the git source's status, readiness)
    /// until it answers; fails after [`DEADLINE`]. With a repository the
    /// driver publishes on every plan, at least every reconcile tick, so
    /// conditions that follow from a plan (a note written, a push sent) are
    /// looked at again without polling.
    pub async fn until<T>(&self, what: &str, f: impl AsyncFnMut() -> Option<T>) -> T {
        self.until_within(DEADLINE, what, f).await
    }

    /// [`TestServer::until`] with its own patience (real agents start slowly).
    pub async fn until_within<T>(&self, patience: Duration, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
        let mut changes = self.changes();
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            // Seen before looking: what is published meanwhile wakes the wait below.
            changes.mark_seen();
            if let Some(v) = f().await {
                return v;
            }
            if tokio::time::timeout_at(deadline, changes.next()).await.is_err() {
                panic!("timed out after {patience:?} waiting for {what}");
            }
        }
    }

    /// Waits for the controller to plan twice more once `d` has passed
    /// (see [`let_pass_at`]).
    pub async fn let_pass(&self, d: Duration) {
        let_pass_at(self.api_addr(), d, DEADLINE).await;
    }

    /// Shuts down and asserts a clean exit.
    pub async fn stop(self) {
        tokio::time::timeout(DEADLINE * 2, self.running.stop())
            .await
            .expect("shutdown in time")
            .expect("clean shutdown");
    }
}

/// Receivers of everything a controller publishes; [`Changes::next`]
/// resolves when any of them is published again.
pub struct Changes {
    fleet: watch::Receiver<Arc<opamp_gitops::fleet::FleetSnapshot>>,
    driver: Option<watch::Receiver<Arc<opamp_gitops::driver::DriverStatus>>>,
    git: Option<watch::Receiver<opamp_gitops::gitsrc::Status>>,
    readiness: watch::Receiver<opamp_gitops::api::Readiness>,
}

impl Changes {
    /// Counts what is published now as seen.
    pub fn mark_seen(&mut self) {
        self.fleet.mark_unchanged();
        self.readiness.mark_unchanged();
        if let Some(d) = &mut self.driver {
            d.mark_unchanged();
        }
        if let Some(g) = &mut self.git {
            g.mark_unchanged();
        }
    }

    /// Resolves at the next publication of any of them (never when all have closed).
    pub async fn next(&mut self) {
        tokio::select! {
            () = published(Some(&mut self.fleet)) => {}
            () = published(self.driver.as_mut()) => {}
            () = published(self.git.as_mut()) => {}
            () = published(Some(&mut self.readiness)) => {}
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some`, failing the test after
/// [`DEADLINE`]. Only for what nothing publishes (a counter of the OpAMP
/// server, a port of another process): whatever the controller publishes,
/// wait for with [`TestServer::until`] or the long polls ([`follow`]).
pub async fn eventually<T>(what: &str, f: impl AsyncFnMut() -> Option<T>) -> T {
    eventually_within(DEADLINE, what, f).await
}

/// [`eventually`] with its own patience (real processes start slowly).
pub async fn eventually_within<T>(patience: Duration, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < patience,
            "timed out after {patience:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Follows `GET {path}` on the API at `api` with long polls (`?after=` the
/// version of the answer before) until `pick` finds what it waits for in an
/// answer; fails after `patience` with the last answer. The controller holds
/// each request until its answer may have changed, so every answer is new.
pub async fn follow<T>(
    api: SocketAddr,
    path: &str,
    what: &str,
    patience: Duration,
    mut pick: impl FnMut(&serde_json::Value) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + patience;
    let mut last = serde_json::Value::Null;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let query = match last["version"].as_u64() {
            None => path.to_string(),
            Some(_) if left.is_zero() => {
                panic!("timed out after {patience:?} waiting for {what}; GET {path} answered last: {last}")
            }
            Some(v) => format!("{path}?after={v}&wait={}ms", left.min(LONG_POLL).as_millis()),
        };
        let r = http_request(api, "GET", &query, &[], Body::Empty).await;
        assert_eq!(r.status, 200, "GET {query}: {}", String::from_utf8_lossy(&r.body));
        last = serde_json::from_slice(&r.body).expect("JSON body");
        assert!(last["version"].is_u64(), "GET {path} answers a version: {last}");
        if let Some(found) = pick(&last) {
            return found;
        }
    }
}

/// Waits until `GET /api/v1/groups` on `api` shows `group` satisfying `pred`; returns that group.
pub async fn wait_group_at(
    api: SocketAddr,
    group: &str,
    what: &str,
    patience: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let what = format!("group {group} to reach {what}");
    follow(api, "/api/v1/groups", &what, patience, |all| {
        all["groups"]
            .as_array()?
            .iter()
            .find(|g| g["name"] == group)
            .filter(|g| pred(g))
            .cloned()
    })
    .await
}

/// Lets `d` pass, then waits until the controller on `api` has planned
/// twice more: the second of those plans started after `d` (plans run one
/// at a time), so a check that nothing happened meanwhile means the
/// controller looked, after `d`, and did nothing.
pub async fn let_pass_at(api: SocketAddr, d: Duration, patience: Duration) {
    let until = tokio::time::Instant::now() + d;
    let mut seen_after = None;
    follow(
        api,
        "/api/v1/groups",
        &format!("two plans after {d:?}"),
        d + patience,
        |all| {
            let version = all["version"].as_u64()?;
            match seen_after {
                None if tokio::time::Instant::now() >= until => seen_after = Some(version),
                Some(v) if version >= v + 2 => return Some(()),
                _ => {}
            }
            None
        },
    )
    .await
}

/// Waits until `GET /api/v1/agents` on `api` lists agents that `pick` takes.
pub async fn wait_agents_at<T>(
    api: SocketAddr,
    what: &str,
    patience: Duration,
    mut pick: impl FnMut(&[serde_json::Value]) -> Option<T>,
) -> T {
    follow(api, "/api/v1/agents", what, patience, |all| {
        pick(all["agents"].as_array()?)
    })
    .await
}

/// The value of an unlabelled counter or gauge in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

// ---------------------------------------------------------------- the binary

/// Runs the built `opamp-gitops` with `args` in `cwd`, to completion.
pub fn run_cli(args: &[&str], cwd: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_opamp-gitops"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("the binary runs")
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ---------------------------------------------------------------- messages

pub fn uid16(n: u8) -> Vec<u8> {
    let mut u = [n; 16];
    u[6] = 0x70 | (n & 0x0f); // looks like a UUIDv7
    u.to_vec()
}

pub fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
    }
}

pub fn description(identifying: &[(&str, &str)], non_identifying: &[(&str, &str)]) -> AgentDescription {
    AgentDescription {
        identifying_attributes: identifying.iter().map(|(k, v)| kv(k, v)).collect(),
        non_identifying_attributes: non_identifying.iter().map(|(k, v)| kv(k, v)).collect(),
    }
}

pub fn effective_config(body: &str) -> EffectiveConfig {
    EffectiveConfig {
        config_map: Some(AgentConfigMap {
            config_map: [(
                String::new(),
                AgentConfigFile {
                    body: Bytes::copy_from_slice(body.as_bytes()),
                    content_type: "text/yaml".into(),
                },
            )]
            .into(),
        }),
    }
}

pub fn healthy(ok: bool) -> ComponentHealth {
    ComponentHealth {
        healthy: ok,
        start_time_unix_nano: 1,
        ..Default::default()
    }
}

pub fn remote_status(hash: &[u8], status: i32, error: &str) -> RemoteConfigStatus {
    RemoteConfigStatus {
        last_remote_config_hash: Bytes::copy_from_slice(hash),
        status,
        error_message: error.into(),
    }
}

/// A supervisor-like first message: everything [`SUPERVISOR_CAPS`] promises
/// except a remote config status (it has had no config yet).
pub fn hello(uid: &[u8], seq: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: Bytes::copy_from_slice(uid),
        sequence_num: seq,
        capabilities: SUPERVISOR_CAPS,
        agent_description: Some(description(
            &[("service.name", "otelcol-contrib")],
            &[("host.name", "test-host")],
        )),
        health: Some(healthy(true)),
        effective_config: Some(effective_config("receivers: {}\n")),
        ..Default::default()
    }
}

/// A heartbeat: capabilities only.
pub fn heartbeat(uid: &[u8], seq: u64, capabilities: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: Bytes::copy_from_slice(uid),
        sequence_num: seq,
        capabilities,
        ..Default::default()
    }
}

/// A config bundle from `(file name, body)` pairs (YAML).
pub fn bundle(files: &[(&str, &str)]) -> Arc<ConfigBundle> {
    Arc::new(ConfigBundle::yaml(files))
}

pub fn full_state_requested(m: &ServerToAgent) -> bool {
    m.flags & 0x1 != 0
}

// ---------------------------------------------------------------- WebSocket client

/// A raw OpAMP WebSocket client.
pub struct WsAgent {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a WebSocket ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEnd {
    /// A close frame with this code.
    Closed(Option<u16>),
    /// The stream ended without a close frame.
    Dropped,
}

impl WsAgent {
    pub async fn connect(addr: SocketAddr) -> Self {
        let url = format!("ws://{addr}/v1/opamp");
        let (ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("WebSocket connects");
        assert_eq!(resp.status(), 101);
        WsAgent { ws }
    }

    /// Sends a message the current way: header byte 0, then the protobuf.
    pub async fn send(&mut self, msg: &AgentToServer) {
        self.send_raw(codec::encode_ws(msg)).await;
    }

    /// Sends a message the pre-2022 way: the bare protobuf.
    pub async fn send_headerless(&mut self, msg: &AgentToServer) {
        self.send_raw(msg.encode_to_vec()).await;
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.expect("send");
    }

    /// The next ServerToAgent; panics on anything else. Checks the header byte.
    pub async fn recv(&mut self) -> ServerToAgent {
        loop {
            let frame = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("a reply in time")
                .expect("stream open")
                .expect("frame");
            match frame {
                Message::Binary(b) => {
                    assert_eq!(b.first(), Some(&0u8), "the server always sends the header byte");
                    return ServerToAgent::decode(&b[1..]).expect("a ServerToAgent");
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a binary frame, got {other:?}"),
            }
        }
    }

    /// Sends and returns the reply.
    pub async fn exchange(&mut self, msg: &AgentToServer) -> ServerToAgent {
        self.send(msg).await;
        self.recv().await
    }

    /// Reads until the connection ends; returns how (binary frames are skipped).
    pub async fn end(&mut self) -> WsEnd {
        loop {
            match tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("the connection ends in time")
            {
                Some(Ok(Message::Close(frame))) => {
                    // Keep reading so the library sends its close reply.
                    let _ =
                        tokio::time::timeout(DEADLINE, async { while let Some(Ok(_)) = self.ws.next().await {} }).await;
                    return WsEnd::Closed(frame.map(|f: CloseFrame| f.code.into()));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return WsEnd::Dropped,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

// ---------------------------------------------------------------- HTTP client

/// A request body.
pub enum Body {
    Empty,
    /// Sent with Content-Length.
    Plain(Vec<u8>),
    /// Sent with Transfer-Encoding: chunked, in these chunks.
    Chunked(Vec<Vec<u8>>),
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as a ServerToAgent, inflated when it is gzip-encoded.
    pub fn server_to_agent(&self) -> ServerToAgent {
        assert_eq!(self.status, 200, "OpAMP over HTTP always answers 200");
        assert_eq!(self.header("content-type"), Some("application/x-protobuf"));
        let body = if self.header("content-encoding") == Some("gzip") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&self.body[..])
                .read_to_end(&mut out)
                .expect("valid gzip");
            out
        } else {
            self.body.clone()
        };
        ServerToAgent::decode(&body[..]).expect("a ServerToAgent")
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> HttpResponse {
    tokio::time::timeout(DEADLINE, async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        match &body {
            Body::Empty => head.push_str("Content-Length: 0\r\n"),
            Body::Plain(b) => head.push_str(&format!("Content-Length: {}\r\n", b.len())),
            Body::Chunked(_) => head.push_str("Transfer-Encoding: chunked\r\n"),
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        match body {
            Body::Empty => {}
            Body::Plain(b) => out.extend(b),
            Body::Chunked(chunks) => {
                for c in chunks.into_iter().filter(|c| !c.is_empty()) {
                    out.extend(format!("{:x}\r\n", c.len()).into_bytes());
                    out.extend(c);
                    out.extend(b"\r\n");
                }
                out.extend(b"0\r\n\r\n");
            }
        }
        // Write and read at once, so a server that answers before reading
        // everything (413) is still heard.
        let (mut r, mut w) = s.split();
        let write = async {
            let _ = w.write_all(&out).await;
        };
        let mut raw = Vec::new();
        let read = async {
            let _ = r.read_to_end(&mut raw).await;
        };
        tokio::join!(write, read);
        parse_response(&raw)
    })
    .await
    .expect("HTTP exchange in time")
}

/// Parses a raw HTTP/1.1 response (head and body).
pub fn parse_response(raw: &[u8]) -> HttpResponse {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..end]).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_vec() };
    HttpResponse { status, headers, body }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).expect("hex").trim(), 16).expect("size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
        rest = &rest[eol + 2 + size + 2..];
    }
}

/// A plain-HTTP/1.1 client that keeps its connection open between requests,
/// as polling agents and API clients do.
pub struct KeepAlive {
    stream: tokio::io::BufReader<TcpStream>,
    addr: SocketAddr,
}

impl KeepAlive {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        KeepAlive {
            stream: tokio::io::BufReader::new(stream),
            addr,
        }
    }

    /// One request on this connection: the answer's status and body.
    pub async fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Vec<u8>) {
        use tokio::io::AsyncBufReadExt;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let exchange = async {
            let stream = self.stream.get_mut();
            stream.write_all(head.as_bytes()).await.expect("send the head");
            stream.write_all(body).await.expect("send the body");
            let mut status = String::new();
            self.stream.read_line(&mut status).await.expect("the status line");
            let code = status
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("a status line, got {status:?}"));
            let mut length = None;
            loop {
                let mut line = String::new();
                self.stream.read_line(&mut line).await.expect("a header line");
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse::<usize>().ok();
                }
            }
            let mut answer = vec![0; length.expect("answers of a known length")];
            self.stream.read_exact(&mut answer).await.expect("the body");
            (code, answer)
        };
        tokio::time::timeout(DEADLINE, exchange)
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer in time"))
    }

    /// An OpAMP message POSTed to /v1/opamp on this connection: the status.
    pub async fn post(&mut self, msg: &AgentToServer) -> u16 {
        let body = codec::encode_http(msg, false);
        let headers = [("Content-Type", "application/x-protobuf")];
        self.request("POST", "/v1/opamp", &headers, &body).await.0
    }

    /// Waits until the server closes the connection, at most `patience`.
    pub async fn closed_within(&mut self, patience: Duration) {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(patience, self.stream.read(&mut byte))
            .await
            .unwrap_or_else(|_| panic!("the connection was still open after {patience:?}"));
        assert!(
            matches!(read, Ok(0)),
            "the server closes the connection without a word: {read:?}"
        );
    }
}

/// How an HTTP agent sends its message.
#[derive(Debug, Clone, Copy, Default)]
pub struct Post {
    pub gzip_body: bool,
    pub accept_gzip: bool,
    pub chunked: bool,
}

/// POSTs an AgentToServer to /v1/opamp.
pub async fn post(addr: SocketAddr, msg: &AgentToServer, how: Post) -> HttpResponse {
    let body = codec::encode_http(msg, how.gzip_body).to_vec();
    let mut headers = vec![("Content-Type", "application/x-protobuf")];
    if how.gzip_body {
        headers.push(("Content-Encoding", "gzip"));
    }
    if how.accept_gzip {
        headers.push(("Accept-Encoding", "gzip"));
    }
    let body = if how.chunked {
        // Small messages in 7-byte chunks, big ones in about 16.
        let size = 7.max(body.len() / 16);
        Body::Chunked(body.chunks(size).map(<[u8]>::to_vec).collect())
    } else {
        Body::Plain(body)
    };
    http_request(addr, "POST", "/v1/opamp", &headers, body).await
}

/// POSTs raw bytes to /v1/opamp.
pub async fn post_raw(addr: SocketAddr, body: Vec<u8>) -> HttpResponse {
    http_request(
        addr,
        "POST",
        "/v1/opamp",
        &[("Content-Type", "application/x-protobuf")],
        Body::Plain(body),
    )
    .await
}

/// A small deterministic pseudo-random generator (xorshift64*), for fuzz-style tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}
