//! `opamp-gitops demo`: the guided tour. Everything runs in this process on
//! 127.0.0.1: a config repository in a temp dir, the controller reading it,
//! and simulated collectors over WebSocket. It commits a change, a broken
//! change and its revert, narrating what the controller does with each, then
//! shows the git notes. Every wait has a deadline; a step not reached in time
//! ends the tour with what was expected and what was seen.

mod files;
mod progress;
mod repo;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use self::files::{APP_CONFIG, APP_GROUP, REFUSED_TEXT};
use self::progress::{WaveTracker, agent_line, group, group_table, short};
use self::repo::{DemoRepo, Workspace};
use crate::app::{self, AppError, Running, ServeConfig};
use crate::cli::DemoArgs;
use crate::desired::{self, DesiredState, LoadErrors, RolloutPolicy};
use crate::driver::{DriverHandle, DriverStatus};
use crate::fleet::{FleetHandle, RemoteConfigState};
use crate::gitsrc::notes::{Author, NotesError, NotesStore};
use crate::gitsrc::tree::TreeSource;
use crate::gitsrc::{Auth, GitConfig, GitHandle, RepoLocation, SyncError};
use crate::model::{AgentState, CommitId, ConfigHash, GroupName, InstanceUid};
use crate::notes::format::Note;
use crate::reconcile::Phase;
use crate::simulate::{self, SimulateError, Simulation};

/// Fewer agents than this cannot show a canary, a second wave and a catch-all.
const MIN_AGENTS: usize = 6;
/// How long a simulated collector takes to apply a config.
const APPLY_DELAY: Duration = Duration::from_millis(200);
/// The controller plans this often without a change (bakes end on a tick).
const RECONCILE_TICK: Duration = Duration::from_millis(100);
/// The controller waits this long after start before its first plan, so the
/// first rollout counts every agent.
const STARTUP_GRACE: Duration = Duration::from_secs(1);
/// Slack added to every deadline derived from the rollout policy.
const SLACK: Duration = Duration::from_secs(15);
/// How long stopping may take.
const STOP_DEADLINE: Duration = Duration::from_secs(15);

/// The tour's settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub agents: usize,
    pub keep: bool,
    /// Bake time of every wave.
    pub bake: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("--agents must be at least {MIN_AGENTS} (a few gateways, app agents and others)")]
    TooFewAgents,
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: {source}")]
    Git { what: String, source: git2::Error },
    #[error("the demo repository is invalid at {commit}:\n{problems}")]
    Invalid { commit: CommitId, problems: String },
    #[error("the demo's edit does not apply: {0}")]
    Edit(String),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    App(#[from] AppError),
    #[error(transparent)]
    Simulate(#[from] SimulateError),
    #[error("the controller could not fetch: {0}")]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Notes(#[from] NotesError),
    #[error("expected {expected} within {after:?}; it did not happen.\nLast seen:\n{seen}")]
    Timeout {
        expected: String,
        after: Duration,
        seen: String,
    },
    #[error("expected {expected}, but {found}")]
    Unexpected { expected: String, found: String },
}

/// The `demo` command: 0 when the tour ran to its end, 1 when a step failed, 2 for bad options.
pub fn command(args: &DemoArgs) -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        crate::cli::init_tracing();
    }
    let options = Options {
        agents: args.agents,
        keep: args.keep,
        bake: args.bake,
    };
    if options.agents < MIN_AGENTS {
        eprintln!("error: {}", DemoError::TooFewAgents);
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}", DemoError::Runtime(e));
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("\nThe tour stopped: a step did not go as expected (details on stderr).");
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// How many simulated collectors of each kind.
#[derive(Debug, Clone, Copy)]
struct FleetMix {
    gateways: usize,
    apps: usize,
    others: usize,
}

/// One kind of simulated collector: how many, their attributes, their group.
struct Kind {
    count: usize,
    name: &'static str,
    attrs: &'static [(&'static str, &'static str)],
    group: &'static str,
}

