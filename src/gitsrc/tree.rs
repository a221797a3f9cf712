//! A [`FileSource`] over the tree of one commit: what the controller and
//! `validate --rev` read, never a working directory.

use std::path::Path;

use git2::{ErrorCode, ObjectType, Oid, Repository, Tree};

use crate::desired::{FileSource, SourceError};
use crate::model::CommitId;

/// Why a commit's tree could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path} is not a git repository: {message}")]
    NotARepository { path: String, message: String },
    #[error("no such revision: {rev}")]
    NoSuchRevision { rev: String },
    #[error("no directory {subdir} in commit {commit} (check --path)")]
    NoSuchSubdir { subdir: String, commit: CommitId },
    #[error("invalid subdirectory {0:?}: give a path inside the repository, without \"..\"")]
    BadSubdir(String),
    #[error("reading {what}: {source}")]
    Git {
        what: String,
        #[source]
        source: git2::Error,
    },
}

/// Git file modes of regular files (symbolic links and submodules are not
/// config files).
const BLOB: i32 = 0o100644;
const EXECUTABLE: i32 = 0o100755;
const LINK: i32 = 0o120000;

/// Reads files from one commit's tree, optionally under a subdirectory.
pub struct TreeSource {
    repo: Repository,
    tree: Oid,
    commit: CommitId,
    /// The subdirectory with a trailing `/`, or empty.
    prefix: String,
}

impl TreeSource {
    /// Opens the repository at `path` (a work tree or a bare repository) and
    /// resolves `rev` (a branch, tag, commit id, `HEAD~1`...) to a commit.
    pub fn open(path: &Path, rev: &str, subdir: Option<&str>) -> Result<Self, TreeError> {
        let repo = Repository::open(path).map_err(|e| TreeError::NotARepository {
            path: path.display().to_string(),
            message: e.message().to_string(),
        })?;
        let commit = match repo.revparse_single(rev).and_then(|o| o.peel_to_commit()) {
            Ok(c) => c.id(),
            Err(e)
                if matches!(
                    e.code(),
                    ErrorCode::NotFound | ErrorCode::InvalidSpec | ErrorCode::Ambiguous
                ) =>
            {
                return Err(TreeError::NoSuchRevision { rev: rev.to_string() });
            }
            Err(e) if e.class() == git2::ErrorClass::Object => {
                return Err(TreeError::NoSuchRevision { rev: rev.to_string() });
            }
            Err(source) => {
                return Err(TreeError::Git {
                    what: format!("revision {rev}"),
                    source,
                });
            }
        };
        Self::at_commit(repo, commit, subdir)
    }

    /// The tree of `commit` in `repo`, under `subdir` when given.
    pub fn at_commit(repo: Repository, commit: Oid, subdir: Option<&str>) -> Result<Self, TreeError> {
        let commit_id = CommitId::new(commit.to_string());
        let git = |what: &str| {
            let what = format!("{what} of commit {commit}");
            move |source| TreeError::Git { what, source }
        };
        let root = repo.find_commit(commit).map_err(git("commit"))?.tree_id();
        let prefix = match subdir {
            None => String::new(),
            Some(s) => {
                let parts: Vec<&str> = s.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
                if parts.contains(&"..") {
                    return Err(TreeError::BadSubdir(s.to_string()));
                }
                if parts.is_empty() {
                    String::new()
                } else {
                    format!("{}/", parts.join("/"))
                }
            }
        };
        if !prefix.is_empty() {
            let tree = repo.find_tree(root).map_err(git("tree"))?;
            let is_dir = tree
                .get_path(Path::new(prefix.trim_end_matches('/')))
                .is_ok_and(|e| e.kind() == Some(ObjectType::Tree));
            if !is_dir {
                return Err(TreeError::NoSuchSubdir {
                    subdir: prefix.trim_end_matches('/').to_string(),
                    commit: commit_id,
                });
            }
        }
        Ok(TreeSource {
            repo,
            tree: root,
            commit: commit_id,
            prefix,
        })
    }

    /// The commit the files are read from.
    pub fn commit(&self) -> &CommitId {
        &self.commit
    }

    fn error(&self, path: &str, e: &git2::Error) -> SourceError {
        SourceError {
            path: path.to_string(),
            message: format!("at commit {}: {}", self.commit, e.message()),
        }
    }

    fn root(&self, path: &str) -> Result<Tree<'_>, SourceError> {
        self.repo.find_tree(self.tree).map_err(|e| self.error(path, &e))
    }
}

