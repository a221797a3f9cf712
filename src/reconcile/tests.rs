//! Table and scenario tests of `plan`, one named case per rollout rule, built
//! with small fixture builders; multi-step scenarios feed each plan's state
//! into the next call with an advancing clock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::desired::{Amount, ConfigBundle, ConfigFile, DesiredState, Group, OnFailure, RolloutPolicy, Selector};
use crate::model::{AgentState, CommitId, ConfigHash, GroupName, InstanceUid};

mod props;

// ---------- fixtures ----------

pub(super) fn config(body: &str) -> Arc<ConfigBundle> {
    Arc::new(ConfigBundle::new(BTreeMap::from([(
        String::new(),
        ConfigFile {
            content_type: "text/yaml".into(),
            body: Bytes::copy_from_slice(body.as_bytes()),
        },
    )])))
}

pub(super) fn uid(name: &str) -> InstanceUid {
    let mut b = [0u8; 16];
    let n = name.len().min(16);
    b[..n].copy_from_slice(&name.as_bytes()[..n]);
    InstanceUid::Uuid(b)
}

pub(super) fn gname(s: &str) -> GroupName {
    GroupName::new(s)
}

pub(super) fn t(secs: u64) -> Timestamp {
    Timestamp::from_millis(secs * 1000)
}

/// A connected agent that accepts remote config, reports health and is healthy.
pub(super) fn agent(name: &str) -> AgentView {
    AgentView {
        uid: uid(name),
        attributes: Arc::default(),
        accepts_remote_config: true,
        reports_remote_config: true,
        reports_health: true,
        connected: true,
        connection_epoch: 1,
        disconnected_at: None,
        remote: None,
        healthy: Some(true),
        health_error: String::new(),
        unhealthy_since: None,
        delivered: None,
        push_drops: None,
        groups_allowed: None,
    }
}

pub(super) trait AgentFx: Sized {
    fn attrs(self, kv: &[(&str, &str)]) -> Self;
    fn reports(self, b: &Arc<ConfigBundle>) -> Self;
    fn applied(self) -> Self;
    fn applying(self) -> Self;
    fn failed(self, error: &str) -> Self;
    fn healthy(self) -> Self;
    fn unhealthy(self, error: &str) -> Self;
    /// Unhealthy since `since` (as the fleet counts it).
    fn unhealthy_since(self, since: Timestamp, error: &str) -> Self;
    /// Back on a new connection `epoch`, nothing delivered on it yet.
    fn reconnected(self, epoch: u64) -> Self;
    fn no_health(self) -> Self;
    fn unsupported(self) -> Self;
    fn offline(self, since: Option<Timestamp>) -> Self;
}

impl AgentFx for AgentView {
    fn attrs(mut self, kv: &[(&str, &str)]) -> Self {
        let mut m = (*self.attributes).clone();
        m.identifying = m.identifying.iter().chain(kv.iter().copied()).collect();
        self.attributes = Arc::new(m);
        self
    }
    fn reports(mut self, b: &Arc<ConfigBundle>) -> Self {
        self.remote = Some(StatusView {
            hash: Some(b.hash()),
            status: RemoteConfigState::Unset,
            error: String::new(),
        });
        self
    }
    fn applied(self) -> Self {
        self.status(RemoteConfigState::Applied, "")
    }
    fn applying(self) -> Self {
        self.status(RemoteConfigState::Applying, "")
    }
    fn failed(self, error: &str) -> Self {
        self.status(RemoteConfigState::Failed, error)
    }
    fn healthy(mut self) -> Self {
        self.healthy = Some(true);
        self.health_error.clear();
        self
    }
    fn unhealthy(mut self, error: &str) -> Self {
        self.healthy = Some(false);
        self.health_error = error.into();
        self
    }
    fn unhealthy_since(mut self, since: Timestamp, error: &str) -> Self {
        self.unhealthy_since = Some(since);
        self.unhealthy(error)
    }
    fn reconnected(mut self, epoch: u64) -> Self {
        self.connected = true;
        self.disconnected_at = None;
        self.connection_epoch = epoch;
        self.delivered = None;
        self
    }
    fn no_health(mut self) -> Self {
        self.reports_health = false;
        self.healthy = None;
        self
    }
    fn unsupported(mut self) -> Self {
        self.accepts_remote_config = false;
        self
    }
    fn offline(mut self, since: Option<Timestamp>) -> Self {
        self.connected = false;
        self.disconnected_at = since;
        self
    }
}

trait StatusFx {
    fn status(self, s: RemoteConfigState, error: &str) -> Self;
}

impl StatusFx for AgentView {
    fn status(mut self, s: RemoteConfigState, error: &str) -> Self {
        let r = self.remote.get_or_insert(StatusView {
            hash: None,
            status: RemoteConfigState::Unset,
            error: String::new(),
        });
        r.status = s;
        r.error = error.into();
        self
    }
}

pub(super) struct Repo {
    groups: Vec<Group>,
    commit: Option<CommitId>,
    interval: Duration,
}

pub(super) fn repo() -> Repo {
    Repo {
        groups: Vec::new(),
        commit: Some(CommitId::new("c1")),
        interval: Duration::from_secs(300),
    }
}

pub(super) fn parse_waves(s: &str) -> Vec<Amount> {
    s.split(',')
        .map(|w| {
            let w = w.trim();
            match w.strip_suffix('%') {
                Some(p) => Amount::Percent(p.parse().expect("percent")),
                None => Amount::Count(w.parse().expect("count")),
            }
        })
        .collect()
}

impl Repo {
    /// Starts a catch-all group with the default policy and config "v1".
    pub(super) fn group(mut self, name: &str) -> Self {
        self.groups.push(Group {
            name: gname(name),
            description: String::new(),
            priority: 0,
            selector: Selector::default(),
            config: config("v1"),
            config_paths: BTreeMap::new(),
            rollout: RolloutPolicy::default(),
        });
        self
    }
    fn last(&mut self) -> &mut Group {
        self.groups.last_mut().expect("group() first")
    }
    pub(super) fn waves(mut self, w: &str) -> Self {
        self.last().rollout.waves = parse_waves(w);
        self
    }
    pub(super) fn config(mut self, b: &Arc<ConfigBundle>) -> Self {
        self.last().config = Arc::clone(b);
        self
    }
    pub(super) fn priority(mut self, p: i64) -> Self {
        self.last().priority = p;
        self
    }
    pub(super) fn select(mut self, k: &str, v: &str) -> Self {
        self.last().selector.match_attributes.insert(k.into(), v.into());
        self
    }
    fn uids(mut self, names: &[&str]) -> Self {
        self.last().selector.instance_uids = names.iter().map(|n| uid(n)).collect();
        self
    }
    pub(super) fn bake(mut self, secs: u64) -> Self {
        self.last().rollout.bake = Duration::from_secs(secs);
        self
    }
    pub(super) fn apply_timeout(mut self, secs: u64) -> Self {
        self.last().rollout.apply_timeout = Duration::from_secs(secs);
        self
    }
    pub(super) fn max_failures(mut self, a: Amount) -> Self {
        self.last().rollout.max_failures = a;
        self
    }
    pub(super) fn on_failure(mut self, f: OnFailure) -> Self {
        self.last().rollout.on_failure = f;
        self
    }
    pub(super) fn commit(mut self, c: &str) -> Self {
        self.commit = Some(CommitId::new(c));
        self
    }
    pub(super) fn interval(mut self, secs: u64) -> Self {
        self.interval = Duration::from_secs(secs);
        self
    }
    pub(super) fn build(self) -> DesiredState {
        DesiredState {
            commit: self.commit,
            groups: self.groups.into_iter().map(|g| (g.name.clone(), g)).collect(),
            reconcile_interval: self.interval,
        }
    }
}

/// A fleet, a desired state and the controller's rollout state over time.
/// Pushes reach agents at once (as over WebSocket), except those of agents
/// in `polling`, which wait for [`World::poll`] (plain HTTP).
pub(super) struct World {
    pub desired: DesiredState,
    pub agents: Vec<AgentView>,
    pub state: RolloutState,
    pub now: Timestamp,
    pub polling: BTreeSet<InstanceUid>,
    /// Pushes not yet fetched by polling agents.
    queued: BTreeMap<InstanceUid, ConfigHash>,
    /// Plans incrementally beside [`plan`]: each of its plans must decide
    /// exactly what `plan` does.
    shadow: Planner,
    /// The fleet and desired state the shadow last planned.
    shadowed: Option<(Vec<AgentView>, DesiredState)>,
    /// Plans the shadow made as updates.
    pub updates: usize,
    /// Plans the shadow made over the last plan's fleet, with the agents that came.
    pub replans_with_new: usize,
}

