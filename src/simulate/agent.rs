//! One simulated agent as a pure state machine: it takes what the server sent
//! or which timer fired, and returns the message to send, the timers to arm
//! and whether to reconnect. No I/O, no clock: the transports feed it.
//!
//! It behaves like the OpAMP supervisor of opentelemetry-collector-contrib
//! (built on opamp-go) with remote configuration switched on, running a
//! simulated collector:
//!
//! - the first message of a process carries its whole state, with the remote
//!   config status it persisted (UNSET with an empty hash before any config)
//!   and health false until the collector has started;
//! - a reconnect sends only what changed while offline (a WebSocket sends one
//!   message even if nothing did); the whole state again only when the server
//!   sets ReportFullState or after a process restart;
//! - a new config hash is APPLYING at once and restarts the collector; it is
//!   APPLIED after the apply delay once the collector is healthy; a collector
//!   that exits on the config makes it FAILED at once and crash-loops; one that
//!   is not healthy within the config apply timeout makes it FAILED with
//!   "Config apply timeout exceeded"; a file that does not parse as YAML makes
//!   it FAILED at once while the previous config keeps running;
//! - the same hash again changes nothing and sends nothing;
//! - a process restart keeps the instance uid and the last remote config
//!   status, starts over at sequence number 0 and restarts the collector.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::proto::{
    AgentCapabilities, AgentConfigMap, AgentDescription, AgentDisconnect, AgentRemoteConfig, AgentToServer, AnyValue,
    ComponentHealth, EffectiveConfig, KeyValue, RemoteConfigStatus, RemoteConfigStatuses, ServerToAgent,
    ServerToAgentFlags, any_value,
};

/// The capabilities a simulated agent reports: the supervisor's defaults
/// (ReportsStatus, ReportsEffectiveConfig, ReportsOwnMetrics, ReportsHealth,
/// ReportsHeartbeat) with AcceptsRemoteConfig and ReportsRemoteConfig on.
pub const CAPABILITIES: u64 = AgentCapabilities::ReportsStatus as u64
    | AgentCapabilities::AcceptsRemoteConfig as u64
    | AgentCapabilities::ReportsEffectiveConfig as u64
    | AgentCapabilities::ReportsOwnMetrics as u64
    | AgentCapabilities::ReportsHealth as u64
    | AgentCapabilities::ReportsRemoteConfig as u64
    | AgentCapabilities::ReportsHeartbeat as u64;

/// The error a config gets that the collector is not healthy with in time
/// (the supervisor's wording).
pub const APPLY_TIMEOUT_ERROR: &str = "Config apply timeout exceeded";

/// The health error the supervisor reports as it stops.
pub const SHUTDOWN_ERROR: &str = "Supervisor is shutdown";

/// What every agent of one simulation shares: attributes and behaviour knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Identifying attributes besides `service.instance.id` (which is the uid).
    /// Values may hold `{index}`, replaced by the agent's index.
    pub identifying: BTreeMap<String, String>,
    /// Non-identifying attributes; values may hold `{index}` too.
    pub non_identifying: BTreeMap<String, String>,
    /// The collector exits on a config with a file whose body holds this text.
    pub fail_if_contains: Option<String>,
    /// The collector runs a config with a file whose body holds this text, but
    /// never turns healthy.
    pub unhealthy_if_contains: Option<String>,
    /// Least time between APPLYING and APPLIED.
    pub apply_delay: Duration,
    /// Time a collector takes to turn healthy (or to exit on a refused config)
    /// after it starts; also the gap of a process restart.
    pub startup_time: Duration,
    /// A config whose collector is not healthy this long after it arrived is FAILED.
    pub config_apply_timeout: Duration,
    /// Wait before starting a collector that exited again.
    pub crash_restart_delay: Duration,
    /// Heartbeat (WebSocket) or polling (HTTP) interval; zero turns WebSocket heartbeats off.
    pub heartbeat: Duration,
    /// After a FAILED config, go back to the last config that was APPLIED and
    /// report it APPLIED again (the supervisor's opt-in rollback).
    pub rollback: bool,
}

/// The agent's timers. Each is armed and disarmed through [`Output::timers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// The apply delay of the config being applied has passed.
    Apply,
    /// The config apply timeout of the config being applied has passed.
    ApplyTimeout,
    /// The collector's next step: started (healthy, unhealthy or exited), or
    /// started again after it exited.
    Collector,
    /// Send a heartbeat (WebSocket) or poll (HTTP).
    Heartbeat,
    /// The whole process restarts.
    Restart,
}

impl Timer {
    pub const ALL: [Timer; 5] = [
        Timer::Apply,
        Timer::ApplyTimeout,
        Timer::Collector,
        Timer::Heartbeat,
        Timer::Restart,
    ];
}

/// Something that happened to the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The process starts: the collector starts and the restart timer is armed.
    /// Fed once, before anything else.
    Start,
    /// A new connection is up (WebSocket), or the first request of the
    /// process is about to be sent (HTTP). Sends what is pending; a WebSocket
    /// sends a message even if nothing is.
    Connected,
    /// The server answers again after failed requests (HTTP): what changed
    /// meanwhile is sent, if anything did.
    Online,
    /// The connection is gone; nothing is sent until `Connected` or `Online`.
    Disconnected,
    /// The server sent this.
    Received(Box<ServerToAgent>),
    /// A timer armed by an earlier [`Output::timers`] fired.
    Timer(Timer),
    /// The agent is stopping.
    Shutdown,
}

/// What the transport must do after an input.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Output {
    /// The message to send, if any.
    pub send: Option<AgentToServer>,
    /// Timers to arm (`Some(after)`, replacing an armed one) or disarm (`None`).
    pub timers: Vec<(Timer, Option<Duration>)>,
    /// The process restarts: after sending `send`, drop the connection and
    /// connect again this long from now (feeding `Connected`).
    pub reconnect: Option<Duration>,
}

impl Output {
    fn arm(&mut self, timer: Timer, after: Duration) {
        self.timers.retain(|(t, _)| *t != timer);
        self.timers.push((timer, Some(after)));
    }

    fn disarm(&mut self, timer: Timer) {
        self.timers.retain(|(t, _)| *t != timer);
        self.timers.push((timer, None));
    }

    /// What happened to `timer`: `Some(Some(d))` armed, `Some(None)` disarmed.
    pub fn timer(&self, timer: Timer) -> Option<Option<Duration>> {
        self.timers.iter().find(|(t, _)| *t == timer).map(|(_, d)| *d)
    }
}

/// Where the agent stands with its remote config, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No remote config received yet.
    None,
    Applying,
    Applied,
    Failed,
}

/// What the simulated collector is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Proc {
    /// Started, not yet healthy.
    Starting,
    Healthy,
    /// Running, but a component reports this error.
    Unhealthy(String),
    /// Exited on its config; it starts again after the crash restart delay.
    Crashed,
    /// Not run: the remote config has no files.
    Stopped,
}

/// The collector the supervisor runs.
#[derive(Debug, Clone)]
struct Collector {
    /// The config it was given.
    config: Arc<AgentConfigMap>,
    proc: Proc,
    /// When the current run started (health start time).
    started_unix_nano: u64,
    /// Its process id, for the exit message; a new one each run.
    pid: u32,
}

/// The config being applied, until its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Window {
    hash: Bytes,
    /// The apply delay has passed: APPLIED as soon as the collector is healthy.
    delay_passed: bool,
    /// Going back to the last good config after a failure: APPLIED once
    /// healthy, without APPLYING first.
    rollback: bool,
}

