//! Command-line arguments and exit codes; nothing else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::notify::{Forge, ForgeProject, Hook, NotifyConfig};

#[derive(Debug, Parser)]
#[command(
    name = "opamp-gitops",
    version,
    about = "GitOps controller and OpAMP server for OpenTelemetry Collector fleets"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller: OpAMP server, git source, rollouts, API.
    Serve(Box<ServeArgs>),
    /// Validate a config repository (files on disk, or a commit with --rev).
    Validate(ValidateArgs),
    /// Run simulated agents that behave like the OpAMP supervisor.
    Simulate(SimulateArgs),
    /// Rollout history of recent commits, from the git notes alone.
    Status(StatusArgs),
    /// What a commit would do to the fleet: changed groups, diffs, waves.
    Plan(PlanArgs),
    /// Pause, resume or promote a group's rollout on a running controller.
    Rollout(RolloutArgs),
    /// The guided tour: a config repository, the controller and simulated
    /// collectors in one process; a change, a broken change, a revert.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Simulated collectors (at least 6): a few gateways, mostly app agents, some others.
    #[arg(long, default_value_t = 36)]
    pub agents: usize,
    /// Keep the config repository (and the controller's state) and print where.
    #[arg(long)]
    pub keep: bool,
    /// Bake time of every wave (shorter for tests).
    #[arg(long, default_value = "2s", value_parser = parse_duration, hide = true)]
    pub bake: Duration,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Config repository: a local path, or a file://, https:// or ssh:// URL.
    #[arg(long)]
    pub repo: Option<String>,
    /// Branch to track (default: the remote's default branch).
    #[arg(long)]
    pub branch: Option<String>,
    /// Subdirectory of the repository that holds fleet.yaml and groups/.
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// Where OpAMP agents connect (WebSocket and plain HTTP on /v1/opamp).
    #[arg(long, default_value = "0.0.0.0:4320", value_parser = parse_listen)]
    pub opamp_listen: SocketAddr,
    /// Where the HTTP API, metrics and health endpoints listen.
    #[arg(long, default_value = "127.0.0.1:4321", value_parser = parse_listen)]
    pub api_listen: SocketAddr,
    /// Directory for clones and rollout state.
    #[arg(long, default_value = ".opamp-gitops")]
    pub state_dir: PathBuf,
    /// How often to fetch the repository.
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    pub poll_interval: Duration,
    /// Largest OpAMP message accepted, after decompression, in bytes (at least 1024).
    #[arg(long, default_value_t = crate::opamp::codec::DEFAULT_MAX_MESSAGE_BYTES, value_parser = parse_max_message_bytes)]
    pub max_message_bytes: usize,
    /// How often agents are assumed to report; an HTTP agent silent for three
    /// intervals is offline (see docs/opamp-server.md).
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    pub heartbeat_interval: Duration,
    /// Offer agents this heartbeat interval (over plain HTTP: how often they
    /// poll, and so how soon they receive a push). Only to agents that report
    /// heartbeats and do not accept OpAMP connection settings. Default: none
    /// offered, agents keep their own (30s for the OpAMP supervisor).
    #[arg(long, value_parser = parse_whole_seconds)]
    pub offer_heartbeat_interval: Option<Duration>,
    /// File holding the shared secret that push webhooks are signed with
    /// (X-Hub-Signature-256); without it webhooks are not authenticated.
    #[arg(long)]
    pub webhook_secret_file: Option<PathBuf>,
    /// File holding a token for https:// repositories (re-read on every fetch).
    #[arg(long)]
    pub git_token_file: Option<PathBuf>,
    /// Token for https:// repositories; prefer the environment variable or
    /// --git-token-file, which keep it out of the process list.
    #[arg(long, env = "OPAMP_GITOPS_GIT_TOKEN", hide_env_values = true)]
    pub git_token: Option<String>,
    /// Private key for ssh:// repositories (default: the ssh agent).
    #[arg(long)]
    pub ssh_key_file: Option<PathBuf>,
    /// The longest time between two plans (default: the repository's
    /// reconcile interval). Rollouts are planned on every change and when a
    /// bake ends or a timeout runs out; this only bounds the wait otherwise.
    #[arg(long, value_parser = parse_positive_duration)]
    pub reconcile_tick: Option<Duration>,
    /// How long after start the first plan waits, so agents reconnect before
    /// a rollout counts its members.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub startup_grace: Duration,
    /// Open OpAMP connections at most (default: the open-file limit less 1024).
    /// When full, a new connection closes the oldest one that has not sent a
    /// request yet; only when every one has is it turned away.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Open OpAMP connections from one IP address at most (default: a quarter
    /// of --max-connections; 0: no limit). Raise it when many agents share an
    /// address behind NAT.
    #[arg(long)]
    pub max_connections_per_source: Option<usize>,
    /// How long a connection may stay open before its first request.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub first_request_timeout: Duration,
    /// How long a plain-HTTP connection may stay open without a request after
    /// its last answer (WebSockets are watched by heartbeats instead). Keep it
    /// above the interval at which HTTP agents poll.
    #[arg(long, default_value = "5m", value_parser = parse_positive_duration)]
    pub idle_timeout: Duration,
    /// How long an agent may stay offline before it is forgotten (agents
    /// away for less keep their places in rollouts): three days, so a
    /// weekend's outage forgets nobody.
    #[arg(long, default_value = "72h", value_parser = parse_positive_duration)]
    pub agent_retention: Duration,
    /// How long fetches of the repository may fail before /readyz answers
    /// 503 (the commit in force stays in force).
    #[arg(long, default_value = "5m", value_parser = parse_positive_duration)]
    pub source_stale_after: Duration,
    /// How long a rollout's wave may wait for its agents before the API and
    /// metrics call the rollout stalled.
    #[arg(long, default_value = "30m", value_parser = parse_positive_duration)]
    pub stall_after: Duration,
    /// PostgreSQL (postgres://user:password@host:port/database): makes this
    /// process one replica of a highly available controller (docs/ha.md).
    #[arg(long, env = "OPAMP_GITOPS_STORE", value_parser = parse_store)]
    pub store: Option<String>,
    /// This replica's name, unique in the cluster (default: the host name).
    #[arg(long, requires = "store")]
    pub replica_id: Option<String>,
    /// How long the leader lease (and each replica's own) lasts unless
    /// renewed; it is renewed every third of it.
    #[arg(long, default_value = "15s", value_parser = parse_lease_ttl)]
    pub lease_ttl: Duration,
    /// Where the other replicas reach this one's API (default: http://, or
    /// https:// with --tls-cert, and the --api-listen address, which must
    /// then not be 0.0.0.0).
    #[arg(long, requires = "store")]
    pub advertise_api: Option<String>,
    /// With --store: the CA certificates (PEM) PostgreSQL's certificate
    /// chains to, when the URL asks for TLS (sslmode=prefer, the default,
    /// or require; default: the system's).
    #[arg(long, requires = "store")]
    pub store_ca: Option<PathBuf>,
    /// With --store and --tls-cert: the CA certificates (PEM) the replicas'
    /// certificates chain to, trusted when one replica calls another
    /// (default: the system's).
    #[arg(long, requires = "store")]
    pub replica_ca: Option<PathBuf>,
    /// TLS certificate chain (PEM) for both listeners; read again when it
    /// changes. Without it, both listen in plain HTTP.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Agents must present a client certificate signed by this CA (PEM): mTLS.
    #[arg(long, requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Agents must present one of these tokens (Authorization: Bearer); a
    /// YAML list of {name, sha256, groups}; read again when it changes.
    #[arg(long)]
    pub agent_tokens: Option<PathBuf>,
    /// Operators must present one of these tokens (Authorization: Bearer) with
    /// the scope the call needs: read, or write for pause/resume/promote/sync.
    #[arg(long)]
    pub api_tokens: Option<PathBuf>,
    /// With --api-tokens, reads (inventory, groups, metrics) need no token.
    #[arg(long, requires = "api_tokens")]
    pub api_open_reads: bool,
    /// Author name of the git notes.
    #[arg(long, default_value = "opamp-gitops")]
    pub notes_author_name: String,
    /// Author email of the git notes.
    #[arg(long, default_value = "opamp-gitops@localhost")]
    pub notes_author_email: String,
    /// POST a JSON event here on every step of a rollout (started, wave
    /// opened, agents failed, halted, rolled back, complete, superseded) and
    /// on an invalid commit; slack+https://… posts Slack's message format.
    /// Repeatable.
    #[arg(long = "notify", value_name = "URL", value_parser = Hook::parse)]
    pub notify: Vec<Hook>,
    /// File holding the secret notifications are signed with (header
    /// X-Opamp-Gitops-Signature: sha256=<HMAC-SHA256 of the body>).
    #[arg(long, requires = "notify")]
    pub notify_secret_file: Option<PathBuf>,
    /// Set a commit status per group in this forge: github:OWNER/REPO or
    /// gitlab:PROJECT (its id or path), with the token in
    /// OPAMP_GITOPS_GITHUB_TOKEN or OPAMP_GITOPS_GITLAB_TOKEN.
    #[arg(long, value_name = "FORGE:PROJECT", value_parser = ForgeProject::parse)]
    pub forge: Option<ForgeProject>,
    /// The forge's API [github: https://api.github.com, gitlab: https://gitlab.com/api/v4].
    #[arg(long, value_name = "URL", requires = "forge", value_parser = parse_http_url)]
    pub forge_api: Option<String>,
    /// The controller's address as people reach it (default: the API's,
    /// http://--api-listen); notifications and commit statuses link to its
    /// /api/v1/groups.
    #[arg(long, value_name = "URL", value_parser = parse_http_url)]
    pub external_url: Option<String>,
}

