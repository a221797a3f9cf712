//! `GET /api/v1/groups` (the loaded commit, each group's config hash, agent
//! counts and rollout) and the rollout controls
//! `POST /api/v1/groups/{name}/pause|resume|promote`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;

use super::auth::Operator;
use super::wait::{self, Sources, WaitParams};
use super::{ApiState, error};
use crate::desired::summary;
use crate::driver::{ControlFailure, DriverStatus};
use crate::gitsrc::Status as GitStatus;
use crate::model::{AgentState, Change, CommitId, ConfigHash, GroupName, InstanceUid};
use crate::reconcile::{AgentCounts, Control, ControlError, GroupStatus, Phase, Timestamp};
use crate::rfc3339;

#[derive(Debug, Serialize)]
pub struct GroupsJson {
    /// The driver's status version: grows with every plan; send it back as
    /// `after` to wait for the next (or for a change of `source`).
    pub version: u64,
    /// The commit in force.
    pub commit: Option<CommitId>,
    /// The newest commit of the tracked branch, when it differs (it is invalid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<CommitId>,
    /// Why `head` is not in force.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub head_errors: Vec<String>,
    pub groups: Vec<GroupJson>,
    /// The repository: when it was last read, and whether it is stale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceJson>,
    /// Every agent of the fleet counted by state (unmanaged and unsupported
    /// agents included), once the reconciler has planned.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub agents_by_state: BTreeMap<AgentState, u64>,
}

#[derive(Debug, Serialize)]
pub struct SourceJson {
    /// When the last fetch (or local read) was tried.
    pub last_fetch: Option<String>,
    /// When one last succeeded.
    pub last_success: Option<String>,
    /// Why the last one failed.
    pub error: Option<String>,
    /// Since when fetches have failed for longer than the controller allows
    /// (`serve --source-stale-after`): newer commits may exist.
    pub stale_since: Option<String>,
}

