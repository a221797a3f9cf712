//! Telemetry: one event type per thing that happens, whose `emit` logs it and
//! counts it in one place, and the one metrics registry that `/metrics`
//! renders in the Prometheus text format.
//!
//! A low layer: events carry plain data (the model's and the planner's types),
//! never a task's handles, so every task can use it and it uses none of them.
//! Agent ids go into logs, never into labels. Log lines keep the target of
//! the component they tell about (`opamp_gitops::driver`...), so `RUST_LOG`
//! filters by component.

pub mod cluster;
pub mod connections;
pub mod fleet;
pub mod git;
pub mod groups;
pub mod notes;
pub mod notify;
pub mod opamp;
pub mod rollout;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Metric;

/// Something that happened, told once: [`emit`](InternalEvent::emit) logs it
/// and bumps its counters.
pub trait InternalEvent {
    /// The metrics it counts in: its component's part of the registry.
    type Metrics;

    fn emit(self, metrics: &Self::Metrics);
}

/// Every metric name starts with this and `_`.
const PREFIX: &str = "opamp_gitops";

/// The `Content-Type` of what [`Registry::encode`] writes: the Prometheus
/// text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Every metric of one controller. Each component registers its metrics as
/// it is wired up; `/metrics` renders them all.
#[derive(Debug)]
pub struct Registry(prometheus_client::registry::Registry);

impl Default for Registry {
    fn default() -> Self {
        Registry(prometheus_client::registry::Registry::with_prefix(PREFIX))
    }
}

impl Registry {
    /// The Prometheus text exposition of every registered metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail, and no metric here fails to encode.
        let _ = prometheus_text::encode(&mut out, &self.0);
        out
    }

    /// Adds `metric` as `opamp_gitops_<name>` (a counter's samples get
    /// `_total`). `help` is a sentence with its period.
    fn add(&mut self, name: &str, help: &str, metric: impl Metric) {
        // The encoder ends the help text with a period itself.
        let help = help.strip_suffix('.').unwrap_or(help);
        self.0.register(name, help, metric);
    }

    /// Adds metrics that are read when scraped.
    fn add_collector(&mut self, collector: impl Collector) {
        self.0.register_collector(Box::new(collector));
    }
}

