//! The notes writer task: takes note updates without ever blocking a rollout,
//! keeps only the newest note per commit, and writes (and pushes) them in the
//! background, retrying failures with backoff.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::format::Note;
pub use crate::backoff::Backoff;
use crate::gitsrc::notes::NotesStore;
use crate::model::CommitId;
use crate::telemetry::notes::{NotesMetrics, NotesWriteFailed, NotesWritten};
use crate::telemetry::{InternalEvent, Registry};

/// Hands notes to the writer. Cheap to clone; `submit` never waits.
#[derive(Clone)]
pub struct NotesHandle {
    pending: Arc<Mutex<BTreeMap<CommitId, Note>>>,
    /// Asked just before each write; a note it refuses is dropped.
    gate: Option<Gate>,
    /// The epoch the last note was written in (with a gate).
    term: Arc<AtomicI64>,
    wake: Arc<Notify>,
    metrics: NotesMetrics,
}

impl NotesHandle {
    /// Queues a note; a newer note for the same commit replaces a queued one.
    pub fn submit(&self, note: Note) {
        self.pending
            .lock()
            .expect("the pending map is never poisoned")
            .insert(note.commit.clone(), note);
        self.wake.notify_one();
    }

    /// The writer's metrics, for reports about notes made elsewhere.
    pub fn metrics(&self) -> &NotesMetrics {
        &self.metrics
    }

    /// Adds the writer's metrics to `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }
}

/// Whether notes may be written now: in a cluster, the epoch of the leader
/// lease while this replica holds it, `None` when it does not, so one that
/// lost it while paused writes nothing.
pub type Gate = Arc<dyn Fn() -> Option<i64> + Send + Sync>;

/// Starts the writer. On cancellation it makes one last attempt to write what
/// is queued, then stops.
pub fn spawn(
    store: NotesStore,
    backoff: Backoff,
    gate: Option<Gate>,
    cancel: CancellationToken,
) -> (NotesHandle, tokio::task::JoinHandle<()>) {
    let handle = NotesHandle {
        pending: Arc::default(),
        gate,
        term: Arc::default(),
        wake: Arc::new(Notify::new()),
        metrics: NotesMetrics::default(),
    };
    let task = tokio::spawn(run(handle.clone(), Arc::new(store), backoff, cancel));
    (handle, task)
}

async fn run(handle: NotesHandle, store: Arc<NotesStore>, backoff: Backoff, cancel: CancellationToken) {
    let mut delay = backoff.min;
    loop {
        let stopping = tokio::select! {
            _ = handle.wake.notified() => false,
            _ = cancel.cancelled() => true,
        };
        let ok = flush(&handle, &store).await;
        if stopping {
            return;
        }
        if ok {
            delay = backoff.min;
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => {
                flush(&handle, &store).await;
                return;
            }
        }
        delay = backoff.next(delay);
        handle.wake.notify_one();
    }
}

