//! The whole fleet, as the replicas wrote it to `opamp_agents`, and the
//! cluster's members: one task reads both and publishes them. The fleet is
//! read only while this replica holds the lease (the others' planners and
//! APIs are idle): all of it when it comes to lead, then what changed since
//! the last row read, on each notification. On the leader it also routes
//! the planner's pushes: to this replica's fleet directly, to another
//! replica's agents through `opamp_pushes`, fenced by the leader's epoch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_postgres::types::Json;
use tokio_util::sync::CancellationToken;

use super::db::{Database, Db, DbError};
use super::lease::{Fence, Member};
use super::replica::StoredBundle;
use super::row::Row;
use crate::fleet::{Capabilities, FleetHandle, FleetSnapshot, PushBatch, Records, SharedConfigs};
use crate::model::{ConfigHash, InstanceUid, PushOutcome, Transport};

/// How often the members and the leader are read again.
const MEMBERS_EVERY: Duration = Duration::from_secs(1);
/// Rows read by one query at most.
const PAGE: i64 = 5_000;

const CHANGED: &str = "SELECT uid, replica, boot, rev, record FROM opamp_agents WHERE rev > $1 ORDER BY rev LIMIT $2";
const OF_REPLICA: &str =
    "SELECT uid, replica, boot, rev, record FROM opamp_agents WHERE replica = $1 AND record IS NOT NULL";
const MEMBERS: &str = "SELECT id, boot, api_url, agents, last_seen, expires_at > now() FROM opamp_replicas ORDER BY id";
const LEADER: &str = "SELECT holder, epoch, expires_at > now() FROM opamp_leader WHERE id = 1";
const SAVE_BUNDLES: &str = "INSERT INTO opamp_configs (hash, bundle)
     SELECT h, b FROM unnest($1::bytea[], $2::jsonb[]) AS t(h, b) ON CONFLICT DO NOTHING";
const PUSH: &str = "INSERT INTO opamp_pushes (replica, uid, hash, epoch)
     SELECT r, u, h, $1 FROM unnest($2::text[], $3::bytea[], $4::bytea[]) AS t(r, u, h)
     WHERE EXISTS (SELECT 1 FROM opamp_leader WHERE id = 1 AND holder = $5 AND epoch = $1 AND expires_at > now())";
const NOTIFY: &str = "SELECT pg_notify('opamp_push', r) FROM unnest($1::text[]) AS t(r)";

/// One replica as `GET /api/v1/cluster` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub id: String,
    pub boot: i64,
    pub api_url: String,
    pub agents: u32,
    pub last_seen: SystemTime,
    /// Its lease has not run out.
    pub alive: bool,
}

/// The cluster's members and leader, as last read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    pub replicas: Vec<Replica>,
    /// The lease's holder and epoch, while the lease runs.
    pub leader: Option<(String, i64)>,
}

impl Members {
    /// Where the leader's API is, when there is a leader.
    pub fn leader_api(&self) -> Option<&str> {
        let (id, _) = self.leader.as_ref()?;
        self.replicas
            .iter()
            .find(|r| &r.id == id && r.alive)
            .map(|r| r.api_url.as_str())
    }

    fn alive(&self, replica: &str, boot: i64) -> bool {
        self.replicas
            .iter()
            .any(|r| r.id == replica && r.boot == boot && r.alive)
    }
}

/// What the view task publishes.
pub struct Outputs {
    pub snapshots: watch::Sender<Arc<FleetSnapshot>>,
    pub members: watch::Sender<Arc<Members>>,
}

/// The view task's state: the merged fleet and who holds each agent.
struct View {
    agents: Records,
    owners: HashMap<InstanceUid, Arc<str>>,
    members: Arc<Members>,
    rev: i64,
    version: u64,
    /// Whether the fleet is read (while this replica leads).
    reading: bool,
    configs: SharedConfigs,
}