impl FleetMix {
    fn kinds(self) -> [Kind; 3] {
        [
            Kind {
                count: self.gateways,
                name: "gateways",
                attrs: &[
                    ("service.name", "otelcol-gateway"),
                    ("deployment.environment", "production"),
                    ("host.name", "edge-{index}"),
                ],
                group: "edge-gateways",
            },
            Kind {
                count: self.apps,
                name: "app agents",
                attrs: &[
                    ("service.name", "otelcol-agent"),
                    ("agent.role", "app"),
                    ("deployment.environment", "production"),
                    ("host.name", "app-{index}"),
                ],
                group: APP_GROUP,
            },
            Kind {
                count: self.others,
                name: "others",
                attrs: &[
                    ("service.name", "otelcol-contrib"),
                    ("agent.role", "batch"),
                    ("host.name", "batch-{index}"),
                ],
                group: "default (no other group selects them)",
            },
        ]
    }

    fn of(n: usize) -> Self {
        let gateways = (n / 9).max(1);
        let others = (n / 6).max(1);
        FleetMix {
            gateways,
            apps: n.saturating_sub(gateways + others),
            others,
        }
    }
}

/// Runs the whole tour.
pub async fn run(options: Options) -> Result<(), DemoError> {
    let workspace = Workspace::create(options.keep)?;
    let clock = Instant::now();
    println!("opamp-gitops demo: a config repository, the controller and a simulated fleet, in one process.");
    println!("Nothing leaves this machine; the tour takes well under a minute and stops by itself.");

    step(1, "A config repository in git");
    let repo = DemoRepo::init(&workspace.repo_dir())?;
    let c1 = create_repository(&repo, &options)?;

    step(2, "The controller and a simulated fleet");
    let tour = Tour::start(&workspace, repo, options, clock).await?;
    let outcome = tour.steps(&c1).await;
    step(7, "Stopping");
    let stopped = tour.stop().await;
    outcome?;
    stopped?;
    closing(&workspace);
    Ok(())
}

fn step(n: u32, title: &str) {
    println!("\n[{n}/7] {title}");
    println!("{}", "-".repeat(title.len() + 6));
}

/// Prints each line of `text` indented by `by` spaces.
fn indented(text: &str, by: usize) {
    for line in text.lines() {
        if line.trim().is_empty() {
            println!();
        } else {
            println!("{:by$}{}", "", line.trim_end());
        }
    }
}

/// Step 1: the repository, its first commit, and its validation.
fn create_repository(repo: &DemoRepo, options: &Options) -> Result<CommitId, DemoError> {
    println!("The source of truth is a git repository, created at");
    println!("  {}", repo.dir().display());
    println!("It holds rollout defaults, three groups of collectors, and their configs:");
    let files = files::initial(options.bake);
    for (path, body) in &files {
        let what = match *path {
            "fleet.yaml" => "rollout defaults: waves [1, 25%, 100%], short bakes for the demo",
            "groups/edge-gateways.yaml" => "gateways (service.name otelcol-gateway, production)",
            "groups/app-agents.yaml" => "agents next to the apps (service.name otelcol-agent, agent.role app)",
            "groups/default.yaml" => "catch-all: an empty selector, lowest priority",
            "configs/common/extensions.yaml" => "health_check and pprof, merged into every group's config",
            _ => "a collector config",
        };
        println!("  {path:<32} {:>5} bytes  {what}", body.len());
    }
    let c1 = repo.commit(&files, "Fleet config: edge gateways, app agents and a catch-all")?;
    println!(
        "Committed {}. `opamp-gitops validate --rev HEAD` checks the commit the way the",
        c1.short()
    );
    println!("controller will before it rolls anything out; its output:");
    let state = load_commit(repo, &c1)?;
    indented(&desired::summary::summary(&state), 4);
    Ok(c1)
}

