//! Git notes on `refs/notes/opamp-gitops`: read, write, and push them to the
//! remote, merging with notes other writers pushed in between. Blocking; call
//! from `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use git2::{Oid, Repository, Signature};

use crate::model::{Change, CommitId};

/// Where our notes live, locally and on the remote.
pub const NOTES_REF: &str = "refs/notes/opamp-gitops";
/// Where the remote's notes are fetched to before a merge.
const REMOTE_NOTES_REF: &str = "refs/notes/opamp-gitops-remote";
/// A scratch ref the merge is built on, so our ref moves only once it is done.
const MERGE_NOTES_REF: &str = "refs/notes/opamp-gitops-merge";

#[derive(Debug, thiserror::Error)]
pub enum NotesError {
    #[error("{}: not a git repository (give --repo a clone of the config repository)", .0.display())]
    NotARepository(PathBuf),
    #[error("opening repository {path}: {}", .source.message())]
    Open { path: PathBuf, source: git2::Error },
    #[error("no remote named {0:?} in this repository (`git remote -v` lists them; give a remote's name or URL)")]
    NoRemote(String),
    #[error("{what}: {}", .source.message())]
    Git { what: String, source: git2::Error },
    #[error("{0} is not a commit id")]
    BadCommit(String),
    #[error("pushing notes to {remote} was rejected {attempts} times: {reason}")]
    Rejected {
        remote: String,
        attempts: u32,
        reason: String,
    },
}

fn git<T>(what: impl FnOnce() -> String, r: Result<T, git2::Error>) -> Result<T, NotesError> {
    r.map_err(|source| NotesError::Git { what: what(), source })
}

/// Who notes are written as.
#[derive(Debug, Clone)]
pub struct Author {
    pub name: String,
    pub email: String,
}

impl Default for Author {
    fn default() -> Self {
        Author {
            name: "opamp-gitops".into(),
            email: "opamp-gitops@localhost".into(),
        }
    }
}

/// Notes of one repository, optionally mirrored to a remote.
pub struct NotesStore {
    repo_path: PathBuf,
    /// The remote to push to (a URL or a remote name); `None` for a local repository.
    remote: Option<String>,
    author: Author,
    /// Credentials for pushes and fetches.
    auth: super::Auth,
    /// How many times a rejected push is merged and retried before giving up.
    pub push_attempts: u32,
    /// Every note this store has written, newest text per commit: the
    /// commits we manage, where ours win in a merge. Notes merged in from
    /// others are not here, so a stale copy never overwrites a newer one.
    ours: std::sync::Mutex<BTreeMap<CommitId, String>>,
}

