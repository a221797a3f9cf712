//! Which notes to (re)write after a plan. Pure bookkeeping: it remembers
//! each recent commit's note and answers the notes whose group phase or wave
//! changed, so notes follow a rollout without being rewritten on every agent
//! report.

use std::collections::{BTreeMap, HashSet};
use std::time::SystemTime;

use crate::model::{CommitId, GroupName};
use crate::notes::format::{
    Change, FORMAT_VERSION, Failure, MAX_FAILURES, MAX_HISTORY, Note, NoteGroup, NoteStep, Step,
};
use crate::reconcile::{Event, GroupState, GroupStatus, Phase, Timestamp};

/// Notes of at most this many commits are kept in memory (those of rollouts
/// still shown are never dropped).
const KEEP: usize = 256;

#[derive(Default)]
pub struct NoteBook {
    notes: BTreeMap<CommitId, Entry>,
    /// Invalid commits whose note was already handed out.
    invalid: HashSet<CommitId>,
    next_seq: u64,
    /// A plan has been folded in: unfinished rollouts seen after that are
    /// not carried on from before a restart.
    planned: bool,
}

/// A note is rewritten when one of these changes: phase, wave, its history,
/// the agents that failed the rollout or are failed now, or whether the
/// group has settled (no agent still applying), so a halted rollout's note
/// ends with the counts its rollback reached.
type Moves = (Phase, u32, usize, usize, u32, bool);

fn moves(g: &NoteGroup) -> Moves {
    (
        g.phase,
        g.wave,
        g.history.len(),
        g.failures.len() + g.also_failed.len(),
        g.agents.failed,
        g.agents.applying == 0,
    )
}

struct Entry {
    note: Note,
    /// What moves a note, per group, as last handed out for writing.
    written: BTreeMap<GroupName, Moves>,
    /// Per group: the start of the rollout whose operator actions the
    /// history tells, and how many of them it tells.
    actions_told: BTreeMap<GroupName, (Option<Timestamp>, usize)>,
    /// Insertion order, for eviction.
    seq: u64,
}

impl NoteBook {
    /// Takes in the notes already in the repository, so a restarted
    /// controller rewrites them instead of replacing them with partial ones.
    /// What this book already holds stays (it is newer).
    pub fn with_existing(mut self, notes: impl IntoIterator<Item = Note>) -> Self {
        for note in notes {
            if !note.valid {
                self.invalid.insert(note.commit.clone());
                continue;
            }
            if self.notes.contains_key(&note.commit) {
                continue;
            }
            let written = note.groups.iter().map(|(g, n)| (g.clone(), moves(n))).collect();
            let seq = self.bump();
            let actions_told = BTreeMap::new();
            self.notes.insert(
                note.commit.clone(),
                Entry {
                    note,
                    written,
                    actions_told,
                    seq,
                },
            );
        }
        self
    }

    /// Who made `commit`, as its note tells.
    pub fn change(&self, commit: &CommitId) -> Option<&Change> {
        self.notes.get(commit)?.note.change.as_ref()
    }

