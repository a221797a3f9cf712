//! `opamp-gitops simulate`: N agents that behave like the OpAMP supervisor,
//! for demos, end-to-end tests, load tests and benchmarks.
//!
//! Each agent is a pure state machine ([`agent::Agent`]) driven by one task of
//! a thin transport loop (WebSocket or plain HTTP). [`start`] runs a
//! simulation in-process and lets the caller watch its counts; [`run`] waits
//! for it to finish; [`command`] is the CLI entry point.
//!
//! Attributes: every agent reports the identifying attributes `service.name`
//! (default `otelcol-sim`) and `service.instance.id` (its instance uid as a
//! UUID), and the non-identifying `host.name` (default `sim-<index>`, the
//! agent's index from 0). An `--attr KEY=VALUE` whose key starts with
//! `service.` is identifying and any other is non-identifying; either may
//! replace a default. `{index}` in a value is replaced by the agent's index.
//!
//! The endpoint: `ws://`, `http://` or a bare `host:port`; a missing path
//! becomes `/v1/opamp`. The scheme follows `--transport` (an `http://` URL
//! with `--transport ws` connects to `ws://` at the same host, port and path).
//! TLS (`wss://`, `https://`) is not supported.

pub mod agent;
mod driver;
mod http;
pub mod stats;
mod ws;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::agent::{Agent, CAPABILITIES, Profile};
use self::driver::{ConfigCache, Driver, Shared, now_unix_nano};
pub use self::stats::{Snapshot, Summary};
use crate::cli::SimulateArgs;
pub use crate::cli::TransportKind;
use crate::opamp::codec::DEFAULT_MAX_MESSAGE_BYTES;

/// Everything a simulation needs; [`Config::new`] gives the CLI defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `ws://host:port/path`, `http://host:port/path`, or `host:port`.
    pub server: String,
    pub transport: TransportKind,
    pub agents: usize,
    /// `--attr` pairs, in order; a later one wins.
    pub attrs: Vec<(String, String)>,
    pub fail_if_contains: Option<String>,
    pub apply_delay: Duration,
    /// Stop after this long; `None` runs until cancelled.
    pub duration: Option<Duration>,
    pub heartbeat: Duration,
    /// WebSocket handshakes (or HTTP requests) in flight at once.
    pub max_connecting: usize,
    /// Print progress to stderr about once a second.
    pub progress: bool,
}

impl Config {
    pub fn new(server: impl Into<String>, agents: usize) -> Self {
        Config {
            server: server.into(),
            transport: TransportKind::Ws,
            agents,
            attrs: Vec::new(),
            fail_if_contains: None,
            apply_delay: Duration::from_millis(200),
            duration: None,
            heartbeat: Duration::from_secs(30),
            max_connecting: DEFAULT_MAX_CONNECTING,
            progress: false,
        }
    }

    pub fn from_args(args: SimulateArgs) -> Self {
        Config {
            server: args.server,
            transport: args.transport,
            agents: args.agents,
            attrs: args.attrs,
            fail_if_contains: args.fail_if_contains,
            apply_delay: args.apply_delay,
            duration: args.duration,
            heartbeat: args.heartbeat,
            max_connecting: args.max_connecting,
            progress: true,
        }
    }

    /// The agents' shared profile, from the defaults and `--attr`.
    pub fn profile(&self) -> Profile {
        let mut identifying = BTreeMap::from([("service.name".to_string(), "otelcol-sim".to_string())]);
        let mut non_identifying = BTreeMap::from([("host.name".to_string(), "sim-{index}".to_string())]);
        for (k, v) in &self.attrs {
            if k.starts_with("service.") {
                identifying.insert(k.clone(), v.clone());
            } else {
                non_identifying.insert(k.clone(), v.clone());
            }
        }
        Profile {
            identifying,
            non_identifying,
            fail_if_contains: self.fail_if_contains.clone().filter(|t| !t.is_empty()),
            apply_delay: self.apply_delay,
            heartbeat: self.heartbeat,
        }
    }
}

