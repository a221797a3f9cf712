//! What the notes remember of each group's rollouts: the newest one that
//! completed (its config is the group's stable config) and a newer one that
//! had not. The driver reads them back when its rollout state is gone, and
//! `plan` takes a group's stable config from them. Pure: the callers load the
//! commits the notes name.

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::format::{Note, NoteGroup};
use crate::desired::{DesiredState, Group};
use crate::model::{CommitId, ConfigHash, GroupName};
use crate::reconcile::Phase;

/// A group's rollout as one note recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub commit: CommitId,
    pub hash: ConfigHash,
    pub note: NoteGroup,
    /// When the rollout started, as far as the note tells (see [`when`]).
    pub when: SystemTime,
}

/// Per group: the newest completed rollout, and a newer one that had not
/// completed (progressing, paused or halted), if any.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Remembered {
    pub stable: Option<Found>,
    pub unfinished: Option<Found>,
}

impl Found {
    /// The group as the noted commit defines it, when its config is the one
    /// the note names: a commit whose config differs from its note is not
    /// trusted.
    pub fn group_in<'s>(&self, group: &GroupName, state: &'s DesiredState) -> Option<&'s Group> {
        state.groups.get(group).filter(|g| g.config.hash() == self.hash)
    }
}

/// Rollouts are ordered by when they started; a note without a start time
/// (written by an older controller) orders by its update time.
fn when(note: &Note, g: &NoteGroup) -> SystemTime {
    g.started.unwrap_or(note.updated)
}