impl NotesStore {
    /// Forgets which notes are ours: another writer (a replica that led
    /// meanwhile) may have written newer ones since, which must win.
    pub fn forget_ours(&self) {
        self.ours.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl NotesStore {
    pub fn new(repo_path: impl Into<PathBuf>, remote: Option<String>, author: Author) -> Self {
        NotesStore {
            repo_path: repo_path.into(),
            remote,
            author,
            auth: super::Auth::default(),
            push_attempts: 5,
            ours: Default::default(),
        }
    }

    /// Pushes and fetches with these credentials.
    pub fn with_auth(mut self, auth: super::Auth) -> Self {
        self.auth = auth;
        self
    }

    fn open(&self) -> Result<Repository, NotesError> {
        Repository::open(&self.repo_path).map_err(|source| match source.code() {
            git2::ErrorCode::NotFound => NotesError::NotARepository(self.repo_path.clone()),
            _ => NotesError::Open {
                path: self.repo_path.clone(),
                source,
            },
        })
    }

    /// The note on `commit`, if any.
    pub fn read(&self, commit: &CommitId) -> Result<Option<String>, NotesError> {
        let repo = self.open()?;
        let oid = parse_oid(commit)?;
        let note = match repo.find_note(Some(NOTES_REF), oid) {
            Ok(n) => n,
            Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(None),
            Err(e) => return git(|| format!("reading the note on {commit}"), Err(e)),
        };
        Ok(Some(String::from_utf8_lossy(note.message_bytes()).into_owned()))
    }

    /// Every note, by commit.
    pub fn all(&self) -> Result<BTreeMap<CommitId, String>, NotesError> {
        all_notes(&self.open()?, NOTES_REF)
    }

    /// Writes the notes locally (replacing any note on the same commit), then
    /// pushes them when there is a remote.
    pub fn write(&self, notes: &BTreeMap<CommitId, String>) -> Result<(), NotesError> {
        let repo = self.open()?;
        let sig = self.signature()?;
        for (commit, text) in notes {
            put_note(&repo, &sig, NOTES_REF, commit, text)?;
        }
        let ours = {
            let mut ours = self.ours.lock().unwrap_or_else(|e| e.into_inner());
            ours.extend(notes.iter().map(|(c, t)| (c.clone(), t.clone())));
            ours.clone()
        };
        match &self.remote {
            Some(remote) => self.push(&repo, &sig, remote, &ours),
            None => Ok(()),
        }
    }

    /// Makes our notes ref the remote's (the remote is the record; notes we
    /// failed to push are written again as rollouts move). Used at start-up
    /// before state is rebuilt from notes, and by `status --fetch`.
    pub fn fetch(&self) -> Result<(), NotesError> {
        let Some(remote) = &self.remote else { return Ok(()) };
        let repo = self.open()?;
        let sig = self.signature()?;
        if fetch_remote_notes(&repo, remote, &self.auth)? {
            merge_remote_notes(&repo, &sig, &BTreeMap::new())?;
        }
        Ok(())
    }

    fn signature(&self) -> Result<Signature<'static>, NotesError> {
        git(
            || "making the notes signature".into(),
            Signature::now(&self.author.name, &self.author.email),
        )
    }

    /// Pushes our notes ref; when the remote has moved on, rebuilds ours on
    /// top of the remote's with `ours` (the notes we manage) applied, and
    /// tries again.
    fn push(
        &self,
        repo: &Repository,
        sig: &Signature<'_>,
        remote: &str,
        ours: &BTreeMap<CommitId, String>,
    ) -> Result<(), NotesError> {
        let mut reason = String::new();
        for attempt in 1..=self.push_attempts {
            match push_once(repo, remote, &self.auth)? {
                None => return Ok(()),
                Some(why) => reason = why,
            }
            tracing::info!(attempt, reason = %reason, "notes push rejected; merging the remote's notes");
            if fetch_remote_notes(repo, remote, &self.auth)? {
                merge_remote_notes(repo, sig, ours)?;
            }
            std::thread::sleep(Duration::from_millis(50 << attempt.min(5)));
        }
        Err(NotesError::Rejected {
            remote: remote.to_string(),
            attempts: self.push_attempts,
            reason,
        })
    }
}

/// One commit of the tracked branch, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    pub id: CommitId,
    /// Its author, committer, time and subject.
    pub change: Change,
}

impl NotesStore {
    /// The newest `limit` commits reachable from `rev` (first parents only),
    /// each with its note if it has one.
    pub fn history(&self, rev: &str, limit: usize) -> Result<Vec<(CommitInfo, Option<String>)>, NotesError> {
        let repo = self.open()?;
        let start = git(
            || format!("resolving {rev}"),
            repo.revparse_single(rev).and_then(|o| o.peel_to_commit()),
        )?;
        let mut walk = git(|| "walking history".into(), repo.revwalk())?;
        git(|| "walking history".into(), walk.push(start.id()))?;
        git(|| "walking history".into(), walk.simplify_first_parent())?;
        let notes = all_notes(&repo, NOTES_REF)?;
        let mut out = Vec::new();
        for oid in walk.take(limit) {
            let oid = git(|| "walking history".into(), oid)?;
            let c = git(|| format!("reading commit {oid}"), repo.find_commit(oid))?;
            let id = CommitId::new(oid.to_string());
            let info = CommitInfo {
                change: super::repo::change(&c),
                id: id.clone(),
            };
            out.push((info, notes.get(&id).cloned()));
        }
        Ok(out)
    }
}

fn parse_oid(commit: &CommitId) -> Result<Oid, NotesError> {
    Oid::from_str(commit.as_str()).map_err(|_| NotesError::BadCommit(commit.to_string()))
}