/// The default bound on handshakes in flight.
pub const DEFAULT_MAX_CONNECTING: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimulateError {
    #[error("--server {0:?}: {1}")]
    BadServer(String, &'static str),
    #[error("--agents must be at least 1")]
    NoAgents,
    #[error("--max-connecting must be at least 1")]
    NoConnecting,
    #[error("--heartbeat must be above zero for HTTP agents (it is their polling interval)")]
    ZeroPoll,
    #[error("simulation task failed: {0}")]
    Task(String),
}

/// Turns `--server` into the URL the transport dials.
pub fn endpoint_url(server: &str, transport: TransportKind) -> Result<String, SimulateError> {
    let bad = |why| SimulateError::BadServer(server.to_string(), why);
    let trimmed = server.trim();
    let rest = match trimmed.split_once("://") {
        Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => rest,
            "wss" | "https" => return Err(bad("TLS is not supported by simulate; use ws:// or http://")),
            _ => return Err(bad("expected ws://, http:// or host:port")),
        },
        None => trimmed,
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("expected a host and port"));
    }
    let path = match path {
        "" | "/" => "/v1/opamp",
        p if p.starts_with('?') => return Err(bad("a query needs a path")),
        p => p,
    };
    let scheme = match transport {
        TransportKind::Ws => "ws",
        TransportKind::Http => "http",
    };
    let url = format!("{scheme}://{authority}{path}");
    url.parse::<::http::Uri>().map_err(|_| bad("not a valid URL"))?;
    Ok(url)
}

/// A running simulation.
pub struct Simulation {
    stats: watch::Receiver<Snapshot>,
    done: JoinHandle<Summary>,
}

impl Simulation {
    /// Counts, refreshed about ten times a second.
    pub fn stats(&self) -> watch::Receiver<Snapshot> {
        self.stats.clone()
    }

    /// Waits until every agent has stopped (after `cancel` or `duration`).
    pub async fn wait(self) -> Result<Summary, SimulateError> {
        self.done.await.map_err(|e| SimulateError::Task(e.to_string()))
    }
}

/// Starts `config.agents` agents on the current tokio runtime. They stop,
/// each sending `agent_disconnect`, when `cancel` fires or `config.duration`
/// has passed.
pub fn start(config: Config, cancel: CancellationToken) -> Result<Simulation, SimulateError> {
    let url = endpoint_url(&config.server, config.transport)?;
    if config.agents == 0 {
        return Err(SimulateError::NoAgents);
    }
    if config.max_connecting == 0 {
        return Err(SimulateError::NoConnecting);
    }
    if config.transport == TransportKind::Http && config.heartbeat.is_zero() {
        return Err(SimulateError::ZeroPoll);
    }
    raise_fd_limit(config.agents);

    let shared = Arc::new(Shared {
        url,
        counters: Default::default(),
        connecting: Semaphore::new(config.max_connecting),
        configs: ConfigCache::default(),
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
    });
    let profile = Arc::new(config.profile());
    let cancel = cancel.child_token();
    if let Some(d) = config.duration {
        let stop = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(d) => stop.cancel(),
            }
        });
    }

    let tracker = TaskTracker::new();
    let started = now_unix_nano();
    let client = (config.transport == TransportKind::Http).then(http::client);
    for index in 0..config.agents {
        let uid = *uuid::Uuid::now_v7().as_bytes();
        let driver = Driver::new(
            Agent::new(Arc::clone(&profile), index, uid, started),
            Arc::clone(&shared),
        );
        let cancel = cancel.clone();
        match &client {
            Some(client) => tracker.spawn(http::run(driver, client.clone(), cancel)),
            None => tracker.spawn(ws::run(driver, cancel)),
        };
    }
    tracker.close();

    let (tx, rx) = watch::channel(shared.counters.snapshot(config.agents));
    let done = tokio::spawn(watch_over(shared, tracker, tx, config.agents, config.progress));
    Ok(Simulation { stats: rx, done })
}

/// Runs a simulation to its end.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<Summary, SimulateError> {
    start(config, cancel)?.wait().await
}

/// Publishes counts until the agents are done, printing progress if asked.
async fn watch_over(
    shared: Arc<Shared>,
    tracker: TaskTracker,
    tx: watch::Sender<Snapshot>,
    agents: usize,
    progress: bool,
) -> Summary {
    let begun = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_print = begun;
    let mut peak = 0;
    let finished = tracker.wait();
    tokio::pin!(finished);
    loop {
        tokio::select! {
            _ = &mut finished => break,
            _ = tick.tick() => {
                let snap = shared.counters.snapshot(agents);
                peak = peak.max(snap.connected);
                tx.send_if_modified(|old| std::mem::replace(old, snap) != snap);
                if progress && last_print.elapsed() >= Duration::from_secs(1) {
                    last_print = Instant::now();
                    eprintln!("simulate: {snap}");
                }
            }
        }
    }
    let stats = shared.counters.snapshot(agents);
    tx.send_replace(stats);
    Summary {
        stats,
        peak_connected: peak.max(stats.connected),
        elapsed: begun.elapsed(),
    }
}