impl World {
    pub(super) fn new(desired: DesiredState, agents: Vec<AgentView>) -> Self {
        World {
            desired,
            agents,
            state: RolloutState::default(),
            now: t(1_000),
            polling: BTreeSet::new(),
            queued: BTreeMap::new(),
            shadow: Planner::default(),
            shadowed: None,
            updates: 0,
            replans_with_new: 0,
        }
    }

    /// Pauses, resumes or promotes a group's rollout, as the driver does.
    pub(super) fn control(&mut self, group: &GroupName, action: Control) -> Result<(), ControlError> {
        let done = match action {
            Control::Pause => self.state.pause(group, self.now, None),
            Control::Resume => self.state.resume(group, self.now, None),
            Control::Promote => self.state.promote(group, self.now, None),
        };
        assert_eq!(self.shadow.control(group, action, self.now, None), done);
        done
    }

    /// Plans with the shadow planner: an update when only agents changed.
    fn shadow_plan(&mut self) -> Step {
        if self.shadow.state() != self.state {
            // The state was set from outside (read back from disk).
            self.shadow = Planner::new(self.state.clone());
            self.shadowed = None;
        }
        // The last fleet, in its order, with agents that changed or came in between.
        let known = self.shadowed.as_ref().and_then(|(agents, desired)| {
            let mut last = agents.iter().peekable();
            let mut changed = Vec::new();
            let mut new = 0;
            for b in &self.agents {
                match last.next_if(|a| a.uid == b.uid) {
                    Some(a) if a == b => {}
                    Some(_) => changed.push(b.clone()),
                    None if agents.iter().all(|a| a.uid != b.uid) => {
                        changed.push(b.clone());
                        new += 1;
                    }
                    None => return None,
                }
            }
            // The planner places agents that come in uid order.
            let placed = new == 0 || self.agents.is_sorted_by(|a, b| a.uid < b.uid);
            (last.peek().is_none() && placed).then_some((changed, desired, new))
        });
        let step = match known {
            Some((changed, desired, new)) => {
                let update = match *desired == self.desired {
                    true => self.shadow.update(&self.desired, &changed, self.now),
                    false => None,
                };
                self.updates += usize::from(update.is_some());
                let step = update.or_else(|| self.shadow.replan(&self.desired, &changed, self.now));
                self.replans_with_new += usize::from(new > 0 && step.is_some());
                step
            }
            None => None,
        };
        self.shadowed = Some((self.agents.clone(), self.desired.clone()));
        step.unwrap_or_else(|| self.shadow.full(&self.desired, self.agents.clone(), self.now))
    }

    /// Plans and keeps the next state, as the driver does; pushes are
    /// delivered (or queued for polling agents).
    pub(super) fn plan(&mut self) -> Plan {
        let p = plan(&PlanInput {
            desired: &self.desired,
            agents: &self.agents,
            state: &self.state,
            now: self.now,
        });
        let step = self.shadow_plan();
        assert_eq!(step.pushes, p.pushes, "pushes");
        assert_eq!(step.events, p.events, "events");
        assert_eq!(step.next, p.next, "next");
        assert_eq!(self.shadow.state(), p.state, "state");
        assert_eq!(step.changed, p.state != self.state, "state changed");
        assert_eq!(self.shadow.statuses(), &p.groups, "statuses");
        assert!(self.shadow.assignments().iter().eq(p.agents.iter()), "assignments");
        let mut by_state = BTreeMap::new();
        for a in &p.agents {
            *by_state.entry(a.state).or_insert(0u64) += 1;
        }
        assert_eq!(self.shadow.agents_by_state(), &by_state, "agents by state");
        self.state = p.state.clone();
        let now = self.now;
        for push in &p.pushes {
            if self.polling.contains(&push.uid) {
                self.queued.insert(push.uid.clone(), push.bundle.hash());
            } else {
                self.set(&push.uid, |mut a| {
                    a.delivered = Some((push.bundle.hash(), now));
                    a
                });
            }
        }
        p
    }

    /// A polling agent's request: the reply carries its queued push.
    pub(super) fn poll(&mut self, uid: &InstanceUid) {
        if let Some(h) = self.queued.remove(uid) {
            let now = self.now;
            self.set(uid, |mut a| {
                a.delivered = Some((h, now));
                a
            });
        }
    }

    pub(super) fn advance(&mut self, secs: u64) {
        self.now = Timestamp::from_millis(self.now.millis() + secs * 1000);
    }

    /// Changes one agent with the fixture builders: `w.set(&u, |a| a.applied())`.
    pub(super) fn set(&mut self, uid: &InstanceUid, f: impl FnOnce(AgentView) -> AgentView) {
        let a = self.agents.iter_mut().find(|a| &a.uid == uid).expect("known agent");
        *a = f(a.clone());
    }

    /// Every pushed agent reports APPLIED (and healthy) for what it was given.
    pub(super) fn apply(&mut self, p: &Plan) {
        for push in &p.pushes {
            let a = self
                .agents
                .iter_mut()
                .find(|a| a.uid == push.uid)
                .expect("pushed agent exists");
            *a = a.clone().reports(&push.bundle).applied().healthy();
        }
    }

    /// Plans, applies the pushes, and plans again after `secs`, until the
    /// group's rollout is no longer progressing (at most `max` rounds).
    pub(super) fn run(&mut self, group: &str, secs: u64, max: usize) -> Plan {
        let mut p = self.plan();
        for _ in 0..max {
            if p.groups[&gname(group)].phase != Phase::Progressing {
                break;
            }
            self.apply(&p);
            self.advance(secs);
            p = self.plan();
        }
        p
    }
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("a{i:02}")).collect()
}

fn fleet(n: usize, b: &Arc<ConfigBundle>) -> Vec<AgentView> {
    names(n).iter().map(|n| agent(n).reports(b).applied()).collect()
}

fn pushed(p: &Plan) -> BTreeSet<InstanceUid> {
    p.pushes.iter().map(|p| p.uid.clone()).collect()
}

fn order(group: &str, n: usize) -> Vec<InstanceUid> {
    canary_order(&gname(group), names(n).iter().map(|n| uid(n)).collect())
}

fn set(uids: &[InstanceUid]) -> BTreeSet<InstanceUid> {
    uids.iter().cloned().collect()
}

/// A world where group "gw" completed a rollout of v1 to `n` agents and now
/// has v2 as its desired config (commit c2).
fn stable_then(n: usize, v1: &Arc<ConfigBundle>, v2: &Arc<ConfigBundle>, tune: impl Fn(Repo) -> Repo) -> World {
    let mut w = World::new(tune(repo().group("gw").config(v1)).build(), fleet(n, v1));
    let p = w.run("gw", 120, 20);
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Complete);
    assert!(p.pushes.is_empty(), "the fleet already ran v1");
    w.desired = tune(repo().commit("c2").group("gw").config(v2)).build();
    w
}

// ---------- group matching ----------

#[test]
fn matching_by_selector_priority_and_name_tie_break() {
    let desired = repo()
        .group("all") // catch-all, priority 0
        .group("gw")
        .select("svc", "gw")
        .priority(10)
        .group("gw-prod")
        .select("svc", "gw")
        .select("env", "prod")
        .priority(20)
        .group("b-overlap")
        .select("zone", "z1")
        .priority(5)
        .group("a-overlap")
        .select("region", "r1")
        .priority(5)
        .group("pinned")
        .uids(&["pin"])
        .priority(30)
        .build();
    let cases: &[(&str, AgentView, Option<&str>)] = &[
        ("catch-all gets the rest", agent("x"), Some("all")),
        ("selector match", agent("g").attrs(&[("svc", "gw")]), Some("gw")),
        (
            "higher priority wins",
            agent("p").attrs(&[("svc", "gw"), ("env", "prod")]),
            Some("gw-prod"),
        ),
        (
            "equal priority: the name that sorts first wins",
            agent("o").attrs(&[("zone", "z1"), ("region", "r1")]),
            Some("a-overlap"),
        ),
        (
            "explicit uid list",
            agent("pin").attrs(&[("svc", "gw")]),
            Some("pinned"),
        ),
    ];
    let agents: Vec<AgentView> = cases.iter().map(|c| c.1.clone()).collect();
    let p = plan(&PlanInput {
        desired: &desired,
        agents: &agents,
        state: &RolloutState::default(),
        now: t(1),
    });
    for (i, (name, _, want)) in cases.iter().enumerate() {
        assert_eq!(p.agents[i].group, want.map(gname), "{name}");
    }

    let no_catch_all = repo().group("gw").select("svc", "gw").build();
    let agents = vec![agent("x").attrs(&[("svc", "other")])];
    let p = plan(&PlanInput {
        desired: &no_catch_all,
        agents: &agents,
        state: &RolloutState::default(),
        now: t(1),
    });
    assert_eq!(p.agents[0].group, None, "no group matches: unmanaged");
    assert_eq!(p.agents[0].state, AgentState::Unmanaged);
}

