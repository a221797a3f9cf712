//! Wiring for `serve`: binds the listeners, spawns the fleet task, the OpAMP
//! server and the API, and owns the shutdown order (stop accepting, close
//! WebSockets, finish in-flight HTTP replies, then stop the fleet).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiState, Assignments, Readiness};
use crate::fleet::{self, FleetConfig, FleetHandle};
use crate::metrics::Metrics;
use crate::opamp::codec::DEFAULT_MAX_MESSAGE_BYTES;
use crate::opamp::transport::{self, OpampContext};

/// How long shutdown waits for connections to finish before it gives up on them.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// What `serve` needs to run.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub opamp_listen: SocketAddr,
    pub api_listen: SocketAddr,
    pub max_message_bytes: usize,
    /// Agents are assumed to report at least this often; an HTTP agent silent
    /// for three intervals is offline. Not offered to agents (see README).
    pub heartbeat_interval: Duration,
}

impl ServeConfig {
    /// Both listeners on 127.0.0.1 with ports picked by the system; for tests.
    pub fn local() -> Self {
        ServeConfig {
            opamp_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            heartbeat_interval: Duration::from_secs(30),
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
    #[error("a task panicked: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A started controller.
pub struct Running {
    /// Where agents connect (the bound address, port resolved).
    pub opamp_addr: SocketAddr,
    /// Where the API listens.
    pub api_addr: SocketAddr,
    pub fleet: FleetHandle,
    pub metrics: Arc<Metrics>,
    /// Readiness as `/readyz` reports it; the git source sets it.
    pub readiness: watch::Sender<Readiness>,
    /// Per-agent assignments the API shows; the reconciler publishes them.
    pub assignments: watch::Sender<Arc<Assignments>>,
    /// Cancel to shut down.
    pub shutdown: CancellationToken,
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
}

/// Binds both listeners and starts everything. Returns once the sockets are
/// bound; the controller runs until `shutdown` is cancelled.
pub async fn start(config: ServeConfig, shutdown: CancellationToken) -> Result<Running, AppError> {
    raise_fd_limit();
    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { what, addr, source })
    };
    let opamp_listener = bind("OpAMP", config.opamp_listen).await?;
    let api_listener = bind("the API", config.api_listen).await?;
    let local = |l: &TcpListener, what: &'static str, addr: SocketAddr| {
        l.local_addr().map_err(|source| AppError::Bind { what, addr, source })
    };
    let opamp_addr = local(&opamp_listener, "OpAMP", config.opamp_listen)?;
    let api_addr = local(&api_listener, "the API", config.api_listen)?;

    let metrics = Arc::new(Metrics::default());
    let fleet_stop = CancellationToken::new();
    let (fleet, fleet_task) = fleet::spawn(
        FleetConfig {
            heartbeat_interval: config.heartbeat_interval,
        },
        fleet_stop.clone(),
    );
    let (readiness, readiness_rx) = watch::channel(Readiness::initial());
    let (assignments, assignments_rx) = watch::channel(Arc::new(Assignments::new()));
    let sessions = TaskTracker::new();
    let opamp_ctx = OpampContext::new(
        fleet.clone(),
        metrics.clone(),
        config.max_message_bytes,
        shutdown.clone(),
        sessions.clone(),
    );
    let api_state = ApiState {
        fleet: fleet.clone(),
        metrics: metrics.clone(),
        readiness: readiness_rx,
        assignments: assignments_rx,
    };

    let nodelay = |tcp: &mut tokio::net::TcpStream| {
        // Replies are small; do not let Nagle hold them back.
        let _ = tcp.set_nodelay(true);
    };
    let opamp_server = axum::serve(opamp_listener.tap_io(nodelay), transport::router(opamp_ctx))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let api_server = axum::serve(api_listener.tap_io(nodelay), api::router(api_state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    tracing::info!(opamp = %opamp_addr, api = %api_addr, "listening");

    let done = tokio::spawn(async move {
        let servers = async { tokio::join!(opamp_server.into_future(), api_server.into_future()) };
        let (opamp_result, api_result) = servers.await;
        tracing::info!("listeners closed; waiting for connections to finish");
        sessions.close();
        if tokio::time::timeout(DRAIN_DEADLINE, sessions.wait()).await.is_err() {
            tracing::warn!(open = sessions.len(), "WebSocket sessions did not finish in time");
        }
        fleet_stop.cancel();
        fleet_task.await?;
        tracing::info!("stopped");
        opamp_result.map_err(|source| AppError::Serve { what: "OpAMP", source })?;
        api_result.map_err(|source| AppError::Serve { what: "API", source })?;
        Ok(())
    });

    Ok(Running {
        opamp_addr,
        api_addr,
        fleet,
        metrics,
        readiness,
        assignments,
        shutdown,
        done,
    })
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
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
}