fn put_note(
    repo: &Repository,
    sig: &Signature<'_>,
    notes_ref: &str,
    commit: &CommitId,
    text: &str,
) -> Result<(), NotesError> {
    let oid = parse_oid(commit)?;
    git(
        || format!("writing the note on {commit}"),
        repo.note(sig, sig, Some(notes_ref), oid, text, true),
    )
    .map(|_| ())
}

fn all_notes(repo: &Repository, notes_ref: &str) -> Result<BTreeMap<CommitId, String>, NotesError> {
    let mut out = BTreeMap::new();
    let iter = match repo.notes(Some(notes_ref)) {
        Ok(it) => it,
        Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(out),
        Err(e) => return git(|| format!("listing {notes_ref}"), Err(e)),
    };
    for item in iter {
        let (note_oid, commit_oid) = git(|| format!("listing {notes_ref}"), item)?;
        let blob = git(|| format!("reading note blob {note_oid}"), repo.find_blob(note_oid))?;
        out.insert(
            CommitId::new(commit_oid.to_string()),
            String::from_utf8_lossy(blob.content()).into_owned(),
        );
    }
    Ok(out)
}

fn remote_for<'r>(repo: &'r Repository, remote: &str) -> Result<git2::Remote<'r>, NotesError> {
    // A name that is no remote of the repository, and does not look like a
    // URL or path either, is a typo: say so rather than what libgit2 says.
    let url_like = remote.contains(['/', ':', '\\']);
    let r = match repo.find_remote(remote) {
        Ok(r) => Ok(r),
        Err(_) if !url_like => return Err(NotesError::NoRemote(remote.to_string())),
        Err(_) => repo.remote_anonymous(remote),
    };
    git(|| format!("opening remote {remote}"), r)
}

/// Pushes our notes ref without force. `Ok(None)` when the remote took it,
/// `Ok(Some(reason))` when it refused (someone else pushed notes first).
fn push_once(repo: &Repository, remote: &str, auth: &super::Auth) -> Result<Option<String>, NotesError> {
    let mut r = remote_for(repo, remote)?;
    let rejected = std::cell::RefCell::new(None::<String>);
    let mut cbs = super::repo::callbacks(auth.clone());
    cbs.push_update_reference(|_refname, status| {
        if let Some(msg) = status {
            *rejected.borrow_mut() = Some(msg.to_string());
        }
        Ok(())
    });
    let mut opts = git2::PushOptions::new();
    opts.remote_callbacks(cbs);
    let spec = format!("{NOTES_REF}:{NOTES_REF}");
    match r.push(&[spec.as_str()], Some(&mut opts)) {
        Ok(()) => {}
        // Local transports report a non-fast-forward as an error, not a status.
        Err(e) if e.code() == git2::ErrorCode::NotFastForward || e.message().contains("fast-forward") => {
            return Ok(Some(e.message().to_string()));
        }
        Err(e) => return git(|| format!("pushing notes to {remote}"), Err(e)),
    }
    drop(opts);
    Ok(rejected.into_inner())
}

/// Fetches the remote's notes ref into [`REMOTE_NOTES_REF`]; `false` when the
/// remote has no notes yet.
fn fetch_remote_notes(repo: &Repository, remote: &str, auth: &super::Auth) -> Result<bool, NotesError> {
    let mut r = remote_for(repo, remote)?;
    let mut opts = git2::FetchOptions::new();
    opts.remote_callbacks(super::repo::callbacks(auth.clone()));
    let spec = format!("+{NOTES_REF}:{REMOTE_NOTES_REF}");
    git(
        || format!("fetching notes from {remote}"),
        r.fetch(&[spec.as_str()], Some(&mut opts), None),
    )?;
    Ok(repo.refname_to_id(REMOTE_NOTES_REF).is_ok())
}