    fn bump(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// The note for an invalid commit, once.
    pub fn invalid(&mut self, commit: &CommitId, errors: &[String], now: SystemTime) -> Option<Note> {
        if !self.invalid.insert(commit.clone()) {
            return None;
        }
        Some(Note {
            version: FORMAT_VERSION.into(),
            commit: commit.clone(),
            updated: now,
            valid: false,
            change: None,
            errors: errors.to_vec(),
            groups: BTreeMap::new(),
        })
    }

    /// Folds a plan's group statuses and events in, and answers the notes that
    /// must be written: the desired commit's when it is new, and every note
    /// whose group moved. `change` tells who made the desired commit; `states`
    /// are the groups' rollout states (for the full list of failed agents).
    pub fn after_plan(&mut self, plan: PlanFacts<'_>, now: SystemTime) -> Vec<Note> {
        let PlanFacts {
            desired,
            change,
            groups,
            events,
            states,
        } = plan;
        let entry = self.entry(desired, now);
        if entry.note.change.is_none() {
            entry.note.change = change.cloned();
        }
        let at = |t: Timestamp| time(Some(t)).unwrap_or(now);
        for (name, status) in groups {
            let rollout_commit = status.commit.as_ref();
            if rollout_commit != Some(desired) {
                let unchanged = NoteGroup {
                    config_hash: status.config_hash,
                    phase: Phase::Unchanged,
                    wave: 0,
                    waves: 0,
                    agents: status.agents,
                    failures: vec![],
                    also_failed: vec![],
                    started: None,
                    finished: None,
                    history: vec![],
                };
                self.entry(desired, now)
                    .note
                    .groups
                    .entry(name.clone())
                    .or_insert(unchanged);
            }
            let Some(commit) = rollout_commit else { continue };
            let mut group = from_status(status);
            if status.failed as usize > group.failures.len()
                && let Some(r) = states.get(name).and_then(|g| g.rollout.as_ref())
                && r.commit.as_ref() == Some(commit)
            {
                let shown: HashSet<&str> = group.failures.iter().map(|f| f.agent.as_str()).collect();
                group.also_failed = r
                    .failures
                    .keys()
                    .map(|u| u.to_string())
                    .filter(|u| !shown.contains(u.as_str()))
                    .collect();
            }
            let planned = self.planned;
            let entry = self.entry(commit, now);
            let mut history = entry
                .note
                .groups
                .get_mut(name)
                .map(|g| std::mem::take(&mut g.history))
                .unwrap_or_default();
            // Operator actions not told yet: those after the ones this
            // rollout already told (a new rollout starts the count again).
            // A note read back already tells the actions it holds.
            let read_back = !entry.actions_told.contains_key(name);
            let rollout = (status.started, 0);
            let told = entry.actions_told.entry(name.clone()).or_insert(rollout);
            if told.0 != status.started {
                *told = rollout;
            }
            for a in status.actions.iter().skip(told.1) {
                let step = NoteStep {
                    by: a.by.clone(),
                    ..NoteStep::new(a.action.into(), at(a.at))
                };
                if !(read_back && history.contains(&step)) {
                    history.push(step);
                }
            }
            told.1 = status.actions.len();
            let steps = rollout_steps(events, name, commit, now);
            let started_now = steps.iter().any(|s| s.step == Step::Started);
            history.extend(steps);
            let unfinished = matches!(status.phase, Phase::Progressing | Phase::Paused | Phase::Halted);
            if !planned && unfinished && !started_now {
                history.push(NoteStep {
                    wave: Some(status.wave),
                    ..NoteStep::new(Step::Restarted, now)
                });
            }
            history.sort_by_key(|s| s.at);
            let excess = history.len().saturating_sub(MAX_HISTORY);
            history.drain(..excess);
            group.history = history;
            entry.note.groups.insert(name.clone(), group);
        }
        for event in events {
            if let Event::Superseded {
                group,
                commit: Some(old),
                ..
            } = event
                && let Some(entry) = self.notes.get_mut(old)
                && let Some(g) = entry.note.groups.get_mut(group)
            {
                g.phase = Phase::Superseded;
                g.finished = Some(now);
                g.history.push(NoteStep::new(Step::Superseded, now));
            }
        }
        self.planned = true;
        let due = self.due(now);
        self.evict(groups);
        due
    }

    fn entry(&mut self, commit: &CommitId, now: SystemTime) -> &mut Entry {
        if !self.notes.contains_key(commit) {
            let seq = self.bump();
            let note = Note {
                version: FORMAT_VERSION.into(),
                commit: commit.clone(),
                change: None,
                updated: now,
                valid: true,
                errors: vec![],
                groups: BTreeMap::new(),
            };
            self.notes.insert(
                commit.clone(),
                Entry {
                    note,
                    written: BTreeMap::new(),
                    actions_told: BTreeMap::new(),
                    seq,
                },
            );
        }
        self.notes.get_mut(commit).expect("inserted above")
    }

    /// Notes never handed out, or with a group whose phase or wave moved.
    fn due(&mut self, now: SystemTime) -> Vec<Note> {
        let mut out = Vec::new();
        for entry in self.notes.values_mut() {
            let current: BTreeMap<GroupName, Moves> =
                entry.note.groups.iter().map(|(g, n)| (g.clone(), moves(n))).collect();
            if current != entry.written {
                entry.note.updated = now;
                entry.written = current;
                out.push(entry.note.clone());
            }
        }
        out
    }

    fn evict(&mut self, groups: &BTreeMap<GroupName, GroupStatus>) {
        if self.notes.len() <= KEEP {
            return;
        }
        let live: HashSet<&CommitId> = groups.values().filter_map(|s| s.commit.as_ref()).collect();
        let mut by_age: Vec<(u64, CommitId)> = self
            .notes
            .iter()
            .filter(|(c, _)| !live.contains(c))
            .map(|(c, e)| (e.seq, c.clone()))
            .collect();
        by_age.sort_unstable();
        let excess = self.notes.len() - KEEP;
        for (_, commit) in by_age.into_iter().take(excess) {
            self.notes.remove(&commit);
        }
    }
}

fn time(t: Option<Timestamp>) -> Option<SystemTime> {
    t.map(|t| SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(t.millis()))
}

/// The steps a plan's `events` tell of `group`'s rollout of `commit`.
fn rollout_steps(events: &[Event], group: &GroupName, commit: &CommitId, now: SystemTime) -> Vec<NoteStep> {
    let step = |step: Step, wave: Option<u32>, failed: Option<u32>| NoteStep {
        wave,
        failed,
        ..NoteStep::new(step, now)
    };
    events
        .iter()
        .filter(|e| e.group() == group && e.commit() == Some(commit))
        .filter_map(|event| match event {
            Event::RolloutStarted { .. } => Some(step(Step::Started, Some(1), None)),
            Event::WaveOpened { wave, .. } if *wave > 1 => Some(step(Step::Wave, Some(*wave), None)),
            Event::Halted { failures, .. } => Some(step(Step::Halted, None, Some(*failures))),
            Event::Complete { .. } => Some(step(Step::Complete, None, None)),
            _ => None,
        })
        .collect()
}

/// What a plan tells the notes.
pub struct PlanFacts<'p> {
    /// The commit in force.
    pub desired: &'p CommitId,
    /// Who made it.
    pub change: Option<&'p Change>,
    pub groups: &'p BTreeMap<GroupName, GroupStatus>,
    pub events: &'p [Event],
    /// Each group's rollout state.
    pub states: &'p BTreeMap<GroupName, GroupState>,
}

