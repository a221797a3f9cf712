//! Blocking git2 operations: reading a local repository's branch, fetching a
//! remote into a bare mirror, and loading a commit's tree. Callers run these
//! inside `spawn_blocking`.

use std::path::{Path, PathBuf};

use git2::{AutotagOption, Cred, CredentialType, Direction, FetchOptions, Oid, RemoteCallbacks, Repository};

use super::tree::TreeSource;
use super::{Auth, GitError};
use crate::desired::{self, LoadErrors, Validated};
use crate::model::{Change, CommitId};

/// The tip of the tracked branch, as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    pub branch: String,
    pub commit: CommitId,
}

/// `refs/heads/main` and `main` both name the branch `main`.
pub(crate) fn branch_name(b: &str) -> &str {
    b.strip_prefix("refs/heads/").unwrap_or(b)
}

/// Resolves the tracked branch of a repository on this machine, read in place.
/// Without a branch, follows HEAD (which must point at a branch).
pub(crate) fn read_local(path: &Path, branch: Option<&str>) -> Result<Head, GitError> {
    let repo = Repository::open(path).map_err(|source| GitError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let branch = match branch {
        Some(b) => branch_name(b).to_string(),
        None => {
            let head = repo.find_reference("HEAD").map_err(|source| GitError::Open {
                path: path.to_path_buf(),
                source,
            })?;
            match head
                .symbolic_target()
                .ok()
                .flatten()
                .and_then(|t| t.strip_prefix("refs/heads/"))
            {
                Some(b) => b.to_string(),
                None => {
                    return Err(GitError::DetachedHead {
                        repo: path.display().to_string(),
                    });
                }
            }
        }
    };
    let commit = resolve_branch(&repo, &branch, &path.display().to_string())?;
    Ok(Head { branch, commit })
}

fn resolve_branch(repo: &Repository, branch: &str, repo_name: &str) -> Result<CommitId, GitError> {
    let not_found = |_| GitError::BranchNotFound {
        branch: branch.to_string(),
        repo: repo_name.to_string(),
    };
    let reference = repo
        .find_reference(&format!("refs/heads/{branch}"))
        .map_err(not_found)?;
    let commit = reference.peel_to_commit().map_err(|source| GitError::Read {
        what: format!("branch {branch}"),
        source,
    })?;
    Ok(CommitId::new(commit.id().to_string()))
}

/// Whether the tree of `commit` has the folder `subdir`.
pub(crate) fn has_folder(repo_dir: &Path, commit: &CommitId, subdir: &Path) -> Result<bool, GitError> {
    let Some(subdir) = desired::normalize_subdir(&subdir.to_string_lossy()) else {
        return Ok(true);
    };
    with_commit(repo_dir, commit, |c| {
        Ok(c.tree()?
            .get_path(Path::new(&subdir))
            .is_ok_and(|entry| entry.kind() == Some(git2::ObjectType::Tree)))
    })
}

/// Opens the bare mirror of `url` at `dir`, creating it on first use. When
/// `url` names a repository on this machine, the mirror reads that
/// repository's objects in place (see [`share_objects`]).
fn open_mirror(dir: &Path, url: &str) -> Result<Repository, GitError> {
    let mirror_err = |source| GitError::Mirror {
        path: dir.to_path_buf(),
        source,
    };
    let io_err = |e: std::io::Error| GitError::Mirror {
        path: dir.to_path_buf(),
        source: git2::Error::from_str(&e.to_string()),
    };
    if !dir.join("HEAD").exists() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
        Repository::init_bare(dir).map_err(mirror_err)?;
    }
    if let Some(source) = local_source(url) {
        share_objects(dir, &source).map_err(io_err)?;
    }
    Repository::open_bare(dir).map_err(mirror_err)
}

/// The repository a `file://` URL names (`file:///srv/r.git`,
/// `file://localhost/srv/r.git`, percent-encoded as URLs are).
fn local_source(url: &str) -> Option<PathBuf> {
    let parsed = url::Url::parse(url).ok()?;
    (parsed.scheme() == "file")
        .then(|| parsed.to_file_path().ok())
        .flatten()
}

