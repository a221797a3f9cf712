//! Per-group gauges an alert can use, read from the driver's newest status
//! when `/metrics` is scraped: a rollout's phase, the agents that failed it
//! (they stay counted after a rollback, until the next rollout starts), when
//! its current wave opened, and whether that wave has waited too long.
//! Groups are few and named by the repository, so they may be labels.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use super::Registry;
use super::rollout::PHASES;
use crate::model::GroupName;
use crate::reconcile::Phase;

/// One group's gauges.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupGauges {
    pub group: GroupName,
    pub phase: Phase,
    /// Agents that failed the current (or last) rollout.
    pub failed: u32,
    /// Waves opened of the current (or last) rollout, and how many it has.
    pub wave: u32,
    pub waves: u32,
    /// When the current wave opened, in seconds since the Unix epoch, while
    /// the rollout is in progress.
    pub wave_opened: Option<f64>,
    /// The current wave has waited for its agents for longer than the
    /// stall limit.
    pub stalled: bool,
}

/// Registers the group gauges; `groups` is called on every scrape.
pub fn register(registry: &mut Registry, groups: impl Fn() -> Vec<GroupGauges> + Send + Sync + 'static) {
    registry.add_collector(Groups(groups));
}

struct Groups<F>(F);

/// A per-group gauge's value.
type Count = fn(&GroupGauges) -> i64;

impl<F> fmt::Debug for Groups<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GroupGauges")
    }
}

impl<F: Fn() -> Vec<GroupGauges> + Send + Sync + 'static> Collector for Groups<F> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let groups = (self.0)();
        // Help texts here carry their period: only registered metrics get one added.
        let mut phase = encoder.encode_descriptor(
            "group_rollout_phase",
            "1 for the phase of the group's current or last rollout, 0 for the others.",
            None,
            MetricType::Gauge,
        )?;
        for g in &groups {
            for p in PHASES {
                let labels = [("group", g.group.as_str()), ("phase", p.as_str())];
                ConstGauge::new(i64::from(g.phase == p)).encode(phase.encode_family(&labels)?)?;
            }
        }
        let counts: [(&str, &str, Count); 4] = [
            (
                "group_agents_failed",
                "Agents that failed the group's current or last rollout (rolled back or not).",
                |g| i64::from(g.failed),
            ),
            (
                "group_rollout_wave",
                "Waves opened of the group's current or last rollout.",
                |g| i64::from(g.wave),
            ),
            (
                "group_rollout_waves",
                "Waves of the group's current or last rollout.",
                |g| i64::from(g.waves),
            ),
            (
                "group_rollout_stalled",
                "1 while the current wave has waited for its agents longer than serve --stall-after.",
                |g| i64::from(g.stalled),
            ),
        ];
        for (name, help, value) in counts {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for g in &groups {
                ConstGauge::new(value(g)).encode(metric.encode_family(&[("group", g.group.as_str())])?)?;
            }
        }
        let mut opened = encoder.encode_descriptor(
            "group_wave_opened_timestamp_seconds",
            "When the current wave of the group's rollout in progress opened.",
            None,
            MetricType::Gauge,
        )?;
        for g in &groups {
            if let Some(t) = g.wave_opened {
                ConstGauge::new(t).encode(opened.encode_family(&[("group", g.group.as_str())])?)?;
            }
        }
        Ok(())
    }
}
