//! The commits a plan compares: the desired state at a commit (read from its
//! tree, cached), the first-parent history with its notes, and the choice of
//! each group's stable config. Blocking git2 calls; `plan` is a CLI command.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::report::{Baseline, BaselineSource};
use crate::desired::{self, DesiredState, Group, LoadErrors, Validated};
use crate::gitsrc::notes::{Author, NotesStore};
use crate::gitsrc::tree::{TreeError, TreeSource};
use crate::model::{CommitId, GroupName};
use crate::notes::format::Note;
use crate::notes::remembered::remembered;

/// How far back the first-parent walk looks for notes and valid commits.
pub const HISTORY_LIMIT: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Source(#[from] desired::SourceError),
    #[error(transparent)]
    Notes(#[from] crate::gitsrc::notes::NotesError),
}

/// One repository (optionally a subdirectory of it), read commit by commit.
pub struct Repo {
    path: PathBuf,
    subdir: Option<String>,
    /// `None` for a commit that failed validation.
    cache: HashMap<CommitId, Option<Rc<DesiredState>>>,
}

impl Repo {
    pub fn new(path: &Path, subdir: Option<String>) -> Self {
        Repo {
            path: path.to_path_buf(),
            subdir,
            cache: HashMap::new(),
        }
    }

    /// Resolves `rev` and loads it.
    pub fn load_rev(&mut self, rev: &str) -> Result<Validated<Rc<DesiredState>>, HistoryError> {
        let source = TreeSource::open(&self.path, rev, self.subdir.as_deref())?;
        let commit = source.commit().clone();
        let loaded = read(&source, &commit)?;
        self.cache.insert(commit, loaded.clone().valid());
        Ok(loaded)
    }

    /// The state at `commit`; `None` when it fails validation (or its
    /// subdirectory does not exist there).
    pub fn load(&mut self, commit: &CommitId) -> Result<Option<Rc<DesiredState>>, HistoryError> {
        if let Some(hit) = self.cache.get(commit) {
            return Ok(hit.clone());
        }
        let loaded = match TreeSource::open(&self.path, commit.as_str(), self.subdir.as_deref()) {
            Ok(source) => read(&source, commit)?.valid(),
            Err(TreeError::NoSuchSubdir { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        self.cache.insert(commit.clone(), loaded.clone());
        Ok(loaded)
    }

    /// `rev` and up to `limit - 1` first-parent ancestors, newest first, each
    /// with its parsed note (a note that does not parse is reported in `warnings`).
    pub fn first_parents(
        &self,
        rev: &str,
        limit: usize,
        warnings: &mut Vec<String>,
    ) -> Result<Vec<(CommitId, Option<Note>)>, HistoryError> {
        let store = NotesStore::new(&self.path, None, Author::default());
        Ok(store
            .history(rev, limit)?
            .into_iter()
            .map(|(info, text)| {
                let note = text.and_then(|t| match Note::parse(&t) {
                    Ok(n) => Some(n),
                    Err(e) => {
                        warnings.push(format!("note on {} ignored: {e}", info.id.short()));
                        None
                    }
                });
                (info.id, note)
            })
            .collect())
    }

    /// The newest valid commit of `history` (newest first).
    pub fn newest_valid(
        &mut self,
        history: &[(CommitId, Option<Note>)],
    ) -> Result<Option<Rc<DesiredState>>, HistoryError> {
        for (commit, _) in history {
            if let Some(l) = self.load(commit)? {
                return Ok(Some(l));
            }
        }
        Ok(None)
    }
}

/// Loads the state at `commit`.
fn read(source: &TreeSource, commit: &CommitId) -> Result<Validated<Rc<DesiredState>>, HistoryError> {
    match desired::load(source, Some(commit.clone())) {
        Ok(s) => Ok(Validated::Valid(Rc::new(s))),
        Err(LoadErrors::Invalid(d)) => Ok(Validated::Invalid(d)),
        Err(LoadErrors::Source(e)) => Err(e.into()),
    }
}

/// Each group's stable config, with warnings for notes that could not be used.
///
/// With `--base` every group's stable config is the base's. Otherwise it is
/// the config of the newest completed rollout the ancestors' notes remember
/// (as the controller reads them back, see [`remembered`]), when that
/// commit's config for the group is the note's; else the previous
/// (first-parent) commit's. A group the previous state
/// lacks is new, whatever older notes say: the controller forgets a removed
/// group's rollouts.
pub fn stable_configs(
    repo: &mut Repo,
    target: &DesiredState,
    previous: Option<&DesiredState>,
    ancestors: &[(CommitId, Option<Note>)],
    base_given: bool,
    warnings: &mut Vec<String>,
) -> Result<BTreeMap<GroupName, Baseline>, HistoryError> {
    let mut out = BTreeMap::new();
    let Some(previous) = previous else {
        return Ok(out);
    };
    let Some(previous_commit) = previous.commit.clone() else {
        return Ok(out);
    };
    let stable = |g: &Group, commit: &CommitId, source| Baseline {
        commit: commit.clone(),
        source,
        config: g.config.clone(),
        paths: g.config_paths.clone(),
    };
    let fallback_source = if base_given {
        BaselineSource::Base
    } else {
        BaselineSource::FirstParent
    };
    let noted = if base_given {
        BTreeMap::new()
    } else {
        // Newest commit first: of rollouts noted with the same start, the newer commit's.
        remembered(ancestors.iter().filter_map(|(_, note)| note.as_ref()))
    };
    for name in target.groups.keys() {
        let Some(before) = previous.groups.get(name) else {
            continue;
        };
        let mut chosen = stable(before, &previous_commit, fallback_source);
        if let Some(found) = noted.get(name).and_then(|r| r.stable.as_ref()) {
            let commit = &found.commit;
            match repo.load(commit)? {
                Some(loaded) => match found.group_in(name, &loaded) {
                    Some(g) => chosen = stable(g, commit, BaselineSource::Note),
                    None => warnings.push(format!(
                        "the note on {} says {name} completed with config {}, but that commit {}; \
                         comparing {name} with {} instead",
                        commit.short(),
                        found.hash.short(),
                        match loaded.groups.get(name) {
                            Some(g) => format!("has {}", g.config.hash().short()),
                            None => "has no such group".to_string(),
                        },
                        previous_commit.short()
                    )),
                },
                None => warnings.push(format!(
                    "the note on {} says {name} completed, but that commit is not valid; comparing {name} with {}",
                    commit.short(),
                    previous_commit.short()
                )),
            }
        }
        out.insert(name.clone(), chosen);
    }
    Ok(out)
}
