//! The plain-HTTP transport of one simulated agent: every message is a POST
//! whose reply goes back to the agent; the heartbeat timer is the poll. All
//! agents share one pooled HTTP/1 client, so connections are reused rather
//! than opened per request, and the number in flight is bounded.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use super::agent::Input;
use super::runner::{Backoff, Runner, Shared, seed};
use crate::opamp::codec;
use crate::proto::{AgentToServer, ServerToAgent};

/// The client every HTTP agent of a simulation shares.
pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Long enough for thousands of agents to take turns through the in-flight bound.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `Retry-After` honoured, so a confused server cannot park agents for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

pub(crate) fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("{0}")]
    Client(#[from] hyper_util::client::legacy::Error),
    #[error("reading the reply: {0}")]
    Body(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("server answered {0}")]
    Status(StatusCode),
    #[error("server is busy; retry after {0:?}")]
    Busy(Option<Duration>),
    #[error("undecodable reply: {0}")]
    Decode(#[from] codec::DecodeError),
}

/// Runs one agent until `cancel`.
///
/// Like opamp-go's HTTP client: a request that fails is sent again, the same
/// message, after a backoff; what changes meanwhile follows in the next
/// request once the server answers. The polling timer is the heartbeat.
pub(crate) async fn run(mut runner: Runner, client: HttpClient, cancel: CancellationToken) {
    let shared = Arc::clone(&runner.shared);
    runner.start();
    let mut backoff = Backoff::new(seed(&runner.agent.uid(), runner.agent.index()));
    let mut online = false;
    let mut failing = false;
    let mut outbox = runner.feed(Input::Connected);
    loop {
        if let Some(msg) = outbox.take() {
            let result = tokio::select! {
                _ = cancel.cancelled() => break,
                r = post(&shared, &client, &msg) => r,
            };
            match result {
                Ok(reply) => {
                    shared.counters.sent();
                    if !online {
                        online = true;
                        shared.counters.connected();
                    }
                    backoff.reset();
                    if failing {
                        // The reply is taken in while still offline, so that
                        // it and what changed during the failures leave in
                        // one message.
                        failing = false;
                        let _ = runner.received(reply);
                        outbox = runner.feed(Input::Online);
                    } else {
                        outbox = runner.received(reply);
                    }
                }
                Err(error) => {
                    shared.counters.connect_error();
                    tracing::debug!(agent = runner.agent.index(), %error, "OpAMP request failed");
                    if online {
                        online = false;
                        shared.counters.disconnected();
                    }
                    if !failing {
                        failing = true;
                        let _ = runner.feed(Input::Disconnected);
                    }
                    let delay = match error {
                        PostError::Busy(Some(d)) => d.min(MAX_RETRY_AFTER),
                        _ => backoff.next_delay(),
                    };
                    if !runner.wait_offline(delay, &cancel).await {
                        break;
                    }
                    outbox = Some(msg);
                }
            }
            continue;
        }
        let timer = runner.timers.next();
        let step = tokio::select! {
            _ = cancel.cancelled() => break,
            input = timer => runner.step(input),
        };
        match step.reconnect {
            Some(gap) => {
                // The process restarts: its goodbye, then a new process.
                if let Some(bye) = step.send {
                    deliver_goodbye(&shared, &client, &bye).await;
                }
                if online {
                    online = false;
                    shared.counters.disconnected();
                }
                if !runner.wait_offline(gap, &cancel).await {
                    break;
                }
                failing = false;
                outbox = runner.feed(Input::Connected);
            }
            None => outbox = step.send,
        }
    }
    if online {
        if let Some(msg) = runner.feed(Input::Shutdown) {
            deliver_goodbye(&shared, &client, &msg).await;
        }
        shared.counters.disconnected();
    }
}

/// Posts a last message, bounded in time; its reply does not matter.
async fn deliver_goodbye(shared: &Shared, client: &HttpClient, msg: &AgentToServer) {
    match tokio::time::timeout(GOODBYE_TIMEOUT, post(shared, client, msg)).await {
        Ok(Ok(_)) => shared.counters.sent(),
        Ok(Err(error)) => tracing::debug!(%error, "agent_disconnect not delivered"),
        Err(_) => tracing::debug!("agent_disconnect not answered in time"),
    }
}

async fn post(shared: &Shared, client: &HttpClient, msg: &AgentToServer) -> Result<ServerToAgent, PostError> {
    // The semaphore is never closed, so acquiring only fails if it were.
    let _permit = shared.connecting.acquire().await;
    let uid = uuid::Uuid::from_slice(&msg.instance_uid)
        .map(|u| u.to_string())
        .unwrap_or_default();
    let request = Request::post(shared.url.as_str())
        .header(CONTENT_TYPE, "application/x-protobuf")
        .header(ACCEPT_ENCODING, "gzip")
        .header("OpAMP-Instance-UID", uid)
        .body(Full::new(codec::encode_http(msg, false)))?;
    let exchange = async {
        let response = client.request(request).await?;
        let status = response.status();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            let after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(PostError::Busy(after));
        }
        if status != StatusCode::OK {
            return Err(PostError::Status(status));
        }
        let encoding = response
            .headers()
            .get(CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // The limit applies to the wire size here and again after inflating.
        let body = Limited::new(response.into_body(), shared.max_message_bytes)
            .collect()
            .await
            .map_err(|e| PostError::Body(e.to_string()))?
            .to_bytes();
        Ok(codec::decode_http::<ServerToAgent>(
            &body,
            encoding.as_deref(),
            shared.max_message_bytes,
        )?)
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => Err(PostError::Timeout(REQUEST_TIMEOUT)),
    }
}
