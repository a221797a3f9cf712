//! The task that owns the git source's state: it waits for a trigger (the poll
//! timer, a sync request, a webhook, a ref change on disk), fetches, loads a
//! new tip once, and publishes the outcome.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::repo::{self, Head};
use super::{GitConfig, GitError, Loaded, RepoLocation, Status, SyncError, SyncOutcome, fswatch};
use crate::desired::Validated;
use crate::model::{Change, CommitId};
use crate::telemetry::InternalEvent;
use crate::telemetry::git::{
    CommitInvalid, CommitLoaded, CommitUnreadable, FetchFailed, FetchRecovered, FetchStarted, GitMetrics,
};

/// The first retry after a failed fetch; it doubles up to [`MAX_BACKOFF`] (or
/// the poll interval, when shorter).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A zero poll interval would fetch in a busy loop.
const MIN_POLL: Duration = Duration::from_millis(100);
/// How long to let a burst of ref changes settle before reading them.
const FS_DEBOUNCE: Duration = Duration::from_millis(50);
/// Outcomes remembered per commit, so a tip that moves back (force-push,
/// reset) is not validated again.
const REMEMBERED: usize = 16;

type SyncReply = oneshot::Sender<Result<SyncOutcome, SyncError>>;

/// What makes the source look at the branch again, besides the poll timer.
struct Triggers {
    syncs: mpsc::Receiver<SyncReply>,
    wake: Arc<Notify>,
    /// Ref changes of a local repository.
    fs: mpsc::Receiver<()>,
    /// Syncs waiting for the outcome of the next refresh.
    pending: Vec<SyncReply>,
}

impl Triggers {
    /// Waits for a sync request (which joins `pending`), a webhook or a ref
    /// change on disk.
    async fn next(&mut self) {
        tokio::select! {
            Some(reply) = self.syncs.recv() => self.pending.push(reply),
            _ = self.wake.notified() => debug!("woken"),
            Some(()) = self.fs.recv() => {
                tokio::time::sleep(FS_DEBOUNCE).await;
                while self.fs.try_recv().is_ok() {}
                debug!("refs changed");
            }
        }
    }
}

#[derive(Clone)]
enum Outcome {
    Valid(Arc<Loaded>),
    Invalid {
        errors: Arc<[String]>,
        change: Option<Change>,
    },
}

pub(super) struct SourceTask {
    config: GitConfig,
    repo_dir: PathBuf,
    desired: watch::Sender<Option<Arc<Loaded>>>,
    status: watch::Sender<Status>,
    metrics: GitMetrics,
    outcomes: VecDeque<(CommitId, Outcome)>,
    failures: u32,
    /// An error no retry can heal: the task ends with it.
    fatal: Option<GitError>,
}

impl SourceTask {
    pub(super) fn new(
        config: GitConfig,
        repo_dir: PathBuf,
        desired: watch::Sender<Option<Arc<Loaded>>>,
        status: watch::Sender<Status>,
        metrics: GitMetrics,
    ) -> SourceTask {
        SourceTask {
            config,
            repo_dir,
            desired,
            status,
            metrics,
            outcomes: VecDeque::new(),
            failures: 0,
            fatal: None,
        }
    }

    /// Time until the next fetch: the poll interval, or the backoff after failures.
    fn next_delay(&self) -> Duration {
        let poll = self.config.poll_interval.max(MIN_POLL);
        if self.failures == 0 {
            return poll;
        }
        let cap = poll.min(MAX_BACKOFF);
        let shift = (self.failures - 1).min(16);
        FIRST_BACKOFF.saturating_mul(1 << shift).min(cap)
    }

