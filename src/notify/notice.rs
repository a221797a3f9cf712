//! What a notification tells: one [`Notice`] per thing that happened to a
//! group's rollout (started, wave opened, agents failed, halted, rolled
//! back, complete, superseded) or to the branch (a commit that failed
//! validation), built from a plan's events and the groups' statuses. Pure.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{Change, CommitId, GroupName};
use crate::reconcile::{AgentCounts, Event, GroupStatus};

/// Failures (and validation errors) a notice lists at most.
pub const MAX_LISTED: usize = 20;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    RolloutStarted,
    /// A wave after the first opened (the first opens with the rollout).
    WaveOpened,
    /// Agents of the opened waves failed the new config.
    AgentsFailed,
    RolloutHalted,
    /// Agents that failed a halted rollout were given the stable config back.
    RolledBack,
    RolloutComplete,
    /// A newer commit changed the group before the rollout completed.
    RolloutSuperseded,
    /// The newest commit of the branch failed validation; nothing rolls out.
    CommitInvalid,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RolloutStarted => "rollout_started",
            Kind::WaveOpened => "wave_opened",
            Kind::AgentsFailed => "agents_failed",
            Kind::RolloutHalted => "rollout_halted",
            Kind::RolledBack => "rolled_back",
            Kind::RolloutComplete => "rollout_complete",
            Kind::RolloutSuperseded => "rollout_superseded",
            Kind::CommitInvalid => "commit_invalid",
        }
    }
}

/// One agent's failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub agent: String,
    pub error: String,
}

/// One thing that happened, as receivers are told it. Fields that do not
/// apply to an event are `null` (or empty lists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The same for the same transition told again (after a crash between
    /// telling it and saving the state): receivers may drop repeats by it.
    pub id: String,
    pub event: Kind,
    pub group: Option<GroupName>,
    /// The commit the rollout delivers (for `commit_invalid`, the invalid one).
    pub commit: Option<CommitId>,
    /// Who made that commit, when known.
    pub change: Option<Change>,
    /// Waves opened so far, and waves in all.
    pub wave: Option<u32>,
    pub waves: Option<u32>,
    /// The group's agents, counted after the event.
    pub agents: Option<AgentCounts>,
    /// Agents that failed this rollout in all (rolled back or not).
    pub failed: Option<u32>,
    /// `agents_failed`: the agents that failed now; otherwise the newest
    /// failures of the rollout. At most [`MAX_LISTED`].
    pub failures: Vec<Failure>,
    /// `rolled_back`: agents given the stable config back now.
    pub rolled_back: Option<u32>,
    /// `rollout_superseded`: the commit whose rollout replaced this one.
    pub superseded_by: Option<CommitId>,
    /// `commit_invalid`: the problems, as `path:line:column: message`; at most [`MAX_LISTED`].
    pub errors: Vec<String>,
    #[serde(with = "crate::rfc3339")]
    pub time: SystemTime,
}

impl Notice {
    fn new(event: Kind, group: Option<&GroupName>, commit: Option<&CommitId>, time: SystemTime) -> Self {
        Notice {
            id: String::new(),
            event,
            group: group.cloned(),
            commit: commit.cloned(),
            change: None,
            wave: None,
            waves: None,
            agents: None,
            failed: None,
            failures: vec![],
            rolled_back: None,
            superseded_by: None,
            errors: vec![],
            time,
        }
    }

    /// Takes the wave, counts and failures of the group's status.
    fn with_status(mut self, status: &GroupStatus) -> Self {
        self.wave = Some(status.wave);
        self.waves = Some(status.waves);
        self.agents = Some(status.agents);
        self.failed = Some(status.failed);
        self.failures = status
            .failures
            .iter()
            .take(MAX_LISTED)
            .map(|f| Failure {
                agent: f.agent.to_string(),
                error: f.error.clone(),
            })
            .collect();
        self
    }

    /// Sets the id from what makes this transition this one: the event,
    /// group and commit, and `detail` (the wave, the agents that failed).
    fn identify(&mut self, detail: &str) {
        let mut hash = Sha256::new();
        for part in [
            self.event.as_str(),
            self.group.as_ref().map_or("", GroupName::as_str),
            self.commit.as_ref().map_or("", CommitId::as_str),
            detail,
        ] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        self.id = hex::encode(&hash.finalize()[..16]);
    }

