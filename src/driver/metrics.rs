//! The driver's counters and the gauges read from its newest status, in the
//! Prometheus text format. Group names may be labels; agent ids never are.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::DriverStatus;
use crate::fleet::PushOutcome;
use crate::model::AgentState;
use crate::reconcile::{Phase, PushReason};

const REASONS: [(PushReason, &str); 4] = [
    (PushReason::Wave, "wave"),
    (PushReason::Rollback, "rollback"),
    (PushReason::Revert, "revert"),
    (PushReason::Sync, "sync"),
];
const ENDINGS: [&str; 3] = ["complete", "halted", "superseded"];
/// Upper bounds, in seconds, of the commit-to-complete histogram.
const BUCKETS: [u64; 8] = [1, 5, 15, 60, 300, 900, 3600, 14400];

#[derive(Debug, Default)]
pub struct DriverMetrics {
    /// Plans made (each a full pass over the fleet).
    plans: AtomicU64,
    /// Pushes handed to an agent's connection, by reason.
    pushes: [AtomicU64; 4],
    /// Pushes that found the agent gone or unable to take a config.
    pushes_dropped: AtomicU64,
    agent_failures: AtomicU64,
    rollouts_ended: [AtomicU64; 3],
    commit_to_complete: [AtomicU64; BUCKETS.len()],
    commit_to_complete_count: AtomicU64,
    commit_to_complete_millis: AtomicU64,
}

