//! `GET /api/v1/agents` and `GET /api/v1/agents/{uid}`: the inventory as
//! JSON, built by a pure function from a record and (once the reconciler
//! supplies one) the agent's assignment.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::wait::{self, Sources, WaitParams};
use super::{ApiState, error};
use crate::fleet::{AgentRecord, Health};
use crate::model::{AgentState, ConfigHash, GroupName, InstanceUid};
use crate::reconcile::Assignment;

/// An agent's assignment in the driver's uid-ordered list.
fn find<'a>(assignments: &'a [Assignment], uid: &InstanceUid) -> Option<&'a Assignment> {
    assignments
        .binary_search_by(|a| a.uid.cmp(uid))
        .ok()
        .map(|i| &assignments[i])
}

/// One agent as the API shows it.
#[derive(Debug, Serialize)]
pub struct AgentJson<'a> {
    pub instance_uid: &'a InstanceUid,
    pub connected: bool,
    pub transport: &'static str,
    pub last_seen: String,
    pub identifying_attributes: &'a BTreeMap<String, String>,
    pub non_identifying_attributes: &'a BTreeMap<String, String>,
    pub capabilities: Vec<&'static str>,
    pub group: Option<&'a GroupName>,
    pub desired_config_hash: Option<ConfigHash>,
    pub remote_config_status: Option<RemoteConfigStatusJson<'a>>,
    pub health: Option<HealthJson<'a>>,
    pub state: AgentState,
    /// Why an `unsupported` agent cannot be managed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsupported_reason: Option<&'static str>,
    /// Who the agent authenticated as: its token's name or its client
    /// certificate's subject; only that identity may report for its uid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<&'a str>,
    /// The only groups its token lets it join, when the token is limited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups_allowed: Option<&'a [GroupName]>,
    /// Only in the single-agent answer: file name to body (as UTF-8 text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective_config: Option<BTreeMap<&'a str, String>>,
}

#[derive(Debug, Serialize)]
pub struct RemoteConfigStatusJson<'a> {
    pub status: &'static str,
    /// 64 hex digits for our hashes; any other hash as the hex of its bytes.
    pub last_remote_config_hash: String,
    pub error_message: &'a str,
}

#[derive(Debug, Serialize)]
pub struct HealthJson<'a> {
    pub healthy: bool,
    pub status: &'a str,
    pub last_error: &'a str,
}

static NO_ATTRIBUTES: BTreeMap<String, String> = BTreeMap::new();

/// The state of an agent nobody assigned: offline, unsupported (cannot take
/// remote config) or unmanaged.
pub fn unassigned_state(rec: &AgentRecord) -> AgentState {
    if !rec.connected {
        AgentState::Offline
    } else if rec.capabilities.unsupported_reason().is_some() {
        AgentState::Unsupported
    } else {
        AgentState::Unmanaged
    }
}

/// The state the API shows: the reconciler's, except that a record that is
/// not connected is offline at once (the assignment is from the last plan).
pub fn agent_state(rec: &AgentRecord, assignment: Option<&Assignment>) -> AgentState {
    match assignment {
        Some(a) if rec.connected => a.state,
        _ => unassigned_state(rec),
    }
}

/// Builds an agent's JSON. `with_effective_config` adds the bodies (the
/// single-agent answer).
pub fn agent_json<'a>(
    rec: &'a AgentRecord,
    assignment: Option<&'a Assignment>,
    with_effective_config: bool,
) -> AgentJson<'a> {
    AgentJson {
        instance_uid: &rec.uid,
        connected: rec.connected,
        transport: rec.transport.as_str(),
        last_seen: crate::rfc3339::format(rec.last_seen),
        identifying_attributes: rec.identifying_attributes().unwrap_or(&NO_ATTRIBUTES),
        non_identifying_attributes: rec.non_identifying_attributes().unwrap_or(&NO_ATTRIBUTES),
        capabilities: rec.capabilities.names(),
        group: assignment.and_then(|a| a.group.as_ref()),
        desired_config_hash: assignment.and_then(|a| a.desired),
        remote_config_status: rec.remote_config_status.as_ref().map(|s| RemoteConfigStatusJson {
            status: s.state.as_str(),
            last_remote_config_hash: s.hash.map_or_else(|| hex::encode(&s.last_hash), |h| h.to_string()),
            error_message: &s.error_message,
        }),
        health: rec.health.as_deref().map(health_json),
        state: agent_state(rec, assignment),
        unsupported_reason: rec
            .capabilities
            .unsupported_reason()
            .filter(|_| agent_state(rec, assignment) == AgentState::Unsupported),
        identity: rec.identity.as_ref().map(|i| &*i.name),
        groups_allowed: rec.identity.as_ref().and_then(|i| i.groups.as_deref()),
        effective_config: with_effective_config.then(|| {
            rec.effective_config
                .as_deref()
                .map(|files| {
                    files
                        .iter()
                        .map(|(name, f)| (name.as_str(), String::from_utf8_lossy(&f.body).into_owned()))
                        .collect()
                })
                .unwrap_or_default()
        }),
    }
}

