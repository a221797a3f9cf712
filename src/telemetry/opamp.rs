//! What happens on the OpAMP endpoint: messages received, refused or
//! unreadable, overload, WebSocket connections. Counted per message, so a
//! count takes no lock: a look among two label values and one atomic add.

use std::fmt::Display;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tracing::{debug, warn};

use super::{InternalEvent, Labeled, Registry};
use crate::model::Transport;

const TARGET: &str = "opamp_gitops::opamp::session";

/// The OpAMP server's counters, by transport.
#[derive(Debug, Clone)]
pub struct OpampMetrics {
    /// AgentToServer messages received (well-formed or not).
    messages_received: Labeled<Counter>,
    /// Messages that were not a valid OpAMP message.
    decode_errors: Labeled<Counter>,
    /// Messages refused for their size.
    oversized: Labeled<Counter>,
    /// Requests answered 503 because the fleet's queue was full.
    overloaded: Labeled<Counter>,
    /// Connections and reports refused, by reason.
    refused: Labeled<Counter>,
    websocket_connections: Gauge,
}

impl Default for OpampMetrics {
    fn default() -> Self {
        let by_transport = || Labeled::new("transport", Transport::ALL.map(Transport::as_str));
        OpampMetrics {
            messages_received: by_transport(),
            decode_errors: by_transport(),
            oversized: by_transport(),
            overloaded: by_transport(),
            refused: Labeled::new("reason", Refusal::ALL.map(Refusal::as_str)),
            websocket_connections: Gauge::default(),
        }
    }
}

impl OpampMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.add(
            "opamp_messages_received",
            "OpAMP messages received from agents.",
            self.messages_received.clone(),
        );
        registry.add(
            "opamp_decode_errors",
            "OpAMP messages that could not be decoded.",
            self.decode_errors.clone(),
        );
        registry.add(
            "opamp_oversized_messages",
            "OpAMP messages refused for their size.",
            self.oversized.clone(),
        );
        registry.add(
            "opamp_overloaded",
            "OpAMP requests answered 503 because the server was overloaded.",
            self.overloaded.clone(),
        );
        registry.add(
            "opamp_refused",
            "OpAMP requests and reports refused for their credentials, by reason.",
            self.refused.clone(),
        );
        registry.add(
            "opamp_websocket_connections",
            "Open OpAMP WebSocket connections.",
            self.websocket_connections.clone(),
        );
    }
}

/// An AgentToServer message arrived (whether it decodes or not).
pub struct MessageReceived {
    pub transport: Transport,
}

impl InternalEvent for MessageReceived {
    type Metrics = OpampMetrics;

    fn emit(self, m: &OpampMetrics) {
        m.messages_received.inc(self.transport.as_str());
    }
}

/// A WebSocket message over the size limit (as a frame, or once
/// decompressed): the connection is closed.
pub struct WebSocketMessageTooBig {
    pub conn: u64,
}

impl InternalEvent for WebSocketMessageTooBig {
    type Metrics = OpampMetrics;

    fn emit(self, m: &OpampMetrics) {
        m.oversized.inc(Transport::WebSocket.as_str());
        warn!(target: TARGET, conn = self.conn, "WebSocket message over the size limit; closing the connection");
    }
}

/// A plain-HTTP message over the size limit: answered 413.
pub struct HttpMessageTooBig;

impl InternalEvent for HttpMessageTooBig {
    type Metrics = OpampMetrics;

    fn emit(self, m: &OpampMetrics) {
        m.oversized.inc(Transport::Http.as_str());
        warn!(target: TARGET, "HTTP OpAMP message over the size limit");
    }
}

/// A WebSocket message that is not an OpAMP message: the connection is closed.
pub struct WebSocketMessageMalformed<'a> {
    pub conn: u64,
    pub error: &'a dyn Display,
}

impl InternalEvent for WebSocketMessageMalformed<'_> {
    type Metrics = OpampMetrics;

    fn emit(self, m: &OpampMetrics) {
        m.decode_errors.inc(Transport::WebSocket.as_str());
        warn!(target: TARGET, conn = self.conn, error = %self.error, "malformed WebSocket message; closing the connection");
    }
}

/// A plain-HTTP body that is not an OpAMP message: answered BadRequest.
pub struct HttpMessageMalformed<'a> {
    pub error: &'a dyn Display,
}

impl InternalEvent for HttpMessageMalformed<'_> {
    type Metrics = OpampMetrics;

    fn emit(self, m: &OpampMetrics) {
        m.decode_errors.inc(Transport::Http.as_str());
        warn!(target: TARGET, error = %self.error, "malformed HTTP OpAMP message");
    }
}

/// A plain-HTTP body that could not be read (broken chunked encoding...):
/// answered BadRequest.
pub struct HttpBodyUnreadable<'a> {
    pub error: &'a dyn Display,
}

impl InternalEvent for HttpBodyUnreadable<'_> {
    type Metrics = OpampMetrics;

    fn emit(self, m: &OpampMetrics) {
        m.decode_errors.inc(Transport::Http.as_str());
        debug!(target: TARGET, error = %self.error, "reading an HTTP body failed");
    }
}

/// The fleet's queue was full: an HTTP agent is answered 503.
pub struct HttpOverloaded;

impl InternalEvent for HttpOverloaded {
    type Metrics = OpampMetrics;

    fn emit(self, m: &OpampMetrics) {
        m.overloaded.inc(Transport::Http.as_str());
        warn!(target: TARGET, "fleet queue full: an HTTP agent is asked to retry later");
    }
}

/// A WebSocket connection was accepted.
pub struct WebSocketOpened;

impl InternalEvent for WebSocketOpened {
    type Metrics = OpampMetrics;

    fn emit(self, m: &OpampMetrics) {
        m.websocket_connections.inc();
    }
}

/// A WebSocket connection ended.
pub struct WebSocketClosed;

impl InternalEvent for WebSocketClosed {
    type Metrics = OpampMetrics;

    fn emit(self, m: &OpampMetrics) {
        m.websocket_connections.dec();
    }
}

/// Why an agent was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Agent tokens are required and none came.
    MissingToken,
    /// The token is not in the tokens file.
    InvalidToken,
    /// The source presented bad tokens too often lately.
    RateLimited,
    /// A report for a uid bound to another identity.
    Impersonation,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::MissingToken,
        Refusal::InvalidToken,
        Refusal::RateLimited,
        Refusal::Impersonation,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Refusal::MissingToken => "missing_token",
            Refusal::InvalidToken => "invalid_token",
            Refusal::RateLimited => "rate_limited",
            Refusal::Impersonation => "impersonation",
        }
    }
}

/// An agent's request, connection or report was refused for its credentials.
pub struct AgentRefused {
    pub reason: Refusal,
    pub source: Option<std::net::IpAddr>,
}

impl InternalEvent for AgentRefused {
    type Metrics = OpampMetrics;

    fn emit(self, m: &OpampMetrics) {
        m.refused.inc(self.reason.as_str());
        let source = self.source.map(|s| s.to_string());
        match self.reason {
            Refusal::RateLimited => debug!(target: TARGET, source, reason = self.reason.as_str(), "agent refused"),
            _ => warn!(target: TARGET, source, reason = self.reason.as_str(), "agent refused"),
        }
    }
}
