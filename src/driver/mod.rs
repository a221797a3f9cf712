//! The reconcile driver: the one task that owns the rollout state. It runs
//! `reconcile::plan` when the desired state or the fleet changes (the fleet's
//! snapshots are already coalesced; heartbeats make none) and when the last
//! plan's deadline comes (a bake ends, a timeout runs out), never on a
//! fixed tick: an idle fleet is not planned at all. It carries out the pushes,
//! persists the state, publishes what the API shows, logs the story of each
//! rollout, hands notes to the notes writer and tells the notifications.

mod notebook;
pub mod persist;
mod views;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use notebook::NoteBook;
pub use persist::{PersistError, Store};
use views::ViewBuilder;

use crate::desired::{ConfigBundle, DesiredState, Validated};
use crate::fleet::{FleetHandle, FleetSnapshot};
use crate::gitsrc::{GitHandle, Loaded, Status as GitStatus};
use crate::model::{AgentState, Change, CommitId, GroupName, InstanceUid};
use crate::notes::format::Note;
use crate::notes::remembered::{self, Found};
use crate::notes::writer::NotesHandle;
use crate::notify::{NotifyHandle, notice};
use crate::reconcile::{
    self, Control, ControlError, Event, GroupStatus, Phase, Planner, Recovered, RecoveredRollout, RolloutState, Stable,
    Step, Timestamp,
};
use crate::telemetry::groups::GroupGauges;
use crate::telemetry::rollout::{ConfigPushed, Planned, RolloutEvent, RolloutMetrics};
use crate::telemetry::{InternalEvent, Registry};

#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Where the rollout state is kept.
    pub state_dir: PathBuf,
    /// The longest time between two plans; `None`: the repository's
    /// reconcile interval.
    pub tick: Option<Duration>,
    /// An agent the fleet has not listed for this long has its records
    /// dropped (the fleet forgets it after as long).
    pub forget_after: Duration,
    /// How long after start the first plan waits, so agents have reconnected
    /// before a rollout counts its members.
    pub startup_grace: Duration,
}

/// Every agent's group, desired hash and state from the newest plan, in uid
/// order (the order the planner is given the fleet in). Persistent: each
/// plan changes the assignments it decided and shares the rest.
pub type Assignments = imbl::Vector<reconcile::Assignment>;

/// What the driver last decided, for the API.
#[derive(Debug, Clone, Default)]
pub struct DriverStatus {
    /// Grows with every published status (once per plan); 0 before the first.
    pub version: u64,
    /// The commit whose desired state is in force; `None` before the first plan.
    pub commit: Option<CommitId>,
    pub groups: BTreeMap<GroupName, GroupStatus>,
    pub agents_by_state: BTreeMap<AgentState, u64>,
    /// Who made each commit the groups' rollouts deliver, when known.
    pub changes: BTreeMap<CommitId, Change>,
    /// Each group's stable config (the last completed rollout's), when it has one.
    pub stable: BTreeMap<GroupName, Arc<ConfigBundle>>,
}

/// Why an operator control failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlFailure {
    #[error(transparent)]
    Refused(#[from] ControlError),
    #[error("no commit is loaded yet")]
    NotReady,
    #[error("the controller is starting: agents have {0} left to reconnect")]
    Starting(String),
    #[error("the controller is shutting down")]
    Stopped,
    #[error("this replica does not lead the cluster; ask the leader")]
    NotLeader,
}

struct ControlRequest {
    group: GroupName,
    action: Control,
    /// The operator's name, recorded with the action.
    by: Option<String>,
    reply: oneshot::Sender<Result<GroupStatus, ControlFailure>>,
}

/// Talks to the driver. Cheap to clone.
#[derive(Clone)]
pub struct DriverHandle {
    controls: mpsc::Sender<ControlRequest>,
    status: watch::Receiver<Arc<DriverStatus>>,
    metrics: RolloutMetrics,
}