/// Makes the object directory of the repository at `source` an alternate of
/// the mirror's, so the mirror reads the source's objects where they are.
/// A fetch then finds every object it wants already present and only moves
/// the ref: libgit2's transport for local repositories would otherwise build
/// a pack of everything every ref of the source reaches, in memory (hundreds
/// of MiB for a repository of that size), and copy it. A source that cannot be
/// opened is left to the fetch, which reports it.
fn share_objects(mirror: &Path, source: &Path) -> std::io::Result<()> {
    let Ok(repo) = Repository::open(source) else {
        return Ok(());
    };
    let objects = repo.commondir().join("objects");
    let alternates = mirror.join("objects").join("info").join("alternates");
    let line = format!("{}\n", objects.display());
    if std::fs::read_to_string(&alternates).is_ok_and(|current| current == line) {
        return Ok(());
    }
    std::fs::create_dir_all(alternates.parent().expect("a path under objects/info"))?;
    let partial = alternates.with_extension("tmp");
    std::fs::write(&partial, line)?;
    std::fs::rename(&partial, &alternates)
}

/// Brings the mirror's copy of the tracked branch up to date with the remote
/// (forced, so a rewritten history replaces the old one) and returns its tip.
/// Without a branch, follows the remote's default branch (its HEAD). Only the
/// ref advertisement is exchanged when the branch has not moved, and only the
/// refs are read from a repository on this machine, whose objects the mirror
/// reads in place. Over the network, libgit2 streams the pack to disk and
/// indexes it there: its memory is the mapped-window and cache limits of
/// [`super::set_process_limits`] and about twice the largest object.
pub(crate) fn fetch_remote(mirror: &Path, url: &str, branch: Option<&str>, auth: &Auth) -> Result<Head, GitError> {
    let shown = redact_url(url);
    let fetch_err = |source| GitError::Fetch {
        url: shown.clone(),
        source,
    };
    let repo = open_mirror(mirror, url)?;
    let mut remote = repo.remote_anonymous(url).map_err(fetch_err)?;
    let mut conn = remote
        .connect_auth(Direction::Fetch, Some(callbacks(auth.clone())), None)
        .map_err(fetch_err)?;
    let branch = match branch {
        Some(b) => branch_name(b).to_string(),
        None => {
            let head = conn.default_branch().map_err(|source| GitError::NoDefaultBranch {
                url: shown.clone(),
                source,
            })?;
            let head = head.as_str().unwrap_or_default();
            branch_name(head).to_string()
        }
    };
    let refname = format!("refs/heads/{branch}");
    let advertised = conn
        .list()
        .map_err(fetch_err)?
        .iter()
        .find(|h| h.name() == refname)
        .map(|h| h.oid());
    let Some(oid) = advertised else {
        return Err(GitError::BranchNotFound { branch, repo: shown });
    };
    let have = repo.refname_to_id(&refname).ok();
    if have != Some(oid) || repo.find_commit(oid).is_err() {
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(callbacks(auth.clone()))
            .download_tags(AutotagOption::None)
            .update_fetchhead(false);
        conn.remote()
            .fetch(&[format!("+{refname}:{refname}")], Some(&mut opts), None)
            .map_err(fetch_err)?;
    }
    drop(conn);
    let commit = resolve_branch(&repo, &branch, &shown)?;
    Ok(Head { branch, commit })
}

/// Credentials for fetches: a token (https), a key file or the ssh agent (ssh).
/// The token file is read on each fetch so a rotated token is picked up.
/// libgit2 asks again after a rejected credential; a few tries, then give up.
pub(crate) fn callbacks(auth: Auth) -> RemoteCallbacks<'static> {
    let mut cb = RemoteCallbacks::new();
    let mut tries = 0u32;
    cb.credentials(move |_url, user_from_url, allowed| {
        tries += 1;
        if tries > 3 {
            return Err(git2::Error::from_str(
                "authentication failed: the remote rejected the credentials",
            ));
        }
        if allowed.contains(CredentialType::USERNAME) {
            return Cred::username(user_from_url.unwrap_or("git"));
        }
        if allowed.contains(CredentialType::SSH_KEY) {
            let user = user_from_url.unwrap_or("git");
            return match &auth.ssh_key_file {
                Some(key) => Cred::ssh_key(user, None, key, None),
                None => Cred::ssh_key_from_agent(user),
            };
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            let token = auth.token().map_err(|e| git2::Error::from_str(&e.to_string()))?;
            if let Some(token) = token {
                return Cred::userpass_plaintext(user_from_url.unwrap_or("x-access-token"), &token);
            }
        }
        Err(git2::Error::from_str(
            "the remote asks for credentials and none are configured \
             (--git-token-file, OPAMP_GITOPS_GIT_TOKEN or --ssh-key-file)",
        ))
    });
    cb
}

