//! A replica's gauges (`serve --store`), read when `/metrics` is scraped.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use super::Registry;

/// What a replica knows of the cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterGauges {
    /// This replica holds the leader lease.
    pub leads: bool,
    /// The lease's epoch, as last read (0 while nobody holds it).
    pub epoch: i64,
    /// Replicas whose own lease runs.
    pub replicas_alive: usize,
}

/// Registers the gauges; `read` is called on every scrape.
pub fn register(registry: &mut Registry, read: impl Fn() -> ClusterGauges + Send + Sync + 'static) {
    registry.add_collector(Gauges(read));
}

struct Gauges<F>(F);

impl<F> fmt::Debug for Gauges<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterGauges")
    }
}

impl<F: Fn() -> ClusterGauges + Send + Sync + 'static> Collector for Gauges<F> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let g = (self.0)();
        // Help texts here carry their period: only registered metrics get one added.
        for (name, help, value) in [
            (
                "cluster_leader",
                "1 while this replica holds the leader lease, else 0.",
                i64::from(g.leads),
            ),
            ("cluster_epoch", "The leader lease's epoch, as last read.", g.epoch),
            (
                "cluster_replicas_alive",
                "Replicas whose own lease runs.",
                i64::try_from(g.replicas_alive).unwrap_or(i64::MAX),
            ),
        ] {
            ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        Ok(())
    }
}
