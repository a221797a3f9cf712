//! The plan of one commit, computed from plain data: which groups it
//! changes against their stable config, the file diffs, the waves each change
//! would reach in the canary order the controller uses, and what a reviewer
//! should look at twice. Pure: no git, no network, no clock.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::fleet::FleetAgent;
pub use crate::desired::diff::unified_diff;
use crate::desired::summary::amount;
use crate::desired::{ConfigBundle, ConfigFile, DesiredState, Group, RolloutPolicy};
use crate::model::{CommitId, ConfigHash, GroupName, InstanceUid};
pub use crate::reconcile::Change;
use crate::reconcile::{AgentView, Matcher, rollout_members, wave_cuts};

/// Where a group's stable config was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselineSource {
    /// The newest ancestor whose note says the group's rollout is complete.
    Note,
    /// The commit's first parent (the newest valid one).
    FirstParent,
    /// The commit given with `--base`.
    Base,
}

/// A group's stable config: what its agents run once earlier rollouts are done.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    pub commit: CommitId,
    pub source: BaselineSource,
    pub config: Arc<ConfigBundle>,
    /// Config file key to repository path, as the group's file names them.
    pub paths: BTreeMap<String, String>,
}

/// Everything a plan is computed from.
pub struct Inputs<'a> {
    /// The desired state at the commit being planned.
    pub target: &'a DesiredState,
    /// The state compared against for reverts, removed groups and agents that
    /// change group: the first parent (or `--base`); `None` when there is no
    /// earlier valid commit.
    pub previous: Option<&'a DesiredState>,
    /// Per group of `target` that has one.
    pub stable: &'a BTreeMap<GroupName, Baseline>,
    pub agents: &'a [FleetAgent],
}

/// What the commit was compared with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BaseInfo {
    /// `first_parent`, or `base` when `--base` was given.
    pub kind: BaselineSource,
    /// `--base` as given.
    pub rev: Option<String>,
    /// The valid commit compared with; `None` when there is none.
    pub commit: Option<CommitId>,
}

