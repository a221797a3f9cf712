//! What happens to the config repository: fetches, their failures, commits
//! loaded or rejected.

use std::fmt::Display;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use tracing::{info, warn};

use super::{InternalEvent, Registry};
use crate::model::CommitId;

const TARGET: &str = "opamp_gitops::gitsrc::task";

/// The git source's counters.
#[derive(Debug, Clone, Default)]
pub struct GitMetrics {
    fetches: Counter,
    fetch_failures: Counter,
    commits_loaded: Counter,
    commits_invalid: Counter,
}

/// The git source's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GitCounts {
    /// Fetches (or reads of a local repository) attempted.
    pub fetches: u64,
    pub fetch_failures: u64,
    /// Commits that passed validation and were published.
    pub commits_loaded: u64,
    /// Commits rejected by validation.
    pub commits_invalid: u64,
}

impl GitMetrics {
    pub fn register(&self, registry: &mut Registry) {
        for (name, help, counter) in [
            (
                "git_fetches",
                "Fetches of the config repository attempted.",
                &self.fetches,
            ),
            (
                "git_fetch_failures",
                "Fetches of the config repository that failed.",
                &self.fetch_failures,
            ),
            (
                "git_commits_loaded",
                "Commits that passed validation and were loaded.",
                &self.commits_loaded,
            ),
            (
                "git_commits_invalid",
                "Commits rejected by validation.",
                &self.commits_invalid,
            ),
        ] {
            registry.add(name, help, counter.clone());
        }
    }

    pub fn counts(&self) -> GitCounts {
        GitCounts {
            fetches: self.fetches.get(),
            fetch_failures: self.fetch_failures.get(),
            commits_loaded: self.commits_loaded.get(),
            commits_invalid: self.commits_invalid.get(),
        }
    }
}

/// A fetch (or a read of a local repository) begins.
pub struct FetchStarted;

impl InternalEvent for FetchStarted {
    type Metrics = GitMetrics;

    fn emit(self, m: &GitMetrics) {
        m.fetches.inc();
    }
}

/// A fetch failed; the last state stays in force.
pub struct FetchFailed<'a> {
    pub error: &'a dyn Display,
    /// Failures in a row, this one included.
    pub failures: u32,
}

impl InternalEvent for FetchFailed<'_> {
    type Metrics = GitMetrics;

    fn emit(self, m: &GitMetrics) {
        m.fetch_failures.inc();
        warn!(target: TARGET, error = %self.error, failures = self.failures, "fetch failed; keeping the last state");
    }
}

/// A fetch succeeded after failures.
pub struct FetchRecovered {
    pub failures: u32,
}

impl InternalEvent for FetchRecovered {
    type Metrics = GitMetrics;

    fn emit(self, _: &GitMetrics) {
        info!(target: TARGET, failures = self.failures, "fetch recovered");
    }
}

/// The fetched tip could not be read from the repository (counted as a
/// failed fetch).
pub struct CommitUnreadable<'a> {
    pub commit: &'a CommitId,
    pub error: &'a dyn Display,
}

impl InternalEvent for CommitUnreadable<'_> {
    type Metrics = GitMetrics;

    fn emit(self, m: &GitMetrics) {
        m.fetch_failures.inc();
        warn!(target: TARGET, commit = %self.commit, error = %self.error, "reading commit failed");
    }
}

/// A new commit passed validation and is published.
pub struct CommitLoaded<'a> {
    pub commit: &'a CommitId,
    pub groups: usize,
}

impl InternalEvent for CommitLoaded<'_> {
    type Metrics = GitMetrics;

    fn emit(self, m: &GitMetrics) {
        m.commits_loaded.inc();
        info!(target: TARGET, commit = %self.commit, groups = self.groups, "commit loaded");
    }
}

/// A new commit failed validation; the last state stays in force.
pub struct CommitInvalid<'a> {
    pub commit: &'a CommitId,
    pub errors: usize,
}

impl InternalEvent for CommitInvalid<'_> {
    type Metrics = GitMetrics;

    fn emit(self, m: &GitMetrics) {
        m.commits_invalid.inc();
        warn!(target: TARGET, commit = %self.commit, errors = self.errors, "commit is invalid; keeping the last state");
    }
}

/// The git source's state, as gauges an alert can use.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SourceGauges {
    /// When a fetch last succeeded, in seconds since the Unix epoch.
    pub last_success: Option<f64>,
    /// The newest commit of the branch failed validation.
    pub head_invalid: bool,
}

/// Registers the source gauges; `gauges` is called on every scrape.
pub fn register_source(registry: &mut Registry, gauges: impl Fn() -> SourceGauges + Send + Sync + 'static) {
    registry.add_collector(Source(gauges));
}

struct Source<F>(F);

impl<F> std::fmt::Debug for Source<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourceGauges")
    }
}

impl<F: Fn() -> SourceGauges + Send + Sync + 'static> Collector for Source<F> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let g = (self.0)();
        if let Some(t) = g.last_success {
            ConstGauge::new(t).encode(encoder.encode_descriptor(
                "git_last_success_timestamp_seconds",
                "When a fetch of the config repository last succeeded.",
                None,
                MetricType::Gauge,
            )?)?;
        }
        ConstGauge::new(i64::from(g.head_invalid)).encode(encoder.encode_descriptor(
            "git_head_invalid",
            "1 while the newest commit of the branch failed validation (the last valid one stays in force).",
            None,
            MetricType::Gauge,
        )?)
    }
}
