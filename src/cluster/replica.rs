//! What every replica does for the cluster: writes its agents to
//! `opamp_agents` when something the planner reads changes (batched, as the
//! fleet's snapshots come), flushes liveness coarsely, and delivers the
//! pushes the leader addressed to it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_postgres::types::Json;
use tokio_util::sync::CancellationToken;

use super::db::{Database, Db, DbError};
use super::lease::Member;
use super::row::{Row, ms};
use crate::desired::ConfigBundle;
use crate::fleet::{AgentRecord, FleetHandle};
use crate::model::{ConfigHash, InstanceUid};

/// Liveness alone (a heartbeat) reaches the other replicas at most this often.
pub const LIVENESS_FLUSH: Duration = Duration::from_secs(15 * 60);
/// How often pushes are looked for when no notification came (one lost
/// while the connection was down, say).
const PUSH_POLL: Duration = Duration::from_secs(1);
/// Rows written by one statement at most.
const BATCH: usize = 500;

const UPSERT: &str = "INSERT INTO opamp_agents (uid, replica, boot, rev, written_at, record)
     SELECT u, $1, $2, nextval('opamp_agent_rev'), now(), r FROM unnest($3::bytea[], $4::jsonb[]) AS t(u, r)
     ON CONFLICT (uid) DO UPDATE SET replica = excluded.replica, boot = excluded.boot, rev = excluded.rev,
       written_at = excluded.written_at, record = excluded.record
     WHERE (opamp_agents.replica = excluded.replica AND opamp_agents.boot = excluded.boot)
        OR (excluded.record ->> 'connected')::boolean";
const FORGET: &str = "UPDATE opamp_agents SET record = NULL, rev = nextval('opamp_agent_rev'), written_at = now()
     WHERE uid = ANY($3) AND replica = $1 AND boot = $2";
/// After a reconnect: this run's agents the fleet no longer lists (it forgot
/// them while the database was away).
const FORGET_ALL_BUT: &str =
    "UPDATE opamp_agents SET record = NULL, rev = nextval('opamp_agent_rev'), written_at = now()
     WHERE replica = $1 AND boot = $2 AND record IS NOT NULL AND NOT (uid = ANY($3))";
const TAKE_PUSHES: &str = "DELETE FROM opamp_pushes p USING opamp_leader l
     WHERE p.replica = $1 AND l.id = 1 RETURNING p.seq, p.uid, p.hash, p.epoch = l.epoch";
const BUNDLES: &str = "SELECT bundle FROM opamp_configs WHERE hash = ANY($1)";

