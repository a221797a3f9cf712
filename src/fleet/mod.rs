//! The agent inventory. One task owns it: sessions send it what agents report
//! and get back what to reply; the reconcile driver pushes configs through a
//! [`FleetHandle`]; everyone else reads coalesced [`FleetSnapshot`]s from a
//! `watch` channel.

mod bindings;
pub mod capabilities;
pub mod record;
mod shared;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use capabilities::Capabilities;
pub use record::{AgentRecord, Contact, Delivery, Description, Health, RemoteConfigState, RemoteStatus, ReplyDecision};

// Defined in `model` so that the layers below the fleet (telemetry) can name them too.
pub use crate::model::{PushOutcome, Transport};

use crate::desired::ConfigBundle;
use crate::model::{ConfigHash, Identity, InstanceUid};
use crate::proto::AgentToServer;
use crate::telemetry::fleet::FleetCounts;
use crate::telemetry::{self, Registry};
use bindings::Bindings;
pub use bindings::BindingsError;
pub use shared::SharedConfigs;

/// Identifies one WebSocket connection; later connections get larger ids.
pub type ConnId = u64;

/// Snapshots are rebuilt at most this often while agents report changes. A
/// report that changes only liveness (a heartbeat) makes no snapshot at all:
/// see [`record::Liveness`].
const PUBLISH_EVERY: Duration = Duration::from_millis(50);
/// The longest polling interval an HTTP agent is credited with: one long
/// pause (a network hiccup) must not hide for hours that it has gone.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(600);
/// Commands waiting for the fleet task; sessions wait when it is full.
const COMMAND_QUEUE: usize = 4096;
/// Push batches queued for the fleet (the driver sends one per plan).
const PUSH_QUEUE: usize = 16;

/// The inventory at one moment, in uid order. The map is persistent: a new
/// snapshot shares everything with the last but the records that changed,
/// so publishing one costs what changed, not the size of the fleet.
#[derive(Debug, Default)]
pub struct FleetSnapshot {
    /// Grows with every published snapshot.
    pub version: u64,
    pub agents: imbl::OrdMap<InstanceUid, Arc<AgentRecord>>,
    /// The agents by connection, and the uid clashes so far.
    pub counts: FleetCounts,
}

impl FleetSnapshot {
    pub fn get(&self, uid: &InstanceUid) -> Option<&Arc<AgentRecord>> {
        self.agents.get(uid)
    }

    /// Every record, ordered by uid.
    pub fn sorted(&self) -> Vec<&Arc<AgentRecord>> {
        self.agents.values().collect()
    }

    /// What the inventory gauges show, kept up to date as records change.
    pub fn counts(&self) -> FleetCounts {
        self.counts
    }
}

/// Records by uid as snapshots hold them, counted by connection as they
/// change: a snapshot costs what changed since the last.
#[derive(Debug, Clone, Default)]
pub struct Records {
    map: imbl::OrdMap<InstanceUid, Arc<AgentRecord>>,
    counts: FleetCounts,
}

impl Records {
    pub fn get(&self, uid: &InstanceUid) -> Option<&Arc<AgentRecord>> {
        self.map.get(uid)
    }

    /// Sets `uid`'s record, or removes it (`None`).
    pub fn set(&mut self, uid: InstanceUid, record: Option<Arc<AgentRecord>>) {
        let old = match record {
            Some(r) => {
                self.counts.add(r.connected, r.transport);
                self.map.insert(uid, r)
            }
            None => self.map.remove(&uid),
        };
        if let Some(old) = old {
            self.counts.remove(old.connected, old.transport);
        }
    }

    /// The records as they are now.
    pub fn snapshot(&self, version: u64, uid_clashes: u64) -> FleetSnapshot {
        FleetSnapshot {
            version,
            agents: self.map.clone(),
            counts: FleetCounts {
                version,
                uid_clashes,
                ..self.counts
            },
        }
    }

    /// Whether `snapshot` holds these records as they are.
    pub fn published_in(&self, snapshot: &FleetSnapshot) -> bool {
        snapshot.agents.ptr_eq(&self.map)
    }
}

/// The one config waiting to go out on a WebSocket. A newer push replaces
/// one not yet sent (latest wins), so the last config a connection sends is
/// always the newest push, however fast pushes come.
#[derive(Default)]
pub struct PushSlot {
    bundle: Mutex<Option<Arc<ConfigBundle>>>,
    ready: Notify,
    closed: AtomicBool,
}

impl PushSlot {
    /// Puts `bundle` in the slot, replacing what waits there; false when the
    /// session has ended.
    pub fn put(&self, bundle: Arc<ConfigBundle>) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        *self.lock() = Some(bundle);
        self.ready.notify_one();
        true
    }

    /// Completes after a [`put`](Self::put); then [`take`](Self::take) may
    /// still find the slot empty (a push already taken).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    pub fn take(&self) -> Option<Arc<ConfigBundle>> {
        self.lock().take()
    }

    /// The session has ended: later pushes are refused.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.lock().take();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<ConfigBundle>>> {
        // The lock guards a plain replace or take: a panic cannot leave it half done.
        self.bundle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for PushSlot {
    /// The hash only: config bodies hold secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushSlot")
            .field("waiting", &self.lock().as_ref().map(|b| b.hash()))
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

/// What a WebSocket session gives the fleet so that pushes and replacement reach it.
#[derive(Debug, Clone)]
pub struct WsLink {
    pub conn: ConnId,
    /// The config to send next.
    pub push: Arc<PushSlot>,
    /// Cancelled when a newer connection for the same agent replaces this one.
    pub close: CancellationToken,
}

/// How a report arrived.
#[derive(Debug, Clone)]
pub enum Via {
    WebSocket(WsLink),
    Http,
}

/// What the session must put in its reply, besides the uid and capabilities.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub report_full_state: bool,
    /// Offer this uid in `agent_identification` (the agent asked for one).
    pub new_instance_uid: Option<InstanceUid>,
    /// A pushed config the agent has not yet reported receiving.
    pub remote_config: Option<Arc<ConfigBundle>>,
    /// This WebSocket was replaced by a newer one for the same agent: the
    /// report was ignored and the session should close.
    pub replaced: bool,
    /// The report came from a second agent under a uid in use: it was not
    /// applied, and `new_instance_uid` holds the uid offered instead.
    pub clash: bool,
    /// For a WebSocket report of a connected agent: where its heartbeats are
    /// recorded. Its session records the next heartbeats there itself
    /// (see [`record::is_heartbeat`]) and brings the fleet only the rest.
    pub liveness: Option<Arc<record::Liveness>>,
}

#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the fleet task has stopped")]
pub struct FleetStopped;