#[derive(Debug, Args)]
pub struct RolloutArgs {
    #[arg(value_enum)]
    pub action: RolloutAction,
    /// The group whose rollout to act on.
    pub group: String,
    /// The controller's API address, e.g. http://127.0.0.1:4321.
    #[arg(long)]
    pub server: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RolloutAction {
    /// Stop opening waves (failures still halt the rollout).
    Pause,
    /// Let a paused rollout open waves again.
    Resume,
    /// Skip the rest of the current wave's bake.
    Promote,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Repository directory (default: the current directory).
    pub path: Option<PathBuf>,
    /// Validate this commit instead of the files on disk.
    #[arg(long)]
    pub rev: Option<String>,
    /// Subdirectory that holds fleet.yaml and groups/.
    #[arg(long = "path", id = "subdir")]
    pub subdir: Option<PathBuf>,
    /// Once the repository's own checks pass, run `BIN validate` on each
    /// group's merged config: BIN is an OpenTelemetry Collector binary with
    /// the components the fleet runs (e.g. otelcol-contrib).
    #[arg(long, value_name = "BIN")]
    pub collector: Option<PathBuf>,
    /// How long one `BIN validate` may take before it counts as stuck.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_positive_duration, hide = true)]
    pub collector_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The config repository (a clone that has the notes).
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// Newest commit to show (default: HEAD).
    #[arg(default_value = "HEAD")]
    pub rev: String,
    /// How many commits to show.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Fetch the notes from this remote first (e.g. origin).
    #[arg(long)]
    pub fetch: Option<String>,
    #[arg(long, value_enum, default_value_t = StatusFormat::Text)]
    pub format: StatusFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("agents").required(true).args(["server", "fleet"])))]
