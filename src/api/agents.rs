//! `GET /api/v1/agents` and `GET /api/v1/agents/{uid}`: the inventory as
//! JSON, built by a pure function from a record and (once the reconciler
//! supplies one) the agent's assignment.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::wait::{Sources, WaitParams};
use super::{ApiState, error};
use crate::desired::Attributes;
use crate::driver::Assignments;
use crate::fleet::{AgentRecord, Health};
use crate::model::{AgentState, ConfigHash, GroupName, InstanceUid};
use crate::reconcile::Assignment;

/// An agent's assignment in the driver's uid-ordered list.
fn find<'a>(assignments: &'a Assignments, uid: &InstanceUid) -> Option<&'a Assignment> {
    let i = assignments.binary_search_by(|a| a.uid.cmp(uid)).ok()?;
    assignments.get(i)
}

/// One agent as the API shows it.
#[derive(Debug, Serialize)]
pub struct AgentJson<'a> {
    pub instance_uid: &'a InstanceUid,
    pub connected: bool,
    pub transport: &'static str,
    pub last_seen: String,
    pub identifying_attributes: &'a Attributes,
    pub non_identifying_attributes: &'a Attributes,
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

static NO_ATTRIBUTES: std::sync::LazyLock<Attributes> = std::sync::LazyLock::new(Attributes::default);

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
        last_seen: crate::rfc3339::format(rec.liveness.last_seen()),
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
    /// Only when filtered or paged: how many agents match, and which page this is.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    paging: Option<PageJson>,
}

#[derive(Debug, PartialEq, Eq, Serialize)]
struct PageJson {
    /// Agents that match the filter, on every page.
    total: usize,
    page: usize,
    per_page: usize,
}

/// The query of the list: a long poll, a filter and a page, all optional.
#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    after: Option<u64>,
    wait: Option<String>,
    group: Option<String>,
    state: Option<String>,
    q: Option<String>,
    page: Option<usize>,
    per_page: Option<usize>,
}

/// Agents on a page when `per_page` is not given.
pub const DEFAULT_PER_PAGE: usize = 100;
/// The largest page served.
pub const MAX_PER_PAGE: usize = 1000;

/// Which agents a list shows: all of them (no parameter given) or those
/// that match, one page of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// A group's name; `-` for agents in no group.
    pub group: Option<String>,
    pub state: Option<AgentState>,
    /// Lower case; matched against the uid and every attribute's key and value.
    pub q: Option<String>,
    /// 1-based.
    pub page: usize,
    pub per_page: usize,
}

impl ListParams {
    /// The filter asked for: `None` when the query names none of its
    /// parameters (the whole list, in the original shape); an error for a
    /// state that does not exist or a page of 0.
    pub fn filter(&self) -> Result<Option<Filter>, String> {
        if self.group.is_none()
            && self.state.is_none()
            && self.q.is_none()
            && self.page.is_none()
            && self.per_page.is_none()
        {
            return Ok(None);
        }
        let state = match self.state.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(
                AgentState::ALL
                    .into_iter()
                    .find(|a| a.as_str() == s)
                    .ok_or_else(|| format!("state: unknown {s:?} (one of in_sync, pending, applying, failed, drifted, unmanaged, unsupported, offline)"))?,
            ),
        };
        let page = self.page.unwrap_or(1);
        if page == 0 {
            return Err("page: pages count from 1".into());
        }
        Ok(Some(Filter {
            group: self.group.clone().filter(|g| !g.is_empty()),
            state,
            q: self
                .q
                .as_deref()
                .map(str::trim)
                .filter(|q| !q.is_empty())
                .map(str::to_lowercase),
            page,
            per_page: self.per_page.unwrap_or(DEFAULT_PER_PAGE).clamp(1, MAX_PER_PAGE),
        }))
    }

    fn wait(&self) -> WaitParams {
        WaitParams::new(self.after, self.wait.clone())
    }
}

impl Filter {
    /// Whether an agent with this assignment and state is shown.
    pub fn matches(&self, rec: &AgentRecord, assignment: Option<&Assignment>, state: AgentState) -> bool {
        if self.state.is_some_and(|s| s != state) {
            return false;
        }
        if let Some(group) = &self.group {
            let in_group = assignment.and_then(|a| a.group.as_ref()).map(GroupName::as_str);
            let wanted = if group == "-" { None } else { Some(group.as_str()) };
            if in_group != wanted {
                return false;
            }
        }
        let Some(q) = &self.q else { return true };
        let contains = |s: &str| s.to_lowercase().contains(q.as_str());
        let attributes = rec
            .identifying_attributes()
            .into_iter()
            .chain(rec.non_identifying_attributes())
            .flatten();
        contains(&rec.uid.to_string()) || attributes.into_iter().any(|(k, v)| contains(k) || contains(v))
    }

    /// The slice of `matching` this page shows.
    pub fn page_of<T>(&self, matching: Vec<T>) -> Vec<T> {
        let start = (self.page - 1).saturating_mul(self.per_page);
        matching.into_iter().skip(start).take(self.per_page).collect()
    }
}

