//! A [`FileSource`] over the files on disk under one directory: what
//! `validate` checks before a commit. The only I/O in `desired/`.

use std::io;
use std::path::{Component, Path, PathBuf};

use super::{FileSource, SourceError};

/// Reads files under `root`; refuses any path that leaves it, including
/// through a symbolic link.
#[derive(Debug, Clone)]
pub struct DiskSource {
    root: PathBuf,
}

impl DiskSource {
    /// `root` must be an existing directory.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, SourceError> {
        let root = root.into();
        let canonical = root.canonicalize().map_err(|e| SourceError {
            path: root.display().to_string(),
            message: e.to_string(),
        })?;
        if !canonical.is_dir() {
            return Err(SourceError {
                path: root.display().to_string(),
                message: "not a directory".to_string(),
            });
        }
        Ok(DiskSource { root: canonical })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The real location of `path`, or `None` when it does not exist.
    fn resolve(&self, path: &str) -> Result<Option<PathBuf>, SourceError> {
        let escapes = || SourceError {
            path: path.to_string(),
            message: "path leaves the repository directory".to_string(),
        };
        let relative = Path::new(path);
        if relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(escapes());
        }
        let real = match self.root.join(relative).canonicalize() {
            Ok(p) => p,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(error(path, &e)),
        };
        if !real.starts_with(&self.root) {
            return Err(escapes());
        }
        Ok(Some(real))
    }
}

fn is_missing(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory)
}

fn error(path: &str, e: &io::Error) -> SourceError {
    SourceError {
        path: path.to_string(),
        message: e.to_string(),
    }
}

impl FileSource for DiskSource {
    fn link(&self, path: &str) -> Option<String> {
        let full = self.root.join(path);
        full.is_symlink()
            .then(|| std::fs::read_link(&full).map_or_else(|e| e.to_string(), |t| t.display().to_string()))
    }

    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let Some(real) = self.resolve(path)? else {
            return Ok(None);
        };
        if !real.is_file() {
            return Ok(None);
        }
        match std::fs::read(&real) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(error(path, &e)),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, SourceError> {
        let Some(real) = self.resolve(dir)? else {
            return Ok(Vec::new());
        };
        let entries = match std::fs::read_dir(&real) {
            Ok(entries) => entries,
            Err(e) if is_missing(&e) => return Ok(Vec::new()),
            Err(e) => return Err(error(dir, &e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| error(dir, &e))?;
            // A link is listed (and refused when read, see `link`).
            if entry.path().is_file() || entry.path().is_symlink() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lists_and_refuses_escapes() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("repo");
        std::fs::create_dir_all(root.join("groups/sub")).unwrap();
        std::fs::write(root.join("groups/b.yaml"), "b").unwrap();
        std::fs::write(root.join("groups/a.yaml"), "a").unwrap();
        std::fs::write(outer.path().join("secret"), "s").unwrap();
        let src = DiskSource::new(&root).unwrap();

        assert_eq!(src.list("groups").unwrap(), vec!["a.yaml", "b.yaml"]);
        assert_eq!(src.list("nope").unwrap(), Vec::<String>::new());
        assert_eq!(src.read("groups/a.yaml").unwrap(), Some(b"a".to_vec()));
        assert_eq!(src.read("groups/zz.yaml").unwrap(), None);
        assert_eq!(src.read("groups/a.yaml/x").unwrap(), None);
        assert_eq!(src.read("groups").unwrap(), None, "a directory is not a file");
        assert!(src.read("../secret").is_err());
        assert!(src.read("/etc/passwd").is_err());

        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(outer.path().join("secret"), root.join("link")).unwrap();
            let e = src.read("link").unwrap_err();
            assert_eq!(e.message, "path leaves the repository directory");
        }
        assert!(DiskSource::new(outer.path().join("missing")).is_err());
    }
}