/// Each agent needs a socket; the usual soft limit of 1024 is far too few.
fn raise_fd_limit(agents: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < agents as u64 + 64 => {
            tracing::warn!(limit, agents, "open-file limit is below the number of agents");
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "could not raise the open-file limit"),
    }
}

/// `opamp-gitops simulate`: runs until `--duration`, SIGINT or SIGTERM, then
/// prints a summary. Exits 2 on bad arguments, 1 if no agent ever connected.
pub fn command(args: SimulateArgs) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        tokio::spawn(stop_on_signal(cancel.clone()));
        match run(Config::from_args(args), cancel).await {
            Ok(summary) => {
                eprintln!("simulate: {summary}");
                if summary.stats.connects == 0 {
                    eprintln!("error: no agent could connect");
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        }
    })
}

/// The first SIGINT or SIGTERM stops the agents gracefully; a second one exits at once.
async fn stop_on_signal(cancel: CancellationToken) {
    let mut stops = 0;
    loop {
        if wait_for_signal().await.is_err() {
            return;
        }
        stops += 1;
        if stops > 1 {
            std::process::exit(130);
        }
        eprintln!("simulate: stopping (again to exit at once)");
        cancel.cancel();
    }
}

#[cfg(unix)]
async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        use TransportKind::{Http, Ws};
        let ok = [
            ("ws://127.0.0.1:4320/v1/opamp", Ws, "ws://127.0.0.1:4320/v1/opamp"),
            ("http://127.0.0.1:4320/v1/opamp", Http, "http://127.0.0.1:4320/v1/opamp"),
            ("127.0.0.1:4320", Ws, "ws://127.0.0.1:4320/v1/opamp"),
            ("127.0.0.1:4320", Http, "http://127.0.0.1:4320/v1/opamp"),
            ("http://localhost:4320", Http, "http://localhost:4320/v1/opamp"),
            ("ws://localhost:4320/", Ws, "ws://localhost:4320/v1/opamp"),
            ("http://h:1/custom/path", Ws, "ws://h:1/custom/path"),
            ("WS://[::1]:4320", Http, "http://[::1]:4320/v1/opamp"),
            ("h:1/v1/opamp?x=1", Ws, "ws://h:1/v1/opamp?x=1"),
        ];
        for (input, transport, want) in ok {
            assert_eq!(endpoint_url(input, transport).as_deref(), Ok(want), "{input}");
        }
        for bad in [
            "wss://h:1",
            "https://h:1",
            "ftp://h:1",
            "",
            "http://",
            "http:///v1",
            "h:1?x",
            "a b:1",
        ] {
            assert!(
                matches!(endpoint_url(bad, Ws), Err(SimulateError::BadServer(..))),
                "{bad}"
            );
        }
    }

    #[test]
    fn attrs_split_by_service_prefix_and_override_defaults() {
        let mut c = Config::new("h:1", 1);
        c.attrs = vec![
            ("service.name".into(), "otelcol-edge".into()),
            ("service.version".into(), "1.2".into()),
            ("deployment.environment".into(), "prod".into()),
            ("host.name".into(), "edge-{index}".into()),
        ];
        let p = c.profile();
        assert_eq!(
            p.identifying,
            BTreeMap::from([
                ("service.name".into(), "otelcol-edge".into()),
                ("service.version".into(), "1.2".into()),
            ])
        );
        assert_eq!(
            p.non_identifying,
            BTreeMap::from([
                ("deployment.environment".into(), "prod".into()),
                ("host.name".into(), "edge-{index}".into()),
            ])
        );
    }

    #[tokio::test]
    async fn bad_configs_are_errors() {
        let cancel = CancellationToken::new();
        let mut c = Config::new("h:1", 0);
        assert_eq!(start(c.clone(), cancel.clone()).err(), Some(SimulateError::NoAgents));
        c.agents = 1;
        c.max_connecting = 0;
        assert_eq!(
            start(c.clone(), cancel.clone()).err(),
            Some(SimulateError::NoConnecting)
        );
        c.max_connecting = 1;
        c.transport = TransportKind::Http;
        c.heartbeat = Duration::ZERO;
        assert_eq!(start(c, cancel).err(), Some(SimulateError::ZeroPoll));
    }
}