/// The plan, as `--format json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub commit: CommitId,
    pub base: BaseInfo,
    pub fleet: FleetCounts,
    /// Every group of the commit, by name.
    pub groups: Vec<GroupPlan>,
    /// Groups the commit removes (present in the previous state only).
    pub removed: Vec<RemovedGroup>,
    pub callouts: Callouts,
    /// Things found along the way that do not stop the plan (unreadable notes...).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FleetCounts {
    pub agents: usize,
    pub connected: usize,
    pub offline: usize,
    pub unmanaged: usize,
    pub unsupported: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StableRef {
    pub commit: CommitId,
    pub source: BaselineSource,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupPlan {
    pub name: GroupName,
    pub change: Change,
    pub config_hash: ConfigHash,
    pub stable_config_hash: Option<ConfigHash>,
    pub stable: Option<StableRef>,
    /// The config at the previous commit, when it differs from stable (a
    /// rollout of an earlier commit has not completed).
    pub previous_config_hash: Option<ConfigHash>,
    pub rollout: PolicyView,
    pub agents: GroupCounts,
    /// Each file of the group against the stable one; empty when unchanged.
    pub files: Vec<FileChange>,
    /// The waves of the rollout, in order; empty when unchanged. A revert has
    /// one wave holding every member.
    pub waves: Vec<Wave>,
    /// Agents of the group that are not connected: not counted in the waves;
    /// they get the config when they return.
    pub offline: Vec<AgentRef>,
    /// Agents of the group whose config the controller cannot manage (without
    /// AcceptsRemoteConfig or ReportsRemoteConfig): never pushed to.
    pub unsupported: Vec<AgentRef>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GroupCounts {
    /// The rollout's members: connected agents whose config the controller manages.
    pub members: usize,
    pub offline: usize,
    pub unsupported: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyView {
    pub waves: Vec<String>,
    pub bake: String,
    pub apply_timeout: String,
    pub max_failures: String,
    pub on_failure: &'static str,
}

impl PolicyView {
    pub fn of(p: &RolloutPolicy) -> Self {
        PolicyView {
            waves: p.waves.iter().map(|a| amount(*a)).collect(),
            bake: humantime::format_duration(p.bake).to_string(),
            apply_timeout: humantime::format_duration(p.apply_timeout).to_string(),
            max_failures: amount(p.max_failures),
            on_failure: p.on_failure.as_str(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    Added,
    Removed,
    Modified,
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileChange {
    /// The key in the agent's config map (`""` is the main file).
    pub key: String,
    pub status: FileStatus,
    pub old_path: Option<String>,
    pub new_path: Option<String>,
    pub old_content_type: Option<String>,
    pub new_content_type: Option<String>,
    /// A unified diff of the bodies; empty when they are equal.
    pub diff: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Wave {
    /// 1-based.
    pub number: usize,
    /// The policy's target (`1`, `10%`), or `all` for a revert.
    pub target: String,
    /// Members covered once this wave opens (cumulative).
    pub cumulative: usize,
    /// The members this wave adds, in canary order.
    pub agents: Vec<AgentRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentRef {
    pub uid: InstanceUid,
    pub host: Option<String>,
}

impl AgentRef {
    fn of(a: &AgentView) -> Self {
        AgentRef {
            uid: a.uid.clone(),
            host: a.attributes.attribute("host.name").map(str::to_owned),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemovedGroup {
    pub name: GroupName,
    pub config_hash: ConfigHash,
    /// Agents it held in the previous state (they join another group or
    /// become unmanaged; see `callouts.moved`).
    pub agents: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Callouts {
    /// Agents several groups select; the winner (priority, then name) takes them.
    pub multiple_matches: Vec<MultipleMatch>,
    /// Groups that hold no agent.
    pub groups_without_agents: Vec<EmptyGroup>,
    /// Agents no group selects: listed, never pushed to.
    pub unmanaged: Vec<AgentRef>,
    /// Agents whose group differs from the previous state: they get their new
    /// group's config even when neither group's config changed.
    pub moved: Vec<Moved>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MultipleMatch {
    pub agent: AgentRef,
    pub winner: GroupName,
    /// The other matching groups, best ranked first.
    pub losers: Vec<GroupName>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EmptyGroup {
    pub group: GroupName,
    /// Agents its selector matches, all taken by higher-ranked groups (0: it
    /// selects no agent at all).
    pub matched: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Moved {
    pub agent: AgentRef,
    pub from: Option<GroupName>,
    pub to: Option<GroupName>,
}

/// Each agent's group (by index into `agents`), as the controller decides it.
fn winners<'s>(matcher: &Matcher<'s>, agents: &[AgentView]) -> Vec<Option<&'s GroupName>> {
    agents.iter().map(|a| matcher.group_of(a).map(|g| &g.name)).collect()
}

pub fn build(inputs: &Inputs<'_>, base: BaseInfo, warnings: Vec<String>) -> Report {
    let Inputs {
        target,
        previous,
        stable,
        agents,
    } = *inputs;
    let agents: Vec<AgentView> = agents.iter().map(FleetAgent::view).collect();
    let matcher = Matcher::new(target);
    let won = winners(&matcher, &agents);

    let mut fleet = FleetCounts {
        agents: agents.len(),
        ..Default::default()
    };
    let mut callouts = Callouts::default();
    let mut by_group: BTreeMap<&GroupName, Vec<&AgentView>> = BTreeMap::new();
    let mut matched: BTreeMap<&GroupName, usize> = BTreeMap::new();
    for (agent, group) in agents.iter().zip(&won) {
        if agent.connected {
            fleet.connected += 1;
        } else {
            fleet.offline += 1;
        }
        if !agent.supported() {
            fleet.unsupported += 1;
        }
        let matching: Vec<&GroupName> = matcher.matching(agent).map(|g| &g.name).collect();
        for g in &matching {
            *matched.entry(g).or_default() += 1;
        }
        match group {
            Some(g) => {
                by_group.entry(g).or_default().push(agent);
                if matching.len() > 1 {
                    callouts.multiple_matches.push(MultipleMatch {
                        agent: AgentRef::of(agent),
                        winner: (*g).clone(),
                        losers: matching.iter().filter(|m| **m != *g).map(|m| (*m).clone()).collect(),
                    });
                }
            }
            None => {
                fleet.unmanaged += 1;
                callouts.unmanaged.push(AgentRef::of(agent));
            }
        }
    }

    let mut groups = Vec::with_capacity(target.groups.len());
    for (name, group) in &target.groups {
        let members = by_group.get(name).map(Vec::as_slice).unwrap_or_default();
        if members.is_empty() {
            callouts.groups_without_agents.push(EmptyGroup {
                group: name.clone(),
                matched: matched.get(name).copied().unwrap_or(0),
            });
        }
        let previous_group = previous.and_then(|p| p.groups.get(name));
        groups.push(plan_group(
            group,
            stable.get(name),
            previous_group.map(|g| g.config.hash()),
            members,
        ));
    }

    let mut removed = Vec::new();
    if let Some(previous) = previous {
        let before = winners(&Matcher::new(previous), &agents);
        for (name, group) in &previous.groups {
            if !target.groups.contains_key(name) {
                removed.push(RemovedGroup {
                    name: name.clone(),
                    config_hash: group.config.hash(),
                    agents: before.iter().filter(|g| **g == Some(name)).count(),
                });
            }
        }
        for ((agent, from), to) in agents.iter().zip(before).zip(&won) {
            if from != *to {
                callouts.moved.push(Moved {
                    agent: AgentRef::of(agent),
                    from: from.cloned(),
                    to: to.cloned(),
                });
            }
        }
    }

    Report {
        commit: target.commit.clone().unwrap_or_else(|| CommitId::new("")),
        base,
        fleet,
        groups,
        removed,
        callouts,
        warnings,
    }
}

/// One group: its change against stable, the diffs and the waves.
fn plan_group(
    group: &Group,
    stable: Option<&Baseline>,
    previous_hash: Option<ConfigHash>,
    agents: &[&AgentView],
) -> GroupPlan {
    let hash = group.config.hash();
    let stable_hash = stable.map(|s| s.config.hash());
    // The previous commit's config is the one the controller is delivering
    // (or has delivered): a commit that does not touch the group starts no
    // rollout, even when an earlier commit's rollout has not completed.
    let change = Change::of(hash, previous_hash, stable_hash);

    let members: Vec<&AgentView> = rollout_members(&group.name, agents.iter().copied())
        .into_iter()
        .map(|n| agents[n])
        .collect();
    let unsupported: Vec<AgentRef> = agents
        .iter()
        .filter(|a| !a.supported())
        .map(|a| AgentRef::of(a))
        .collect();
    let offline: Vec<AgentRef> = agents
        .iter()
        .filter(|a| a.supported() && !a.connected)
        .map(|a| AgentRef::of(a))
        .collect();
    let counts = GroupCounts {
        members: members.len(),
        offline: offline.len(),
        unsupported: unsupported.len(),
    };

    let (files, waves) = if change.pushes() {
        let order: Vec<AgentRef> = members.into_iter().map(AgentRef::of).collect();
        let files = file_changes(
            stable.map(|s| (s.config.files(), &s.paths)),
            (group.config.files(), &group.config_paths),
        );
        let waves = if change == Change::Revert {
            vec![Wave {
                number: 1,
                target: "all".to_string(),
                cumulative: order.len(),
                agents: order,
            }]
        } else {
            waves(&group.rollout, order)
        };
        (files, waves)
    } else {
        (Vec::new(), Vec::new())
    };

    GroupPlan {
        name: group.name.clone(),
        change,
        config_hash: hash,
        stable_config_hash: stable_hash,
        stable: stable.map(|s| StableRef {
            commit: s.commit.clone(),
            source: s.source,
        }),
        previous_config_hash: previous_hash.filter(|p| Some(*p) != stable_hash),
        rollout: PolicyView::of(&group.rollout),
        agents: counts,
        files,
        waves,
        offline,
        unsupported,
    }
}

/// Cuts the members (in canary order) into the policy's waves, with the
/// cumulative sizes the controller uses.
pub fn waves(policy: &RolloutPolicy, order: Vec<AgentRef>) -> Vec<Wave> {
    let cuts = wave_cuts(&policy.waves, order.len());
    let targets: Vec<String> = if policy.waves.is_empty() {
        vec!["100%".to_string()]
    } else {
        policy.waves.iter().map(|a| amount(*a)).collect()
    };
    let mut rest = order.into_iter();
    let mut prev = 0usize;
    cuts.iter()
        .zip(targets)
        .enumerate()
        .map(|(i, (&cut, target))| {
            let cut = cut as usize;
            let agents: Vec<AgentRef> = rest.by_ref().take(cut.saturating_sub(prev)).collect();
            prev = cut.max(prev);
            Wave {
                number: i + 1,
                target,
                cumulative: cut,
                agents,
            }
        })
        .collect()
}

type Files<'a> = (&'a BTreeMap<String, ConfigFile>, &'a BTreeMap<String, String>);

/// Every key of either side, with its diff.
fn file_changes(old: Option<Files<'_>>, new: Files<'_>) -> Vec<FileChange> {
    let (new_files, new_paths) = new;
    let mut keys: Vec<&String> = new_files.keys().collect();
    if let Some((old_files, _)) = old {
        keys.extend(old_files.keys().filter(|k| !new_files.contains_key(*k)));
    }
    keys.sort();
    keys.into_iter()
        .map(|key| {
            let before = old.and_then(|(f, p)| f.get(key).map(|file| (file, p.get(key))));
            let after = new_files.get(key).map(|file| (file, new_paths.get(key)));
            file_change(key, before, after)
        })
        .collect()
}

type Side<'a> = Option<(&'a ConfigFile, Option<&'a String>)>;

fn file_change(key: &str, before: Side<'_>, after: Side<'_>) -> FileChange {
    let status = match (before, after) {
        (None, _) => FileStatus::Added,
        (_, None) => FileStatus::Removed,
        (Some((a, _)), Some((b, _))) if a == b => FileStatus::Unchanged,
        _ => FileStatus::Modified,
    };
    let label = |side: Side<'_>, prefix: &str| match side {
        None => "/dev/null".to_string(),
        Some((_, Some(path))) => format!("{prefix}/{path}"),
        Some((_, None)) => format!("{prefix}/[{key:?}]"),
    };
    let diff = if status == FileStatus::Unchanged {
        String::new()
    } else {
        unified_diff(body(before), body(after), &label(before, "a"), &label(after, "b"))
    };
    FileChange {
        key: key.to_string(),
        status,
        old_path: before.and_then(|(_, p)| p.cloned()),
        new_path: after.and_then(|(_, p)| p.cloned()),
        old_content_type: before.map(|(f, _)| f.content_type.clone()),
        new_content_type: after.map(|(f, _)| f.content_type.clone()),
        diff,
    }
}

fn body<'a>(side: Side<'a>) -> &'a [u8] {
    side.map_or(&b""[..], |(f, _)| &f.body[..])
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