pub struct PlanArgs {
    /// The config repository (a clone with the history and the notes).
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// The commit to plan (its committed tree, never the work tree).
    #[arg(long, default_value = "HEAD")]
    pub rev: String,
    /// Compare every group with this commit (e.g. origin/main for a pull
    /// request) instead of the notes and the first parent.
    #[arg(long)]
    pub base: Option<String>,
    /// Subdirectory that holds fleet.yaml and groups/.
    #[arg(long = "path", id = "subdir")]
    pub subdir: Option<String>,
    /// The controller's API, e.g. http://127.0.0.1:4321.
    #[arg(long)]
    pub server: Option<String>,
    /// A file in the GET /api/v1/agents format, for offline use.
    #[arg(long)]
    pub fleet: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
    pub format: PlanFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanFormat {
    Text,
    Markdown,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportKind {
    Ws,
    Http,
}

/// Timing presets of `simulate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SimProfile {
    /// Short delays for tests and demos: healthy 100ms after a start,
    /// APPLIED 200ms after a config, 1s before a crashed collector restarts.
    Fast,
    /// The real supervisor's: healthy 1s after a start, APPLIED when the 5s
    /// config apply timeout passes, 5s before a crashed collector restarts.
    Supervisor,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The OpAMP endpoint, e.g. ws://127.0.0.1:4320/v1/opamp or http://127.0.0.1:4320/v1/opamp.
    /// A bare host:port or an http URL without a path gets /v1/opamp.
    #[arg(long)]
    pub server: String,
    /// Number of agents.
    #[arg(long, default_value_t = 10)]
    pub agents: usize,
    #[arg(long, value_enum, default_value_t = TransportKind::Ws)]
    pub transport: TransportKind,
    /// Extra attribute on every agent, KEY=VALUE (repeatable).
    #[arg(long = "attr", value_parser = parse_key_value)]
    pub attrs: Vec<(String, String)>,
    /// Timing preset; the timing options below override it.
    #[arg(long, value_enum, default_value_t = SimProfile::Fast)]
    pub profile: SimProfile,
    /// The collector exits on a config with a file holding this text: FAILED
    /// at once, then it crash-loops.
    #[arg(long)]
    pub fail_if_contains: Option<String>,
    /// The collector runs a config with a file holding this text but never
    /// turns healthy: FAILED when the config apply timeout passes.
    #[arg(long)]
    pub unhealthy_if_contains: Option<String>,
    /// Least time between APPLYING and APPLIED [fast: 200ms, supervisor: 5s].
    #[arg(long, value_parser = parse_duration)]
    pub apply_delay: Option<Duration>,
    /// Time a collector takes to turn healthy (or to exit on a refused config)
    /// after it starts [fast: 100ms, supervisor: 1s].
    #[arg(long, value_parser = parse_duration)]
    pub startup_time: Option<Duration>,
    /// A config whose collector is not healthy this long after it arrived is
    /// FAILED [5s, the supervisor's default].
    #[arg(long, value_parser = parse_positive_duration)]
    pub config_apply_timeout: Option<Duration>,
    /// Wait before a collector that exited starts again [fast: 1s, supervisor: 5s].
    #[arg(long, value_parser = parse_positive_duration)]
    pub crash_restart_delay: Option<Duration>,
    /// After a FAILED config, go back to the last applied one and report it
    /// APPLIED again (the supervisor's opt-in rollback).
    #[arg(long)]
    pub rollback: bool,
    /// Restart agents' processes about this often (each interval drawn
    /// between half and one and a half of it).
    #[arg(long, value_parser = parse_positive_duration)]
    pub restart_every: Option<Duration>,
    /// Share of agents that restart, 0 to 1 [1].
    #[arg(long, value_parser = parse_fraction, requires = "restart_every")]
    pub restart_fraction: Option<f64>,
    /// Share of agents without the ReportsRemoteConfig capability (the
    /// supervisor's default): they apply configs but report no status, 0 to 1.
    #[arg(long, value_parser = parse_fraction, default_value = "0")]
    pub no_config_status_fraction: f64,
    /// Share of agents that are clones: each starts with the instance uid of
    /// the agent before it (a copied host image), 0 to 1.
    #[arg(long, value_parser = parse_fraction, default_value = "0")]
    pub clone_fraction: f64,
    /// Stop after this long (default: run until interrupted).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Heartbeat (WebSocket) or polling (HTTP) interval.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// WebSocket handshakes (HTTP: requests) in flight at once, so a burst of
    /// agents does not overflow the server's accept queue.
    #[arg(long, default_value_t = crate::simulate::DEFAULT_MAX_CONNECTING)]
    pub max_connecting: usize,
}

/// A share between 0 and 1.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("{e} (expected a number from 0 to 1, e.g. 0.1)"))?;
    if !(0.0..=1.0).contains(&f) {
        return Err("must be from 0 to 1 (e.g. 0.1 for a tenth)".to_string());
    }
    Ok(f)
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 5m, 1h 30m)"))
}