    pub(super) async fn run(
        mut self,
        syncs: mpsc::Receiver<SyncReply>,
        wake: Arc<Notify>,
        cancel: CancellationToken,
    ) -> Result<(), GitError> {
        let (fs_tx, fs) = mpsc::channel(1);
        let mut watcher = None;
        let mut triggers = Triggers {
            syncs,
            wake,
            fs,
            pending: Vec::new(),
        };
        info!(repo = %self.config.repo.display(), "git source started");
        loop {
            // Watch before reading, so no change after the read goes unseen.
            if let RepoLocation::Local(path) = &self.config.repo
                && watcher.is_none()
            {
                let (path, tx) = (path.clone(), fs_tx.clone());
                watcher = tokio::task::spawn_blocking(move || fswatch::watch_refs(&path, tx))
                    .await
                    .ok()
                    .flatten();
            }
            // A fetch in flight is abandoned on cancel (its blocking thread ends on its own).
            let result = tokio::select! {
                _ = cancel.cancelled() => break,
                result = self.refresh(&mut triggers) => result,
            };
            for reply in triggers.pending.drain(..) {
                let _ = reply.send(result.clone());
            }
            if let Some(e) = self.fatal.take() {
                tracing::error!(error = %e, "the git source cannot go on");
                return Err(e);
            }
            if result.is_err() {
                // The watched directory may have been replaced; watch anew next time.
                watcher = None;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(self.next_delay()) => debug!("poll"),
                () = triggers.next() => {}
            }
            while let Ok(reply) = triggers.syncs.try_recv() {
                triggers.pending.push(reply);
            }
        }
        drop(watcher);
        info!("git source stopped");
        Ok(())
    }