/// Why a report was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("the fleet task has stopped")]
    Stopped,
    /// The fleet's queue is full: an HTTP agent is told to come back later.
    #[error("the fleet is overloaded")]
    Busy,
    /// The uid is bound to another identity: the report was not applied.
    #[error("the agent's instance uid belongs to another identity")]
    Impersonation,
}

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// An HTTP agent silent for three of these is offline.
    pub heartbeat_interval: Duration,
    /// An agent offline this long is forgotten.
    pub retention: Duration,
    /// Where the agents' identity bindings are kept across restarts
    /// (`None`: not kept).
    pub bindings_file: Option<std::path::PathBuf>,
}

/// The default of [`FleetConfig::retention`]: long enough that agents away
/// for an outage keep their records (and their places in rollouts).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(72 * 60 * 60);

enum Command {
    Report {
        uid: InstanceUid,
        msg: Box<AgentToServer>,
        via: Via,
        /// The uid this WebSocket reported under before, when it changed
        /// (after the agent adopted a new instance uid).
        previous_uid: Option<InstanceUid>,
        /// Who the connection authenticated as (a token's name, a client
        /// certificate's subject); `None` when it did not.
        identity: Option<Identity>,
        reply: oneshot::Sender<Result<Reply, ReportError>>,
    },
    Closed {
        conn: ConnId,
        uid: InstanceUid,
    },
    Delivered {
        conn: ConnId,
        uid: InstanceUid,
        hash: ConfigHash,
    },
    /// Drops the uid's identity binding; answers whether it had one.
    Unbind {
        uid: InstanceUid,
        reply: oneshot::Sender<bool>,
    },
}

/// The way into the fleet task: cheap to clone.
#[derive(Clone)]
pub struct FleetHandle {
    tx: mpsc::Sender<Command>,
    /// Pushes, taken ahead of the reports queued on `tx`.
    pushes: mpsc::Sender<PushBatch>,
    snapshots: watch::Receiver<Arc<FleetSnapshot>>,
}

/// Configs to send, with the answer for each (in their order).
pub struct PushBatch {
    pub pushes: Vec<(InstanceUid, Arc<ConfigBundle>)>,
    pub reply: oneshot::Sender<Vec<PushOutcome>>,
}

impl FleetHandle {
    /// A handle that reads `snapshots` (a fleet larger than this process's)
    /// and hands pushes to whoever receives `pushes`; reports and unbinding
    /// still go to this fleet.
    pub fn routed(&self, snapshots: watch::Receiver<Arc<FleetSnapshot>>, pushes: mpsc::Sender<PushBatch>) -> Self {
        FleetHandle {
            tx: self.tx.clone(),
            pushes,
            snapshots,
        }
    }

    /// Sends `bundle` to the agent: over its WebSocket at once, or in the reply
    /// to its next HTTP request. Never invents anything: only what is pushed goes out.
    pub async fn push(&self, uid: InstanceUid, bundle: Arc<ConfigBundle>) -> Result<PushOutcome, FleetStopped> {
        let outcomes = self.push_all(vec![(uid, bundle)]).await?;
        outcomes.into_iter().next().ok_or(FleetStopped)
    }

    /// [`FleetHandle::push`] for many agents at once, taken by the fleet
    /// ahead of the reports waiting for it (a wave of ten thousand is one
    /// message, not ten thousand behind the agents' heartbeats). The
    /// outcomes are in the order of `pushes`.
    pub async fn push_all(
        &self,
        pushes: Vec<(InstanceUid, Arc<ConfigBundle>)>,
    ) -> Result<Vec<PushOutcome>, FleetStopped> {
        let (reply, rx) = oneshot::channel();
        self.pushes
            .send(PushBatch { pushes, reply })
            .await
            .map_err(|_| FleetStopped)?;
        rx.await.map_err(|_| FleetStopped)
    }

    /// Drops the identity `uid` is bound to, so its next report binds it
    /// afresh (an operator's decision: the agent's host got a new token).
    /// Answers whether it was bound.
    pub async fn unbind(&self, uid: InstanceUid) -> Result<bool, FleetStopped> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Unbind { uid, reply })
            .await
            .map_err(|_| FleetStopped)?;
        rx.await.map_err(|_| FleetStopped)
    }

    /// The newest snapshot.
    pub fn snapshot(&self) -> Arc<FleetSnapshot> {
        self.snapshots.borrow().clone()
    }

    /// A receiver that wakes on every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<FleetSnapshot>> {
        self.snapshots.clone()
    }

    /// Adds the inventory gauges to `registry`, counted from the newest
    /// snapshot when scraped.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let snapshots = self.snapshots.clone();
        telemetry::fleet::register(registry, move || {
            // Counted outside the channel's lock, so the fleet task never waits for a scrape.
            let snapshot = snapshots.borrow().clone();
            snapshot.counts()
        });
    }

    /// Applies an agent's message and returns what the reply must carry.
    ///
    /// A WebSocket report waits for room in the fleet's queue (the socket
    /// pushes back on its agent). An HTTP report does not: when the queue is
    /// full it is refused as [`ReportError::Busy`], so requests do not pile up
    /// and the agent is asked to retry later.
    pub async fn report(
        &self,
        uid: InstanceUid,
        msg: AgentToServer,
        via: Via,
        previous_uid: Option<InstanceUid>,
    ) -> Result<Reply, ReportError> {
        self.report_as(uid, msg, via, previous_uid, None).await
    }

    /// [`FleetHandle::report`] from a connection that authenticated as
    /// `identity`. The first identity a uid reports under is bound to it:
    /// reports under another are refused.
    pub async fn report_as(
        &self,
        uid: InstanceUid,
        msg: AgentToServer,
        via: Via,
        previous_uid: Option<InstanceUid>,
        identity: Option<Identity>,
    ) -> Result<Reply, ReportError> {
        let (reply, rx) = oneshot::channel();
        let http = matches!(via, Via::Http);
        let cmd = Command::Report {
            uid,
            msg: Box::new(msg),
            via,
            previous_uid,
            identity,
            reply,
        };
        if http {
            self.tx.try_send(cmd).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => ReportError::Busy,
                mpsc::error::TrySendError::Closed(_) => ReportError::Stopped,
            })?;
        } else {
            self.tx.send(cmd).await.map_err(|_| ReportError::Stopped)?;
        }
        rx.await.map_err(|_| ReportError::Stopped)?
    }

    /// WebSocket `conn` of `uid` has written a pushed config: its apply clock starts.
    pub async fn delivered(&self, conn: ConnId, uid: InstanceUid, hash: ConfigHash) {
        // A stopped fleet has nothing left to update.
        let _ = self.tx.send(Command::Delivered { conn, uid, hash }).await;
    }

    /// A WebSocket that reported as `uid` has closed.
    pub async fn closed(&self, conn: ConnId, uid: InstanceUid) {
        // A stopped fleet has nothing left to update.
        let _ = self.tx.send(Command::Closed { conn, uid }).await;
    }
}

