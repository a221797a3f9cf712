//! `opamp-gitops simulate`: N agents that behave like the OpAMP supervisor,
//! for demos, end-to-end tests, load tests and benchmarks.
//!
//! Each agent is a pure state machine ([`agent::Agent`]) driven by one task of
//! a thin transport loop (WebSocket or plain HTTP). [`start`] runs a
//! simulation in-process and lets the caller watch its counts; [`run`] waits
//! for it to finish; [`command`] is the CLI entry point.
//!
//! Attributes: every agent reports the identifying attributes `service.name`
//! (default `otelcol-sim`), `service.version` (default this crate's version)
//! and `service.instance.id` (its instance uid as a UUID), and the
//! non-identifying `host.name` (default `sim-<index>`, the agent's index from
//! 0), `host.arch`, `os.type` and `os.description`. An `--attr KEY=VALUE`
//! whose key starts with `service.` is identifying and any other is
//! non-identifying; either may replace a default. `{index}` in a value is
//! replaced by the agent's index.
//!
//! Some agents differ from the rest, picked evenly over the indexes by
//! [`picked`]: clones (another agent's uid), agents that restart their
//! process, agents without the ReportsRemoteConfig capability.
//!
//! The endpoint: `ws://`, `http://` or a bare `host:port`; a missing path
//! becomes `/v1/opamp`. The scheme follows `--transport` (an `http://` URL
//! with `--transport ws` connects to `ws://` at the same host, port and path).
//! TLS (`wss://`, `https://`) is not supported.

pub mod agent;
mod http;
mod runner;
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
use self::runner::{ConfigCache, Runner, Shared, now_unix_nano};
pub use self::stats::{Snapshot, Summary};
use crate::cli::SimulateArgs;
pub use crate::cli::{SimProfile, TransportKind};
use crate::opamp::codec::DEFAULT_MAX_MESSAGE_BYTES;

