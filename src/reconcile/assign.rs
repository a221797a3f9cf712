//! Pass 2 of a group's plan: what each agent should run now, whether to push
//! it, and the agent's state.

use std::sync::Arc;

use super::classify::{Facts, classify};
use super::input::{AgentView, RemoteConfigState};
use super::output::{Event, Push, PushReason};
use super::plan::{GroupCtx, Out};
use super::rollout::Opened;
use super::state::{AgentMemory, GroupState, Membership, Pushed, Rollout, RolloutKind, RolloutPhase};
use crate::desired::{ConfigBundle, OnFailure};
use crate::model::{AgentState, ConfigHash};

/// How an agent is treated in pass 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Given the target once per connection; silence past apply_timeout is a failure.
    Wave,
    /// Given `should` at once, again after reconcile_interval while it runs something else.
    Sync(PushReason),
    /// Waits for its wave: keeps what it runs.
    Keep,
    /// Keeps a halted rollout's target it was given; never given it again.
    Hold,
}

/// What one agent should run and how it is treated.
struct Treatment<'b> {
    should: Option<&'b Arc<ConfigBundle>>,
    mode: Mode,
    /// Its config is decided now: it is not waiting for a wave.
    active: bool,
}

impl<'b> Treatment<'b> {
    fn new(should: Option<&'b Arc<ConfigBundle>>, mode: Mode, active: bool) -> Self {
        Treatment { should, mode, active }
    }
}

/// The group's rollout as pass 2 sees it.
pub(super) struct Current<'b> {
    stable: Option<&'b Arc<ConfigBundle>>,
    rollout: Option<&'b Rollout>,
    /// A rollout in waves that has not completed, with the waves it opened.
    rolling: Option<(&'b Rollout, Opened)>,
    rollback: bool,
}

/// What pass 2 decided for one agent.
pub(super) struct Assigned {
    /// The hash of the config it should run.
    pub desired: Option<ConfigHash>,
    pub state: AgentState,
    /// Its record changed.
    pub changed: bool,
    /// It was given the stable config back in a revert.
    pub reverted: bool,
}

