//! Where `serve`'s repository is, checked once before anything starts: a
//! mistake that no retry can heal (a path that is not a repository, an
//! unknown URL scheme, a branch or folder the repository does not have)
//! stops the controller at once with the reason, instead of leaving it
//! unready forever.

use std::path::{Path, PathBuf};

use git2::Repository;

use super::{GitConfig, GitError, RepoLocation, repo};

/// URL schemes git can fetch from.
const SCHEMES: [&str; 5] = ["file", "https", "http", "ssh", "git"];

/// Checks a URL's scheme (scp-like `user@host:path` has none).
pub(crate) fn check_url(url: &str) -> Result<(), GitError> {
    match url.split_once("://") {
        Some((scheme, _)) if !SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) => Err(GitError::Scheme {
            scheme: scheme.to_string(),
            url: repo::redact_url(url),
        }),
        _ => Ok(()),
    }
}

/// The configuration with a local repository resolved: a folder inside a
/// repository becomes that repository with the folder as `--path` (joined
/// with any `--path` given), and the branch and folder are checked to exist.
/// Remote repositories are only checked for their scheme here; the first
/// fetch tells the rest.
pub fn resolve(mut config: GitConfig) -> Result<GitConfig, GitError> {
    let path = match &config.repo {
        RepoLocation::Remote(url) => {
            check_url(url)?;
            return Ok(config);
        }
        RepoLocation::Local(path) => path.clone(),
    };
    if !path.exists() {
        return Err(GitError::NoSuchPath(path));
    }
    let (root, inside) = enclosing_repository(&path)?;
    if !inside.as_os_str().is_empty() {
        let subdir = match &config.subdir {
            Some(s) => inside.join(s),
            None => inside.clone(),
        };
        tracing::info!(
            folder = %path.display(),
            repository = %root.display(),
            path = %subdir.display(),
            "the folder is inside a repository: reading that repository with --path"
        );
        config.repo = RepoLocation::Local(root.clone());
        config.subdir = Some(subdir);
    }
    let head = repo::read_local(&root, config.branch.as_deref())?;
    if let Some(subdir) = &config.subdir
        && !repo::has_folder(&root, &head.commit, subdir)?
    {
        return Err(GitError::NoSuchFolder {
            path: subdir.clone(),
            branch: head.branch,
            commit: head.commit,
        });
    }
    Ok(config)
}

/// The repository `path` is in, and where `path` is inside its work tree
/// (empty when `path` is the repository itself).
fn enclosing_repository(path: &Path) -> Result<(PathBuf, PathBuf), GitError> {
    if Repository::open(path).is_ok() {
        return Ok((path.to_path_buf(), PathBuf::new()));
    }
    let not_a_repository = || GitError::NotARepository(path.to_path_buf());
    let repo = Repository::discover(path).map_err(|_| not_a_repository())?;
    let workdir = repo.workdir().ok_or_else(not_a_repository)?;
    let (Ok(workdir), Ok(folder)) = (workdir.canonicalize(), path.canonicalize()) else {
        return Err(not_a_repository());
    };
    let inside = folder.strip_prefix(&workdir).map_err(|_| not_a_repository())?;
    Ok((workdir.clone(), inside.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_schemes() {
        for ok in [
            "https://h/r.git",
            "HTTPS://h/r.git",
            "ssh://git@h/r.git",
            "file:///srv/r.git",
            "git@h:o/r.git",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        let e = check_url("htp://u:secret@x/y").unwrap_err().to_string();
        assert_eq!(
            e,
            "unsupported URL scheme \"htp\" in htp://***@x/y (use https://, ssh://, file://, user@host:path or a local path)"
        );
    }
}
