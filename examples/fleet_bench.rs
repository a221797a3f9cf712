//! Fleet benchmark: runs `opamp-gitops serve` on a fresh git repository and
//! `opamp-gitops simulate` in a separate process, both on 127.0.0.1, and
//! measures per scenario (transport, number of agents):
//!
//! - connect: seconds until the server counts every agent connected, and the
//!   CPU the server and the simulator spent on it;
//! - rollout: from a new commit and `POST /api/v1/sync` until the controller
//!   counts every agent APPLIED on the new config (one wave of 100%, bake 0s,
//!   agents apply at once), then checked agent by agent in `/api/v1/agents`;
//! - memory: the server's resident set (VmRSS) with the agents connected and
//!   idle, and the growth per agent over the server without agents;
//! - CPU: the server's user+system time over a window of idle heartbeats
//!   (WebSocket) or polls (HTTP), per second and per thousand messages
//!   received, and the simulator's for comparison;
//! - messages: what the simulated agents sent and received over the run, per
//!   agent;
//! - errors: the simulator's failed requests and error replies, and the
//!   server's undecodable messages.
//!
//! With `--naive PATH` every scenario runs twice, against the controller and
//! against the plain opamp-go server of `bench/naive` (same simulator
//! settings, the two taking turns at going first), and the figures are
//! printed side by side with their ratio, ours / naive.
//!
//! `bench/run.sh` builds the binaries and runs this; see BENCHMARKS.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use opamp_gitops::app::FD_RESERVE;
use opamp_gitops::desired::{ConfigBundle, ConfigFile};
use sha2::{Digest, Sha256};

mod common;

use common::Error;
type Result<T, E = Error> = std::result::Result<T, E>;

/// The scenarios of a run of the controller alone, and of a side-by-side run.
const SCENARIOS_ALONE: &str = "ws:1000,ws:10000,http:1000,http:5000";
const SCENARIOS_SIDE_BY_SIDE: &str = "ws:1000,ws:10000,ws:19000,http:5000";
/// WebSocket heartbeats alone, and side by side: more often, so that idle CPU
/// has messages to count.
const WS_HEARTBEAT_ALONE: Duration = Duration::from_secs(30);
const WS_HEARTBEAT_SIDE_BY_SIDE: Duration = Duration::from_secs(10);

/// The base RSS is read this long after the server answers, once its start-up
/// allocations are done.
const BASE_AFTER: Duration = Duration::from_secs(1);
/// Idle starts this long after every agent applied the second config: the
/// last replies and acknowledgements of the rollout are over by then.
const IDLE_AFTER: Duration = Duration::from_secs(5);
/// How long a server may take to answer after it starts, or to stop.
const SERVER_GRACE: Duration = Duration::from_secs(20);
/// How long the simulator may take to stop: every agent says goodbye first.
const SIMULATOR_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, Parser)]
#[command(about = "Benchmark opamp-gitops serve with simulated fleets, alone or beside a plain opamp-go server")]
struct Args {
    /// Scenarios, TRANSPORT:AGENTS separated by commas [default:
    /// ws:1000,ws:10000,http:1000,http:5000; with --naive:
    /// ws:1000,ws:10000,ws:19000,http:5000].
    #[arg(long, value_delimiter = ',')]
    scenarios: Option<Vec<Scenario>>,
    /// The opamp-gitops binary (default: next to this example's directory).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// The naive opamp-go server built from bench/naive: run every scenario
    /// against it too, and print the figures side by side.
    #[arg(long)]
    naive: Option<PathBuf>,
    /// How long the steady CPU is measured.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// WebSocket heartbeat interval of the simulated agents [default: 30s; with --naive: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    ws_heartbeat: Option<Duration>,
    /// HTTP polling interval of the simulated agents.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    http_poll: Duration,
    /// Run serve under this command, e.g. "valgrind --tool=massif" or
    /// "perf record -g -o serve.perf --" (split at spaces).
    #[arg(long)]
    wrap: Option<String>,
    /// Give up on any one wait (connect, rollout) after this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

impl Args {
    fn scenarios(&self) -> Vec<Scenario> {
        if let Some(s) = &self.scenarios {
            return s.clone();
        }
        let default = if self.naive.is_some() {
            SCENARIOS_SIDE_BY_SIDE
        } else {
            SCENARIOS_ALONE
        };
        default
            .split(',')
            .map(|s| s.parse().expect("a valid default"))
            .collect()
    }

