//! A [`FileSource`] held in memory: for tests, here and in other modules
//! that need a `DesiredState` built from repository text.

use std::collections::BTreeMap;

use super::{FileSource, SourceError};

/// Files by repository path (`/`-separated, relative).
#[derive(Debug, Clone, Default)]
pub struct MemSource {
    files: BTreeMap<String, Vec<u8>>,
}

impl MemSource {
    pub fn new<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut s = MemSource::default();
        for (path, body) in files {
            s.insert(path, body);
        }
        s
    }

    /// Adds or replaces a file.
    pub fn insert(&mut self, path: &str, body: impl Into<Vec<u8>>) {
        self.files.insert(path.to_string(), body.into());
    }

    pub fn remove(&mut self, path: &str) {
        self.files.remove(path);
    }
}

impl FileSource for MemSource {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        Ok(self.files.get(path).cloned())
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, SourceError> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        Ok(self
            .files
            .keys()
            .filter_map(|p| p.strip_prefix(&prefix))
            .filter(|rest| !rest.contains('/'))
            .map(str::to_string)
            .collect())
    }
}
