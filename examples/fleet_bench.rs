//! Fleet benchmark: runs `opamp-gitops serve` on a fresh git repository and
//! `opamp-gitops simulate` in a separate process, both on 127.0.0.1, and
//! measures per scenario (transport, number of agents):
//!
//! - connect: seconds until the controller's `/metrics` counts every agent connected;
//! - rollout: from a new commit and `POST /api/v1/sync` until the controller
//!   counts every agent APPLIED on the new config (one wave of 100%, bake 0s,
//!   agents apply at once), then checked agent by agent in `/api/v1/agents`;
//! - memory: the controller's resident set (VmRSS) with the agents connected and
//!   idle, and the growth per agent over the controller without agents;
//! - CPU: the controller's user+system time over a window of idle heartbeats
//!   (WebSocket) or polls (HTTP), and the simulator's for comparison;
//! - errors: the simulator's failed requests and error replies, and the
//!   controller's undecodable messages.
//!
//! `bench/run.sh` builds the release binaries and runs this; see BENCHMARKS.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use opamp_gitops::desired::{ConfigBundle, ConfigFile};

type Error = Box<dyn std::error::Error>;
type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Parser)]
#[command(about = "Benchmark opamp-gitops serve with simulated fleets")]
struct Args {
    /// Scenarios, TRANSPORT:AGENTS separated by commas.
    #[arg(long, default_value = "ws:1000,ws:10000,http:1000,http:5000", value_delimiter = ',')]
    scenarios: Vec<Scenario>,
    /// The opamp-gitops binary (default: next to this example's directory).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// How long the steady CPU is measured.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// WebSocket heartbeat interval of the simulated agents.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ws_heartbeat: Duration,
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
}

/// What one scenario measured.
#[derive(Debug, Default)]
struct Figures {
    connect: Option<Duration>,
    /// First config reaching every agent after they connected (needs the reconcile driver).
    first_config: Option<Duration>,
    rollout: Option<Duration>,
    rollout_verified: Option<usize>,
    rss_base_kib: u64,
    rss_idle_kib: u64,
    rss_peak_kib: u64,
    ctrl_cpu: f64,
    sim_cpu: f64,
    messages_per_s: f64,
    sim_errors: u64,
    sim_connect_errors: u64,
    server_decode_errors: u64,
    notes: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => default_binary()?,
    };
    let help = Command::new(&bin).args(["serve", "--help"]).output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    // The reconcile driver brings --startup-grace; without it nothing is pushed.
    let driver = help.contains("--startup-grace");
    println!("{}", machine());
    println!("binary: {}", bin.display());
    if !driver {
        println!("serve has no reconcile driver (no --startup-grace): rollout not measured");
    }
    let mut results = Vec::new();
    for &s in &args.scenarios {
        eprintln!("== {} agents over {}", s.agents, s.transport());
        let figures = run_scenario(&args, &bin, s, driver).unwrap_or_else(|e| Figures {
            notes: vec![format!("failed: {e}")],
            ..Figures::default()
        });
        eprintln!("{figures:?}");
        results.push((s, figures));
    }
    println!("{}", table(&args, &results));
    Ok(())
}

/// `target/release/examples/fleet_bench` → `target/release/opamp-gitops`.
fn default_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate the target directory")?;
    let bin = dir.join("opamp-gitops");
    if !bin.is_file() {
        return Err(format!("{} not found; build it or pass --bin", bin.display()).into());
    }
    Ok(bin)
}