/// A duration that must not be zero: a zero interval would spin, panic
/// (`tokio::time::interval`) or mark every agent offline at once.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be greater than zero (examples: 500ms, 30s, 5m)".to_string());
    }
    Ok(d)
}

/// A duration of whole seconds, at least one (what OpAMP's
/// `heartbeat_interval_seconds` can carry).
fn parse_whole_seconds(s: &str) -> Result<Duration, String> {
    let d = parse_positive_duration(s)?;
    if d.subsec_nanos() != 0 || d < Duration::from_secs(1) {
        return Err(format!(
            "must be whole seconds, at least 1s (found {s}; examples: 5s, 1m)"
        ));
    }
    Ok(d)
}

/// The smallest `--max-message-bytes`: below it even an agent's first message
/// (description, capabilities) may not fit.
pub const MIN_MAX_MESSAGE_BYTES: usize = 1024;

fn parse_max_message_bytes(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|e| format!("{e} (expected a number of bytes)"))?;
    if n < MIN_MAX_MESSAGE_BYTES {
        return Err(format!("must be at least {MIN_MAX_MESSAGE_BYTES} bytes"));
    }
    Ok(n)
}

/// An `http://` or `https://` URL with a host (a trailing slash is dropped).
fn parse_http_url(s: &str) -> Result<String, String> {
    let usage = "expected an http:// or https:// URL, e.g. https://gitops.example.com";
    let uri: http::Uri = s.parse().map_err(|e| format!("{e} ({usage})"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none_or(str::is_empty) {
        return Err(usage.to_string());
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// What to notify, from `serve`'s arguments; the forge's token is read from
/// its environment variable (`env`), and its absence is an error.
pub fn notify_config(args: &ServeArgs, env: impl Fn(&str) -> Option<String>) -> Result<NotifyConfig, String> {
    let forge = match &args.forge {
        None => None,
        Some(project) => {
            let var = project.kind.token_env();
            let token = env(var)
                .filter(|t| !t.trim().is_empty())
                .ok_or_else(|| format!("--forge needs a token in the environment variable {var}"))?;
            Some(Forge {
                api: args
                    .forge_api
                    .clone()
                    .unwrap_or_else(|| project.kind.default_api().to_string()),
                project: project.clone(),
                token: token.trim().to_string(),
            })
        }
    };
    Ok(NotifyConfig {
        hooks: args.notify.clone(),
        secret_file: args.notify_secret_file.clone(),
        forge,
        external_url: args.external_url.clone(),
        ..NotifyConfig::default()
    })
}

/// A listen address: `host:port`, where host is an address or a name
/// (`localhost:4320`), resolved once; the first address found is used.
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("{e} (expected host:port, e.g. 0.0.0.0:4320 or localhost:4320)"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{s} resolves to no address (expected host:port, e.g. 0.0.0.0:4320)"))
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default: info).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second initialisation (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// What a replica (`--store`) needs besides: an API address the others can reach.
fn check_replica(args: &ServeArgs) -> Result<(), String> {
    if args.store.is_none() {
        return Ok(());
    }
    if args.advertise_api.is_none() && args.api_listen.ip().is_unspecified() {
        return Err(format!(
            "--store with --api-listen {} needs --advertise-api: the address the other replicas reach this one's API at",
            args.api_listen
        ));
    }
    Ok(())
}

/// A PostgreSQL URL that the client can use.
fn parse_store(s: &str) -> Result<String, String> {
    if !(s.starts_with("postgres://") || s.starts_with("postgresql://")) {
        return Err("expected a postgres:// URL".to_string());
    }
    s.parse::<tokio_postgres::Config>()
        .map(|_| s.to_string())
        .map_err(|e| format!("not a usable PostgreSQL URL: {e}"))
}

/// At least 3 s: the lease is renewed every third of it.
fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_positive_duration(s)?;
    if d < Duration::from_secs(3) {
        return Err("the lease must last at least 3s".to_string());
    }
    Ok(d)
}

/// The host's name, a replica's default name; a name of its own when the
/// host has none (two replicas of one name would take each other's agents).
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("replica-{}", uuid::Uuid::now_v7()))
}

/// The git source's settings from `serve`'s arguments.
pub fn git_config(args: &ServeArgs) -> Result<crate::gitsrc::GitConfig, crate::gitsrc::GitError> {
    use crate::gitsrc::{Auth, GitConfig, GitError, RepoLocation};
    let repo = args.repo.as_deref().ok_or(GitError::NoRepo)?;
    Ok(GitConfig {
        repo: RepoLocation::parse(repo),
        branch: args.branch.clone(),
        subdir: args.path.clone(),
        state_dir: args.state_dir.clone(),
        poll_interval: args.poll_interval,
        auth: Auth {
            token_file: args.git_token_file.clone(),
            token: args.git_token.clone(),
            ssh_key_file: args.ssh_key_file.clone(),
        },
        webhook_secret_file: args.webhook_secret_file.clone(),
    })
}

/// Runs a command and maps its outcome to the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Status(args) => match crate::commands::status(&args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Validate(args) => crate::commands::validate(args),
        Command::Serve(args) => {
            init_tracing();
            let git = match args.repo {
                Some(_) => match git_config(&args).and_then(crate::gitsrc::resolve) {
                    Ok(g) => Some(g),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                },
                None => {
                    tracing::warn!("no --repo given: keeping the agent inventory only, nothing is rolled out");
                    None
                }
            };
            let notify = match notify_config(&args, |var| std::env::var(var).ok()) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Err(e) = check_replica(&args) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            let config = crate::app::ServeConfig {
                opamp_listen: args.opamp_listen,
                api_listen: args.api_listen,
                max_message_bytes: args.max_message_bytes,
                heartbeat_interval: args.heartbeat_interval,
                offer_heartbeat_interval: args.offer_heartbeat_interval,
                git,
                reconcile_tick: args.reconcile_tick,
                startup_grace: args.startup_grace,
                notes_author: crate::gitsrc::notes::Author {
                    name: args.notes_author_name.clone(),
                    email: args.notes_author_email.clone(),
                },
                drain_deadline: crate::app::DRAIN_DEADLINE,
                first_reply_wait: crate::opamp::FIRST_REPLY_WAIT,
                max_connections: args.max_connections,
                max_connections_per_source: args.max_connections_per_source,
                first_request_timeout: args.first_request_timeout,
                idle_timeout: args.idle_timeout,
                agent_retention: args.agent_retention,
                source_stale_after: args.source_stale_after,
                stall_after: args.stall_after,
                tls: args
                    .tls_cert
                    .clone()
                    .zip(args.tls_key.clone())
                    .map(|(cert, key)| crate::tls::TlsFiles {
                        cert,
                        key,
                        client_ca: args.client_ca.clone(),
                    }),
                agent_tokens: args.agent_tokens.clone(),
                api_tokens: args.api_tokens.clone(),
                api_open_reads: args.api_open_reads,
                notify,
                cluster: args.store.clone().map(|url| crate::cluster::ClusterConfig {
                    url,
                    store_ca: args.store_ca.clone(),
                    replica: args.replica_id.clone().unwrap_or_else(host_name),
                    lease_ttl: args.lease_ttl,
                    api_url: args.advertise_api.clone(),
                    replica_ca: args.replica_ca.clone(),
                }),
            };
            match crate::app::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Simulate(args) => crate::simulate::command(args),
        Command::Plan(args) => crate::plan_cmd::command(&args),
        Command::Rollout(args) => crate::commands::rollout(&args),
        Command::Demo(args) => crate::demo::command(&args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_heartbeats_are_whole_seconds() {
        assert_eq!(parse_whole_seconds("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_whole_seconds("1m"), Ok(Duration::from_secs(60)));
        for bad in ["1.5s", "500ms", "0s"] {
            assert!(parse_whole_seconds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_addresses_may_name_the_host() {
        assert_eq!(parse_listen("0.0.0.0:4320"), Ok("0.0.0.0:4320".parse().unwrap()));
        assert!(parse_listen("localhost:4320").is_ok_and(|a| a.ip().is_loopback() && a.port() == 4320));
        for bad in ["localhost", "4320", "no such host.invalid:1"] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_command_reference_names_every_command_and_option() {
        use clap::CommandFactory;
        let reference = include_str!("../docs/cli.md");
        let mut missing = vec![];
        for command in Cli::command().get_subcommands() {
            if !reference.contains(&format!("## {}", command.get_name())) {
                missing.push(command.get_name().to_string());
            }
            // simulate's many timing options are documented in simulate.md.
            let documented = if command.get_name() == "simulate" {
                include_str!("../docs/simulate.md")
            } else {
                reference
            };
            for arg in command.get_arguments().filter(|a| !a.is_hide_set()) {
                if let Some(long) = arg.get_long()
                    && long != "help"
                    && !documented.contains(&format!("--{long}"))
                {
                    missing.push(format!("{} --{long}", command.get_name()));
                }
            }
        }
        assert!(missing.is_empty(), "docs/cli.md does not mention: {missing:?}");
    }

    #[test]
    fn a_replica_needs_a_postgres_url_and_a_lease_of_three_seconds_at_least() {
        let parse = |extra: &[&str]| {
            let all = ["opamp-gitops", "serve"].iter().chain(extra);
            match Cli::try_parse_from(all).map(|c| c.command) {
                Ok(Command::Serve(args)) => Ok(args),
                Ok(_) => panic!("not serve"),
                Err(e) => Err(e.to_string()),
            }
        };
        let args = parse(&["--store", "postgres://u:p@db:5432/opamp", "--replica-id", "r1"]).unwrap();
        assert_eq!(args.store.as_deref(), Some("postgres://u:p@db:5432/opamp"));
        assert_eq!(args.lease_ttl, Duration::from_secs(15));
        let err = parse(&["--store", "mysql://db/opamp"]).unwrap_err();
        assert!(err.contains("expected a postgres:// URL"), "{err}");
        let err = parse(&["--store", "postgres://db:notaport/opamp"]).unwrap_err();
        assert!(err.contains("not a usable PostgreSQL URL"), "{err}");
        let err = parse(&["--store", "postgres://db/opamp", "--lease-ttl", "1s"]).unwrap_err();
        assert!(err.contains("at least 3s"), "{err}");
        let err = parse(&["--replica-id", "r1"]).unwrap_err();
        assert!(err.contains("--store"), "a replica id without a store: {err}");
        let everywhere = parse(&["--store", "postgres://db/opamp", "--api-listen", "0.0.0.0:4321"]).unwrap();
        let err = check_replica(&everywhere).unwrap_err();
        assert!(err.contains("needs --advertise-api"), "{err}");
        let advertised = parse(&[
            "--store",
            "postgres://db/opamp",
            "--api-listen",
            "0.0.0.0:4321",
            "--advertise-api",
            "http://10.0.0.7:4321",
        ])
        .unwrap();
        assert_eq!(check_replica(&advertised), Ok(()));
        assert_eq!(check_replica(&parse(&[]).unwrap()), Ok(()), "not a replica");
    }

    #[test]
    fn notifications_from_the_command_line() {
        let parse = |extra: &[&str]| {
            let mut all = vec!["opamp-gitops", "serve"];
            all.extend(extra);
            match Cli::try_parse_from(all).map(|c| c.command) {
                Ok(Command::Serve(args)) => Ok(args),
                Ok(_) => panic!("not serve"),
                Err(e) => Err(e.to_string()),
            }
        };
        let args = parse(&[
            "--notify",
            "https://hooks.example.com/a",
            "--notify",
            "slack+https://hooks.slack.com/services/x",
            "--notify-secret-file",
            "/s/notify",
            "--forge",
            "gitlab:ops/fleet",
            "--forge-api",
            "https://gitlab.example.com/api/v4/",
            "--external-url",
            "https://gitops.example.com/",
        ])
        .unwrap();
        let tokens = |var: &str| (var == "OPAMP_GITOPS_GITLAB_TOKEN").then(|| "glpat-x\n".to_string());
        let n = notify_config(&args, tokens).unwrap();
        assert_eq!(n.hooks.len(), 2);
        assert_eq!(n.hooks[1].format, crate::notify::Format::Slack);
        assert_eq!(n.secret_file, Some(PathBuf::from("/s/notify")));
        let forge = n.forge.unwrap();
        assert_eq!(
            (forge.api.as_str(), forge.project.project.as_str(), forge.token.as_str()),
            ("https://gitlab.example.com/api/v4", "ops%2Ffleet", "glpat-x")
        );
        assert_eq!(n.external_url.as_deref(), Some("https://gitops.example.com"));

        let github = parse(&["--forge", "github:acme/fleet"]).unwrap();
        let e = notify_config(&github, |_| None).unwrap_err();
        assert!(e.contains("OPAMP_GITOPS_GITHUB_TOKEN"), "{e}");
        let defaulted = notify_config(&github, |_| Some("ghp".into())).unwrap();
        assert_eq!(defaulted.forge.unwrap().api, "https://api.github.com");
        for bad in [
            &["--notify", "hooks.example.com"][..],
            &["--notify-secret-file", "/s"],
            &["--forge", "gitea:a/b"],
            &["--forge-api", "https://x"],
            &["--external-url", "gitops.example.com"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_from_the_command_line() {
        use crate::gitsrc::{GitError, RepoLocation};
        use std::path::PathBuf;
        let cli = Cli::try_parse_from([
            "opamp-gitops",
            "serve",
            "--repo",
            "https://u:t@example.com/r.git",
            "--branch",
            "prod",
            "--path",
            "fleet",
            "--poll-interval",
            "5s",
            "--webhook-secret-file",
            "/s/hook",
            "--git-token-file",
            "/s/token",
            "--ssh-key-file",
            "/s/key",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let cfg = git_config(&args).unwrap();
        assert_eq!(cfg.repo, RepoLocation::Remote("https://u:t@example.com/r.git".into()));
        assert_eq!(cfg.branch.as_deref(), Some("prod"));
        assert_eq!(cfg.subdir, Some(PathBuf::from("fleet")));
        assert_eq!(cfg.poll_interval, Duration::from_secs(5));
        assert_eq!(cfg.webhook_secret_file, Some(PathBuf::from("/s/hook")));
        assert_eq!(cfg.auth.token_file, Some(PathBuf::from("/s/token")));
        assert_eq!(cfg.auth.ssh_key_file, Some(PathBuf::from("/s/key")));

        let cli = Cli::try_parse_from(["opamp-gitops", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert!(matches!(git_config(&args), Err(GitError::NoRepo)));
    }
}
