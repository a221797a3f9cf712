//! What happens to the git notes: batches written (and pushed), or failed
//! and retried.

use std::fmt::Display;

use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tracing::{info, warn};

use super::{InternalEvent, Registry};

const TARGET: &str = "opamp_gitops::notes::writer";

/// The notes writer's counters.
#[derive(Debug, Clone, Default)]
pub struct NotesMetrics {
    written: Counter,
    write_failures: Counter,
    unreadable: Counter,
    /// When notes were last written (and pushed), in seconds since the Unix epoch.
    last_success: Gauge<f64, AtomicU64>,
}

impl NotesMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.add(
            "notes_written",
            "Git notes written (and pushed, for a remote).",
            self.written.clone(),
        );
        registry.add(
            "notes_write_failures",
            "Failed attempts to write or push notes (retried).",
            self.write_failures.clone(),
        );
        registry.add(
            "notes_last_success_timestamp_seconds",
            "When notes were last written (and pushed, for a remote) successfully.",
            self.last_success.clone(),
        );
        registry.add(
            "notes_unreadable",
            "Notes on the notes ref that are not opamp-gitops notes, found when reading them back.",
            self.unreadable.clone(),
        );
    }

    /// Notes written so far.
    pub fn written(&self) -> u64 {
        self.written.get()
    }

    /// Failed attempts so far.
    pub fn write_failures(&self) -> u64 {
        self.write_failures.get()
    }
}

/// A batch of notes was written (and pushed, for a remote).
pub struct NotesWritten {
    pub notes: usize,
}

impl InternalEvent for NotesWritten {
    type Metrics = NotesMetrics;

    fn emit(self, m: &NotesMetrics) {
        m.written.inc_by(self.notes as u64);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        m.last_success.set(now.as_secs_f64());
        info!(target: TARGET, notes = self.notes, "notes written");
    }
}

/// Writing or pushing a batch of notes failed; it is retried.
pub struct NotesWriteFailed<'a> {
    pub error: &'a dyn Display,
    pub notes: usize,
}

impl InternalEvent for NotesWriteFailed<'_> {
    type Metrics = NotesMetrics;

    fn emit(self, m: &NotesMetrics) {
        m.write_failures.inc();
        warn!(target: TARGET, error = %self.error, notes = self.notes, "writing notes failed; will retry");
    }
}

/// A note on our notes ref could not be read as an opamp-gitops note: the
/// record has a hole there, which a rebuild cannot use.
pub struct NoteUnreadable<'a> {
    pub commit: &'a dyn Display,
    pub error: &'a dyn Display,
}

impl InternalEvent for NoteUnreadable<'_> {
    type Metrics = NotesMetrics;

    fn emit(self, m: &NotesMetrics) {
        m.unreadable.inc();
        warn!(target: TARGET, commit = %self.commit, error = %self.error, "a note is not an opamp-gitops note; it is left out");
    }
}