impl FileSource for TreeSource {
    fn link(&self, path: &str) -> Option<String> {
        let root = self.root(path).ok()?;
        let entry = root.get_path(Path::new(&format!("{}{path}", self.prefix))).ok()?;
        if entry.filemode() != LINK {
            return None;
        }
        let target = self.repo.find_blob(entry.id()).ok()?;
        Some(String::from_utf8_lossy(target.content()).into_owned())
    }

    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let root = self.root(path)?;
        let full = format!("{}{path}", self.prefix);
        let entry = match root.get_path(Path::new(&full)) {
            Ok(entry) => entry,
            Err(e) if e.code() == ErrorCode::NotFound => return Ok(None),
            Err(e) => return Err(self.error(path, &e)),
        };
        if !matches!(entry.filemode(), BLOB | EXECUTABLE) {
            return Ok(None);
        }
        let blob = self.repo.find_blob(entry.id()).map_err(|e| self.error(path, &e))?;
        Ok(Some(blob.content().to_vec()))
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, SourceError> {
        let root = self.root(dir)?;
        let full = format!("{}{}", self.prefix, dir.trim_matches('/'));
        let full = full.trim_end_matches('/');
        let tree = if full.is_empty() {
            root
        } else {
            let entry = match root.get_path(Path::new(full)) {
                Ok(entry) if entry.kind() == Some(ObjectType::Tree) => entry,
                Ok(_) => return Ok(Vec::new()),
                Err(e) if e.code() == ErrorCode::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(self.error(dir, &e)),
            };
            self.repo.find_tree(entry.id()).map_err(|e| self.error(dir, &e))?
        };
        let mut names: Vec<String> = tree
            .iter()
            .filter(|e| matches!(e.filemode(), BLOB | EXECUTABLE | LINK))
            .map(|e| String::from_utf8_lossy(e.name_bytes()).into_owned())
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit_files(repo: &Repository, files: &[(&str, &str)], message: &str) -> Oid {
        let workdir = repo.workdir().unwrap().to_path_buf();
        for (path, body) in files {
            let p = workdir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        let mut index = repo.index().unwrap();
        index.add_all(["*"], git2::IndexAddOption::DEFAULT, None).unwrap();
        index.write().unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        let parents: Vec<git2::Commit> = repo
            .head()
            .ok()
            .and_then(|h| h.peel_to_commit().ok())
            .into_iter()
            .collect();
        let parents: Vec<&git2::Commit> = parents.iter().collect();
        repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &parents).unwrap()
    }

    #[test]
    fn reads_the_commit_not_the_work_tree() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        let first = commit_files(
            &repo,
            &[("sub/groups/a.yaml", "one"), ("sub/groups/b.yaml", "b"), ("top", "t")],
            "1",
        );
        commit_files(&repo, &[("sub/groups/a.yaml", "two")], "2");
        std::fs::write(dir.path().join("sub/groups/a.yaml"), "uncommitted").unwrap();

        let head = TreeSource::open(dir.path(), "HEAD", Some("sub")).unwrap();
        assert_eq!(head.read("groups/a.yaml").unwrap(), Some(b"two".to_vec()));
        assert_eq!(head.list("groups").unwrap(), vec!["a.yaml", "b.yaml"]);
        assert_eq!(
            head.list("").unwrap(),
            Vec::<String>::new(),
            "sub holds only a directory"
        );
        assert_eq!(
            head.read("top").unwrap(),
            None,
            "files outside the subdirectory are not visible"
        );
        assert_eq!(head.read("groups").unwrap(), None, "a directory is not a file");
        assert_eq!(head.list("nope").unwrap(), Vec::<String>::new());

        let old = TreeSource::open(dir.path(), "HEAD~1", None).unwrap();
        assert_eq!(old.commit().as_str(), first.to_string());
        assert_eq!(old.read("sub/groups/a.yaml").unwrap(), Some(b"one".to_vec()));
        assert_eq!(old.list("").unwrap(), vec!["top"]);

        assert!(matches!(
            TreeSource::open(dir.path(), "no-such-branch", None),
            Err(TreeError::NoSuchRevision { .. })
        ));
        assert!(matches!(
            TreeSource::open(dir.path(), "HEAD", Some("missing")),
            Err(TreeError::NoSuchSubdir { .. })
        ));
        assert!(matches!(
            TreeSource::open(dir.path(), "HEAD", Some("../x")),
            Err(TreeError::BadSubdir(_))
        ));
        let plain = tempfile::tempdir().unwrap();
        assert!(matches!(
            TreeSource::open(plain.path(), "HEAD", None),
            Err(TreeError::NotARepository { .. })
        ));
    }
}