/// One simulated agent.
#[derive(Debug, Clone)]
pub struct Agent {
    profile: Arc<Profile>,
    index: usize,
    uid: [u8; 16],
    reports_remote_config: bool,
    restart_every: Option<Duration>,
    rng: u64,
    next_seq: u64,
    connected: bool,
    heartbeat: Duration,
    /// The remote config status, persisted across restarts like the
    /// supervisor's persistent state (UNSET with an empty hash at first).
    status: RemoteConfigStatus,
    collector: Collector,
    /// The config the collector last reported running (its effective config).
    effective: Arc<AgentConfigMap>,
    /// The last config that was APPLIED, for rollback.
    last_good: Option<(Bytes, Arc<AgentConfigMap>)>,
    window: Option<Window>,
    /// What changed while offline, sent on the next connection.
    pending: Report,
    restarts: u64,
}

impl Agent {
    pub fn new(profile: Arc<Profile>, index: usize, uid: [u8; 16], started_unix_nano: u64) -> Self {
        let heartbeat = profile.heartbeat;
        let empty = Arc::new(AgentConfigMap::default());
        Agent {
            profile,
            index,
            uid,
            reports_remote_config: true,
            restart_every: None,
            rng: seed(&uid),
            next_seq: 0,
            connected: false,
            heartbeat,
            status: RemoteConfigStatus {
                status: RemoteConfigStatuses::Unset as i32,
                ..RemoteConfigStatus::default()
            },
            collector: Collector {
                config: Arc::clone(&empty),
                proc: Proc::Starting,
                started_unix_nano,
                pid: first_pid(index),
            },
            effective: empty,
            last_good: None,
            window: None,
            pending: Report::full(),
            restarts: 0,
        }
    }

    /// Without the ReportsRemoteConfig capability (the supervisor's default):
    /// configs still apply, but no remote config status is ever reported
    /// beyond the UNSET one of a full report.
    pub fn without_remote_config_status(mut self) -> Self {
        self.reports_remote_config = false;
        self
    }

    /// Restarts the whole process about every `every` (each interval drawn
    /// between half and one and a half of it).
    pub fn restarting_every(mut self, every: Duration) -> Self {
        self.restart_every = Some(every).filter(|d| !d.is_zero());
        self
    }