#[test]
fn unmanaged_and_unsupported_are_listed_never_pushed() {
    let v1 = config("v1");
    let mut w = World::new(
        repo().group("gw").select("svc", "gw").waves("100%").config(&v1).build(),
        vec![
            agent("m").attrs(&[("svc", "gw")]),
            agent("u").attrs(&[("svc", "other")]),
            agent("s").attrs(&[("svc", "gw")]).unsupported(),
        ],
    );
    let p = w.plan();
    assert_eq!(pushed(&p), set(&[uid("m")]));
    let u = p.agent(&uid("u")).unwrap();
    assert_eq!((u.group.clone(), u.state), (None, AgentState::Unmanaged));
    let s = p.agent(&uid("s")).unwrap();
    assert_eq!((s.group.clone(), s.state), (Some(gname("gw")), AgentState::Unsupported));
    assert_eq!(
        p.groups[&gname("gw")].agents.targeted,
        1,
        "unsupported agents are not targeted"
    );
    assert_eq!(p.groups[&gname("gw")].waves, 1);
}

// ---------- waves ----------

#[test]
fn waves_follow_the_stable_hash_order_and_the_same_canaries_every_time() {
    let (v1, v2, v3) = (config("v1"), config("v2"), config("v3"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("1, 50%, 100%"));
    let ord = order("gw", 10);
    let p = w.plan();
    assert_eq!(pushed(&p), set(&ord[..1]), "wave 1 is the first agent in hash order");
    let st = &p.groups[&gname("gw")];
    assert_eq!((st.phase, st.wave, st.waves), (Phase::Progressing, 1, 3));
    assert_eq!(st.agents.pending, 9);
    assert_eq!(st.agents.applying, 1);
    assert!(p.events.contains(&Event::RolloutStarted {
        group: gname("gw"),
        commit: Some(CommitId::new("c2")),
        hash: v2.hash(),
        waves: 3,
        targeted: 10,
    }));
    // The next change has the same canary.
    w.desired = repo()
        .commit("c3")
        .group("gw")
        .waves("1, 50%, 100%")
        .config(&v3)
        .build();
    let p = w.plan();
    assert_eq!(pushed(&p), set(&ord[..1]));
}

#[test]
fn a_renamed_group_orders_its_canaries_by_its_new_name() {
    // The group keeps its place among the groups: the canary order keys
    // kept for that place were the old name's.
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("1, 100%"));
    assert_ne!(order("gx", 10)[0], order("gw", 10)[0], "a test that can tell");
    w.desired = repo().commit("c2").group("gx").waves("1, 100%").config(&v2).build();
    let p = w.plan();
    assert_eq!(pushed(&p), set(&order("gx", 10)[..1]));
}

#[test]
fn next_wave_opens_only_after_applied_healthy_and_bake() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("1, 50%, 100%").bake(60));
    let ord = order("gw", 10);
    let opened = w.now;
    let p = w.plan();
    assert_eq!(pushed(&p), set(&ord[..1]));

    // Reported APPLYING only: nothing opens, nothing is pushed again.
    let c = ord[0].clone();
    w.set(&c, |a| a.reports(&v2).applying());
    w.advance(120);
    let p = w.plan();
    assert!(p.pushes.is_empty());
    assert_eq!(p.groups[&gname("gw")].wave, 1);
    let g = &p.groups[&gname("gw")];
    assert_eq!(
        (g.wave_opened, g.waiting_since, g.bake_ends),
        (Some(opened), Some(opened), None),
        "waiting since it opened"
    );

    // APPLIED and healthy: the bake starts now.
    w.set(&c, |a| a.applied().healthy());
    w.advance(1);
    let p = w.plan();
    assert!(p.pushes.is_empty(), "the bake has not been served");
    assert_eq!(p.groups[&gname("gw")].agents.applied, 1);
    let g = &p.groups[&gname("gw")];
    assert_eq!(
        (g.waiting_since, g.bake_ends),
        (None, Some(w.now.after(Duration::from_secs(60)))),
        "settled now, baking 60s"
    );
    w.advance(59);
    assert_eq!(w.plan().groups[&gname("gw")].wave, 1, "59s of 60s baked");
    w.advance(1);
    let p = w.plan();
    assert!(p.events.contains(&Event::WaveDone {
        group: gname("gw"),
        commit: Some(CommitId::new("c2")),
        wave: 1
    }));
    assert_eq!(p.groups[&gname("gw")].wave, 2);
    assert_eq!(pushed(&p), set(&ord[1..5]), "wave 2 covers 50% cumulatively");
}

#[test]
fn an_agent_that_reports_health_must_stay_healthy_through_the_bake() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(4, &v1, &v2, |r| {
        r.waves("1, 100%").bake(60).max_failures(Amount::Count(5))
    });
    let c = order("gw", 4)[0].clone();
    let p = w.plan();
    w.apply(&p);
    w.advance(1);
    w.plan(); // bake starts
    w.advance(30);
    w.set(&c, |a| a.unhealthy("exporter down"));
    let p = w.plan();
    assert_eq!(
        p.groups[&gname("gw")].failures[0].error,
        "unhealthy for more than 30s after applying: exporter down"
    );
    assert_eq!(p.agent(&c).unwrap().state, AgentState::Failed);
    // The failure is within budget, so the wave is done once its bake is
    // served by the (now excused) failed agent, but not before.
    w.set(&c, |a| a.healthy());
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].wave, 1);

    // An agent without health reporting counts on APPLIED alone.
    let mut w = stable_then(2, &v1, &v2, |r| r.waves("1, 100%").bake(10));
    for a in &mut w.agents {
        *a = a.clone().no_health();
    }
    let p = w.plan();
    w.apply(&p);
    w.set(&p.pushes[0].uid, |a| a.no_health());
    w.advance(1);
    w.plan();
    w.advance(10);
    assert_eq!(w.plan().groups[&gname("gw")].wave, 2);
}

#[test]
fn unknown_health_does_not_count_as_healthy() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(2, &v1, &v2, |r| r.waves("1, 100%").bake(10));
    let p = w.plan();
    w.apply(&p);
    w.set(&p.pushes[0].uid, |mut a| {
        a.healthy = None;
        a
    });
    w.advance(100);
    w.plan();
    w.advance(100);
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].wave, 1, "APPLIED alone is not trusted");
}

#[test]
fn last_wave_done_completes_and_the_target_becomes_stable() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("1, 50%, 100%").bake(60));
    let p = w.run("gw", 61, 20);
    let st = &p.groups[&gname("gw")];
    assert_eq!((st.phase, st.wave, st.agents.applied), (Phase::Complete, 3, 10));
    assert!(st.finished.is_some());
    assert_eq!(st.stable_hash, Some(v2.hash()));
    assert!(p.events.iter().any(|e| matches!(e, Event::Complete { .. })));
    assert!(p.agents.iter().all(|a| a.state == AgentState::InSync));
    let p = w.plan();
    assert!(p.pushes.is_empty() && p.events.is_empty(), "complete is a fixpoint");
}

#[test]
fn empty_group_completes_at_once() {
    let mut w = World::new(repo().group("gw").config(&config("v1")).build(), vec![]);
    let p = w.plan();
    let st = &p.groups[&gname("gw")];
    assert_eq!((st.phase, st.wave, st.waves), (Phase::Complete, 4, 4));
    assert_eq!(st.stable_hash, Some(config("v1").hash()));
}

// ---------- failures, halt, rollback ----------