    fn identified(mut self, detail: &str) -> Self {
        self.identify(detail);
        self
    }
}

/// What a plan tells the notifications.
pub struct PlanFacts<'p> {
    pub events: &'p [Event],
    /// Each group's status after the plan.
    pub groups: &'p BTreeMap<GroupName, GroupStatus>,
    /// Who made a commit, when known.
    pub change: &'p dyn Fn(&CommitId) -> Option<Change>,
    pub now: SystemTime,
}

/// The notices of a plan, in the order its events happened. A group's
/// failures of one plan are one `agents_failed`, its rollbacks one
/// `rolled_back`; the first wave is told by `rollout_started`.
pub fn from_plan(facts: &PlanFacts<'_>) -> Vec<Notice> {
    let mut out: Vec<Notice> = Vec::new();
    // Where a group's agents_failed and rolled_back of this plan are in `out`.
    let mut failed_at: BTreeMap<&GroupName, usize> = BTreeMap::new();
    let mut rolled_at: BTreeMap<&GroupName, usize> = BTreeMap::new();
    // The agents of each of those, which tell them apart.
    let mut agents_of: BTreeMap<usize, String> = BTreeMap::new();
    let status =
        |group: &GroupName, commit: Option<&CommitId>| facts.groups.get(group).filter(|s| s.commit.as_ref() == commit);
    let notice = |kind: Kind, group: &GroupName, commit: Option<&CommitId>| {
        let n = Notice::new(kind, Some(group), commit, facts.now);
        let n = match status(group, commit) {
            Some(s) => n.with_status(s),
            None => n,
        };
        Notice {
            change: commit.and_then(facts.change),
            ..n
        }
    };
    for event in facts.events {
        match event {
            Event::RolloutStarted { group, commit, .. } => {
                out.push(notice(Kind::RolloutStarted, group, commit.as_ref()).identified(""));
            }
            Event::WaveOpened {
                group, commit, wave, ..
            } if *wave > 1 => {
                let n = notice(Kind::WaveOpened, group, commit.as_ref());
                out.push(Notice { wave: Some(*wave), ..n }.identified(&wave.to_string()));
            }
            Event::AgentFailed {
                group, agent, error, ..
            } => {
                let at = *failed_at.entry(group).or_insert_with(|| {
                    let commit = facts.groups.get(group).and_then(|s| s.commit.as_ref());
                    let n = notice(Kind::AgentsFailed, group, commit);
                    out.push(Notice { failures: vec![], ..n });
                    out.len() - 1
                });
                agents_of.entry(at).or_default().push_str(&format!("{agent} "));
                let n = &mut out[at];
                if n.failures.len() < MAX_LISTED {
                    n.failures.push(Failure {
                        agent: agent.to_string(),
                        error: error.clone(),
                    });
                }
            }
            Event::Halted { group, commit, .. } => {
                out.push(notice(Kind::RolloutHalted, group, commit.as_ref()).identified(""));
            }
            Event::RolledBack { group, agent, .. } => {
                let at = *rolled_at.entry(group).or_insert_with(|| {
                    let commit = facts.groups.get(group).and_then(|s| s.commit.as_ref());
                    let n = notice(Kind::RolledBack, group, commit);
                    out.push(Notice {
                        rolled_back: Some(0),
                        ..n
                    });
                    out.len() - 1
                });
                agents_of.entry(at).or_default().push_str(&format!("{agent} "));
                let n = &mut out[at];
                n.rolled_back = n.rolled_back.map(|k| k + 1);
            }
            Event::Complete { group, commit, .. } => {
                out.push(notice(Kind::RolloutComplete, group, commit.as_ref()).identified(""));
            }
            Event::Superseded { group, commit, .. } => {
                // The group's status is the newer rollout's now: only its commit is told.
                let n = Notice {
                    change: commit.as_ref().and_then(facts.change),
                    superseded_by: facts.groups.get(group).and_then(|s| s.commit.clone()),
                    ..Notice::new(Kind::RolloutSuperseded, Some(group), commit.as_ref(), facts.now)
                };
                out.push(n.identified(""));
            }
            Event::WaveOpened { .. }
            | Event::WaveDone { .. }
            | Event::RevertPushed { .. }
            | Event::DriftHealed { .. } => {}
        }
    }
    for (at, agents) in agents_of {
        out[at].identify(&agents);
    }
    out
}