/// The desired state at `commit`, as the controller will load it.
fn load_commit(repo: &DemoRepo, commit: &CommitId) -> Result<DesiredState, DemoError> {
    let source = TreeSource::open(repo.dir(), commit.as_str(), None).map_err(|e| DemoError::Invalid {
        commit: commit.clone(),
        problems: e.to_string(),
    })?;
    desired::load(&source, Some(commit.clone())).map_err(|e| {
        let problems = match &e {
            LoadErrors::Invalid(d) => d.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"),
            LoadErrors::Source(s) => s.to_string(),
        };
        DemoError::Invalid {
            commit: commit.clone(),
            problems,
        }
    })
}

/// Every config hash each agent ever reported, so the tour can show which
/// agents a config reached (and which it never did).
#[derive(Clone, Default)]
struct Reports(Arc<Mutex<HashMap<InstanceUid, Vec<ConfigHash>>>>);

impl Reports {
    fn watch(fleet: &FleetHandle, stop: CancellationToken) -> Self {
        let reports = Reports::default();
        let mut rx = fleet.subscribe();
        let seen = reports.0.clone();
        tokio::spawn(async move {
            loop {
                let snap = rx.borrow_and_update().clone();
                {
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    for (uid, rec) in &snap.agents {
                        if let Some(hash) = rec.remote_config_status.as_ref().and_then(|s| s.hash) {
                            let hashes = seen.entry(uid.clone()).or_default();
                            if !hashes.contains(&hash) {
                                hashes.push(hash);
                            }
                        }
                    }
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    () = stop.cancelled() => return,
                }
            }
        });
        reports
    }

    fn received(&self, uid: &InstanceUid, hash: &ConfigHash) -> bool {
        let seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(uid).is_some_and(|h| h.contains(hash))
    }
}

/// The running parts of the tour.
struct Tour {
    options: Options,
    clock: Instant,
    repo: DemoRepo,
    running: Running,
    driver: DriverHandle,
    git: GitHandle,
    sims: Vec<Simulation>,
    agents_stop: CancellationToken,
    reports: Reports,
}