    fn ws_heartbeat(&self) -> Duration {
        match (self.ws_heartbeat, &self.naive) {
            (Some(d), _) => d,
            (None, Some(_)) => WS_HEARTBEAT_SIDE_BY_SIDE,
            (None, None) => WS_HEARTBEAT_ALONE,
        }
    }

    fn heartbeat(&self, s: Scenario) -> Duration {
        if s.http { self.http_poll } else { self.ws_heartbeat() }
    }
}

#[derive(Debug, Clone, Copy)]
struct Scenario {
    http: bool,
    agents: usize,
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (t, n) = s
            .split_once(':')
            .ok_or_else(|| format!("expected ws:N or http:N, got {s:?}"))?;
        let http = match t {
            "ws" => false,
            "http" => true,
            _ => return Err(format!("transport must be ws or http, got {t:?}")),
        };
        let agents = n.parse().map_err(|_| format!("not a number of agents: {n:?}"))?;
        Ok(Scenario { http, agents })
    }
}

impl Scenario {
    fn transport(self) -> &'static str {
        if self.http { "http" } else { "ws" }
    }
    fn metric_transport(self) -> &'static str {
        if self.http { "http" } else { "websocket" }
    }
    fn label(self) -> String {
        format!("{} {}", self.transport(), self.agents)
    }
}

/// What one scenario measured of one server.
#[derive(Debug, Default)]
struct Figures {
    connect: Option<Duration>,
    /// The server's and the simulator's CPU seconds over the connect.
    connect_cpu_s: Option<(f64, f64)>,
    /// First config reaching every agent after they connected (needs the reconcile driver).
    first_config: Option<Duration>,
    rollout: Option<Duration>,
    rollout_verified: Option<usize>,
    /// The server's and the simulator's CPU seconds over the rollout.
    rollout_cpu_s: Option<(f64, f64)>,
    rss_base_kib: u64,
    rss_idle_kib: u64,
    rss_peak_kib: u64,
    /// The length of the idle window, and the server's and the simulator's
    /// CPU seconds and the messages the server received over it.
    window_s: f64,
    server_cpu_s: f64,
    sim_cpu_s: f64,
    window_messages: f64,
    sim_errors: u64,
    sim_connect_errors: u64,
    /// Messages the simulated agents sent and received over the whole run.
    sim_messages: Option<(u64, u64)>,
    server_decode_errors: u64,
    notes: Vec<String>,
}

impl Figures {
    /// Resident growth per agent with a config applied, in KiB.
    fn kib_per_agent(&self, agents: usize) -> Option<f64> {
        (self.rss_idle_kib > 0).then(|| self.rss_idle_kib.saturating_sub(self.rss_base_kib) as f64 / agents as f64)
    }

    /// The server's CPU over the idle window, as a share of one core.
    fn server_cpu(&self) -> Option<f64> {
        (self.window_s > 0.0).then(|| self.server_cpu_s / self.window_s)
    }

    fn sim_cpu(&self) -> Option<f64> {
        (self.window_s > 0.0).then(|| self.sim_cpu_s / self.window_s)
    }

    /// The server's CPU milliseconds per thousand messages received in the window.
    fn cpu_ms_per_thousand(&self) -> Option<f64> {
        (self.window_messages > 0.0).then(|| self.server_cpu_s / self.window_messages * 1e6)
    }

    fn messages_per_s(&self) -> Option<f64> {
        (self.window_s > 0.0).then(|| self.window_messages / self.window_s)
    }

    fn errors(&self) -> u64 {
        self.sim_errors + self.sim_connect_errors + self.server_decode_errors
    }
}

/// One scenario run against one server.
struct Run {
    /// The scenario's place in the list (a scenario may be listed twice).
    index: usize,
    scenario: Scenario,
    server: &'static str,
    figures: Figures,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => common::sibling_binary()?,
    };
    let features = ServeFeatures::of(&bin)?;
    println!("{}", machine());
    println!("binary: {}", bin.display());
    if !features.driver {
        println!("serve has no reconcile driver (no --startup-grace): rollout not measured");
    }
    let mut contenders = vec![Contender::Ours(features)];
    if let Some(naive) = &args.naive {
        println!("naive server: {}", naive.display());
        contenders.push(Contender::Naive(naive.clone()));
    }
    let scenarios = args.scenarios();
    let mut runs = Vec::new();
    for (i, &s) in scenarios.iter().enumerate() {
        // The servers take turns at going first, so that neither always runs
        // on a machine just warmed (or still busy) with the other's run.
        let mut order: Vec<&Contender> = contenders.iter().collect();
        if i % 2 == 1 {
            order.reverse();
        }
        for who in order {
            eprintln!("== {} agents over {} against {}", s.agents, s.transport(), who.name());
            let mut figures = Figures::default();
            if let Err(e) = run_scenario(&args, &bin, who, s, &mut figures) {
                figures.notes.push(format!("failed: {e}"));
            }
            eprintln!("{figures:?}");
            runs.push(Run {
                index: i,
                scenario: s,
                server: who.name(),
                figures,
            });
        }
    }
    println!("{}", details(&args, &runs));
    if args.naive.is_some() {
        println!("{}", side_by_side(&scenarios, &runs));
    }
    Ok(())
}