/// The notice of a commit that failed validation.
pub fn invalid(commit: &CommitId, errors: &[String], change: Option<Change>, now: SystemTime) -> Notice {
    Notice {
        change,
        errors: errors.iter().take(MAX_LISTED).cloned().collect(),
        ..Notice::new(Kind::CommitInvalid, None, Some(commit), now)
    }
    .identified("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConfigHash, InstanceUid};
    use crate::reconcile::{FailureView, Phase, Timestamp};

    fn c(n: char) -> CommitId {
        CommitId::new(n.to_string().repeat(40))
    }

    fn g(n: &str) -> GroupName {
        GroupName::new(n)
    }

    fn uid(n: u8) -> InstanceUid {
        InstanceUid::Uuid([n; 16])
    }

    fn status(commit: char, phase: Phase, wave: u32, failed: &[(u8, &str)]) -> GroupStatus {
        let n = failed.len() as u32;
        GroupStatus {
            agents: AgentCounts {
                targeted: 10,
                applied: 4,
                failed: n,
                pending: 6 - n,
                ..Default::default()
            },
            failed: n,
            failures: failed
                .iter()
                .map(|(n, e)| FailureView {
                    agent: uid(*n),
                    error: (*e).into(),
                    at: Timestamp::from_millis(1),
                })
                .collect(),
            ..GroupStatus::sample(c(commit), phase, wave, 4)
        }
    }

    fn change() -> Change {
        Change {
            author: "Ada <ada@example.com>".into(),
            committer: "Ada <ada@example.com>".into(),
            time: SystemTime::UNIX_EPOCH,
            subject: "edge: raise the batch size".into(),
        }
    }

    fn notices(events: &[Event], groups: &BTreeMap<GroupName, GroupStatus>) -> Vec<Notice> {
        let change = |commit: &CommitId| (*commit == c('a')).then(change);
        from_plan(&PlanFacts {
            events,
            groups,
            change: &change,
            now: SystemTime::UNIX_EPOCH,
        })
    }

    fn kinds(n: &[Notice]) -> Vec<Kind> {
        n.iter().map(|n| n.event).collect()
    }

    #[test]
    fn each_event_becomes_its_notice() {
        let hash = ConfigHash([1; 32]);
        let halted = BTreeMap::from([(g("edge"), status('a', Phase::Halted, 1, &[(1, "boom"), (2, "bang")]))]);
        let cases: Vec<(&str, Vec<Event>, Vec<Kind>)> = vec![
            (
                "a start tells the first wave itself",
                vec![
                    Event::RolloutStarted {
                        group: g("edge"),
                        commit: Some(c('a')),
                        hash,
                        waves: 3,
                        targeted: 10,
                    },
                    Event::WaveOpened {
                        group: g("edge"),
                        commit: Some(c('a')),
                        wave: 1,
                        agents: 1,
                    },
                ],
                vec![Kind::RolloutStarted],
            ),
            (
                "failures of one plan are one notice, then the halt and one rollback",
                vec![
                    Event::AgentFailed {
                        group: g("edge"),
                        agent: uid(1),
                        hash,
                        error: "boom".into(),
                    },
                    Event::AgentFailed {
                        group: g("edge"),
                        agent: uid(2),
                        hash,
                        error: "bang".into(),
                    },
                    Event::Halted {
                        group: g("edge"),
                        commit: Some(c('a')),
                        failures: 2,
                    },
                    Event::RolledBack {
                        group: g("edge"),
                        agent: uid(1),
                        hash,
                    },
                    Event::RolledBack {
                        group: g("edge"),
                        agent: uid(2),
                        hash,
                    },
                ],
                vec![Kind::AgentsFailed, Kind::RolloutHalted, Kind::RolledBack],
            ),
            (
                "quiet events tell nothing",
                vec![
                    Event::WaveDone {
                        group: g("edge"),
                        commit: Some(c('a')),
                        wave: 1,
                    },
                    Event::DriftHealed {
                        group: g("edge"),
                        agent: uid(1),
                        hash,
                    },
                    Event::RevertPushed {
                        group: g("edge"),
                        commit: Some(c('a')),
                        hash,
                        agents: 3,
                    },
                ],
                vec![],
            ),
        ];
        for (name, events, want) in cases {
            assert_eq!(kinds(&notices(&events, &halted)), want, "{name}");
        }
    }

    #[test]
    fn a_halt_carries_the_group_commit_author_counts_and_failures() {
        let hash = ConfigHash([1; 32]);
        let groups = BTreeMap::from([(g("edge"), status('a', Phase::Halted, 1, &[(1, "boom")]))]);
        let events = [
            Event::AgentFailed {
                group: g("edge"),
                agent: uid(1),
                hash,
                error: "boom".into(),
            },
            Event::Halted {
                group: g("edge"),
                commit: Some(c('a')),
                failures: 1,
            },
            Event::RolledBack {
                group: g("edge"),
                agent: uid(1),
                hash,
            },
        ];
        let n = notices(&events, &groups);
        for notice in &n {
            assert_eq!(notice.group, Some(g("edge")));
            assert_eq!(notice.commit, Some(c('a')));
            assert_eq!(
                notice.change.as_ref().map(|c| c.author.as_str()),
                Some("Ada <ada@example.com>")
            );
            assert_eq!((notice.wave, notice.waves, notice.failed), (Some(1), Some(3), Some(1)));
            assert_eq!(notice.agents.map(|a| a.targeted), Some(10));
            assert_eq!(notice.id.len(), 32);
        }
        assert_eq!(
            n[0].failures,
            [Failure {
                agent: uid(1).to_string(),
                error: "boom".into()
            }]
        );
        assert_eq!(n[1].failures.len(), 1, "the halt lists the rollout's failures");
        assert_eq!(n[2].rolled_back, Some(1));
        let ids: std::collections::HashSet<&str> = n.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids.len(), 3, "each notice has its own id");
        assert_eq!(
            notices(&events, &groups)
                .iter()
                .map(|n| n.id.clone())
                .collect::<Vec<_>>(),
            n.iter().map(|n| n.id.clone()).collect::<Vec<_>>(),
            "the same transition told again has the same id"
        );
    }

    #[test]
    fn failures_are_listed_at_most_twenty() {
        let hash = ConfigHash([1; 32]);
        let groups = BTreeMap::from([(g("edge"), status('a', Phase::Progressing, 1, &[]))]);
        let events: Vec<Event> = (0..30)
            .map(|n| Event::AgentFailed {
                group: g("edge"),
                agent: uid(n),
                hash,
                error: format!("error {n}"),
            })
            .collect();
        let n = notices(&events, &groups);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].failures.len(), MAX_LISTED);
        assert_eq!(n[0].failures[0].error, "error 0");
    }

    #[test]
    fn a_wave_and_a_supersession() {
        let hash = ConfigHash([1; 32]);
        let groups = BTreeMap::from([(g("edge"), status('b', Phase::Progressing, 1, &[]))]);
        let events = [
            Event::Superseded {
                group: g("edge"),
                commit: Some(c('a')),
                hash,
                by: ConfigHash([2; 32]),
            },
            Event::WaveOpened {
                group: g("edge"),
                commit: Some(c('b')),
                wave: 2,
                agents: 5,
            },
        ];
        let n = notices(&events, &groups);
        assert_eq!(kinds(&n), [Kind::RolloutSuperseded, Kind::WaveOpened]);
        assert_eq!(n[0].commit, Some(c('a')));
        assert_eq!(n[0].superseded_by, Some(c('b')));
        assert!(n[0].change.is_some(), "the superseded commit's author");
        assert_eq!(n[0].agents, None, "the counts are the newer rollout's");
        assert_eq!((n[1].wave, n[1].agents.map(|a| a.applied)), (Some(2), Some(4)));
        assert!(n[1].change.is_none(), "b's author is not known");
    }

    #[test]
    fn an_invalid_commit() {
        let errors: Vec<String> = (0..25).map(|n| format!("groups/a.yaml:{n}:1: bad")).collect();
        let n = invalid(&c('x'), &errors, Some(change()), SystemTime::UNIX_EPOCH);
        assert_eq!((n.event, n.group.as_ref()), (Kind::CommitInvalid, None));
        assert_eq!(n.errors.len(), MAX_LISTED);
        assert_eq!(n, invalid(&c('x'), &errors, Some(change()), SystemTime::UNIX_EPOCH));
    }
}