/// Per group, from `notes` in any order. Of rollouts that started at the same
/// time, the one whose note comes first is taken as the newer (pass notes
/// newest commit first).
pub fn remembered<'n>(notes: impl IntoIterator<Item = &'n Note>) -> BTreeMap<GroupName, Remembered> {
    let mut out: BTreeMap<GroupName, Remembered> = BTreeMap::new();
    let newest = |slot: &mut Option<Found>, note: &Note, g: &NoteGroup| {
        let at = when(note, g);
        if slot.as_ref().is_none_or(|f| at > f.when) {
            *slot = Some(Found {
                commit: note.commit.clone(),
                hash: g.config_hash,
                note: g.clone(),
                when: at,
            });
        }
    };
    for note in notes.into_iter().filter(|n| n.valid) {
        for (name, g) in &note.groups {
            let entry = out.entry(name.clone()).or_default();
            match g.phase {
                Phase::Complete => newest(&mut entry.stable, note, g),
                Phase::Progressing | Phase::Paused | Phase::Halted => newest(&mut entry.unfinished, note, g),
                Phase::Superseded | Phase::Unchanged => {}
            }
        }
    }
    // Notes carry whole seconds: an unfinished rollout that started in the
    // same second as the completed one is taken as the newer.
    for r in out.values_mut() {
        if let (Some(s), Some(u)) = (&r.stable, &r.unfinished)
            && u.when < s.when
        {
            r.unfinished = None;
        }
    }
    out.retain(|_, r| r.stable.is_some() || r.unfinished.is_some());
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::notes::format::FORMAT_VERSION;
    use crate::reconcile::AgentCounts;

    /// A note on `commit` with one entry per group: (name, phase, hash
    /// byte, start in seconds since the epoch if known).
    fn note_on(commit: &str, updated: SystemTime, groups: &[(&str, Phase, u8, Option<u64>)]) -> Note {
        Note {
            version: FORMAT_VERSION.into(),
            commit: CommitId::new(commit),
            change: None,
            updated,
            valid: true,
            errors: vec![],
            groups: groups
                .iter()
                .map(|&(g, phase, hash, started)| {
                    (
                        GroupName::new(g),
                        NoteGroup {
                            config_hash: ConfigHash([hash; 32]),
                            phase,
                            wave: 2,
                            waves: 4,
                            agents: AgentCounts::default(),
                            failures: vec![],
                            started: started.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
                            finished: None,
                            also_failed: vec![],
                            history: vec![],
                        },
                    )
                })
                .collect(),
        }
    }

    fn note(commit: char, groups: &[(&str, Phase, u64)]) -> Note {
        let groups: Vec<_> = groups
            .iter()
            .map(|&(g, phase, started)| (g, phase, commit as u8, Some(started)))
            .collect();
        note_on(
            &commit.to_string().repeat(40),
            SystemTime::UNIX_EPOCH + Duration::from_secs(10_000),
            &groups,
        )
    }

    #[test]
    fn newest_complete_is_stable_and_a_newer_unfinished_one_resumes() {
        let notes = vec![
            note('a', &[("edge", Phase::Complete, 10), ("apps", Phase::Complete, 10)]),
            note('b', &[("edge", Phase::Complete, 20), ("apps", Phase::Unchanged, 0)]),
            note('c', &[("edge", Phase::Halted, 30), ("apps", Phase::Progressing, 5)]),
            note('e', &[("db", Phase::Complete, 50)]),
            note('f', &[("db", Phase::Progressing, 50)]),
            note('d', &[("edge", Phase::Superseded, 40)]),
        ];
        let r = remembered(&notes);
        assert_eq!(
            r[&GroupName::new("edge")].stable.as_ref().unwrap().commit,
            CommitId::new("b".repeat(40))
        );
        assert_eq!(
            r[&GroupName::new("edge")].unfinished.as_ref().unwrap().note.phase,
            Phase::Halted
        );
        // apps' progressing note started before its completed one: it is history, not a rollout to resume.
        assert_eq!(
            r[&GroupName::new("apps")].stable.as_ref().unwrap().commit,
            CommitId::new("a".repeat(40))
        );
        assert!(r[&GroupName::new("apps")].unfinished.is_none());
        // Started in the same second as the completed one: the unfinished one is newer.
        assert_eq!(
            r[&GroupName::new("db")].unfinished.as_ref().unwrap().commit,
            CommitId::new("f".repeat(40))
        );
    }

    #[test]
    fn invalid_notes_and_groups_without_rollouts_give_nothing() {
        let mut bad = note('a', &[("edge", Phase::Complete, 1)]);
        bad.valid = false;
        let r = remembered(&[bad, note('b', &[("x", Phase::Unchanged, 1)])]);
        assert!(r.is_empty());
    }

    /// Notes without start times, all updated at once, newest commit first
    /// (as `plan` reads the first-parent history).
    fn undated(commit: &str, groups: &[(&str, Phase, u8)]) -> Note {
        let groups: Vec<_> = groups.iter().map(|&(g, phase, hash)| (g, phase, hash, None)).collect();
        note_on(commit, SystemTime::UNIX_EPOCH, &groups)
    }

    #[test]
    fn newest_complete_note_per_group() {
        let gw = GroupName::new("gw");
        let core = GroupName::new("core");
        let history = vec![
            undated("c3", &[("gw", Phase::Progressing, 3)]),
            undated("c1", &[("gw", Phase::Complete, 1), ("core", Phase::Halted, 9)]),
            undated("c0", &[("gw", Phase::Complete, 0)]),
        ];
        let stable = |notes: &[Note], g: &GroupName| {
            let r = remembered(notes);
            r.get(g)
                .and_then(|r| r.stable.as_ref())
                .map(|f| (f.commit.clone(), f.hash))
        };
        assert_eq!(
            stable(&history, &gw),
            Some((CommitId::new("c1"), ConfigHash([1; 32]))),
            "the newest complete one, not a progressing one"
        );
        assert_eq!(stable(&history, &core), None, "halted is not complete");
        assert_eq!(
            stable(&history[2..], &gw),
            Some((CommitId::new("c0"), ConfigHash([0; 32])))
        );
        assert_eq!(stable(&[], &gw), None);
    }

    #[test]
    fn a_noted_group_is_trusted_only_with_the_noted_config() {
        use std::sync::Arc;

        use crate::desired::{ConfigBundle, RolloutPolicy, Selector};

        let bundle = Arc::new(ConfigBundle::new(BTreeMap::new()));
        let gw = GroupName::new("gw");
        let state = DesiredState {
            commit: Some(CommitId::new("c1")),
            groups: BTreeMap::from([(
                gw.clone(),
                Group {
                    name: gw.clone(),
                    description: String::new(),
                    priority: 0,
                    selector: Selector::default(),
                    config: bundle.clone(),
                    config_paths: BTreeMap::new(),
                    rollout: RolloutPolicy::default(),
                },
            )]),
            reconcile_interval: Duration::from_secs(300),
        };
        let found = |hash| Found {
            commit: CommitId::new("c1"),
            hash,
            note: undated("c1", &[("gw", Phase::Complete, 0)]).groups.remove(&gw).unwrap(),
            when: SystemTime::UNIX_EPOCH,
        };
        assert!(found(bundle.hash()).group_in(&gw, &state).is_some());
        assert!(found(ConfigHash([7; 32])).group_in(&gw, &state).is_none());
        assert!(
            found(bundle.hash())
                .group_in(&GroupName::new("other"), &state)
                .is_none()
        );
    }
}
