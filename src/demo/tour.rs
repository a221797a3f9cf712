//! The tour's orchestration: the repository's commits, the controller and
//! the simulated collectors, and the checks that each step did what it
//! should. It waits on what the controller publishes (`wait.rs`) and hands
//! what happened to the narrator (`narrate.rs`), which does all the printing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::files::{self, APP_CONFIG, APP_GROUP, REFUSED_TEXT};
use super::narrate::{KindShown, Narrator};
use super::progress::{WaveTracker, agent_line, group, group_table, short};
use super::repo::{DemoRepo, Workspace};
use super::wait::Published;
use super::{DemoError, Options};
use crate::app::{self, Running, ServeConfig};
use crate::desired::{self, DesiredState, LoadErrors, RolloutPolicy};
use crate::driver::{DriverHandle, DriverStatus};
use crate::fleet::{FleetHandle, RemoteConfigState};
use crate::gitsrc::notes::{Author, NotesStore};
use crate::gitsrc::tree::TreeSource;
use crate::gitsrc::{Auth, GitConfig, GitHandle, RepoLocation};
use crate::model::{AgentState, CommitId, ConfigHash, GroupName, InstanceUid};
use crate::notes::format::Note;
use crate::reconcile::Phase;
use crate::simulate::{self, Simulation};

/// How long a simulated collector takes to apply a config.
const APPLY_DELAY: Duration = Duration::from_millis(200);
/// The controller plans at least this often. Plans come with every change
/// and deadline anyway; the tour shows that a halted rollout stays halted
/// by waiting for plans after its bake would have ended.
const RECONCILE_TICK: Duration = Duration::from_millis(100);
/// The controller waits this long after start before its first plan, so the
/// first rollout counts every agent.
const STARTUP_GRACE: Duration = Duration::from_secs(1);
/// Slack added to every deadline derived from the rollout policy.
const SLACK: Duration = Duration::from_secs(15);
/// How long stopping may take.
const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// How long the broken rollout is watched, past its bake, for a wave it must not open.
const HALT_WATCH: Duration = Duration::from_millis(500);

/// How many simulated collectors of each kind.
#[derive(Debug, Clone, Copy)]
pub(super) struct FleetMix {
    pub gateways: usize,
    pub apps: usize,
    pub others: usize,
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

    pub fn of(n: usize) -> Self {
        let gateways = (n / 9).max(1);
        let others = (n / 6).max(1);
        FleetMix {
            gateways,
            apps: n.saturating_sub(gateways + others),
            others,
        }
    }
}

