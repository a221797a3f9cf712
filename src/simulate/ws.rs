//! The WebSocket transport of one simulated agent: connect (ramped), feed
//! frames and timers to the agent, send what it says, reconnect with backoff,
//! and say goodbye with `agent_disconnect` and a Close frame.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use super::agent::Input;
use super::runner::{Backoff, Runner, Shared, seed};
use crate::opamp::codec;
use crate::proto::{AgentToServer, ServerToAgent};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

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
            r = connect(&shared) => r,
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
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

async fn connect(shared: &Shared) -> Result<Ws, ConnectError> {
    // The semaphore is never closed, so acquiring only fails if it were.
    let _permit = shared.connecting.acquire().await;
    let config = ws_config(shared.max_message_bytes);
    let handshake = tokio_tungstenite::connect_async_with_config(shared.url.as_str(), Some(config), true);
    match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ConnectError::Timeout(CONNECT_TIMEOUT)),
    }
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