/// A config body as `opamp_configs` keeps it.
#[derive(Serialize, Deserialize)]
pub struct StoredBundle(#[serde(with = "crate::reconcile::bundle_serde")] pub Arc<ConfigBundle>);

/// What the database holds of one of this replica's agents.
struct Written {
    record: Arc<AgentRecord>,
    seen_ms: u64,
}

pub async fn run(database: Database, member: Arc<Member>, fleet: FleetHandle, cancel: CancellationToken) {
    let mut bundles: HashMap<ConfigHash, Arc<ConfigBundle>> = HashMap::new();
    let mut retry = Duration::ZERO;
    'connect: while let Some(mut db) = Db::connect_until(&database, "replica", &mut retry, &cancel).await {
        let ready = async {
            db.migrate().await?;
            db.client.batch_execute("LISTEN opamp_push").await?;
            Ok::<_, DbError>(())
        };
        if let Err(e) = ready.await {
            tracing::warn!(error = %e, "cannot share this replica's agents");
            continue;
        }
        // After a reconnect everything is written again: the database may
        // have lost what it was sent last (it restarted), and what the fleet
        // forgot meanwhile is forgotten.
        let mut written: HashMap<InstanceUid, Written> = HashMap::new();
        let mut snapshots = fleet.subscribe();
        snapshots.mark_changed();
        let listed: Vec<Vec<u8>> = snapshots
            .borrow()
            .agents
            .keys()
            .map(|u| u.as_bytes().to_vec())
            .collect();
        if let Err(e) = in_rev_order(&mut db, FORGET_ALL_BUT, &[&member.replica, &member.boot, &listed]).await {
            tracing::warn!(error = %e, "cannot share this replica's agents");
            continue;
        }
        let mut poll = tokio::time::interval(PUSH_POLL);
        // Looked at five times as often, so none is later than it by much.
        let mut flush = tokio::time::interval(LIVENESS_FLUSH / 5);
        flush.reset();
        loop {
            let result = tokio::select! {
                () = cancel.cancelled() => break 'connect,
                changed = snapshots.changed() => {
                    if changed.is_err() { break 'connect }
                    let snapshot = snapshots.borrow_and_update().clone();
                    write_changes(&mut db, &member, &snapshot.agents, &mut written, false).await
                }
                _ = flush.tick() => {
                    let agents = snapshots.borrow().agents.clone();
                    write_changes(&mut db, &member, &agents, &mut written, true).await
                }
                n = db.notifications.recv() => match n {
                    Some(n) if n.payload() == member.replica => deliver(&mut db, &member, &fleet, &mut bundles).await,
                    Some(_) => Ok(()),
                    None => Err(None),
                },
                _ = poll.tick() => deliver(&mut db, &member, &fleet, &mut bundles).await,
            };
            match result {
                Ok(()) => retry = Duration::ZERO,
                Err(e) => {
                    if let Some(e) = e {
                        tracing::warn!(error = %e, "sharing this replica's agents failed; reconnecting");
                    }
                    continue 'connect;
                }
            }
        }
    }
}

/// Writes the agents that changed since `written` (and, with `liveness`,
/// those heard from since their row was written, [`LIVENESS_FLUSH`] ago or
/// more), and marks forgotten ones.
async fn write_changes(
    db: &mut Db,
    member: &Member,
    agents: &imbl::OrdMap<InstanceUid, Arc<AgentRecord>>,
    written: &mut HashMap<InstanceUid, Written>,
    liveness: bool,
) -> Result<(), Option<DbError>> {
    let flush_ms = u64::try_from(LIVENESS_FLUSH.as_millis()).unwrap_or(u64::MAX);
    let mut changed: Vec<&Arc<AgentRecord>> = Vec::new();
    for (uid, r) in agents {
        let stale = match written.get(uid) {
            None => true,
            Some(w) if !Arc::ptr_eq(&w.record, r) => true,
            Some(w) => liveness && ms(r.liveness.last_seen()) >= w.seen_ms + flush_ms,
        };
        if stale {
            changed.push(r);
        }
    }
    let gone: Vec<InstanceUid> = written
        .keys()
        .filter(|uid| !agents.contains_key(*uid))
        .cloned()
        .collect();
    for chunk in changed.chunks(BATCH) {
        let uids: Vec<&[u8]> = chunk.iter().map(|r| r.uid.as_bytes()).collect();
        let rows: Vec<Json<Row>> = chunk.iter().map(|r| Json(Row::of(r))).collect();
        in_rev_order(db, UPSERT, &[&member.replica, &member.boot, &uids, &rows])
            .await
            .map_err(Some)?;
        for r in chunk {
            let w = Written {
                record: Arc::clone(r),
                seen_ms: ms(r.liveness.last_seen()),
            };
            written.insert(r.uid.clone(), w);
        }
    }
    if !gone.is_empty() {
        let uids: Vec<&[u8]> = gone.iter().map(InstanceUid::as_bytes).collect();
        in_rev_order(db, FORGET, &[&member.replica, &member.boot, &uids])
            .await
            .map_err(Some)?;
        for uid in &gone {
            written.remove(uid);
        }
    }
    if !changed.is_empty() || !gone.is_empty() {
        db.client
            .execute("SELECT pg_notify('opamp_agents', '')", &[])
            .await
            .map_err(|e| Some(e.into()))?;
    }
    Ok(())
}

/// Runs `statement`, which numbers rows from `opamp_agent_rev`, so that its
/// numbers become visible in their order: readers ask for the rows past the
/// last number they read, and must not pass a number still uncommitted.
/// Writers of every replica take turns under one advisory lock.
pub async fn in_rev_order(
    db: &mut Db,
    statement: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, DbError> {
    let tx = db.client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AGENT_REV_LOCK])
        .await?;
    let n = tx.execute(statement, params).await?;
    tx.commit().await?;
    Ok(n)
}

/// The advisory lock writers of `opamp_agents` take (see [`in_rev_order`]).
pub const AGENT_REV_LOCK: i64 = 0x6f70_616d_7265;

/// Takes the pushes addressed to this replica and hands those of the
/// current leader's epoch to the fleet (the newest one per agent).
async fn deliver(
    db: &mut Db,
    member: &Member,
    fleet: &FleetHandle,
    bundles: &mut HashMap<ConfigHash, Arc<ConfigBundle>>,
) -> Result<(), Option<DbError>> {
    // Taken for good only once their configs are read: a failure leaves them queued.
    let tx = db.client.transaction().await.map_err(|e| Some(e.into()))?;
    let rows = tx
        .query(TAKE_PUSHES, &[&member.replica])
        .await
        .map_err(|e| Some(e.into()))?;
    let mut newest: HashMap<InstanceUid, (i64, ConfigHash)> = HashMap::new();
    for row in rows {
        let (seq, uid, hash, current): (i64, &[u8], &[u8], bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
        let (Ok(uid), Ok(hash)) = (InstanceUid::from_wire(uid), <[u8; 32]>::try_from(hash)) else {
            continue;
        };
        if !current {
            tracing::warn!(agent = %uid, "dropped a push of a leader that has lost its lease");
            continue;
        }
        let e = newest.entry(uid).or_insert((seq, ConfigHash(hash)));
        if e.0 <= seq {
            *e = (seq, ConfigHash(hash));
        }
    }
    if newest.is_empty() {
        return Ok(());
    }
    let missing: Vec<&[u8]> = newest
        .values()
        .map(|(_, h)| h)
        .filter(|h| !bundles.contains_key(*h))
        .map(|h| &h.0[..])
        .collect();
    if !missing.is_empty() {
        if bundles.len() > 64 {
            bundles.clear();
        }
        for row in tx.query(BUNDLES, &[&missing]).await.map_err(|e| Some(e.into()))? {
            let stored: StoredBundle = serde_json::from_value(row.get(0)).map_err(|e| Some(DbError::from(e)))?;
            bundles.insert(stored.0.hash(), stored.0);
        }
    }
    tx.commit().await.map_err(|e| Some(e.into()))?;
    let batch: Vec<_> = newest
        .into_iter()
        .filter_map(|(uid, (_, hash))| Some((uid, Arc::clone(bundles.get(&hash)?))))
        .collect();
    // A fleet that stopped is the supervisor's to report.
    let _ = fleet.push_all(batch).await;
    Ok(())
}
