//! Wiring for `serve`: binds the listeners, spawns the fleet task, the OpAMP
//! server and the API, and owns the shutdown order (stop accepting, close
//! WebSockets, finish in-flight HTTP replies, then stop the fleet). Every
//! long-running task is supervised: one that ends while the controller is
//! not shutting down (it returned, panicked or was aborted) shuts the rest
//! down and makes the controller end with an error, so a dead loop never
//! sits behind a ready `/readyz`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiState, Readiness};
use crate::auth::{TokenFile, TokensError};
use crate::cluster::{Cluster, ClusterConfig};
use crate::driver::{self, Assignments, DriverConfig, DriverHandle, Parts, PersistError};
use crate::fleet::{self, FleetConfig, FleetHandle};
use crate::gitsrc::notes::{Author, NotesStore};
use crate::gitsrc::{GitConfig, GitError, GitHandle, GitSource, Status};
use crate::listen::{AdmittingListener, Limits};
use crate::notes::format::Note;
use crate::notes::writer::{self, Backoff};
use crate::notify::{self, NotifyConfig, NotifyError};
use crate::opamp::OpampContext;
use crate::opamp::codec::DEFAULT_MAX_MESSAGE_BYTES;
use crate::opamp::transport;
use crate::telemetry::connections::ConnectionMetrics;
use crate::telemetry::notes::{NoteUnreadable, NotesMetrics};
use crate::telemetry::opamp::OpampMetrics;
use crate::telemetry::{InternalEvent, Registry};
use crate::tls::{ServerTls, TlsError, TlsFiles};

/// How long shutdown waits, in all, for open connections (HTTP requests in
/// flight, then WebSockets) to finish before it gives up on them.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// What `serve` needs to run.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub opamp_listen: SocketAddr,
    pub api_listen: SocketAddr,
    pub max_message_bytes: usize,
    /// Agents are assumed to report at least this often; an HTTP agent silent
    /// for three intervals is offline. WebSockets are pinged at this interval
    /// and closed after three silent ones. Not offered to agents (see
    /// docs/opamp-server.md).
    pub heartbeat_interval: Duration,
    /// The heartbeat interval offered to agents that report heartbeats (and
    /// do not accept OpAMP connection settings); `None` offers none.
    pub offer_heartbeat_interval: Option<Duration>,
    /// The config repository; without it the controller only keeps the inventory.
    pub git: Option<GitConfig>,
    /// The longest time between two plans; `None`: the repository's
    /// reconcile interval.
    pub reconcile_tick: Option<Duration>,
    /// How long after start the first plan waits for agents to reconnect.
    pub startup_grace: Duration,
    /// Who git notes are written as.
    pub notes_author: Author,
    /// How long shutdown waits for open connections ([`DRAIN_DEADLINE`]).
    pub drain_deadline: Duration,
    /// How long the reply to an agent's first report on a WebSocket may wait
    /// for its first config, once the reconciler plans
    /// ([`crate::opamp::FIRST_REPLY_WAIT`]).
    pub first_reply_wait: Duration,
    /// Open OpAMP connections at most; `None`: the process's file-descriptor
    /// limit less [`FD_RESERVE`].
    pub max_connections: Option<usize>,
    /// Open OpAMP connections from one IP address at most; `None`: a quarter
    /// of `max_connections`; 0: no limit.
    pub max_connections_per_source: Option<usize>,
    /// How long a connection (OpAMP or API) may stay open before its first request.
    pub first_request_timeout: Duration,
    /// How long a plain-HTTP connection (OpAMP or API) may stay open without
    /// a request once it has sent one (WebSockets are watched by heartbeats).
    pub idle_timeout: Duration,
    /// How long an agent may stay offline before it is forgotten.
    pub agent_retention: Duration,
    /// How long fetches may fail before the source counts as stale (`/readyz`
    /// answers 503 and says since when).
    pub source_stale_after: Duration,
    /// How long a wave may wait for its agents before its rollout is shown
    /// as stalled.
    pub stall_after: Duration,
    /// TLS on both listeners; its client CA (mTLS) applies to agents only.
    pub tls: Option<TlsFiles>,
    /// Agents must present one of these tokens (`auth` describes the file).
    pub agent_tokens: Option<PathBuf>,
    /// Operators must present one of these tokens, of the scope the call needs.
    pub api_tokens: Option<PathBuf>,
    /// Reads of the API need no token even with `api_tokens`.
    pub api_open_reads: bool,
    /// Notifications (webhooks) and commit statuses in the forge.
    pub notify: NotifyConfig,
    /// Makes the controller a replica of a cluster on PostgreSQL.
    pub cluster: Option<ClusterConfig>,
}

