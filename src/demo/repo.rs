//! The demo's working directory and its git repository: where they live,
//! commits and reverts as an engineer would make them (git2, no `git`
//! binary needed), and one commit shown the way `git log --notes` shows it.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use git2::{IndexAddOption, Oid, Repository, Signature};

use super::DemoError;
use crate::gitsrc::notes::NOTES_REF;
use crate::model::CommitId;

/// A fresh directory under the system's temp dir holding the repository and
/// the controller's state. Removed on drop unless kept.
pub struct Workspace {
    root: PathBuf,
    keep: bool,
}

impl Workspace {
    pub fn create(keep: bool) -> Result<Self, DemoError> {
        let root = std::env::temp_dir().join(format!("opamp-gitops-demo-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&root).map_err(|source| DemoError::Io {
            what: format!("creating {}", root.display()),
            source,
        })?;
        Ok(Workspace { root, keep })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The config repository (a working repository, as on a laptop).
    pub fn repo_dir(&self) -> PathBuf {
        self.root.join("fleet-config")
    }

    /// The controller's `--state-dir`.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("controller-state")
    }

    pub fn keep(&self) -> bool {
        self.keep
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: a leftover temp dir is not worth failing over.
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// Who the demo's commits are by.
const AUTHOR: (&str, &str) = ("Platform Team", "platform@example.com");

fn git<T>(what: impl FnOnce() -> String, r: Result<T, git2::Error>) -> Result<T, DemoError> {
    r.map_err(|source| DemoError::Git { what: what(), source })
}

/// A working repository on disk.
pub struct DemoRepo {
    dir: PathBuf,
}

impl DemoRepo {
    pub fn init(dir: &Path) -> Result<Self, DemoError> {
        git(
            || format!("creating a repository in {}", dir.display()),
            Repository::init(dir),
        )?;
        Ok(DemoRepo { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn open(&self) -> Result<Repository, DemoError> {
        git(
            || format!("opening {}", self.dir.display()),
            Repository::open(&self.dir),
        )
    }

    /// Writes the files (path, body) into the work tree and commits everything.
    pub fn commit(&self, files: &[(&str, String)], message: &str) -> Result<CommitId, DemoError> {
        for (path, body) in files {
            let full = self.dir.join(path);
            if let Some(parent) = full.parent() {
                std::fs::create_dir_all(parent).map_err(|source| DemoError::Io {
                    what: format!("creating {}", parent.display()),
                    source,
                })?;
            }
            std::fs::write(&full, body).map_err(|source| DemoError::Io {
                what: format!("writing {}", full.display()),
                source,
            })?;
        }
        let repo = self.open()?;
        let mut index = git(|| "reading the index".into(), repo.index())?;
        git(
            || "adding the files".into(),
            index.add_all(["*"], IndexAddOption::DEFAULT, None),
        )?;
        git(|| "writing the index".into(), index.write())?;
        self.commit_index(&repo, message)
    }

    /// Like `git revert --no-edit COMMIT`: a new commit that undoes it.
    pub fn revert(&self, commit: &CommitId) -> Result<CommitId, DemoError> {
        let repo = self.open()?;
        let oid = git(|| format!("parsing {commit}"), Oid::from_str(commit.as_str()))?;
        let reverted = git(|| format!("finding {commit}"), repo.find_commit(oid))?;
        git(|| format!("reverting {commit}"), repo.revert(&reverted, None))?;
        let summary = String::from_utf8_lossy(reverted.summary_bytes().unwrap_or_default()).into_owned();
        let message = format!("Revert \"{summary}\"\n\nThis reverts commit {commit}.\n");
        let id = self.commit_index(&repo, &message)?;
        git(|| "finishing the revert".into(), repo.cleanup_state())?;
        Ok(id)
    }

    fn commit_index(&self, repo: &Repository, message: &str) -> Result<CommitId, DemoError> {
        let mut index = git(|| "reading the index".into(), repo.index())?;
        let tree_id = git(|| "writing the tree".into(), index.write_tree())?;
        let tree = git(|| "reading the tree".into(), repo.find_tree(tree_id))?;
        let sig = git(|| "making a signature".into(), Signature::now(AUTHOR.0, AUTHOR.1))?;
        let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        let oid = git(
            || "committing".into(),
            repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &parents),
        )?;
        Ok(CommitId::new(oid.to_string()))
    }

    /// The commit with its note, laid out as `git log -1 --notes=opamp-gitops` prints it.
    pub fn log_with_note(&self, commit: &CommitId) -> Result<String, DemoError> {
        let repo = self.open()?;
        let oid = git(|| format!("parsing {commit}"), Oid::from_str(commit.as_str()))?;
        let c = git(|| format!("finding {commit}"), repo.find_commit(oid))?;
        let author = c.author();
        let secs = u64::try_from(c.time().seconds()).unwrap_or(0);
        let date = crate::rfc3339::format(UNIX_EPOCH + Duration::from_secs(secs));
        let mut out = format!(
            "commit {commit}\nAuthor: {} <{}>\nDate:   {date}\n\n",
            author.name().unwrap_or_default(),
            author.email().unwrap_or_default()
        );
        for line in c.message().unwrap_or_default().trim_end().lines() {
            out.push_str(&indent(line));
        }
        if let Ok(note) = repo.find_note(Some(NOTES_REF), oid) {
            out.push_str("\nNotes (opamp-gitops):\n");
            for line in note.message().unwrap_or_default().trim_end().lines() {
                out.push_str(&indent(line));
            }
        }
        Ok(out)
    }
}

fn indent(line: &str) -> String {
    if line.is_empty() {
        "\n".to_string()
    } else {
        format!("    {line}\n")
    }
}