    /// One fetch, and the load of a new tip. Errors only when git could not be
    /// read; an invalid commit is a successful outcome with errors.
    async fn refresh(&mut self, triggers: &mut Triggers) -> Result<SyncOutcome, SyncError> {
        FetchStarted.emit(&self.metrics);
        let head = self.fetch().await;
        let now = SystemTime::now();
        let head = match head {
            Ok(head) => head,
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                FetchFailed {
                    error: &e,
                    failures: self.failures,
                }
                .emit(&self.metrics);
                let reason = e.to_string();
                self.status.send_modify(|s| {
                    s.last_fetch = Some(now);
                    s.last_fetch_error = Some(reason.clone());
                });
                // The repository answered without the branch before any
                // fetch succeeded: a wrong --branch, which no retry heals.
                if matches!(e, GitError::BranchNotFound { .. }) && self.status.borrow().last_success.is_none() {
                    self.fatal = Some(e);
                }
                return Err(SyncError::Fetch(reason));
            }
        };
        if self.failures > 0 {
            FetchRecovered {
                failures: self.failures,
            }
            .emit(&self.metrics);
        }
        self.failures = 0;
        self.status.send_modify(|s| {
            s.last_fetch = Some(now);
            s.last_fetch_error = None;
            s.last_success = Some(now);
            s.branch = Some(head.branch.clone());
        });
        let (head, loaded) = self.validate_newest(head, now, triggers).await;
        let outcome = match loaded {
            Ok(outcome) => outcome,
            Err(e) => {
                self.failures = 1;
                CommitUnreadable {
                    commit: &head.commit,
                    error: &e,
                }
                .emit(&self.metrics);
                let reason = e.to_string();
                self.status.send_modify(|s| s.last_fetch_error = Some(reason.clone()));
                return Err(SyncError::Fetch(reason));
            }
        };
        Ok(self.publish(head.commit, outcome))
    }

    /// The outcome of `head`, validating it when it is new. A trigger while
    /// it is being validated looks at the branch again: when the tip has
    /// moved (a revert pushed behind a large commit), the commit being
    /// validated is dropped and the new tip validated at once, so nothing
    /// waits behind a commit that is no longer the newest.
    async fn validate_newest(
        &mut self,
        mut head: Head,
        seen_at: SystemTime,
        triggers: &mut Triggers,
    ) -> (Head, Result<Outcome, GitError>) {
        loop {
            if let Some(outcome) = self.remembered(&head.commit) {
                return (head, Ok(outcome));
            }
            self.status.send_modify(|s| s.validating = Some(head.commit.clone()));
            let (dir, c, subdir) = (self.repo_dir.clone(), head.commit.clone(), self.config.subdir.clone());
            let mut job = tokio::task::spawn_blocking(move || {
                let validated = repo::load_commit(&dir, &c, subdir.as_deref())?;
                Ok((validated, repo::change_of(&dir, &c).ok()))
            });
            let newer = loop {
                tokio::select! {
                    loaded = &mut job => {
                        self.status.send_modify(|s| s.validating = None);
                        let loaded = loaded.map_err(GitError::Worker).and_then(|r| r);
                        let outcome = loaded.map(|(v, change)| self.remember(&head.commit, seen_at, v, change));
                        return (head, outcome);
                    }
                    () = triggers.next() => match self.fetch().await {
                        Ok(newest) if newest.commit != head.commit => break newest,
                        _ => {}
                    },
                }
            };
            info!(dropped = %head.commit, newest = %newer.commit, "the branch moved while a commit was validated; validating its new tip");
            head = newer;
        }
    }

    async fn fetch(&self) -> Result<Head, GitError> {
        let branch = self.config.branch.clone();
        let job: Box<dyn FnOnce() -> Result<Head, GitError> + Send> = match &self.config.repo {
            RepoLocation::Local(path) => {
                let path = path.clone();
                Box::new(move || repo::read_local(&path, branch.as_deref()))
            }
            RepoLocation::Remote(url) => {
                let (url, mirror, auth) = (url.clone(), self.repo_dir.clone(), self.config.auth.clone());
                Box::new(move || repo::fetch_remote(&mirror, &url, branch.as_deref(), &auth))
            }
        };
        tokio::task::spawn_blocking(job).await.map_err(GitError::Worker)?
    }

    fn remembered(&self, commit: &CommitId) -> Option<Outcome> {
        self.outcomes.iter().find(|(c, _)| c == commit).map(|(_, o)| o.clone())
    }

    /// Records the outcome of validating `commit`, and counts it.
    fn remember(
        &mut self,
        commit: &CommitId,
        seen_at: SystemTime,
        validated: Validated,
        change: Option<Change>,
    ) -> Outcome {
        let outcome = match validated {
            Validated::Valid(desired) => {
                CommitLoaded {
                    commit,
                    groups: desired.groups.len(),
                }
                .emit(&self.metrics);
                Outcome::Valid(Arc::new(Loaded {
                    commit: commit.clone(),
                    change,
                    desired,
                    seen_at,
                }))
            }
            Validated::Invalid(problems) => {
                CommitInvalid {
                    commit,
                    errors: problems.len(),
                }
                .emit(&self.metrics);
                Outcome::Invalid {
                    errors: problems.iter().map(ToString::to_string).collect(),
                    change,
                }
            }
        };
        if self.outcomes.len() == REMEMBERED {
            self.outcomes.pop_front();
        }
        self.outcomes.push_back((commit.clone(), outcome.clone()));
        outcome
    }

    /// Makes `head` the desired state when it is valid; records why not otherwise.
    fn publish(&mut self, head: CommitId, outcome: Outcome) -> SyncOutcome {
        let (errors, change): (Vec<String>, Option<Change>) = match &outcome {
            Outcome::Valid(loaded) => {
                self.desired.send_if_modified(|current| {
                    if current.as_ref().is_some_and(|c| c.commit == loaded.commit) {
                        return false;
                    }
                    *current = Some(loaded.clone());
                    true
                });
                (Vec::new(), None)
            }
            Outcome::Invalid { errors, change } => (errors.to_vec(), change.clone()),
        };
        let loaded = self.desired.borrow().as_ref().map(|l| l.commit.clone());
        self.status.send_if_modified(|s| {
            let changed = s.head.as_ref() != Some(&head) || s.loaded != loaded || s.head_errors != errors;
            s.head = Some(head.clone());
            s.loaded = loaded.clone();
            s.head_errors = errors.clone();
            s.head_change = change;
            changed
        });
        SyncOutcome {
            valid: errors.is_empty(),
            commit: head,
            loaded,
            errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(poll: Duration) -> SourceTask {
        let config = GitConfig {
            repo: RepoLocation::Local("/nonexistent".into()),
            branch: None,
            subdir: None,
            state_dir: "/tmp".into(),
            poll_interval: poll,
            auth: Default::default(),
            webhook_secret_file: None,
        };
        let (d, _) = watch::channel(None);
        let (s, _) = watch::channel(Status::default());
        SourceTask::new(config, "/nonexistent".into(), d, s, Default::default())
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut d = task(Duration::from_secs(30));
        assert_eq!(d.next_delay(), Duration::from_secs(30));
        let delays: Vec<u64> = (1..=7)
            .map(|n| {
                d.failures = n;
                d.next_delay().as_secs()
            })
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        let mut long = task(Duration::from_secs(3600));
        long.failures = 40;
        assert_eq!(long.next_delay(), MAX_BACKOFF);
        assert_eq!(task(Duration::ZERO).next_delay(), MIN_POLL);
    }
}