fn run_scenario(args: &Args, bin: &Path, who: &Contender, s: Scenario, f: &mut Figures) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = who.start(args, dir.path(), s)?;
    std::thread::sleep(BASE_AFTER);
    f.rss_base_kib = server.process().status_kib("VmRSS")?;

    let sim_log = dir.path().join("simulate.log");
    let (started, c0) = (Instant::now(), server.process().cpu()?);
    let mut sim = spawn_simulator(args, bin, server.opamp(), s, &sim_log)?;
    wait_for(args.timeout, "every agent to connect", || {
        Ok(server.connected(s)? >= s.agents)
    })?;
    f.connect = Some(started.elapsed());
    f.connect_cpu_s = Some((server.process().cpu()? - c0, sim.cpu()?));

    if server.pushes() {
        wait_for(args.timeout, "the first config to reach every agent", || {
            server.all_applied(1, s.agents)
        })?;
        f.first_config = Some(started.elapsed());

        server.prepare(2)?;
        let (c0, s0, t0) = (server.process().cpu()?, sim.cpu()?, Instant::now());
        server.publish(2)?;
        wait_for(args.timeout, "the new config to reach every agent", || {
            server.all_applied(2, s.agents)
        })?;
        f.rollout = Some(t0.elapsed());
        f.rollout_cpu_s = Some((server.process().cpu()? - c0, sim.cpu()? - s0));
        f.rollout_verified = Some(server.verified(2)?);
    }

    measure_idle(args, server.as_ref(), &sim, s, f)?;
    f.server_decode_errors = server.decode_errors()?;
    sim.stop(SIMULATOR_GRACE)?;
    read_simulator_summary(&sim_log, f)?;
    server.process_mut().stop(SERVER_GRACE)
}

fn spawn_simulator(args: &Args, bin: &Path, opamp: SocketAddr, s: Scenario, log: &Path) -> Result<Proc> {
    let mut sim = Command::new(bin);
    sim.arg("simulate")
        .args(["--server", &opamp.to_string(), "--transport", s.transport()])
        .args(["--agents", &s.agents.to_string(), "--apply-delay", "0s"])
        .arg("--heartbeat")
        .arg(humantime::format_duration(args.heartbeat(s)).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?);
    Proc::spawn(sim, "simulate")
}

/// RSS once the rollout has settled, and CPU and messages over the window.
fn measure_idle(args: &Args, server: &dyn Server, sim: &Proc, s: Scenario, f: &mut Figures) -> Result<()> {
    std::thread::sleep(IDLE_AFTER);
    f.rss_idle_kib = server.process().status_kib("VmRSS")?;
    let m0 = server.messages()?;
    let (c0, s0, t0) = (server.process().cpu()?, sim.cpu()?, Instant::now());
    std::thread::sleep(args.window);
    let (c1, s1, elapsed) = (server.process().cpu()?, sim.cpu()?, t0.elapsed());
    let m1 = server.messages()?;
    f.window_s = elapsed.as_secs_f64();
    f.server_cpu_s = c1 - c0;
    f.sim_cpu_s = s1 - s0;
    f.window_messages = m1 - m0;
    f.rss_idle_kib = f.rss_idle_kib.max(server.process().status_kib("VmRSS")?);
    f.rss_peak_kib = server.process().status_kib("VmHWM")?;
    let connected = server.connected(s)?;
    if connected < s.agents {
        f.notes
            .push(format!("only {connected} connected at the end of the window"));
    }
    Ok(())
}