    pub fn uid(&self) -> [u8; 16] {
        self.uid
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// The capabilities this agent reports.
    pub fn capabilities(&self) -> u64 {
        if self.reports_remote_config {
            CAPABILITIES
        } else {
            CAPABILITIES & !(AgentCapabilities::ReportsRemoteConfig as u64)
        }
    }

    /// The heartbeat or polling interval in force (the server may change it).
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    pub fn status(&self) -> Status {
        match self.status.status() {
            RemoteConfigStatuses::Unset => Status::None,
            RemoteConfigStatuses::Applying => Status::Applying,
            RemoteConfigStatuses::Applied => Status::Applied,
            RemoteConfigStatuses::Failed => Status::Failed,
        }
    }

    /// Whether the collector reports healthy (or is not run, for an empty config).
    pub fn healthy(&self) -> bool {
        matches!(self.collector.proc, Proc::Healthy | Proc::Stopped)
    }

    /// Process restarts so far.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// The config the collector last reported running.
    pub fn effective_config(&self) -> &AgentConfigMap {
        &self.effective
    }

    /// Feeds one input; `now_unix_nano` stamps health reports.
    pub fn handle(&mut self, input: Input, now_unix_nano: u64) -> Output {
        let mut out = Output::default();
        let mut report = Report::default();
        match input {
            Input::Start => self.start_process(now_unix_nano, &mut out),
            Input::Connected => {
                self.connected = true;
                report = std::mem::take(&mut self.pending);
                report.always = true;
            }
            Input::Online => {
                self.connected = true;
                report = std::mem::take(&mut self.pending);
            }
            Input::Disconnected => self.connected = false,
            Input::Received(msg) => report = self.received(*msg, now_unix_nano, &mut out),
            Input::Timer(timer) => report = self.timer(timer, now_unix_nano, &mut out),
            Input::Shutdown => {
                if self.connected {
                    out.send = Some(self.goodbye(now_unix_nano));
                    self.connected = false;
                }
                out.disarm(Timer::Heartbeat);
            }
        }
        if self.connected {
            if !report.is_empty() {
                out.send = Some(self.message(&report, now_unix_nano));
                if report.disconnect {
                    self.connected = false;
                } else if !self.heartbeat.is_zero() {
                    out.arm(Timer::Heartbeat, self.heartbeat);
                }
            }
        } else {
            // Offline, what changed waits for the next connection (as in
            // opamp-go's next message); heartbeats and goodbyes are moot.
            self.pending.merge(&report.state_only());
        }
        out
    }

    /// The process (re)starts: the collector starts with the config it was
    /// last given, and the next restart is scheduled.
    fn start_process(&mut self, now: u64, out: &mut Output) {
        self.start_collector(now, out, self.profile.startup_time);
        if let Some(every) = self.restart_every {
            let next = self.jitter(every);
            out.arm(Timer::Restart, next);
        }
    }

    fn received(&mut self, msg: ServerToAgent, now: u64, out: &mut Output) -> Report {
        let mut report = Report::default();
        if msg.error_response.is_some() {
            // An error response carries nothing else; the transport handles retries.
            return report;
        }
        if let Some(id) = msg.agent_identification
            && let Ok(uid) = <[u8; 16]>::try_from(&id.new_instance_uid[..])
            && uid != self.uid
        {
            // Like the supervisor: adopt (and persist) it, and send the
            // description again, whose service.instance.id changed.
            self.uid = uid;
            report.description = true;
        }
        if let Some(opamp) = msg.connection_settings.and_then(|c| c.opamp)
            && opamp.heartbeat_interval_seconds != 0
        {
            let offered = Duration::from_secs(opamp.heartbeat_interval_seconds);
            if offered != self.heartbeat {
                self.heartbeat = offered;
                out.arm(Timer::Heartbeat, offered);
            }
        }
        if let Some(remote) = msg.remote_config {
            report.merge(&self.remote_config(remote, now, out));
        }
        if msg.flags & ServerToAgentFlags::ReportFullState as u64 != 0 {
            report.full = true;
        }
        report
    }

    /// A remote config arrived.
    fn remote_config(&mut self, remote: AgentRemoteConfig, now: u64, out: &mut Output) -> Report {
        let mut report = Report::default();
        let hash = remote.config_hash;
        let applying_it = self.window.as_ref().is_some_and(|w| w.hash == hash && !w.rollback);
        if applying_it || (self.status() != Status::None && self.status.last_remote_config_hash == hash) {
            if self.status() == Status::Applying && self.window.is_none() {
                // APPLYING left over by a restart (the new process started the
                // collector with it but waits for no verdict): the offer again
                // completes it.
                self.window = Some(Window {
                    hash,
                    delay_passed: true,
                    rollback: false,
                });
                out.arm(Timer::ApplyTimeout, self.profile.config_apply_timeout);
                if self.healthy() {
                    report.merge(&self.applied(out));
                }
            }
            // Otherwise the same config again is a no-op: nothing changes, so
            // nothing is sent (opamp-go sends a status only when it differs).
            return report;
        }
        let config = remote.config.unwrap_or_default();
        self.cancel_window(out);
        match compose(&config) {
            Err(error) => {
                // Like the supervisor, a config that does not merge is FAILED
                // at once; the collector keeps running what it ran.
                self.set_status(hash, RemoteConfigStatuses::Failed, error);
                report.remote_status = true;
            }
            Ok(()) if config.config_map.is_empty() => {
                // No files: the supervisor stops the collector and reports
                // APPLIED and healthy, as a collector with nothing to run would be.
                let config = Arc::new(config);
                self.collector.config = Arc::clone(&config);
                self.collector.proc = Proc::Stopped;
                out.disarm(Timer::Collector);
                self.effective = Arc::clone(&config);
                self.last_good = Some((hash.clone(), config));
                self.set_status(hash, RemoteConfigStatuses::Applied, String::new());
                report.remote_status = true;
                report.health = true;
                report.effective = true;
            }
            Ok(()) => {
                self.set_status(hash.clone(), RemoteConfigStatuses::Applying, String::new());
                self.collector.config = Arc::new(config);
                self.start_collector(now, out, self.profile.startup_time);
                self.window = Some(Window {
                    hash,
                    delay_passed: false,
                    rollback: false,
                });
                out.arm(Timer::Apply, self.profile.apply_delay);
                out.arm(Timer::ApplyTimeout, self.profile.config_apply_timeout);
                report.remote_status = true;
                report.health = true;
            }
        }
        report
    }

    fn timer(&mut self, timer: Timer, now: u64, out: &mut Output) -> Report {
        match timer {
            Timer::Heartbeat => Report {
                heartbeat: true,
                ..Report::default()
            },
            Timer::Apply => match self.window.as_mut() {
                Some(w) if !w.rollback => {
                    w.delay_passed = true;
                    if self.healthy() {
                        self.applied(out)
                    } else {
                        Report::default()
                    }
                }
                _ => Report::default(),
            },
            Timer::ApplyTimeout => match &self.window {
                Some(w) if !w.rollback => {
                    if self.healthy() {
                        self.applied(out)
                    } else {
                        self.failed(APPLY_TIMEOUT_ERROR.to_string(), now, out)
                    }
                }
                _ => Report::default(),
            },
            Timer::Collector => self.collector_step(now, out),
            Timer::Restart => {
                self.restart(now, out);
                Report::default()
            }
        }
    }

    /// The collector's next step after its timer.
    fn collector_step(&mut self, now: u64, out: &mut Output) -> Report {
        let mut report = Report::default();
        match self.collector.proc {
            Proc::Starting => match outcome(&self.collector.config, &self.profile) {
                Outcome::Healthy => {
                    self.collector.proc = Proc::Healthy;
                    self.effective = Arc::clone(&self.collector.config);
                    report.health = true;
                    report.effective = true;
                    if self.window.as_ref().is_some_and(|w| w.delay_passed || w.rollback) {
                        report.merge(&self.applied(out));
                    }
                }
                Outcome::Unhealthy(error) => {
                    // It runs (and says what it runs), but a component fails.
                    self.collector.proc = Proc::Unhealthy(error);
                    self.effective = Arc::clone(&self.collector.config);
                    report.health = true;
                    report.effective = true;
                }
                Outcome::Exits(error) => {
                    self.collector.proc = Proc::Crashed;
                    report.health = true;
                    out.arm(Timer::Collector, self.profile.crash_restart_delay);
                    if self.window.as_ref().is_some_and(|w| !w.rollback) {
                        // The supervisor does not wait for the timeout when the
                        // collector exits while a config applies.
                        let message = format!("{}\nCollector log tail:\nError: {error}", self.crash_message());
                        report.merge(&self.failed(message, now, out));
                    }
                }
            },
            Proc::Crashed => {
                // Started again after the crash restart delay; the supervisor
                // says nothing until it is healthy or exits again.
                self.collector.pid = self.collector.pid.wrapping_add(1);
                self.collector.proc = Proc::Starting;
                self.collector.started_unix_nano = now;
                out.arm(Timer::Collector, self.profile.startup_time);
            }
            Proc::Healthy | Proc::Unhealthy(_) | Proc::Stopped => {}
        }
        report
    }

    /// (Re)starts the collector with its config; its first step comes `after`.
    fn start_collector(&mut self, now: u64, out: &mut Output, after: Duration) {
        self.collector.pid = self.collector.pid.wrapping_add(1);
        self.collector.proc = Proc::Starting;
        self.collector.started_unix_nano = now;
        out.arm(Timer::Collector, after);
    }

    /// The config being applied is APPLIED.
    fn applied(&mut self, out: &mut Output) -> Report {
        let Some(w) = self.window.take() else {
            return Report::default();
        };
        out.disarm(Timer::Apply);
        out.disarm(Timer::ApplyTimeout);
        self.last_good = Some((w.hash.clone(), Arc::clone(&self.collector.config)));
        self.set_status(w.hash, RemoteConfigStatuses::Applied, String::new());
        Report {
            remote_status: true,
            ..Report::default()
        }
    }

    /// The config being applied is FAILED with `error`; with rollback on, the
    /// collector goes back to the last good config.
    fn failed(&mut self, error: String, now: u64, out: &mut Output) -> Report {
        let Some(w) = self.window.take() else {
            return Report::default();
        };
        out.disarm(Timer::Apply);
        out.disarm(Timer::ApplyTimeout);
        let mut report = Report {
            remote_status: true,
            ..Report::default()
        };
        self.set_status(w.hash.clone(), RemoteConfigStatuses::Failed, error);
        if self.profile.rollback
            && let Some((good_hash, good)) = self.last_good.clone()
            && good_hash != w.hash
        {
            self.collector.config = good;
            self.start_collector(now, out, self.profile.startup_time);
            self.window = Some(Window {
                hash: good_hash,
                delay_passed: true,
                rollback: true,
            });
            report.health = true;
        }
        report
    }

    /// Drops the config being applied, if any, and its timers.
    fn cancel_window(&mut self, out: &mut Output) {
        if self.window.take().is_some() {
            out.disarm(Timer::Apply);
            out.disarm(Timer::ApplyTimeout);
        }
    }

    /// The process restarts: goodbye (health false, `agent_disconnect`), then
    /// a new process with the persisted uid and status starts over at
    /// sequence number 0 and sends its whole state first.
    fn restart(&mut self, now: u64, out: &mut Output) {
        if self.connected {
            out.send = Some(self.goodbye(now));
        }
        self.restarts += 1;
        self.connected = false;
        self.next_seq = 0;
        self.heartbeat = self.profile.heartbeat;
        self.cancel_window(out);
        out.disarm(Timer::Heartbeat);
        self.pending = Report::full();
        // The new process bootstraps (one run of the collector) before it
        // connects, then starts the collector for real.
        let gap = self.profile.startup_time;
        if self.collector.proc != Proc::Stopped {
            self.start_collector(now, out, gap + self.profile.startup_time);
        }
        if let Some(every) = self.restart_every {
            let next = self.jitter(every);
            out.arm(Timer::Restart, gap + next);
        }
        out.reconnect = Some(gap);
    }

    /// The last message of a process: health false as the supervisor stops,
    /// and `agent_disconnect`.
    fn goodbye(&mut self, now: u64) -> AgentToServer {
        let mut msg = self.message(
            &Report {
                disconnect: true,
                ..Report::default()
            },
            now,
        );
        msg.health = Some(ComponentHealth {
            healthy: false,
            last_error: SHUTDOWN_ERROR.to_string(),
            status_time_unix_nano: now,
            ..ComponentHealth::default()
        });
        msg
    }

    fn set_status(&mut self, hash: Bytes, status: RemoteConfigStatuses, error: String) {
        self.status = RemoteConfigStatus {
            last_remote_config_hash: hash,
            status: status as i32,
            error_message: error,
        };
    }

    fn crash_message(&self) -> String {
        format!(
            "Agent process PID={} exited unexpectedly, exit code=1. Will restart in a bit...",
            self.collector.pid
        )
    }

    fn health(&self, now: u64) -> ComponentHealth {
        let c = &self.collector;
        match &c.proc {
            Proc::Starting => ComponentHealth {
                healthy: false,
                start_time_unix_nano: c.started_unix_nano,
                status: "StatusStarting".to_string(),
                status_time_unix_nano: now,
                ..ComponentHealth::default()
            },
            Proc::Healthy | Proc::Stopped => ComponentHealth {
                healthy: true,
                start_time_unix_nano: c.started_unix_nano,
                status: "StatusOK".to_string(),
                status_time_unix_nano: now,
                ..ComponentHealth::default()
            },
            Proc::Unhealthy(error) => ComponentHealth {
                healthy: false,
                start_time_unix_nano: c.started_unix_nano,
                status: "StatusRecoverableError".to_string(),
                status_time_unix_nano: now,
                last_error: error.clone(),
                ..ComponentHealth::default()
            },
            Proc::Crashed => ComponentHealth {
                healthy: false,
                last_error: self.crash_message(),
                ..ComponentHealth::default()
            },
        }
    }

    fn message(&mut self, report: &Report, now: u64) -> AgentToServer {
        let mut msg = AgentToServer {
            instance_uid: Bytes::copy_from_slice(&self.uid),
            sequence_num: self.next_seq,
            capabilities: self.capabilities(),
            ..AgentToServer::default()
        };
        self.next_seq += 1;
        if report.full || report.description {
            msg.agent_description = Some(self.description());
        }
        if report.full || report.health {
            msg.health = Some(self.health(now));
        }
        if report.full || report.effective {
            msg.effective_config = Some(EffectiveConfig {
                config_map: Some((*self.effective).clone()),
            });
        }
        if report.full {
            // Without ReportsRemoteConfig the status stays the UNSET one
            // opamp-go starts with.
            msg.remote_config_status = Some(if self.reports_remote_config {
                self.status.clone()
            } else {
                RemoteConfigStatus {
                    status: RemoteConfigStatuses::Unset as i32,
                    ..RemoteConfigStatus::default()
                }
            });
        } else if report.remote_status && self.reports_remote_config {
            msg.remote_config_status = Some(self.status.clone());
        }
        if report.disconnect {
            msg.agent_disconnect = Some(AgentDisconnect {});
        }
        msg
    }

    fn description(&self) -> AgentDescription {
        let index = self.index.to_string();
        let attr = |k: &str, v: &str| KeyValue {
            key: k.to_string(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.replace("{index}", &index))),
            }),
        };
        let mut identifying: Vec<KeyValue> = self.profile.identifying.iter().map(|(k, v)| attr(k, v)).collect();
        let uid = uuid::Uuid::from_bytes(self.uid).to_string();
        identifying.push(attr("service.instance.id", &uid));
        AgentDescription {
            identifying_attributes: identifying,
            non_identifying_attributes: self.profile.non_identifying.iter().map(|(k, v)| attr(k, v)).collect(),
        }
    }

    /// `every` scaled by a factor drawn from [0.5, 1.5), so a fleet's restarts spread out.
    fn jitter(&mut self, every: Duration) -> Duration {
        // xorshift64: plenty for jitter, and no dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        every.mul_f64(0.5 + frac)
    }
}