/// The group's note as its status shows it; the caller adds the history and
/// the failed agents the status leaves out.
fn from_status(s: &GroupStatus) -> NoteGroup {
    NoteGroup {
        config_hash: s.config_hash,
        phase: s.phase,
        wave: s.wave,
        waves: s.waves,
        agents: s.agents,
        failures: s
            .failures
            .iter()
            .take(MAX_FAILURES)
            .map(|f| Failure {
                agent: f.agent.to_string(),
                error: f.error.clone(),
            })
            .collect(),
        also_failed: vec![],
        started: time(s.started),
        finished: time(s.finished),
        history: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConfigHash, InstanceUid};
    use crate::reconcile::{Control, ControlAction, FailureView};

    fn c(n: char) -> CommitId {
        CommitId::new(n.to_string().repeat(40))
    }

    fn status(commit: char, phase: Phase, wave: u32, applied: u32) -> GroupStatus {
        GroupStatus::sample(c(commit), phase, wave, applied)
    }

    fn after(
        book: &mut NoteBook,
        desired: &CommitId,
        groups: &BTreeMap<GroupName, GroupStatus>,
        events: &[Event],
        now: SystemTime,
    ) -> Vec<Note> {
        let facts = PlanFacts {
            desired,
            change: None,
            groups,
            events,
            states: &BTreeMap::new(),
        };
        book.after_plan(facts, now)
    }

    fn g(n: &str) -> GroupName {
        GroupName::new(n)
    }

    #[test]
    fn written_on_phase_or_wave_change_not_on_counts() {
        let mut book = NoteBook::default();
        let now = SystemTime::UNIX_EPOCH;
        let mut groups = BTreeMap::from([(g("edge"), status('a', Phase::Progressing, 1, 0))]);
        let first = after(&mut book, &c('a'), &groups, &[], now);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].groups[&g("edge")].phase, Phase::Progressing);
        groups.insert(g("edge"), status('a', Phase::Progressing, 1, 1));
        assert!(
            after(&mut book, &c('a'), &groups, &[], now).is_empty(),
            "counts alone do not rewrite"
        );
        groups.insert(g("edge"), status('a', Phase::Progressing, 2, 1));
        let wave = after(&mut book, &c('a'), &groups, &[], now);
        assert_eq!(wave[0].groups[&g("edge")].wave, 2);
        let mut paused = status('a', Phase::Paused, 2, 1);
        paused.actions = vec![ControlAction {
            action: Control::Pause,
            at: Timestamp::from_millis(9_000),
            by: None,
        }];
        groups.insert(g("edge"), paused.clone());
        let p = after(&mut book, &c('a'), &groups, &[], now);
        let steps = |n: &Note| -> Vec<Step> { n.groups[&g("edge")].history.iter().map(|s| s.step).collect() };
        assert_eq!(steps(&p[0]), [Step::Restarted, Step::Pause]);
        paused.phase = Phase::Progressing;
        paused.actions.push(ControlAction {
            action: Control::Promote,
            at: Timestamp::from_millis(9_500),
            by: None,
        });
        groups.insert(g("edge"), paused);
        let p = after(&mut book, &c('a'), &groups, &[], now);
        assert_eq!(
            steps(&p[0]),
            [Step::Restarted, Step::Pause, Step::Promote],
            "each operator action is recorded in the note"
        );
        groups.insert(g("edge"), status('a', Phase::Complete, 3, 10));
        let done = after(&mut book, &c('a'), &groups, &[], now);
        assert_eq!(
            done[0].groups[&g("edge")].agents.applied,
            10,
            "the end carries the final counts"
        );
    }

    #[test]
    fn unchanged_groups_and_older_rollouts() {
        let mut book = NoteBook::default();
        let now = SystemTime::UNIX_EPOCH;
        // Commit b changes only `apps`; `edge` still rolls out a's config.
        let mut groups = BTreeMap::from([
            (g("edge"), status('a', Phase::Progressing, 1, 0)),
            (g("apps"), status('b', Phase::Progressing, 1, 0)),
        ]);
        let notes = after(&mut book, &c('b'), &groups, &[], now);
        let by_commit: BTreeMap<_, _> = notes.iter().map(|n| (n.commit.clone(), n)).collect();
        assert_eq!(by_commit[&c('b')].groups[&g("edge")].phase, Phase::Unchanged);
        assert_eq!(by_commit[&c('b')].groups[&g("apps")].phase, Phase::Progressing);
        assert_eq!(by_commit[&c('a')].groups[&g("edge")].phase, Phase::Progressing);
        assert!(!by_commit[&c('a')].groups.contains_key(&g("apps")));
        // edge's wave moves: only a's note is rewritten.
        groups.insert(g("edge"), status('a', Phase::Progressing, 2, 1));
        let notes = after(&mut book, &c('b'), &groups, &[], now);
        assert_eq!(notes.iter().map(|n| n.commit.clone()).collect::<Vec<_>>(), vec![c('a')]);
    }

    #[test]
    fn superseded_and_failures() {
        let mut book = NoteBook::default();
        let now = SystemTime::UNIX_EPOCH;
        let mut halted = status('a', Phase::Halted, 1, 0);
        halted.failures = vec![FailureView {
            agent: InstanceUid::Uuid([1; 16]),
            error: "boom".into(),
            at: Timestamp::from_millis(5),
        }];
        let groups = BTreeMap::from([(g("edge"), halted)]);
        let notes = after(&mut book, &c('a'), &groups, &[], now);
        assert_eq!(notes[0].groups[&g("edge")].failures[0].error, "boom");

        let groups = BTreeMap::from([(g("edge"), status('b', Phase::Progressing, 1, 0))]);
        let events = [Event::Superseded {
            group: g("edge"),
            commit: Some(c('a')),
            hash: ConfigHash([b'a'; 32]),
            by: ConfigHash([b'b'; 32]),
        }];
        let notes = after(&mut book, &c('b'), &groups, &events, now);
        let a = notes
            .iter()
            .find(|n| n.commit == c('a'))
            .expect("a's note is rewritten");
        assert_eq!(a.groups[&g("edge")].phase, Phase::Superseded);
    }

    #[test]
    fn invalid_commits_once_and_existing_notes_are_kept() {
        let mut book = NoteBook::default();
        let now = SystemTime::UNIX_EPOCH;
        let n = book.invalid(&c('x'), &["groups/a.yaml:1:1: bad".into()], now).unwrap();
        assert!(!n.valid && n.errors.len() == 1);
        assert!(book.invalid(&c('x'), &[], now).is_none());

        // A restarted controller knows a's note had two groups; a wave change
        // of one rewrites the note with both.
        let mut existing = NoteBook::default();
        let groups = BTreeMap::from([
            (g("edge"), status('a', Phase::Progressing, 1, 0)),
            (g("apps"), status('a', Phase::Complete, 3, 10)),
        ]);
        let notes = after(&mut existing, &c('a'), &groups, &[], now);
        let mut book = NoteBook::default();
        assert!(book.invalid(&c('x'), &[], now).is_some());
        let mut book = book.with_existing(notes);
        assert!(
            book.invalid(&c('x'), &[], now).is_none(),
            "taking in notes keeps what the book knew"
        );
        let groups = BTreeMap::from([(g("edge"), status('a', Phase::Progressing, 2, 3))]);
        let notes = after(&mut book, &c('a'), &groups, &[], now);
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].groups.contains_key(&g("apps")),
            "the other group's entry survives"
        );
    }
}