/// The error and message counts of the simulator's summary line, which it prints as it stops.
fn read_simulator_summary(log: &Path, f: &mut Figures) -> Result<()> {
    let log = std::fs::read_to_string(log)?;
    let summary = log
        .lines()
        .rev()
        .find(|l| l.contains(" agents ran "))
        .unwrap_or_default();
    f.sim_errors = count_before(summary, "errors").unwrap_or(0);
    f.sim_connect_errors = count_before(summary, "connect errors").unwrap_or(0);
    f.sim_messages = count_before(summary, "sent").zip(count_before(summary, "received"));
    if summary.is_empty() {
        f.notes.push("simulate printed no summary".into());
    }
    Ok(())
}

// ---------- the servers ----------

/// What the benchmark learns from `serve --help`.
#[derive(Debug, Clone)]
struct ServeFeatures {
    bin: PathBuf,
    /// The reconcile driver (it brings --startup-grace); without it nothing is pushed.
    driver: bool,
    /// --max-connections and --max-connections-per-source.
    connection_limits: bool,
}

impl ServeFeatures {
    fn of(bin: &Path) -> Result<Self> {
        let help = Command::new(bin).args(["serve", "--help"]).output()?;
        let help = String::from_utf8_lossy(&help.stdout);
        Ok(ServeFeatures {
            bin: bin.to_path_buf(),
            driver: help.contains("--startup-grace"),
            connection_limits: help.contains("--max-connections-per-source"),
        })
    }
}

/// A server a scenario runs against.
#[derive(Debug, Clone)]
enum Contender {
    /// `opamp-gitops serve`.
    Ours(ServeFeatures),
    /// The plain opamp-go server of bench/naive, at this path.
    Naive(PathBuf),
}

impl Contender {
    fn name(&self) -> &'static str {
        match self {
            Contender::Ours(_) => "ours",
            Contender::Naive(_) => "naive",
        }
    }

    /// Starts the server, its files in `dir`, with config version 1 in force,
    /// and waits until it answers.
    fn start(&self, args: &Args, dir: &Path, s: Scenario) -> Result<Box<dyn Server>> {
        Ok(match self {
            Contender::Ours(features) => Box::new(Controller::start(args, features, dir, s)?),
            Contender::Naive(bin) => Box::new(Naive::start(bin, dir)?),
        })
    }
}

/// A running server under test, seen through its API.
trait Server {
    fn process(&self) -> &Proc;
    fn process_mut(&mut self) -> &mut Proc;
    /// Where agents connect.
    fn opamp(&self) -> SocketAddr;
    /// Agents connected over the scenario's transport.
    fn connected(&self, s: Scenario) -> Result<usize>;
    /// Messages received from agents so far.
    fn messages(&self) -> Result<f64>;
    /// Messages from agents the server could not decode.
    fn decode_errors(&self) -> Result<u64>;
    /// Whether the server sends configs at all (a controller without the reconcile driver does not).
    fn pushes(&self) -> bool {
        true
    }
    /// What precedes the timed rollout of config `version`: the commit a person would push.
    fn prepare(&mut self, _version: u32) -> Result<()> {
        Ok(())
    }
    /// Tells the server that config `version` is the one in force; the rollout's clock is running.
    fn publish(&mut self, version: u32) -> Result<()>;
    /// Whether the server counts `agents` agents APPLIED on config `version`.
    fn all_applied(&self, version: u32, agents: usize) -> Result<bool>;
    /// Agents APPLIED on config `version`, counted one by one where the server can.
    fn verified(&self, version: u32) -> Result<usize>;
}

/// `opamp-gitops serve` on a git repository of its own.
struct Controller {
    proc: Proc,
    api: SocketAddr,
    opamp: SocketAddr,
    repo: ConfigRepo,
    driver: bool,
}

impl Controller {
    fn start(args: &Args, features: &ServeFeatures, dir: &Path, s: Scenario) -> Result<Self> {
        let repo_dir = dir.join("repo");
        let repo = ConfigRepo::create(&repo_dir)?;
        let (api, opamp) = (free_port()?, free_port()?);
        let wrap: Vec<&str> = args.wrap.as_deref().unwrap_or("").split_whitespace().collect();
        let mut serve = match wrap.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&features.bin);
                c
            }
            None => Command::new(&features.bin),
        };
        serve
            .arg("serve")
            .arg("--repo")
            .arg(&repo_dir)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--opamp-listen", &opamp.to_string(), "--api-listen", &api.to_string()]);
        if features.driver {
            serve.args(["--startup-grace", "0s"]);
        }
        if features.connection_limits {
            // Every simulated agent connects from 127.0.0.1, so no cap per
            // address; and room for the whole fleet.
            serve.args(["--max-connections-per-source", "0", "--max-connections"]);
            serve.arg(max_connections(s.agents).to_string());
        }
        serve
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("serve.log"))?);
        let proc = Proc::spawn(serve, "serve")?;
        wait_for(SERVER_GRACE, "the controller to answer /healthz", || {
            Ok(http(api, "GET", "/healthz").is_ok_and(|(status, _)| status == 200))
        })?;
        if features.driver {
            wait_for(SERVER_GRACE, "the controller to load the commit", || {
                Ok(http(api, "GET", "/readyz").is_ok_and(|(status, _)| status == 200))
            })?;
        }
        Ok(Controller {
            proc,
            api,
            opamp,
            repo,
            driver: features.driver,
        })
    }
}