impl Tour {
    /// Step 2, first half: the controller and the simulated collectors.
    async fn start(workspace: &Workspace, repo: DemoRepo, options: Options, clock: Instant) -> Result<Tour, DemoError> {
        let mut config = ServeConfig::local();
        config.git = Some(GitConfig {
            repo: RepoLocation::Local(repo.dir().to_path_buf()),
            branch: None,
            subdir: None,
            state_dir: workspace.state_dir(),
            poll_interval: Duration::from_secs(3600),
            auth: Auth::default(),
            webhook_secret_file: None,
        });
        config.reconcile_tick = RECONCILE_TICK;
        config.startup_grace = STARTUP_GRACE;
        let running = app::start(config, CancellationToken::new()).await?;
        let (Some(driver), Some(git)) = (running.driver.clone(), running.git.clone()) else {
            running.stop().await?;
            return Err(DemoError::Unexpected {
                expected: "the controller to follow the repository".into(),
                found: "it started without one".into(),
            });
        };
        let opamp = format!("ws://{}/v1/opamp", running.opamp_addr);
        let api = format!("http://{}", running.api_addr);
        println!("The controller runs in this process, following the repository's committed tree:");
        println!("  OpAMP  {opamp}   (WebSocket and plain HTTP)");
        println!("  API    {api}   try, while the tour runs:");
        println!("           curl -s {api}/api/v1/groups");
        println!("           curl -s {api}/api/v1/agents");

        let mix = FleetMix::of(options.agents);
        println!(
            "{} simulated collectors connect over WebSocket; each behaves like the OpAMP supervisor:",
            options.agents
        );
        let agents_stop = CancellationToken::new();
        let reports = Reports::watch(&running.fleet, agents_stop.clone());
        let mut sims = Vec::new();
        for kind in mix.kinds() {
            let shown: Vec<String> = kind.attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "  {:>3} {:<11} {}  -> {}",
                kind.count,
                kind.name,
                shown.join(" "),
                kind.group
            );
            let mut c = simulate::Config::new(opamp.clone(), kind.count);
            c.attrs = kind.attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            c.fail_if_contains = Some(REFUSED_TEXT.to_string());
            c.apply_delay = APPLY_DELAY;
            match simulate::start(c, agents_stop.clone()) {
                Ok(sim) => sims.push(sim),
                Err(e) => {
                    agents_stop.cancel();
                    running.stop().await?;
                    return Err(e.into());
                }
            }
        }
        println!("They refuse any config containing {REFUSED_TEXT:?} (a misspelt setting a real collector rejects).");
        println!("Like the real supervisor, each is unhealthy for a moment after it starts and after every new");
        println!("config, and reports APPLIED only once its collector is healthy. The controller judges that");
        println!("fairly: an agent's apply clock starts when the config reaches it (an HTTP agent only gets it");
        println!("at its next poll), unhealthy spells shorter than `unhealthy_grace` are not failures, and an");
        println!("agent still APPLYING after a restart gets its config once more before it counts as failed.");
        Ok(Tour {
            options,
            clock,
            repo,
            running,
            driver,
            git,
            sims,
            agents_stop,
            reports,
        })
    }

    /// Prints a line stamped with the time since the tour started.
    fn say(&self, line: &str) {
        println!("  [{:>5.1}s] {line}", self.clock.elapsed().as_secs_f64());
    }

    fn status(&self) -> Arc<DriverStatus> {
        self.driver.status()
    }

    /// Polls `check` until it answers, or fails after `within` with the
    /// controller's group table as what was seen.
    async fn wait_for<T>(
        &self,
        within: Duration,
        expected: &str,
        mut check: impl FnMut(&Tour) -> Option<T>,
    ) -> Result<T, DemoError> {
        let seen = || {
            let s = self.status();
            format!(
                "commit {}\n{}{}",
                s.commit.as_ref().map_or("-", |c| c.short()),
                group_table(&s),
                agent_line(&s.agents_by_state)
            )
        };
        poll_until(within, expected, || check(self), seen).await
    }

    /// How long a rollout under `policy` may take at most, with slack.
    fn rollout_deadline(policy: &RolloutPolicy) -> Duration {
        let waves = u32::try_from(policy.waves.len()).unwrap_or(u32::MAX);
        (policy.bake + policy.apply_timeout) * waves + SLACK
    }

    /// Asks the controller to fetch now (it also notices commits by itself)
    /// and checks it reached `commit`.
    async fn sync(&self, commit: &CommitId) -> Result<(), DemoError> {
        let outcome = self.git.sync().await?;
        if outcome.commit != *commit || !outcome.valid {
            return Err(DemoError::Unexpected {
                expected: format!("the controller to load {commit}"),
                found: format!(
                    "it reached {} (valid: {}) {}",
                    outcome.commit,
                    outcome.valid,
                    outcome.errors.join("; ")
                ),
            });
        }
        Ok(())
    }

    /// Steps 2 (the wait) to 6.
    async fn steps(&self, c1: &CommitId) -> Result<(), DemoError> {
        let first = load_commit(&self.repo, c1)?;
        self.first_rollout(c1, &first).await?;
        let app = first
            .groups
            .get(&GroupName::new(APP_GROUP))
            .ok_or_else(|| DemoError::Unexpected {
                expected: format!("a group {APP_GROUP}"),
                found: "the repository has none".into(),
            })?;
        let (c2, good) = self.change(app.config.hash()).await?;
        let c3 = self.broken_change(good).await?;
        let c4 = self.revert(&c3, good).await?;
        self.audit_trail(&[
            (c1, Phase::Complete),
            (&c2, Phase::Complete),
            (&c3, Phase::Halted),
            (&c4, Phase::Complete),
        ])
        .await
    }

    /// Step 2, second half: every agent connects and the first commit reaches all of them.
    async fn first_rollout(&self, c1: &CommitId, state: &DesiredState) -> Result<(), DemoError> {
        let n = self.options.agents;
        self.wait_for(SLACK, &format!("{n} agents connected"), |t| {
            let snap = t.running.fleet.snapshot();
            (snap.agents.values().filter(|r| r.connected).count() >= n).then_some(())
        })
        .await?;
        self.say(&format!("{n} agents connected"));
        println!("  The first commit rolls out like any change: each group in its own waves, every");
        println!(
            "  wave baking {} before the next opens.",
            humantime::format_duration(self.options.bake)
        );
        let slowest = state.groups.values().map(|g| Self::rollout_deadline(&g.rollout)).max();
        let groups = state.groups.len();
        self.wait_for(
            slowest.unwrap_or(SLACK),
            "every group complete on the first commit with every agent in sync",
            |t| {
                let s = t.status();
                let complete = s.commit.as_ref() == Some(c1)
                    && s.groups.len() == groups
                    && s.groups.values().all(|g| g.phase == Phase::Complete);
                let in_sync = s.agents_by_state.get(&AgentState::InSync).copied().unwrap_or(0);
                (complete && in_sync == n as u64).then_some(())
            },
        )
        .await?;
        self.say("every group complete, every agent in sync:");
        self.table();
        Ok(())
    }

    fn table(&self) {
        let s = self.status();
        indented(&group_table(&s), 4);
        println!("    {}", agent_line(&s.agents_by_state));
    }

    /// Step 3: a change to the app agents, rolled out wave by wave.
    async fn change(&self, before: ConfigHash) -> Result<(CommitId, ConfigHash), DemoError> {
        step(3, "A change, rolled out in canary waves");
        let old = files::initial(self.options.bake)
            .into_iter()
            .find(|(p, _)| *p == APP_CONFIG)
            .map(|(_, b)| b)
            .unwrap_or_default();
        let new = files::app_batch_change().map_err(DemoError::Edit)?;
        println!("An engineer merges a change to the app agents' batching:");
        print_diff(&old, &new);
        let c2 = self
            .repo
            .commit(&[(APP_CONFIG, new)], "app-agents: send larger batches every second")?;
        let (hash, policy) = self.loaded_group(&c2)?;
        println!(
            "Commit {} changes {APP_GROUP} from config {} to {}; the other groups are unchanged.",
            c2.short(),
            short(&before),
            short(&hash)
        );
        self.sync(&c2).await?;
        self.say(&format!("the controller loaded {}; the rollout starts", c2.short()));
        let mut tracker = WaveTracker::new(&policy.waves, policy.bake);
        self.wait_for(
            Self::rollout_deadline(&policy),
            "the change complete on every app agent",
            |t| {
                let s = t.status();
                let g = group(&s, APP_GROUP).filter(|g| g.commit.as_ref() == Some(&c2))?;
                for line in tracker.update(g) {
                    t.say(&line);
                }
                if g.phase == Phase::Halted {
                    return Some(Err(DemoError::Unexpected {
                        expected: "the change to complete".into(),
                        found: format!("it halted: {:?}", g.failures),
                    }));
                }
                (g.phase == Phase::Complete).then_some(Ok(()))
            },
        )
        .await??;
        self.table();
        Ok((c2, hash))
    }

    /// The app group's config hash and rollout policy at `commit`.
    fn loaded_group(&self, commit: &CommitId) -> Result<(ConfigHash, RolloutPolicy), DemoError> {
        let state = load_commit(&self.repo, commit)?;
        let g = state
            .groups
            .get(&GroupName::new(APP_GROUP))
            .ok_or_else(|| DemoError::Unexpected {
                expected: format!("a group {APP_GROUP} at {commit}"),
                found: "there is none".into(),
            })?;
        Ok((g.config.hash(), g.rollout.clone()))
    }

    /// Step 4: a config the collectors refuse halts at the canary, which is rolled back.
    async fn broken_change(&self, good: ConfigHash) -> Result<CommitId, DemoError> {
        step(4, "A broken change: the canary fails, the rollout halts");
        let old = files::app_batch_change().map_err(DemoError::Edit)?;
        let new = files::app_broken_change().map_err(DemoError::Edit)?;
        println!("Next, a change with a typo (num_consumer for num_consumers):");
        print_diff(&old, &new);
        let c3 = self.repo.commit(
            &[(APP_CONFIG, new)],
            "app-agents: four queue consumers for the gateway exporter",
        )?;
        let (bad, policy) = self.loaded_group(&c3)?;
        println!(
            "Commit {} passes validation (it checks structure and references, not every component's",
            c3.short()
        );
        println!("settings), so the controller rolls it out; the collectors will refuse it.");
        self.sync(&c3).await?;
        self.say(&format!("the controller loaded {}; the rollout starts", c3.short()));
        let mut tracker = WaveTracker::new(&policy.waves, policy.bake);
        let halted = self
            .wait_for(policy.apply_timeout + SLACK, "the rollout to halt at the canary", |t| {
                let s = t.status();
                let g = group(&s, APP_GROUP).filter(|g| g.commit.as_ref() == Some(&c3))?;
                for line in tracker.update(g) {
                    t.say(&line);
                }
                match g.phase {
                    Phase::Halted => Some(Ok(g.clone())),
                    Phase::Complete => Some(Err(DemoError::Unexpected {
                        expected: "the broken change to halt".into(),
                        found: "it completed".into(),
                    })),
                    _ => None,
                }
            })
            .await??;
        let Some(failure) = halted.failures.first() else {
            return Err(DemoError::Unexpected {
                expected: "a failure in the halted rollout".into(),
                found: "none is listed".into(),
            });
        };
        let canary = failure.agent.clone();
        let host = self.host_name(&canary);
        self.say(&format!("canary {host} ({canary}) reported FAILED:"));
        for line in failure.error.lines() {
            println!("             {line}");
        }
        self.say(&format!(
            "rollout halted at wave {}/{}: max_failures is 0, so no further wave opens",
            halted.wave, halted.waves
        ));
        if halted.wave != 1 {
            return Err(DemoError::Unexpected {
                expected: "the halt at wave 1".into(),
                found: format!("it halted at wave {}", halted.wave),
            });
        }
        self.wait_for(
            policy.apply_timeout + SLACK,
            "the canary rolled back to the last good config",
            |t| {
                let snap = t.running.fleet.snapshot();
                let status = snap.get(&canary)?.remote_config_status.as_ref()?;
                (status.hash == Some(good) && status.state == RemoteConfigState::Applied).then_some(())
            },
        )
        .await?;
        self.say(&format!(
            "canary {host} rolled back: it runs {} again (on_failure: rollback)",
            short(&good)
        ));

        // Give the rollout a full bake and more to misbehave: it must stay put.
        tokio::time::sleep(policy.bake + Duration::from_millis(500)).await;
        let s = self.status();
        let still = group(&s, APP_GROUP).map(|g| (g.phase, g.wave));
        if still != Some((Phase::Halted, 1)) {
            return Err(DemoError::Unexpected {
                expected: "the rollout to stay halted at wave 1".into(),
                found: format!("it is now {still:?}"),
            });
        }
        let members: Vec<InstanceUid> = self
            .running
            .assignments
            .borrow()
            .iter()
            .filter(|a| a.group.as_ref().is_some_and(|g| g.as_str() == APP_GROUP) && a.uid != canary)
            .map(|a| a.uid.clone())
            .collect();
        let reached: Vec<&InstanceUid> = members.iter().filter(|u| self.reports.received(u, &bad)).collect();
        if !reached.is_empty() {
            return Err(DemoError::Unexpected {
                expected: "only the canary to receive the broken config".into(),
                found: format!("{} other agents received it", reached.len()),
            });
        }
        self.say(&format!(
            "{} later still halted at wave 1/{}; the other {} app agents never received {}",
            humantime::format_duration(policy.bake + Duration::from_millis(500)),
            halted.waves,
            members.len(),
            short(&bad)
        ));
        self.table();
        Ok(c3)
    }

    fn host_name(&self, uid: &InstanceUid) -> String {
        let snap = self.running.fleet.snapshot();
        snap.get(uid)
            .and_then(|r| r.description.as_ref())
            .and_then(|d| d.non_identifying.get("host.name").cloned())
            .unwrap_or_else(|| "?".to_string())
    }

    /// Step 5: `git revert` of the broken commit.
    async fn revert(&self, broken: &CommitId, good: ConfigHash) -> Result<CommitId, DemoError> {
        step(5, "git revert: back to the last good config");
        let c4 = self.repo.revert(broken)?;
        let (hash, policy) = self.loaded_group(&c4)?;
        println!(
            "Commit {} reverts {}: the {APP_GROUP} config is {} again, the last one that completed.",
            c4.short(),
            broken.short(),
            short(&hash)
        );
        if hash != good {
            return Err(DemoError::Unexpected {
                expected: format!("the revert to restore config {}", short(&good)),
                found: format!("it has {}", short(&hash)),
            });
        }
        println!("A commit back to the stable config is a revert: no waves, no bake, every agent at once.");
        let sent = Instant::now();
        self.sync(&c4).await?;
        self.say(&format!("the controller loaded {}", c4.short()));
        let done = self
            .wait_for(policy.apply_timeout + SLACK, "the revert complete", |t| {
                let s = t.status();
                let g = group(&s, APP_GROUP).filter(|g| g.commit.as_ref() == Some(&c4))?;
                (g.phase == Phase::Complete).then(|| g.clone())
            })
            .await?;
        self.say(&format!(
            "revert complete in {:.1}s: wave {}/{}, {}/{} agents run {}, {} failed",
            sent.elapsed().as_secs_f64(),
            done.wave,
            done.waves,
            done.agents.applied,
            done.agents.targeted,
            short(&done.config_hash),
            done.agents.failed
        ));
        println!("  The canary was rolled back in step 4 and the others never left the good config, so");
        println!("  no push was needed: the halted rollout is over and every agent is in sync. With");
        println!("  on_failure: hold, or a failure in a later wave, every affected agent would get it now.");
        self.table();
        Ok(c4)
    }

    /// Step 6: the notes history and one full note.
    async fn audit_trail(&self, expected: &[(&CommitId, Phase)]) -> Result<(), DemoError> {
        step(6, "The audit trail: git notes");
        let store = NotesStore::new(self.repo.dir(), None, Author::default());
        let app = GroupName::new(APP_GROUP);
        let what = expected
            .iter()
            .map(|(c, p)| format!("{} {}", c.short(), p.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        self.wait_for(SLACK, &format!("notes on every commit ({what})"), |_| {
            expected
                .iter()
                .all(|(commit, phase)| {
                    let note = store.read(commit).ok().flatten().and_then(|t| Note::parse(&t).ok());
                    note.is_some_and(|n| n.groups.get(&app).is_some_and(|g| g.phase == *phase))
                })
                .then_some(())
        })
        .await?;
        println!("The controller wrote each commit's outcome into the repository as a git note");
        println!("(refs/notes/opamp-gitops). `opamp-gitops status --repo <dir>` reads them back:");
        let history = store.history("HEAD", 10)?;
        indented(
            &crate::notes::status::render_text(&crate::notes::status::collect(history)),
            4,
        );
        let (broken, _) = expected
            .iter()
            .find(|(_, p)| *p == Phase::Halted)
            .ok_or_else(|| DemoError::Unexpected {
                expected: "a halted commit in the tour".into(),
                found: "none".into(),
            })?;
        println!("The broken commit, as `git log --notes=opamp-gitops` shows it:");
        indented(&self.repo.log_with_note(broken)?, 4);
        Ok(())
    }

    /// Step 7: agents say goodbye, then the controller shuts down in order.
    async fn stop(self) -> Result<(), DemoError> {
        let started = Instant::now();
        self.agents_stop.cancel();
        for sim in self.sims {
            let _ = tokio::time::timeout(STOP_DEADLINE, sim.wait()).await;
        }
        match tokio::time::timeout(STOP_DEADLINE, self.running.stop()).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(DemoError::Timeout {
                    expected: "the controller to stop".into(),
                    after: STOP_DEADLINE,
                    seen: "it was still shutting down".into(),
                });
            }
        }
        println!(
            "  [{:>5.1}s] {} agents disconnected and the controller stopped in {:.1}s",
            self.clock.elapsed().as_secs_f64(),
            self.options.agents,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// Calls `check` every 50 ms until it answers; after `within`, a timeout
/// naming what was expected and what `seen` says was there instead.
async fn poll_until<T>(
    within: Duration,
    expected: &str,
    mut check: impl FnMut() -> Option<T>,
    seen: impl FnOnce() -> String,
) -> Result<T, DemoError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(t) = check() {
            return Ok(t);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DemoError::Timeout {
                expected: expected.to_string(),
                after: within,
                seen: seen(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A unified diff of the app agents' config, indented.
fn print_diff(old: &str, new: &str) {
    let diff = similar::TextDiff::from_lines(old, new);
    let text = diff
        .unified_diff()
        .context_radius(1)
        .header(&format!("a/{APP_CONFIG}"), &format!("b/{APP_CONFIG}"))
        .to_string();
    indented(&text, 4);
}

/// Where the repository went, and how to run the real thing.
fn closing(workspace: &Workspace) {
    let repo = workspace.repo_dir();
    if workspace.keep() {
        println!("The repository is kept at {}; look around:", repo.display());
        println!("  opamp-gitops status --repo {}", repo.display());
        println!("  git -C {} log --notes=opamp-gitops", repo.display());
    } else {
        println!(
            "The temporary directory {} is removed (run with --keep to keep it).",
            workspace.root().display()
        );
    }
    println!("\nRun the real thing:");
    for (cmd, what) in [
        ("opamp-gitops validate PATH", "check a repository before you commit"),
        (
            "opamp-gitops serve --repo URL|PATH",
            "the controller: OpAMP on :4320, API on 127.0.0.1:4321",
        ),
        (
            "opamp-gitops simulate --server ws://127.0.0.1:4320/v1/opamp --agents 100",
            "simulated collectors",
        ),
        (
            "opamp-gitops plan --repo PATH --server http://127.0.0.1:4321",
            "what a commit would do to the fleet",
        ),
        ("opamp-gitops status --repo PATH", "rollout history, from the notes"),
    ] {
        println!("  {cmd}\n      {what}");
    }
    println!("See docs/demo.md for what the tour showed and where to read more.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_its_deadline_saying_what_was_expected() {
        let mut polls = 0;
        let err = poll_until(
            Duration::from_secs(10),
            "the rollout to halt",
            || {
                polls += 1;
                None::<()>
            },
            || "phase progressing".to_string(),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "expected the rollout to halt within 10s; it did not happen.\nLast seen:\nphase progressing"
        );
        assert!((200..=202).contains(&polls), "{polls} polls");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_answers_once_the_condition_holds() {
        let mut polls = 0;
        let got = poll_until(
            Duration::from_secs(10),
            "three polls",
            || {
                polls += 1;
                (polls == 3).then_some(polls)
            },
            String::new,
        )
        .await
        .unwrap();
        assert_eq!(got, 3);
    }

    #[test]
    fn the_fleet_mix_adds_up() {
        for n in [MIN_AGENTS, 12, 36, 1000] {
            let m = FleetMix::of(n);
            assert_eq!(m.gateways + m.apps + m.others, n);
            assert!(m.gateways >= 1 && m.others >= 1 && m.apps >= m.gateways, "{m:?}");
        }
        let m = FleetMix::of(36);
        assert_eq!((m.gateways, m.apps, m.others), (4, 26, 6));
    }
}