impl DriverHandle {
    pub fn status(&self) -> Arc<DriverStatus> {
        self.status.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<DriverStatus>> {
        self.status.clone()
    }

    /// Adds the driver's metrics to `registry`, with the group gauges read
    /// from the newest status when scraped (a wave waiting longer than
    /// `stall_after` is stalled).
    pub fn register_metrics(&self, registry: &mut Registry, stall_after: Duration) {
        self.metrics.register(registry);
        let status = self.status.clone();
        crate::telemetry::groups::register(registry, move || {
            let status = status.borrow().clone();
            let now = SystemTime::now();
            status
                .groups
                .iter()
                .map(|(name, g)| GroupGauges {
                    group: name.clone(),
                    phase: g.phase,
                    failed: g.failed,
                    wave: g.wave,
                    waves: g.waves,
                    wave_opened: g.wave_opened.map(|t| t.millis() as f64 / 1000.0),
                    stalled: g
                        .waiting_since
                        .is_some_and(|t| Timestamp::of(now).reached(t, stall_after)),
                })
                .collect()
        });
    }

    /// Pause, resume or promote a group's rollout; answers its new status.
    pub async fn control(
        &self,
        group: GroupName,
        action: Control,
        by: Option<String>,
    ) -> Result<GroupStatus, ControlFailure> {
        let (reply, rx) = oneshot::channel();
        self.controls
            .send(ControlRequest {
                group,
                action,
                by,
                reply,
            })
            .await
            .map_err(|_| ControlFailure::Stopped)?;
        rx.await.map_err(|_| ControlFailure::Stopped)?
    }
}

/// Everything the driver works with.
pub struct Parts {
    pub fleet: FleetHandle,
    pub git: GitHandle,
    pub assignments: watch::Sender<Assignments>,
    pub notes: Option<NotesHandle>,
    /// Told each rollout's events (and invalid commits).
    pub notify: Option<NotifyHandle>,
    /// Reads the notes already in the repository (blocking). Called once the
    /// first commit is loaded, so a remote's mirror exists by then: rewrites
    /// keep what those notes hold, and a lost state is rebuilt from them.
    pub existing_notes: Option<NotesReader>,
    /// In a cluster: the rollout state in PostgreSQL, and whether this
    /// replica leads. The driver plans only while it does.
    pub cluster: Option<crate::cluster::Cluster>,
}

/// Reads the repository's notes (blocking); see [`Parts::existing_notes`].
pub type NotesReader = Arc<dyn Fn() -> Vec<Note> + Send + Sync>;

/// Loads the saved rollout state and starts the driver.
pub fn spawn(
    config: DriverConfig,
    parts: Parts,
    cancel: CancellationToken,
) -> Result<(DriverHandle, JoinHandle<()>), PersistError> {
    let (state, restore) = match &parts.cluster {
        // A replica claims the state when it comes to lead (see `take_term`).
        Some(_) => (RolloutState::default(), false),
        None => match persist::load(&config.state_dir)? {
            Some(s) => {
                info!(
                    groups = s.groups.len(),
                    agents = s.agents.len(),
                    "rollout state restored"
                );
                (s, false)
            }
            None => (RolloutState::default(), true),
        },
    };
    let (controls_tx, controls) = mpsc::channel(16);
    let (status_tx, status) = watch::channel(Arc::new(DriverStatus::default()));
    let metrics = RolloutMetrics::default();
    let handle = DriverHandle {
        controls: controls_tx,
        status,
        metrics: metrics.clone(),
    };
    let (views, store) = match parts.cluster {
        Some(c) => (
            ViewBuilder::global(),
            Store::Cluster {
                store: Box::new(c.state_store()),
                leadership: c.leadership,
            },
        ),
        None => (
            ViewBuilder::new(Timestamp::of(SystemTime::now())),
            Store::Dir(config.state_dir.clone()),
        ),
    };
    let driver = Driver {
        views,
        planner: Planner::new(state).forgetting_after(config.forget_after),
        planned: None,
        last_full: None,
        saving: None,
        save_next: false,
        store,
        term: None,
        notes_read: false,
        book: NoteBook::default(),
        existing_notes: parts.existing_notes,
        started: Instant::now(),
        seen: HashMap::new(),
        restore,
        dirty: false,
        last_persist: Instant::now(),
        wanted: true,
        next: None,
        last_plan: None,
        config,
        fleet: parts.fleet,
        git: parts.git,
        assignments: parts.assignments,
        notes: parts.notes,
        notify: parts.notify,
        status: status_tx,
        metrics,
    };
    let task = tokio::spawn(driver.run(controls, cancel));
    Ok((handle, task))
}

struct Driver {
    config: DriverConfig,
    fleet: FleetHandle,
    git: GitHandle,
    assignments: watch::Sender<Assignments>,
    notes: Option<NotesHandle>,
    notify: Option<NotifyHandle>,
    status: watch::Sender<Arc<DriverStatus>>,
    metrics: RolloutMetrics,
    views: ViewBuilder,
    store: Store,
    /// In a cluster, the lease of the term this replica leads in, once it
    /// has claimed the rollout state for it.
    term: Option<crate::cluster::Fence>,
    /// The notes already in the repository were read (once per term).
    notes_read: bool,
    book: NoteBook,
    /// When the commits of live rollouts were first seen, for the commit-to-complete time.
    seen: HashMap<CommitId, SystemTime>,
    /// Owns the rollout state and what the last plan decided.
    planner: Planner,
    /// The desired state and the fleet the last plan was made of: the next
    /// one plans what changed since.
    planned: Option<(Arc<Loaded>, Arc<FleetSnapshot>)>,
    /// When the last plan over the whole fleet was made.
    last_full: Option<Instant>,
    /// A save of the state under way.
    saving: Option<persist::Saving>,
    /// A save was wanted while one was under way: it starts when that ends.
    save_next: bool,
    /// Read on the first plan of each term; see [`Parts::existing_notes`].
    existing_notes: Option<NotesReader>,
    /// No state was saved: rebuild it from the notes on the first plan.
    restore: bool,
    /// When the driver started: no plan before the start-up grace has passed.
    started: Instant,
    /// The state changed since it was last saved.
    dirty: bool,
    last_persist: Instant,
    /// An input changed since the last plan.
    wanted: bool,
    /// When the last plan must be made again although nothing changed.
    next: Option<Instant>,
    /// When the last plan started, and how long its computation took.
    last_plan: Option<(Instant, Duration)>,
}

/// The state is saved at once when a rollout moves, else at most this often.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// The longest time between plans before a commit is loaded.
const DEFAULT_TICK: Duration = Duration::from_secs(600);
/// How soon a replica that holds the lease tries again to take up its term
/// (claim the rollout state, fetch the repository) after failing to.
const TERM_RETRY: Duration = Duration::from_secs(2);
/// Plans that changes call for are this far apart at least...
const MIN_PLAN_GAP: Duration = Duration::from_millis(50);
/// ...and, after a plan of the whole fleet, at least this many times as long
/// as its computation took, so a storm of changes (thousands of agents
/// connecting) leaves the time between plans to the agents.
const PLAN_GAP_FACTOR: u32 = 4;

impl Driver {
    async fn run(mut self, mut controls: mpsc::Receiver<ControlRequest>, cancel: CancellationToken) {
        let mut desired = self.git.desired();
        let mut git_status = self.git.status();
        let mut fleet = self.fleet.subscribe();
        let mut leadership = match &self.store {
            Store::Cluster { leadership, .. } => Some(leadership.clone()),
            Store::Dir(_) => None,
        };
        let first = git_status.borrow_and_update().clone();
        self.note_invalid_head(&first).await;
        loop {
            // An input that closes means its task ended; the supervisor reports
            // that task and stops the controller, so the driver only waits for
            // its turn to stop rather than be mistaken for the cause.
            let wake = self.wake_at();
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = desired.changed() => {
                    if changed.is_err() { cancel.cancelled().await; break }
                    self.wanted = true;
                    continue;
                }
                changed = fleet.changed() => {
                    if changed.is_err() { cancel.cancelled().await; break }
                    self.wanted = true;
                    continue;
                }
                changed = changed(leadership.as_mut()) => {
                    if changed.is_err() { cancel.cancelled().await; break }
                    self.wanted = true;
                    continue;
                }
                changed = git_status.changed() => {
                    if changed.is_err() { cancel.cancelled().await; break }
                    let status = git_status.borrow_and_update().clone();
                    self.note_invalid_head(&status).await;
                    continue;
                }
                result = saving(self.saving.as_mut()) => {
                    self.saving = None;
                    self.saved(result);
                    if std::mem::take(&mut self.save_next) && self.dirty {
                        self.persist_soon().await;
                    }
                    continue;
                }
                Some(request) = controls.recv() => {
                    let answer = self.control(&request.group, request.action, request.by.as_deref()).await;
                    let _ = request.reply.send(answer);
                    continue;
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            let now = Instant::now();
            if self.plan_due(now) {
                self.plan_once().await;
            } else if self.persist_due().is_some_and(|t| t <= now) {
                self.persist_soon().await;
            }
        }
        if self.leads() {
            self.persist().await;
        }
        info!("reconcile driver stopped");
    }

    /// When the driver next has something to do: plan, or save the state.
    fn wake_at(&self) -> Instant {
        let plan = self.plan_at();
        self.persist_due().map_or(plan, |t| t.min(plan))
    }

    /// When the next plan is due: soon after a change, at the last plan's
    /// deadline, and at the latest one reconcile interval after the last.
    fn plan_at(&self) -> Instant {
        let grace_ends = self.started + self.config.startup_grace;
        let Some((last, took)) = self.last_plan else {
            return grace_ends;
        };
        let interval = self.config.tick.or_else(|| {
            self.git
                .desired()
                .borrow()
                .as_ref()
                .map(|l| l.desired.reconcile_interval)
        });
        let mut at = last + interval.unwrap_or(DEFAULT_TICK);
        if self.wanted {
            at = at.min(last + MIN_PLAN_GAP.max(took * PLAN_GAP_FACTOR));
        }
        if let Some(next) = self.next {
            at = at.min(next);
        }
        at.max(grace_ends)
    }

    fn plan_due(&self, now: Instant) -> bool {
        self.plan_at() <= now
    }

    fn persist_due(&self) -> Option<Instant> {
        (self.dirty && self.saving.is_none()).then(|| self.last_persist + PERSIST_EVERY)
    }

    async fn control(
        &mut self,
        group: &GroupName,
        action: Control,
        by: Option<&str>,
    ) -> Result<GroupStatus, ControlFailure> {
        if !self.take_term().await {
            return Err(ControlFailure::NotLeader);
        }
        // Planning now would start rollouts with only the agents back so far.
        if let Some(left) = self.grace_left() {
            return Err(ControlFailure::Starting(humantime::format_duration(left).to_string()));
        }
        if self.git.desired().borrow().is_none() {
            return Err(ControlFailure::NotReady);
        }
        let now = Timestamp::of(SystemTime::now());
        self.planner.control(group, action, now, by)?;
        info!(group = %group, action = ?action, by = by.unwrap_or("-"), "rollout control");
        self.dirty = true;
        self.plan_once().await;
        // The API answers that the action took: it must survive a crash.
        self.persist().await;
        // A replica that lost the lease meanwhile saved nothing of it.
        if !self.leads() {
            return Err(ControlFailure::NotLeader);
        }
        self.status
            .borrow()
            .groups
            .get(group)
            .cloned()
            .ok_or(ControlFailure::NotReady)
    }

    async fn plan_once(&mut self) {
        let started = Instant::now();
        self.wanted = false;
        self.next = None;
        self.last_plan = Some((started, Duration::ZERO));
        if !self.take_term().await || self.grace_left().is_some() {
            return;
        }
        let Some(loaded) = self.git.desired().borrow().clone() else {
            return;
        };
        let Some(commit) = loaded.desired.commit.clone() else {
            return;
        };
        // Only the commits of rollouts still known (a handful per group) can complete.
        let live: Vec<&CommitId> = self
            .planner
            .group_states()
            .values()
            .filter_map(|g| g.rollout.as_ref()?.commit.as_ref())
            .collect();
        self.seen.retain(|c, _| *c == commit || live.contains(&c));
        self.seen.entry(commit.clone()).or_insert(loaded.seen_at);
        let snapshot = self.fleet.snapshot();
        let now_wall = SystemTime::now();
        let now = Timestamp::of(now_wall);
        if !self.notes_read
            && let Some(read) = self.existing_notes.clone()
        {
            self.notes_read = true;
            let notes = tokio::task::spawn_blocking(move || read()).await.unwrap_or_default();
            if self.restore && !notes.is_empty() {
                info!(
                    notes = notes.len(),
                    "no rollout state was saved; rebuilding it from the git notes"
                );
                let views = self.views.build(&snapshot);
                let state = self.recover(&notes, &loaded.desired, &views, now).await;
                self.renew_planner(state);
                self.dirty = true;
            }
            self.book = std::mem::take(&mut self.book).with_existing(notes);
        }
        let full_due = self
            .last_full
            .is_none_or(|t| t.elapsed() >= loaded.desired.reconcile_interval);
        let changed = self.changes(&snapshot);
        let update = match (&changed, full_due) {
            (Some(changed), false) if self.planned.as_ref().is_some_and(|(l, _)| Arc::ptr_eq(l, &loaded)) => {
                self.planner.update(&loaded.desired, changed, now)
            }
            _ => None,
        };
        let full = update.is_none();
        let Step {
            pushes,
            events,
            next,
            changed,
            planned,
        } = match update {
            Some(step) => step,
            None => {
                self.last_full = Some(started);
                let replanned = changed.and_then(|c| self.planner.replan(&loaded.desired, &c, now));
                replanned.unwrap_or_else(|| self.planner.full(&loaded.desired, self.views.build(&snapshot), now))
            }
        };
        self.planned = Some((loaded.clone(), snapshot));
        // What the next plan's distance is measured by: the work of this
        // one, not its waits (for the disk, for the fleet to take the pushes).
        let computed = started.elapsed();
        self.next = next.map(|t| started + Duration::from_millis(t.millis().saturating_sub(now.millis())));
        for event in &events {
            let took = match event {
                Event::Complete { commit: Some(c), .. } => self.since_seen(c, now_wall),
                _ => None,
            };
            let change = event.commit().and_then(|c| self.change_of(c, &loaded));
            RolloutEvent {
                event,
                took,
                author: change.map(|c| c.author.as_str()),
            }
            .emit(&self.metrics);
        }
        self.dirty |= changed;
        let groups = self.planner.statuses();
        // Into the outbox before the state that follows the events is saved:
        // after a crash in between they are told again, never lost.
        if let Some(notify) = &self.notify {
            let change = |c: &CommitId| self.change_of(c, &loaded).cloned();
            let notices = notice::from_plan(&notice::PlanFacts {
                events: &events,
                groups,
                change: &change,
                now: now_wall,
            });
            notify.enqueue(notices).await;
        }
        // A failure (which may halt the rollout) is saved before the pushes
        // that follow it: a halt saved only after its rollback pushes could be
        // lost in a crash and the bad config offered again. Any other move (a
        // rollout starting, a wave opening) is saved right after its pushes,
        // so they wait for no disk: after a crash in between, the restarted
        // controller decides the same again, and an agent that already runs
        // what it is given is not given it twice.
        let failing = events
            .iter()
            .any(|e| matches!(e, Event::AgentFailed { .. } | Event::Halted { .. }));
        if self.dirty && failing {
            self.persist().await;
        }
        if !pushes.is_empty() {
            let batch = pushes.iter().map(|p| (p.uid.clone(), p.bundle.clone())).collect();
            // A fleet that stopped is the supervisor's to report.
            let outcomes = self.fleet.push_all(batch).await.unwrap_or_default();
            for (push, outcome) in pushes.iter().zip(outcomes) {
                ConfigPushed {
                    agent: &push.uid,
                    group: &push.group,
                    hash: &push.bundle.hash(),
                    reason: push.reason,
                    outcome,
                }
                .emit(&self.metrics);
            }
        }
        if self.dirty && (!events.is_empty() || self.last_persist.elapsed() >= PERSIST_EVERY) {
            self.persist_soon().await;
        }
        let notes = self.book.after_plan(
            notebook::PlanFacts {
                desired: &commit,
                change: loaded.change.as_ref(),
                groups: self.planner.statuses(),
                events: &events,
                states: self.planner.group_states(),
            },
            now_wall,
        );
        self.publish(&commit, full, planned);
        self.submit_notes(notes);
        // An update's work follows the reports it decides, however often it
        // runs: only plans of the whole fleet space the next one out.
        self.last_plan = Some((started, if full { computed } else { Duration::ZERO }));
    }

    /// Who made `commit`: the loaded commit's author, else the one its note tells.
    fn change_of<'a>(&'a self, commit: &CommitId, loaded: &'a Loaded) -> Option<&'a Change> {
        if *commit == loaded.commit {
            loaded.change.as_ref()
        } else {
            self.book.change(commit)
        }
    }

    /// How long ago `commit` was first seen at the tip, while it is remembered.
    fn since_seen(&self, commit: &CommitId, now: SystemTime) -> Option<Duration> {
        let seen = self.seen.get(commit)?;
        Some(now.duration_since(*seen).unwrap_or_default())
    }

    /// The agents that changed or came since the last plan, when none left.
    fn changes(&self, snapshot: &FleetSnapshot) -> Option<Vec<reconcile::AgentView>> {
        let (_, fleet) = self.planned.as_ref()?;
        let mut changed = Vec::new();
        for d in fleet.agents.diff(&snapshot.agents) {
            match d {
                imbl::ordmap::DiffItem::Update { new: (_, r), .. } | imbl::ordmap::DiffItem::Add(_, r) => {
                    changed.push(r)
                }
                imbl::ordmap::DiffItem::Remove(..) => return None,
            }
        }
        Some(changed.into_iter().map(|r| self.views.view(r)).collect())
    }

    /// Plans from `state` on (claimed, or rebuilt from the notes).
    fn renew_planner(&mut self, state: RolloutState) {
        self.planner = Planner::new(state).forgetting_after(self.config.forget_after);
        self.planned = None;
    }

    fn publish(&mut self, commit: &CommitId, full: bool, planned: usize) {
        let groups = self.planner.statuses();
        let by_state = self.planner.agents_by_state();
        Planned {
            agents_by_state: by_state,
            phases: groups.values().map(|g| g.phase),
            took: self
                .last_plan
                .map_or_else(Duration::default, |(started, _)| started.elapsed()),
            full,
            agents: planned,
        }
        .emit(&self.metrics);
        self.assignments.send_replace(self.planner.assignments().clone());
        let version = self.status.borrow().version + 1;
        self.status.send_replace(Arc::new(DriverStatus {
            version,
            commit: Some(commit.clone()),
            groups: groups.clone(),
            agents_by_state: by_state.clone(),
            changes: groups
                .values()
                .filter_map(|g| g.commit.as_ref())
                .filter_map(|c| Some((c.clone(), self.book.change(c)?.clone())))
                .collect(),
            stable: self
                .planner
                .group_states()
                .iter()
                .filter_map(|(name, g)| Some((name.clone(), g.stable.as_ref()?.bundle.clone())))
                .collect(),
        }));
    }

    /// Rebuilds the rollout state from the notes: each group's stable config
    /// and unfinished rollout, read back from the commits the notes name.
    async fn recover(
        &self,
        notes: &[Note],
        desired: &DesiredState,
        views: &[reconcile::AgentView],
        now: reconcile::Timestamp,
    ) -> RolloutState {
        let mut loaded: HashMap<CommitId, Option<DesiredState>> = HashMap::new();
        let mut recovered = BTreeMap::new();
        for (group, r) in remembered::remembered(notes) {
            let mut bundle_of = async |found: &Found| {
                if !loaded.contains_key(&found.commit) {
                    let state = match self.git.load_at(&found.commit).await {
                        Ok(Validated::Valid(d)) => Some(d),
                        Ok(Validated::Invalid(problems)) => {
                            warn!(commit = %found.commit, errors = problems.len(), "a noted commit is not valid");
                            None
                        }
                        Err(e) => {
                            warn!(commit = %found.commit, error = %e, "reading a noted commit failed");
                            None
                        }
                    };
                    loaded.insert(found.commit.clone(), state);
                }
                let state = loaded.get(&found.commit)?.as_ref()?;
                found.group_in(&group, state).map(|g| g.config.clone())
            };
            let stable = match &r.stable {
                Some(f) => bundle_of(f).await.map(|bundle| Stable {
                    bundle,
                    commit: Some(f.commit.clone()),
                }),
                None => None,
            };
            let rollout = match &r.unfinished {
                Some(f) => bundle_of(f).await.map(|target| RecoveredRollout {
                    target,
                    commit: Some(f.commit.clone()),
                    halted: f.note.phase == Phase::Halted,
                    paused: f.note.phase == Phase::Paused,
                    opened: f.note.wave,
                    started: f.note.started.map_or(now, Timestamp::of),
                    finished: f.note.finished.map(Timestamp::of),
                    failures: f
                        .note
                        .failures
                        .iter()
                        .map(|x| (x.agent.as_str(), x.error.as_str()))
                        .chain(f.note.also_failed.iter().map(|uid| (uid.as_str(), "")))
                        .filter_map(|(uid, error)| {
                            let error = if error.is_empty() {
                                "failed (as the notes recorded; the error was not kept)"
                            } else {
                                error
                            };
                            Some((InstanceUid::parse_text(uid)?, error.to_owned()))
                        })
                        .collect(),
                }),
                None => None,
            };
            info!(group = %group, stable = stable.is_some(), unfinished = ?r.unfinished.as_ref().map(|f| f.note.phase), "rollout state rebuilt from notes");
            recovered.insert(group, Recovered { stable, rollout });
        }
        reconcile::restore(desired, views, recovered, now)
    }

    /// Saves what changed, after any save under way, and waits for both:
    /// the state on disk is the driver's when it returns.
    async fn persist(&mut self) {
        if let Some(mut saving) = self.saving.take() {
            let result = persist::saved(&mut saving).await;
            self.saved(result);
        }
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let result = self.store.save(self.planner.state(), self.term).await;
        self.saved(result);
    }

    /// Saves the state without waiting for the disk (in a cluster, waits for
    /// PostgreSQL). With a save under way, the next is due once it ends.
    async fn persist_soon(&mut self) {
        if self.saving.is_some() {
            self.save_next = true;
            return;
        }
        match self.store.save_in_background(self.planner.state()) {
            Some(saving) => {
                self.saving = Some(saving);
                self.dirty = false;
                self.last_persist = Instant::now();
            }
            None => self.persist().await,
        }
    }

    /// Takes the outcome of a save.
    fn saved(&mut self, result: Result<(), PersistError>) {
        match result {
            // What changed while it was under way is saved next.
            Ok(()) => self.last_persist = Instant::now(),
            Err(PersistError::Cluster(crate::cluster::DbError::Fenced)) => {
                warn!("the lease was lost: this replica saves nothing more and stands by");
                self.term = None;
                self.dirty = false;
            }
            Err(e) => {
                error!(error = %e, retry_in = ?PERSIST_EVERY, "saving the rollout state failed");
                // Retried when the next save is due, not at once.
                self.dirty = true;
                self.last_persist = Instant::now();
            }
        }
    }

    /// Whether this driver may plan: always for one controller; in a
    /// cluster, while it holds the lease of a term it claimed the state for.
    fn leads(&self) -> bool {
        match &self.store {
            Store::Dir(_) => true,
            Store::Cluster { leadership, .. } => {
                let fence = *leadership.borrow();
                fence.is_some_and(|f| f.holds() && self.term.is_some_and(|t| t.epoch == f.epoch))
            }
        }
    }

    /// What is left of the start-up grace (of this term, in a cluster).
    fn grace_left(&self) -> Option<Duration> {
        self.config
            .startup_grace
            .checked_sub(self.started.elapsed())
            .filter(|left| !left.is_zero())
    }

    /// In a cluster: follows the lease. A new term claims the rollout state
    /// from PostgreSQL (a replica that lost the lease can save nothing
    /// after that) and starts like a restarted controller: the start-up
    /// grace first, the notes read again. Answers whether this driver leads.
    async fn take_term(&mut self) -> bool {
        let Store::Cluster { store, leadership } = &mut self.store else {
            return true;
        };
        let fence = leadership.borrow().filter(crate::cluster::Fence::holds);
        match (fence, self.term) {
            (None, None) => false,
            (None, Some(t)) => {
                info!(epoch = t.epoch, "standing by: this replica no longer leads");
                self.term = None;
                false
            }
            (Some(f), Some(t)) if f.epoch == t.epoch => {
                self.term = Some(f);
                true
            }
            (Some(f), _) => match store.claim(f).await {
                Ok(saved) => {
                    // This replica's copy of the repository may be older than
                    // what the last leader rolled out: fetch before planning.
                    if let Err(e) = self.git.sync().await {
                        warn!(error = %e, retry_in = ?TERM_RETRY, "leading needs the repository as it is now; cannot fetch it");
                        self.next = Some(Instant::now() + TERM_RETRY);
                        return false;
                    }
                    info!(
                        epoch = f.epoch,
                        restored = saved.is_some(),
                        "leading: the rollout state is claimed"
                    );
                    self.restore = saved.is_none();
                    self.renew_planner(saved.unwrap_or_default());
                    self.term = Some(f);
                    self.dirty = false;
                    self.notes_read = false;
                    self.book = NoteBook::default();
                    self.started = Instant::now();
                    self.wanted = true;
                    true
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?TERM_RETRY, "cannot claim the rollout state");
                    self.next = Some(Instant::now() + TERM_RETRY);
                    false
                }
            },
        }
    }

