//! The commits a plan compares: the desired state at a commit (read from its
//! tree, cached), the first-parent history with its notes, and the choice of
//! each group's stable config. Blocking git2 calls; `plan` is a CLI command.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::report::{Stable, StableSource};
use crate::desired::{self, DesiredState, Diagnostic, LoadErrors};
use crate::gitsrc::notes::{Author, NotesStore};
use crate::gitsrc::tree::{TreeError, TreeSource};
use crate::model::{CommitId, ConfigHash, GroupName};
use crate::notes::format::{Note, Phase};

/// How far back the first-parent walk looks for notes and valid commits.
pub const HISTORY_LIMIT: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{0}")]
    Tree(#[from] TreeError),
    #[error("{0}")]
    Source(#[from] desired::SourceError),
    #[error("{0}")]
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

    /// Resolves `rev` and loads it: `Ok(Err(diagnostics))` when it is invalid.
    pub fn load_rev(&mut self, rev: &str) -> Result<Result<Rc<DesiredState>, Vec<Diagnostic>>, HistoryError> {
        let source = TreeSource::open(&self.path, rev, self.subdir.as_deref())?;
        let commit = source.commit().clone();
        let loaded = read(&source, &commit)?;
        let ok = loaded.as_ref().ok().cloned();
        self.cache.insert(commit, ok);
        Ok(loaded)
    }

    /// The state at `commit`; `None` when it fails validation (or its
    /// subdirectory does not exist there).
    pub fn load(&mut self, commit: &CommitId) -> Result<Option<Rc<DesiredState>>, HistoryError> {
        if let Some(hit) = self.cache.get(commit) {
            return Ok(hit.clone());
        }
        let loaded = match TreeSource::open(&self.path, commit.as_str(), self.subdir.as_deref()) {
            Ok(source) => read(&source, commit)?.ok(),
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
fn read(source: &TreeSource, commit: &CommitId) -> Result<Result<Rc<DesiredState>, Vec<Diagnostic>>, HistoryError> {
    match desired::load(source, Some(commit.clone())) {
        Ok(s) => Ok(Ok(Rc::new(s))),
        Err(LoadErrors::Invalid(d)) => Ok(Err(d)),
        Err(LoadErrors::Source(e)) => Err(e.into()),
    }
}

/// The newest commit of `history` whose note says `group`'s rollout is
/// complete, with the config hash the note gives.
pub fn newest_complete<'h>(
    group: &GroupName,
    history: &'h [(CommitId, Option<Note>)],
) -> Option<(&'h CommitId, ConfigHash)> {
    history.iter().find_map(|(commit, note)| {
        let g = note.as_ref()?.groups.get(group)?;
        (g.phase == Phase::Complete).then_some((commit, g.config_hash))
    })
}

/// Each group's stable config, with warnings for notes that could not be used.
///
/// With `--base` every group's stable config is the base's. Otherwise it is
/// the one at the newest ancestor whose note says the group's rollout is
/// complete, when that commit's config hash for the group is the note's;
/// else the previous (first-parent) commit's. A group the previous state
/// lacks is new, whatever older notes say: the controller forgets a removed
/// group's rollouts.
pub fn stable_configs(
    repo: &mut Repo,
    target: &DesiredState,
    previous: Option<&DesiredState>,
    ancestors: &[(CommitId, Option<Note>)],
    base_given: bool,
    warnings: &mut Vec<String>,
) -> Result<BTreeMap<GroupName, Stable>, HistoryError> {
    let mut out = BTreeMap::new();
    let Some(previous) = previous else {
        return Ok(out);
    };
    let Some(previous_commit) = previous.commit.clone() else {
        return Ok(out);
    };
    let from = |state: &DesiredState, commit: &CommitId, name: &GroupName, source| {
        state.groups.get(name).map(|g| Stable {
            commit: commit.clone(),
            source,
            config: g.config.clone(),
            paths: g.config_paths.clone(),
        })
    };
    let fallback_source = if base_given {
        StableSource::Base
    } else {
        StableSource::FirstParent
    };
    for name in target.groups.keys() {
        let Some(fallback) = from(previous, &previous_commit, name, fallback_source) else {
            continue;
        };
        let mut chosen = fallback;
        if !base_given && let Some((commit, noted)) = newest_complete(name, ancestors) {
            match repo.load(commit)? {
                Some(loaded) => match from(&loaded, commit, name, StableSource::Note) {
                    Some(s) if s.config.hash() == noted => chosen = s,
                    found => warnings.push(format!(
                        "the note on {} says {name} completed with config {}, but that commit {}; \
                         comparing {name} with {} instead",
                        commit.short(),
                        short_hash(&noted),
                        match found {
                            Some(s) => format!("has {}", short_hash(&s.config.hash())),
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

/// The first 12 hex digits of a hash, for messages.
pub fn short_hash(h: &ConfigHash) -> String {
    let mut s = h.to_string();
    s.truncate(12);
    s
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::notes::format::{AgentCounts, NoteGroup};

    fn note(commit: &str, groups: &[(&str, Phase, u8)]) -> Note {
        Note {
            version: "v1".into(),
            commit: CommitId::new(commit),
            updated: SystemTime::UNIX_EPOCH,
            valid: true,
            errors: vec![],
            groups: groups
                .iter()
                .map(|(g, phase, h)| {
                    (
                        GroupName::new(*g),
                        NoteGroup {
                            config_hash: ConfigHash([*h; 32]),
                            phase: *phase,
                            wave: 1,
                            waves: 1,
                            agents: AgentCounts::default(),
                            failures: vec![],
                            started: None,
                            finished: None,
                            actions: vec![],
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn newest_complete_note_per_group() {
        let gw = GroupName::new("gw");
        let core = GroupName::new("core");
        let history = vec![
            (CommitId::new("c3"), Some(note("c3", &[("gw", Phase::Progressing, 3)]))),
            (CommitId::new("c2"), None),
            (
                CommitId::new("c1"),
                Some(note("c1", &[("gw", Phase::Complete, 1), ("core", Phase::Halted, 9)])),
            ),
            (CommitId::new("c0"), Some(note("c0", &[("gw", Phase::Complete, 0)]))),
        ];
        assert_eq!(
            newest_complete(&gw, &history),
            Some((&CommitId::new("c1"), ConfigHash([1; 32]))),
            "the newest complete one, not a progressing one"
        );
        assert_eq!(newest_complete(&core, &history), None, "halted is not complete");
        assert_eq!(
            newest_complete(&gw, &history[3..]),
            Some((&CommitId::new("c0"), ConfigHash([0; 32])))
        );
        assert_eq!(newest_complete(&gw, &[]), None);
    }
}
