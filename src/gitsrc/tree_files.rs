//! A [`FileSource`] over one commit's tree: what the desired-state loader reads
//! when the controller loads a commit. Never touches a working directory.

use std::path::PathBuf;

use git2::{ErrorCode, ObjectType, Repository, Tree};

use crate::desired::{FileSource, SourceError};

/// Git's file mode for a symbolic link.
const MODE_LINK: i32 = 0o120000;

pub struct CommitFiles<'repo> {
    repo: &'repo Repository,
    root: Tree<'repo>,
}

impl<'repo> CommitFiles<'repo> {
    /// Reads files below `root` (a commit's tree, or a subdirectory of it).
    pub fn new(repo: &'repo Repository, root: Tree<'repo>) -> Self {
        CommitFiles { repo, root }
    }
}

/// `a/./b/../c` becomes `a/c`; `None` when the path climbs above the root.
pub(crate) fn normalize(path: &str) -> Option<PathBuf> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.iter().collect())
}

fn source_error(path: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError {
        path: path.to_string(),
        message: e.to_string(),
    }
}

impl FileSource for CommitFiles<'_> {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let Some(rel) = normalize(path) else {
            return Ok(None);
        };
        if rel.as_os_str().is_empty() {
            return Ok(None);
        }
        let entry = match self.root.get_path(&rel) {
            Ok(entry) => entry,
            Err(e) if e.code() == ErrorCode::NotFound => return Ok(None),
            Err(e) => return Err(source_error(path, e)),
        };
        if entry.kind() != Some(ObjectType::Blob) {
            return Ok(None);
        }
        if entry.filemode() == MODE_LINK {
            return Err(source_error(path, "is a symbolic link; links are not followed"));
        }
        let blob = self.repo.find_blob(entry.id()).map_err(|e| source_error(path, e))?;
        Ok(Some(blob.content().to_vec()))
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, SourceError> {
        let Some(rel) = normalize(dir) else {
            return Ok(Vec::new());
        };
        let subtree;
        let tree = if rel.as_os_str().is_empty() {
            &self.root
        } else {
            match self.root.get_path(&rel) {
                Ok(entry) if entry.kind() == Some(ObjectType::Tree) => {
                    subtree = self.repo.find_tree(entry.id()).map_err(|e| source_error(dir, e))?;
                    &subtree
                }
                Ok(_) => return Ok(Vec::new()),
                Err(e) if e.code() == ErrorCode::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(source_error(dir, e)),
            }
        };
        let mut names: Vec<String> = tree
            .iter()
            .filter(|e| e.kind() == Some(ObjectType::Blob) && e.filemode() != MODE_LINK)
            .filter_map(|e| e.name().ok().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize("a/./b/../c"), Some(PathBuf::from("a/c")));
        assert_eq!(normalize("/groups/"), Some(PathBuf::from("groups")));
        assert_eq!(normalize(""), Some(PathBuf::new()));
        assert_eq!(normalize("../x"), None);
    }

    #[test]
    fn reads_a_commit_tree_not_the_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        let mut index = repo.index().unwrap();
        for (path, body) in [
            ("fleet.yaml", "a: 1\n"),
            ("groups/b.yaml", "x\n"),
            ("groups/a.yaml", "y\n"),
        ] {
            let full = dir.path().join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(&full, body).unwrap();
            index.add_path(std::path::Path::new(path)).unwrap();
        }
        let tree_id = index.write_tree().unwrap();
        // The working directory changes after the commit; the tree must not.
        std::fs::write(dir.path().join("fleet.yaml"), "changed\n").unwrap();
        std::fs::write(dir.path().join("groups/c.yaml"), "new\n").unwrap();
        let tree = repo.find_tree(tree_id).unwrap();
        let files = CommitFiles::new(&repo, tree);
        assert_eq!(files.read("fleet.yaml").unwrap(), Some(b"a: 1\n".to_vec()));
        assert_eq!(files.read("./groups/../fleet.yaml").unwrap(), Some(b"a: 1\n".to_vec()));
        assert_eq!(files.read("missing.yaml").unwrap(), None);
        assert_eq!(files.read("groups").unwrap(), None, "a directory is not a file");
        assert_eq!(files.list("groups").unwrap(), vec!["a.yaml", "b.yaml"]);
        assert_eq!(files.list("").unwrap(), vec!["fleet.yaml"]);
        assert!(files.list("nope").unwrap().is_empty());
    }
}