/// Starts the fleet task. It stops when `cancel` fires or every handle is gone.
pub fn spawn(config: FleetConfig, cancel: CancellationToken) -> Result<(FleetHandle, JoinHandle<()>), BindingsError> {
    let bindings = Bindings::load(config.bindings_file, Instant::now())?;
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (pushes, push_rx) = mpsc::channel(PUSH_QUEUE);
    let (snap_tx, snapshots) = watch::channel(Arc::new(FleetSnapshot::default()));
    let fleet = Fleet {
        agents: HashMap::new(),
        heartbeat: config.heartbeat_interval,
        retention: config.retention,
        uid_clashes: 0,
        snapshots: snap_tx,
        version: 0,
        dirty: Vec::new(),
        published: Records::default(),
        last_publish: None,
        bindings,
        configs: SharedConfigs::default(),
    };
    let task = tokio::spawn(fleet.run(rx, push_rx, cancel));
    Ok((FleetHandle { tx, pushes, snapshots }, task))
}

struct Entry {
    record: Arc<AgentRecord>,
    /// When the agent last reported to the fleet, or went offline, on the
    /// monotonic clock the sweep uses.
    seen: Instant,
    /// The longest pause between two plain-HTTP reports on this connection:
    /// the agent's own polling interval, when longer than the default.
    poll_interval: Duration,
    ws: Option<WsLink>,
    /// Plain HTTP: the push offered in every reply until the agent reports its hash.
    pending: Option<Arc<ConfigBundle>>,
    /// The pending push has gone out in a reply at least once.
    pending_delivered: bool,
}

impl Entry {
    fn new(record: AgentRecord) -> Self {
        Entry {
            record: Arc::new(record),
            seen: Instant::now(),
            poll_interval: Duration::ZERO,
            ws: None,
            pending: None,
            pending_delivered: false,
        }
    }

    fn go_offline(&mut self, now: SystemTime) {
        // A WebSocket's session records its heartbeats, not the fleet: the
        // agent was there until now, and its retention runs from here.
        self.seen = Instant::now();
        self.ws = None;
        self.pending = None;
        Arc::make_mut(&mut self.record).set_offline(now);
    }

    fn delivered(&mut self, hash: ConfigHash, at: SystemTime) {
        let rec = Arc::make_mut(&mut self.record);
        rec.delivered = Some(Delivery {
            hash,
            at,
            epoch: rec.connection_epoch,
        });
    }
}

/// The WebSocket an agent is known on, as [`arbitrate`] needs it.
#[derive(Clone, Copy)]
struct Current<'a> {
    conn: ConnId,
    /// Connected, and it reported within the last heartbeat interval (one
    /// silent longer may be half-open: a host that rebooted).
    live: bool,
    record: &'a AgentRecord,
}

/// How a report's connection relates to the one the agent is known on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arbitration {
    /// Plain HTTP (any WebSocket of the agent is closed: it moved).
    Http,
    /// The WebSocket the agent is known on.
    Same,
    /// A newer WebSocket of the same agent: it replaces the known one.
    New,
    /// An older WebSocket, already replaced: the report is ignored.
    Stale,
    /// A second agent under a uid that a live connection uses (a cloned
    /// host): it is offered a uid of its own, and its report is not applied.
    Clash,
}

/// Decides which connection a report belongs to; `incoming` is the
/// WebSocket it came on (`None` for plain HTTP). Pure.
fn arbitrate(current: Option<Current<'_>>, incoming: Option<ConnId>, msg: &AgentToServer) -> Arbitration {
    let Some(conn) = incoming else {
        return Arbitration::Http;
    };
    match current {
        Some(c) if c.conn == conn => Arbitration::Same,
        Some(c) if c.conn > conn => Arbitration::Stale,
        Some(c) if c.live && describes_another(c.record, msg) => Arbitration::Clash,
        _ => Arbitration::New,
    }
}

/// True when `msg` carries a description that differs from the agent's.
fn describes_another(current: &AgentRecord, msg: &AgentToServer) -> bool {
    let (Some(known), Some(d)) = (current.description.as_deref(), msg.agent_description.as_ref()) else {
        return false;
    };
    let differs = |mine: &record::Attributes, theirs: &[crate::proto::KeyValue]| {
        mine.len() != theirs.len()
            || theirs.iter().any(|kv| {
                mine.get(&kv.key) != Some(record::any_value_text(kv.value.clone().unwrap_or_default()).as_str())
            })
    };
    differs(&known.identifying, &d.identifying_attributes)
        || differs(&known.non_identifying, &d.non_identifying_attributes)
}

struct Fleet {
    agents: HashMap<InstanceUid, Entry>,
    heartbeat: Duration,
    retention: Duration,
    /// Second agents found under a uid in use, given a uid of their own.
    uid_clashes: u64,
    snapshots: watch::Sender<Arc<FleetSnapshot>>,
    version: u64,
    /// Agents whose record changed (or that were forgotten) since the last snapshot.
    dirty: Vec<InstanceUid>,
    /// The last snapshot's records, brought up to date from `dirty` when the next is published.
    published: Records,
    last_publish: Option<Instant>,
    bindings: Bindings,
    configs: SharedConfigs,
}

