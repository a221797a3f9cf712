//! Leadership and membership. Each replica keeps a row of its own in
//! `opamp_replicas` alive, and takes or renews the one leader lease in
//! `opamp_leader`. A new holder gets the next epoch: the fencing token every
//! write of the leader names, so a leader that lost its lease while paused
//! can write nothing when it wakes up.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::db::{Database, Db, DbError};

/// The leader lease as its holder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub epoch: i64,
    /// When the holder stops relying on the lease unless renewed by then:
    /// before the database lets anyone else take it (see [`held_until`]).
    pub until: Instant,
}

impl Fence {
    /// Whether the lease may still be relied on. A process that was paused
    /// past `until` finds it has not, whatever it was doing.
    pub fn holds(&self) -> bool {
        Instant::now() < self.until
    }
}

/// Until when a lease that a request sent at `sent` renewed for `ttl` may be
/// relied on: the database counts the TTL from when it ran the request, which
/// is later; a tenth of the TTL is kept in case this machine's clock runs
/// slower than the database's.
pub fn held_until(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl - ttl / 10
}

/// Who this replica is, as the other replicas see it.
#[derive(Debug, Clone)]
pub struct Member {
    pub replica: String,
    /// Tells this run of the replica from earlier ones: its start, in ms.
    pub boot: i64,
    /// Where the other replicas reach its API.
    pub api_url: String,
    pub ttl: Duration,
    /// How long agents of a replica that has gone are kept.
    pub retention: Duration,
}

const UPSERT_REPLICA: &str = "INSERT INTO opamp_replicas (id, boot, api_url, agents, last_seen, expires_at)
     VALUES ($1, $2, $3, $4, now(), now() + make_interval(secs => $5))
     ON CONFLICT (id) DO UPDATE SET boot = excluded.boot, api_url = excluded.api_url,
       agents = excluded.agents, last_seen = excluded.last_seen, expires_at = excluded.expires_at";
const ACQUIRE: &str = "UPDATE opamp_leader SET holder = $1, epoch = epoch + 1,
       expires_at = now() + make_interval(secs => $2)
     WHERE id = 1 AND expires_at <= now() RETURNING epoch";
const RENEW: &str = "UPDATE opamp_leader SET expires_at = now() + make_interval(secs => $3)
     WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > now() RETURNING epoch";
const RELEASE: &str = "UPDATE opamp_leader SET expires_at = now() WHERE id = 1 AND holder = $1 AND epoch = $2";
const LEAVE: &str = "UPDATE opamp_replicas SET expires_at = now() WHERE id = $1 AND boot = $2";
/// How often the leader sweeps.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What nobody reads any more: pushes for replicas that are gone or of an
/// older epoch; agents of replica runs that ended, unheard of for
/// `retention`, forgotten as a replica forgets its own (in turn with the
/// replicas' writes: see `replica::in_rev_order`); forgotten agents' rows an
/// hour later; replicas gone for a day.
fn sweep_sql(retention: Duration) -> String {
    format!(
        "SELECT pg_advisory_xact_lock({lock});
    DELETE FROM opamp_pushes p WHERE p.epoch < (SELECT epoch FROM opamp_leader WHERE id = 1)
       OR NOT EXISTS (SELECT 1 FROM opamp_replicas r WHERE r.id = p.replica AND r.expires_at > now());
    UPDATE opamp_agents a SET record = NULL, rev = nextval('opamp_agent_rev'), written_at = now()
     WHERE record IS NOT NULL AND written_at < now() - make_interval(secs => {secs})
       AND NOT EXISTS (SELECT 1 FROM opamp_replicas r
                        WHERE r.id = a.replica AND r.boot = a.boot AND r.expires_at > now());
    DELETE FROM opamp_agents WHERE record IS NULL AND written_at < now() - interval '1 hour';
    DELETE FROM opamp_replicas WHERE expires_at < now() - interval '1 day';",
        lock = super::replica::AGENT_REV_LOCK,
        secs = retention.as_secs(),
    )
}