/// Everything a simulation needs; [`Config::new`] gives the CLI defaults
/// (the fast timings), [`Config::supervisor_timings`] the real supervisor's.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `ws://host:port/path`, `http://host:port/path`, or `host:port`.
    pub server: String,
    pub transport: TransportKind,
    pub agents: usize,
    /// `--attr` pairs, in order; a later one wins.
    pub attrs: Vec<(String, String)>,
    /// The collector exits on a config with a file holding this text.
    pub fail_if_contains: Option<String>,
    /// The collector runs a config with a file holding this text, but never
    /// turns healthy.
    pub unhealthy_if_contains: Option<String>,
    /// Least time between APPLYING and APPLIED.
    pub apply_delay: Duration,
    /// Time a collector takes to turn healthy (or to exit on a refused config).
    pub startup_time: Duration,
    /// A config not healthy this long after it arrived is FAILED.
    pub config_apply_timeout: Duration,
    /// Wait before a collector that exited starts again.
    pub crash_restart_delay: Duration,
    /// Go back to the last applied config after a FAILED one.
    pub rollback: bool,
    /// Restart agents' processes about this often.
    pub restart_every: Option<Duration>,
    /// Share of agents that restart (with `restart_every`), 0 to 1.
    pub restart_fraction: f64,
    /// Share of agents without the ReportsRemoteConfig capability, 0 to 1.
    pub no_config_status_fraction: f64,
    /// Share of agents that start with another agent's instance uid, 0 to 1.
    pub clone_fraction: f64,
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
            unhealthy_if_contains: None,
            apply_delay: Duration::from_millis(200),
            startup_time: Duration::from_millis(100),
            config_apply_timeout: SUPERVISOR_APPLY_TIMEOUT,
            crash_restart_delay: Duration::from_secs(1),
            rollback: false,
            restart_every: None,
            restart_fraction: 1.0,
            no_config_status_fraction: 0.0,
            clone_fraction: 0.0,
            duration: None,
            heartbeat: Duration::from_secs(30),
            max_connecting: DEFAULT_MAX_CONNECTING,
            progress: false,
        }
    }

    /// The real supervisor's timings: a collector healthy about a second
    /// after it starts, APPLIED when the 5 s config apply timeout passes with
    /// the collector healthy, and 5 s before a collector that exited starts again.
    pub fn supervisor_timings(&mut self) {
        self.apply_delay = SUPERVISOR_APPLY_TIMEOUT;
        self.startup_time = Duration::from_secs(1);
        self.config_apply_timeout = SUPERVISOR_APPLY_TIMEOUT;
        self.crash_restart_delay = Duration::from_secs(5);
    }

    pub fn from_args(args: SimulateArgs) -> Self {
        let mut c = Config::new(args.server, args.agents);
        if args.profile == SimProfile::Supervisor {
            c.supervisor_timings();
        }
        c.transport = args.transport;
        c.attrs = args.attrs;
        c.fail_if_contains = args.fail_if_contains;
        c.unhealthy_if_contains = args.unhealthy_if_contains;
        c.apply_delay = args.apply_delay.unwrap_or(c.apply_delay);
        c.startup_time = args.startup_time.unwrap_or(c.startup_time);
        c.config_apply_timeout = args.config_apply_timeout.unwrap_or(c.config_apply_timeout);
        c.crash_restart_delay = args.crash_restart_delay.unwrap_or(c.crash_restart_delay);
        c.rollback = args.rollback;
        c.restart_every = args.restart_every;
        c.restart_fraction = args.restart_fraction.unwrap_or(1.0);
        c.no_config_status_fraction = args.no_config_status_fraction;
        c.clone_fraction = args.clone_fraction;
        c.duration = args.duration;
        c.heartbeat = args.heartbeat;
        c.max_connecting = args.max_connecting;
        c.progress = true;
        c
    }

    /// The agents' shared profile, from the defaults and `--attr`.
    pub fn profile(&self) -> Profile {
        let mut identifying = BTreeMap::from([
            ("service.name".to_string(), "otelcol-sim".to_string()),
            ("service.version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ]);
        let mut non_identifying = BTreeMap::from([
            ("host.name".to_string(), "sim-{index}".to_string()),
            ("host.arch".to_string(), host_arch().to_string()),
            ("os.type".to_string(), std::env::consts::OS.to_string()),
            ("os.description".to_string(), os_description()),
        ]);
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
            unhealthy_if_contains: self.unhealthy_if_contains.clone().filter(|t| !t.is_empty()),
            apply_delay: self.apply_delay,
            startup_time: self.startup_time,
            config_apply_timeout: self.config_apply_timeout,
            crash_restart_delay: self.crash_restart_delay,
            heartbeat: self.heartbeat,
            rollback: self.rollback,
        }
    }

    fn check(&self) -> Result<(), SimulateError> {
        if self.agents == 0 {
            return Err(SimulateError::NoAgents);
        }
        if self.max_connecting == 0 {
            return Err(SimulateError::NoConnecting);
        }
        if self.transport == TransportKind::Http && self.heartbeat.is_zero() {
            return Err(SimulateError::ZeroPoll);
        }
        for (name, f) in [
            ("--restart-fraction", self.restart_fraction),
            ("--no-config-status-fraction", self.no_config_status_fraction),
            ("--clone-fraction", self.clone_fraction),
        ] {
            if !(0.0..=1.0).contains(&f) {
                return Err(SimulateError::BadFraction(name, f.to_string()));
            }
        }
        if self.config_apply_timeout.is_zero() {
            return Err(SimulateError::ZeroApplyTimeout);
        }
        if self.crash_restart_delay.is_zero() {
            // A crash-looping collector would report its exits in a tight loop.
            return Err(SimulateError::ZeroCrashRestartDelay);
        }
        Ok(())
    }
}

/// The supervisor's default `agent::config_apply_timeout`.
pub const SUPERVISOR_APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The default bound on handshakes in flight.
pub const DEFAULT_MAX_CONNECTING: usize = 64;

/// Open files kept free besides the agents' sockets (stdio, the runtime, DNS).
pub const FD_HEADROOM: u64 = 64;

/// Memory an agent takes, measured with 10,000 WebSocket agents (about 110 MB).
pub const BYTES_PER_AGENT: u64 = 11 * 1024;

/// Memory the process needs besides its agents.
pub const BASE_BYTES: u64 = 64 * 1024 * 1024;

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
    #[error("{0} must be between 0 and 1, got {1}")]
    BadFraction(&'static str, String),
    #[error("--config-apply-timeout must be above zero")]
    ZeroApplyTimeout,
    #[error("--crash-restart-delay must be above zero")]
    ZeroCrashRestartDelay,
    #[error(
        "--agents {agents} needs {need} open files (one socket per agent plus {FD_HEADROOM}) \
         but the limit is {limit}; raise it (ulimit -n) or run fewer agents"
    )]
    TooFewFiles { agents: usize, need: u64, limit: u64 },
    #[error(
        "--agents {agents} needs about {need_mib} MiB (about 11 KiB per agent) but {available_mib} MiB \
         is available; run fewer agents"
    )]
    TooLittleMemory {
        agents: usize,
        need_mib: u64,
        available_mib: u64,
    },
    #[error("simulation task failed: {0}")]
    Task(String),
}