impl SourceJson {
    pub fn of(git: &GitStatus, now: SystemTime, stale_after: Duration) -> Self {
        SourceJson {
            last_fetch: git.last_fetch.map(crate::rfc3339::format),
            last_success: git.last_success.map(crate::rfc3339::format),
            error: git.last_fetch_error.clone(),
            stale_since: git.stale_since(now, stale_after).map(crate::rfc3339::format),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct GroupJson {
    pub name: GroupName,
    /// Which agents the group selects, in words (`service.name=gw, host.name
    /// in (a, b)`), from the loaded commit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    pub config_hash: ConfigHash,
    pub stable_hash: Option<ConfigHash>,
    /// `None` until the reconciler has planned once.
    pub agents: Option<AgentCounts>,
    pub rollout: Option<RolloutJson>,
}

#[derive(Debug, Serialize)]
pub struct RolloutJson {
    pub phase: Phase,
    pub wave: u32,
    pub waves: u32,
    pub commit: Option<CommitId>,
    pub started: Option<String>,
    pub finished: Option<String>,
    /// The commit's author, committer, time and subject, when known.
    pub change: Option<Change>,
    /// When the current wave opened (rollouts in progress).
    pub wave_opened: Option<String>,
    /// Since when the current wave has waited for its agents to apply.
    pub waiting_since: Option<String>,
    /// It has waited longer than `serve --stall-after`.
    pub stalled: bool,
    /// When the current wave's bake ends (settled, not paused).
    pub bake_ends: Option<String>,
    /// Agents that failed this rollout, all of them (they stay counted after
    /// a rollback, until the next rollout starts).
    pub failed: u32,
    /// The newest failures, with their errors.
    pub failures: Vec<FailureJson>,
    pub actions: Vec<ActionJson>,
}

#[derive(Debug, Serialize)]
pub struct FailureJson {
    pub agent: InstanceUid,
    pub error: String,
    pub at: String,
}

#[derive(Debug, Serialize)]
pub struct ActionJson {
    pub action: Control,
    pub at: String,
    /// The operator's token name, when the API required tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// What a group's answer is told besides its status.
pub struct Shown<'a> {
    pub changes: &'a BTreeMap<CommitId, Change>,
    pub now: SystemTime,
    pub stall_after: Duration,
}

pub fn group_json(name: &GroupName, s: &GroupStatus, shown: &Shown<'_>) -> GroupJson {
    let time = |t: Timestamp| rfc3339::format_millis(t.millis());
    let now = Timestamp::of(shown.now);
    GroupJson {
        name: name.clone(),
        selector: None,
        config_hash: s.config_hash,
        stable_hash: s.stable_hash,
        agents: Some(s.agents),
        rollout: Some(RolloutJson {
            phase: s.phase,
            wave: s.wave,
            waves: s.waves,
            commit: s.commit.clone(),
            started: s.started.map(|t| rfc3339::format_millis(t.millis())),
            finished: s.finished.map(|t| rfc3339::format_millis(t.millis())),
            change: s.commit.as_ref().and_then(|c| shown.changes.get(c)).cloned(),
            wave_opened: s.wave_opened.map(time),
            waiting_since: s.waiting_since.map(time),
            stalled: s.waiting_since.is_some_and(|t| now.reached(t, shown.stall_after)),
            bake_ends: s.bake_ends.map(time),
            failed: s.failed,
            failures: s
                .failures
                .iter()
                .map(|f| FailureJson {
                    agent: f.agent.clone(),
                    error: f.error.clone(),
                    at: rfc3339::format_millis(f.at.millis()),
                })
                .collect(),
            actions: s
                .actions
                .iter()
                .map(|a| ActionJson {
                    action: a.action,
                    at: rfc3339::format_millis(a.at.millis()),
                    by: a.by.clone(),
                })
                .collect(),
        }),
    }
}

/// The groups answer from the driver's status, or, before it has planned,
/// from the git source's loaded commit alone.
pub fn groups_json(
    driver: Option<&DriverStatus>,
    git: &GitStatus,
    loaded: Vec<(GroupName, ConfigHash)>,
    (now, stall_after): (SystemTime, Duration),
) -> GroupsJson {
    let (commit, groups) = match driver.filter(|d| d.commit.is_some()) {
        Some(d) => {
            let shown = Shown {
                changes: &d.changes,
                now,
                stall_after,
            };
            (
                d.commit.clone(),
                d.groups.iter().map(|(n, s)| group_json(n, s, &shown)).collect(),
            )
        }
        None => (
            git.loaded.clone(),
            loaded
                .into_iter()
                .map(|(name, config_hash)| GroupJson {
                    name,
                    selector: None,
                    config_hash,
                    stable_hash: None,
                    agents: None,
                    rollout: None,
                })
                .collect(),
        ),
    };
    let head = git.head.clone().filter(|h| Some(h) != git.loaded.as_ref());
    GroupsJson {
        version: driver.map_or(0, |d| d.version),
        commit,
        head_errors: if head.is_some() {
            git.head_errors.clone()
        } else {
            vec![]
        },
        head,
        groups,
        source: None,
        agents_by_state: driver.map(|d| d.agents_by_state.clone()).unwrap_or_default(),
    }
}

/// `GET /api/v1/groups[?after=N&wait=30s]`.
pub async fn list(State(state): State<ApiState>, query: Result<Query<WaitParams>, QueryRejection>) -> Response {
    let poll = match wait::requested(query) {
        Ok(poll) => poll,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let driver = state.driver.as_ref().map(|d| d.subscribe());
    let git = state.git.as_ref().map(|g| g.status());
    Sources::new(None, driver)
        .with_git(git)
        .wait(poll, &state.shutdown)
        .await;
    let Some(git) = &state.git else {
        let none = GroupsJson {
            version: 0,
            commit: None,
            head: None,
            head_errors: vec![],
            groups: vec![],
            source: None,
            agents_by_state: BTreeMap::new(),
        };
        return Json(none).into_response();
    };
    let (loaded, selectors): (Vec<_>, BTreeMap<_, _>) = git
        .desired()
        .borrow()
        .as_deref()
        .map(|l| {
            let groups = l.desired.groups.values();
            (
                groups.clone().map(|g| (g.name.clone(), g.config.hash())).collect(),
                groups
                    .map(|g| (g.name.clone(), summary::selector(&g.selector)))
                    .collect(),
            )
        })
        .unwrap_or_default();
    let driver = state.driver.as_ref().map(|d| d.status());
    let git_status = git.status().borrow().clone();
    let now = SystemTime::now();
    let mut answer = groups_json(driver.as_deref(), &git_status, loaded, (now, state.stall_after));
    answer.source = Some(SourceJson::of(&git_status, now, state.source_stale_after));
    for g in &mut answer.groups {
        g.selector = selectors.get(&g.name).cloned();
    }
    Json(answer).into_response()
}

pub async fn pause(state: State<ApiState>, operator: Extension<Operator>, name: Path<String>) -> Response {
    control(state, operator, name, Control::Pause).await
}

pub async fn resume(state: State<ApiState>, operator: Extension<Operator>, name: Path<String>) -> Response {
    control(state, operator, name, Control::Resume).await
}

pub async fn promote(state: State<ApiState>, operator: Extension<Operator>, name: Path<String>) -> Response {
    control(state, operator, name, Control::Promote).await
}

async fn control(
    State(state): State<ApiState>,
    Extension(Operator(by)): Extension<Operator>,
    Path(name): Path<String>,
    action: Control,
) -> Response {
    let Some(driver) = &state.driver else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no repository is configured (serve --repo)",
        );
    };
    let group = GroupName::new(name);
    match driver.control(group.clone(), action, by.map(|n| n.to_string())).await {
        Ok(status) => {
            let published = driver.status();
            let shown = Shown {
                changes: &published.changes,
                now: SystemTime::now(),
                stall_after: state.stall_after,
            };
            Json(group_json(&group, &status, &shown)).into_response()
        }
        Err(e @ ControlFailure::Refused(ControlError::UnknownGroup(_))) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e @ ControlFailure::Refused(ControlError::Idle(_))) => error(StatusCode::CONFLICT, &e.to_string()),
        Err(
            e @ (ControlFailure::NotReady
            | ControlFailure::Starting(_)
            | ControlFailure::Stopped
            | ControlFailure::NotLeader),
        ) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}