/// `--max-connections` for a fleet: the controller's default (the open-file
/// limit less FD_RESERVE), or the fleet's size if that is more. At a limit of
/// 20,000 the default is 18,976, a few short of 19,000 agents.
fn max_connections(agents: usize) -> usize {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    let default = usize::try_from(hard).unwrap_or(usize::MAX).saturating_sub(FD_RESERVE);
    default.max(agents)
}

impl Server for Controller {
    fn process(&self) -> &Proc {
        &self.proc
    }

    fn process_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    fn opamp(&self) -> SocketAddr {
        self.opamp
    }

    fn connected(&self, s: Scenario) -> Result<usize> {
        let sample = format!(
            "opamp_gitops_agents_connected{{transport=\"{}\"}}",
            s.metric_transport()
        );
        Ok(metric(self.api, &sample)? as usize)
    }

    fn messages(&self) -> Result<f64> {
        metric_sum(self.api, "opamp_gitops_opamp_messages_received_total")
    }

    fn decode_errors(&self) -> Result<u64> {
        Ok(metric_sum(self.api, "opamp_gitops_opamp_decode_errors_total")? as u64)
    }

    fn pushes(&self) -> bool {
        self.driver
    }

    fn prepare(&mut self, version: u32) -> Result<()> {
        self.repo.commit_version(version)
    }

    fn publish(&mut self, _version: u32) -> Result<()> {
        let (status, body) = http(self.api, "POST", "/api/v1/sync")?;
        if status != 200 {
            return Err(format!("POST /api/v1/sync answered {status}: {body}").into());
        }
        Ok(())
    }

    fn all_applied(&self, version: u32, agents: usize) -> Result<bool> {
        all_applied(self.api, &self.repo.config_hash(version), agents)
    }

    fn verified(&self, version: u32) -> Result<usize> {
        applied_agents(self.api, &self.repo.config_hash(version))
    }
}

/// The naive opamp-go server (bench/naive): POST /trigger, GET /stats.
struct Naive {
    proc: Proc,
    api: SocketAddr,
    opamp: SocketAddr,
}

/// What the naive server's GET /stats answers.
#[derive(Debug, serde::Deserialize)]
struct NaiveStats {
    connected_ws: usize,
    connected_http: usize,
    /// Agents APPLIED on `config_hash`, the config in force.
    applied: usize,
    config_hash: String,
    messages: f64,
    errors: u64,
}

impl Naive {
    fn start(bin: &Path, dir: &Path) -> Result<Self> {
        let (api, opamp) = (free_port()?, free_port()?);
        let mut cmd = Command::new(bin);
        cmd.args(["--opamp-listen", &opamp.to_string(), "--api-listen", &api.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("naive.log"))?);
        let mut naive = Naive {
            proc: Proc::spawn(cmd, "naive")?,
            api,
            opamp,
        };
        wait_for(SERVER_GRACE, "the naive server to answer /stats", || {
            Ok(naive.stats().is_ok())
        })?;
        // In force before any agent connects, as the controller's first commit is.
        naive.publish(1)?;
        Ok(naive)
    }