/// `GET /api/v1/agents[?after=N&wait=30s][&group=&state=&q=&page=&per_page=]`:
/// every agent (or a filtered page of them), with the version to send back
/// as `after` to wait for the next change.
pub async fn list(State(state): State<ApiState>, query: Result<Query<ListParams>, QueryRejection>) -> Response {
    let params = match query {
        Ok(Query(params)) => params,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let (poll, filter) = match (params.wait().parse(), params.filter()) {
        (Ok(poll), Ok(filter)) => (poll, filter),
        (Err(why), _) | (_, Err(why)) => return error(StatusCode::BAD_REQUEST, &why),
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
    let with_assignment = snapshot.sorted().into_iter().map(|r| (r, find(&assignments, &r.uid)));
    let (agents, paging) = match filter {
        None => (with_assignment.map(|(r, a)| agent_json(r, a, false)).collect(), None),
        Some(filter) => {
            let matching: Vec<_> = with_assignment
                .filter(|(r, a)| filter.matches(r, *a, agent_state(r, *a)))
                .collect();
            let total = matching.len();
            let page = filter.page_of(matching);
            (
                page.into_iter().map(|(r, a)| agent_json(r, a, false)).collect(),
                Some(PageJson {
                    total,
                    page: filter.page,
                    per_page: filter.per_page,
                }),
            )
        }
    };
    Json(AgentList {
        version: snapshot.version + planned,
        agents,
        paging,
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
            identifying: [("service.name", "otelcol")].into_iter().collect(),
            non_identifying: [("host.name", "a")].into_iter().collect(),
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

    fn params(pairs: &[(&str, &str)]) -> ListParams {
        let query: String = pairs.iter().map(|(k, v)| format!("{k}={v}&")).collect();
        let uri: axum::http::Uri = format!("/api/v1/agents?{query}").parse().expect("a URI");
        Query::<ListParams>::try_from_uri(&uri).expect("a query").0
    }

    #[test]
    fn no_filter_parameter_keeps_the_whole_list_and_bad_ones_are_errors() {
        assert_eq!(params(&[]).filter(), Ok(None));
        assert_eq!(params(&[("after", "3"), ("wait", "1s")]).filter(), Ok(None));
        let f = params(&[("state", "failed")]).filter().unwrap().unwrap();
        assert_eq!(
            (f.state, f.page, f.per_page),
            (Some(AgentState::Failed), 1, DEFAULT_PER_PAGE)
        );
        assert_eq!(
            params(&[("per_page", "100000")]).filter().unwrap().unwrap().per_page,
            MAX_PER_PAGE
        );
        assert!(
            params(&[("state", "sad")])
                .filter()
                .unwrap_err()
                .starts_with("state: unknown")
        );
        assert!(params(&[("page", "0")]).filter().is_err());
        let empty = params(&[("group", ""), ("state", ""), ("q", "++")])
            .filter()
            .unwrap()
            .unwrap();
        assert_eq!(
            (empty.group, empty.state, empty.q),
            (None, None, None),
            "empty fields filter nothing"
        );
    }

    #[test]
    fn filters_by_group_state_and_text_and_pages() {
        let r = record();
        let assignment = Assignment {
            uid: r.uid.clone(),
            group: Some(GroupName::new("edge-gateways")),
            desired: None,
            state: AgentState::Failed,
        };
        let matches = |pairs: &[(&str, &str)], a: Option<&Assignment>| {
            let f = params(pairs).filter().unwrap().unwrap();
            f.matches(&r, a, agent_state(&r, a))
        };
        assert!(matches(&[("group", "edge-gateways")], Some(&assignment)));
        assert!(!matches(&[("group", "other")], Some(&assignment)));
        assert!(matches(&[("group", "-")], None), "- is no group");
        assert!(!matches(&[("group", "-")], Some(&assignment)));
        assert!(matches(&[("state", "failed")], Some(&assignment)));
        assert!(!matches(&[("state", "in_sync")], Some(&assignment)));
        assert!(matches(&[("q", "OTELCOL")], None), "an attribute value, any case");
        assert!(matches(&[("q", "host.name")], None), "an attribute key");
        assert!(matches(&[("q", "01010101-0101")], None), "the uid");
        assert!(!matches(&[("q", "nowhere")], None));
        let f = params(&[("page", "2"), ("per_page", "3")]).filter().unwrap().unwrap();
        assert_eq!(f.page_of((1..=8).collect()), vec![4, 5, 6]);
        let last = params(&[("page", "3"), ("per_page", "3")]).filter().unwrap().unwrap();
        assert_eq!(last.page_of((1..=8).collect()), vec![7, 8]);
        let past = params(&[("page", "9"), ("per_page", "3")]).filter().unwrap().unwrap();
        assert!(past.page_of((1..=8).collect::<Vec<_>>()).is_empty());
    }
}