fn run_scenario(args: &Args, bin: &Path, s: Scenario, driver: bool) -> Result<Figures> {
    let mut f = Figures::default();
    let dir = tempfile::tempdir()?;
    let repo_dir = dir.path().join("repo");
    let repo = ConfigRepo::create(&repo_dir)?;
    let api = free_port()?;
    let opamp = free_port()?;

    let wrap: Vec<&str> = args.wrap.as_deref().unwrap_or("").split_whitespace().collect();
    let mut serve = match wrap.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    serve
        .arg("serve")
        .arg("--repo")
        .arg(&repo_dir)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--opamp-listen", &opamp.to_string(), "--api-listen", &api.to_string()]);
    if driver {
        serve.args(["--startup-grace", "0s"]);
    }
    let serve_log = std::fs::File::create(dir.path().join("serve.log"))?;
    serve
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(serve_log);
    let mut serve = Proc::spawn(serve, "serve")?;
    wait_for(Duration::from_secs(20), "the controller to answer /healthz", || {
        Ok(http(api, "GET", "/healthz").is_ok_and(|(status, _)| status == 200))
    })?;
    if driver {
        wait_for(Duration::from_secs(20), "the controller to load the commit", || {
            Ok(http(api, "GET", "/readyz").is_ok_and(|(status, _)| status == 200))
        })?;
    }
    std::thread::sleep(Duration::from_secs(1));
    f.rss_base_kib = serve.status_kib("VmRSS")?;

    let heartbeat = if s.http { args.http_poll } else { args.ws_heartbeat };
    let sim_log_path = dir.path().join("simulate.log");
    let mut sim = Command::new(bin);
    sim.arg("simulate")
        .args(["--server", &opamp.to_string(), "--transport", s.transport()])
        .args(["--agents", &s.agents.to_string(), "--apply-delay", "0s"])
        .arg("--heartbeat")
        .arg(humantime::format_duration(heartbeat).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&sim_log_path)?);
    let started = Instant::now();
    let mut sim = Proc::spawn(sim, "simulate")?;
    let connected_metric = format!(
        "opamp_gitops_agents_connected{{transport=\"{}\"}}",
        s.metric_transport()
    );
    wait_for(args.timeout, "every agent to connect", || {
        Ok(metric(api, &connected_metric)? >= s.agents as f64)
    })?;
    f.connect = Some(started.elapsed());

    if driver {
        let v1 = repo.config_hash(1);
        wait_for(args.timeout, "the first config to reach every agent", || {
            all_applied(api, &v1, s.agents)
        })?;
        f.first_config = Some(started.elapsed());

        repo.commit_version(2)?;
        let v2 = repo.config_hash(2);
        let t0 = Instant::now();
        let (status, body) = http(api, "POST", "/api/v1/sync")?;
        if status != 200 {
            return Err(format!("POST /api/v1/sync answered {status}: {body}").into());
        }
        wait_for(args.timeout, "the new commit to reach every agent", || {
            all_applied(api, &v2, s.agents)
        })?;
        f.rollout = Some(t0.elapsed());
        f.rollout_verified = Some(applied_agents(api, &v2)?);
    }

    // Idle: let the connection burst's buffers and snapshots settle.
    std::thread::sleep(Duration::from_secs(5));
    f.rss_idle_kib = serve.status_kib("VmRSS")?;
    let m0 = metric_sum(api, "opamp_gitops_opamp_messages_received_total")?;
    let (c0, s0, t0) = (serve.cpu()?, sim.cpu()?, Instant::now());
    std::thread::sleep(args.window);
    let (c1, s1, elapsed) = (serve.cpu()?, sim.cpu()?, t0.elapsed());
    let m1 = metric_sum(api, "opamp_gitops_opamp_messages_received_total")?;
    let secs = elapsed.as_secs_f64();
    f.ctrl_cpu = (c1 - c0) / secs;
    f.sim_cpu = (s1 - s0) / secs;
    f.messages_per_s = (m1 - m0) / secs;
    f.rss_idle_kib = f.rss_idle_kib.max(serve.status_kib("VmRSS")?);
    f.rss_peak_kib = serve.status_kib("VmHWM")?;
    f.server_decode_errors = metric_sum(api, "opamp_gitops_opamp_decode_errors_total")? as u64;
    let connected = metric(api, &connected_metric)?;
    if connected < s.agents as f64 {
        f.notes
            .push(format!("only {connected} connected at the end of the window"));
    }

    sim.stop(Duration::from_secs(60))?;
    let log = std::fs::read_to_string(&sim_log_path)?;
    let summary = log
        .lines()
        .rev()
        .find(|l| l.contains(" agents ran "))
        .unwrap_or_default();
    f.sim_errors = count_before(summary, "errors").unwrap_or(0);
    f.sim_connect_errors = count_before(summary, "connect errors").unwrap_or(0);
    if summary.is_empty() {
        f.notes.push("simulate printed no summary".into());
    }
    serve.stop(Duration::from_secs(20))?;
    Ok(f)
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

    fn body(version: u32) -> String {
        COLLECTOR.replace("VERSION", &format!("v{version}"))
    }

    /// The canonical hash the controller sends for `version`, as 64 hex digits.
    fn config_hash(&self, version: u32) -> String {
        let file = ConfigFile {
            content_type: "text/yaml".into(),
            body: Bytes::from(Self::body(version)),
        };
        ConfigBundle::new(BTreeMap::from([(String::new(), file)]))
            .hash()
            .to_string()
    }

    fn commit_version(&self, version: u32) -> Result<()> {
        let dir = self.repo.workdir().ok_or("bare repository")?;
        std::fs::write(dir.join("configs/collector.yaml"), Self::body(version))?;
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
        let stat = self.proc_file("stat")?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or("bad /proc/PID/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
        let ticks = |i: usize| -> Result<f64> { Ok(fields.get(i).ok_or("short /proc/PID/stat")?.parse::<f64>()?) };
        Ok((ticks(11)? + ticks(12)?) / clock_ticks())
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

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
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

/// One HTTP/1.0 request (the answer is then never chunked); the status and body.
fn http(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
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

fn table(args: &Args, results: &[(Scenario, Figures)]) -> String {
    let secs = |d: Option<Duration>| d.map_or_else(|| "n/a".to_string(), |d| format!("{:.2}", d.as_secs_f64()));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nHeartbeats: WebSocket every {}, HTTP polls every {}; CPU over {} (100% = one core).\n",
        humantime::format_duration(args.ws_heartbeat),
        humantime::format_duration(args.http_poll),
        humantime::format_duration(args.window),
    );
    let _ = writeln!(
        out,
        "| scenario | connect s | first config s | rollout s | verified | RSS idle MiB | KiB/agent | RSS peak MiB | \
         controller CPU | simulator CPU | msgs/s | errors |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (s, f) in results {
        let per_agent = f.rss_idle_kib.saturating_sub(f.rss_base_kib) as f64 / s.agents as f64;
        let _ = writeln!(
            out,
            "| {} {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1}% | {:.1}% | {:.0} | {} |{}",
            s.transport(),
            s.agents,
            secs(f.connect),
            secs(f.first_config),
            secs(f.rollout),
            f.rollout_verified.map_or_else(|| "n/a".into(), |n| n.to_string()),
            f.rss_idle_kib as f64 / 1024.0,
            per_agent,
            f.rss_peak_kib as f64 / 1024.0,
            f.ctrl_cpu * 100.0,
            f.sim_cpu * 100.0,
            f.messages_per_s,
            f.sim_errors + f.sim_connect_errors + f.server_decode_errors,
            if f.notes.is_empty() {
                String::new()
            } else {
                format!(" {}", f.notes.join("; "))
            }
        );
    }
    out
}