/// Rebuilds our notes ref on top of the remote's: start from their tip and
/// write each of `ours` that differs, so the result fast-forwards the remote,
/// ours win on the commits they are about, and every other note is the
/// remote's (a copy merged in earlier never overwrites a newer one).
fn merge_remote_notes(
    repo: &Repository,
    sig: &Signature<'_>,
    ours: &BTreeMap<CommitId, String>,
) -> Result<(), NotesError> {
    let theirs_tip = git(
        || "reading the fetched notes".into(),
        repo.refname_to_id(REMOTE_NOTES_REF),
    )?;
    let theirs = all_notes(repo, REMOTE_NOTES_REF)?;
    git(
        || "starting the notes merge".into(),
        repo.reference(MERGE_NOTES_REF, theirs_tip, true, "opamp-gitops: merge notes"),
    )?;
    for (commit, text) in ours {
        if theirs.get(commit) != Some(text) {
            put_note(repo, sig, MERGE_NOTES_REF, commit, text)?;
        }
    }
    let merged = git(
        || "reading the merged notes".into(),
        repo.refname_to_id(MERGE_NOTES_REF),
    )?;
    git(
        || "updating the notes ref".into(),
        repo.reference(NOTES_REF, merged, true, "opamp-gitops: merged notes"),
    )?;
    if let Ok(mut scratch) = repo.find_reference(MERGE_NOTES_REF) {
        // Leaving the scratch ref behind is harmless; it is overwritten next time.
        let _ = scratch.delete();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit_file(repo: &Repository, name: &str, body: &str) -> CommitId {
        let sig = Signature::now("t", "t@example.com").unwrap();
        let blob = repo.blob(body.as_bytes()).unwrap();
        let mut tb = repo.treebuilder(None).unwrap();
        tb.insert(name, blob, 0o100644).unwrap();
        let tree = repo.find_tree(tb.write().unwrap()).unwrap();
        let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        let oid = repo.commit(Some("HEAD"), &sig, &sig, "c", &tree, &parents).unwrap();
        CommitId::new(oid.to_string())
    }

    /// A bare "remote" with two commits, and two clones of it.
    fn setup() -> (tempfile::TempDir, String, CommitId, CommitId) {
        let dir = tempfile::tempdir().unwrap();
        let origin = Repository::init(dir.path().join("origin")).unwrap();
        let c1 = commit_file(&origin, "a", "1");
        let c2 = commit_file(&origin, "a", "2");
        let bare = dir.path().join("remote.git");
        Repository::init_bare(&bare).unwrap();
        let url = format!("file://{}", bare.display());
        let mut r = origin.remote_anonymous(&url).unwrap();
        r.push(&["refs/heads/master:refs/heads/master"], None).unwrap();
        for name in ["one", "two"] {
            git2::build::RepoBuilder::new()
                .bare(true)
                .clone(&url, &dir.path().join(name))
                .unwrap();
        }
        (dir, url, c1, c2)
    }

    #[test]
    fn local_write_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        let c = commit_file(&repo, "f", "x");
        let store = NotesStore::new(dir.path(), None, Author::default());
        assert_eq!(store.read(&c).unwrap(), None);
        store
            .write(&BTreeMap::from([(c.clone(), "phase: a\n".to_string())]))
            .unwrap();
        store
            .write(&BTreeMap::from([(c.clone(), "phase: b\n".to_string())]))
            .unwrap();
        assert_eq!(store.read(&c).unwrap().as_deref(), Some("phase: b\n"));
        assert_eq!(store.all().unwrap().len(), 1);
        let note = repo
            .find_note(Some(NOTES_REF), Oid::from_str(c.as_str()).unwrap())
            .unwrap();
        assert_eq!(note.author().name().ok(), Some("opamp-gitops"));
    }

    #[test]
    fn rejected_push_merges_and_keeps_both_writers_notes() {
        let (dir, url, c1, c2) = setup();
        let one = NotesStore::new(dir.path().join("one"), Some(url.clone()), Author::default());
        let two = NotesStore::new(dir.path().join("two"), Some(url.clone()), Author::default());
        one.write(&BTreeMap::from([(c1.clone(), "from one\n".to_string())]))
            .unwrap();
        // `two` has not seen one's notes: its first push is rejected, then merged.
        two.write(&BTreeMap::from([
            (c2.clone(), "from two\n".to_string()),
            (c1.clone(), "two wins on c1\n".to_string()),
        ]))
        .unwrap();

        let fresh = dir.path().join("fresh");
        let repo = git2::build::RepoBuilder::new().bare(true).clone(&url, &fresh).unwrap();
        repo.find_remote("origin")
            .unwrap()
            .fetch(&["+refs/notes/*:refs/notes/*"], None, None)
            .unwrap();
        let got = all_notes(&repo, NOTES_REF).unwrap();
        assert_eq!(got.get(&c2).map(String::as_str), Some("from two\n"));
        assert_eq!(
            got.get(&c1).map(String::as_str),
            Some("two wins on c1\n"),
            "the writer's own note wins"
        );

        // `one` writes again: rejected, merged, and c2's note from `two` survives.
        one.write(&BTreeMap::from([(c1.clone(), "one again\n".to_string())]))
            .unwrap();
        repo.find_remote("origin")
            .unwrap()
            .fetch(&["+refs/notes/*:refs/notes/*"], None, None)
            .unwrap();
        let got = all_notes(&repo, NOTES_REF).unwrap();
        assert_eq!(got.get(&c1).map(String::as_str), Some("one again\n"));
        assert_eq!(got.get(&c2).map(String::as_str), Some("from two\n"));
    }

    #[test]
    fn a_note_merged_in_earlier_never_overwrites_its_newer_version() {
        let (dir, url, c1, c2) = setup();
        let one = NotesStore::new(dir.path().join("one"), Some(url.clone()), Author::default());
        let two = NotesStore::new(dir.path().join("two"), Some(url.clone()), Author::default());
        two.write(&BTreeMap::from([(c2.clone(), "two v1\n".to_string())]))
            .unwrap();
        // `one` merges two's note on c2 into its own ref while pushing c1.
        one.write(&BTreeMap::from([(c1.clone(), "one\n".to_string())])).unwrap();
        assert_eq!(one.read(&c2).unwrap().as_deref(), Some("two v1\n"));
        // `two` updates its note; `one` pushes again, holding the old copy.
        two.write(&BTreeMap::from([(c2.clone(), "two v2\n".to_string())]))
            .unwrap();
        one.write(&BTreeMap::from([(c1.clone(), "one again\n".to_string())]))
            .unwrap();
        let fresh = NotesStore::new(dir.path().join("one"), Some(url), Author::default());
        fresh.fetch().unwrap();
        assert_eq!(fresh.read(&c2).unwrap().as_deref(), Some("two v2\n"));
        assert_eq!(fresh.read(&c1).unwrap().as_deref(), Some("one again\n"));
    }

    #[test]
    fn fetch_brings_remote_notes_for_restore() {
        let (dir, url, c1, _) = setup();
        let one = NotesStore::new(dir.path().join("one"), Some(url.clone()), Author::default());
        one.write(&BTreeMap::from([(c1.clone(), "phase: complete\n".to_string())]))
            .unwrap();
        let two = NotesStore::new(dir.path().join("two"), Some(url), Author::default());
        assert!(two.all().unwrap().is_empty());
        two.fetch().unwrap();
        assert_eq!(two.read(&c1).unwrap().as_deref(), Some("phase: complete\n"));
    }

    #[test]
    fn history_pairs_commits_with_notes() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        let c1 = commit_file(&repo, "f", "1");
        let c2 = commit_file(&repo, "f", "2");
        let store = NotesStore::new(dir.path(), None, Author::default());
        store.write(&BTreeMap::from([(c1.clone(), "n1".to_string())])).unwrap();
        let h = store.history("HEAD", 10).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!((h[0].0.id.clone(), h[0].1.clone()), (c2, None), "newest first");
        assert_eq!((h[1].0.id.clone(), h[1].1.as_deref()), (c1, Some("n1")));
        assert_eq!(h[1].0.change.subject, "c");
        assert_eq!(store.history("HEAD", 1).unwrap().len(), 1);
        assert!(matches!(store.history("nope", 1), Err(NotesError::Git { .. })));
    }

    #[test]
    fn bad_commit_id_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        Repository::init(dir.path()).unwrap();
        let store = NotesStore::new(dir.path(), None, Author::default());
        assert!(matches!(
            store.read(&CommitId::new("zz")),
            Err(NotesError::BadCommit(_))
        ));
    }
}