#[test]
fn failed_report_beyond_the_budget_halts_and_rollback_restores_stable() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("2, 100%").max_failures(Amount::Count(0)));
    let ord = order("gw", 10);
    let p = w.plan();
    assert_eq!(pushed(&p), set(&ord[..2]));
    w.set(&ord[0], |a| a.reports(&v2).failed("bad exporter"));
    w.advance(5);
    let p = w.plan();
    let st = &p.groups[&gname("gw")];
    assert_eq!(st.phase, Phase::Halted);
    assert_eq!(st.failures[0].agent, ord[0]);
    assert_eq!(st.failures[0].error, "bad exporter");
    assert!(p.events.contains(&Event::AgentFailed {
        group: gname("gw"),
        agent: ord[0].clone(),
        hash: v2.hash(),
        error: "bad exporter".into()
    }));
    assert!(p.events.iter().any(|e| matches!(e, Event::Halted { failures: 1, .. })));
    // Rollback: the failed agent gets v1 back, nobody else is touched.
    assert_eq!(p.pushes.len(), 1);
    assert_eq!((&p.pushes[0].uid, p.pushes[0].bundle.hash()), (&ord[0], v1.hash()));
    assert_eq!(p.pushes[0].reason, PushReason::Rollback);
    assert!(p.events.iter().any(|e| matches!(e, Event::RolledBack { .. })));
    assert_eq!(p.agent(&ord[0]).unwrap().state, AgentState::Failed);
    assert_eq!(st.stable_hash, Some(v1.hash()), "stable stays the last completed");
}

#[test]
fn a_rolled_back_agent_running_stable_is_in_sync_and_its_failure_stays_listed() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("1, 100%"));
    let c = order("gw", 10)[0].clone();
    w.plan();
    w.set(&c, |a| a.reports(&v2).failed("bad exporter"));
    let p = w.plan();
    assert_eq!(p.agent(&c).unwrap().state, AgentState::Failed, "until it runs v1 again");
    assert_eq!(p.groups[&gname("gw")].agents.failed, 1);
    w.set(&c, |a| a.reports(&v1).applied().unhealthy("crashed"));
    let p = w.plan();
    assert_eq!(p.agent(&c).unwrap().state, AgentState::Failed, "v1 but unhealthy");
    w.set(&c, |a| a.healthy());
    let p = w.plan();
    let st = &p.groups[&gname("gw")];
    let a = p.agent(&c).unwrap();
    assert_eq!((a.state, a.desired), (AgentState::InSync, Some(v1.hash())));
    assert_eq!(
        (st.phase, st.agents.failed, st.agents.applied, st.agents.pending),
        (Phase::Halted, 0, 1, 9)
    );
    assert_eq!(st.failures.len(), 1, "the failure stays listed");
    assert!(p.pushes.is_empty());
}

#[test]
fn failures_within_the_budget_do_not_halt() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(10, &v1, &v2, |r| {
        r.waves("2, 100%").max_failures(Amount::Percent(10)).bake(10)
    });
    let ord = order("gw", 10);
    let p = w.plan();
    w.apply(&p);
    w.set(&ord[0], |a| a.reports(&v2).failed("x"));
    w.advance(1);
    let p = w.plan();
    assert_eq!(
        p.groups[&gname("gw")].phase,
        Phase::Progressing,
        "10% of 10 tolerates one"
    );
    w.advance(10);
    let p = w.plan();
    assert_eq!(
        p.groups[&gname("gw")].wave,
        2,
        "a tolerated failure does not block the wave"
    );
    assert!(!pushed(&p).contains(&ord[0]), "a FAILED hash is not pushed again");
    assert_eq!(p.pushes.len(), 8);
}

#[test]
fn hold_leaves_failed_agents_as_they_are() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("2, 100%").on_failure(OnFailure::Hold));
    let ord = order("gw", 10);
    w.plan();
    w.set(&ord[0], |a| a.reports(&v2).failed("bad"));
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Halted);
    assert!(p.pushes.is_empty());
}

#[test]
fn not_applied_within_apply_timeout_is_a_failure() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("1, 100%").apply_timeout(300));
    let c = order("gw", 10)[0].clone();
    w.plan();
    w.advance(299);
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Progressing);
    assert_eq!(p.agent(&c).unwrap().state, AgentState::Applying);
    assert!(p.pushes.is_empty(), "no second push on the same connection");
    w.advance(1);
    let p = w.plan();
    let st = &p.groups[&gname("gw")];
    assert_eq!(st.phase, Phase::Halted);
    assert_eq!(st.failures[0].error, "not APPLIED within 5m of receiving the config");
    assert!(p.pushes.is_empty(), "it still runs v1: nothing to roll back");
    let a = p.agent(&c).unwrap();
    assert_eq!((a.state, a.desired), (AgentState::Failed, Some(v1.hash())));
}

#[test]
fn apply_clock_starts_when_a_polling_agent_receives_the_config_not_when_it_is_queued() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(4, &v1, &v2, |r| r.waves("1, 100%").apply_timeout(20).bake(0));
    w.polling = w.agents.iter().map(|a| a.uid.clone()).collect();
    let c = order("gw", 4)[0].clone();
    let p = w.plan();
    assert_eq!(pushed(&p), set(std::slice::from_ref(&c)));
    // It polls every 30 s: the push waits in the queue longer than apply_timeout.
    w.advance(25);
    let p = w.plan();
    assert_eq!(
        p.groups[&gname("gw")].phase,
        Phase::Progressing,
        "not received yet: no clock"
    );
    assert!(p.groups[&gname("gw")].failures.is_empty());
    w.advance(5);
    w.poll(&c);
    w.advance(19);
    assert!(
        w.plan().groups[&gname("gw")].failures.is_empty(),
        "19 s after receiving it"
    );
    w.set(&c, |a| a.reports(&v2).applied().healthy());
    w.advance(1);
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].wave, 2, "applied in time: the next wave opens");
    // Silence after receiving it is still a failure, counted from receipt.
    let second = order("gw", 4)[1].clone();
    w.advance(30);
    w.poll(&second);
    w.advance(20);
    let p = w.plan();
    let st = &p.groups[&gname("gw")];
    assert_eq!(st.phase, Phase::Halted);
    assert_eq!(st.failures[0].agent, second);
    assert_eq!(st.failures[0].error, "not APPLIED within 20s of receiving the config");
}

#[test]
fn unhealthy_after_applying_is_a_failure_only_past_the_grace() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(4, &v1, &v2, |r| r.waves("1, 100%").bake(60));
    let c = order("gw", 4)[0].clone();
    let p = w.plan();
    w.apply(&p);
    // The collector restarts while the wave bakes: unhealthy for 20 s.
    let since = w.now;
    w.set(&c, |a| a.unhealthy_since(since, "starting"));
    w.advance(20);
    let p = w.plan();
    let st = &p.groups[&gname("gw")];
    assert_eq!(
        (st.phase, st.failures.len()),
        (Phase::Progressing, 0),
        "within the 30 s grace"
    );
    assert_eq!(p.agent(&c).unwrap().state, AgentState::Applying);
    w.set(&c, |a| a.healthy());
    w.plan(); // healthy again: the bake starts over
    w.advance(59);
    assert_eq!(w.plan().groups[&gname("gw")].wave, 1, "a full bake once healthy");
    w.advance(1);
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].wave, 2);
    // Unhealthy past the grace is a failure.
    let second = order("gw", 4)[1].clone();
    w.apply(&p);
    let since = w.now;
    w.set(&second, |a| a.unhealthy_since(since, "exporter refused"));
    w.advance(30);
    assert!(w.plan().groups[&gname("gw")].failures.is_empty(), "exactly the grace");
    w.advance(1);
    let p = w.plan();
    let st = &p.groups[&gname("gw")];
    assert_eq!(st.phase, Phase::Halted);
    assert_eq!(
        st.failures[0].error,
        "unhealthy for more than 30s after applying: exporter refused"
    );
}

#[test]
fn an_agent_unhealthy_before_a_fix_gets_the_whole_grace_after_receiving_it() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(2, &v1, &v2, |r| r.waves("1, 100%").bake(0));
    let c = order("gw", 2)[0].clone();
    // Unhealthy on v1 for an hour (a wrong endpoint that v2 fixes).
    let long_ago = w.now;
    w.set(&c, |a| a.unhealthy_since(long_ago, "export failed"));
    w.advance(3600);
    let p = w.plan();
    assert_eq!(pushed(&p), set(std::slice::from_ref(&c)));
    w.set(&c, |a| a.reports(&v2).applied());
    w.advance(20);
    let p = w.plan();
    assert!(
        p.groups[&gname("gw")].failures.is_empty(),
        "20 s after receiving v2: within the grace"
    );
    w.set(&c, |a| a.healthy());
    let p = w.run("gw", 1, 10);
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Complete);
}

