//! What every OpAMP session shares: the fleet, metrics, limits, shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Failures, TokenFile};
use crate::fleet::{ConnId, FleetHandle};
use crate::telemetry::opamp::OpampMetrics;

/// Everything a session needs; cheap to clone.
#[derive(Clone)]
pub struct OpampContext {
    pub fleet: FleetHandle,
    pub metrics: Arc<OpampMetrics>,
    /// The largest message accepted, after decompression.
    pub max_message_bytes: usize,
    /// Fires when the server stops: WebSockets send a close frame and end.
    pub shutdown: CancellationToken,
    /// Tracks WebSocket sessions so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// WebSockets are pinged this often, and closed when silent (no frame,
    /// pongs included) for three of these.
    pub heartbeat_interval: Duration,
    /// The heartbeat (HTTP: polling) interval offered to agents, if any.
    pub offer_heartbeat: Option<Duration>,
    /// How long the reply to an agent's first report on a WebSocket may wait
    /// for the config the reconciler pushes to an agent that comes, so that
    /// the two go as one message; zero (no reconciler, or one that does not
    /// plan yet): not at all.
    pub first_reply_wait: watch::Receiver<Duration>,
    /// When set, every WebSocket upgrade and HTTP request must carry one of
    /// these tokens.
    pub agent_tokens: Option<TokenFile>,
    /// Sources that presented bad tokens too often are refused for a while.
    pub auth_failures: Arc<Failures>,
    next_conn: Arc<AtomicU64>,
}

/// [`OpampContext::first_reply_wait`] once the reconciler plans: a plan takes
/// in an agent that comes well within it, even at 100,000 agents.
pub const FIRST_REPLY_WAIT: Duration = Duration::from_secs(1);

/// Bad tokens from one source address within [`AUTH_FAILURE_WINDOW`] before
/// it is refused without a look until the window has passed.
pub const MAX_AUTH_FAILURES: u32 = 20;
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);

impl OpampContext {
    pub fn new(
        fleet: FleetHandle,
        metrics: Arc<OpampMetrics>,
        max_message_bytes: usize,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        heartbeat_interval: Duration,
    ) -> Self {
        OpampContext {
            fleet,
            metrics,
            max_message_bytes,
            shutdown,
            tracker,
            heartbeat_interval,
            offer_heartbeat: None,
            first_reply_wait: watch::channel(Duration::ZERO).1,
            agent_tokens: None,
            auth_failures: Arc::new(Failures::new(MAX_AUTH_FAILURES, AUTH_FAILURE_WINDOW)),
            next_conn: Arc::new(AtomicU64::new(1)),
        }
    }

    /// A fresh connection id, larger than every earlier one.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}
