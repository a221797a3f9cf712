//! Reading the notes for what each group last reached, when the rollout state
//! is gone. Pure: the driver loads the configs these commits name.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::model::{CommitId, ConfigHash, GroupName};
use crate::notes::format::{Note, NoteGroup};
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

/// Rollouts are ordered by when they started; a note without a start time
/// (written by an older controller) orders by its update time.
fn when(note: &Note, g: &NoteGroup) -> SystemTime {
    g.started.unwrap_or(note.updated)
}

pub fn remembered(notes: &[Note]) -> BTreeMap<GroupName, Remembered> {
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
    for note in notes.iter().filter(|n| n.valid) {
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

    fn note(commit: char, groups: &[(&str, Phase, u64)]) -> Note {
        Note {
            version: FORMAT_VERSION.into(),
            commit: CommitId::new(commit.to_string().repeat(40)),
            updated: SystemTime::UNIX_EPOCH + Duration::from_secs(10_000),
            valid: true,
            errors: vec![],
            groups: groups
                .iter()
                .map(|(g, phase, started)| {
                    (
                        GroupName::new(*g),
                        NoteGroup {
                            config_hash: ConfigHash([commit as u8; 32]),
                            phase: *phase,
                            wave: 2,
                            waves: 4,
                            agents: AgentCounts::default(),
                            failures: vec![],
                            started: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(*started)),
                            finished: None,
                            actions: vec![],
                        },
                    )
                })
                .collect(),
        }
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
}