    /// Notes an invalid newest commit, and tells it, once.
    async fn note_invalid_head(&mut self, status: &GitStatus) {
        if let Some(head) = &status.head
            && !status.head_errors.is_empty()
            && status.loaded.as_ref() != Some(head)
        {
            warn!(commit = %head, errors = status.head_errors.len(), "commit is invalid; the fleet keeps what it runs");
            let now = SystemTime::now();
            let Some(note) = self.book.invalid(head, &status.head_errors, now) else {
                return;
            };
            self.submit_notes(vec![note]);
            if let Some(notify) = &self.notify {
                let told = notice::invalid(head, &status.head_errors, status.head_change.clone(), now);
                notify.enqueue(vec![told]).await;
            }
        }
    }

    fn submit_notes(&self, notes: Vec<Note>) {
        if let Some(writer) = &self.notes {
            for note in notes {
                writer.submit(note);
            }
        }
    }
}

/// Completes with the outcome of the save under way; never without one.
async fn saving(saving: Option<&mut persist::Saving>) -> Result<(), PersistError> {
    match saving {
        Some(saving) => persist::saved(saving).await,
        None => std::future::pending().await,
    }
}

/// Completes when `rx` has a new value; never without one.
async fn changed<T>(rx: Option<&mut watch::Receiver<T>>) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}