#[test]
fn an_agent_applying_on_a_new_connection_is_watched_then_pushed_once_more_before_it_fails() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(4, &v1, &v2, |r| r.waves("1, 100%").apply_timeout(60).bake(0));
    let c = order("gw", 4)[0].clone();
    let p = w.plan();
    assert_eq!(pushed(&p), set(std::slice::from_ref(&c)));
    w.set(&c, |a| a.reports(&v2).applying());
    w.advance(10);
    // Its supervisor restarts mid-apply and keeps saying APPLYING.
    w.set(&c, |a| a.reconnected(2));
    let p = w.plan();
    assert!(p.pushes.is_empty(), "it has the hash: watched, not pushed");
    assert_eq!(p.agent(&c).unwrap().state, AgentState::Applying);
    // It restarts again and again: the watch still runs from the push.
    w.advance(30);
    w.set(&c, |a| a.reconnected(3));
    assert!(w.plan().pushes.is_empty());
    w.advance(19);
    assert!(w.plan().pushes.is_empty(), "59 s since the push");
    w.advance(1);
    let p = w.plan();
    assert_eq!(
        pushed(&p),
        set(std::slice::from_ref(&c)),
        "the watch ran out: given once more"
    );
    assert!(p.groups[&gname("gw")].failures.is_empty(), "not a failure yet");
    w.advance(30);
    assert!(w.plan().pushes.is_empty(), "once more, not again and again");
    w.advance(30);
    let p = w.plan();
    let st = &p.groups[&gname("gw")];
    assert_eq!(st.phase, Phase::Halted, "silent after the second push: a failure");
    assert_eq!(st.failures[0].agent, c);
}

#[test]
fn an_agent_applying_on_a_new_connection_that_answers_the_second_push_completes() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(2, &v1, &v2, |r| r.waves("1, 100%").apply_timeout(60).bake(0));
    let p = w.plan();
    w.set(&p.pushes[0].uid.clone(), |a| a.reports(&v2).applying().reconnected(2));
    w.plan();
    w.advance(60);
    let p = w.plan();
    assert_eq!(p.pushes.len(), 1);
    w.apply(&p);
    let p = w.run("gw", 1, 10);
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Complete);
    assert!(p.groups[&gname("gw")].failures.is_empty());
}

#[test]
fn agents_that_accept_but_do_not_report_remote_config_are_unsupported_and_never_block() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(3, &v1, &v2, |r| r.waves("1, 100%").bake(0));
    let silent = agent("silent").reports(&v1);
    w.agents.push(AgentView {
        reports_remote_config: false,
        remote: None,
        ..silent
    });
    let p = w.run("gw", 1, 20);
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Complete);
    assert_eq!(p.groups[&gname("gw")].agents.targeted, 3, "not counted");
    let a = p.agent(&uid("silent")).unwrap();
    assert_eq!((a.state, a.desired), (AgentState::Unsupported, None));
    assert!(!pushed(&w.plan()).contains(&uid("silent")));
}

#[test]
fn a_percentage_failure_budget_rounds_down_so_one_percent_of_fifty_tolerates_none() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(50, &v1, &v2, |r| r.waves("1, 100%").max_failures(Amount::Percent(1)));
    let c = order("gw", 50)[0].clone();
    w.plan();
    w.set(&c, |a| a.reports(&v2).failed("bad"));
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Halted, "the first failure halts");

    let mut w = stable_then(200, &v1, &v2, |r| r.waves("1, 100%").max_failures(Amount::Percent(1)));
    let c = order("gw", 200)[0].clone();
    w.plan();
    w.set(&c, |a| a.reports(&v2).failed("bad"));
    assert_eq!(
        w.plan().groups[&gname("gw")].phase,
        Phase::Progressing,
        "1% of 200 tolerates two"
    );
}

#[test]
fn halted_stays_halted_until_a_commit_changes_the_config() {
    let (v1, v2, v3) = (config("v1"), config("v2"), config("v3"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("2, 100%").bake(10));
    let ord = order("gw", 10);
    let p = w.plan();
    w.apply(&p);
    w.set(&ord[0], |a| a.reports(&v2).failed("bad"));
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Halted);
    // Even with everything healthy again and time passing: still halted.
    w.apply(&p);
    w.advance(3600);
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Halted);
    assert_eq!(p.groups[&gname("gw")].wave, 1);
    // A commit that leaves the group's config alone changes nothing.
    w.desired = repo().commit("c3").group("gw").waves("2, 100%").config(&v2).build();
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Halted);
    assert_eq!(p.groups[&gname("gw")].phase_at(&CommitId::new("c3")), Phase::Unchanged);
    // Fixing forward starts a new rollout.
    w.desired = repo().commit("c4").group("gw").waves("2, 100%").config(&v3).build();
    let p = w.plan();
    let st = &p.groups[&gname("gw")];
    assert_eq!(
        (st.phase, st.wave, st.commit.clone()),
        (Phase::Progressing, 1, Some(CommitId::new("c4")))
    );
    assert!(st.failures.is_empty());
    assert!(
        !p.events.iter().any(|e| matches!(e, Event::Superseded { .. })),
        "halted is not superseded"
    );
}

// ---------- commits ----------

#[test]
fn commit_that_does_not_change_the_group_starts_nothing() {
    let v1 = config("v1");
    let mut w = World::new(
        repo().group("gw").config(&v1).group("other").select("x", "y").build(),
        fleet(5, &v1),
    );
    let p = w.run("gw", 120, 20);
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Complete);
    w.desired = repo()
        .commit("c2")
        .group("gw")
        .config(&v1)
        .group("other")
        .select("x", "y")
        .config(&config("v9"))
        .build();
    let p = w.plan();
    let st = &p.groups[&gname("gw")];
    assert!(p.pushes.is_empty());
    assert!(
        !p.events
            .iter()
            .any(|e| matches!(e, Event::RolloutStarted { group, .. } if group == &gname("gw")))
    );
    assert_eq!(st.commit, Some(CommitId::new("c1")));
    assert_eq!(st.phase_at(&CommitId::new("c2")), Phase::Unchanged);
    assert_eq!(st.phase_at(&CommitId::new("c1")), Phase::Complete);
}

#[test]
fn revert_to_stable_is_pushed_to_every_affected_agent_at_once() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("1, 50%, 100%").bake(10));
    let ord = order("gw", 10);
    // Two waves in: 5 agents run v2.
    let p = w.plan();
    w.apply(&p);
    w.advance(1);
    w.plan();
    w.advance(10);
    let p = w.plan();
    assert_eq!(pushed(&p), set(&ord[1..5]));
    w.apply(&p);
    // git revert: back to v1.
    w.desired = repo()
        .commit("c3")
        .group("gw")
        .waves("1, 50%, 100%")
        .bake(10)
        .config(&v1)
        .build();
    let p = w.plan();
    assert_eq!(pushed(&p), set(&ord[..5]), "every agent running v2, no waves");
    assert!(
        p.pushes
            .iter()
            .all(|p| p.bundle.hash() == v1.hash() && p.reason == PushReason::Revert)
    );
    assert!(p.events.contains(&Event::RevertPushed {
        group: gname("gw"),
        commit: Some(CommitId::new("c3")),
        hash: v1.hash(),
        agents: 5
    }));
    assert!(
        p.events
            .iter()
            .any(|e| matches!(e, Event::Superseded { commit: Some(c), .. } if c.as_str() == "c2"))
    );
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Progressing);
    w.apply(&p);
    let p = w.plan();
    let st = &p.groups[&gname("gw")];
    assert_eq!((st.phase, st.agents.applied), (Phase::Complete, 10));
    assert_eq!(st.stable_hash, Some(v1.hash()));
}

#[test]
fn new_commit_mid_rollout_supersedes_it_from_wave_one() {
    let (v1, v2, v3) = (config("v1"), config("v2"), config("v3"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("1, 50%, 100%").bake(10));
    let ord = order("gw", 10);
    let p = w.plan();
    w.apply(&p);
    w.advance(1);
    w.plan();
    w.advance(10);
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].wave, 2);
    w.apply(&p);
    w.desired = repo()
        .commit("c3")
        .group("gw")
        .waves("1, 50%, 100%")
        .bake(10)
        .config(&v3)
        .build();
    let p = w.plan();
    assert!(p.events.contains(&Event::Superseded {
        group: gname("gw"),
        commit: Some(CommitId::new("c2")),
        hash: v2.hash(),
        by: v3.hash()
    }));
    let st = &p.groups[&gname("gw")];
    assert_eq!((st.wave, st.commit.clone()), (1, Some(CommitId::new("c3"))));
    assert_eq!(st.stable_hash, Some(v1.hash()), "stable stays the last completed");
    assert_eq!(pushed(&p), set(&ord[..1]));
    assert!(p.pushes.iter().all(|p| p.bundle.hash() == v3.hash()));
}

