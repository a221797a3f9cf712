//! Live counters shared by every agent task, and the snapshots and summary
//! made from them.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::agent::Status;

/// Counters the agent tasks update; read only through [`Counters::snapshot`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    connected: AtomicUsize,
    applying: AtomicUsize,
    applied: AtomicUsize,
    failed: AtomicUsize,
    healthy: AtomicUsize,
    connects: AtomicU64,
    restarts: AtomicU64,
    connect_errors: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    pub(crate) fn connected(&self) {
        self.connected.fetch_add(1, Ordering::Relaxed);
        self.connects.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn disconnected(&self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn connect_error(&self) {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    /// A reply that could not be decoded, or an error response from the server.
    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// One agent's collector turned healthy (or stopped being).
    pub(crate) fn health_changed(&self, healthy: bool) {
        if healthy {
            self.healthy.fetch_add(1, Ordering::Relaxed);
        } else {
            self.healthy.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// One agent's process restarted.
    pub(crate) fn restarted(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Moves one agent from one remote-config status to another.
    pub(crate) fn status_changed(&self, from: Status, to: Status) {
        if let Some(g) = self.gauge(from) {
            g.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(g) = self.gauge(to) {
            g.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn gauge(&self, status: Status) -> Option<&AtomicUsize> {
        match status {
            Status::None => None,
            Status::Applying => Some(&self.applying),
            Status::Applied => Some(&self.applied),
            Status::Failed => Some(&self.failed),
        }
    }

    pub(crate) fn snapshot(&self, agents: usize) -> Snapshot {
        Snapshot {
            agents,
            connected: self.connected.load(Ordering::Relaxed),
            applying: self.applying.load(Ordering::Relaxed),
            applied: self.applied.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            healthy: self.healthy.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
            connect_errors: self.connect_errors.load(Ordering::Relaxed),
            messages_sent: self.sent.load(Ordering::Relaxed),
            messages_received: self.received.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// The simulation's counts at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// Agents simulated.
    pub agents: usize,
    /// Agents connected now (HTTP: whose last request was answered).
    pub connected: usize,
    /// Agents whose last remote config is APPLYING, APPLIED or FAILED now.
    pub applying: usize,
    pub applied: usize,
    pub failed: usize,
    /// Agents whose collector reports healthy now.
    pub healthy: usize,
    /// Successful connections so far, reconnections included.
    pub connects: u64,
    /// Process restarts so far (`--restart-every`).
    pub restarts: u64,
    /// Failed connection attempts or requests so far.
    pub connect_errors: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    /// Undecodable replies and server error responses so far.
    pub errors: u64,
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} connected, {} healthy, {} applying, {} applied, {} failed, {} connects, {} restarts, \
             {} connect errors, {} sent, {} received, {} errors",
            self.connected,
            self.agents,
            self.healthy,
            self.applying,
            self.applied,
            self.failed,
            self.connects,
            self.restarts,
            self.connect_errors,
            self.messages_sent,
            self.messages_received,
            self.errors
        )
    }
}

/// What a finished simulation reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// The counts when the last agent stopped (`connected` is then 0).
    pub stats: Snapshot,
    /// The most agents connected at once, as sampled.
    pub peak_connected: usize,
    pub elapsed: Duration,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        write!(
            f,
            "{} agents ran {:.1}s: peak {} connected; {} healthy, {} applying, {} applied, {} failed; \
             {} connects, {} restarts, {} connect errors, {} sent, {} received, {} errors",
            s.agents,
            self.elapsed.as_secs_f64(),
            self.peak_connected,
            s.healthy,
            s.applying,
            s.applied,
            s.failed,
            s.connects,
            s.restarts,
            s.connect_errors,
            s.messages_sent,
            s.messages_received,
            s.errors
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_gauges_move_agents_between_states() {
        let c = Counters::default();
        c.status_changed(Status::None, Status::Applying);
        c.status_changed(Status::None, Status::Applying);
        c.status_changed(Status::Applying, Status::Applied);
        c.status_changed(Status::Applying, Status::Failed);
        c.status_changed(Status::Failed, Status::Applying);
        c.connected();
        c.connected();
        c.disconnected();
        c.health_changed(true);
        c.health_changed(true);
        c.health_changed(false);
        c.restarted();
        let s = c.snapshot(5);
        assert_eq!((s.agents, s.connected, s.connects, s.restarts), (5, 1, 2, 1));
        assert_eq!((s.applying, s.applied, s.failed, s.healthy), (1, 1, 0, 1));
        assert!(
            s.to_string()
                .starts_with("1/5 connected, 1 healthy, 1 applying, 1 applied, 0 failed, 2 connects, 1 restarts")
        );
    }
}