/// Keeps this replica's row alive and holds the lease when it can; tells
/// `leadership` whenever the lease is taken or lost. `agents` counts the
/// replica's connected agents. On cancel the lease and the row are given up,
/// so another replica leads at once.
pub async fn run(
    database: Database,
    member: Arc<Member>,
    agents: impl Fn() -> usize + Send + 'static,
    leadership: watch::Sender<Option<Fence>>,
    cancel: CancellationToken,
) {
    let every = member.ttl / 3;
    let mut fence: Option<Fence> = None;
    let mut retry = Duration::ZERO;
    let mut swept: Option<Instant> = None;
    'connect: while let Some(mut db) = Db::connect_until(&database, "lease", &mut retry, &cancel).await {
        if let Err(e) = db.migrate().await {
            tracing::warn!(error = %e, "cannot create the cluster's tables");
            continue;
        }
        loop {
            let sent = Instant::now();
            let sweep = swept.is_none_or(|t| t.elapsed() >= SWEEP_EVERY);
            let renewed = tokio::select! {
                () = cancel.cancelled() => break 'connect,
                r = tick(&db, &member, agents(), fence, sweep) => r,
            };
            if sweep && renewed.as_ref().is_ok_and(Option::is_some) {
                swept = Some(sent);
            }
            match renewed {
                Ok(next) => {
                    fence = next;
                    retry = Duration::ZERO;
                }
                Err(e) => tracing::warn!(error = %e, "renewing the replica's leases failed"),
            }
            // Lost, or run out while the database could not be reached.
            fence = fence.filter(Fence::holds);
            tell(&leadership, fence, &member.replica);
            let wake = fence.map_or(sent + every, |f| f.until.min(sent + every));
            tokio::select! {
                () = cancel.cancelled() => break 'connect,
                () = tokio::time::sleep_until(wake) => {}
            }
            if db.is_closed() {
                continue 'connect;
            }
        }
    }
    leadership.send_replace(None);
    if let Ok(db) = Db::connect(&database).await {
        let released = match fence {
            Some(f) => db.client.execute(RELEASE, &[&member.replica, &f.epoch]).await.map(drop),
            None => Ok(()),
        };
        let left = db.client.execute(LEAVE, &[&member.replica, &member.boot]).await;
        if let Err(e) = released.and(left.map(drop)) {
            tracing::warn!(error = %e, "giving up the leases failed; they run out by themselves");
        }
    }
}

/// Renews the replica's row and the lease it holds, or tries to take it;
/// the leader sweeps too when told to.
async fn tick(
    db: &Db,
    member: &Member,
    agents: usize,
    fence: Option<Fence>,
    sweep: bool,
) -> Result<Option<Fence>, DbError> {
    let sent = Instant::now();
    let ttl = member.ttl.as_secs_f64();
    let agents = i32::try_from(agents).unwrap_or(i32::MAX);
    db.client
        .execute(
            UPSERT_REPLICA,
            &[&member.replica, &member.boot, &member.api_url, &agents, &ttl],
        )
        .await?;
    let held = match fence.filter(Fence::holds) {
        Some(f) => db.client.query_opt(RENEW, &[&member.replica, &f.epoch, &ttl]).await?,
        None => db.client.query_opt(ACQUIRE, &[&member.replica, &ttl]).await?,
    };
    if sweep
        && held.is_some()
        && let Err(e) = db.client.batch_execute(&sweep_sql(member.retention)).await
    {
        tracing::warn!(error = %e, "sweeping the cluster's tables failed");
    }
    Ok(held.map(|row| Fence {
        epoch: row.get(0),
        until: held_until(sent, member.ttl),
    }))
}

/// Publishes a change of leadership, and logs it.
fn tell(leadership: &watch::Sender<Option<Fence>>, fence: Option<Fence>, replica: &str) {
    leadership.send_if_modified(|held| {
        let changed = held.map(|f| f.epoch) != fence.map(|f| f.epoch);
        match (*held, fence) {
            (None, Some(f)) => tracing::info!(replica, epoch = f.epoch, "this replica leads"),
            (Some(f), None) => tracing::warn!(replica, epoch = f.epoch, "this replica lost the lease; stepping down"),
            _ => {}
        }
        *held = fence;
        changed
    });
}
