//! The inventory's gauges, counted from the newest fleet snapshot when
//! `/metrics` is scraped: one pass over the inventory per scrape, nothing per
//! message.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::Registry;
use crate::model::Transport;

/// What the inventory gauges show.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetCounts {
    pub connected_websocket: u64,
    pub connected_http: u64,
    /// Agents known but not connected.
    pub offline: u64,
    /// Second agents found reporting under a uid in use, so far.
    pub uid_clashes: u64,
    /// The snapshot's version.
    pub version: u64,
}

impl FleetCounts {
    /// Counts one agent.
    pub fn add(&mut self, connected: bool, transport: Transport) {
        *self.count(connected, transport) += 1;
    }

    /// Takes back an agent [`add`](Self::add) counted.
    pub fn remove(&mut self, connected: bool, transport: Transport) {
        let count = self.count(connected, transport);
        debug_assert!(*count > 0, "an agent taken back that was not counted");
        *count = count.saturating_sub(1);
    }

    fn count(&mut self, connected: bool, transport: Transport) -> &mut u64 {
        match (connected, transport) {
            (true, Transport::WebSocket) => &mut self.connected_websocket,
            (true, Transport::Http) => &mut self.connected_http,
            (false, _) => &mut self.offline,
        }
    }
}

/// Registers the inventory gauges; `counts` is called on every scrape.
pub fn register(registry: &mut Registry, counts: impl Fn() -> FleetCounts + Send + Sync + 'static) {
    registry.add_collector(FleetGauges(counts));
}

struct FleetGauges<F>(F);

impl<F> fmt::Debug for FleetGauges<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FleetGauges")
    }
}

impl<F: Fn() -> FleetCounts + Send + Sync + 'static> Collector for FleetGauges<F> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let c = (self.0)();
        // Help texts here carry their period: only registered metrics get one added.
        let mut connected = encoder.encode_descriptor(
            "agents_connected",
            "Agents connected, by transport.",
            None,
            MetricType::Gauge,
        )?;
        for (t, n) in [
            (Transport::WebSocket, c.connected_websocket),
            (Transport::Http, c.connected_http),
        ] {
            ConstGauge::new(n).encode(connected.encode_family(&[("transport", t.as_str())])?)?;
        }
        for (name, help, metric_type, n) in [
            (
                "agents_offline",
                "Agents known but not connected.",
                MetricType::Gauge,
                c.offline,
            ),
            (
                "opamp_uid_clashes",
                "Second agents found reporting under an instance uid in use, each offered a new uid.",
                MetricType::Counter,
                c.uid_clashes,
            ),
            (
                "fleet_snapshot_version",
                "Version of the newest inventory snapshot.",
                MetricType::Gauge,
                c.version,
            ),
        ] {
            let metric = encoder.encode_descriptor(name, help, None, metric_type)?;
            if metric_type == MetricType::Counter {
                ConstCounter::new(n).encode(metric)?;
            } else {
                ConstGauge::new(n).encode(metric)?;
            }
        }
        Ok(())
    }
}