/// One metric per value of one label. The values are fixed when it is made
/// and rendered in that order, and bumping one takes no lock: a look among a
/// handful of values and one atomic add (the crate's `Family` makes label sets
/// on first use, behind a lock, and renders them in hash order; ours are few
/// and known up front).
#[derive(Debug, Clone)]
struct Labeled<M> {
    label: &'static str,
    cells: Arc<[(Cow<'static, str>, M)]>,
}

impl<M: Default> Labeled<M> {
    fn new<V: Into<Cow<'static, str>>>(label: &'static str, values: impl IntoIterator<Item = V>) -> Self {
        Labeled {
            label,
            cells: values.into_iter().map(|v| (v.into(), M::default())).collect(),
        }
    }
}

impl<M> Labeled<M> {
    /// The metric of `value`; `None` for a value it was not made with.
    fn get(&self, value: &str) -> Option<&M> {
        self.cells.iter().find(|(v, _)| v == value).map(|(_, m)| m)
    }
}

impl Labeled<Counter> {
    fn inc(&self, value: &str) {
        if let Some(c) = self.get(value) {
            c.inc();
        }
    }
}

impl Labeled<Gauge> {
    fn set(&self, value: &str, n: u64) {
        if let Some(g) = self.get(value) {
            g.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

impl<M: EncodeMetric + TypedMetric> EncodeMetric for Labeled<M> {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        for (value, metric) in self.cells.iter() {
            metric.encode(encoder.encode_family(&[(self.label, value.as_ref())])?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{AgentState, PushOutcome, Transport};
    use crate::reconcile::{Phase, PushReason};

    /// Every metric, as registered by every component of a controller with a
    /// repository, with some counts.
    fn full() -> Registry {
        let mut registry = Registry::default();
        let opamp = opamp::OpampMetrics::default();
        opamp.register(&mut registry);
        fleet::register(&mut registry, || fleet::FleetCounts {
            connected_websocket: 3,
            connected_http: 2,
            offline: 1,
            uid_clashes: 4,
            version: 7,
        });
        let git = git::GitMetrics::default();
        git.register(&mut registry);
        let rollout = rollout::RolloutMetrics::default();
        rollout.register(&mut registry);
        let notes = notes::NotesMetrics::default();
        notes.register(&mut registry);
        let notify = notify::NotifyMetrics::new(&["0".to_string(), "forge".to_string()]);
        notify.register(&mut registry);
        git::register_source(&mut registry, || git::SourceGauges {
            last_success: Some(1_800_000_000.5),
            head_invalid: true,
        });
        groups::register(&mut registry, || {
            vec![groups::GroupGauges {
                group: crate::model::GroupName::new("edge"),
                phase: Phase::Halted,
                failed: 3,
                wave: 1,
                waves: 4,
                wave_opened: Some(1_800_000_100.25),
                stalled: true,
            }]
        });

        opamp::MessageReceived {
            transport: Transport::Http,
        }
        .emit(&opamp);
        opamp::WebSocketOpened.emit(&opamp);
        opamp::HttpOverloaded.emit(&opamp);
        git::FetchStarted.emit(&git);
        git::CommitLoaded {
            commit: &crate::model::CommitId::new("ab".repeat(20)),
            groups: 2,
        }
        .emit(&git);
        let (uid, group) = (
            crate::model::InstanceUid::Uuid([1; 16]),
            crate::model::GroupName::new("g"),
        );
        let hash = crate::model::ConfigHash([2; 32]);
        for (reason, outcome) in [
            (PushReason::Wave, PushOutcome::Sent),
            (PushReason::Wave, PushOutcome::Queued),
            (PushReason::Sync, PushOutcome::NotConnected),
        ] {
            rollout::ConfigPushed {
                agent: &uid,
                group: &group,
                hash: &hash,
                reason,
                outcome,
            }
            .emit(&rollout);
        }
        rollout::Planned {
            agents_by_state: &[(AgentState::InSync, 3)].into(),
            phases: [Phase::Complete, Phase::Complete, Phase::Halted].into_iter(),
            took: std::time::Duration::from_millis(7),
            full: false,
            agents: 4,
        }
        .emit(&rollout);
        rollout::RolloutComplete {
            group: &group,
            commit: None,
            hash: &hash,
            took: Some(Duration::from_secs(10)),
            author: None,
        }
        .emit(&rollout);
        notes::NotesWritten { notes: 2 }.emit(&notes);
        notify::Delivered {
            receiver: "forge",
            event: "rollout_halted",
            id: "0",
        }
        .emit(&notify);
        notify::DeliveryFailed {
            receiver: "0",
            host: "hooks.example.com",
            event: "rollout_halted",
            error: &"connection refused",
            retry_in: Duration::from_secs(1),
        }
        .emit(&notify);
        notify::NoticeDropped {
            receiver: "0",
            event: "rollout_started",
            queued: 1000,
        }
        .emit(&notify);
        registry
    }

    #[test]
    fn every_metric_renders_with_its_name_type_and_help() {
        // The time notes were last written is now: shown as NOW.
        let text: String = full()
            .encode()
            .lines()
            .map(
                |l| match l.strip_prefix("opamp_gitops_notes_last_success_timestamp_seconds ") {
                    Some(_) => "opamp_gitops_notes_last_success_timestamp_seconds NOW\n".to_string(),
                    None => format!("{l}\n"),
                },
            )
            .collect();
        let expected = [
            "# HELP opamp_gitops_opamp_messages_received_total OpAMP messages received from agents.",
            "# TYPE opamp_gitops_opamp_messages_received_total counter",
            "opamp_gitops_opamp_messages_received_total{transport=\"websocket\"} 0",
            "opamp_gitops_opamp_messages_received_total{transport=\"http\"} 1",
            "# HELP opamp_gitops_opamp_decode_errors_total OpAMP messages that could not be decoded.",
            "# TYPE opamp_gitops_opamp_decode_errors_total counter",
            "opamp_gitops_opamp_decode_errors_total{transport=\"websocket\"} 0",
            "opamp_gitops_opamp_decode_errors_total{transport=\"http\"} 0",
            "# HELP opamp_gitops_opamp_oversized_messages_total OpAMP messages refused for their size.",
            "# TYPE opamp_gitops_opamp_oversized_messages_total counter",
            "opamp_gitops_opamp_oversized_messages_total{transport=\"websocket\"} 0",
            "opamp_gitops_opamp_oversized_messages_total{transport=\"http\"} 0",
            "# HELP opamp_gitops_opamp_overloaded_total OpAMP requests answered 503 because the server was overloaded.",
            "# TYPE opamp_gitops_opamp_overloaded_total counter",
            "opamp_gitops_opamp_overloaded_total{transport=\"websocket\"} 0",
            "opamp_gitops_opamp_overloaded_total{transport=\"http\"} 1",
            "# HELP opamp_gitops_opamp_refused_total OpAMP requests and reports refused for their credentials, by reason.",
            "# TYPE opamp_gitops_opamp_refused_total counter",
            "opamp_gitops_opamp_refused_total{reason=\"missing_token\"} 0",
            "opamp_gitops_opamp_refused_total{reason=\"invalid_token\"} 0",
            "opamp_gitops_opamp_refused_total{reason=\"rate_limited\"} 0",
            "opamp_gitops_opamp_refused_total{reason=\"impersonation\"} 0",
            "# HELP opamp_gitops_opamp_websocket_connections Open OpAMP WebSocket connections.",
            "# TYPE opamp_gitops_opamp_websocket_connections gauge",
            "opamp_gitops_opamp_websocket_connections 1",
            "# HELP opamp_gitops_git_fetches_total Fetches of the config repository attempted.",
            "# TYPE opamp_gitops_git_fetches_total counter",
            "opamp_gitops_git_fetches_total 1",
            "# HELP opamp_gitops_git_fetch_failures_total Fetches of the config repository that failed.",
            "# TYPE opamp_gitops_git_fetch_failures_total counter",
            "opamp_gitops_git_fetch_failures_total 0",
            "# HELP opamp_gitops_git_commits_loaded_total Commits that passed validation and were loaded.",
            "# TYPE opamp_gitops_git_commits_loaded_total counter",
            "opamp_gitops_git_commits_loaded_total 1",
            "# HELP opamp_gitops_git_commits_invalid_total Commits rejected by validation.",
            "# TYPE opamp_gitops_git_commits_invalid_total counter",
            "opamp_gitops_git_commits_invalid_total 0",
            "# HELP opamp_gitops_agents_by_state Managed and unmanaged agents by state.",
            "# TYPE opamp_gitops_agents_by_state gauge",
            "opamp_gitops_agents_by_state{state=\"in_sync\"} 3",
            "opamp_gitops_agents_by_state{state=\"pending\"} 0",
            "opamp_gitops_agents_by_state{state=\"applying\"} 0",
            "opamp_gitops_agents_by_state{state=\"failed\"} 0",
            "opamp_gitops_agents_by_state{state=\"drifted\"} 0",
            "opamp_gitops_agents_by_state{state=\"unmanaged\"} 0",
            "opamp_gitops_agents_by_state{state=\"unsupported\"} 0",
            "opamp_gitops_agents_by_state{state=\"offline\"} 0",
            "# HELP opamp_gitops_groups_by_phase Groups by the phase of their current or last rollout.",
            "# TYPE opamp_gitops_groups_by_phase gauge",
            "opamp_gitops_groups_by_phase{phase=\"progressing\"} 0",
            "opamp_gitops_groups_by_phase{phase=\"paused\"} 0",
            "opamp_gitops_groups_by_phase{phase=\"complete\"} 2",
            "opamp_gitops_groups_by_phase{phase=\"halted\"} 1",
            "opamp_gitops_groups_by_phase{phase=\"superseded\"} 0",
            "opamp_gitops_groups_by_phase{phase=\"unchanged\"} 0",
            "# HELP opamp_gitops_pushes_total Configs handed to agents, by reason.",
            "# TYPE opamp_gitops_pushes_total counter",
            "opamp_gitops_pushes_total{reason=\"wave\"} 2",
            "opamp_gitops_pushes_total{reason=\"rollback\"} 0",
            "opamp_gitops_pushes_total{reason=\"revert\"} 0",
            "opamp_gitops_pushes_total{reason=\"sync\"} 0",
            "# HELP opamp_gitops_plans_total Rollout plans made (on changes and deadlines).",
            "# TYPE opamp_gitops_plans_total counter",
            "opamp_gitops_plans_total 1",
            "# HELP opamp_gitops_plans_full_total Plans over the whole fleet (a new commit, a deadline, agents that came, left or changed group, the reconcile interval); the others decide only the agents that changed.",
            "# TYPE opamp_gitops_plans_full_total counter",
            "opamp_gitops_plans_full_total 0",
            "# HELP opamp_gitops_plan_agents_total Agents decided by plans, summed over the plans.",
            "# TYPE opamp_gitops_plan_agents_total counter",
            "opamp_gitops_plan_agents_total 4",
            "# HELP opamp_gitops_plan_seconds How long each plan took, from reading the fleet to publishing the result.",
            "# TYPE opamp_gitops_plan_seconds histogram",
            "opamp_gitops_plan_seconds_bucket{le=\"0.001\"} 0",
            "opamp_gitops_plan_seconds_bucket{le=\"0.005\"} 0",
            "opamp_gitops_plan_seconds_bucket{le=\"0.01\"} 1",
            "opamp_gitops_plan_seconds_bucket{le=\"0.025\"} 1",
            "opamp_gitops_plan_seconds_bucket{le=\"0.05\"} 1",
            "opamp_gitops_plan_seconds_bucket{le=\"0.1\"} 1",
            "opamp_gitops_plan_seconds_bucket{le=\"0.5\"} 1",
            "opamp_gitops_plan_seconds_bucket{le=\"+Inf\"} 1",
            "opamp_gitops_plan_seconds_sum 0.007",
            "opamp_gitops_plan_seconds_count 1",
            "# HELP opamp_gitops_pushes_dropped_total Pushes to agents that were gone or refuse remote config.",
            "# TYPE opamp_gitops_pushes_dropped_total counter",
            "opamp_gitops_pushes_dropped_total 1",
            "# HELP opamp_gitops_agent_failures_total Agents that failed a rollout.",
            "# TYPE opamp_gitops_agent_failures_total counter",
            "opamp_gitops_agent_failures_total 0",
            "# HELP opamp_gitops_rollouts_ended_total Rollouts that ended, by how.",
            "# TYPE opamp_gitops_rollouts_ended_total counter",
            "opamp_gitops_rollouts_ended_total{outcome=\"complete\"} 1",
            "opamp_gitops_rollouts_ended_total{outcome=\"halted\"} 0",
            "opamp_gitops_rollouts_ended_total{outcome=\"superseded\"} 0",
            "# HELP opamp_gitops_commit_to_complete_seconds Time from a commit first seen to its rollout complete.",
            "# TYPE opamp_gitops_commit_to_complete_seconds histogram",
            "opamp_gitops_commit_to_complete_seconds_bucket{le=\"1\"} 0",
            "opamp_gitops_commit_to_complete_seconds_bucket{le=\"5\"} 0",
            "opamp_gitops_commit_to_complete_seconds_bucket{le=\"15\"} 1",
            "opamp_gitops_commit_to_complete_seconds_bucket{le=\"60\"} 1",
            "opamp_gitops_commit_to_complete_seconds_bucket{le=\"300\"} 1",
            "opamp_gitops_commit_to_complete_seconds_bucket{le=\"900\"} 1",
            "opamp_gitops_commit_to_complete_seconds_bucket{le=\"3600\"} 1",
            "opamp_gitops_commit_to_complete_seconds_bucket{le=\"14400\"} 1",
            "opamp_gitops_commit_to_complete_seconds_bucket{le=\"+Inf\"} 1",
            "opamp_gitops_commit_to_complete_seconds_sum 10.0",
            "opamp_gitops_commit_to_complete_seconds_count 1",
            "# HELP opamp_gitops_notes_written_total Git notes written (and pushed, for a remote).",
            "# TYPE opamp_gitops_notes_written_total counter",
            "opamp_gitops_notes_written_total 2",
            "# HELP opamp_gitops_notes_write_failures_total Failed attempts to write or push notes (retried).",
            "# TYPE opamp_gitops_notes_write_failures_total counter",
            "opamp_gitops_notes_write_failures_total 0",
            "# HELP opamp_gitops_notes_last_success_timestamp_seconds When notes were last written (and pushed, for a remote) successfully.",
            "# TYPE opamp_gitops_notes_last_success_timestamp_seconds gauge",
            "opamp_gitops_notes_last_success_timestamp_seconds NOW",
            "# HELP opamp_gitops_notes_unreadable_total Notes on the notes ref that are not opamp-gitops notes, found when reading them back.",
            "# TYPE opamp_gitops_notes_unreadable_total counter",
            "opamp_gitops_notes_unreadable_total 0",
            "# HELP opamp_gitops_notify_sent_total Notifications and commit statuses delivered, by receiver.",
            "# TYPE opamp_gitops_notify_sent_total counter",
            "opamp_gitops_notify_sent_total{receiver=\"0\"} 0",
            "opamp_gitops_notify_sent_total{receiver=\"forge\"} 1",
            "# HELP opamp_gitops_notify_retries_total Deliveries that failed and will be tried again, by receiver.",
            "# TYPE opamp_gitops_notify_retries_total counter",
            "opamp_gitops_notify_retries_total{receiver=\"0\"} 1",
            "opamp_gitops_notify_retries_total{receiver=\"forge\"} 0",
            "# HELP opamp_gitops_notify_refused_total Notifications and commit statuses the receiver refused (a 4xx answer); not retried.",
            "# TYPE opamp_gitops_notify_refused_total counter",
            "opamp_gitops_notify_refused_total{receiver=\"0\"} 0",
            "opamp_gitops_notify_refused_total{receiver=\"forge\"} 0",
            "# HELP opamp_gitops_notify_dropped_total Notifications and commit statuses dropped, oldest first, from an outbox over its bound.",
            "# TYPE opamp_gitops_notify_dropped_total counter",
            "opamp_gitops_notify_dropped_total{receiver=\"0\"} 1",
            "opamp_gitops_notify_dropped_total{receiver=\"forge\"} 0",
            // Read from the fleet when scraped.
            "# HELP opamp_gitops_agents_connected Agents connected, by transport.",
            "# TYPE opamp_gitops_agents_connected gauge",
            "opamp_gitops_agents_connected{transport=\"websocket\"} 3",
            "opamp_gitops_agents_connected{transport=\"http\"} 2",
            "# HELP opamp_gitops_agents_offline Agents known but not connected.",
            "# TYPE opamp_gitops_agents_offline gauge",
            "opamp_gitops_agents_offline 1",
            "# HELP opamp_gitops_opamp_uid_clashes_total Second agents found reporting under an instance uid in use, each offered a new uid.",
            "# TYPE opamp_gitops_opamp_uid_clashes_total counter",
            "opamp_gitops_opamp_uid_clashes_total 4",
            "# HELP opamp_gitops_fleet_snapshot_version Version of the newest inventory snapshot.",
            "# TYPE opamp_gitops_fleet_snapshot_version gauge",
            "opamp_gitops_fleet_snapshot_version 7",
            // Read from the git source and the driver when scraped.
            "# HELP opamp_gitops_git_last_success_timestamp_seconds When a fetch of the config repository last succeeded.",
            "# TYPE opamp_gitops_git_last_success_timestamp_seconds gauge",
            "opamp_gitops_git_last_success_timestamp_seconds 1800000000.5",
            "# HELP opamp_gitops_git_head_invalid 1 while the newest commit of the branch failed validation (the last valid one stays in force).",
            "# TYPE opamp_gitops_git_head_invalid gauge",
            "opamp_gitops_git_head_invalid 1",
            "# HELP opamp_gitops_group_rollout_phase 1 for the phase of the group's current or last rollout, 0 for the others.",
            "# TYPE opamp_gitops_group_rollout_phase gauge",
            "opamp_gitops_group_rollout_phase{group=\"edge\",phase=\"progressing\"} 0",
            "opamp_gitops_group_rollout_phase{group=\"edge\",phase=\"paused\"} 0",
            "opamp_gitops_group_rollout_phase{group=\"edge\",phase=\"complete\"} 0",
            "opamp_gitops_group_rollout_phase{group=\"edge\",phase=\"halted\"} 1",
            "opamp_gitops_group_rollout_phase{group=\"edge\",phase=\"superseded\"} 0",
            "opamp_gitops_group_rollout_phase{group=\"edge\",phase=\"unchanged\"} 0",
            "# HELP opamp_gitops_group_agents_failed Agents that failed the group's current or last rollout (rolled back or not).",
            "# TYPE opamp_gitops_group_agents_failed gauge",
            "opamp_gitops_group_agents_failed{group=\"edge\"} 3",
            "# HELP opamp_gitops_group_rollout_wave Waves opened of the group's current or last rollout.",
            "# TYPE opamp_gitops_group_rollout_wave gauge",
            "opamp_gitops_group_rollout_wave{group=\"edge\"} 1",
            "# HELP opamp_gitops_group_rollout_waves Waves of the group's current or last rollout.",
            "# TYPE opamp_gitops_group_rollout_waves gauge",
            "opamp_gitops_group_rollout_waves{group=\"edge\"} 4",
            "# HELP opamp_gitops_group_rollout_stalled 1 while the current wave has waited for its agents longer than serve --stall-after.",
            "# TYPE opamp_gitops_group_rollout_stalled gauge",
            "opamp_gitops_group_rollout_stalled{group=\"edge\"} 1",
            "# HELP opamp_gitops_group_wave_opened_timestamp_seconds When the current wave of the group's rollout in progress opened.",
            "# TYPE opamp_gitops_group_wave_opened_timestamp_seconds gauge",
            "opamp_gitops_group_wave_opened_timestamp_seconds{group=\"edge\"} 1800000100.25",
        ];
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, expected, "\n{text}");
    }
}