/// Loads the desired state from `commit`'s tree (under `subdir` when given).
/// An error is a failure to read git (retried later); an invalid commit is
/// rejected, with its problems' paths relative to the repository root.
pub(crate) fn load_commit(repo_dir: &Path, commit: &CommitId, subdir: Option<&Path>) -> Result<Validated, GitError> {
    let repo = Repository::open(repo_dir).map_err(|source| GitError::Open {
        path: repo_dir.to_path_buf(),
        source,
    })?;
    let oid = Oid::from_str(commit.as_str()).map_err(|source| GitError::Read {
        what: format!("commit {commit}"),
        source,
    })?;
    let subdir = subdir.and_then(|d| desired::normalize_subdir(&d.to_string_lossy()));
    // A folder the commit does not have says the controller looks in the
    // wrong place (--path), not that the commit is invalid: an error, so no
    // note records a verdict on the commit.
    let files = TreeSource::at_commit(repo, oid, subdir.as_deref()).map_err(GitError::Tree)?;
    match desired::load(&files, Some(commit.clone())) {
        Ok(state) => Ok(Validated::Valid(state)),
        // Paths relative to the repository root, as `validate` prints them.
        Err(LoadErrors::Invalid(problems)) => Ok(Validated::Invalid(
            problems.into_iter().map(|d| d.rooted(subdir.as_deref())).collect(),
        )),
        Err(LoadErrors::Source(source)) => Err(GitError::Source {
            commit: commit.clone(),
            source,
        }),
    }
}

/// Who made `commit` and what it says.
pub(crate) fn change_of(repo_dir: &Path, commit: &CommitId) -> Result<Change, GitError> {
    with_commit(repo_dir, commit, |c| Ok(change(&c)))
}

/// `f` of the commit `commit` of the repository in `repo_dir`.
fn with_commit<T>(
    repo_dir: &Path,
    commit: &CommitId,
    f: impl FnOnce(git2::Commit<'_>) -> Result<T, git2::Error>,
) -> Result<T, GitError> {
    let read = |source| GitError::Read {
        what: format!("commit {commit}"),
        source,
    };
    let repo = Repository::open(repo_dir).map_err(|source| GitError::Open {
        path: repo_dir.to_path_buf(),
        source,
    })?;
    let oid = Oid::from_str(commit.as_str()).map_err(read)?;
    repo.find_commit(oid).and_then(f).map_err(read)
}

/// Who made `c` and what it says.
pub(crate) fn change(c: &git2::Commit<'_>) -> Change {
    let who = |s: git2::Signature<'_>| {
        format!(
            "{} <{}>",
            String::from_utf8_lossy(s.name_bytes()),
            String::from_utf8_lossy(s.email_bytes())
        )
    };
    let seconds = u64::try_from(c.author().when().seconds()).unwrap_or(0);
    Change {
        author: who(c.author()),
        committer: who(c.committer()),
        time: std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds),
        subject: String::from_utf8_lossy(c.summary_bytes().unwrap_or_default()).into_owned(),
    }
}

/// Where the bare mirror of `url` lives: named after the URL, so pointing the
/// controller at another repository never mixes their refs.
pub(crate) fn mirror_dir(state_dir: &Path, url: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(url.as_bytes());
    state_dir
        .join("git")
        .join(format!("{}.git", &hex::encode(digest)[..16]))
}

/// The URL without its user-info (which may hold a token), for logs and status.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(redact_url("https://host/r.git"), "https://host/r.git");
        assert_eq!(redact_url("https://u:tok@host/r.git"), "https://***@host/r.git");
        assert_eq!(redact_url("https://tok@host/a@b"), "https://***@host/a@b");
        assert_eq!(redact_url("git@host:r.git"), "git@host:r.git");
        assert_eq!(redact_url("/srv/repo"), "/srv/repo");
    }

    #[test]
    fn branch_names() {
        assert_eq!(branch_name("refs/heads/main"), "main");
        assert_eq!(branch_name("release/1"), "release/1");
    }

    #[test]
    fn file_urls_name_local_repositories() {
        assert_eq!(local_source("file:///srv/r.git"), Some(PathBuf::from("/srv/r.git")));
        assert_eq!(
            local_source("file://localhost/srv/a%20b.git"),
            Some(PathBuf::from("/srv/a b.git"))
        );
        assert_eq!(local_source("file://elsewhere/srv/r.git"), None);
        assert_eq!(local_source("https://host/r.git"), None);
        assert_eq!(local_source("git@host:r.git"), None);
    }

    #[test]
    fn mirrors_differ_per_url() {
        let a = mirror_dir(Path::new("/s"), "file:///a");
        assert_ne!(a, mirror_dir(Path::new("/s"), "file:///b"));
        assert!(a.starts_with("/s/git"));
    }
}
