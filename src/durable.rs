//! Files replaced atomically: written to a temporary file, synced, renamed
//! into place and the directory synced, so a crash leaves the old content or
//! the new, never a torn file. Created readable by their owner only (the
//! state holds config bodies). Blocking.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What failed, on which file.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", .path.display())]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn failed<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Replaces `dir/name` with `bytes` (creating `dir` when missing).
pub fn replace(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), FileError> {
    fs::create_dir_all(dir).map_err(failed("creating", dir))?;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = private_file(&tmp).map_err(failed("creating", &tmp))?;
    f.write_all(bytes).map_err(failed("writing", &tmp))?;
    f.sync_all().map_err(failed("syncing", &tmp))?;
    fs::rename(&tmp, &path).map_err(failed("replacing", &path))?;
    // Make the rename itself durable.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(failed("syncing", dir))
}

fn private_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}
