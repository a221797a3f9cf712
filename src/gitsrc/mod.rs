//! The git source: the only module that touches git2. It keeps the desired
//! state current with the tracked branch of the config repository and
//! publishes each new valid commit's `DesiredState` on a `watch` channel.
//!
//! A local repository is read in place (and watched for ref changes); a remote
//! URL is fetched into a bare mirror under the state directory (the mirror of
//! a `file://` URL reads that repository's objects in place, and fetches
//! only its refs). Fetches happen
//! on an interval, on [`GitHandle::sync`], and on a push webhook. A commit that
//! fails validation is never published: the last good state stays in force and
//! the reason is kept in the [`Status`] snapshot.

mod fswatch;
mod locate;
pub mod notes;
mod repo;
mod task;
pub mod tree;
pub mod webhook;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::desired::{DesiredState, Validated};
use crate::model::{Change, CommitId};
use crate::telemetry::Registry;
use crate::telemetry::git::{GitCounts, GitMetrics, SourceGauges};

pub use locate::resolve;

/// A git server that accepts a connection and then says nothing would hold a
/// fetch (and every sync waiting on it) forever: libgit2 has no network
/// timeouts unless told.
const GIT_CONNECT_TIMEOUT_MS: i32 = 15_000;
const GIT_IO_TIMEOUT_MS: i32 = 60_000;

/// libgit2 keeps up to 256 MiB of objects in a cache and maps pack files
/// in windows of up to 8 GiB in all: a large repository would take that much
/// memory for a controller that reads a few small files from it.
const GIT_CACHE_BYTES: usize = 16 << 20;
const GIT_MAPPED_BYTES: usize = 64 << 20;
const GIT_WINDOW_BYTES: usize = 8 << 20;

/// Gives every git network operation of this process connect and I/O
/// timeouts, and bounds the memory libgit2 keeps for object caches and
/// mapped pack files.
///
/// # Safety
/// Sets libgit2 globals without synchronization: call it before any thread
/// that may use git is spawned.
pub unsafe fn set_process_limits() {
    // SAFETY: the caller guarantees no other thread uses libgit2 yet.
    unsafe {
        let _ = git2::opts::set_server_connect_timeout_in_milliseconds(GIT_CONNECT_TIMEOUT_MS);
        let _ = git2::opts::set_server_timeout_in_milliseconds(GIT_IO_TIMEOUT_MS);
        let _ = git2::opts::set_mwindow_size(GIT_WINDOW_BYTES);
        let _ = git2::opts::set_mwindow_mapped_limit(GIT_MAPPED_BYTES);
        let _ = git2::opts::set_cache_max_size(GIT_CACHE_BYTES as isize);
    }
}

/// Where the config repository is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoLocation {
    /// A repository (working or bare) on this machine, read in place.
    Local(PathBuf),
    /// A `file://`, `https://` or `ssh://` URL (or scp-like `user@host:path`),
    /// fetched into a bare mirror under the state directory (which reads the
    /// objects of a `file://` repository where they are).
    Remote(String),
}

impl RepoLocation {
    /// A URL when it has a scheme or is scp-like and not an existing path;
    /// otherwise a local path.
    pub fn parse(s: &str) -> RepoLocation {
        if s.contains("://") {
            return RepoLocation::Remote(s.to_string());
        }
        let scp_like = s
            .split_once(':')
            .is_some_and(|(host, _)| host.len() > 1 && !host.contains('/'));
        if scp_like && !Path::new(s).exists() {
            RepoLocation::Remote(s.to_string())
        } else {
            RepoLocation::Local(PathBuf::from(s))
        }
    }

    /// How it is shown in logs and status: URLs without their user-info.
    pub fn display(&self) -> String {
        match self {
            RepoLocation::Local(p) => p.display().to_string(),
            RepoLocation::Remote(url) => repo::redact_url(url),
        }
    }
}

/// Credentials for remote repositories.
#[derive(Clone, Default)]
pub struct Auth {
    /// A file holding an https token (read on every fetch, so it can rotate).
    pub token_file: Option<PathBuf>,
    /// An https token given directly (from the environment); the file wins.
    pub token: Option<String>,
    /// A private key for ssh:// remotes; without it the ssh agent is asked.
    pub ssh_key_file: Option<PathBuf>,
}

impl Auth {
    /// The https token, if one is configured.
    pub fn token(&self) -> Result<Option<String>, GitError> {
        match &self.token_file {
            Some(path) => read_secret(path).map(Some),
            None => Ok(self.token.clone()),
        }
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("token_file", &self.token_file)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("ssh_key_file", &self.ssh_key_file)
            .finish()
    }
}

