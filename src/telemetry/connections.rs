//! What admission does on a listener (`crate::listen`): connections open,
//! and connections closed to keep within the limits, by reason.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tracing::debug;

use super::{InternalEvent, Labeled, Registry};

const TARGET: &str = "opamp_gitops::listen";

/// Why admission closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Closed at once: the listener (or its source) was full of connections
    /// that had all sent a request.
    Refused,
    /// A quiet connection closed to make room for a new one.
    Evicted,
    /// A quiet connection closed because its first request took too long.
    TimedOut,
    /// A plain-HTTP connection closed because it sent no new request for too
    /// long after its last answer.
    Idle,
}

impl Closed {
    const ALL: [Closed; 4] = [Closed::Refused, Closed::Evicted, Closed::TimedOut, Closed::Idle];

    fn as_str(self) -> &'static str {
        match self {
            Closed::Refused => "refused",
            Closed::Evicted => "evicted",
            Closed::TimedOut => "timed_out",
            Closed::Idle => "idle",
        }
    }
}

/// One listener's connection metrics.
#[derive(Debug, Clone)]
pub struct ConnectionMetrics {
    listener: &'static str,
    open: Gauge,
    closed: Labeled<Counter>,
}

impl ConnectionMetrics {
    /// The metrics of the listener named `listener` (`opamp` or `api`).
    pub fn new(listener: &'static str) -> Self {
        ConnectionMetrics {
            listener,
            open: Gauge::default(),
            closed: Labeled::new("reason", Closed::ALL.map(Closed::as_str)),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        let l = self.listener;
        registry.add(
            &format!("{l}_connections"),
            &format!("Open connections on the {l} listener."),
            self.open.clone(),
        );
        registry.add(
            &format!("{l}_connections_closed"),
            &format!("Connections on the {l} listener closed to keep within its limits, by reason."),
            self.closed.clone(),
        );
    }

    /// How many connections were closed for `reason`.
    pub fn closed(&self, reason: Closed) -> u64 {
        self.closed.get(reason.as_str()).map_or(0, Counter::get)
    }

    pub fn opened(&self) {
        self.open.inc();
    }

    pub fn released(&self) {
        self.open.dec();
    }
}

/// Admission closed a connection.
pub struct ConnectionClosed {
    pub reason: Closed,
    pub source: std::net::IpAddr,
}

impl InternalEvent for ConnectionClosed {
    type Metrics = ConnectionMetrics;

    fn emit(self, m: &ConnectionMetrics) {
        m.closed.inc(self.reason.as_str());
        debug!(target: TARGET, listener = m.listener, source = %self.source, reason = self.reason.as_str(), "connection closed by admission");
    }
}