/// Whether agent `index` is one of a share `fraction` of the agents, spread
/// evenly over the indexes; `offset` shifts which ones, so that two shares
/// of one simulation do not pick the same agents.
pub fn picked(index: usize, fraction: f64, offset: usize) -> bool {
    let f = fraction.clamp(0.0, 1.0);
    let i = (index + offset) as f64;
    ((i + 1.0) * f).floor() > (i * f).floor()
}

/// The OpenTelemetry `host.arch` of this machine (Go's names, as the collector reports them).
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" => "ppc64",
        "s390x" => "s390x",
        other => other,
    }
}

fn os_description() -> String {
    let os = match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "macOS",
        "windows" => "Windows",
        other => other,
    };
    format!("{os} (simulated collector)")
}

/// Checks that `agents` agents fit in this process: one open file each
/// (WebSocket) or each request in flight (HTTP), after raising the soft
/// open-file limit to the hard one; and memory for each.
fn check_resources(config: &Config) -> Result<(), SimulateError> {
    let agents = config.agents;
    if let Some(available) = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| mem_available(&t))
    {
        let need = (agents as u64)
            .saturating_mul(BYTES_PER_AGENT)
            .saturating_add(BASE_BYTES);
        if need > available {
            return Err(SimulateError::TooLittleMemory {
                agents,
                need_mib: need / (1024 * 1024),
                available_mib: available / (1024 * 1024),
            });
        }
    }
    let sockets = match config.transport {
        TransportKind::Ws => agents,
        TransportKind::Http => agents.min(config.max_connecting),
    } as u64;
    let need = sockets.saturating_add(FD_HEADROOM);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < need => Err(SimulateError::TooFewFiles { agents, need, limit }),
        Ok(_) => Ok(()),
        Err(error) => {
            tracing::warn!(%error, "could not read or raise the open-file limit");
            Ok(())
        }
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => n.checked_mul(1024),
        Some(_) => None,
    }
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

/// `host:port` of an endpoint URL that `endpoint_url` made, port 80 by default.
fn host_and_port(url: &str) -> String {
    let uri: ::http::Uri = url.parse().expect("endpoint_url checks that the URL parses");
    format!("{}:{}", uri.host().unwrap_or_default(), uri.port_u16().unwrap_or(80))
}