/// A secret file's content without the trailing newline editors add.
fn read_secret(path: &Path) -> Result<String, GitError> {
    let text = std::fs::read_to_string(path).map_err(|source| GitError::Secret {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

/// Everything the git source needs to run.
#[derive(Debug, Clone)]
pub struct GitConfig {
    pub repo: RepoLocation,
    /// The branch to track; default: the remote's default branch, or the
    /// branch a local repository's HEAD points at.
    pub branch: Option<String>,
    /// Subdirectory of the repository that holds fleet.yaml and groups/.
    pub subdir: Option<PathBuf>,
    /// Mirrors of remote repositories live under `<state_dir>/git/`.
    pub state_dir: PathBuf,
    pub poll_interval: Duration,
    pub auth: Auth,
    /// When set, webhooks must carry a matching `X-Hub-Signature-256`.
    pub webhook_secret_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("no repository given (--repo URL|PATH)")]
    NoRepo,
    #[error(
        "unsupported URL scheme {scheme:?} in {url} (use https://, ssh://, file://, user@host:path or a local path)"
    )]
    Scheme { scheme: String, url: String },
    #[error("{}: no such file or directory (give the path of a git repository, or its URL)", .0.display())]
    NoSuchPath(PathBuf),
    #[error("{}: not a git repository, nor a folder inside one (run `git init` there and commit the config, or give the repository's URL)", .0.display())]
    NotARepository(PathBuf),
    #[error("--path {}: no such folder at the tip of branch {branch} ({commit})", .path.display())]
    NoSuchFolder {
        path: PathBuf,
        branch: String,
        commit: CommitId,
    },
    #[error("opening repository {path}: {}", .source.message())]
    Open { path: PathBuf, source: git2::Error },
    #[error("preparing mirror {path}: {}", .source.message())]
    Mirror { path: PathBuf, source: git2::Error },
    #[error("fetching {url}: {}", .source.message())]
    Fetch { url: String, source: git2::Error },
    #[error("finding the default branch of {url}: {} (pass --branch)", .source.message())]
    NoDefaultBranch { url: String, source: git2::Error },
    #[error("branch {branch} not found in {repo}")]
    BranchNotFound { branch: String, repo: String },
    #[error("HEAD of {repo} is not a branch (pass --branch)")]
    DetachedHead { repo: String },
    #[error("reading {what}: {}", .source.message())]
    Read { what: String, source: git2::Error },
    #[error(transparent)]
    Tree(tree::TreeError),
    #[error("{source} at commit {commit}")]
    Source {
        commit: CommitId,
        source: crate::desired::SourceError,
    },
    #[error("reading secret {path}: {source}")]
    Secret { path: PathBuf, source: std::io::Error },
    #[error("git worker failed: {0}")]
    Worker(#[source] tokio::task::JoinError),
}

/// A valid commit and the desired state read from it.
#[derive(Debug)]
pub struct Loaded {
    pub commit: CommitId,
    /// Who made the commit, when git could tell.
    pub change: Option<Change>,
    pub desired: DesiredState,
    /// When the controller first saw this commit at the tip of the branch.
    pub seen_at: SystemTime,
}

/// What the git source knows right now; published on a `watch` channel.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// The repository, without credentials.
    pub repo: String,
    /// The tracked branch, once known.
    pub branch: Option<String>,
    /// The newest commit seen at the tip of the branch.
    pub head: Option<CommitId>,
    /// The commit whose desired state is in force.
    pub loaded: Option<CommitId>,
    /// Why `head` was rejected, as `path:line:column: message` lines; empty
    /// when `head` is the loaded commit.
    pub head_errors: Vec<String>,
    /// Who made `head`, when it is not in force (it is invalid) and git could tell.
    #[serde(skip)]
    pub head_change: Option<Change>,
    /// When the last fetch (or local read) was attempted.
    #[serde(serialize_with = "crate::rfc3339::option::serialize")]
    pub last_fetch: Option<SystemTime>,
    /// Why the last fetch failed; `None` once one succeeds.
    pub last_fetch_error: Option<String>,
    /// When a fetch (or local read) last succeeded.
    #[serde(serialize_with = "crate::rfc3339::option::serialize")]
    pub last_success: Option<SystemTime>,
    /// The commit being validated right now, if any.
    pub validating: Option<CommitId>,
}

impl Status {
    /// When the source went stale: the last success (or, before any, the
    /// first failure) when it is older than `stale_after` and the newest
    /// fetch failed.
    pub fn stale_since(&self, now: SystemTime, stale_after: Duration) -> Option<SystemTime> {
        self.last_fetch_error.as_ref()?;
        let since = self.last_success.or(self.last_fetch)?;
        (now.duration_since(since).unwrap_or_default() > stale_after).then_some(since)
    }