/// The texts to write: each note over the one already on its commit (see
/// [`Note::over`]). A note that cannot be read or parsed is replaced, and
/// said so.
fn over_existing(store: &NotesStore, notes: BTreeMap<CommitId, Note>) -> BTreeMap<CommitId, String> {
    let mut texts = BTreeMap::new();
    for (commit, note) in notes {
        let older = match store.read(&commit) {
            Ok(Some(text)) => match Note::parse(&text) {
                Ok(older) => Some(older),
                Err(e) => {
                    tracing::warn!(%commit, error = %e, "replacing a note that is not an opamp-gitops note");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(%commit, error = %e, "could not read the note before writing it");
                None
            }
        };
        let note = match older {
            Some(older) => match note.over(&older) {
                Some(note) => note,
                None => {
                    tracing::warn!(%commit, "not writing an invalid verdict over the note of a valid commit");
                    continue;
                }
            },
            None => note,
        };
        texts.insert(commit, note.render());
    }
    texts
}

/// Writes everything queued. On failure the notes go back to the queue unless
/// a newer note for the same commit arrived meanwhile.
async fn flush(handle: &NotesHandle, store: &Arc<NotesStore>) -> bool {
    let batch = std::mem::take(&mut *handle.pending.lock().expect("the pending map is never poisoned"));
    if batch.is_empty() {
        return true;
    }
    let store = store.clone();
    let notes = batch.clone();
    let gate = handle.gate.clone();
    let term = Arc::clone(&handle.term);
    let result = tokio::task::spawn_blocking(move || {
        let texts = over_existing(&store, notes);
        if let Some(gate) = gate {
            let Some(epoch) = gate() else {
                return Ok(false);
            };
            // Notes of an earlier term are not ours to win a merge with any more.
            if term.swap(epoch, Ordering::Relaxed) != epoch {
                store.forget_ours();
            }
        }
        store.write(&texts).map(|()| true)
    })
    .await;
    let error = match result {
        Ok(Ok(false)) => {
            tracing::warn!(notes = batch.len(), "not the leader: notes dropped, not written");
            return true;
        }
        Ok(Ok(true)) => {
            NotesWritten { notes: batch.len() }.emit(&handle.metrics);
            return true;
        }
        Ok(Err(e)) => e.to_string(),
        Err(e) => format!("notes writer panicked: {e}"),
    };
    NotesWriteFailed {
        error: &error,
        notes: batch.len(),
    }
    .emit(&handle.metrics);
    let mut pending = handle.pending.lock().expect("the pending map is never poisoned");
    for (commit, note) in batch {
        pending.entry(commit).or_insert(note);
    }
    false
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant, UNIX_EPOCH};

    use git2::{Repository, Signature};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::gitsrc::notes::Author;
    use crate::notes::format::FORMAT_VERSION;

    fn note(commit: &CommitId, valid: bool) -> Note {
        Note {
            version: FORMAT_VERSION.into(),
            commit: commit.clone(),
            change: None,
            updated: UNIX_EPOCH,
            valid,
            errors: vec![],
            groups: BTreeMap::new(),
        }
    }

    fn repo_with_commit(path: &std::path::Path) -> CommitId {
        let repo = Repository::init(path).unwrap();
        let sig = Signature::now("t", "t@example.com").unwrap();
        let tree = repo
            .find_tree(repo.treebuilder(None).unwrap().write().unwrap())
            .unwrap();
        CommitId::new(
            repo.commit(Some("HEAD"), &sig, &sig, "c", &tree, &[])
                .unwrap()
                .to_string(),
        )
    }

    async fn wait_for(mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "condition not met in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn start(store: NotesStore, backoff: Backoff, cancel: &CancellationToken) -> (NotesHandle, JoinHandle<()>) {
        spawn(store, backoff, None, cancel.clone())
    }

    #[tokio::test]
    async fn newest_note_per_commit_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let c = repo_with_commit(dir.path());
        let cancel = CancellationToken::new();
        let store = NotesStore::new(dir.path(), None, Author::default());
        let (h, task) = start(store, Backoff::default(), &cancel);
        h.submit(note(&c, false));
        h.submit(note(&c, true));
        let reader = NotesStore::new(dir.path(), None, Author::default());
        wait_for(|| reader.read(&c).unwrap().is_some_and(|t| t.contains("valid: true"))).await;
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(h.metrics.write_failures(), 0);
    }

    #[tokio::test]
    async fn failed_writes_are_retried_until_the_remote_returns() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("local");
        let c = repo_with_commit(&local);
        let remote = dir.path().join("remote.git");
        let url = format!("file://{}", remote.display());
        let cancel = CancellationToken::new();
        let store = NotesStore::new(&local, Some(url), Author::default());
        let backoff = Backoff {
            min: Duration::from_millis(20),
            max: Duration::from_millis(100),
        };
        let (h, task) = start(store, backoff, &cancel);
        h.submit(note(&c, true));
        wait_for(|| h.metrics.write_failures() >= 2).await;
        assert_eq!(h.metrics.written(), 0);
        Repository::init_bare(&remote).unwrap();
        wait_for(|| h.metrics.written() == 1).await;
        let remote_repo = Repository::open(&remote).unwrap();
        let oid = git2::Oid::from_str(c.as_str()).unwrap();
        assert!(
            remote_repo
                .find_note(Some(crate::gitsrc::notes::NOTES_REF), oid)
                .is_ok()
        );
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn queued_notes_are_flushed_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let c = repo_with_commit(dir.path());
        let cancel = CancellationToken::new();
        let store = NotesStore::new(dir.path(), None, Author::default());
        let (h, task) = start(store, Backoff::default(), &cancel);
        // Queue without waking the task, then stop: the final flush writes it.
        h.pending.lock().unwrap().insert(c.clone(), note(&c, true));
        cancel.cancel();
        task.await.unwrap();
        assert!(
            NotesStore::new(dir.path(), None, Author::default())
                .read(&c)
                .unwrap()
                .is_some()
        );
    }
}