    fn stats(&self) -> Result<NaiveStats> {
        let (status, body) = http(self.api, "GET", "/stats")?;
        if status != 200 {
            return Err(format!("GET /stats answered {status}: {body}").into());
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Agents APPLIED on config `version`: none unless it is the one in force.
    fn applied(&self, version: u32) -> Result<usize> {
        let stats = self.stats()?;
        Ok(if stats.config_hash == naive_hash(version) {
            stats.applied
        } else {
            0
        })
    }
}

/// The hash the naive server gives config `version`: the file's SHA-256, in hex.
fn naive_hash(version: u32) -> String {
    hex::encode(Sha256::digest(collector_yaml(version)))
}

impl Server for Naive {
    fn process(&self) -> &Proc {
        &self.proc
    }

    fn process_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    fn opamp(&self) -> SocketAddr {
        self.opamp
    }

    fn connected(&self, s: Scenario) -> Result<usize> {
        let stats = self.stats()?;
        Ok(if s.http {
            stats.connected_http
        } else {
            stats.connected_ws
        })
    }

    fn messages(&self) -> Result<f64> {
        Ok(self.stats()?.messages)
    }

    fn decode_errors(&self) -> Result<u64> {
        Ok(self.stats()?.errors)
    }

    fn publish(&mut self, version: u32) -> Result<()> {
        let (status, body) = request(self.api, "POST", "/trigger", &collector_yaml(version))?;
        if status != 200 {
            return Err(format!("POST /trigger answered {status}: {body}").into());
        }
        Ok(())
    }

    fn all_applied(&self, version: u32, agents: usize) -> Result<bool> {
        Ok(self.applied(version)? >= agents)
    }

    fn verified(&self, version: u32) -> Result<usize> {
        self.applied(version)
    }
}

/// The controller counts `agents` agents APPLIED on `hash`: from the group
/// status once it has one, else from the agent list.
fn all_applied(api: SocketAddr, hash: &str, agents: usize) -> Result<bool> {
    let (status, body) = http(api, "GET", "/api/v1/groups")?;
    if status == 200 {
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let group = v["groups"]
            .as_array()
            .and_then(|gs| gs.iter().find(|g| g["name"] == "sim"))
            .ok_or("no group sim in /api/v1/groups")?;
        if group["config_hash"] != hash {
            return Ok(false);
        }
        return Ok(group["agents"]["applied"].as_u64() >= Some(agents as u64));
    }
    Ok(applied_agents(api, hash)? >= agents)
}

/// Agents in `/api/v1/agents` that report APPLIED for `hash`.
fn applied_agents(api: SocketAddr, hash: &str) -> Result<usize> {
    let (status, body) = http(api, "GET", "/api/v1/agents")?;
    if status != 200 {
        return Err(format!("GET /api/v1/agents answered {status}").into());
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let agents = v["agents"].as_array().ok_or("no agents array")?;
    Ok(agents
        .iter()
        .filter(|a| {
            let rcs = &a["remote_config_status"];
            rcs["status"] == "APPLIED" && rcs["last_remote_config_hash"] == hash
        })
        .count())
}

/// The number in front of `label` in the simulator's summary, whose counts are
/// separated by commas and semicolons ("..., 3 connect errors, ..., 0 errors").
fn count_before(summary: &str, label: &str) -> Option<u64> {
    summary
        .split([',', ';'])
        .filter_map(|part| part.trim().split_once(' '))
        .find(|(_, l)| *l == label)
        .and_then(|(n, _)| n.parse().ok())
}

// ---------- the config repository ----------

const COLLECTOR: &str = "receivers:
  otlp:
    protocols:
      grpc:
        endpoint: localhost:4317
processors:
  batch: {}
exporters:
  otlp/gateway:
    endpoint: gateway-VERSION.example:4317
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [otlp/gateway]
";

/// The collector config of `version`.
fn collector_yaml(version: u32) -> String {
    COLLECTOR.replace("VERSION", &format!("v{version}"))
}

/// A git repository with a fleet.yaml (one wave of 100%, bake 0s), one group
/// selecting every simulated agent, and a collector config.
struct ConfigRepo {
    repo: git2::Repository,
}

impl ConfigRepo {
    fn create(dir: &Path) -> Result<Self> {
        let mut opts = git2::RepositoryInitOptions::new();
        opts.initial_head("main");
        let repo = git2::Repository::init_opts(dir, &opts)?;
        std::fs::create_dir_all(dir.join("groups"))?;
        std::fs::create_dir_all(dir.join("configs"))?;
        std::fs::write(
            dir.join("fleet.yaml"),
            "rollout:\n  waves: [100%]\n  bake: 0s\n  apply_timeout: 1m\n  max_failures: 0\n",
        )?;
        std::fs::write(
            dir.join("groups/sim.yaml"),
            "selector:\n  match_attributes:\n    service.name: otelcol-sim\nconfig:\n  \"\": configs/collector.yaml\n",
        )?;
        let r = ConfigRepo { repo };
        r.commit_version(1)?;
        Ok(r)
    }

    /// The canonical hash the controller sends for `version`, as 64 hex digits.
    fn config_hash(&self, version: u32) -> String {
        let file = ConfigFile {
            content_type: "text/yaml".into(),
            body: Bytes::from(collector_yaml(version)),
        };
        ConfigBundle::new(BTreeMap::from([(String::new(), file)]))
            .hash()
            .to_string()
    }

    fn commit_version(&self, version: u32) -> Result<()> {
        let dir = self.repo.workdir().ok_or("bare repository")?;
        std::fs::write(dir.join("configs/collector.yaml"), collector_yaml(version))?;
        let mut index = self.repo.index()?;
        index.add_all(["*"], git2::IndexAddOption::DEFAULT, None)?;
        index.write()?;
        let tree = self.repo.find_tree(index.write_tree()?)?;
        let sig = git2::Signature::now("bench", "bench@example.com")?;
        let parent = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        self.repo
            .commit(Some("HEAD"), &sig, &sig, &format!("config v{version}"), &tree, &parents)?;
        Ok(())
    }
}

// ---------- processes ----------

/// A child process that is killed if the benchmark stops early.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    fn spawn(mut cmd: Command, name: &'static str) -> Result<Self> {
        let child = cmd.spawn().map_err(|e| format!("starting {name}: {e}"))?;
        Ok(Proc { child, name })
    }

    fn proc_file(&self, file: &str) -> Result<String> {
        let path = format!("/proc/{}/{file}", self.child.id());
        std::fs::read_to_string(&path).map_err(|e| format!("{} ({path}): {e}", self.name).into())
    }

    /// A `kB` line of /proc/PID/status, e.g. VmRSS.
    fn status_kib(&self, key: &str) -> Result<u64> {
        let status = self.proc_file("status")?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| format!("no {key} in /proc/PID/status").into())
    }