#[test]
fn first_config_rolls_out_in_waves_and_rollback_leaves_agents_as_they_are() {
    let (v0, v1) = (config("local"), config("v1"));
    let mut w = World::new(repo().group("gw").waves("2, 100%").config(&v1).build(), fleet(6, &v0));
    let ord = order("gw", 6);
    let p = w.plan();
    assert_eq!(pushed(&p), set(&ord[..2]));
    let pending = p.agent(&ord[3]).unwrap();
    assert_eq!(
        (pending.state, pending.desired),
        (AgentState::Pending, None),
        "nothing stable to run"
    );
    let st = &p.groups[&gname("gw")];
    assert_eq!(st.stable_hash, None);
    // A failure halts; with no stable config there is nothing to roll back to.
    w.set(&ord[0], |a| a.reports(&v1).failed("bad"));
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Halted);
    assert!(p.pushes.is_empty());
}

// ---------- connections ----------

#[test]
fn disconnected_agent_stops_blocking_after_apply_timeout_and_gets_its_config_back() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(4, &v1, &v2, |r| r.waves("2, 100%").bake(10).apply_timeout(300));
    let ord = order("gw", 4);
    let p = w.plan();
    w.apply(&p);
    let now = w.now;
    w.set(&ord[1], |a| a.offline(Some(now)));
    let p = w.plan();
    assert_eq!(p.agent(&ord[1]).unwrap().state, AgentState::Offline);
    w.advance(200);
    let p = w.plan();
    assert_eq!(
        p.groups[&gname("gw")].wave,
        1,
        "offline for less than apply_timeout: still blocks"
    );
    w.advance(100);
    w.plan();
    w.advance(10);
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].wave, 2, "left out of the count");
    assert!(!pushed(&p).contains(&ord[1]), "not pushed while offline");
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Progressing);
    // It comes back on a new connection, still running v1: it gets v2 at once.
    w.set(&ord[1], |mut a| {
        a.connected = true;
        a.disconnected_at = None;
        a.connection_epoch = 2;
        a.reports(&v1).applied()
    });
    let p = w.plan();
    assert!(pushed(&p).contains(&ord[1]));
}

#[test]
fn member_missing_from_the_fleet_blocks_until_apply_timeout() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(4, &v1, &v2, |r| r.waves("2, 100%").bake(10).apply_timeout(300));
    let ord = order("gw", 4);
    let p = w.plan();
    w.apply(&p);
    w.agents.retain(|a| a.uid != ord[1]);
    w.advance(100);
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].wave, 1, "missing since this plan noticed it");
    w.advance(299);
    assert_eq!(w.plan().groups[&gname("gw")].wave, 1);
    w.advance(1);
    w.plan();
    w.advance(10);
    assert_eq!(w.plan().groups[&gname("gw")].wave, 2, "left out of the count");
}

#[test]
fn late_joiner_gets_the_target_only_when_its_place_falls_in_an_opened_wave() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("5, 100%"));
    let ord = order("gw", 10);
    w.plan();
    // Find two newcomers: one sorting before the first unopened member, one after.
    let boundary = order_key(&gname("gw"), &ord[5]);
    let mut early = None;
    let mut late = None;
    for i in 0..200 {
        let n = format!("new{i}");
        let k = order_key(&gname("gw"), &uid(&n));
        if k < boundary && early.is_none() {
            early = Some(n);
        } else if k > boundary && late.is_none() {
            late = Some(n);
        }
    }
    let (early, late) = (early.unwrap(), late.unwrap());
    w.agents.push(agent(&early).reports(&config("local")).applied());
    w.agents.push(agent(&late).reports(&config("local")).applied());
    let p = w.plan();
    let by: BTreeMap<_, _> = p.pushes.iter().map(|p| (p.uid.clone(), p.bundle.hash())).collect();
    assert_eq!(by.get(&uid(&early)), Some(&v2.hash()), "placed in the opened wave");
    assert_eq!(by.get(&uid(&late)), Some(&v1.hash()), "gets the stable config");
    assert_eq!(p.agent(&uid(&late)).unwrap().state, AgentState::Pending);
    assert_eq!(p.groups[&gname("gw")].agents.targeted, 12);
}

// ---------- drift and push discipline ----------

#[test]
fn drifted_agent_is_repushed_after_the_reconcile_interval_and_at_once_on_reconnect() {
    let v1 = config("v1");
    let mut w = World::new(repo().interval(300).group("gw").config(&v1).build(), fleet(3, &v1));
    w.run("gw", 120, 20);
    // Someone edits an agent's config by hand.
    let i = 0;
    w.agents[i] = w.agents[i].clone().reports(&config("hand-edit")).applied();
    let p = w.plan();
    assert_eq!(
        pushed(&p),
        set(&[w.agents[i].uid.clone()]),
        "never pushed on this connection: at once"
    );
    assert!(p.events.iter().any(|e| matches!(e, Event::DriftHealed { .. })));
    assert_eq!(p.pushes[0].reason, PushReason::Sync);
    // The agent ignores it.
    w.advance(299);
    let p = w.plan();
    assert!(p.pushes.is_empty(), "no push storm");
    assert_eq!(p.agents[i].state, AgentState::Applying);
    w.advance(1);
    let p = w.plan();
    assert_eq!(p.pushes.len(), 1, "re-pushed after the reconcile interval");
    // It reconnects: pushed again at once.
    w.advance(10);
    w.agents[i].connection_epoch = 2;
    let p = w.plan();
    assert_eq!(p.pushes.len(), 1);
    w.advance(10);
    assert!(w.plan().pushes.is_empty());
}

#[test]
fn a_hash_an_agent_reported_failed_for_is_never_pushed_again() {
    let v1 = config("v1");
    let mut w = World::new(repo().interval(60).group("gw").config(&v1).build(), fleet(3, &v1));
    w.run("gw", 120, 20);
    w.agents[0] = w.agents[0].clone().reports(&v1).failed("cannot apply");
    let p = w.plan();
    assert!(p.pushes.is_empty());
    assert_eq!(p.agents[0].state, AgentState::Failed);
    // The supervisor falls back to its previous config: FAILED(v1), then APPLIED(local).
    w.agents[0] = w.agents[0].clone().reports(&config("local")).applied();
    for _ in 0..3 {
        w.advance(3600);
        w.agents[0].connection_epoch += 1;
        let p = w.plan();
        assert!(p.pushes.is_empty(), "not even after a reconnect");
        assert_eq!(p.agents[0].state, AgentState::Failed);
    }
}

#[test]
fn an_agent_missing_from_the_fleet_keeps_its_record_until_it_returns() {
    let v1 = config("v1");
    let mut w = World::new(repo().interval(60).group("gw").config(&v1).build(), fleet(3, &v1));
    w.run("gw", 120, 20);
    w.agents[0] = w.agents[0].clone().reports(&v1).failed("cannot apply");
    w.plan();
    // A controller restart: the fleet is empty until the agent reconnects.
    let gone = w.agents.remove(0);
    w.plan();
    w.agents.insert(0, gone.reports(&config("local")).applied());
    w.agents[0].connection_epoch += 1;
    w.advance(3600);
    let p = w.plan();
    assert!(
        p.pushes.is_empty(),
        "the failed hash is still remembered: {:?}",
        p.pushes
    );
    assert_eq!(p.agents[0].state, AgentState::Failed);
}

#[test]
fn the_same_hash_is_never_pushed_twice_on_one_connection_while_waiting() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(3, &v1, &v2, |r| r.waves("100%").apply_timeout(600));
    let p = w.plan();
    assert_eq!(p.pushes.len(), 3);
    for _ in 0..10 {
        w.advance(50);
        assert!(w.plan().pushes.is_empty());
    }
    // A reconnect is a new chance.
    w.agents[1].connection_epoch = 7;
    let p = w.plan();
    assert_eq!(pushed(&p), set(&[w.agents[1].uid.clone()]));
}

#[test]
fn an_agent_that_already_has_the_hash_is_not_pushed() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(3, &v1, &v2, |r| r.waves("100%"));
    w.agents[0] = w.agents[0].clone().reports(&v2).applying();
    w.agents[1] = w.agents[1].clone().reports(&v2).applied();
    let p = w.plan();
    assert_eq!(pushed(&p), set(&[w.agents[2].uid.clone()]));
    assert_eq!(p.agents[0].state, AgentState::Applying);
    assert_eq!(p.agents[1].state, AgentState::InSync);
}

// ---------- operator controls ----------

