//! The least CPU a WebSocket OpAMP server spends per message here: one
//! thread, a `mio` poll loop, tungstenite's framing, and to each message a
//! reply that carries the agent's uid, decoded and encoded with prost. No
//! fleet, no records, no async runtime.
//!
//! It starts `opamp-gitops simulate` against itself, waits until every agent
//! is connected and has sent a heartbeat since, then measures its own CPU over
//! a window at idle, as `fleet_bench` measures the servers, and prints the CPU
//! per message.
//!
//! ```sh
//! cargo build --release   # the opamp-gitops binary it starts
//! cargo run --release --example ws_floor -- [AGENTS] [WINDOW_S] [HEARTBEAT_S]   # 10000 30 10
//! ```

use std::io::{ErrorKind, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use opamp_gitops::opamp::codec;
use opamp_gitops::proto::{AgentToServer, ServerToAgent};
use tokio_tungstenite::tungstenite::handshake::server::{NoCallback, ServerHandshake};
use tokio_tungstenite::tungstenite::handshake::{HandshakeError, MidHandshake};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, WebSocket};

mod common;

type Result<T> = std::result::Result<T, common::Error>;

const LISTENER: Token = Token(usize::MAX);
const MAX_MESSAGE: usize = 4 << 20;
/// Every wait gives up after this long.
const TIMEOUT: Duration = Duration::from_secs(120);

enum Conn {
    Handshaking(MidHandshake<ServerHandshake<Socket, NoCallback>>),
    Open(WebSocket<Socket>),
}

/// A connection's stream. A read shorter than asked for emptied the socket,
/// so the next read returns `WouldBlock` without a system call until the
/// socket is ready again (as tokio does): one read per message, not two.
struct Socket {
    stream: TcpStream,
    drained: bool,
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.drained {
            return Err(ErrorKind::WouldBlock.into());
        }
        let n = self.stream.read(buf)?;
        self.drained = n < buf.len();
        Ok(n)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// What the poll loop is waiting for.
enum Phase {
    Connecting,
    /// Every agent's next heartbeat, so that the window sees them all.
    Settling(Instant),
    Measuring {
        until: Instant,
        messages: u64,
        cpu: f64,
    },
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut next = |default: u64| -> Result<u64> {
        match args.next() {
            Some(a) => Ok(a.parse().map_err(|_| format!("not a number: {a}"))?),
            None => Ok(default),
        }
    };
    let (agents, window, heartbeat) = (next(10_000)?, next(30)?, next(10)?);
    let (window, heartbeat) = (Duration::from_secs(window), Duration::from_secs(heartbeat));

    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind("127.0.0.1:0".parse()?)?;
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut sim = simulate(&format!("ws://{}/v1/opamp", listener.local_addr()?), agents, heartbeat)?;
    let started = Instant::now();
    println!("ws_floor: {agents} agents, heartbeat every {heartbeat:?}, window {window:?}");