/// Starts `config.agents` agents on the current tokio runtime. They stop,
/// each sending `agent_disconnect`, when `cancel` fires or `config.duration`
/// has passed.
pub fn start(config: Config, cancel: CancellationToken) -> Result<Simulation, SimulateError> {
    let url = endpoint_url(&config.server, config.transport)?;
    config.check()?;
    check_resources(&config)?;

    let shared = Arc::new(Shared {
        authority: host_and_port(&url),
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
    let mut original: Option<[u8; 16]> = None;
    for index in 0..config.agents {
        // A clone starts with the uid of the last agent that is not one, as
        // a host made from a copied disk image does.
        let uid = match original {
            Some(uid) if picked(index, config.clone_fraction, 0) => uid,
            _ => {
                let uid = *uuid::Uuid::now_v7().as_bytes();
                original = Some(uid);
                uid
            }
        };
        let mut agent = Agent::new(Arc::clone(&profile), index, uid, started);
        if let Some(every) = config.restart_every
            && picked(index, config.restart_fraction, 1)
        {
            agent = agent.restarting_every(every);
        }
        if picked(index, config.no_config_status_fraction, 2) {
            agent = agent.without_remote_config_status();
        }
        let runner = Runner::new(agent, Arc::clone(&shared));
        let cancel = cancel.clone();
        match &client {
            Some(client) => tracker.spawn(http::run(runner, client.clone(), cancel)),
            None => tracker.spawn(ws::run(runner, cancel)),
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
        for (url, want) in [
            ("ws://127.0.0.1:4320/v1/opamp", "127.0.0.1:4320"),
            ("http://[::1]:4320/v1/opamp", "[::1]:4320"),
            ("ws://localhost/v1/opamp", "localhost:80"),
        ] {
            assert_eq!(host_and_port(url), want, "{url}");
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
            ("os.description".into(), "Ubuntu 24.04".into()),
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
                ("host.arch".into(), host_arch().into()),
                ("host.name".into(), "edge-{index}".into()),
                ("os.description".into(), "Ubuntu 24.04".into()),
                ("os.type".into(), std::env::consts::OS.into()),
            ])
        );
        let defaults = Config::new("h:1", 1).profile();
        assert_eq!(defaults.identifying["service.name"], "otelcol-sim");
        assert_eq!(defaults.identifying["service.version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(defaults.non_identifying["host.name"], "sim-{index}");
        assert!(defaults.non_identifying["os.description"].ends_with("(simulated collector)"));
    }

    #[test]
    fn shares_are_spread_evenly_and_exact() {
        let cases = [
            (0.0, 0, 10, vec![]),
            (1.0, 0, 4, vec![0, 1, 2, 3]),
            (0.5, 0, 6, vec![1, 3, 5]),
            (0.25, 0, 8, vec![3, 7]),
            (0.25, 1, 8, vec![2, 6]),
            (0.1, 2, 20, vec![7, 17]),
        ];
        for (fraction, offset, n, want) in cases {
            let got: Vec<usize> = (0..n).filter(|&i| picked(i, fraction, offset)).collect();
            assert_eq!(got, want, "{fraction} of {n}, offset {offset}");
        }
        for n in [1usize, 7, 100, 1001] {
            for f in [0.0, 0.01, 0.1, 0.33, 0.5, 0.9, 1.0] {
                let count = (0..n).filter(|&i| picked(i, f, 1)).count() as f64;
                assert!((count - n as f64 * f).abs() <= 1.0, "{f} of {n}: {count}");
            }
        }
    }

    #[test]
    fn mem_available_from_meminfo() {
        let text = "MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(mem_available(text), Some(12_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
        assert_eq!(mem_available("MemAvailable: 5 MB\n"), None);
    }

    #[test]
    fn supervisor_timings() {
        let mut c = Config::new("h:1", 1);
        c.supervisor_timings();
        assert_eq!(
            (
                c.apply_delay,
                c.startup_time,
                c.config_apply_timeout,
                c.crash_restart_delay
            ),
            (
                Duration::from_secs(5),
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(5)
            )
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
        c.clone_fraction = 1.5;
        assert_eq!(
            start(c.clone(), cancel.clone()).err(),
            Some(SimulateError::BadFraction("--clone-fraction", "1.5".into()))
        );
        c.clone_fraction = 0.5;
        c.config_apply_timeout = Duration::ZERO;
        assert_eq!(
            start(c.clone(), cancel.clone()).err(),
            Some(SimulateError::ZeroApplyTimeout)
        );
        c.config_apply_timeout = Duration::from_secs(5);
        c.crash_restart_delay = Duration::ZERO;
        assert_eq!(
            start(c.clone(), cancel.clone()).err(),
            Some(SimulateError::ZeroCrashRestartDelay)
        );
        c.crash_restart_delay = Duration::from_secs(1);
        c.agents = usize::MAX / 2;
        assert!(
            matches!(
                start(c.clone(), cancel.clone()).err(),
                Some(SimulateError::TooLittleMemory { .. } | SimulateError::TooFewFiles { .. })
            ),
            "far too many agents are refused before anything starts"
        );
        c.agents = 1;
        c.transport = TransportKind::Http;
        c.heartbeat = Duration::ZERO;
        assert_eq!(start(c, cancel).err(), Some(SimulateError::ZeroPoll));
    }
}