fn health_json(h: &Health) -> HealthJson<'_> {
    HealthJson {
        healthy: h.healthy,
        status: &h.status,
        last_error: &h.last_error,
    }
}

#[derive(Serialize)]
struct AgentList<'a> {
    /// Differs from the last answer's when the inventory or the plan may have changed.
    version: u64,
    agents: Vec<AgentJson<'a>>,
}

/// `GET /api/v1/agents[?after=N&wait=30s]`: every agent, with the version
/// to send back as `after` to wait for the next change.
pub async fn list(State(state): State<ApiState>, query: Result<Query<WaitParams>, QueryRejection>) -> Response {
    let poll = match wait::requested(query) {
        Ok(poll) => poll,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let driver = state.driver.as_ref().map(|d| d.subscribe());
    Sources::new(Some(state.fleet.subscribe()), driver)
        .wait(poll, &state.shutdown)
        .await;
    // The plan's version before its assignments (published first): the
    // answer is never older than the version it carries.
    let planned = state.driver.as_ref().map_or(0, |d| d.status().version);
    let assignments = state.assignments.borrow().clone();
    let snapshot = state.fleet.snapshot();
    let agents = snapshot
        .sorted()
        .into_iter()
        .map(|r| agent_json(r, find(&assignments, &r.uid), false))
        .collect();
    Json(AgentList {
        version: snapshot.version + planned,
        agents,
    })
    .into_response()
}

pub async fn one(State(state): State<ApiState>, Path(uid): Path<String>) -> Response {
    let Some(uid) = InstanceUid::parse_text(&uid) else {
        return error(
            StatusCode::BAD_REQUEST,
            "not an instance uid (expected a UUID or a 26-character ULID)",
        );
    };
    let snapshot = state.fleet.snapshot();
    let Some(rec) = snapshot.get(&uid) else {
        return error(StatusCode::NOT_FOUND, "no such agent");
    };
    let assignments = state.assignments.borrow().clone();
    Json(agent_json(rec, find(&assignments, &uid), true)).into_response()
}

/// `DELETE /api/v1/agents/{uid}/identity`: drops the identity the agent's
/// uid is bound to, so its next report binds it afresh (for an agent whose
/// host was given a new token or certificate).
pub async fn unbind(State(state): State<ApiState>, Path(uid): Path<String>) -> Response {
    let Some(uid) = InstanceUid::parse_text(&uid) else {
        return error(
            StatusCode::BAD_REQUEST,
            "not an instance uid (expected a UUID or a 26-character ULID)",
        );
    };
    match state.fleet.unbind(uid).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, "the agent is not bound to an identity"),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the controller is shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use bytes::Bytes;

    use super::*;
    use crate::desired::ConfigFile;
    use crate::fleet::{Capabilities, Description, RemoteConfigState, RemoteStatus, Transport};

    fn record() -> AgentRecord {
        let mut r = AgentRecord::new(
            InstanceUid::Uuid([0x01; 16]),
            Transport::WebSocket,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_255_200),
        );
        r.capabilities = Capabilities(0x1 | 0x2 | 0x1000);
        r.description = Some(Arc::new(Description {
            identifying: BTreeMap::from([("service.name".into(), "otelcol".into())]),
            non_identifying: BTreeMap::from([("host.name".into(), "a".into())]),
        }));
        r.health = Some(Arc::new(Health {
            healthy: true,
            ..Default::default()
        }));
        r.remote_config_status = Some(RemoteStatus {
            last_hash: Bytes::copy_from_slice(&[0x9a; 32]),
            hash: Some(ConfigHash([0x9a; 32])),
            state: RemoteConfigState::Applied,
            error_message: String::new(),
        });
        r.effective_config = Some(Arc::new(BTreeMap::from([(
            String::new(),
            ConfigFile {
                content_type: "text/yaml".into(),
                body: Bytes::from_static(b"a: 1\n"),
            },
        )])));
        r
    }

    #[test]
    fn json_shape_matches_the_contract() {
        let r = record();
        let assignment = Assignment {
            uid: r.uid.clone(),
            group: Some(GroupName::new("edge-gateways")),
            desired: Some(ConfigHash([0x9a; 32])),
            state: AgentState::InSync,
        };
        let v = serde_json::to_value(agent_json(&r, Some(&assignment), false)).unwrap();
        let h = "9a".repeat(32);
        assert_eq!(
            v,
            serde_json::json!({
                "instance_uid": "01010101-0101-0101-0101-010101010101",
                "connected": true, "transport": "websocket",
                "last_seen": "2026-11-21T10:00:00Z",
                "identifying_attributes": {"service.name": "otelcol"},
                "non_identifying_attributes": {"host.name": "a"},
                "capabilities": ["ReportsStatus", "AcceptsRemoteConfig", "ReportsRemoteConfig"],
                "group": "edge-gateways", "desired_config_hash": h,
                "remote_config_status": {"status": "APPLIED", "last_remote_config_hash": h, "error_message": ""},
                "health": {"healthy": true, "status": "", "last_error": ""},
                "state": "in_sync"
            })
        );
        let detail = serde_json::to_value(agent_json(&r, None, true)).unwrap();
        assert_eq!(detail["effective_config"], serde_json::json!({"": "a: 1\n"}));
        assert_eq!(detail["group"], serde_json::Value::Null);
        assert_eq!(detail["state"], "unmanaged");
    }

    #[test]
    fn a_disconnected_agent_is_offline_whatever_the_last_plan_said() {
        let mut r = record();
        let assignment = Assignment {
            uid: r.uid.clone(),
            group: Some(GroupName::new("edge-gateways")),
            desired: Some(ConfigHash([0x9a; 32])),
            state: AgentState::InSync,
        };
        assert_eq!(agent_state(&r, Some(&assignment)), AgentState::InSync);
        r.set_offline(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_255_260));
        let v = serde_json::to_value(agent_json(&r, Some(&assignment), false)).unwrap();
        assert_eq!(
            (&v["connected"], &v["state"]),
            (&serde_json::json!(false), &serde_json::json!("offline"))
        );
        assert_eq!(v["group"], "edge-gateways", "the group stays");
    }

    #[test]
    fn unassigned_states_and_missing_parts() {
        let mut r = AgentRecord::new(InstanceUid::Uuid([2; 16]), Transport::Http, SystemTime::UNIX_EPOCH);
        r.capabilities = Capabilities(0x1);
        assert_eq!(unassigned_state(&r), AgentState::Unsupported);
        let v = serde_json::to_value(agent_json(&r, None, false)).unwrap();
        assert_eq!(v["unsupported_reason"], "lacks the AcceptsRemoteConfig capability");
        r.capabilities = Capabilities(0x3);
        assert_eq!(unassigned_state(&r), AgentState::Unsupported);
        let v = serde_json::to_value(agent_json(&r, None, false)).unwrap();
        assert_eq!(
            v["unsupported_reason"],
            "accepts remote config but does not report its status (ReportsRemoteConfig is off)"
        );
        r.capabilities = Capabilities(0x1003);
        assert_eq!(unassigned_state(&r), AgentState::Unmanaged);
        let v = serde_json::to_value(agent_json(&r, None, false)).unwrap();
        assert!(v.get("unsupported_reason").is_none());
        r.connected = false;
        assert_eq!(unassigned_state(&r), AgentState::Offline);
        r.remote_config_status = Some(RemoteStatus {
            last_hash: Bytes::from_static(b"\x01\x02"),
            hash: None,
            state: RemoteConfigState::Failed,
            error_message: "nope".into(),
        });
        let v = serde_json::to_value(agent_json(&r, None, false)).unwrap();
        assert_eq!(v["remote_config_status"]["last_remote_config_hash"], "0102");
        assert_eq!(v["health"], serde_json::Value::Null);
        assert_eq!(v["identifying_attributes"], serde_json::json!({}));
        assert_eq!(v["transport"], "http");
    }
}
