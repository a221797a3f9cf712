//! Process metrics: counters bumped by the transports, gauges read from the
//! newest fleet snapshot, rendered in the Prometheus text format. Agent ids
//! never become labels.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::fleet::{FleetSnapshot, Transport};

/// A counter per OpAMP transport.
#[derive(Debug, Default)]
pub struct PerTransport {
    websocket: AtomicU64,
    http: AtomicU64,
}

impl PerTransport {
    pub fn inc(&self, t: Transport) {
        self.cell(t).fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, t: Transport) -> u64 {
        self.cell(t).load(Ordering::Relaxed)
    }

    fn cell(&self, t: Transport) -> &AtomicU64 {
        match t {
            Transport::WebSocket => &self.websocket,
            Transport::Http => &self.http,
        }
    }
}

/// Counters shared by every task (`Arc<Metrics>`).
#[derive(Debug, Default)]
pub struct Metrics {
    /// AgentToServer messages received (well-formed or not).
    pub messages_received: PerTransport,
    /// Messages that were not a valid OpAMP message.
    pub decode_errors: PerTransport,
    /// Messages refused for their size.
    pub oversized: PerTransport,
    /// Requests answered 503 because the fleet's queue was full.
    pub overloaded: PerTransport,
    pub websocket_opened: AtomicU64,
    pub websocket_closed: AtomicU64,
}

const TRANSPORTS: [Transport; 2] = [Transport::WebSocket, Transport::Http];

impl Metrics {
    /// The Prometheus text exposition of these counters and of `fleet`.
    pub fn render(&self, fleet: &FleetSnapshot) -> String {
        let mut out = String::with_capacity(2048);
        let mut connected = [0u64; 2];
        let mut offline = 0u64;
        for r in fleet.agents.values() {
            match (r.connected, r.transport) {
                (true, Transport::WebSocket) => connected[0] += 1,
                (true, Transport::Http) => connected[1] += 1,
                (false, _) => offline += 1,
            }
        }
        header(
            &mut out,
            "opamp_gitops_agents_connected",
            "gauge",
            "Agents connected, by transport.",
        );
        for (t, n) in TRANSPORTS.iter().zip(connected) {
            let _ = writeln!(out, "opamp_gitops_agents_connected{{transport=\"{}\"}} {n}", t.as_str());
        }
        header(
            &mut out,
            "opamp_gitops_agents_offline",
            "gauge",
            "Agents known but not connected.",
        );
        let _ = writeln!(out, "opamp_gitops_agents_offline {offline}");
        for (name, help, c) in [
            (
                "opamp_gitops_opamp_messages_received_total",
                "OpAMP messages received from agents.",
                &self.messages_received,
            ),
            (
                "opamp_gitops_opamp_decode_errors_total",
                "OpAMP messages that could not be decoded.",
                &self.decode_errors,
            ),
            (
                "opamp_gitops_opamp_oversized_messages_total",
                "OpAMP messages refused for their size.",
                &self.oversized,
            ),
            (
                "opamp_gitops_opamp_overloaded_total",
                "OpAMP requests answered 503 because the server was overloaded.",
                &self.overloaded,
            ),
        ] {
            header(&mut out, name, "counter", help);
            for t in TRANSPORTS {
                let _ = writeln!(out, "{name}{{transport=\"{}\"}} {}", t.as_str(), c.get(t));
            }
        }
        header(
            &mut out,
            "opamp_gitops_opamp_uid_clashes_total",
            "counter",
            "Second agents found reporting under an instance uid in use, each offered a new uid.",
        );
        let _ = writeln!(out, "opamp_gitops_opamp_uid_clashes_total {}", fleet.uid_clashes);
        let opened = self.websocket_opened.load(Ordering::Relaxed);
        let closed = self.websocket_closed.load(Ordering::Relaxed);
        header(
            &mut out,
            "opamp_gitops_opamp_websocket_connections",
            "gauge",
            "Open OpAMP WebSocket connections.",
        );
        let _ = writeln!(
            out,
            "opamp_gitops_opamp_websocket_connections {}",
            opened.saturating_sub(closed)
        );
        header(
            &mut out,
            "opamp_gitops_fleet_snapshot_version",
            "gauge",
            "Version of the newest inventory snapshot.",
        );
        let _ = writeln!(out, "opamp_gitops_fleet_snapshot_version {}", fleet.version);
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use super::*;
    use crate::fleet::AgentRecord;
    use crate::model::InstanceUid;

    #[test]
    fn renders_counters_and_fleet_gauges() {
        let m = Metrics::default();
        m.messages_received.inc(Transport::Http);
        m.messages_received.inc(Transport::Http);
        m.decode_errors.inc(Transport::WebSocket);
        let mut snap = FleetSnapshot {
            version: 7,
            ..Default::default()
        };
        for (i, (connected, t)) in [
            (true, Transport::WebSocket),
            (true, Transport::Http),
            (false, Transport::Http),
        ]
        .into_iter()
        .enumerate()
        {
            let uid = InstanceUid::Uuid([i as u8; 16]);
            let mut r = AgentRecord::new(uid.clone(), t, SystemTime::UNIX_EPOCH);
            r.connected = connected;
            snap.agents.insert(uid, Arc::new(r));
        }
        let text = m.render(&snap);
        for line in [
            "opamp_gitops_agents_connected{transport=\"websocket\"} 1",
            "opamp_gitops_agents_connected{transport=\"http\"} 1",
            "opamp_gitops_agents_offline 1",
            "opamp_gitops_opamp_messages_received_total{transport=\"http\"} 2",
            "opamp_gitops_opamp_decode_errors_total{transport=\"websocket\"} 1",
            "opamp_gitops_fleet_snapshot_version 7",
            "# TYPE opamp_gitops_opamp_messages_received_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