/// File descriptors kept for everything but OpAMP connections: the API's
/// connections ([`API_MAX_CONNECTIONS`]), git, the state and notes files.
pub const FD_RESERVE: usize = 1024;
/// Open API connections at most.
pub const API_MAX_CONNECTIONS: usize = 512;
/// The default of [`ServeConfig::source_stale_after`].
pub const SOURCE_STALE_AFTER: Duration = Duration::from_secs(5 * 60);
/// The agents' identity bindings, in the state directory.
pub const BINDINGS_FILE: &str = "bindings.json";
/// The default of [`ServeConfig::stall_after`].
pub const STALL_AFTER: Duration = Duration::from_secs(30 * 60);
/// The default of [`ServeConfig::first_request_timeout`].
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The default of [`ServeConfig::idle_timeout`]: well above the interval at
/// which HTTP agents poll (30 s for the OpAMP supervisor).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

impl ServeConfig {
    /// The OpAMP listener's limits, given the file-descriptor limit.
    fn opamp_limits(&self, fd_limit: u64) -> Limits {
        let from_fds = usize::try_from(fd_limit)
            .unwrap_or(usize::MAX)
            .saturating_sub(FD_RESERVE);
        let max_connections = self.max_connections.unwrap_or(from_fds).max(1);
        Limits {
            max_connections,
            per_source: self.max_connections_per_source.unwrap_or(max_connections / 4),
            quiet_for: self.first_request_timeout,
            idle_for: self.idle_timeout,
        }
    }

    fn api_limits(&self) -> Limits {
        Limits {
            max_connections: API_MAX_CONNECTIONS,
            per_source: 0,
            quiet_for: self.first_request_timeout,
            idle_for: self.idle_timeout,
        }
    }
}