#[test]
fn pause_resume_and_promote_are_recorded_and_steer_the_waves() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("1, 50%, 100%").bake(600));
    let g = gname("gw");
    assert_eq!(
        w.control(&gname("nope"), Control::Pause),
        Err(ControlError::UnknownGroup(gname("nope")))
    );
    assert_eq!(
        w.control(&g, Control::Pause),
        Err(ControlError::Idle(g.clone())),
        "complete: idle"
    );
    let p = w.plan();
    w.apply(&p);
    w.control(&g, Control::Pause).unwrap();
    w.advance(1);
    let p = w.plan();
    assert_eq!(p.groups[&g].phase, Phase::Paused);
    w.advance(600);
    let p = w.plan();
    assert_eq!(p.groups[&g].wave, 1, "paused: no wave opens");
    assert!(p.pushes.is_empty());
    w.control(&g, Control::Resume).unwrap();
    let p = w.plan();
    assert_eq!(p.groups[&g].wave, 2, "bake served while paused counts");
    w.apply(&p);
    w.advance(1);
    w.plan();
    w.control(&g, Control::Promote).unwrap();
    let p = w.plan();
    assert_eq!(p.groups[&g].wave, 3, "promote skips the rest of the bake");
    let actions: Vec<Control> = p.groups[&g].actions.iter().map(|a| a.action).collect();
    assert_eq!(actions, vec![Control::Pause, Control::Resume, Control::Promote]);
}

#[test]
fn promote_does_not_skip_waiting_for_applied() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("1, 100%").bake(600));
    let g = gname("gw");
    w.plan();
    w.control(&g, Control::Promote).unwrap();
    let p = w.plan();
    assert_eq!(p.groups[&g].wave, 1);
    w.apply(&p);
    let p = w.plan();
    assert_eq!(p.groups[&g].wave, 1, "the canary has not been pushed-and-applied yet");
}

// ---------- restart ----------

#[test]
fn records_of_agents_gone_longer_than_the_retention_are_dropped() {
    let day = Duration::from_secs(86_400);
    let rec = AgentMemory {
        failed: Some(ConfigHash([1; 32])),
        ..AgentMemory::default()
    };
    let mut m = AgentMemories::from_sorted(vec![(uid("a"), rec), (uid("b"), rec), (uid("c"), rec)]);
    // The fleet lists b only.
    m.forget_absent([&uid("b")], t(0), day);
    assert_eq!(m.get(&uid("a")).unwrap().absent_since, Some(t(0)));
    assert_eq!(m.get(&uid("b")).unwrap().absent_since, None);
    m.forget_absent([&uid("b")], t(60), day);
    assert_eq!(m.len(), 3, "still absent, still kept");
    assert_eq!(
        m.get(&uid("c")).unwrap().absent_since,
        Some(t(0)),
        "absent since it was first missed"
    );
    // a comes back within the retention; c stays away for all of it.
    m.forget_absent([&uid("a"), &uid("b")], t(86_400), day);
    assert!(m.get(&uid("c")).is_none(), "gone for a whole retention");
    assert_eq!(m.get(&uid("a")).unwrap().absent_since, None, "back: no longer absent");
    assert_eq!(m.len(), 2);
}

#[test]
fn state_survives_json_and_a_restart_resumes_where_it_was() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(10, &v1, &v2, |r| r.waves("1, 50%, 100%").bake(60));
    let p = w.plan();
    w.apply(&p);
    w.advance(1);
    w.plan();
    w.advance(30); // half the bake served
    w.plan();
    let json = serde_json::to_string(&w.state).unwrap();
    let back: RolloutState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, w.state);
    assert!(json.contains(r#""text":"v2""#), "the target bundle itself is kept");
    w.state = back;
    w.advance(30);
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].wave, 2, "bake already served is kept");
    let tampered = json.replacen("\"text\":\"v2\"", "\"text\":\"v3\"", 1);
    assert!(
        serde_json::from_str::<RolloutState>(&tampered).is_err(),
        "hash is checked on load"
    );
}

#[test]
fn binary_bodies_round_trip() {
    let b = Arc::new(ConfigBundle::new(BTreeMap::from([(
        "bin".to_string(),
        ConfigFile {
            content_type: "application/octet-stream".into(),
            body: Bytes::from_static(&[0xff, 0x00, 0x80]),
        },
    )])));
    let mut w = World::new(repo().group("gw").config(&b).build(), vec![]);
    w.plan();
    let json = serde_json::to_string(&w.state).unwrap();
    let back: RolloutState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, w.state);
}

#[test]
fn a_commit_while_every_agent_is_away_rolls_out_in_waves_when_they_return() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(4, &v1, &v2, |r| r.waves("1, 100%").bake(10).apply_timeout(60));
    let ord = order("gw", 4);
    let now = w.now;
    for u in &ord {
        w.set(u, |a| a.offline(Some(now)));
    }
    // The rollout counts the agents the fleet knows, away or not, and waits
    // for its canary however long they are away: it completes only once an
    // agent has verified the config.
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].agents.targeted, 4);
    for _ in 0..10 {
        w.advance(120);
        let p = w.plan();
        assert!(p.pushes.is_empty());
        let g = &p.groups[&gname("gw")];
        assert_eq!(
            (g.phase, g.wave),
            (Phase::Progressing, 1),
            "never past the canary unverified"
        );
    }
    // They return, still on v1: only the canary gets v2, and when it fails
    // the rollout halts and nobody else ever gets it.
    for u in &ord {
        w.set(u, |mut a| {
            a.connected = true;
            a.disconnected_at = None;
            a.connection_epoch = 2;
            a.reports(&v1).applied()
        });
    }
    let p = w.plan();
    assert_eq!(pushed(&p), set(&ord[..1]));
    w.set(&ord[0], |a| a.reports(&v2).failed("bad setting"));
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Halted);
    assert!(!pushed(&p).iter().any(|u| ord[1..].contains(u)));
}

#[test]
fn an_agent_whose_connection_drops_each_time_it_is_pushed_fails() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(4, &v1, &v2, |r| r.waves("1, 100%").bake(10).apply_timeout(300));
    let ord = order("gw", 4);
    let p = w.plan();
    assert_eq!(pushed(&p), set(&ord[..1]));
    // It reconnects after each delivery, never saying a word of v2.
    for times in 1..=2 {
        w.set(&ord[0], |mut a| {
            a.push_drops = Some((v2.hash(), times));
            a.reconnected(times as u64 + 1).reports(&v1).applied()
        });
        let p = w.plan();
        assert_eq!(
            p.groups[&gname("gw")].phase,
            Phase::Progressing,
            "{times} drops are not yet a failure"
        );
    }
    w.set(&ord[0], |mut a| {
        a.push_drops = Some((v2.hash(), 3));
        a.reconnected(4).reports(&v1).applied()
    });
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Halted);
    assert!(
        p.groups[&gname("gw")].failures[0]
            .error
            .contains("closed each time the config reached it (3 times)")
    );
}

#[test]
fn a_canary_failure_within_the_budget_still_lets_the_rollout_go_on() {
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(4, &v1, &v2, |r| {
        r.waves("1, 100%")
            .bake(10)
            .apply_timeout(300)
            .max_failures(Amount::Count(1))
    });
    let ord = order("gw", 4);
    let p = w.plan();
    assert_eq!(pushed(&p), set(&ord[..1]));
    w.set(&ord[0], |a| a.reports(&v2).failed("flaky host"));
    w.plan();
    w.advance(11);
    let p = w.plan();
    let g = &p.groups[&gname("gw")];
    assert_eq!(
        (g.phase, g.wave),
        (Phase::Progressing, 2),
        "the failure was judged, and tolerated"
    );
}

// ---------- planning what changed ----------

/// A fleet of `n` agents running v1 as the stable config, planned in full once.
fn planned_in_sync(n: usize, v1: &Arc<ConfigBundle>) -> (Planner, DesiredState, Vec<AgentView>) {
    let mut w = World::new(repo().group("gw").config(v1).build(), fleet(n, v1));
    w.run("gw", 120, 20);
    let mut planner = Planner::new(w.state.clone());
    planner.full(&w.desired, w.agents.clone(), w.now);
    // The records the full plan changed are decided once more.
    planner.update(&w.desired, &[], w.now).expect("an update");
    (planner, w.desired, w.agents)
}