/// A collector's process id: distinct per agent, so two agents' messages differ.
fn first_pid(index: usize) -> u32 {
    1000u32.wrapping_add((index as u32).wrapping_mul(1000))
}

fn seed(uid: &[u8; 16]) -> u64 {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&uid[..8]);
    hi.copy_from_slice(&uid[8..]);
    (u64::from_le_bytes(lo) ^ u64::from_le_bytes(hi).rotate_left(17)) | 1
}

/// Which parts the next message carries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Report {
    full: bool,
    description: bool,
    remote_status: bool,
    effective: bool,
    health: bool,
    heartbeat: bool,
    disconnect: bool,
    /// Send even if nothing else is set (a new WebSocket's first message).
    always: bool,
}

impl Report {
    fn full() -> Self {
        Report {
            full: true,
            ..Report::default()
        }
    }

    fn is_empty(&self) -> bool {
        *self == Report::default()
    }

    /// Adds what `other` carries.
    fn merge(&mut self, other: &Report) {
        self.full |= other.full;
        self.description |= other.description;
        self.remote_status |= other.remote_status;
        self.effective |= other.effective;
        self.health |= other.health;
        self.heartbeat |= other.heartbeat;
        self.disconnect |= other.disconnect;
        self.always |= other.always;
    }
}

impl Report {
    /// What survives going offline: state, not heartbeats or goodbyes.
    fn state_only(self) -> Report {
        Report {
            heartbeat: false,
            disconnect: false,
            always: false,
            ..self
        }
    }
}

/// What the collector does with a config.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Healthy,
    /// Runs, but never turns healthy.
    Unhealthy(String),
    /// Exits at start.
    Exits(String),
}

fn outcome(config: &AgentConfigMap, profile: &Profile) -> Outcome {
    let mut files: Vec<_> = config.config_map.iter().collect();
    files.sort_by(|a, b| a.0.cmp(b.0));
    for (name, file) in &files {
        if let Some(text) = profile.fail_if_contains.as_deref().filter(|t| !t.is_empty())
            && contains(&file.body, text.as_bytes())
        {
            return Outcome::Exits(format!("config file {name:?} contains {text:?}: refusing to start"));
        }
    }
    for (name, file) in &files {
        if let Some(text) = profile.unhealthy_if_contains.as_deref().filter(|t| !t.is_empty())
            && contains(&file.body, text.as_bytes())
        {
            return Outcome::Unhealthy(format!("config file {name:?} contains {text:?}: a component fails"));
        }
    }
    Outcome::Healthy
}

