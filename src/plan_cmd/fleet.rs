//! The fleet a plan is computed against: agents as `GET /api/v1/agents`
//! lists them, read from a file (offline) or fetched from a running
//! controller.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::StatusCode;
use serde::Deserialize;

use crate::api_client;
use crate::desired::Description;
use crate::fleet::Capabilities;
use crate::model::InstanceUid;
use crate::reconcile::AgentView;

/// One agent: the parts of the API's Agent a plan needs. Other fields of the
/// API's answer are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FleetAgent {
    pub instance_uid: InstanceUid,
    #[serde(default)]
    pub connected: bool,
    #[serde(default)]
    pub identifying_attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub non_identifying_attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
}

impl FleetAgent {
    /// The agent as the planner sees it. What the list does not tell (its
    /// reports, its connection history) is left empty: a plan of a commit
    /// only needs the agent's group and whether it would be a member.
    pub fn view(&self) -> AgentView {
        let caps = Capabilities::from_names(self.capabilities.iter().map(String::as_str));
        AgentView {
            uid: self.instance_uid.clone(),
            attributes: Arc::new(Description {
                identifying: self.identifying_attributes.clone().into_iter().collect(),
                non_identifying: self.non_identifying_attributes.clone().into_iter().collect(),
            }),
            accepts_remote_config: caps.has(Capabilities::ACCEPTS_REMOTE_CONFIG),
            reports_remote_config: caps.has(Capabilities::REPORTS_REMOTE_CONFIG),
            reports_health: caps.has(Capabilities::REPORTS_HEALTH),
            connected: self.connected,
            connection_epoch: 0,
            disconnected_at: None,
            remote: None,
            healthy: None,
            health_error: String::new(),
            unhealthy_since: None,
            delivered: None,
            push_drops: None,
            groups_allowed: None,
        }
    }
}

#[derive(Deserialize)]
struct AgentList {
    agents: Vec<FleetAgent>,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{from} is not an agent list like GET /api/v1/agents answers ({{\"agents\": [...]}}): {source}")]
    Parse { from: String, source: serde_json::Error },
    #[error(transparent)]
    Client(#[from] api_client::ClientError),
    #[error("GET {url}: the server answered {status}")]
    Status { url: String, status: StatusCode },
}

/// Parses the agent list; `from` names where it came from, for the error.
pub fn parse(bytes: &[u8], from: &str) -> Result<Vec<FleetAgent>, FleetError> {
    serde_json::from_slice::<AgentList>(bytes)
        .map(|l| l.agents)
        .map_err(|source| FleetError::Parse {
            from: from.to_string(),
            source,
        })
}

/// Reads a file in the `/api/v1/agents` format.
pub fn read_file(path: &std::path::Path) -> Result<Vec<FleetAgent>, FleetError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| FleetError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&bytes, &shown)
}

/// Fetches the agent list from a running controller.
pub async fn fetch(server: &str) -> Result<Vec<FleetAgent>, FleetError> {
    let uri = api_client::url(server, "/api/v1/agents")?;
    let url = uri.to_string();
    let (status, body) = api_client::call(http::Method::GET, uri).await?;
    if status != StatusCode::OK {
        return Err(FleetError::Status { url, status });
    }
    parse(&body, &url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::AgentAttributes;

    #[test]
    fn parses_the_api_shape_and_ignores_other_fields() {
        let json = r#"{"agents": [
            {"instance_uid": "01010101-0101-0101-0101-010101010101", "connected": true, "transport": "websocket",
             "last_seen": "2026-11-21T10:00:00Z",
             "identifying_attributes": {"service.name": "gw", "host.name": "id-wins"},
             "non_identifying_attributes": {"host.name": "a", "zone": "z1"},
             "capabilities": ["ReportsStatus", "AcceptsRemoteConfig"],
             "group": null, "desired_config_hash": null, "remote_config_status": null, "health": null,
             "state": "unmanaged"},
            {"instance_uid": "01J9ZQ0000000000000000000A", "connected": false, "capabilities": ["ReportsStatus"]}
        ]}"#;
        let agents = parse(json.as_bytes(), "f").unwrap();
        assert_eq!(agents.len(), 2);
        let a = agents[0].view();
        assert!(a.connected && a.accepts_remote_config);
        assert!(!a.supported(), "it does not report whether it applied a config");
        assert_eq!(a.attribute("service.name"), Some("gw"));
        assert_eq!(a.attribute("zone"), Some("z1"));
        assert_eq!(a.attribute("host.name"), Some("id-wins"), "identifying attributes win");
        assert_eq!(agents[1].instance_uid.to_string(), "01J9ZQ0000000000000000000A");
        let b = agents[1].view();
        assert!(!b.connected && !b.accepts_remote_config);
    }

    #[test]
    fn bad_lists_are_errors() {
        for bad in ["[]", "{}", "not json", r#"{"agents": [{"instance_uid": "x"}]}"#] {
            let e = parse(bad.as_bytes(), "fleet.json").unwrap_err();
            assert!(e.to_string().starts_with("fleet.json is not an agent list"), "{e}");
        }
    }
}
