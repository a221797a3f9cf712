//! Where the rollout state is kept: the file in `--state-dir`, written
//! atomically (temp file, fsync, rename, fsync of the directory), so a crash
//! leaves either the old state or the new one, never a torn file; or, in a
//! cluster, PostgreSQL, fenced by the leader's epoch.

use std::fs;
use std::path::{Path, PathBuf};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::{DbError, Fence, StateStore};
use crate::reconcile::RolloutState;

/// The driver's store.
pub enum Store {
    /// One controller: the state file in this directory.
    Dir(PathBuf),
    /// A replica: the state in PostgreSQL, loaded and saved only while
    /// `leadership` says this replica leads.
    Cluster {
        store: Box<StateStore>,
        leadership: watch::Receiver<Option<Fence>>,
    },
}

impl Store {
    /// Saves `state`; in a cluster, as the leader of `term`.
    pub async fn save(&mut self, state: RolloutState, term: Option<Fence>) -> Result<(), PersistError> {
        match self {
            Store::Dir(dir) => saved(&mut save_on_blocking_thread(dir, state)).await,
            Store::Cluster { store, .. } => {
                let fence = term.ok_or(PersistError::Cluster(DbError::Fenced))?;
                store.save(fence, &state).await.map_err(PersistError::Cluster)
            }
        }
    }

    /// Starts saving `state` to the state file on a blocking thread, for
    /// the caller to go on meanwhile. `None`, having started nothing, in a
    /// cluster: its saves are fenced, and awaited.
    pub fn save_in_background(&self, state: RolloutState) -> Option<Saving> {
        match self {
            Store::Dir(dir) => Some(save_on_blocking_thread(dir, state)),
            Store::Cluster { .. } => None,
        }
    }
}

fn save_on_blocking_thread(dir: &Path, state: RolloutState) -> Saving {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || save(&dir, &state))
}

/// A save of the state file under way (see [`Store::save_in_background`]).
pub type Saving = JoinHandle<Result<(), PersistError>>;

/// Waits for a save under way to end.
pub async fn saved(saving: &mut Saving) -> Result<(), PersistError> {
    saving
        .await
        .unwrap_or_else(|e| Err(PersistError::Panicked(e.to_string())))
}

const FILE: &str = "rollouts.json";

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("saving the rollout state panicked: {0}")]
    Panicked(String),
    #[error("rollout state in PostgreSQL: {0}")]
    Cluster(DbError),
    #[error("rollout state {path} is unreadable ({source}); move it away to rebuild the state from the git notes")]
    Corrupt { path: PathBuf, source: serde_json::Error },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PersistError + 'a {
    move |source| PersistError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The saved state, or `None` when there is none yet.
pub fn load(dir: &Path) -> Result<Option<RolloutState>, PersistError> {
    let path = dir.join(FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("reading", &path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| PersistError::Corrupt { path, source })
}

/// Replaces the saved state. Blocking; the file holds config bodies, so it is
/// created readable by its owner only.
pub fn save(dir: &Path, state: &RolloutState) -> Result<(), PersistError> {
    let bytes = serde_json::to_vec(state).expect("the rollout state always serializes");
    crate::durable::replace(dir, FILE, &bytes).map_err(|e| PersistError::Io {
        action: e.action,
        path: e.path,
        source: e.source,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::model::GroupName;
    use crate::reconcile::GroupState;

    #[test]
    fn round_trip_and_private() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let mut state = RolloutState::default();
        state.groups.insert(GroupName::new("g"), GroupState::default());
        save(dir.path(), &state).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(state));
        let mode = fs::metadata(dir.path().join(FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join("rollouts.json.tmp").exists());
    }

    #[test]
    fn a_corrupt_file_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"{not json").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("move it away"), "{err}");
    }
}