    /// User plus system CPU time so far, in seconds.
    fn cpu(&self) -> Result<f64> {
        common::cpu_seconds(&self.proc_file("stat")?)
    }

    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) -> Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill()?;
        self.child.wait()?;
        Err(format!("{} did not stop within {grace:?}", self.name).into())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn wait_for(timeout: Duration, what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------- HTTP ----------

/// One HTTP/1.0 request without a body; the status and body of the answer.
fn http(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    request(addr, method, path, "")
}

/// One HTTP/1.0 request (the answer is then never chunked); the status and body.
fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of headers")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status")?;
    Ok((status, body.to_string()))
}

/// The value of one sample line of `/metrics`, e.g. `name{label="x"}`.
fn metric(api: SocketAddr, sample: &str) -> Result<f64> {
    let (_, body) = http(api, "GET", "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
        .ok_or_else(|| format!("no {sample} in /metrics").into())
}

/// The sum of a metric over all its labels.
fn metric_sum(api: SocketAddr, name: &str) -> Result<f64> {
    let (_, body) = http(api, "GET", "/metrics")?;
    Ok(body
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(['{', ' '])))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

// ---------- report ----------

fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| Some(l.strip_prefix("model name")?.split_once(':')?.1.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .map_or_else(|| "unknown".into(), |kib| format!("{:.1} GiB", kib as f64 / 1048576.0));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "machine: {cores} cores ({cpu}), {mem} memory, Linux {}",
        read("/proc/sys/kernel/osrelease").trim()
    )
}

