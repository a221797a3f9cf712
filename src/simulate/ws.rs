//! The WebSocket transport of one simulated agent: connect (ramped), feed
//! frames and timers to the agent, send what it says, reconnect with backoff,
//! and say goodbye with `agent_disconnect` and a Close frame.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use super::agent::Input;
use super::runner::{Backoff, Runner, Shared, seed};
use crate::opamp::codec;
use crate::proto::{AgentToServer, ServerToAgent};

type Ws = WebSocketStream<TcpStream>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Small buffers: an agent receives a few small messages a minute, and ten
/// thousand agents with tungstenite's 128 KiB defaults would need gigabytes.
fn ws_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

/// How a connection ended.
enum End {
    Lost,
    Stopped,
    /// The process restarts; the new one connects after this long.
    Restart(Duration),
}

/// Runs one agent until `cancel`.
pub(crate) async fn run(mut runner: Runner, cancel: CancellationToken) {
    let shared = Arc::clone(&runner.shared);
    runner.start();
    let mut backoff = Backoff::new(seed(&runner.agent.uid(), runner.agent.index()));
    loop {
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            r = runner.offline_until(connect(&shared, runner.agent.index())) => r,
        };
        match attempt {
            Ok(ws) => {
                backoff.reset();
                shared.counters.connected();
                let end = session(&mut runner, ws, &cancel).await;
                shared.counters.disconnected();
                let _ = runner.feed(Input::Disconnected);
                match end {
                    End::Stopped => return,
                    End::Restart(gap) => {
                        if !runner.wait_offline(gap, &cancel).await {
                            return;
                        }
                        continue;
                    }
                    End::Lost => {}
                }
            }
            Err(error) => {
                shared.counters.connect_error();
                tracing::debug!(agent = runner.agent.index(), %error, "WebSocket connect failed");
            }
        }
        if !runner.wait_offline(backoff.next_delay(), &cancel).await {
            return;
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

async fn connect(shared: &Shared, agent: usize) -> Result<Ws, ConnectError> {
    // The semaphore is never closed, so acquiring only fails if it were.
    let _permit = shared.connecting.acquire().await;
    let config = ws_config(shared.max_message_bytes);
    let handshake = async {
        let stream = open(&shared.authority, agent).await?;
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(shared.url.as_str(), stream, Some(config)).await?;
        Ok(ws)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout(CONNECT_TIMEOUT)),
    }
}

/// A TCP connection to the server (`host:port`), trying each of its
/// addresses in turn. To a loopback IPv4 address, each agent connects from an
/// address of its own in 127.1.0.0/16, as agents on their own hosts would:
/// from one address, the kernel's search for a free local port grows with the
/// connections already open, and connecting the 19,000th agent costs a
/// millisecond of CPU.
async fn open(authority: &str, agent: usize) -> std::io::Result<TcpStream> {
    let mut last = None;
    for server in tokio::net::lookup_host(authority).await? {
        match open_to(server, agent).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{authority} has no address"))))
}

async fn open_to(server: SocketAddr, agent: usize) -> std::io::Result<TcpStream> {
    let socket = match server {
        SocketAddr::V4(v4) if v4.ip().is_loopback() => {
            let socket = TcpSocket::new_v4()?;
            let source = SocketAddr::new(IpAddr::V4(loopback_source(agent)), 0);
            match defer_port(&socket).and_then(|()| socket.bind(source)) {
                Ok(()) => socket,
                // A loopback interface with 127.0.0.1 alone: the kernel picks.
                Err(_) => TcpSocket::new_v4()?,
            }
        }
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Leaves the choice of the local port to `connect`, which knows the server:
/// `bind` alone picks a port without it, and one whose last connection to the
/// server is still in TIME_WAIT makes the connect fail.
#[cfg(target_os = "linux")]
fn defer_port(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a socket this function borrows, and an option of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Elsewhere the agents connect from the address the kernel picks.
#[cfg(not(target_os = "linux"))]
fn defer_port(_: &TcpSocket) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Agent `i`'s own address in 127.1.0.0/16, avoiding octets 0 and 255: 64,516
/// agents before addresses repeat.
fn loopback_source(agent: usize) -> Ipv4Addr {
    let n = agent % (254 * 254);
    Ipv4Addr::new(127, 1, (1 + n / 254) as u8, (1 + n % 254) as u8)
}

async fn session(runner: &mut Runner, mut ws: Ws, cancel: &CancellationToken) -> End {
    if let Some(msg) = runner.feed(Input::Connected)
        && send(runner, &mut ws, &msg).await.is_err()
    {
        return End::Lost;
    }
    loop {
        let timer = runner.timers.next();
        let reply = tokio::select! {
            _ = cancel.cancelled() => {
                goodbye(runner, ws).await;
                return End::Stopped;
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Binary(bytes))) => {
                    match codec::decode_ws::<ServerToAgent>(&bytes, runner.shared.max_message_bytes) {
                        Ok(msg) => runner.received(msg),
                        Err(error) => {
                            runner.shared.counters.error();
                            tracing::warn!(agent = runner.agent.index(), %error, "undecodable message from the server");
                            None
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return End::Lost,
                // Pings are answered by tungstenite; text frames are not OpAMP.
                Some(Ok(_)) => None,
            },
            input = timer => {
                let step = runner.step(input);
                if let Some(gap) = step.reconnect {
                    // The process restarts: its goodbye, then the connection closes.
                    if let Some(msg) = step.send {
                        let _ = send(runner, &mut ws, &msg).await;
                    }
                    close(ws).await;
                    return End::Restart(gap);
                }
                step.send
            }
        };
        if let Some(msg) = reply
            && send(runner, &mut ws, &msg).await.is_err()
        {
            return End::Lost;
        }
    }
}

async fn send(runner: &Runner, ws: &mut Ws, msg: &AgentToServer) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    ws.send(Message::Binary(codec::encode_ws(msg).into())).await?;
    runner.shared.counters.sent();
    Ok(())
}

/// `agent_disconnect`, then a Close frame, then wait briefly for the server's Close.
async fn goodbye(runner: &mut Runner, mut ws: Ws) {
    if let Some(msg) = runner.feed(Input::Shutdown) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, send(runner, &mut ws, &msg)).await;
    }
    close(ws).await;
}

/// A Close frame, then wait briefly for the server's Close.
async fn close(mut ws: Ws) {
    let farewell = async {
        ws.close(None).await?;
        while let Some(frame) = ws.next().await {
            frame?;
        }
        Ok::<(), tokio_tungstenite::tungstenite::Error>(())
    };
    if let Ok(Err(error)) = tokio::time::timeout(CLOSE_TIMEOUT, farewell).await {
        tracing::debug!(%error, "WebSocket close did not complete");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_agent_connects_from_an_address_of_its_own_on_loopback() {
        let all: std::collections::HashSet<Ipv4Addr> = (0..254 * 254).map(loopback_source).collect();
        assert_eq!(all.len(), 254 * 254);
        assert!(
            all.iter()
                .all(|ip| ip.is_loopback() && !ip.octets()[2..].iter().any(|&o| o == 0 || o == 255))
        );
        assert_eq!(loopback_source(254 * 254), loopback_source(0), "then they repeat");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_server_sees_the_agents_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap().to_string();
        let (_stream, seen) = tokio::join!(open(&server, 300), listener.accept());
        let (_, peer) = seen.unwrap();
        assert_eq!(peer.ip(), IpAddr::V4(loopback_source(300)));
        assert_eq!(peer.ip(), IpAddr::V4(Ipv4Addr::new(127, 1, 2, 47)));
    }
}