impl DriverMetrics {
    pub fn pushed(&self, reason: PushReason, outcome: PushOutcome) {
        match outcome {
            PushOutcome::Sent | PushOutcome::Queued => {
                let i = REASONS
                    .iter()
                    .position(|(r, _)| *r == reason)
                    .expect("every reason is listed");
                self.pushes[i].fetch_add(1, Ordering::Relaxed);
            }
            PushOutcome::NotConnected | PushOutcome::NotAccepted => {
                self.pushes_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn planned(&self) {
        self.plans.fetch_add(1, Ordering::Relaxed);
    }

    pub fn agent_failed(&self) {
        self.agent_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rollout_ended(&self, how: &str) {
        if let Some(i) = ENDINGS.iter().position(|e| *e == how) {
            self.rollouts_ended[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn observe_commit_to_complete(&self, d: Duration) {
        for (i, le) in BUCKETS.iter().enumerate() {
            if d.as_secs_f64() <= *le as f64 {
                self.commit_to_complete[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.commit_to_complete_count.fetch_add(1, Ordering::Relaxed);
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.commit_to_complete_millis.fetch_add(ms, Ordering::Relaxed);
    }

    pub fn write_prometheus(&self, status: &DriverStatus, out: &mut String) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP opamp_gitops_agents_by_state Managed and unmanaged agents by state."
        );
        let _ = writeln!(out, "# TYPE opamp_gitops_agents_by_state gauge");
        for state in ALL_STATES {
            let n = status.agents_by_state.get(&state).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "opamp_gitops_agents_by_state{{state=\"{}\"}} {n}",
                state_name(state)
            );
        }
        let mut phases: BTreeMap<&str, u64> = BTreeMap::new();
        for g in status.groups.values() {
            *phases.entry(g.phase.as_str()).or_default() += 1;
        }
        let _ = writeln!(
            out,
            "# HELP opamp_gitops_groups_by_phase Groups by the phase of their current or last rollout."
        );
        let _ = writeln!(out, "# TYPE opamp_gitops_groups_by_phase gauge");
        for phase in [
            Phase::Progressing,
            Phase::Paused,
            Phase::Complete,
            Phase::Halted,
            Phase::Superseded,
            Phase::Unchanged,
        ] {
            let n = phases.get(phase.as_str()).copied().unwrap_or(0);
            let _ = writeln!(out, "opamp_gitops_groups_by_phase{{phase=\"{}\"}} {n}", phase.as_str());
        }
        let _ = writeln!(
            out,
            "# HELP opamp_gitops_pushes_total Configs handed to agents, by reason."
        );
        let _ = writeln!(out, "# TYPE opamp_gitops_pushes_total counter");
        for (i, (_, name)) in REASONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "opamp_gitops_pushes_total{{reason=\"{name}\"}} {}",
                get(&self.pushes[i])
            );
        }
        let _ = writeln!(
            out,
            "# HELP opamp_gitops_plans_total Rollout plans made (on changes and on each tick)."
        );
        let _ = writeln!(out, "# TYPE opamp_gitops_plans_total counter");
        let _ = writeln!(out, "opamp_gitops_plans_total {}", get(&self.plans));
        let _ = writeln!(
            out,
            "# HELP opamp_gitops_pushes_dropped_total Pushes to agents that were gone or refuse remote config."
        );
        let _ = writeln!(out, "# TYPE opamp_gitops_pushes_dropped_total counter");
        let _ = writeln!(out, "opamp_gitops_pushes_dropped_total {}", get(&self.pushes_dropped));
        let _ = writeln!(
            out,
            "# HELP opamp_gitops_agent_failures_total Agents that failed a rollout."
        );
        let _ = writeln!(out, "# TYPE opamp_gitops_agent_failures_total counter");
        let _ = writeln!(out, "opamp_gitops_agent_failures_total {}", get(&self.agent_failures));
        let _ = writeln!(
            out,
            "# HELP opamp_gitops_rollouts_ended_total Rollouts that ended, by how."
        );
        let _ = writeln!(out, "# TYPE opamp_gitops_rollouts_ended_total counter");
        for (i, how) in ENDINGS.iter().enumerate() {
            let _ = writeln!(
                out,
                "opamp_gitops_rollouts_ended_total{{outcome=\"{how}\"}} {}",
                get(&self.rollouts_ended[i])
            );
        }
        let name = "opamp_gitops_commit_to_complete_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from a commit first seen to its rollout complete."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {}", get(&self.commit_to_complete[i]));
        }
        let count = get(&self.commit_to_complete_count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            get(&self.commit_to_complete_millis) as f64 / 1000.0
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

const ALL_STATES: [AgentState; 8] = [
    AgentState::InSync,
    AgentState::Pending,
    AgentState::Applying,
    AgentState::Failed,
    AgentState::Drifted,
    AgentState::Unmanaged,
    AgentState::Unsupported,
    AgentState::Offline,
];

fn state_name(s: AgentState) -> &'static str {
    match s {
        AgentState::InSync => "in_sync",
        AgentState::Pending => "pending",
        AgentState::Applying => "applying",
        AgentState::Failed => "failed",
        AgentState::Drifted => "drifted",
        AgentState::Unmanaged => "unmanaged",
        AgentState::Unsupported => "unsupported",
        AgentState::Offline => "offline",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauges() {
        let m = DriverMetrics::default();
        m.pushed(PushReason::Wave, PushOutcome::Sent);
        m.pushed(PushReason::Wave, PushOutcome::Queued);
        m.pushed(PushReason::Sync, PushOutcome::NotConnected);
        m.rollout_ended("halted");
        m.planned();
        m.observe_commit_to_complete(Duration::from_secs(10));
        let status = DriverStatus {
            agents_by_state: BTreeMap::from([(AgentState::InSync, 3)]),
            ..Default::default()
        };
        let mut out = String::new();
        m.write_prometheus(&status, &mut out);
        assert!(out.contains("opamp_gitops_pushes_total{reason=\"wave\"} 2\n"), "{out}");
        assert!(out.contains("opamp_gitops_pushes_dropped_total 1\n"));
        assert!(out.contains("opamp_gitops_plans_total 1\n"));
        assert!(out.contains("opamp_gitops_rollouts_ended_total{outcome=\"halted\"} 1\n"));
        assert!(out.contains("opamp_gitops_agents_by_state{state=\"in_sync\"} 3\n"));
        assert!(out.contains("opamp_gitops_commit_to_complete_seconds_bucket{le=\"5\"} 0\n"));
        assert!(out.contains("opamp_gitops_commit_to_complete_seconds_bucket{le=\"15\"} 1\n"));
        assert!(out.contains("opamp_gitops_commit_to_complete_seconds_sum 10\n"));
    }
}