/// Step 1: the repository, its first commit, and its validation.
pub fn create_repository(repo: &DemoRepo, options: &Options, story: Narrator) -> Result<CommitId, DemoError> {
    let files = files::initial(options.bake);
    story.repository(repo.dir(), &files);
    let c1 = repo.commit(&files, "Fleet config: edge gateways, app agents and a catch-all")?;
    let state = load_commit(repo, &c1)?;
    story.validated(&c1, &desired::summary::summary(&state));
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

/// The app group's config hash and rollout policy in `state` (at `commit`).
fn app_group(state: &DesiredState, commit: &CommitId) -> Result<(ConfigHash, RolloutPolicy), DemoError> {
    let g = state
        .groups
        .get(&GroupName::new(APP_GROUP))
        .ok_or_else(|| DemoError::Unexpected {
            expected: format!("a group {APP_GROUP} at {commit}"),
            found: "there is none".into(),
        })?;
    Ok((g.config.hash(), g.rollout.clone()))
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
pub struct Tour {
    options: Options,
    story: Narrator,
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
    pub async fn start(
        workspace: &Workspace,
        repo: DemoRepo,
        options: Options,
        story: Narrator,
    ) -> Result<Tour, DemoError> {
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
        config.reconcile_tick = Some(RECONCILE_TICK);
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
        story.controller(&opamp, &format!("http://{}", running.api_addr));

        let kinds = FleetMix::of(options.agents).kinds();
        let shown: Vec<KindShown<'_>> = kinds
            .iter()
            .map(|k| KindShown {
                count: k.count,
                name: k.name,
                attrs: k.attrs,
                group: k.group,
            })
            .collect();
        story.fleet(options.agents, &shown);
        let agents_stop = CancellationToken::new();
        let reports = Reports::watch(&running.fleet, agents_stop.clone());
        let mut sims = Vec::new();
        for kind in &kinds {
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
        Ok(Tour {
            options,
            story,
            repo,
            running,
            driver,
            git,
            sims,
            agents_stop,
            reports,
        })
    }

    fn status(&self) -> Arc<DriverStatus> {
        self.driver.status()
    }

    fn published(&self) -> Published {
        Published::new(self.driver.subscribe(), self.running.fleet.subscribe())
    }

    /// What the controller shows now: its commit, the group table and the agents by state.
    fn seen(&self) -> String {
        let s = self.status();
        format!(
            "commit {}\n{}{}",
            s.commit.as_ref().map_or("-", |c| c.short()),
            group_table(&s),
            agent_line(&s.agents_by_state)
        )
    }

    /// Waits until `check` answers, looking again whenever the controller
    /// publishes; fails after `within` with the group table as what was seen.
    async fn wait_for<T>(
        &self,
        within: Duration,
        expected: &str,
        mut check: impl FnMut(&Tour) -> Option<T>,
    ) -> Result<T, DemoError> {
        self.published()
            .until(within, expected, || check(self), || self.seen())
            .await
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
    pub async fn steps(&self, c1: &CommitId) -> Result<(), DemoError> {
        let first = load_commit(&self.repo, c1)?;
        self.first_rollout(c1, &first).await?;
        let (before, _) = app_group(&first, c1)?;
        let (c2, good) = self.change(before).await?;
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
        self.story.connected(n, self.options.bake);
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
        self.story.first_rollout_done(&self.status());
        Ok(())
    }

    /// Step 3: a change to the app agents, rolled out wave by wave.
    async fn change(&self, before: ConfigHash) -> Result<(CommitId, ConfigHash), DemoError> {
        self.story.step(3, "A change, rolled out in canary waves");
        let old = files::initial(self.options.bake)
            .into_iter()
            .find(|(p, _)| *p == APP_CONFIG)
            .map(|(_, b)| b)
            .unwrap_or_default();
        let new = files::app_batch_change().map_err(DemoError::Edit)?;
        self.story.change(&old, &new);
        let c2 = self
            .repo
            .commit(&[(APP_CONFIG, new)], "app-agents: send larger batches every second")?;
        let (hash, policy) = self.loaded_group(&c2)?;
        self.story.change_committed(&c2, &before, &hash);
        self.sync(&c2).await?;
        self.story.rollout_starts(&c2);
        let mut tracker = WaveTracker::new(&policy.waves, policy.bake);
        self.wait_for(
            Self::rollout_deadline(&policy),
            "the change complete on every app agent",
            |t| {
                let s = t.status();
                let g = group(&s, APP_GROUP).filter(|g| g.commit.as_ref() == Some(&c2))?;
                for line in tracker.update(g) {
                    t.story.say(&line);
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
        self.story.table(&self.status());
        Ok((c2, hash))
    }

    /// The app group's config hash and rollout policy at `commit`.
    fn loaded_group(&self, commit: &CommitId) -> Result<(ConfigHash, RolloutPolicy), DemoError> {
        app_group(&load_commit(&self.repo, commit)?, commit)
    }

    /// Step 4: a config the collectors refuse halts at the canary, which is rolled back.
    async fn broken_change(&self, good: ConfigHash) -> Result<CommitId, DemoError> {
        self.story
            .step(4, "A broken change: the canary fails, the rollout halts");
        let old = files::app_batch_change().map_err(DemoError::Edit)?;
        let new = files::app_broken_change().map_err(DemoError::Edit)?;
        self.story.broken_change(&old, &new);
        let c3 = self.repo.commit(
            &[(APP_CONFIG, new)],
            "app-agents: four queue consumers for the gateway exporter",
        )?;
        let (bad, policy) = self.loaded_group(&c3)?;
        self.story.broken_committed(&c3);
        self.sync(&c3).await?;
        self.story.rollout_starts(&c3);
        let mut tracker = WaveTracker::new(&policy.waves, policy.bake);
        let halted = self
            .wait_for(policy.apply_timeout + SLACK, "the rollout to halt at the canary", |t| {
                let s = t.status();
                let g = group(&s, APP_GROUP).filter(|g| g.commit.as_ref() == Some(&c3))?;
                for line in tracker.update(g) {
                    t.story.say(&line);
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
        self.story.halted(&host, &canary, &failure.error, &halted);
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
        self.story.rolled_back(&host, &good);

        // Give the rollout a full bake and more to misbehave: it must stay put.
        let watched = policy.bake + HALT_WATCH;
        self.published().let_pass(watched, SLACK).await?;
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
        self.story.still_halted(watched, halted.waves, members.len(), &bad);
        self.story.table(&self.status());
        Ok(c3)
    }

    fn host_name(&self, uid: &InstanceUid) -> String {
        let snap = self.running.fleet.snapshot();
        snap.get(uid)
            .and_then(|r| r.description.as_ref())
            .and_then(|d| d.non_identifying.get("host.name").map(str::to_owned))
            .unwrap_or_else(|| "?".to_string())
    }

    /// Step 5: `git revert` of the broken commit.
    async fn revert(&self, broken: &CommitId, good: ConfigHash) -> Result<CommitId, DemoError> {
        self.story.step(5, "git revert: back to the last good config");
        let c4 = self.repo.revert(broken)?;
        let (hash, policy) = self.loaded_group(&c4)?;
        self.story.revert(&c4, broken, &hash);
        if hash != good {
            return Err(DemoError::Unexpected {
                expected: format!("the revert to restore config {}", short(&good)),
                found: format!("it has {}", short(&hash)),
            });
        }
        self.story.revert_is_no_rollout();
        let sent = Instant::now();
        self.sync(&c4).await?;
        self.story.loaded(&c4);
        let done = self
            .wait_for(policy.apply_timeout + SLACK, "the revert complete", |t| {
                let s = t.status();
                let g = group(&s, APP_GROUP).filter(|g| g.commit.as_ref() == Some(&c4))?;
                (g.phase == Phase::Complete).then(|| g.clone())
            })
            .await?;
        self.story.revert_complete(sent.elapsed(), &done);
        self.story.table(&self.status());
        Ok(c4)
    }

    /// Step 6: the notes history and one full note.
    async fn audit_trail(&self, expected: &[(&CommitId, Phase)]) -> Result<(), DemoError> {
        self.story.step(6, "The audit trail: git notes");
        let store = NotesStore::new(self.repo.dir(), None, Author::default());
        let app = GroupName::new(APP_GROUP);
        let what = expected
            .iter()
            .map(|(c, p)| format!("{} {}", c.short(), p.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        // The notes writer follows the driver's plans; each plan is a moment to look.
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
        let history = store.history("HEAD", 10)?;
        self.story
            .notes(&crate::notes::status::render_text(&crate::notes::status::collect(
                history,
            )));
        let (broken, _) = expected
            .iter()
            .find(|(_, p)| *p == Phase::Halted)
            .ok_or_else(|| DemoError::Unexpected {
                expected: "a halted commit in the tour".into(),
                found: "none".into(),
            })?;
        self.story.broken_note(&self.repo.log_with_note(broken)?);
        Ok(())
    }

    /// Step 7: agents say goodbye, then the controller shuts down in order.
    pub async fn stop(self) -> Result<(), DemoError> {
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
        self.story.stopped(self.options.agents, started.elapsed());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleet_mix_adds_up() {
        for n in [super::super::MIN_AGENTS, 12, 36, 1000] {
            let m = FleetMix::of(n);
            assert_eq!(m.gateways + m.apps + m.others, n);
            assert!(m.gateways >= 1 && m.others >= 1 && m.apps >= m.gateways, "{m:?}");
        }
        let m = FleetMix::of(36);
        assert_eq!((m.gateways, m.apps, m.others), (4, 26, 6));
    }
}