pub async fn run(
    database: Database,
    member: Arc<Member>,
    local: FleetHandle,
    mut leadership: watch::Receiver<Option<Fence>>,
    mut pushes: mpsc::Receiver<PushBatch>,
    out: Outputs,
    cancel: CancellationToken,
) {
    let mut view = View {
        agents: Records::default(),
        owners: HashMap::new(),
        members: Arc::default(),
        rev: 0,
        version: 0,
        reading: false,
        configs: SharedConfigs::default(),
    };
    let mut saved: HashSet<ConfigHash> = HashSet::new();
    let mut retry = Duration::ZERO;
    'connect: loop {
        // Pushes are answered while the database is away: to this replica's
        // agents they still go, to the others' they cannot.
        let connected = tokio::select! {
            db = Db::connect_until(&database, "fleet view", &mut retry, &cancel) => db,
            Some(batch) = pushes.recv() => {
                let fence = *leadership.borrow();
                let outcomes = view.route(None, &member, &local, fence, &mut saved, batch.pushes).await;
                let _ = batch.reply.send(outcomes);
                continue 'connect;
            }
        };
        let Some(mut db) = connected else { break };
        let ready = async {
            db.migrate().await?;
            db.client.batch_execute("LISTEN opamp_agents").await?;
            Ok::<_, DbError>(())
        };
        if let Err(e) = ready.await {
            tracing::warn!(error = %e, "cannot read the cluster's fleet");
            continue;
        }
        // Bundles saved before may be gone with a database that restarted.
        saved.clear();
        // Everything is read again: rows swept while this replica could not
        // read them would otherwise stay in its view.
        let caught_up = async {
            view.read_members(&db).await?;
            if view.reading {
                view.reload(&db).await?;
            }
            Ok::<_, DbError>(())
        };
        if let Err(e) = caught_up.await {
            tracing::warn!(error = %e, "cannot read the cluster's fleet");
            continue;
        }
        view.publish(&out);
        let mut members = tokio::time::interval(MEMBERS_EVERY);
        loop {
            let result = tokio::select! {
                () = cancel.cancelled() => break 'connect,
                _ = members.tick() => view.read_members(&db).await,
                n = db.notifications.recv() => match n {
                    Some(_) => {
                        // One read covers every change notified so far.
                        while db.notifications.try_recv().is_ok() {}
                        if view.reading { view.read_changes(&db).await } else { Ok(()) }
                    }
                    None => { continue 'connect }
                },
                changed = leadership.changed() => {
                    if changed.is_err() { break 'connect }
                    let leads = leadership.borrow_and_update().is_some();
                    view.read_while(leads, &db).await
                }
                Some(batch) = pushes.recv() => {
                    let fence = *leadership.borrow();
                    let outcomes = view.route(Some(&db), &member, &local, fence, &mut saved, batch.pushes).await;
                    let _ = batch.reply.send(outcomes);
                    Ok(())
                }
            };
            match result {
                Ok(()) => {
                    retry = Duration::ZERO;
                    view.publish(&out);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the cluster's fleet failed; reconnecting");
                    continue 'connect;
                }
            }
        }
    }
}

impl View {
    /// Starts reading the fleet (all of it) when this replica comes to
    /// lead; stops, and forgets it, when it no longer does.
    async fn read_while(&mut self, leads: bool, db: &Db) -> Result<(), DbError> {
        match (leads, self.reading) {
            (true, false) => {
                self.reading = true;
                self.reload(db).await
            }
            (false, true) => {
                self.reading = false;
                self.agents = Records::default();
                self.configs = SharedConfigs::default();
                self.owners = HashMap::new();
                self.rev = 0;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Reads the rows written since the last one read.
    async fn read_changes(&mut self, db: &Db) -> Result<(), DbError> {
        loop {
            let rows = db.client.query(CHANGED, &[&self.rev, &PAGE]).await?;
            let n = rows.len();
            for row in rows {
                self.rev = self.rev.max(row.get(3));
                self.take(row)?;
            }
            if i64::try_from(n).unwrap_or(i64::MAX) < PAGE {
                return Ok(());
            }
        }
    }

    /// Reads every row afresh; on failure keeps what it had.
    async fn reload(&mut self, db: &Db) -> Result<(), DbError> {
        let agents = std::mem::take(&mut self.agents);
        let owners = std::mem::take(&mut self.owners);
        let rev = std::mem::replace(&mut self.rev, 0);
        let read = self.read_changes(db).await;
        if read.is_err() {
            (self.agents, self.owners, self.rev) = (agents, owners, rev);
        }
        read
    }

    /// Reads the members and the leader; the agents of a replica that came
    /// or went are read again, so they show connected or not.
    async fn read_members(&mut self, db: &Db) -> Result<(), DbError> {
        let replicas = db
            .client
            .query(MEMBERS, &[])
            .await?
            .iter()
            .map(|r| Replica {
                id: r.get(0),
                boot: r.get(1),
                api_url: r.get(2),
                agents: u32::try_from(r.get::<_, i32>(3)).unwrap_or_default(),
                last_seen: r.get(4),
                alive: r.get(5),
            })
            .collect::<Vec<_>>();
        let leader = db
            .client
            .query_opt(LEADER, &[])
            .await?
            .filter(|r| r.get::<_, bool>(2) && !r.get::<_, String>(0).is_empty())
            .map(|r| (r.get(0), r.get(1)));
        let next = Members { replicas, leader };
        if next == *self.members {
            return Ok(());
        }
        let flipped: Vec<String> = next
            .replicas
            .iter()
            .filter(|r| self.members.alive(&r.id, r.boot) != r.alive)
            .map(|r| r.id.clone())
            .chain(
                self.members
                    .replicas
                    .iter()
                    .filter(|r| r.alive && !next.replicas.iter().any(|n| n.id == r.id))
                    .map(|r| r.id.clone()),
            )
            .collect();
        self.members = Arc::new(next);
        if !self.reading {
            return Ok(());
        }
        for replica in flipped {
            for row in db.client.query(OF_REPLICA, &[&replica]).await? {
                self.take(row)?;
            }
        }
        Ok(())
    }

    /// One row into the view. A change of liveness alone updates the
    /// record in place, as a heartbeat does in the fleet: no new snapshot.
    fn take(&mut self, row: tokio_postgres::Row) -> Result<(), DbError> {
        let (uid, replica, boot): (&[u8], String, i64) = (row.get(0), row.get(1), row.get(2));
        let Ok(uid) = InstanceUid::from_wire(uid) else {
            return Ok(());
        };
        let row = match row.try_get::<_, Option<Json<Row>>>(4) {
            Ok(Some(Json(row))) => row,
            Ok(None) => {
                self.owners.remove(&uid);
                self.agents.set(uid, None);
                return Ok(());
            }
            Err(e) => {
                // Written by another version, say: the rest is still worth reading.
                tracing::warn!(agent = %uid, %replica, error = %e, "skipped an agent's unreadable row");
                return Ok(());
            }
        };
        let alive = self.members.alive(&replica, boot);
        let mut record = row.record(uid.clone(), boot, alive);
        if let Some(old) = self.agents.get(&uid) {
            let liveness = std::mem::replace(&mut record.liveness, Arc::clone(&old.liveness));
            if record == **old {
                old.liveness.touch(liveness.last_seen(), liveness.sequence_num());
                return Ok(());
            }
            record.liveness = liveness;
        }
        self.configs.share_new(&mut record, None);
        if self.owners.get(&uid).is_none_or(|o| **o != *replica) {
            self.owners.insert(uid.clone(), replica.into());
        }
        self.agents.set(uid, Some(Arc::new(record)));
        Ok(())
    }

    fn publish(&mut self, out: &Outputs) {
        out.members.send_if_modified(|m| {
            let changed = !Arc::ptr_eq(m, &self.members);
            *m = Arc::clone(&self.members);
            changed
        });
        if self.agents.published_in(&out.snapshots.borrow()) {
            return;
        }
        self.version += 1;
        out.snapshots
            .send_replace(Arc::new(self.agents.snapshot(self.version, 0)));
    }

    /// Sends each push where its agent is held, while `fence` holds (to
    /// other replicas only through `db`); the outcomes are in the order of
    /// `pushes`.
    async fn route(
        &self,
        db: Option<&Db>,
        member: &Member,
        local: &FleetHandle,
        fence: Option<Fence>,
        saved: &mut HashSet<ConfigHash>,
        pushes: Vec<(InstanceUid, Arc<crate::desired::ConfigBundle>)>,
    ) -> Vec<PushOutcome> {
        let mut outcomes = vec![PushOutcome::NotConnected; pushes.len()];
        let Some(fence) = fence.filter(Fence::holds) else {
            tracing::warn!(pushes = pushes.len(), "not the leader: pushes dropped");
            return outcomes;
        };
        let mut here = (Vec::new(), Vec::new());
        let mut there = Vec::new();
        for (i, (uid, bundle)) in pushes.into_iter().enumerate() {
            let (Some(owner), Some(r)) = (self.owners.get(&uid), self.agents.get(&uid)) else {
                continue;
            };
            if **owner == *member.replica {
                here.0.push(i);
                here.1.push((uid, bundle));
            } else if r.connected {
                let accepts = r.capabilities.has(Capabilities::ACCEPTS_REMOTE_CONFIG)
                    && r.capabilities.has(Capabilities::REPORTS_REMOTE_CONFIG);
                outcomes[i] = match (accepts, r.transport) {
                    (false, _) => PushOutcome::NotAccepted,
                    (true, Transport::WebSocket) => PushOutcome::Sent,
                    (true, Transport::Http) => PushOutcome::Queued,
                };
                if accepts {
                    there.push((i, Arc::clone(owner), uid, bundle));
                }
            }
        }
        // Each kind of push goes only while the lease still holds.
        if !here.1.is_empty() && fence.holds() {
            let answers = local.push_all(here.1).await.unwrap_or_default();
            for (i, o) in here.0.into_iter().zip(answers) {
                outcomes[i] = o;
            }
        }
        if there.is_empty() {
            return outcomes;
        }
        let sent = match db {
            Some(db) if fence.holds() => push_through_db(db, member, fence, saved, &there).await,
            Some(_) => Err(DbError::Fenced),
            None => Err(DbError::Unreachable),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, pushes = there.len(), "pushes to other replicas failed");
            for (i, ..) in &there {
                outcomes[*i] = PushOutcome::NotConnected;
            }
        }
        outcomes
    }
}

type Remote = (usize, Arc<str>, InstanceUid, Arc<crate::desired::ConfigBundle>);

/// Saves the bundles not saved yet, queues the pushes under the leader's
/// epoch (nothing is queued once the lease is lost) and wakes their replicas.
async fn push_through_db(
    db: &Db,
    member: &Member,
    fence: Fence,
    saved: &mut HashSet<ConfigHash>,
    pushes: &[Remote],
) -> Result<(), DbError> {
    let mut new: HashMap<ConfigHash, serde_json::Value> = HashMap::new();
    for (_, _, _, b) in pushes {
        if !saved.contains(&b.hash()) && !new.contains_key(&b.hash()) {
            new.insert(b.hash(), serde_json::to_value(StoredBundle(Arc::clone(b)))?);
        }
    }
    if !new.is_empty() {
        let hashes: Vec<&[u8]> = new.keys().map(|h| &h.0[..]).collect();
        let bodies: Vec<&serde_json::Value> = new.values().collect();
        db.client.execute(SAVE_BUNDLES, &[&hashes, &bodies]).await?;
        saved.extend(new.keys().copied());
    }
    let replicas: Vec<&str> = pushes.iter().map(|p| &*p.1).collect();
    let uids: Vec<&[u8]> = pushes.iter().map(|p| p.2.as_bytes()).collect();
    let hashes: Vec<Vec<u8>> = pushes.iter().map(|p| p.3.hash().0.to_vec()).collect();
    let queued = db
        .client
        .execute(PUSH, &[&fence.epoch, &replicas, &uids, &hashes, &member.replica])
        .await?;
    if queued == 0 {
        return Err(DbError::Fenced);
    }
    let mut woken: Vec<&str> = replicas.clone();
    woken.sort_unstable();
    woken.dedup();
    db.client.execute(NOTIFY, &[&woken]).await?;
    Ok(())
}