impl GroupCtx<'_> {
    /// The group's rollout as pass 2 sees it.
    pub(super) fn current<'b>(&self, gs: &'b GroupState) -> Current<'b> {
        let rollout = gs.rollout.as_ref();
        Current {
            stable: gs.stable.as_ref().map(|s| &s.bundle),
            rollout,
            rolling: rollout
                .filter(|r| r.kind == RolloutKind::Waves && r.phase != RolloutPhase::Complete)
                .map(|r| (r, Opened::of(r, self.name()))),
            rollback: self.group.rollout.on_failure == OnFailure::Rollback,
        }
    }

    /// Pass 2 for one agent of the group: what it should run, whether to
    /// push it (into `out`), its state; updates its `record` (`None`:
    /// nothing worth keeping).
    pub(super) fn assign_one(
        &self,
        a: &AgentView,
        record: &mut Option<AgentMemory>,
        rank: Option<u32>,
        current: &Current<'_>,
        out: &mut Out,
    ) -> Assigned {
        let rolling = current.rolling.as_ref().map(|(r, _)| *r);
        let had = record.is_some();
        let rec = record.get_or_insert_with(AgentMemory::default);
        let t = self.treatment(a, rec, rank, current);
        let member = rolling.and_then(|r| rank.map(|rank| Membership { rollout: r.id, rank }));
        let mut changed = rec.member != member;
        rec.member = member;
        if let Some(rs) = &a.remote
            && let Some(h) = rs.hash
        {
            changed |= rec.note_report(h, rs.status);
        }
        let sh = t.should.map(|b| b.hash());
        if let Some(h) = sh {
            changed |= self.watch_if_applying_unasked(a, rec, h, t.mode);
        }
        let mut reverted = false;
        let pushed = match (t.should, sh) {
            (Some(bundle), Some(h)) if self.should_push(a, rec, h, t.mode) => {
                rec.pushed = Some(Pushed {
                    hash: h,
                    at: self.now,
                    epoch: a.connection_epoch,
                    observed: false,
                });
                changed = true;
                let reason = match t.mode {
                    Mode::Sync(r) => r,
                    _ => PushReason::Wave,
                };
                reverted = reason == PushReason::Revert;
                self.push(a, bundle, reason, rolling.is_some(), out);
                true
            }
            _ => false,
        };
        let state = classify(self.facts(a, rec, &t, rolling, pushed));
        if rec.is_empty() {
            // Nothing worth keeping.
            *record = None;
            changed = had;
        } else if !had {
            changed = true;
        }
        Assigned {
            desired: sh,
            state,
            changed,
            reverted,
        }
    }

    /// Tells that `agents` were given the stable config back in a revert.
    pub(super) fn reverted(&self, gs: &GroupState, agents: u32, out: &mut Out) {
        if agents > 0
            && let Some(r) = &gs.rollout
        {
            out.events.push(Event::RevertPushed {
                group: self.name().clone(),
                commit: r.commit.clone(),
                hash: r.target.hash(),
                agents,
            });
        }
    }

    /// What an agent's state is decided from, once pass 2 has dealt with it.
    fn facts(
        &self,
        a: &AgentView,
        rec: &AgentMemory,
        t: &Treatment<'_>,
        rolling: Option<&Rollout>,
        pushed: bool,
    ) -> Facts {
        let sh = t.should.map(|b| b.hash());
        // An agent given stable back that runs it well is in sync again;
        // its failure stays in the rollout's list. (One that timed out was
        // given nothing back: its old report proves nothing.) After a
        // rebuild from the notes nothing was given back yet: one known to
        // have failed the target that runs stable well was rolled back.
        let failed_target = rolling.is_some_and(|r| rec.failed == Some(r.target.hash()));
        let rolled_back = t.mode == Mode::Sync(PushReason::Rollback)
            && sh.is_some_and(|h| {
                a.good(h) && (failed_target || rec.pushed.is_some_and(|p| p.hash == h && !p.observed))
            });
        let failed_rollout = t.active && !rolled_back && rolling.is_some_and(|r| r.failures.contains_key(&a.uid));
        Facts {
            connected: a.connected,
            failed: failed_rollout || sh.is_some_and(|h| rec.has_failed(h) || self.unhealthy_after_applying(a, h)),
            waiting: !t.active || t.mode == Mode::Keep || sh.is_none(),
            reports: sh.and_then(|h| a.reports(h)),
            unhealthy: a.reports_health && a.healthy == Some(false),
            given: pushed
                || sh.is_some_and(|h| {
                    rec.pushed
                        .is_some_and(|p| p.hash == h && p.epoch == a.connection_epoch && !p.observed)
                }),
        }
    }

    /// What an agent of the group should run: during a rollout in waves the
    /// target in the opened waves, stable for the others; otherwise the last
    /// rollout's target, or stable when there never was one. A halted
    /// rollout gives its target to nobody: its failed agents get stable back
    /// (when it rolls back), agents that run the target or were given it on
    /// this connection keep it, and the rest of its opened waves get stable.
    fn treatment<'b>(&self, a: &AgentView, rec: &AgentMemory, rank: Option<u32>, c: &Current<'b>) -> Treatment<'b> {
        let Some((r, opened)) = &c.rolling else {
            return match c.rollout {
                Some(r) if r.kind == RolloutKind::Revert && r.phase == RolloutPhase::Progressing => {
                    Treatment::new(Some(&r.target), Mode::Sync(PushReason::Revert), true)
                }
                Some(r) => Treatment::new(Some(&r.target), Mode::Sync(PushReason::Sync), true),
                None => Treatment::new(c.stable, Mode::Sync(PushReason::Sync), true),
            };
        };
        let (in_opened, _) = opened.place(self.name(), &a.uid, rank);
        if in_opened && r.phase == RolloutPhase::Halted {
            let th = r.target.hash();
            let failed = r.failures.contains_key(&a.uid);
            let has_target = a.reports(th).is_some()
                || rec
                    .pushed
                    .is_some_and(|p| p.hash == th && p.epoch == a.connection_epoch);
            return match c.stable {
                Some(s) if failed && c.rollback => Treatment::new(Some(s), Mode::Sync(PushReason::Rollback), true),
                None if failed && c.rollback => Treatment::new(None, Mode::Keep, true),
                _ if failed || has_target => Treatment::new(Some(&r.target), Mode::Hold, true),
                stable => Treatment::new(stable, Mode::Sync(PushReason::Sync), true),
            };
        }
        if in_opened {
            Treatment::new(Some(&r.target), Mode::Wave, true)
        } else if rank.is_some() {
            Treatment::new(c.stable, Mode::Keep, false)
        } else {
            Treatment::new(c.stable, Mode::Sync(PushReason::Sync), false)
        }
    }

    /// An agent applying what it should on a connection where it was not
    /// given it (a restarted supervisor, a lost report) is watched for
    /// apply_timeout, then given it once more (see `should_push`). The watch
    /// runs from the push or the first sighting on an earlier connection, so
    /// reconnecting does not put it off.
    fn watch_if_applying_unasked(&self, a: &AgentView, rec: &mut AgentMemory, h: ConfigHash, mode: Mode) -> bool {
        let watch = !matches!(mode, Mode::Keep | Mode::Hold)
            && a.connected
            && matches!(
                a.reports(h),
                Some(RemoteConfigState::Applying | RemoteConfigState::Unset)
            )
            && rec.pushed.is_none_or(|p| p.hash != h || p.epoch != a.connection_epoch);
        if watch {
            let since = rec.pushed.filter(|p| p.hash == h).map_or(self.now, |p| p.at);
            rec.pushed = Some(Pushed {
                hash: h,
                at: since,
                epoch: a.connection_epoch,
                observed: true,
            });
        }
        watch
    }

    /// Sends `bundle` to `a`, with the event its reason calls for (a revert
    /// is counted by the caller and told once for the group).
    fn push(&self, a: &AgentView, bundle: &Arc<ConfigBundle>, reason: PushReason, rolling: bool, out: &mut Out) {
        let h = bundle.hash();
        match reason {
            PushReason::Rollback => out.events.push(Event::RolledBack {
                group: self.name().clone(),
                agent: a.uid.clone(),
                hash: h,
            }),
            PushReason::Sync if !rolling && a.remote.as_ref().is_some_and(|r| r.hash.is_some_and(|x| x != h)) => {
                out.events.push(Event::DriftHealed {
                    group: self.name().clone(),
                    agent: a.uid.clone(),
                    hash: h,
                })
            }
            _ => {}
        }
        out.pushes.push(Push {
            uid: a.uid.clone(),
            group: self.name().clone(),
            bundle: Arc::clone(bundle),
            reason,
        });
    }

    fn should_push(&self, a: &AgentView, rec: &AgentMemory, h: ConfigHash, mode: Mode) -> bool {
        if !a.connected || rec.has_failed(h) || matches!(mode, Mode::Keep | Mode::Hold) {
            return false;
        }
        let same_connection = rec.pushed.filter(|p| p.hash == h && p.epoch == a.connection_epoch);
        match (a.reports(h), same_connection) {
            // It has reached a verdict on this hash.
            (Some(RemoteConfigState::Applied | RemoteConfigState::Failed), _) => false,
            // Watched while it applies: once more when the watch runs out (a
            // supervisor answers a hash it already has at once).
            (Some(_), Some(p)) => p.observed && self.reached(p.at, self.group.rollout.apply_timeout),
            // Cannot happen: a watch is set above for exactly this case.
            (Some(_), None) => false,
            (None, None) => true,
            (None, Some(p)) => match mode {
                Mode::Wave => p.observed,
                _ => p.observed || self.reached(p.at, self.reconcile_interval),
            },
        }
    }
}
