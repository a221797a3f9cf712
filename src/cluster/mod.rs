//! Several controllers, one fleet: `serve --store postgres://…` makes the
//! process a replica. Each replica holds its own agents' connections and
//! shares them through PostgreSQL; one of them, the leader, holds a lease
//! and runs the planner, the notes writer and the notifications. See
//! `docs/ha.md`.
//!
//! - [`lease`]: the replica's row and the leader lease, with its epoch.
//! - [`replica`]: this replica's agents out, pushes for them in.
//! - [`view`]: the whole fleet and the members in; the leader's pushes out.
//! - [`state`]: the rollout state, fenced by the epoch.

pub mod db;
pub mod lease;
pub mod replica;
pub mod row;
pub mod state;
pub mod view;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use db::{Database, DbError};
pub use lease::Fence;
pub use state::StateStore;
pub use view::{Members, Replica};

use crate::fleet::{FleetHandle, FleetSnapshot};

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `postgres://user:password@host:port/database`.
    pub url: String,
    /// The certificates (PEM) PostgreSQL's certificate chains to, when the
    /// URL asks for TLS; `None`: the system's.
    pub store_ca: Option<std::path::PathBuf>,
    /// This replica's name, unique in the cluster.
    pub replica: String,
    /// How long the leader lease and each replica's own lease last unless
    /// renewed; they are renewed every third of it.
    pub lease_ttl: Duration,
    /// Where the other replicas reach this one's API; `None`: the address
    /// the API listens on.
    pub api_url: Option<String>,
    /// The certificates (PEM) the replicas' API certificates chain to, for
    /// calls between replicas over HTTPS; `None`: the system's.
    pub replica_ca: Option<std::path::PathBuf>,
}

/// A replica's task, by name.
pub type Task = (&'static str, JoinHandle<()>);

/// A running replica's view of the cluster.
#[derive(Clone)]
pub struct Cluster {
    pub replica: String,
    /// `Some` while this replica holds the leader lease.
    pub leadership: watch::Receiver<Option<Fence>>,
    pub members: watch::Receiver<Arc<Members>>,
    /// Reads the whole fleet; pushes reach the replica that holds each agent.
    pub fleet: FleetHandle,
    database: Database,
}

impl Cluster {
    /// Starts the replica's tasks: the leases, sharing `local`'s agents and
    /// reading the whole fleet. Answers the tasks by name, for supervision;
    /// they run until `cancel` fires. `api_url` is where this replica's API
    /// is, unless the config says otherwise.
    pub fn start(
        config: ClusterConfig,
        api_url: String,
        retention: Duration,
        local: &FleetHandle,
        cancel: &CancellationToken,
    ) -> Result<(Cluster, Vec<Task>), crate::tls::TlsError> {
        let database = Database::new(config.url, crate::tls::client_trusting(config.store_ca.as_deref())?);
        let boot = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let member = Arc::new(lease::Member {
            replica: config.replica.clone(),
            boot,
            api_url: config.api_url.unwrap_or(api_url),
            ttl: config.lease_ttl,
            retention,
        });
        let (leadership_tx, leadership) = watch::channel(None);
        let (snapshots, snapshots_rx) = watch::channel(Arc::new(FleetSnapshot::default()));
        let (members, members_rx) = watch::channel(Arc::default());
        let (pushes_tx, pushes) = mpsc::channel(16);
        let counted = local.subscribe();
        let agents = move || counted.borrow().agents.values().filter(|r| r.connected).count();
        let tasks = vec![
            (
                "lease",
                tokio::spawn(lease::run(
                    database.clone(),
                    Arc::clone(&member),
                    agents,
                    leadership_tx,
                    cancel.clone(),
                )),
            ),
            (
                "replica",
                tokio::spawn(replica::run(
                    database.clone(),
                    Arc::clone(&member),
                    local.clone(),
                    cancel.clone(),
                )),
            ),
            (
                "fleet view",
                tokio::spawn(view::run(
                    database.clone(),
                    member,
                    local.clone(),
                    leadership.clone(),
                    pushes,
                    view::Outputs { snapshots, members },
                    cancel.clone(),
                )),
            ),
        ];
        let cluster = Cluster {
            replica: config.replica,
            leadership,
            members: members_rx,
            fleet: local.routed(snapshots_rx, pushes_tx),
            database,
        };
        Ok((cluster, tasks))
    }

    /// The leader's access to the rollout state.
    pub fn state_store(&self) -> StateStore {
        StateStore::new(self.database.clone(), self.replica.clone())
    }

    /// Whether this replica holds the leader lease now (its driver leads
    /// once it has also claimed the rollout state).
    pub fn holds_lease(&self) -> bool {
        self.leadership.borrow().is_some_and(|f| f.holds())
    }

    /// Adds the replica's gauges to `registry`.
    pub fn register_metrics(&self, registry: &mut crate::telemetry::Registry) {
        let cluster = self.clone();
        crate::telemetry::cluster::register(registry, move || {
            let members = cluster.members.borrow().clone();
            crate::telemetry::cluster::ClusterGauges {
                leads: cluster.holds_lease(),
                epoch: members.leader.as_ref().map_or(0, |(_, e)| *e),
                replicas_alive: members.replicas.iter().filter(|r| r.alive).count(),
            }
        });
    }
}