    /// `Ok(commit in force)`, or why there is none, or why it may no longer
    /// be the newest: no fetch has succeeded for longer than `stale_after`.
    pub fn readiness(&self, now: SystemTime, stale_after: Duration) -> Result<&CommitId, String> {
        if let Some(c) = &self.loaded {
            return match self.stale_since(now, stale_after) {
                Some(since) => Err(format!(
                    "the repository has not been read since {} ({}); commit {} stays in force",
                    crate::rfc3339::format(since),
                    self.last_fetch_error.as_deref().unwrap_or("no fetch succeeded"),
                    c.short()
                )),
                None => Ok(c),
            };
        }
        if let (Some(head), Some(first)) = (&self.head, self.head_errors.first()) {
            let more = self.head_errors.len() - 1;
            let more = if more > 0 {
                format!(" (and {more} more)")
            } else {
                String::new()
            };
            return Err(format!("commit {} is invalid: {first}{more}", head.short()));
        }
        if let Some(e) = &self.last_fetch_error {
            return Err(e.clone());
        }
        Err("no commit loaded yet".to_string())
    }
}

/// What a sync reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncOutcome {
    /// The tip of the tracked branch after the fetch.
    pub commit: CommitId,
    /// Whether `commit` passed validation (and is now in force).
    pub valid: bool,
    /// The commit in force (the previous one when `commit` is invalid).
    pub loaded: Option<CommitId>,
    /// Why `commit` is invalid.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SyncError {
    /// The repository could not be read or fetched.
    #[error("{0}")]
    Fetch(String),
    /// The git source has stopped.
    #[error("the git source is not running")]
    Stopped,
}

/// The running git source's interface: cheap to clone.
#[derive(Clone)]
pub struct GitHandle {
    desired: watch::Receiver<Option<Arc<Loaded>>>,
    status: watch::Receiver<Status>,
    syncs: mpsc::Sender<oneshot::Sender<Result<SyncOutcome, SyncError>>>,
    wake: Arc<Notify>,
    metrics: GitMetrics,
    webhook_secret: Option<Arc<[u8]>>,
    repo_dir: PathBuf,
    subdir: Option<PathBuf>,
    remote_url: Option<String>,
    auth: Auth,
}

impl GitHandle {
    /// The desired state at an older commit (to restore a stable config), or
    /// why that commit is not valid; an error is a failure to read git.
    pub async fn load_at(&self, commit: &CommitId) -> Result<Validated, GitError> {
        let (dir, subdir, commit) = (self.repo_dir.clone(), self.subdir.clone(), commit.clone());
        tokio::task::spawn_blocking(move || repo::load_commit(&dir, &commit, subdir.as_deref()))
            .await
            .map_err(GitError::Worker)?
    }

    /// The newest valid commit's desired state; `None` until one is loaded.
    pub fn desired(&self) -> watch::Receiver<Option<Arc<Loaded>>> {
        self.desired.clone()
    }

    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Fetches now and answers once the result is published.
    pub async fn sync(&self) -> Result<SyncOutcome, SyncError> {
        let (tx, rx) = oneshot::channel();
        self.syncs.send(tx).await.map_err(|_| SyncError::Stopped)?;
        rx.await.map_err(|_| SyncError::Stopped)?
    }

    /// Asks for a fetch soon, without waiting for it (webhooks).
    pub fn trigger(&self) {
        self.wake.notify_one();
    }

    /// The git source's counters now.
    pub fn metrics(&self) -> GitCounts {
        self.metrics.counts()
    }

    /// Adds the git source's metrics to `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
        let status = self.status.clone();
        crate::telemetry::git::register_source(registry, move || {
            let s = status.borrow();
            SourceGauges {
                last_success: s
                    .last_success
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs_f64()),
                head_invalid: !s.head_errors.is_empty(),
            }
        });
    }

    /// The repository that holds the commits: the local repository itself, or
    /// the mirror of a remote one.
    pub fn repo_dir(&self) -> &Path {
        &self.repo_dir
    }

    /// The remote's URL (as configured, credentials included) when the
    /// repository is remote: where notes are pushed.
    pub fn remote_url(&self) -> Option<&str> {
        self.remote_url.as_deref()
    }

    /// A notes store on this repository, pushing to its remote with the
    /// credentials the fetches use.
    pub fn notes_store(&self, author: notes::Author) -> notes::NotesStore {
        notes::NotesStore::new(self.repo_dir(), self.remote_url().map(String::from), author)
            .with_auth(self.auth.clone())
    }

    pub(crate) fn webhook_secret(&self) -> Option<&[u8]> {
        self.webhook_secret.as_deref()
    }
}