impl Fleet {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut pushes: mpsc::Receiver<PushBatch>,
        cancel: CancellationToken,
    ) {
        let mut sweep = tokio::time::interval((self.heartbeat / 2).max(Duration::from_millis(10)));
        // The bindings being written, one write at a time.
        let mut writing: Option<JoinHandle<()>> = None;
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let due = self.publish_due();
            let bindings_due = self.bindings.write_due();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(batch) = pushes.recv() => {
                    let outcomes = batch
                        .pushes
                        .into_iter()
                        .map(|(uid, bundle)| {
                            let outcome = self.push(&uid, bundle);
                            tracing::debug!(agent = %uid, outcome = ?outcome, "push");
                            outcome
                        })
                        .collect();
                    let _ = batch.reply.send(outcomes);
                }
                _ = sweep.tick() => self.sweep(Instant::now(), SystemTime::now()),
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
                _ = tokio::time::sleep_until(bindings_due.unwrap_or_else(Instant::now)), if bindings_due.is_some() => {
                    if let Some((path, bytes)) = self.bindings.take_write(Instant::now()) {
                        if let Some(earlier) = writing.take() {
                            let _ = earlier.await;
                        }
                        writing = Some(tokio::task::spawn_blocking(move || bindings::write(&path, &bytes)));
                    }
                }
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                },
            }
            if self.publish_due().is_some_and(|d| d <= Instant::now()) {
                self.publish();
            }
        }
        if !self.dirty.is_empty() {
            self.publish();
        }
        // The last change is kept before the task ends.
        if let Some(earlier) = writing.take() {
            let _ = earlier.await;
        }
        if let Some(due) = self.bindings.write_due()
            && let Some((path, bytes)) = self.bindings.take_write(due.max(Instant::now()))
        {
            bindings::write(&path, &bytes);
        }
    }

    fn publish_due(&self) -> Option<Instant> {
        (!self.dirty.is_empty()).then(|| self.last_publish.map_or_else(Instant::now, |t| t + PUBLISH_EVERY))
    }

    fn publish(&mut self) {
        self.version += 1;
        for uid in self.dirty.drain(..) {
            let record = self.agents.get(&uid).map(|e| e.record.clone());
            self.published.set(uid, record);
        }
        let snapshot = self.published.snapshot(self.version, self.uid_clashes);
        self.snapshots.send_replace(Arc::new(snapshot));
        self.last_publish = Some(Instant::now());
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Report {
                uid,
                msg,
                via,
                previous_uid,
                identity,
                reply,
            } => {
                let r = match self.bindings.get(&uid) {
                    Some(bound) if identity.as_ref().map(|i| &i.name) != Some(bound) => {
                        tracing::warn!(
                            agent = %uid,
                            bound = %bound,
                            claimed = identity.as_ref().map_or("nobody", |i| &i.name),
                            "report refused: the uid is bound to another identity"
                        );
                        Err(ReportError::Impersonation)
                    }
                    _ => {
                        let reply = self.report(uid.clone(), *msg, via, previous_uid, SystemTime::now());
                        // Bound at its first report; the groups its token
                        // allows follow the tokens file as it changes.
                        if let Some(e) = self.agents.get_mut(&uid)
                            && let Some(id) = identity.as_ref()
                            && e.record.identity != identity
                            && !reply.clash
                        {
                            if self.bindings.get(&uid).is_none() {
                                self.bindings.bind(uid.clone(), id.name.clone(), Instant::now());
                            }
                            Arc::make_mut(&mut e.record).identity = identity;
                            self.dirty.push(uid.clone());
                        }
                        Ok(reply)
                    }
                };
                // The session may have gone; then nobody needs the reply.
                let _ = reply.send(r);
            }
            Command::Closed { conn, uid } => self.connection_lost(&uid, conn, SystemTime::now()),
            Command::Delivered { conn, uid, hash } => {
                if let Some(e) = self.agents.get_mut(&uid)
                    && e.ws.as_ref().is_some_and(|l| l.conn == conn)
                {
                    e.delivered(hash, SystemTime::now());
                    self.dirty.push(uid.clone());
                }
            }
            Command::Unbind { uid, reply } => {
                let had = self.bindings.unbind(&uid);
                if let Some(e) = self.agents.get_mut(&uid)
                    && e.record.identity.is_some()
                {
                    Arc::make_mut(&mut e.record).identity = None;
                    self.dirty.push(uid.clone());
                }
                if had {
                    tracing::info!(agent = %uid, "identity binding dropped by an operator");
                }
                let _ = reply.send(had);
            }
        }
    }

    fn report(
        &mut self,
        uid: InstanceUid,
        msg: AgentToServer,
        via: Via,
        previous_uid: Option<InstanceUid>,
        now: SystemTime,
    ) -> Reply {
        if let (Some(old), Via::WebSocket(link)) = (&previous_uid, &via)
            && *old != uid
        {
            self.connection_lost(old, link.conn, now);
        }
        let mut entry = self.agents.remove(&uid);
        let current = entry.as_ref().and_then(|e| {
            let conn = e.ws.as_ref()?.conn;
            // Heartbeats on a WebSocket are recorded by its session, in the liveness.
            let silent = now.duration_since(e.record.liveness.last_seen()).unwrap_or_default();
            let live = e.record.connected && silent <= self.heartbeat;
            Some(Current {
                conn,
                live,
                record: &e.record,
            })
        });
        let incoming = match &via {
            Via::WebSocket(link) => Some(link.conn),
            Via::Http => None,
        };
        let (transport, new_connection) = match arbitrate(current, incoming, &msg) {
            Arbitration::Http => {
                // An agent that moved from a WebSocket to plain HTTP.
                if let Some(old) = entry.as_mut().and_then(|e| e.ws.take()) {
                    old.close.cancel();
                }
                (Transport::Http, false)
            }
            Arbitration::Same => (Transport::WebSocket, false),
            Arbitration::New => (Transport::WebSocket, true),
            Arbitration::Stale => {
                if let Some(e) = entry {
                    self.agents.insert(uid, e);
                }
                return Reply {
                    replaced: true,
                    ..Reply::default()
                };
            }
            Arbitration::Clash => {
                let fresh = InstanceUid::new_v7();
                self.uid_clashes += 1;
                // The count is published with the next snapshot.
                self.dirty.push(uid.clone());
                tracing::warn!(
                    agent = %uid, conn = ?incoming, new_uid = %fresh,
                    "a second agent reported under a uid in use; offered it a new uid"
                );
                if let Some(e) = entry {
                    self.agents.insert(uid, e);
                }
                return Reply {
                    new_instance_uid: Some(fresh),
                    clash: true,
                    ..Reply::default()
                };
            }
        };
        let contact = Contact {
            now,
            transport,
            new_connection,
        };
        // The hash this message says the agent received, in any status.
        let acknowledged = msg
            .remote_config_status
            .as_ref()
            .and_then(|s| ConfigHash::from_wire(&s.last_remote_config_hash));
        let mono = Instant::now();
        let (mut entry, decision) = match entry {
            None => {
                let (mut rec, decision) = record::apply(None, &uid, msg, contact);
                self.configs.share_new(&mut rec, None);
                (Entry::new(rec), decision)
            }
            Some(mut e) => {
                let epoch = e.record.connection_epoch;
                let decision = if record::liveness_only(&e.record, &msg, contact) {
                    // A heartbeat: no new record, nothing to publish.
                    e.record.liveness.touch(now, msg.sequence_num);
                    ReplyDecision::default()
                } else {
                    let (mut rec, decision) = record::apply(Some(&e.record), &uid, msg, contact);
                    if decision.changed {
                        self.configs.share_new(&mut rec, Some(&e.record));
                        e.record = Arc::new(rec);
                    } else {
                        e.record.liveness.touch(now, rec.liveness.sequence_num());
                    }
                    decision
                };
                if transport == Transport::Http {
                    e.poll_interval = if e.record.connection_epoch != epoch {
                        Duration::ZERO
                    } else {
                        let gap = mono.saturating_duration_since(e.seen).min(MAX_POLL_INTERVAL);
                        e.poll_interval.max(gap)
                    };
                }
                (e, decision)
            }
        };
        entry.seen = mono;
        if let (Via::WebSocket(link), true) = (&via, new_connection) {
            tracing::debug!(agent = %uid, conn = link.conn, "agent connected");
            if let Some(old) = entry.ws.replace(link.clone()) {
                tracing::info!(agent = %uid, old = old.conn, new = link.conn, "newer connection replaces the old one");
                old.close.cancel();
            }
        }
        if decision.disconnected {
            tracing::debug!(agent = %uid, "agent said goodbye");
            entry.pending = None;
        }
        if let Some(why) = entry.record.capabilities.unsupported_reason()
            && entry.pending.take().is_some()
        {
            tracing::info!(agent = %uid, reason = why, "its pending push is dropped");
        }
        // Only a report after the push went out acknowledges it: an agent
        // stuck at APPLYING for the hash is being given it once more.
        if entry.pending_delivered && entry.pending.as_ref().is_some_and(|b| acknowledged == Some(b.hash())) {
            tracing::debug!(agent = %uid, "agent reported the pushed config; no longer offered");
            entry.pending = None;
        }
        // A plain-HTTP reply can be lost on the way, and the reconciler pushes
        // once per connection: the push rides on every reply until the agent
        // reports its hash (agents take a repeated offer of the same hash as
        // a no-op). Its apply clock starts with the first reply that carries
        // it. A WebSocket delivers in order or closes, so once is enough.
        let remote_config = match transport {
            Transport::Http => entry.pending.clone(),
            Transport::WebSocket => entry.pending.take(),
        };
        let mut changed = decision.changed;
        if let Some(b) = &remote_config
            && !std::mem::replace(&mut entry.pending_delivered, true)
        {
            entry.delivered(b.hash(), now);
            changed = true;
        }
        let reply = Reply {
            report_full_state: decision.report_full_state,
            new_instance_uid: decision.new_instance_uid.then(InstanceUid::new_v7),
            remote_config,
            replaced: false,
            clash: false,
            liveness: (transport == Transport::WebSocket && entry.record.connected)
                .then(|| entry.record.liveness.clone()),
        };
        if changed {
            self.dirty.push(uid.clone());
        }
        self.agents.insert(uid, entry);
        reply
    }

    /// The WebSocket `conn` that reported as `uid` is gone. A connection that
    /// was already replaced changes nothing.
    fn connection_lost(&mut self, uid: &InstanceUid, conn: ConnId, now: SystemTime) {
        if let Some(e) = self.agents.get_mut(uid)
            && e.ws.as_ref().is_some_and(|l| l.conn == conn)
        {
            tracing::debug!(agent = %uid, conn, "agent connection closed");
            e.go_offline(now);
            self.dirty.push(uid.clone());
        }
    }

    fn push(&mut self, uid: &InstanceUid, bundle: Arc<ConfigBundle>) -> PushOutcome {
        let Some(e) = self.agents.get_mut(uid) else {
            return PushOutcome::NotConnected;
        };
        if !e.record.connected {
            return PushOutcome::NotConnected;
        }
        if e.record.capabilities.unsupported_reason().is_some() {
            return PushOutcome::NotAccepted;
        }
        let Some(link) = &e.ws else {
            e.pending = Some(bundle);
            e.pending_delivered = false;
            return PushOutcome::Queued;
        };
        if link.push.put(bundle) {
            e.pending = None;
            PushOutcome::Sent
        } else {
            // The session is ending; its close will mark the agent offline.
            PushOutcome::NotConnected
        }
    }

    fn sweep(&mut self, mono: Instant, now: SystemTime) {
        for (uid, e) in &mut self.agents {
            let interval = self.heartbeat.max(e.poll_interval);
            if record::is_stale(&e.record, mono.saturating_duration_since(e.seen), interval) {
                tracing::info!(agent = %uid, "HTTP agent missed three heartbeats; offline");
                e.go_offline(now);
                self.dirty.push(uid.clone());
            }
        }
        let retention = self.retention;
        let before = self.dirty.len();
        let dirty = &mut self.dirty;
        self.agents.retain(|uid, e| {
            let keep = e.record.connected || mono.saturating_duration_since(e.seen) <= retention;
            if !keep {
                dirty.push(uid.clone());
            }
            keep
        });
        let agents = &self.agents;
        self.bindings.expire(|uid| agents.contains_key(uid), mono, retention);
        let forgotten = self.dirty.len() - before;
        if forgotten > 0 {
            tracing::info!(
                forgotten,
                retention = %humantime::format_duration(retention),
                "forgot agents offline longer than the retention"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    #[tokio::test]
    async fn a_full_queue_refuses_http_reports() {
        let (tx, rx) = mpsc::channel(1);
        let (_snap_tx, snapshots) = watch::channel(Arc::new(FleetSnapshot::default()));
        let (pushes, _push_rx) = mpsc::channel(1);
        let fleet = FleetHandle { tx, pushes, snapshots };
        let uid = InstanceUid::Uuid([3; 16]);
        // Nobody drains the queue: its one slot fills.
        let first = tokio::spawn({
            let fleet = fleet.clone();
            let uid = uid.clone();
            async move { fleet.report(uid, AgentToServer::default(), Via::Http, None).await }
        });
        while rx.is_empty() {
            tokio::task::yield_now().await;
        }
        let busy = fleet
            .report(uid.clone(), AgentToServer::default(), Via::Http, None)
            .await;
        assert_eq!(busy.unwrap_err(), ReportError::Busy);
        drop(rx);
        assert_eq!(first.await.unwrap().unwrap_err(), ReportError::Stopped);
    }

    use bytes::Bytes;

    use super::*;
    use crate::desired::ConfigFile;
    use crate::proto::RemoteConfigStatus;

    fn msg(uid: &InstanceUid, seq: u64, caps: u64) -> AgentToServer {
        AgentToServer {
            instance_uid: Bytes::copy_from_slice(uid.as_bytes()),
            sequence_num: seq,
            capabilities: caps,
            agent_description: Some(Default::default()),
            ..Default::default()
        }
    }

    /// A plain-HTTP report of `uid` with only its capabilities.
    async fn poll(fleet: &FleetHandle, uid: &InstanceUid, seq: u64, caps: u64) -> Reply {
        fleet
            .report(uid.clone(), msg(uid, seq, caps), Via::Http, None)
            .await
            .expect("the fleet answers")
    }

    fn bundle(body: &str) -> Arc<ConfigBundle> {
        Arc::new(ConfigBundle::new(BTreeMap::from([(
            String::new(),
            ConfigFile {
                content_type: "text/yaml".into(),
                body: Bytes::copy_from_slice(body.as_bytes()),
            },
        )])))
    }

    fn link(conn: ConnId) -> (WsLink, Arc<PushSlot>) {
        let slot = Arc::new(PushSlot::default());
        (
            WsLink {
                conn,
                push: slot.clone(),
                close: CancellationToken::new(),
            },
            slot,
        )
    }

    fn start(heartbeat: Duration) -> (FleetHandle, CancellationToken) {
        let cancel = CancellationToken::new();
        let (h, _) = spawn(
            FleetConfig {
                heartbeat_interval: heartbeat,
                retention: Duration::from_secs(3600),
                bindings_file: None,
            },
            cancel.clone(),
        )
        .unwrap();
        (h, cancel)
    }

    #[tokio::test(start_paused = true)]
    async fn pushes_in_one_batch_answer_in_their_order() {
        let (fleet, _c) = start(Duration::from_secs(30));
        let (known, unknown, refusing) = (
            InstanceUid::Uuid([1; 16]),
            InstanceUid::Uuid([2; 16]),
            InstanceUid::Uuid([3; 16]),
        );
        poll(&fleet, &known, 0, 0x1003).await;
        poll(&fleet, &refusing, 0, 0x1).await;
        let outcomes = fleet
            .push_all(vec![
                (unknown, bundle("a")),
                (known, bundle("a")),
                (refusing, bundle("a")),
            ])
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            [PushOutcome::NotConnected, PushOutcome::Queued, PushOutcome::NotAccepted]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn push_over_http_waits_for_the_next_report_and_newest_wins() {
        let (fleet, _c) = start(Duration::from_secs(30));
        let uid = InstanceUid::Uuid([1; 16]);
        assert_eq!(
            fleet.push(uid.clone(), bundle("a")).await.unwrap(),
            PushOutcome::NotConnected
        );
        poll(&fleet, &uid, 0, 0x1).await;
        assert_eq!(
            fleet.push(uid.clone(), bundle("a")).await.unwrap(),
            PushOutcome::NotAccepted
        );
        poll(&fleet, &uid, 1, 0x1003).await;
        assert_eq!(fleet.push(uid.clone(), bundle("a")).await.unwrap(), PushOutcome::Queued);
        assert_eq!(fleet.push(uid.clone(), bundle("b")).await.unwrap(), PushOutcome::Queued);
        let r = poll(&fleet, &uid, 2, 0x1003).await;
        assert_eq!(r.remote_config.map(|b| b.hash()), Some(bundle("b").hash()));
        let r = poll(&fleet, &uid, 3, 0x1003).await;
        assert_eq!(
            r.remote_config.map(|b| b.hash()),
            Some(bundle("b").hash()),
            "offered again until the agent reports it"
        );
        for (seq, (hash, status)) in [(bundle("a").hash(), 1), (bundle("b").hash(), 3)]
            .into_iter()
            .enumerate()
        {
            let report = AgentToServer {
                remote_config_status: Some(RemoteConfigStatus {
                    last_remote_config_hash: Bytes::copy_from_slice(hash.as_bytes()),
                    status,
                    error_message: String::new(),
                }),
                ..msg(&uid, 4 + seq as u64, 0x1003)
            };
            let r = fleet.report(uid.clone(), report, Via::Http, None).await.unwrap();
            let acknowledged = hash == bundle("b").hash();
            assert_eq!(
                r.remote_config.is_none(),
                acknowledged,
                "only its own hash (in any status) ends the offer"
            );
        }
        let r = poll(&fleet, &uid, 6, 0x1003).await;
        assert!(r.remote_config.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pending_push_is_dropped_when_the_agent_stops_accepting_remote_config() {
        let (fleet, _c) = start(Duration::from_secs(30));
        let uid = InstanceUid::Uuid([4; 16]);
        poll(&fleet, &uid, 0, 0x1003).await;
        assert_eq!(fleet.push(uid.clone(), bundle("a")).await.unwrap(), PushOutcome::Queued);
        let r = poll(&fleet, &uid, 1, 0x1).await;
        assert!(
            r.remote_config.is_none(),
            "not offered to an agent without AcceptsRemoteConfig"
        );
        let r = poll(&fleet, &uid, 2, 0x1003).await;
        assert!(r.remote_config.is_none(), "the push was dropped, not kept");
    }

    #[tokio::test(start_paused = true)]
    async fn websocket_replacement_and_stale_close() {
        let (fleet, _c) = start(Duration::from_secs(30));
        let uid = InstanceUid::Uuid([2; 16]);
        let (old, _old_rx) = link(1);
        let (new, new_rx) = link(2);
        fleet
            .report(uid.clone(), msg(&uid, 0, 0x1003), Via::WebSocket(old.clone()), None)
            .await
            .unwrap();
        fleet
            .report(uid.clone(), msg(&uid, 0, 0x1003), Via::WebSocket(new.clone()), None)
            .await
            .unwrap();
        assert!(old.close.is_cancelled(), "the old connection is told to close");
        let r = fleet
            .report(uid.clone(), msg(&uid, 1, 0x1003), Via::WebSocket(old.clone()), None)
            .await
            .unwrap();
        assert!(r.replaced);
        fleet.closed(1, uid.clone()).await;
        assert_eq!(fleet.push(uid.clone(), bundle("x")).await.unwrap(), PushOutcome::Sent);
        assert_eq!(fleet.push(uid.clone(), bundle("y")).await.unwrap(), PushOutcome::Sent);
        new_rx.ready().await;
        assert_eq!(new_rx.take().map(|b| b.hash()), Some(bundle("y").hash()), "latest wins");
        assert!(new_rx.take().is_none());
        new_rx.close();
        assert_eq!(
            fleet.push(uid.clone(), bundle("z")).await.unwrap(),
            PushOutcome::NotConnected,
            "a closed session takes no pushes"
        );
        // Paused time: this lets every snapshot due be published.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let s = fleet.snapshot();
        let rec = s.get(&uid).unwrap();
        assert!(
            rec.connected,
            "the old connection's close does not make the agent offline"
        );
        assert_eq!(rec.connection_epoch, 1);
        let mut snaps = fleet.subscribe();

        fleet.closed(2, uid.clone()).await;
        let s = snaps.wait_for(|s| s.get(&uid).is_some_and(|r| !r.connected)).await;
        assert!(s.is_ok());
    }

    use crate::desired::AgentAttributes;

    fn described(uid: &InstanceUid, seq: u64, host: &str) -> AgentToServer {
        use crate::proto::{AgentDescription, AnyValue, KeyValue, any_value::Value};
        AgentToServer {
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![],
                non_identifying_attributes: vec![KeyValue {
                    key: "host.name".into(),
                    value: Some(AnyValue {
                        value: Some(Value::StringValue(host.into())),
                    }),
                }],
            }),
            ..msg(uid, seq, 0x1003)
        }
    }

    #[test]
    fn which_connection_a_report_belongs_to() {
        let uid = InstanceUid::Uuid([12; 16]);
        let (known, _) = record::apply(
            None,
            &uid,
            described(&uid, 0, "host-a"),
            Contact {
                now: SystemTime::UNIX_EPOCH,
                transport: Transport::WebSocket,
                new_connection: true,
            },
        );
        let on = |conn, live| {
            Some(Current {
                conn,
                live,
                record: &known,
            })
        };
        let same = described(&uid, 1, "host-a");
        let other = described(&uid, 0, "host-b");
        let silent = AgentToServer {
            agent_description: None,
            ..msg(&uid, 1, 0x1003)
        };
        type Case<'a> = (
            &'a str,
            Option<Current<'a>>,
            Option<ConnId>,
            &'a AgentToServer,
            Arbitration,
        );
        let cases: &[Case<'_>] = &[
            ("plain HTTP", on(5, true), None, &same, Arbitration::Http),
            ("first WebSocket of the agent", None, Some(5), &same, Arbitration::New),
            ("the known WebSocket", on(5, true), Some(5), &other, Arbitration::Same),
            (
                "an older, replaced WebSocket",
                on(5, true),
                Some(4),
                &same,
                Arbitration::Stale,
            ),
            (
                "a reconnect that describes itself alike",
                on(5, true),
                Some(6),
                &same,
                Arbitration::New,
            ),
            (
                "a reconnect that sends no description",
                on(5, true),
                Some(6),
                &silent,
                Arbitration::New,
            ),
            (
                "another host under a live uid",
                on(5, true),
                Some(6),
                &other,
                Arbitration::Clash,
            ),
            (
                "another description while the old one is silent",
                on(5, false),
                Some(6),
                &other,
                Arbitration::New,
            ),
        ];
        for (name, current, incoming, m, want) in cases {
            assert_eq!(arbitrate(*current, *incoming, m), *want, "{name}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_agent_under_a_live_uid_is_offered_its_own_uid_and_changes_nothing() {
        let (fleet, _c) = start(Duration::from_secs(30));
        let uid = InstanceUid::Uuid([6; 16]);
        let (first, first_rx) = link(1);
        let (clone, _clone_rx) = link(2);
        let r = fleet
            .report(
                uid.clone(),
                described(&uid, 0, "host-a"),
                Via::WebSocket(first.clone()),
                None,
            )
            .await
            .unwrap();
        assert!(!r.clash);
        let r = fleet
            .report(
                uid.clone(),
                described(&uid, 0, "host-b"),
                Via::WebSocket(clone.clone()),
                None,
            )
            .await
            .unwrap();
        assert!(r.clash, "another description under a live uid is another agent");
        let offered = r.new_instance_uid.expect("a uid of its own");
        assert_ne!(offered, uid);
        assert!(matches!(offered, InstanceUid::Uuid(_)), "16 bytes");
        assert!(!first.close.is_cancelled(), "the first agent keeps its connection");
        // The clone adopts its uid; the first agent is untouched.
        fleet
            .report(
                offered.clone(),
                described(&offered, 1, "host-b"),
                Via::WebSocket(clone.clone()),
                Some(uid.clone()),
            )
            .await
            .unwrap();
        let mut snaps = fleet.subscribe();
        let s = snaps.wait_for(|s| s.agents.len() == 2).await.unwrap().clone();
        assert_eq!(s.counts().uid_clashes, 1);
        let a = s.get(&uid).unwrap();
        assert!(a.connected);
        assert_eq!(a.attribute("host.name"), Some("host-a"));
        assert_eq!(s.get(&offered).unwrap().attribute("host.name"), Some("host-b"));
        assert_eq!(fleet.push(uid.clone(), bundle("a")).await.unwrap(), PushOutcome::Sent);
        assert_eq!(
            first_rx.take().map(|b| b.hash()),
            Some(bundle("a").hash()),
            "to the first agent's socket"
        );
        // The same agent reconnecting (same description) replaces its old socket.
        let (again, _again_rx) = link(3);
        let r = fleet
            .report(uid.clone(), described(&uid, 2, "host-a"), Via::WebSocket(again), None)
            .await
            .unwrap();
        assert!(!r.clash);
        assert!(first.close.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn delivery_is_recorded_at_the_first_http_reply_and_at_the_websocket_write() {
        let (fleet, _c) = start(Duration::from_secs(30));
        let uid = InstanceUid::Uuid([7; 16]);
        poll(&fleet, &uid, 0, 0x1003).await;
        fleet.push(uid.clone(), bundle("a")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            fleet.snapshot().get(&uid).unwrap().delivered,
            None,
            "queued is not delivered"
        );
        poll(&fleet, &uid, 1, 0x1003).await;
        let mut snaps = fleet.subscribe();
        let s = snaps
            .wait_for(|s| s.get(&uid).is_some_and(|r| r.delivered.is_some()))
            .await
            .unwrap()
            .clone();
        let first = s.get(&uid).unwrap().delivered_now().unwrap();
        assert_eq!(first.hash, bundle("a").hash());
        tokio::time::sleep(Duration::from_secs(5)).await;
        let r = poll(&fleet, &uid, 2, 0x1003).await;
        assert!(r.remote_config.is_some(), "offered again");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            fleet.snapshot().get(&uid).unwrap().delivered,
            Some(first),
            "a repeated offer does not restart the clock"
        );

        // WebSocket: delivered when the session says it wrote the frame.
        let ws = InstanceUid::Uuid([8; 16]);
        let (l, rx) = link(9);
        fleet
            .report(ws.clone(), msg(&ws, 0, 0x1003), Via::WebSocket(l), None)
            .await
            .unwrap();
        fleet.push(ws.clone(), bundle("b")).await.unwrap();
        assert!(rx.take().is_some());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(fleet.snapshot().get(&ws).unwrap().delivered, None);
        fleet.delivered(9, ws.clone(), bundle("b").hash()).await;
        let s = snaps
            .wait_for(|s| s.get(&ws).is_some_and(|r| r.delivered.is_some()))
            .await
            .unwrap()
            .clone();
        assert_eq!(
            s.get(&ws).unwrap().delivered_now().map(|d| d.hash),
            Some(bundle("b").hash())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_http_agent_that_polls_slower_than_the_default_is_judged_by_its_own_interval() {
        let (fleet, _c) = start(Duration::from_secs(10));
        let uid = InstanceUid::Uuid([10; 16]);
        poll(&fleet, &uid, 0, 0x1003).await;
        tokio::time::sleep(Duration::from_secs(20)).await;
        poll(&fleet, &uid, 1, 0x1003).await;
        // Polls every 20 s: silent for 50 s is not yet three of its intervals.
        tokio::time::sleep(Duration::from_secs(50)).await;
        assert!(fleet.snapshot().get(&uid).unwrap().connected);
        let mut snaps = fleet.subscribe();
        let s = snaps
            .wait_for(|s| s.get(&uid).is_some_and(|r| !r.connected))
            .await
            .unwrap()
            .clone();
        assert!(s.get(&uid).unwrap().disconnected_at.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn http_agents_go_offline_after_three_silent_intervals() {
        let (fleet, _c) = start(Duration::from_secs(10));
        let uid = InstanceUid::Uuid([3; 16]);
        poll(&fleet, &uid, 0, 0x1).await;
        let mut snaps = fleet.subscribe();
        let s = snaps.wait_for(|s| s.get(&uid).is_some()).await.unwrap().clone();
        assert!(s.get(&uid).unwrap().connected);
        tokio::time::sleep(Duration::from_secs(25)).await;
        poll(&fleet, &uid, 1, 0x1).await;
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(fleet.snapshot().get(&uid).unwrap().connected, "a poll resets the clock");
        let s = snaps
            .wait_for(|s| s.get(&uid).is_some_and(|r| !r.connected))
            .await
            .unwrap()
            .clone();
        assert!(s.get(&uid).unwrap().disconnected_at.is_some());
        assert_eq!(
            fleet.push(uid.clone(), bundle("late")).await.unwrap(),
            PushOutcome::NotConnected
        );
    }

    #[tokio::test(start_paused = true)]
    async fn agents_offline_longer_than_the_retention_are_forgotten() {
        let (fleet, _c) = start(Duration::from_secs(10));
        let (gone, staying) = (InstanceUid::Uuid([4; 16]), InstanceUid::Uuid([5; 16]));
        poll(&fleet, &gone, 0, 0x1).await;
        let mut snaps = fleet.subscribe();
        snaps
            .wait_for(|s| s.get(&gone).is_some_and(|r| !r.connected))
            .await
            .unwrap();
        // Offline, but within the hour of retention: still listed.
        tokio::time::sleep(Duration::from_secs(3000)).await;
        assert!(fleet.snapshot().get(&gone).is_some());
        poll(&fleet, &staying, 0, 0x1).await;
        let s = snaps.wait_for(|s| s.get(&gone).is_none()).await.unwrap().clone();
        assert!(s.get(&staying).is_some(), "a recent agent stays");
    }

    #[tokio::test(start_paused = true)]
    async fn the_counts_follow_agents_as_they_connect_leave_and_are_forgotten() {
        let (fleet, _c) = start(Duration::from_secs(10));
        let (ws, http) = (InstanceUid::Uuid([6; 16]), InstanceUid::Uuid([7; 16]));
        let (link, _rx) = link(1);
        fleet
            .report(ws.clone(), msg(&ws, 0, 0x1003), Via::WebSocket(link), None)
            .await
            .unwrap();
        poll(&fleet, &http, 0, 0x1).await;
        let mut snaps = fleet.subscribe();
        assert_eq!(counts_once(&mut snaps, |s| s.agents.len() == 2).await, (1, 1, 0));
        fleet.closed(1, ws.clone()).await;
        let offline = |uid: &InstanceUid| {
            let uid = uid.clone();
            move |s: &FleetSnapshot| s.get(&uid).is_some_and(|r| !r.connected)
        };
        assert_eq!(counts_once(&mut snaps, offline(&ws)).await, (0, 1, 1));
        assert_eq!(counts_once(&mut snaps, offline(&http)).await, (0, 0, 2));
        assert_eq!(counts_once(&mut snaps, |s| s.agents.is_empty()).await, (0, 0, 0));
    }

    /// The counts (WebSocket, HTTP, offline) of the first snapshot that
    /// `ready` accepts, after checking them against a recount of its records.
    async fn counts_once(
        snaps: &mut watch::Receiver<Arc<FleetSnapshot>>,
        ready: impl Fn(&FleetSnapshot) -> bool,
    ) -> (u64, u64, u64) {
        let s = snaps.wait_for(|s| ready(s)).await.unwrap().clone();
        let mut recount = FleetCounts {
            version: s.version,
            ..FleetCounts::default()
        };
        for r in s.agents.values() {
            recount.add(r.connected, r.transport);
        }
        let c = s.counts();
        assert_eq!(c, recount);
        (c.connected_websocket, c.connected_http, c.offline)
    }

    #[tokio::test(start_paused = true)]
    async fn the_retention_runs_from_when_a_websocket_closed() {
        // Its session records the heartbeats: the fleet hears nothing for
        // longer than the retention while the agent is connected.
        let (fleet, _c) = start(Duration::from_secs(10));
        let uid = InstanceUid::Uuid([6; 16]);
        let (l, _slot) = link(1);
        fleet
            .report(uid.clone(), msg(&uid, 0, 0x1003), Via::WebSocket(l), None)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(7200)).await;
        fleet.closed(1, uid.clone()).await;
        let mut snaps = fleet.subscribe();
        snaps
            .wait_for(|s| s.get(&uid).is_some_and(|r| !r.connected))
            .await
            .unwrap();
        // Sweeps run meanwhile; another agent's report makes a new snapshot.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let other = InstanceUid::Uuid([7; 16]);
        poll(&fleet, &other, 0, 0x1).await;
        let s = snaps.wait_for(|s| s.get(&other).is_some()).await.unwrap().clone();
        assert!(s.get(&uid).is_some(), "offline for a minute, not for the retention");
    }

    #[tokio::test(start_paused = true)]
    async fn snapshots_are_versioned_and_coalesced() {
        let (fleet, _c) = start(Duration::from_secs(30));
        let mut snaps = fleet.subscribe();
        for i in 0..100u8 {
            let uid = InstanceUid::Uuid([i; 16]);
            poll(&fleet, &uid, 0, 0x1).await;
        }
        let s = snaps.wait_for(|s| s.agents.len() == 100).await.unwrap().clone();
        assert!(s.version >= 1);
        assert!(
            s.version < 100,
            "100 reports in one instant coalesce into few snapshots"
        );
        let v = s.version;
        let uid = InstanceUid::Uuid([0; 16]);
        poll(&fleet, &uid, 1, 0x1).await;
        let s2 = snaps.wait_for(|s| s.version > v).await.unwrap().clone();
        assert_eq!(s2.agents.len(), 100);
    }
}