fn details(args: &Args, runs: &[Run]) -> String {
    let secs = |d: Option<Duration>| d.map_or_else(|| "n/a".to_string(), |d| format!("{:.2}", d.as_secs_f64()));
    let num = |v: Option<f64>, decimals: usize| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.decimals$}"));
    let cpu_pair =
        |p: Option<(f64, f64)>| p.map_or_else(|| "n/a".into(), |(server, sim)| format!("{server:.2} / {sim:.2}"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nHeartbeats: WebSocket every {}, HTTP polls every {}; CPU over {} (100% = one core).\n",
        humantime::format_duration(args.ws_heartbeat()),
        humantime::format_duration(args.http_poll),
        humantime::format_duration(args.window),
    );
    let _ = writeln!(
        out,
        "| scenario | server | connect s | connect CPU s, server / simulator | first config s | rollout s | rollout CPU s, server / simulator | verified | \
         RSS idle MiB | KiB/agent | RSS peak MiB | server CPU | simulator CPU | msgs/s | per agent, msgs sent / received | errors |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for Run {
        scenario: s,
        server,
        figures: f,
        ..
    } in runs
    {
        let _ = writeln!(
            out,
            "| {} | {server} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {:.1} | {}% | {}% | {} | {} | {} |{}",
            s.label(),
            secs(f.connect),
            cpu_pair(f.connect_cpu_s),
            secs(f.first_config),
            secs(f.rollout),
            cpu_pair(f.rollout_cpu_s),
            f.rollout_verified.map_or_else(|| "n/a".into(), |n| n.to_string()),
            f.rss_idle_kib as f64 / 1024.0,
            num(f.kib_per_agent(s.agents), 1),
            f.rss_peak_kib as f64 / 1024.0,
            num(f.server_cpu().map(|c| c * 100.0), 1),
            num(f.sim_cpu().map(|c| c * 100.0), 1),
            num(f.messages_per_s(), 0),
            f.sim_messages.map_or_else(
                || "n/a".into(),
                |(sent, received)| format!(
                    "{:.2} / {:.2}",
                    sent as f64 / s.agents as f64,
                    received as f64 / s.agents as f64
                )
            ),
            f.errors(),
            if f.notes.is_empty() {
                String::new()
            } else {
                format!(" {}", f.notes.join("; "))
            }
        );
    }
    out
}

/// One figure of the side-by-side tables: lower is better for each.
struct Figure {
    title: &'static str,
    decimals: usize,
    value: fn(&Figures, usize) -> Option<f64>,
}

const FIGURES: [Figure; 7] = [
    Figure {
        title: "Connect: simulator started → every agent counted connected, s",
        decimals: 2,
        value: |f, _| f.connect.map(|d| d.as_secs_f64()),
    },
    Figure {
        title: "The server's CPU over that connect, s",
        decimals: 2,
        value: |f, _| f.connect_cpu_s.map(|(server, _)| server),
    },
    Figure {
        title: "RSS per agent with a config applied, idle, KiB",
        decimals: 1,
        value: |f, agents| f.kib_per_agent(agents),
    },
    Figure {
        title: "Idle CPU over the window, % of one core",
        decimals: 2,
        value: |f, _| f.server_cpu().map(|c| c * 100.0),
    },
    Figure {
        title: "CPU per thousand messages received, ms",
        decimals: 1,
        value: |f, _| f.cpu_ms_per_thousand(),
    },
    Figure {
        title: "Commit (ours) or trigger (naive) → every agent APPLIED, s",
        decimals: 2,
        value: |f, _| f.rollout.map(|d| d.as_secs_f64()),
    },
    Figure {
        title: "The server's CPU over that rollout, s",
        decimals: 2,
        value: |f, _| f.rollout_cpu_s.map(|(server, _)| server),
    },
];

/// One table per figure, a row per scenario: ours, naive, and ours / naive.
fn side_by_side(scenarios: &[Scenario], runs: &[Run]) -> String {
    let num = |v: Option<f64>, decimals: usize| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.decimals$}"));
    let find = |i: usize, server: &str| {
        runs.iter()
            .find(|r| r.index == i && r.server == server)
            .map(|r| &r.figures)
    };
    let mut out = String::from("Side by side: ours / naive below 1 means ours is lower (better).\n");
    for figure in &FIGURES {
        let _ = writeln!(out, "\n{}\n", figure.title);
        let _ = writeln!(out, "| scenario | ours | naive | ours / naive |");
        let _ = writeln!(out, "|---|---:|---:|---:|");
        for (i, s) in scenarios.iter().enumerate() {
            let ours = find(i, "ours").and_then(|f| (figure.value)(f, s.agents));
            let naive = find(i, "naive").and_then(|f| (figure.value)(f, s.agents));
            let ratio = match (ours, naive) {
                (Some(o), Some(n)) if n > 0.0 => Some(o / n),
                _ => None,
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                s.label(),
                num(ours, figure.decimals),
                num(naive, figure.decimals),
                num(ratio, 2)
            );
        }
    }
    let _ = writeln!(out, "\nErrors (simulator and server)\n");
    let _ = writeln!(out, "| scenario | ours | naive |");
    let _ = writeln!(out, "|---|---:|---:|");
    for (i, s) in scenarios.iter().enumerate() {
        let errors = |server| find(i, server).map_or_else(|| "n/a".to_string(), |f| f.errors().to_string());
        let _ = writeln!(out, "| {} | {} | {} |", s.label(), errors("ours"), errors("naive"));
    }
    out
}