/// Starts the git source.
pub struct GitSource;

impl GitSource {
    /// Spawns the task that fetches and loads commits; it stops on `cancel`.
    /// Fails only on configuration problems (an unreadable webhook secret);
    /// an unreachable repository is retried, with the reason in the status.
    /// The task ends early, with the error, only on one no retry can heal (a
    /// remote without the branch asked for).
    pub fn spawn(
        config: GitConfig,
        cancel: CancellationToken,
    ) -> Result<(GitHandle, JoinHandle<Result<(), GitError>>), GitError> {
        let webhook_secret = match &config.webhook_secret_file {
            Some(path) => Some(Arc::from(read_secret(path)?.into_bytes())),
            None => None,
        };
        let repo_dir = match &config.repo {
            RepoLocation::Local(p) => p.clone(),
            RepoLocation::Remote(url) => repo::mirror_dir(&config.state_dir, url),
        };
        let (desired_tx, desired_rx) = watch::channel(None);
        let (status_tx, status_rx) = watch::channel(Status {
            repo: config.repo.display(),
            branch: config.branch.as_deref().map(|b| repo::branch_name(b).to_string()),
            ..Status::default()
        });
        let (sync_tx, sync_rx) = mpsc::channel(64);
        let wake = Arc::new(Notify::new());
        let metrics = GitMetrics::default();
        let remote_url = match &config.repo {
            RepoLocation::Local(_) => None,
            RepoLocation::Remote(url) => Some(url.clone()),
        };
        let auth = config.auth.clone();
        let subdir = config.subdir.clone();
        let source = task::SourceTask::new(config, repo_dir.clone(), desired_tx, status_tx, metrics.clone());
        let task = tokio::spawn(source.run(sync_rx, wake.clone(), cancel));
        let handle = GitHandle {
            desired: desired_rx,
            status: status_rx,
            syncs: sync_tx,
            wake,
            metrics,
            webhook_secret,
            repo_dir,
            subdir,
            remote_url,
            auth,
        };
        Ok((handle, task))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_locations() {
        assert_eq!(
            RepoLocation::parse("file:///srv/r.git"),
            RepoLocation::Remote("file:///srv/r.git".into())
        );
        assert_eq!(
            RepoLocation::parse("git@github.com:o/r.git"),
            RepoLocation::Remote("git@github.com:o/r.git".into())
        );
        assert_eq!(
            RepoLocation::parse("/srv/config"),
            RepoLocation::Local("/srv/config".into())
        );
        assert_eq!(RepoLocation::parse("config"), RepoLocation::Local("config".into()));
        assert_eq!(
            RepoLocation::Remote("https://u:t@h/r".into()).display(),
            "https://***@h/r"
        );
    }

    #[test]
    fn readiness_reasons() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let minute = Duration::from_secs(60);
        let mut s = Status::default();
        assert_eq!(s.readiness(now, minute), Err("no commit loaded yet".to_string()));
        s.last_fetch_error = Some("fetching x: down".into());
        assert_eq!(s.readiness(now, minute), Err("fetching x: down".to_string()));
        s.head = Some(CommitId::new("ab".repeat(20)));
        s.head_errors = vec!["groups/a.yaml:1:2: bad".into(), "b".into()];
        assert_eq!(
            s.readiness(now, minute),
            Err("commit abababababab is invalid: groups/a.yaml:1:2: bad (and 1 more)".to_string())
        );
        s.loaded = Some(CommitId::new("cd".repeat(20)));
        s.last_fetch = Some(now);
        s.last_success = Some(now - minute / 2);
        assert!(s.readiness(now, minute).is_ok(), "failing, but not for long");
        s.last_success = Some(now - minute * 2);
        assert_eq!(
            s.readiness(now, minute),
            Err(
                "the repository has not been read since 2027-01-15T07:58:00Z (fetching x: down); commit cdcdcdcdcdcd stays in force"
                    .to_string()
            )
        );
        s.last_fetch_error = None;
        assert!(s.readiness(now, minute).is_ok(), "a fetch succeeded since");
    }

    #[test]
    fn secrets_lose_the_trailing_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, " tok en \n").unwrap();
        assert_eq!(read_secret(&p).unwrap(), " tok en ");
        let auth = Auth {
            token_file: Some(p),
            token: Some("env".into()),
            ssh_key_file: None,
        };
        assert_eq!(auth.token().unwrap().as_deref(), Some(" tok en "));
        assert!(!format!("{auth:?}").contains("env\""));
    }
}