    // The controller's settings: reads of 512 bytes (tungstenite zeroes the
    // whole read buffer, 128 KiB by default, for every read), writes at once.
    let config = WebSocketConfig::default().read_buffer_size(512).write_buffer_size(0);
    let mut events = Events::with_capacity(1024);
    // By token, in the order they came.
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let (mut open, mut messages) = (0u64, 0u64);
    let mut phase = Phase::Connecting;
    loop {
        let now = Instant::now();
        let wake = match phase {
            Phase::Connecting => started + TIMEOUT,
            Phase::Settling(at) => at,
            Phase::Measuring { until, .. } => until,
        };
        if now >= wake {
            match phase {
                Phase::Connecting => return Err(format!("only {open} of {agents} agents connected").into()),
                Phase::Settling(_) => {
                    phase = Phase::Measuring {
                        until: now + window,
                        messages,
                        cpu: cpu()?,
                    }
                }
                Phase::Measuring {
                    messages: m0, cpu: c0, ..
                } => {
                    let (cpu, messages) = (cpu()? - c0, messages - m0);
                    println!(
                        "{messages} messages in {window:?}: {:.2} CPU-s, {:.2}% of a core, {:.1} µs per message ({open} agents connected)",
                        cpu,
                        100.0 * cpu / window.as_secs_f64(),
                        1e6 * cpu / messages.max(1) as f64,
                    );
                    sim.kill()?;
                    sim.wait()?;
                    return Ok(());
                }
            }
            continue;
        }
        match poll.poll(&mut events, Some(wake - now)) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            r => r?,
        }
        for event in &events {
            if event.token() == LISTENER {
                loop {
                    let mut stream = match listener.accept() {
                        Ok((stream, _)) => stream,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    };
                    poll.registry().register(
                        &mut stream,
                        Token(conns.len()),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    let socket = Socket { stream, drained: false };
                    conns.push(handshake(
                        tungstenite::accept_with_config(socket, Some(config)),
                        &mut open,
                    ));
                }
                continue;
            }
            let conn = &mut conns[event.token().0];
            match conn.take() {
                Some(Conn::Handshaking(mut mid)) => {
                    mid.get_mut().get_mut().drained = false;
                    *conn = handshake(mid.handshake(), &mut open);
                }
                Some(Conn::Open(mut ws)) => {
                    ws.get_mut().drained = false;
                    if answer(&mut ws, &mut messages) {
                        *conn = Some(Conn::Open(ws));
                    } else {
                        open -= 1;
                    }
                }
                None => {}
            }
        }
        if matches!(phase, Phase::Connecting) && open == agents {
            println!("connected in {:.2} s", started.elapsed().as_secs_f64());
            phase = Phase::Settling(Instant::now() + heartbeat + Duration::from_secs(2));
        }
    }
}

/// The connection after a step of its handshake, counted in `open` once done.
fn handshake(
    step: std::result::Result<WebSocket<Socket>, HandshakeError<ServerHandshake<Socket, NoCallback>>>,
    open: &mut u64,
) -> Option<Conn> {
    match step {
        Ok(ws) => {
            *open += 1;
            Some(Conn::Open(ws))
        }
        Err(HandshakeError::Interrupted(mid)) => Some(Conn::Handshaking(mid)),
        Err(HandshakeError::Failure(_)) => None,
    }
}

/// Answers each message waiting on `ws`; false once the connection is gone.
fn answer(ws: &mut WebSocket<Socket>, messages: &mut u64) -> bool {
    loop {
        match ws.read() {
            Ok(Message::Binary(data)) => {
                *messages += 1;
                let Ok(msg) = codec::decode_ws::<AgentToServer>(&data, MAX_MESSAGE) else {
                    return false;
                };
                let reply = ServerToAgent {
                    instance_uid: msg.instance_uid,
                    ..Default::default()
                };
                match ws.send(Message::Binary(codec::encode_ws(&reply).into())) {
                    Ok(()) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return false,
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                // Nothing more to read: write what a reply left in the buffer.
                return match ws.flush() {
                    Ok(()) => true,
                    Err(tungstenite::Error::Io(e)) => e.kind() == ErrorKind::WouldBlock,
                    Err(_) => false,
                };
            }
            Err(_) => return false,
        }
    }
}

fn simulate(server: &str, agents: u64, heartbeat: Duration) -> Result<Child> {
    Ok(Command::new(common::sibling_binary()?)
        .args([
            "simulate",
            "--server",
            server,
            "--transport",
            "ws",
            "--apply-delay",
            "0s",
        ])
        .args(["--agents", &agents.to_string()])
        .args(["--heartbeat", &humantime::format_duration(heartbeat).to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// This process's user and system CPU time so far, in seconds.
fn cpu() -> Result<f64> {
    common::cpu_seconds(&std::fs::read_to_string("/proc/self/stat")?)
}