/// Whether the supervisor can merge a received config: like the supervisor,
/// every file, whatever its name or content type, must parse as YAML whose
/// top level is a mapping (an empty file adds nothing). Files are merged in
/// name order with `""` last, and the first error is reported in the
/// supervisor's wording. It never includes the file's body.
pub fn compose(config: &AgentConfigMap) -> Result<(), String> {
    let mut files: Vec<_> = config.config_map.iter().collect();
    files.sort_by_key(|(name, _)| (name.is_empty(), name.as_str()));
    for (name, file) in files {
        let body = &file.body;
        match serde_yaml_ng::from_slice::<serde_yaml_ng::Value>(body) {
            Ok(serde_yaml_ng::Value::Mapping(_) | serde_yaml_ng::Value::Null) => {}
            Ok(_) => {
                return Err(format!(
                    "cannot parse config named {name}: the top level is not a mapping"
                ));
            }
            Err(e) => return Err(format!("cannot parse config named {name}: {e}")),
        }
    }
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        AgentConfigFile, AgentIdentification, ConnectionSettingsOffers, OpAmpConnectionSettings, ServerErrorResponse,
    };

    const NOW: u64 = 1_700_000_000_000_000_000;
    const UID: [u8; 16] = [7; 16];
    const STARTUP: Duration = Duration::from_millis(100);
    const APPLY: Duration = Duration::from_millis(200);
    const TIMEOUT: Duration = Duration::from_secs(5);
    const CRASH_RESTART: Duration = Duration::from_secs(1);

    fn profile() -> Profile {
        Profile {
            identifying: BTreeMap::from([
                ("service.name".into(), "otelcol-sim".into()),
                ("service.version".into(), "1.2.3".into()),
            ]),
            non_identifying: BTreeMap::from([
                ("host.name".into(), "sim-{index}".into()),
                ("os.type".into(), "linux".into()),
            ]),
            fail_if_contains: Some("BOOM".into()),
            unhealthy_if_contains: Some("SICK".into()),
            apply_delay: APPLY,
            startup_time: STARTUP,
            config_apply_timeout: TIMEOUT,
            crash_restart_delay: CRASH_RESTART,
            heartbeat: Duration::from_secs(30),
            rollback: false,
        }
    }

    fn agent_with(p: Profile) -> Agent {
        Agent::new(Arc::new(p), 3, UID, NOW)
    }

    /// Started and connected, its first message sent; the collector still starting.
    fn connected() -> Agent {
        let mut a = agent_with(profile());
        a.handle(Input::Start, NOW);
        a.handle(Input::Connected, NOW);
        a
    }

    /// Connected with its collector healthy.
    fn running() -> Agent {
        let mut a = connected();
        a.handle(Input::Timer(Timer::Collector), NOW);
        a
    }

    fn files(entries: &[(&str, &str, &str)]) -> AgentConfigMap {
        AgentConfigMap {
            config_map: entries
                .iter()
                .map(|(k, ct, body)| {
                    (
                        k.to_string(),
                        AgentConfigFile {
                            body: Bytes::copy_from_slice(body.as_bytes()),
                            content_type: ct.to_string(),
                        },
                    )
                })
                .collect(),
        }
    }

    fn recv(msg: ServerToAgent) -> Input {
        Input::Received(Box::new(msg))
    }

    fn full_state_request() -> Input {
        recv(ServerToAgent {
            flags: ServerToAgentFlags::ReportFullState as u64,
            ..ServerToAgent::default()
        })
    }

    fn push(hash: u8, config: AgentConfigMap) -> Input {
        recv(ServerToAgent {
            remote_config: Some(AgentRemoteConfig {
                config: Some(config),
                config_hash: Bytes::from(vec![hash; 32]),
            }),
            ..ServerToAgent::default()
        })
    }

    fn good() -> AgentConfigMap {
        files(&[("", "text/yaml", "receivers: {otlp: {}}\n")])
    }

    fn tick(t: Timer) -> Input {
        Input::Timer(t)
    }

    fn status_of(msg: &AgentToServer) -> (RemoteConfigStatuses, u8, String) {
        let s = msg.remote_config_status.as_ref().expect("has remote_config_status");
        (
            s.status(),
            s.last_remote_config_hash.first().copied().unwrap_or(0),
            s.error_message.clone(),
        )
    }

    fn health_of(msg: &AgentToServer) -> (bool, String) {
        let h = msg.health.as_ref().expect("has health");
        (h.healthy, h.last_error.clone())
    }

    fn effective_of(msg: &AgentToServer) -> Option<AgentConfigMap> {
        msg.effective_config.clone().and_then(|e| e.config_map)
    }

    fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
        kvs.iter()
            .map(|kv| {
                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    other => panic!("unexpected value {other:?}"),
                };
                (kv.key.clone(), v)
            })
            .collect()
    }

    /// Feeds inputs in order and returns the messages sent.
    fn feed(a: &mut Agent, inputs: impl IntoIterator<Item = Input>) -> Vec<AgentToServer> {
        inputs.into_iter().filter_map(|i| a.handle(i, NOW).send).collect()
    }

    #[test]
    fn first_message_is_the_whole_state_with_an_unset_status() {
        let mut a = agent_with(profile());
        let start = a.handle(Input::Start, NOW);
        assert_eq!(start.send, None, "nothing is sent before a connection");
        assert_eq!(start.timer(Timer::Collector), Some(Some(STARTUP)));
        assert_eq!(start.timer(Timer::Restart), None, "no restarts unless asked");
        let out = a.handle(Input::Connected, NOW);
        let msg = out.send.clone().expect("sends on connect");
        assert_eq!(msg.sequence_num, 0);
        assert_eq!(&msg.instance_uid[..], &UID);
        assert_eq!(msg.capabilities, 0x3847);
        let desc = msg.agent_description.as_ref().expect("description");
        let ident = attrs(&desc.identifying_attributes);
        assert_eq!(ident["service.name"], "otelcol-sim");
        assert_eq!(ident["service.version"], "1.2.3");
        assert_eq!(ident["service.instance.id"], uuid::Uuid::from_bytes(UID).to_string());
        let non = attrs(&desc.non_identifying_attributes);
        assert_eq!((non["host.name"].as_str(), non["os.type"].as_str()), ("sim-3", "linux"));
        assert_eq!(
            health_of(&msg),
            (false, String::new()),
            "not healthy until the collector is"
        );
        assert_eq!(effective_of(&msg), Some(AgentConfigMap::default()));
        assert_eq!(
            msg.remote_config_status,
            Some(RemoteConfigStatus {
                status: RemoteConfigStatuses::Unset as i32,
                ..RemoteConfigStatus::default()
            }),
            "UNSET with an empty hash, as opamp-go starts"
        );
        assert_eq!(out.timer(Timer::Heartbeat), Some(Some(Duration::from_secs(30))));

        let up = a.handle(tick(Timer::Collector), NOW).send.expect("healthy report");
        assert_eq!(health_of(&up), (true, String::new()));
        assert_eq!(up.health.as_ref().map(|h| h.start_time_unix_nano), Some(NOW));
        assert_eq!(up.remote_config_status, None);
        assert!(a.healthy());
    }

    /// A table of remote configs: the messages each produces on the way to its verdict.
    #[test]
    fn remote_config_outcomes() {
        struct Case {
            name: &'static str,
            config: AgentConfigMap,
            /// Inputs after the push.
            then: Vec<Input>,
            status: RemoteConfigStatuses,
            error: &'static str,
            healthy: bool,
            /// The effective config at the end is the pushed one.
            runs_it: bool,
        }
        let cases = [
            Case {
                name: "apply delay first, then healthy: APPLIED with health",
                config: good(),
                then: vec![tick(Timer::Apply), tick(Timer::Collector)],
                status: RemoteConfigStatuses::Applied,
                error: "",
                healthy: true,
                runs_it: true,
            },
            Case {
                name: "healthy first, then the apply delay",
                config: good(),
                then: vec![tick(Timer::Collector), tick(Timer::Apply)],
                status: RemoteConfigStatuses::Applied,
                error: "",
                healthy: true,
                runs_it: true,
            },
            Case {
                name: "healthy only after the apply delay, still within the timeout",
                config: good(),
                then: vec![tick(Timer::Apply), tick(Timer::Heartbeat), tick(Timer::Collector)],
                status: RemoteConfigStatuses::Applied,
                error: "",
                healthy: true,
                runs_it: true,
            },
            Case {
                name: "not healthy before the timeout",
                config: good(),
                then: vec![tick(Timer::Apply), tick(Timer::ApplyTimeout)],
                status: RemoteConfigStatuses::Failed,
                error: "Config apply timeout exceeded",
                healthy: false,
                runs_it: false,
            },
            Case {
                name: "the collector exits on the fail text: FAILED at once, crash-looping",
                config: files(&[("", "text/yaml", "a: 1\n"), ("extra.yaml", "text/yaml", "x: BOOM\n")]),
                then: vec![tick(Timer::Collector)],
                status: RemoteConfigStatuses::Failed,
                error: "exited unexpectedly, exit code=1. Will restart in a bit...\nCollector log tail:\nError: config file \"extra.yaml\" contains \"BOOM\": refusing to start",
                healthy: false,
                runs_it: false,
            },
            Case {
                name: "the fail text in any file",
                config: files(&[("notes.txt", "text/plain", "# BOOM")]),
                then: vec![tick(Timer::Collector)],
                status: RemoteConfigStatuses::Failed,
                error: "contains \"BOOM\": refusing to start",
                healthy: false,
                runs_it: false,
            },
            Case {
                name: "a component that never turns healthy: FAILED at the timeout",
                config: files(&[("", "text/yaml", "exporters: {otlp: {endpoint: SICK}}\n")]),
                then: vec![tick(Timer::Collector), tick(Timer::Apply), tick(Timer::ApplyTimeout)],
                status: RemoteConfigStatuses::Failed,
                error: "Config apply timeout exceeded",
                healthy: false,
                runs_it: true,
            },
        ];
        for case in cases {
            let mut a = running();
            let out = a.handle(push(9, case.config.clone()), NOW);
            let msg = out.send.clone().expect("reports APPLYING");
            assert_eq!(
                status_of(&msg),
                (RemoteConfigStatuses::Applying, 9, String::new()),
                "{}",
                case.name
            );
            assert!(!health_of(&msg).0, "{}: the collector restarts", case.name);
            assert_eq!(out.timer(Timer::Apply), Some(Some(APPLY)), "{}", case.name);
            assert_eq!(out.timer(Timer::ApplyTimeout), Some(Some(TIMEOUT)), "{}", case.name);
            assert_eq!(out.timer(Timer::Collector), Some(Some(STARTUP)), "{}", case.name);
            assert_eq!(a.status(), Status::Applying, "{}", case.name);

            let mut sent = vec![msg];
            sent.extend(feed(&mut a, case.then));
            let verdict = sent
                .iter()
                .rev()
                .find(|m| m.remote_config_status.is_some())
                .expect("a verdict");
            let (status, hash, error) = status_of(verdict);
            assert_eq!((status, hash), (case.status, 9), "{}", case.name);
            assert!(error.contains(case.error), "{}: {error}", case.name);
            if case.error.is_empty() {
                assert!(error.is_empty(), "{}: {error}", case.name);
            }
            let last_health = sent.iter().rev().find_map(|m| m.health.as_ref()).expect("health");
            assert_eq!(last_health.healthy, case.healthy, "{}", case.name);
            assert_eq!(a.healthy(), case.healthy, "{}", case.name);
            let want = if case.runs_it {
                case.config.clone()
            } else {
                good_or_empty()
            };
            assert_eq!(a.effective_config(), &want, "{}", case.name);
            assert_eq!(
                a.handle(tick(Timer::Apply), NOW).send,
                None,
                "{}: stale timer",
                case.name
            );
            assert_eq!(
                a.handle(tick(Timer::ApplyTimeout), NOW).send,
                None,
                "{}: stale timer",
                case.name
            );
        }

        /// The effective config of `running()`: nothing pushed yet.
        fn good_or_empty() -> AgentConfigMap {
            AgentConfigMap::default()
        }
    }

    /// Configs the supervisor cannot merge are FAILED at once, without
    /// APPLYING or a collector restart; the collector keeps running.
    #[test]
    fn configs_that_do_not_merge_fail_at_once() {
        let cases = [
            (
                "invalid yaml in the main file",
                files(&[("", "", "a: [1, 2\n")]),
                "cannot parse config named : ",
            ),
            (
                "invalid yaml in a named file",
                files(&[("", "text/yaml", "a: 1"), ("x.yml", "", "a: b: c\n")]),
                "cannot parse config named x.yml: ",
            ),
            (
                "any content type is parsed as YAML",
                files(&[("x.json", "application/json", "{")]),
                "cannot parse config named x.json: ",
            ),
            (
                "a top level that is not a mapping",
                files(&[("list.yaml", "text/yaml", "- a\n- b\n")]),
                "cannot parse config named list.yaml: the top level is not a mapping",
            ),
        ];
        for (name, config, error) in cases {
            let mut a = running();
            let out = a.handle(push(4, config), NOW);
            let msg = out.send.clone().expect("FAILED");
            let (status, hash, got) = status_of(&msg);
            assert_eq!((status, hash), (RemoteConfigStatuses::Failed, 4), "{name}");
            assert!(got.starts_with(error), "{name}: {got}");
            assert_eq!(msg.health, None, "{name}: no restart");
            assert_eq!(out.timer(Timer::Collector), None, "{name}");
            assert!(a.healthy(), "{name}");
        }
        assert_eq!(
            compose(&files(&[("", "", ""), ("b", "", "x: 1")])),
            Ok(()),
            "empty adds nothing"
        );
    }

    #[test]
    fn an_empty_config_map_stops_the_collector_and_is_applied_at_once() {
        let mut a = running();
        let out = a.handle(push(5, AgentConfigMap::default()), NOW);
        let msg = out.send.clone().expect("APPLIED");
        assert_eq!(status_of(&msg), (RemoteConfigStatuses::Applied, 5, String::new()));
        assert!(health_of(&msg).0);
        assert_eq!(effective_of(&msg), Some(AgentConfigMap::default()));
        assert_eq!(out.timer(Timer::Collector), Some(None));
    }

    #[test]
    fn the_same_hash_again_changes_nothing_and_sends_nothing() {
        let mut a = running();
        a.handle(push(1, good()), NOW);
        assert_eq!(a.handle(push(1, good()), NOW), Output::default(), "while applying");
        feed(&mut a, [tick(Timer::Apply), tick(Timer::Collector)]);
        assert_eq!(a.status(), Status::Applied);
        assert_eq!(a.handle(push(1, good()), NOW), Output::default(), "once applied");
        a.handle(push(2, files(&[("", "", "{")])), NOW);
        assert_eq!(a.status(), Status::Failed);
        assert_eq!(
            a.handle(push(2, files(&[("", "", "{")])), NOW),
            Output::default(),
            "failed"
        );
        a.handle(push(3, files(&[("", "", "x: BOOM")])), NOW);
        a.handle(tick(Timer::Collector), NOW);
        assert_eq!(a.status(), Status::Failed);
        assert_eq!(
            a.handle(push(3, files(&[("", "", "x: BOOM")])), NOW),
            Output::default(),
            "crash-looping"
        );
    }

    #[test]
    fn a_newer_config_supersedes_one_being_applied() {
        let mut a = running();
        a.handle(push(1, files(&[("", "", "x: BOOM")])), NOW);
        let out = a.handle(push(2, good()), NOW);
        assert_eq!(status_of(&out.send.clone().expect("APPLYING")).1, 2);
        assert_eq!(out.timer(Timer::Apply), Some(Some(APPLY)));
        let sent = feed(&mut a, [tick(Timer::Collector), tick(Timer::Apply)]);
        assert_eq!(
            status_of(sent.last().expect("verdict")),
            (RemoteConfigStatuses::Applied, 2, String::new())
        );
        assert_eq!(a.effective_config(), &good());
    }

    #[test]
    fn a_refused_config_crash_loops_until_another_arrives() {
        let mut a = running();
        feed(&mut a, [push(1, good()), tick(Timer::Collector), tick(Timer::Apply)]);
        a.handle(push(2, files(&[("", "", "x: BOOM")])), NOW);
        let out = a.handle(tick(Timer::Collector), NOW);
        let failed = out.send.clone().expect("FAILED");
        assert_eq!(status_of(&failed).0, RemoteConfigStatuses::Failed);
        let (healthy, first_error) = health_of(&failed);
        assert!(
            !healthy && first_error.starts_with("Agent process PID="),
            "{first_error}"
        );
        assert_eq!(out.timer(Timer::Collector), Some(Some(CRASH_RESTART)));
        assert_eq!(
            a.effective_config(),
            &good(),
            "the effective config is the last one it ran"
        );
        // It starts again (quietly) and exits again, with a new process id.
        let again = a.handle(tick(Timer::Collector), NOW);
        assert_eq!(again.send, None);
        assert_eq!(again.timer(Timer::Collector), Some(Some(STARTUP)));
        let exit = a.handle(tick(Timer::Collector), NOW).send.expect("health");
        let (healthy, error) = health_of(&exit);
        assert!(!healthy && error != first_error, "{error}");
        assert_eq!(exit.remote_config_status, None, "the status stays FAILED, unsent");
        // The controller's rollback: the previous config under its own hash.
        let sent = feed(&mut a, [push(1, good()), tick(Timer::Collector), tick(Timer::Apply)]);
        assert_eq!(
            status_of(sent.last().expect("verdict")),
            (RemoteConfigStatuses::Applied, 1, String::new())
        );
        assert!(a.healthy());
    }

    #[test]
    fn rollback_goes_back_to_the_last_applied_config() {
        let mut p = profile();
        p.rollback = true;
        let mut a = agent_with(p);
        feed(&mut a, [Input::Start, Input::Connected, tick(Timer::Collector)]);
        feed(&mut a, [push(1, good()), tick(Timer::Collector), tick(Timer::Apply)]);
        a.handle(push(2, files(&[("", "", "x: BOOM")])), NOW);
        let out = a.handle(tick(Timer::Collector), NOW);
        assert_eq!(
            status_of(&out.send.clone().expect("FAILED")).0,
            RemoteConfigStatuses::Failed
        );
        assert_eq!(
            out.timer(Timer::Collector),
            Some(Some(STARTUP)),
            "restarted on the good config"
        );
        let back = a.handle(tick(Timer::Collector), NOW).send.expect("APPLIED again");
        assert_eq!(status_of(&back), (RemoteConfigStatuses::Applied, 1, String::new()));
        assert!(health_of(&back).0);
        assert_eq!(effective_of(&back), Some(good()));
        // Offered again, the failed config is tried again (its hash differs from the status's).
        let retry = a
            .handle(push(2, files(&[("", "", "x: BOOM")])), NOW)
            .send
            .expect("APPLYING");
        assert_eq!(status_of(&retry).0, RemoteConfigStatuses::Applying);
        // A first config that fails has nothing to go back to.
        let mut p = profile();
        p.rollback = true;
        let mut b = agent_with(p);
        feed(&mut b, [Input::Start, Input::Connected, tick(Timer::Collector)]);
        feed(&mut b, [push(2, files(&[("", "", "x: BOOM")])), tick(Timer::Collector)]);
        assert_eq!(b.status(), Status::Failed);
        assert_eq!(
            b.handle(tick(Timer::Collector), NOW).timer(Timer::Collector),
            Some(Some(STARTUP))
        );
    }

    #[test]
    fn reconnects_send_what_changed_not_the_whole_state() {
        let mut a = running();
        let full = a
            .handle(full_state_request(), NOW)
            .send
            .expect("full report on request");
        assert!(full.agent_description.is_some() && full.health.is_some() && full.effective_config.is_some());
        assert!(full.remote_config_status.is_some());

        // Nothing changed while offline: a new WebSocket still sends one (empty) message.
        a.handle(Input::Disconnected, NOW);
        let empty = a.handle(Input::Connected, NOW).send.expect("one message");
        assert_eq!(empty.sequence_num, full.sequence_num + 1, "sequence continues");
        assert_eq!(
            empty,
            AgentToServer {
                instance_uid: Bytes::copy_from_slice(&UID),
                sequence_num: empty.sequence_num,
                capabilities: CAPABILITIES,
                ..AgentToServer::default()
            }
        );

        // Offline, the state moves on (an apply completes) and nothing is sent.
        a.handle(push(1, good()), NOW);
        a.handle(Input::Disconnected, NOW);
        for input in [tick(Timer::Collector), tick(Timer::Apply), tick(Timer::Heartbeat)] {
            assert_eq!(a.handle(input, NOW).send, None);
        }
        assert_eq!(a.status(), Status::Applied);
        let back = a.handle(Input::Connected, NOW).send.expect("what changed");
        assert_eq!(back.agent_description, None, "no full state");
        assert_eq!(status_of(&back), (RemoteConfigStatuses::Applied, 1, String::new()));
        assert!(health_of(&back).0);
        assert_eq!(effective_of(&back), Some(good()));

        // HTTP: back online with nothing new sends nothing.
        a.handle(Input::Disconnected, NOW);
        assert_eq!(a.handle(Input::Online, NOW).send, None);
    }

    #[test]
    fn sequence_numbers_increase_by_one_per_message() {
        let mut a = agent_with(profile());
        a.handle(Input::Start, NOW);
        let seqs: Vec<u64> = feed(
            &mut a,
            [
                Input::Connected,
                tick(Timer::Collector),
                tick(Timer::Heartbeat),
                push(1, good()),
                tick(Timer::Apply),
                tick(Timer::Collector),
                tick(Timer::Heartbeat),
            ],
        )
        .iter()
        .map(|m| m.sequence_num)
        .collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_restart_starts_over_with_the_persisted_uid_and_status() {
        let mut a = agent_with(profile()).restarting_every(Duration::from_secs(60));
        let start = a.handle(Input::Start, NOW);
        let first = start.timer(Timer::Restart).flatten().expect("restart armed");
        assert!(
            first >= Duration::from_secs(30) && first < Duration::from_secs(90),
            "{first:?}"
        );
        feed(&mut a, [Input::Connected, tick(Timer::Collector)]);
        feed(&mut a, [push(1, good()), tick(Timer::Collector), tick(Timer::Apply)]);

        let out = a.handle(tick(Timer::Restart), NOW);
        let bye = out.send.clone().expect("goodbye");
        assert_eq!(bye.agent_disconnect, Some(AgentDisconnect {}));
        assert_eq!(health_of(&bye), (false, SHUTDOWN_ERROR.to_string()));
        assert_eq!(out.reconnect, Some(STARTUP));
        assert_eq!(out.timer(Timer::Collector), Some(Some(STARTUP * 2)));
        assert!(matches!(out.timer(Timer::Restart), Some(Some(_))));
        assert_eq!(a.restarts(), 1);

        let hello = a.handle(Input::Connected, NOW).send.expect("first message");
        assert_eq!(hello.sequence_num, 0);
        assert_eq!(&hello.instance_uid[..], &UID);
        assert!(hello.agent_description.is_some());
        assert_eq!(status_of(&hello), (RemoteConfigStatuses::Applied, 1, String::new()));
        assert!(!health_of(&hello).0, "health false until the collector is up");
        assert_eq!(effective_of(&hello), Some(good()));
        let up = a.handle(tick(Timer::Collector), NOW).send.expect("healthy");
        assert_eq!((up.sequence_num, health_of(&up).0), (1, true));
        assert_eq!(up.remote_config_status, None);
    }

    /// The supervisor persists the last received config and its status; a
    /// new process runs that config but starts no apply timer, so APPLYING
    /// stays until the server offers the config again.
    #[test]
    fn a_restart_during_applying_resends_applying_until_offered_again() {
        let mut a = running().restarting_every(Duration::from_secs(60));
        a.handle(push(1, good()), NOW);
        a.handle(tick(Timer::Restart), NOW);
        let hello = a.handle(Input::Connected, NOW).send.expect("first message");
        assert_eq!(status_of(&hello).0, RemoteConfigStatuses::Applying);
        for input in [tick(Timer::Apply), tick(Timer::ApplyTimeout)] {
            assert_eq!(a.handle(input, NOW).send, None, "no apply timers in the new process");
        }
        let up = a.handle(tick(Timer::Collector), NOW).send.expect("healthy");
        assert_eq!((health_of(&up).0, up.remote_config_status.clone()), (true, None));
        assert_eq!(a.status(), Status::Applying);
        assert_eq!(effective_of(&up), Some(good()), "it runs the persisted config");
        let done = a.handle(push(1, good()), NOW).send.expect("APPLIED");
        assert_eq!(status_of(&done), (RemoteConfigStatuses::Applied, 1, String::new()));
    }

    #[test]
    fn without_reports_remote_config_no_status_is_ever_sent() {
        let mut a = agent_with(profile()).without_remote_config_status();
        a.handle(Input::Start, NOW);
        let hello = a.handle(Input::Connected, NOW).send.expect("first");
        assert_eq!(hello.capabilities, CAPABILITIES & !0x1000);
        assert_eq!(status_of(&hello), (RemoteConfigStatuses::Unset, 0, String::new()));
        let sent = feed(
            &mut a,
            [
                tick(Timer::Collector),
                push(1, good()),
                tick(Timer::Apply),
                tick(Timer::Collector),
            ],
        );
        assert!(sent.iter().all(|m| m.remote_config_status.is_none()), "{sent:?}");
        assert_eq!(a.status(), Status::Applied, "it applies all the same");
        assert_eq!(effective_of(sent.last().expect("sent")), Some(good()));
        let full = a.handle(full_state_request(), NOW).send.expect("full");
        assert_eq!(status_of(&full).0, RemoteConfigStatuses::Unset);
    }

    #[test]
    fn nothing_to_say_sends_nothing() {
        let mut a = running();
        // A plain reply (capabilities only) must not be answered, or the two sides ping-pong.
        let reply = ServerToAgent {
            instance_uid: Bytes::copy_from_slice(&UID),
            capabilities: 0x7,
            ..ServerToAgent::default()
        };
        assert_eq!(a.handle(recv(reply), NOW), Output::default());
        let error = ServerToAgent {
            error_response: Some(ServerErrorResponse::default()),
            flags: ServerToAgentFlags::ReportFullState as u64,
            ..ServerToAgent::default()
        };
        assert_eq!(a.handle(recv(error), NOW), Output::default());
    }

    #[test]
    fn heartbeat_is_an_otherwise_empty_message() {
        let mut a = running();
        let out = a.handle(tick(Timer::Heartbeat), NOW);
        let msg = out.send.clone().expect("heartbeat");
        assert_eq!(
            msg,
            AgentToServer {
                instance_uid: Bytes::copy_from_slice(&UID),
                sequence_num: 2,
                capabilities: CAPABILITIES,
                ..AgentToServer::default()
            }
        );
        assert_eq!(out.timer(Timer::Heartbeat), Some(Some(Duration::from_secs(30))));
    }

    #[test]
    fn server_offered_heartbeat_interval() {
        let offer = |secs| {
            recv(ServerToAgent {
                connection_settings: Some(ConnectionSettingsOffers {
                    hash: Bytes::from_static(b"h"),
                    opamp: Some(OpAmpConnectionSettings {
                        heartbeat_interval_seconds: secs,
                        ..OpAmpConnectionSettings::default()
                    }),
                    ..ConnectionSettingsOffers::default()
                }),
                ..ServerToAgent::default()
            })
        };
        let mut a = running();
        let out = a.handle(offer(5), NOW);
        assert_eq!(out.send, None);
        assert_eq!(out.timer(Timer::Heartbeat), Some(Some(Duration::from_secs(5))));
        assert_eq!(a.heartbeat(), Duration::from_secs(5));
        assert_eq!(
            a.handle(tick(Timer::Heartbeat), NOW).timer(Timer::Heartbeat),
            Some(Some(Duration::from_secs(5)))
        );
        // Zero is ignored; the same offer again changes nothing.
        assert_eq!(a.handle(offer(0), NOW), Output::default());
        assert_eq!(a.handle(offer(5), NOW), Output::default());
    }

    #[test]
    fn zero_heartbeat_arms_no_timer() {
        let mut p = profile();
        p.heartbeat = Duration::ZERO;
        let mut a = agent_with(p);
        a.handle(Input::Start, NOW);
        let out = a.handle(Input::Connected, NOW);
        assert!(out.send.is_some());
        assert_eq!(out.timer(Timer::Heartbeat), None);
    }

    #[test]
    fn a_new_instance_uid_is_adopted_and_the_description_sent_again() {
        let mut a = running();
        let new = [9u8; 16];
        let assign = |uid: &[u8]| {
            recv(ServerToAgent {
                agent_identification: Some(AgentIdentification {
                    new_instance_uid: Bytes::copy_from_slice(uid),
                }),
                ..ServerToAgent::default()
            })
        };
        let msg = a.handle(assign(&new), NOW).send.expect("description under the new uid");
        assert_eq!(&msg.instance_uid[..], &new);
        let ident = attrs(&msg.agent_description.expect("description").identifying_attributes);
        assert_eq!(ident["service.instance.id"], uuid::Uuid::from_bytes(new).to_string());
        assert_eq!(
            (msg.health, msg.remote_config_status),
            (None, None),
            "not the whole state"
        );
        assert_eq!(a.uid(), new);
        // A uid of the wrong length, or the same uid, is ignored.
        assert_eq!(a.handle(assign(b"short"), NOW), Output::default());
        assert_eq!(a.handle(assign(&new), NOW), Output::default());
    }

    #[test]
    fn shutdown_sends_agent_disconnect_once() {
        let mut a = running();
        let out = a.handle(Input::Shutdown, NOW);
        let msg = out.send.clone().expect("disconnect");
        assert_eq!(msg.agent_disconnect, Some(AgentDisconnect {}));
        assert_eq!(health_of(&msg), (false, SHUTDOWN_ERROR.to_string()));
        assert_eq!(out.timer(Timer::Heartbeat), Some(None));
        assert_eq!(a.handle(Input::Shutdown, NOW).send, None);
        let mut offline = agent_with(profile());
        assert_eq!(offline.handle(Input::Shutdown, NOW).send, None);
    }

    #[test]
    fn index_placeholder_in_attributes() {
        let mut p = profile();
        p.identifying.insert("service.name".into(), "edge-{index}".into());
        let mut a = Agent::new(Arc::new(p), 42, UID, NOW);
        a.handle(Input::Start, NOW);
        let msg = a.handle(Input::Connected, NOW).send.expect("full");
        let desc = msg.agent_description.expect("description");
        assert_eq!(attrs(&desc.identifying_attributes)["service.name"], "edge-42");
        assert_eq!(attrs(&desc.non_identifying_attributes)["host.name"], "sim-42");
    }

    #[test]
    fn restart_intervals_spread_around_the_period() {
        let mut a = agent_with(profile()).restarting_every(Duration::from_secs(10));
        let draws: Vec<Duration> = (0..200).map(|_| a.jitter(Duration::from_secs(10))).collect();
        assert!(
            draws
                .iter()
                .all(|d| *d >= Duration::from_secs(5) && *d < Duration::from_secs(15))
        );
        assert!(
            draws.iter().any(|d| *d < Duration::from_secs(8)) && draws.iter().any(|d| *d > Duration::from_secs(12))
        );
    }
}
