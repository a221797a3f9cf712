//! Watches a local repository's refs (HEAD, packed-refs, refs/) so a new
//! commit is picked up within a second instead of at the next poll.

use std::path::{Path, PathBuf};

use notify::event::ModifyKind;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Starts watching; every relevant change sends `()` on `tx` (a full channel
/// already holds a pending wake-up, so the send is dropped). `None` when the
/// watch cannot be set up: polling still works.
pub(super) fn watch_refs(repo_path: &Path, tx: mpsc::Sender<()>) -> Option<RecommendedWatcher> {
    let (git_dir, common_dir) = match git2::Repository::open(repo_path) {
        Ok(repo) => (repo.path().to_path_buf(), repo.commondir().to_path_buf()),
        Err(e) => {
            // The fetch reports this same failure; it is retried with backoff.
            debug!(error = %e, "cannot open the repository to watch it");
            return None;
        }
    };
    let refs_dir = common_dir.join("refs");
    let watched = [git_dir.clone(), common_dir.clone()];
    let handler = {
        let refs_dir = refs_dir.clone();
        move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if is_ref_change(&event, &watched, &refs_dir) {
                let _ = tx.try_send(());
            }
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch the repository; relying on polling");
            return None;
        }
    };
    let mut dirs: Vec<(PathBuf, RecursiveMode)> = vec![
        (git_dir.clone(), RecursiveMode::NonRecursive),
        (refs_dir, RecursiveMode::Recursive),
    ];
    if common_dir != git_dir {
        dirs.push((common_dir, RecursiveMode::NonRecursive));
    }
    for (dir, mode) in dirs {
        if let Err(e) = watcher.watch(&dir, mode) {
            warn!(dir = %dir.display(), error = %e, "cannot watch the repository; relying on polling");
            return None;
        }
    }
    debug!(git_dir = %git_dir.display(), "watching refs");
    Some(watcher)
}

/// A write to HEAD, packed-refs or anything under refs/ but refs/notes/.
/// Reads are ignored, and so are notes: the controller's own reads and note
/// writes must not wake it.
fn is_ref_change(event: &notify::Event, git_dirs: &[PathBuf], refs_dir: &Path) -> bool {
    let writes = matches!(
        event.kind,
        EventKind::Any
            | EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any | ModifyKind::Other)
    );
    writes
        && event.paths.iter().any(|p| {
            if p.starts_with(refs_dir) {
                return !p.starts_with(refs_dir.join("notes"));
            }
            let top_level = p.parent().is_some_and(|parent| git_dirs.iter().any(|d| d == parent));
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            top_level && matches!(name, "HEAD" | "HEAD.lock" | "packed-refs" | "packed-refs.lock")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, RenameMode};

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn only_writes_to_refs_count() {
        let dirs = [PathBuf::from("/r/.git")];
        let refs = Path::new("/r/.git/refs");
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(is_ref_change(&event(rename, "/r/.git/refs/heads/main"), &dirs, refs));
        assert!(is_ref_change(&event(rename, "/r/.git/HEAD"), &dirs, refs));
        assert!(is_ref_change(
            &event(EventKind::Create(CreateKind::File), "/r/.git/packed-refs.lock"),
            &dirs,
            refs
        ));
        assert!(!is_ref_change(
            &event(EventKind::Access(AccessKind::Any), "/r/.git/HEAD"),
            &dirs,
            refs
        ));
        assert!(!is_ref_change(&event(rename, "/r/.git/index"), &dirs, refs));
        assert!(!is_ref_change(
            &event(rename, "/r/.git/refs/notes/opamp-gitops"),
            &dirs,
            refs
        ));
        assert!(!is_ref_change(&event(rename, "/r/.git/logs/HEAD"), &dirs, refs));
    }
}