#[test]
fn a_report_of_one_agent_is_planned_for_that_agent_alone() {
    let v1 = config("v1");
    let (mut planner, desired, agents) = planned_in_sync(40, &v1);
    let now = t(5_000);
    let sick = agents[7].clone().unhealthy_since(now, "exporter failing");
    let step = planner
        .update(&desired, std::slice::from_ref(&sick), now)
        .expect("an update");
    assert_eq!(step.planned, 1, "one agent decided");
    assert!(step.pushes.is_empty() && step.events.is_empty());
    assert_eq!(planner.assignments()[7].state, AgentState::Applying);
    assert_eq!(planner.statuses()[&gname("gw")].agents.applying, 1);
    // The same as a plan of the whole fleet.
    let mut fleet = agents.clone();
    fleet[7] = sick;
    let whole = plan(&PlanInput {
        desired: &desired,
        agents: &fleet,
        state: &planner.state(),
        now,
    });
    assert!(planner.assignments().iter().eq(whole.agents.iter()));
    assert_eq!(planner.statuses(), &whole.groups);
    // Nothing changed: nothing is decided.
    let step = planner.update(&desired, &[], now).expect("an update");
    assert_eq!(step.planned, 0);
}

#[test]
fn only_a_full_plan_takes_new_agents_other_groups_passed_deadlines_and_new_commits() {
    let v1 = config("v1");
    let (mut planner, desired, agents) = planned_in_sync(5, &v1);
    let now = t(5_000);
    let cases: Vec<(&str, DesiredState, Vec<AgentView>, Timestamp)> = vec![
        (
            "a new agent",
            desired.clone(),
            vec![agent("new").reports(&v1).applied()],
            now,
        ),
        (
            "an agent that changed its attributes",
            desired.clone(),
            vec![agents[1].clone().attrs(&[("svc", "other")])],
            now,
        ),
        (
            "an agent that no longer accepts remote config",
            desired.clone(),
            vec![agents[1].clone().unsupported()],
            now,
        ),
        (
            "another commit",
            repo().commit("c2").group("gw").config(&v1).build(),
            Vec::new(),
            now,
        ),
        ("the clock went back", desired.clone(), Vec::new(), t(1)),
    ];
    for (name, desired, changed, at) in cases {
        let before = planner.state();
        assert_eq!(planner.update(&desired, &changed, at), None, "{name}");
        assert_eq!(planner.state(), before, "{name}: nothing changed");
    }
    // A deadline: an agent given its config waits for it, at most until the
    // reconcile interval, when the plan that passes it is a full one.
    let drifted = agents[2].clone().reports(&config("other")).applied();
    let step = planner.update(&desired, &[drifted], now).expect("an update");
    assert_eq!(step.pushes.len(), 1, "the drifted agent is given v1 back");
    let step = planner.update(&desired, &[], now).expect("an update");
    let next = step.next.expect("a deadline");
    assert_eq!(next, now.after(desired.reconcile_interval));
    assert!(planner.update(&desired, &[], next).is_none(), "the deadline passed");
}

#[test]
fn rollouts_planned_as_updates_decide_what_full_plans_do() {
    // `World` plans each step both ways and compares; this makes sure the
    // updates are there to compare.
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(20, &v1, &v2, |r| r.waves("1, 50%, 100%").bake(60));
    let before = w.updates;
    let p = w.run("gw", 30, 20);
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Complete);
    assert!(w.updates > before + 3, "{} updates", w.updates - before);
}

#[test]
fn agents_that_come_take_their_places_in_uid_order_and_returning_ones_their_records() {
    // `World` compares each plan with a full plan of the same fleet; this
    // makes sure agents that come are planned over the last plan's fleet.
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(4, &v1, &v2, |r| r.waves("1, 100%").bake(0));
    let p = w.plan();
    let canary = order("gw", 4)[0].clone();
    assert_eq!(pushed(&p), set(std::slice::from_ref(&canary)));
    // The canary fails v2 and leaves: its record stays with the planner.
    w.set(&canary, |a| a.reports(&v2).failed("boom"));
    w.plan();
    let gone = w.agents.iter().position(|a| a.uid == canary).unwrap();
    let returning = w.agents.remove(gone);
    w.plan();
    let replans = w.replans_with_new;
    for a in [returning, agent("0"), agent("a015"), agent("b")] {
        let at = w.agents.partition_point(|b| b.uid < a.uid);
        w.agents.insert(at, a.reports(&v1).applied());
    }
    w.plan();
    assert_eq!(w.replans_with_new, replans + 1, "planned over the last plan's fleet");
    let record = w.state.agents.get(&canary);
    assert!(record.is_some_and(|r| r.has_failed(v2.hash())), "{record:?}");
}

/// Groups "blue" and "green", each selecting its `env`, and six agents,
/// a00 to a05, blue and green in turn.
fn blue_and_green() -> (DesiredState, Vec<AgentView>) {
    let desired = (repo().group("blue").select("env", "blue").config(&config("blue")))
        .group("green")
        .select("env", "green")
        .config(&config("green"))
        .build();
    let env = ["blue", "green"];
    let fleet = (0..6).map(|i| agent(&format!("a{i:02}")).attrs(&[("env", env[i % 2])]));
    (desired, fleet.collect())
}

fn group_of(assignments: impl IntoIterator<Item = Assignment>, name: &str) -> Option<GroupName> {
    (assignments.into_iter()).find(|a| a.uid == uid(name))?.group
}

#[test]
fn an_agent_that_turns_to_another_group_as_others_come_is_matched_again() {
    let (desired, fleet) = blue_and_green();
    let mut w = World::new(desired, fleet);
    w.plan();
    let replans = w.replans_with_new;
    // a02 turns green as a blue agent comes before it.
    w.set(&uid("a02"), |a| a.attrs(&[("env", "green")]));
    let at = w.agents.partition_point(|b| b.uid < uid("a015"));
    w.agents.insert(at, agent("a015").attrs(&[("env", "blue")]));
    let p = w.plan();
    assert_eq!(w.replans_with_new, replans + 1, "planned over the last plan's fleet");
    let group = |name| group_of(p.agents.iter().cloned(), name);
    assert_eq!(group("a02"), Some(gname("green")));
    assert_eq!(group("a015"), Some(gname("blue")));
}

#[test]
fn an_agent_given_twice_among_those_that_changed_hides_no_other() {
    let (desired, fleet) = blue_and_green();
    let mut planner = Planner::default();
    planner.full(&desired, fleet, t(1_000));
    let env = |name, env| agent(name).attrs(&[("env", env)]);
    let changed = [env("a02", "red"), env("a02", "green"), env("a04", "green")];
    planner
        .replan(&desired, &changed, t(1_001))
        .expect("a fleet in uid order");
    for name in ["a02", "a04"] {
        let group = group_of(planner.assignments().iter().cloned(), name);
        assert_eq!(group, Some(gname("green")), "{name}");
    }
}

#[test]
fn agents_that_come_to_a_fleet_out_of_uid_order_or_twice_call_for_a_full_plan() {
    let desired = repo().group("gw").build();
    let mut planner = Planner::default();
    planner.full(&desired, vec![agent("b"), agent("a")], t(1_000));
    let (state, agents) = (planner.state(), planner.agents().to_vec());
    assert!(planner.replan(&desired, &[agent("c")], t(1_001)).is_none());
    assert_eq!(
        (planner.state(), planner.agents()),
        (state, &agents[..]),
        "nothing changed"
    );

    let mut planner = Planner::default();
    planner.full(&desired, vec![agent("a"), agent("b")], t(1_000));
    assert!(planner.replan(&desired, &[agent("c"), agent("c")], t(1_001)).is_none());
    assert_eq!(planner.agents().len(), 2, "nothing changed");
    assert!(planner.replan(&desired, &[agent("c")], t(1_001)).is_some());
    assert_eq!(planner.agents().len(), 3);
}

#[test]
fn an_agent_given_the_target_late_keeps_its_re_push_deadline_once_the_rollout_completes() {
    // `World` compares each plan's deadline with a full plan's: an update
    // that plans the completed group whole must keep the late agent's.
    let (v1, v2) = (config("v1"), config("v2"));
    let mut w = stable_then(3, &v1, &v2, |r| r.waves("100%").bake(0).apply_timeout(60).interval(300));
    let started = w.plan();
    w.agents.push(agent("late").reports(&v1).applied());
    let joined = w.plan();
    assert_eq!(pushed(&joined), set(&[uid("late")]), "it joins the opened wave");
    let given = w.now;
    w.apply(&started);
    w.advance(1);
    let p = w.plan();
    assert_eq!(p.groups[&gname("gw")].phase, Phase::Complete);
    let updates = w.updates;
    w.advance(1);
    let p = w.plan();
    assert_eq!(w.updates, updates + 1, "planned as an update");
    assert_eq!(p.next, Some(given.after(Duration::from_secs(300))));
}