impl ServeConfig {
    /// Both listeners on 127.0.0.1 with ports picked by the system; for tests.
    pub fn local() -> Self {
        ServeConfig {
            opamp_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            heartbeat_interval: Duration::from_secs(30),
            offer_heartbeat_interval: None,
            git: None,
            reconcile_tick: None,
            startup_grace: Duration::ZERO,
            notes_author: Author::default(),
            drain_deadline: DRAIN_DEADLINE,
            first_reply_wait: crate::opamp::FIRST_REPLY_WAIT,
            max_connections: None,
            max_connections_per_source: None,
            first_request_timeout: FIRST_REQUEST_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            agent_retention: crate::fleet::DEFAULT_RETENTION,
            source_stale_after: SOURCE_STALE_AFTER,
            stall_after: STALL_AFTER,
            tls: None,
            agent_tokens: None,
            api_tokens: None,
            api_open_reads: false,
            notify: NotifyConfig::default(),
            cluster: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what} server failed: {source}")]
    Serve { what: &'static str, source: std::io::Error },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    State(#[from] PersistError),
    #[error("a task panicked: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("the {task} task stopped unexpectedly ({how}); the controller shut down")]
    TaskEnded { task: &'static str, how: String },
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot watch a certificate or tokens file for changes: {0}")]
    Watch(::notify::Error),
    #[error("tokens: {0}")]
    Tokens(#[from] TokensError),
    #[error("identity bindings: {0}")]
    Bindings(#[from] fleet::BindingsError),
    #[error(transparent)]
    Notify(#[from] NotifyError),
}

/// A supervised task that ended, and how.
#[derive(Debug)]
struct Ended {
    task: &'static str,
    how: String,
}

/// Watches `task`: when it ends, says so on `ended`. Returns a handle that
/// completes when the task has ended (to await it during shutdown) and one
/// that aborts the task itself.
fn supervise<T: TaskEnd + Send + 'static>(
    name: &'static str,
    task: JoinHandle<T>,
    ended: &tokio::sync::mpsc::UnboundedSender<Ended>,
) -> (JoinHandle<()>, tokio::task::AbortHandle) {
    let abort = task.abort_handle();
    let ended = ended.clone();
    let watcher = tokio::spawn(async move {
        let how = match task.await {
            Ok(end) => end.how(),
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let text = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                format!("it panicked: {text}")
            }
            Err(_) => "it was aborted".to_string(),
        };
        // Nobody listens once the controller has stopped.
        let _ = ended.send(Ended { task: name, how });
    });
    (watcher, abort)
}

/// What a task's end says about how it ended.
trait TaskEnd {
    fn how(self) -> String;
}

impl TaskEnd for () {
    fn how(self) -> String {
        "it returned".to_string()
    }
}

impl<E: std::fmt::Display> TaskEnd for Result<(), E> {
    fn how(self) -> String {
        match self {
            Ok(()) => "it returned".to_string(),
            Err(e) => format!("it failed: {e}"),
        }
    }
}

/// A started controller.
pub struct Running {
    /// Where agents connect (the bound address, port resolved).
    pub opamp_addr: SocketAddr,
    /// Where the API listens.
    pub api_addr: SocketAddr,
    pub fleet: FleetHandle,
    /// The git source, when a repository was given.
    pub git: Option<GitHandle>,
    /// The reconcile driver, when a repository was given.
    pub driver: Option<DriverHandle>,
    /// Readiness as `/readyz` reports it; the git source sets it.
    pub readiness: watch::Sender<Readiness>,
    /// Per-agent assignments the API shows; the reconciler publishes them.
    pub assignments: watch::Sender<Assignments>,
    /// Cancel to shut down.
    pub shutdown: CancellationToken,
    /// The supervised tasks by name, to abort one (see [`Running::abort_task`]).
    tasks: Vec<(&'static str, tokio::task::AbortHandle)>,
    done: JoinHandle<Result<(), AppError>>,
}

impl Running {
    /// Waits until the controller has shut down (after `shutdown` fires).
    pub async fn wait(self) -> Result<(), AppError> {
        self.done.await?
    }

    /// Shuts down and waits for it.
    pub async fn stop(self) -> Result<(), AppError> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Aborts one supervised task (`fleet`, `git`, `driver`, `notes`,
    /// `notify`, `readiness`) as if it had died; false when there is none of that name.
    /// For checking that the controller then stops.
    #[doc(hidden)]
    pub fn abort_task(&self, name: &str) -> bool {
        let found = self.tasks.iter().filter(|(n, _)| *n == name);
        let mut any = false;
        for (_, handle) in found {
            handle.abort();
            any = true;
        }
        any
    }
}

/// Binds both listeners and starts everything. Returns once the sockets are
/// bound; the controller runs until `shutdown` is cancelled.
pub async fn start(config: ServeConfig, shutdown: CancellationToken) -> Result<Running, AppError> {
    let fd_limit = raise_fd_limit();
    let tls = config.tls.clone().map(ServerTls::load).transpose()?;
    if tls.is_none() {
        tracing::warn!("no --tls-cert: agents and operators connect over plain, unencrypted HTTP");
    }
    let agent_tokens = config.agent_tokens.clone().map(TokenFile::load).transpose()?;
    match (&agent_tokens, &config.tls) {
        (None, Some(TlsFiles { client_ca: Some(_), .. })) => {}
        (None, _) => tracing::warn!(
            "no --agent-tokens or --client-ca: any client that reaches the OpAMP listener is taken as an agent"
        ),
        (Some(_), None) => tracing::warn!("agent tokens travel unencrypted without --tls-cert"),
        (Some(_), Some(_)) => {}
    }
    let mut watchers = tls
        .iter()
        .map(ServerTls::watch)
        .collect::<Result<Vec<_>, _>>()
        .map_err(AppError::Watch)?;
    let api_tokens = config.api_tokens.clone().map(TokenFile::load).transpose()?;
    if api_tokens.is_none() {
        tracing::warn!("no --api-tokens: anyone who reaches the API can read effective configs and pause rollouts");
    }
    for tokens in agent_tokens.iter().chain(&api_tokens) {
        watchers.push(tokens.watch().map_err(AppError::Watch)?);
    }
    let (opamp_limits, api_limits) = (config.opamp_limits(fd_limit), config.api_limits());
    let bind =
        |what: &'static str, addr: SocketAddr| listen(addr).map_err(|source| AppError::Bind { what, addr, source });
    let opamp_listener = bind("OpAMP", config.opamp_listen)?;
    let api_listener = bind("the API", config.api_listen)?;
    let local = |l: &TcpListener, what: &'static str, addr: SocketAddr| {
        l.local_addr().map_err(|source| AppError::Bind { what, addr, source })
    };
    let opamp_addr = local(&opamp_listener, "OpAMP", config.opamp_listen)?;
    let api_addr = local(&api_listener, "the API", config.api_listen)?;

    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    let fleet_stop = CancellationToken::new();
    let (fleet, fleet_task) = fleet::spawn(
        FleetConfig {
            heartbeat_interval: config.heartbeat_interval,
            retention: config.agent_retention,
            bindings_file: config.git.as_ref().map(|g| g.state_dir.join(BINDINGS_FILE)),
        },
        fleet_stop.clone(),
    )?;
    let (fleet_task, abort) = supervise("fleet", fleet_task, &ended_tx);
    tasks.push(("fleet", abort));
    // A replica plans over, and its API shows, the whole cluster's fleet.
    let cluster_stop = CancellationToken::new();
    let mut cluster_tasks = Vec::new();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut replica_tls = None;
    let cluster = match config.cluster.clone() {
        Some(c) => {
            replica_tls = Some(crate::tls::client_trusting(c.replica_ca.as_deref())?);
            let api_url = format!("{scheme}://{api_addr}");
            let (cluster, started) = Cluster::start(c, api_url, config.agent_retention, &fleet, &cluster_stop)?;
            for (name, task) in started {
                let (watcher, abort) = supervise(name, task, &ended_tx);
                tasks.push((name, abort));
                cluster_tasks.push(watcher);
            }
            Some(cluster)
        }
        None => None,
    };
    let planned = cluster.as_ref().map_or_else(|| fleet.clone(), |c| c.fleet.clone());
    let opamp_metrics = OpampMetrics::default();
    let mut registry = Registry::default();
    opamp_metrics.register(&mut registry);
    let (opamp_connections, api_connections) = (ConnectionMetrics::new("opamp"), ConnectionMetrics::new("api"));
    opamp_connections.register(&mut registry);
    api_connections.register(&mut registry);
    fleet.register_metrics(&mut registry);
    if let Some(c) = &cluster {
        c.register_metrics(&mut registry);
    }
    let (readiness, readiness_rx) = watch::channel(Readiness::initial());
    let (assignments, assignments_rx) = watch::channel(Assignments::from([]));
    let mut forwarder = None;
    let stale_after = config.source_stale_after;
    let link = config.notify.link(&format!("{scheme}://{api_addr}"));
    if config.git.is_none() && !config.notify.is_empty() {
        tracing::warn!("no --repo: there are no rollouts to notify about or set commit statuses for");
    }
    let gitops = match config.git {
        Some(git_config) => {
            let settings = Settings {
                tick: config.reconcile_tick,
                forget_after: config.agent_retention,
                startup_grace: config.startup_grace,
                stall_after: config.stall_after,
                author: config.notes_author,
                notify: config.notify,
                link,
                cluster: cluster.clone(),
            };
            let g = start_gitops(
                git_config,
                settings,
                &planned,
                &assignments,
                &mut registry,
                &shutdown,
                &ended_tx,
            )
            .await?;
            tasks.extend(g.aborts.iter().cloned());
            let task = tokio::spawn(forward_readiness(g.git.status(), readiness.clone(), stale_after));
            let (_, abort) = supervise("readiness", task, &ended_tx);
            tasks.push(("readiness", abort.clone()));
            forwarder = Some(abort);
            Some(g)
        }
        None => None,
    };
    drop(ended_tx);
    let git = gitops.as_ref().map(|g| g.git.clone());
    let driver = gitops.as_ref().map(|g| g.driver.clone());
    let sessions = TaskTracker::new();
    let mut opamp_ctx = OpampContext::new(
        fleet.clone(),
        Arc::new(opamp_metrics),
        config.max_message_bytes,
        shutdown.clone(),
        sessions.clone(),
        config.heartbeat_interval,
    );
    opamp_ctx.offer_heartbeat = config.offer_heartbeat_interval;
    if let Some(driver) = &driver {
        // No push follows a first report before the reconciler plans (the
        // start-up grace, or a replica that does not lead).
        let (wait, waits) = watch::channel(Duration::ZERO);
        opamp_ctx.first_reply_wait = waits;
        let (mut status, hold) = (driver.subscribe(), config.first_reply_wait);
        tokio::spawn(async move {
            if status.wait_for(|s| s.version > 0).await.is_ok() {
                let _ = wait.send(hold);
            }
        });
    }
    opamp_ctx.agent_tokens = agent_tokens;
    let api_state = ApiState {
        fleet: planned,
        git: git.clone(),
        driver: driver.clone(),
        metrics: Arc::new(registry),
        readiness: readiness_rx,
        assignments: assignments_rx,
        shutdown: shutdown.clone(),
        source_stale_after: stale_after,
        stall_after: config.stall_after,
        auth: crate::api::auth::ApiAuth {
            tokens: api_tokens,
            open_reads: config.api_open_reads,
        },
        cluster: cluster
            .zip(replica_tls)
            .map(|(c, tls)| crate::api::cluster::ClusterApi::new(c, tls)),
    };

    let opamp_server = AdmittingListener::new(
        opamp_listener,
        opamp_limits,
        opamp_connections,
        tls.as_ref().map(|t| t.agents().clone()),
    )
    .serve(transport::router(opamp_ctx))
    .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let api_server = AdmittingListener::new(
        api_listener,
        api_limits,
        api_connections,
        tls.as_ref().map(|t| t.operators().clone()),
    )
    .serve(api::router(api_state))
    .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    tracing::info!(
        opamp = %opamp_addr,
        api = %api_addr,
        max_connections = opamp_limits.max_connections,
        per_source = opamp_limits.per_source,
        "listening"
    );

    let drain = config.drain_deadline;
    let stop = shutdown.clone();
    let done = tokio::spawn(async move {
        // Certificates are reloaded for as long as the controller runs.
        let _watchers = watchers;
        let servers = async { tokio::join!(opamp_server.into_future(), api_server.into_future()) };
        tokio::pin!(servers);
        let mut finished = None;
        let mut died = None;
        // Biased: on shutdown the tasks end because of it, and their ends
        // must not read as deaths.
        tokio::select! {
            biased;
            () = stop.cancelled() => {}
            Some(e) = ended.recv() => {
                if !stop.is_cancelled() {
                    tracing::error!(task = e.task, how = %e.how, "a task stopped unexpectedly; shutting down");
                    died = Some(e);
                }
            }
            r = &mut servers => finished = Some(r),
        }
        // Whatever ended the wait, everything else stops now.
        stop.cancel();
        // One deadline for the whole drain: a client that never finishes its
        // request must not keep the controller alive.
        let deadline = tokio::time::Instant::now() + drain;
        let (opamp_result, api_result) = match finished {
            Some(r) => r,
            None => match tokio::time::timeout_at(deadline, servers).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!("HTTP connections did not finish in time; abandoning them");
                    (Ok(()), Ok(()))
                }
            },
        };
        tracing::info!("listeners closed; waiting for connections to finish");
        sessions.close();
        if tokio::time::timeout_at(deadline, sessions.wait()).await.is_err() {
            tracing::warn!(open = sessions.len(), "WebSocket sessions did not finish in time");
        }
        if let Some(g) = gitops {
            g.stop().await?;
        }
        // The lease is given up once the driver has stopped.
        cluster_stop.cancel();
        for task in cluster_tasks {
            task.await?;
        }
        fleet_stop.cancel();
        fleet_task.await?;
        if let Some(f) = forwarder {
            // It runs until aborted (see `forward_readiness`).
            f.abort();
        }
        tracing::info!("stopped");
        if let Some(Ended { task, how }) = died {
            return Err(AppError::TaskEnded { task, how });
        }
        opamp_result.map_err(|source| AppError::Serve { what: "OpAMP", source })?;
        api_result.map_err(|source| AppError::Serve { what: "API", source })?;
        Ok(())
    });

    Ok(Running {
        opamp_addr,
        api_addr,
        fleet,
        git,
        driver,
        readiness,
        assignments,
        shutdown,
        tasks,
        done,
    })
}

/// The GitOps half of the controller: git source, reconcile driver, notes
/// writer and notifications.
struct GitOps {
    git: GitHandle,
    driver: DriverHandle,
    driver_stop: CancellationToken,
    driver_task: JoinHandle<()>,
    notes_stop: CancellationToken,
    notes_task: JoinHandle<()>,
    /// The notifications' senders, when there are receivers.
    notify: Option<(CancellationToken, JoinHandle<()>)>,
    git_task: JoinHandle<()>,
    aborts: Vec<(&'static str, tokio::task::AbortHandle)>,
}

impl GitOps {
    /// The driver saves its state first; then the notes writer flushes what
    /// the driver handed it. Notifications not delivered by then stay in
    /// their outbox for the next start.
    async fn stop(self) -> Result<(), AppError> {
        self.driver_stop.cancel();
        self.driver_task.await?;
        self.notes_stop.cancel();
        self.notes_task.await?;
        if let Some((stop, task)) = self.notify {
            stop.cancel();
            task.await?;
        }
        // The git task stops with the shutdown token it was given.
        self.git_task.await?;
        Ok(())
    }
}

/// The GitOps half's settings.
struct Settings {
    tick: Option<Duration>,
    forget_after: Duration,
    startup_grace: Duration,
    stall_after: Duration,
    author: Author,
    notify: NotifyConfig,
    /// The controller's view, linked from notifications and commit statuses.
    link: String,
    /// In a replica: the cluster, which says when this one leads.
    cluster: Option<Cluster>,
}

async fn start_gitops(
    git_config: GitConfig,
    settings: Settings,
    fleet: &FleetHandle,
    assignments: &watch::Sender<Assignments>,
    registry: &mut Registry,
    shutdown: &CancellationToken,
    ended: &tokio::sync::mpsc::UnboundedSender<Ended>,
) -> Result<GitOps, AppError> {
    let state_dir = git_config.state_dir.clone();
    let (git, git_task) = GitSource::spawn(git_config, shutdown.child_token())?;
    let (git_task, git_abort) = supervise("git", git_task, ended);
    git.register_metrics(registry);
    let Settings {
        tick,
        forget_after,
        startup_grace,
        stall_after,
        author,
        notify,
        link,
        cluster,
    } = settings;
    let store = git.notes_store(author.clone());
    let reader = git.notes_store(author);
    let notes_stop = CancellationToken::new();
    let gate: Option<writer::Gate> = cluster
        .clone()
        .map(|c| -> writer::Gate { Arc::new(move || c.leadership.borrow().filter(|f| f.holds()).map(|f| f.epoch)) });
    let (notes, notes_task) = writer::spawn(store, Backoff::default(), gate, notes_stop.clone());
    let metrics = notes.metrics().clone();
    let existing_notes: driver::NotesReader = Arc::new(move || read_existing_notes(&reader, &metrics));
    notes.register_metrics(registry);
    let mut aborts = vec![("git", git_abort)];
    let (notifications, notify) = if notify.is_empty() {
        (None, None)
    } else {
        let stop = CancellationToken::new();
        let (handle, task) = notify::spawn(notify, &state_dir, link, stop.clone())?;
        handle.register_metrics(registry);
        let (task, abort) = supervise("notify", task, ended);
        aborts.push(("notify", abort));
        (Some(handle), Some((stop, task)))
    };
    let driver_stop = CancellationToken::new();
    let (driver, driver_task) = driver::spawn(
        DriverConfig {
            state_dir,
            tick,
            forget_after,
            startup_grace,
        },
        Parts {
            fleet: fleet.clone(),
            git: git.clone(),
            assignments: assignments.clone(),
            notes: Some(notes),
            notify: notifications,
            existing_notes: Some(existing_notes),
            cluster,
        },
        driver_stop.clone(),
    )?;
    driver.register_metrics(registry, stall_after);
    let (driver_task, driver_abort) = supervise("driver", driver_task, ended);
    let (notes_task, notes_abort) = supervise("notes", notes_task, ended);
    aborts.extend([("driver", driver_abort), ("notes", notes_abort)]);
    Ok(GitOps {
        git,
        driver,
        driver_stop,
        driver_task,
        notes_stop,
        notes_task,
        notify,
        git_task,
        aborts,
    })
}

/// The notes already in the repository (fetched from the remote first), so
/// rewrites keep what they hold. A failure is logged: notes are an output,
/// not something the controller needs to run; so is each note that cannot be
/// read (it is left out, counted in `notes_unreadable`).
fn read_existing_notes(store: &NotesStore, metrics: &NotesMetrics) -> Vec<Note> {
    if let Err(e) = store.fetch() {
        tracing::warn!(error = %e, "fetching the remote's notes failed");
    }
    match store.all() {
        Ok(all) => all
            .iter()
            .filter_map(|(commit, text)| {
                Note::parse(text)
                    .inspect_err(|error| NoteUnreadable { commit, error }.emit(metrics))
                    .ok()
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "reading the existing notes failed");
            Vec::new()
        }
    }
}

/// Keeps `/readyz` in step with the git source: ready once a commit is in
/// force, and not while the source is stale (no fetch has succeeded for
/// `stale_after`). Runs until aborted: when the git source is gone it says
/// so and waits (the git task's own end is what the supervisor reports).
async fn forward_readiness(
    mut status: watch::Receiver<Status>,
    readiness: watch::Sender<Readiness>,
    stale_after: Duration,
) {
    loop {
        let (next, recheck) = {
            let status = status.borrow_and_update();
            let now = SystemTime::now();
            let next = match status.readiness(now, stale_after) {
                Ok(commit) => Readiness::Ready(commit.clone()),
                Err(reason) => Readiness::NotReady(reason),
            };
            // While fetches fail, look again when the source would turn stale.
            let since = status.last_success.or(status.last_fetch);
            let recheck = match (&status.last_fetch_error, since) {
                (Some(_), Some(since)) => (since + stale_after).duration_since(now).ok(),
                _ => None,
            };
            (next, recheck)
        };
        readiness.send_if_modified(|r| {
            let changed = *r != next;
            *r = next;
            changed
        });
        let stale = async {
            match recheck {
                Some(wait) => tokio::time::sleep(wait + Duration::from_millis(10)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = status.changed() => if changed.is_err() {
                readiness.send_replace(Readiness::NotReady("the git source has stopped".to_string()));
                return std::future::pending().await;
            },
            () = stale => {}
        }
    }
}

/// Connections the kernel completes before they are accepted; it caps this at
/// `net.core.somaxconn`. Tokio's default of 1,024 is too few for a fleet that
/// connects at once (after a restart, say): the connections beyond it are
/// dropped and retry their SYN a second or more later.
const LISTEN_BACKLOG: u32 = 65_535;

/// A TCP listener on `addr` with a backlog of [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Runs `serve` on a new runtime until SIGINT or SIGTERM, then shuts down cleanly.
pub fn run(config: ServeConfig) -> Result<(), AppError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(AppError::Runtime)?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = wait_for_signal().await?;
        let running = start(config, shutdown.clone()).await?;
        tokio::select! {
            _ = signals => {
                tracing::info!("signal received; shutting down");
                shutdown.cancel();
            }
            _ = shutdown.cancelled() => {}
        }
        running.wait().await
    })
}

/// Installs the SIGINT/SIGTERM handlers now and returns a future that
/// completes on the first of them.
async fn wait_for_signal() -> Result<impl Future<Output = ()>, AppError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AppError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Every agent holds a socket: allow as many open files as the hard limit does.
/// Raises the open-file limit as far as allowed; returns it.
fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => {
            tracing::debug!(limit = n, "open file limit");
            n
        }
        Err(e) => {
            let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
            tracing::warn!(error = %e, limit = soft, "cannot raise the open file limit");
            soft
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_in_use_is_refused_naming_the_listener() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let config = ServeConfig {
            api_listen: addr,
            ..ServeConfig::local()
        };
        let Err(e) = start(config, CancellationToken::new()).await else {
            panic!("serve started on an address in use");
        };
        assert!(
            matches!(&e, AppError::Bind { what: "the API", addr: a, source } if *a == addr && source.kind() == std::io::ErrorKind::AddrInUse),
            "{e}"
        );
    }

    #[tokio::test]
    async fn listeners_queue_as_many_connections_as_the_kernel_allows() {
        use std::os::fd::AsRawFd;
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let cap: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            cap > 1024,
            "net.core.somaxconn is {cap}: it must exceed tokio's 1,024 for this test to tell"
        );
        // For a listening socket, TCP_INFO's `tcpi_sacked` is its backlog.
        // SAFETY: a zeroed tcp_info is valid, and the kernel writes at most `len` bytes.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        assert_eq!(info.tcpi_sacked, LISTEN_BACKLOG.min(cap));
    }

    #[tokio::test]
    async fn a_supervised_task_reports_how_it_ended() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (done, _) = supervise("boom", tokio::spawn(async { panic!("the loop broke") as () }), &tx);
        done.await.unwrap();
        let e = rx.recv().await.unwrap();
        assert_eq!((e.task, e.how.as_str()), ("boom", "it panicked: the loop broke"));

        let (done, _) = supervise("quiet", tokio::spawn(async {}), &tx);
        done.await.unwrap();
        assert_eq!(rx.recv().await.unwrap().how, "it returned");

        let (done, abort) = supervise("stuck", tokio::spawn(std::future::pending::<()>()), &tx);
        abort.abort();
        done.await.unwrap();
        assert_eq!(rx.recv().await.unwrap().how, "it was aborted");

        let (done, _) = supervise("failing", tokio::spawn(async { Err::<(), _>("no such branch") }), &tx);
        done.await.unwrap();
        assert_eq!(rx.recv().await.unwrap().how, "it failed: no such branch");
    }
}
