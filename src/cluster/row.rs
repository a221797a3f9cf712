//! An agent's record as replicas share it: JSON in `opamp_agents.record`.
//! Everything the planner and the API read, liveness included as of the
//! write. Epochs are made unique across replicas and their runs on the way
//! in ([`global_epoch`]): the planner remembers pushes per connection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::desired::{Attributes, Description};
use crate::fleet::record::{EffectiveFiles, Liveness};
use crate::fleet::{AgentRecord, Capabilities, Delivery, Health, RemoteConfigState, RemoteStatus};
use crate::model::{ConfigHash, GroupName, Identity, InstanceUid, Transport, global_epoch};

/// Attributes as (key, value) pairs.
type Pairs = Vec<(String, String)>;

#[derive(Debug, Serialize, Deserialize)]
pub struct Row {
    connected: bool,
    http: bool,
    epoch: u64,
    seen_ms: u64,
    seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disconnected_ms: Option<u64>,
    capabilities: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<(Pairs, Pairs)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    health: Option<HealthRow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    effective: Option<Files>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remote: Option<(String, u8, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unhealthy_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delivered: Option<(ConfigHash, u64, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity: Option<(String, Option<Vec<GroupName>>)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    push_drops: Option<(ConfigHash, u32)>,
}

/// An effective config, each body as text when it is UTF-8.
#[derive(Debug, Serialize, Deserialize)]
struct Files(#[serde(with = "crate::reconcile::files_serde")] EffectiveFiles);

#[derive(Debug, Serialize, Deserialize)]
struct HealthRow {
    healthy: bool,
    status: String,
    last_error: String,
    start: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    components: BTreeMap<String, HealthRow>,
}

/// Milliseconds since the Unix epoch.
pub fn ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn at(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

fn state_code(s: RemoteConfigState) -> u8 {
    match s {
        RemoteConfigState::Unset => 0,
        RemoteConfigState::Applied => 1,
        RemoteConfigState::Applying => 2,
        RemoteConfigState::Failed => 3,
    }
}

fn pairs(a: &Attributes) -> Pairs {
    a.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

impl HealthRow {
    fn of(h: &Health) -> Self {
        HealthRow {
            healthy: h.healthy,
            status: h.status.clone(),
            last_error: h.last_error.clone(),
            start: h.start_time_unix_nano,
            components: h
                .components
                .iter()
                .map(|(k, c)| (k.clone(), HealthRow::of(c)))
                .collect(),
        }
    }

    fn health(self) -> Health {
        Health {
            healthy: self.healthy,
            status: self.status,
            last_error: self.last_error,
            start_time_unix_nano: self.start,
            components: self.components.into_iter().map(|(k, c)| (k, c.health())).collect(),
        }
    }
}

impl Row {
    pub fn of(r: &AgentRecord) -> Self {
        Row {
            connected: r.connected,
            http: r.transport == Transport::Http,
            epoch: r.connection_epoch,
            seen_ms: ms(r.liveness.last_seen()),
            seq: r.liveness.sequence_num(),
            disconnected_ms: r.disconnected_at.map(ms),
            capabilities: r.capabilities.0,
            description: r
                .description
                .as_ref()
                .map(|d| (pairs(&d.identifying), pairs(&d.non_identifying))),
            health: r.health.as_deref().map(HealthRow::of),
            effective: r
                .effective_config
                .as_ref()
                .map(|files| Files(EffectiveFiles::clone(files))),
            remote: r
                .remote_config_status
                .as_ref()
                .map(|s| (hex::encode(&s.last_hash), state_code(s.state), s.error_message.clone())),
            unhealthy_ms: r.unhealthy_since.map(ms),
            delivered: r.delivered.map(|d| (d.hash, ms(d.at), d.epoch)),
            identity: r
                .identity
                .as_ref()
                .map(|i| (i.name.to_string(), i.groups.as_ref().map(|g| g.to_vec()))),
            push_drops: r.push_drops,
        }
    }

    /// The record, as the replica of run `boot` holds it; `connected` only
    /// while that run of the replica is alive.
    pub fn record(self, uid: InstanceUid, boot: i64, alive: bool) -> AgentRecord {
        let boot = u64::try_from(boot).unwrap_or_default();
        let epoch = global_epoch(boot, self.epoch);
        let connected = self.connected && alive;
        AgentRecord {
            uid,
            connected,
            transport: if self.http {
                Transport::Http
            } else {
                Transport::WebSocket
            },
            connection_epoch: epoch,
            liveness: Arc::new(Liveness::new(at(self.seen_ms), self.seq)),
            disconnected_at: match (self.disconnected_ms, connected) {
                (Some(t), _) => Some(at(t)),
                // Gone with its replica: offline since last heard of.
                (None, false) => Some(at(self.seen_ms)),
                (None, true) => None,
            },
            capabilities: Capabilities(self.capabilities),
            description: self.description.map(|(i, n)| {
                Arc::new(Description {
                    identifying: i.into_iter().collect(),
                    non_identifying: n.into_iter().collect(),
                })
            }),
            health: self.health.map(|h| Arc::new(h.health())),
            effective_config: self.effective.map(|Files(files)| Arc::new(files)),
            remote_config_status: self.remote.map(|(hash, state, error_message)| {
                let last_hash = Bytes::from(hex::decode(hash).unwrap_or_default());
                RemoteStatus {
                    hash: <[u8; 32]>::try_from(&last_hash[..]).ok().map(ConfigHash),
                    last_hash,
                    state: RemoteConfigState::from_wire(i32::from(state)),
                    error_message,
                }
            }),
            unhealthy_since: self.unhealthy_ms.map(at),
            delivered: self.delivered.map(|(hash, t, e)| Delivery {
                hash,
                at: at(t),
                epoch: global_epoch(boot, e),
            }),
            identity: self.identity.map(|(name, groups)| Identity {
                name: name.into(),
                groups: groups.map(Into::into),
            }),
            push_drops: self.push_drops,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::ConfigFile;

    #[test]
    fn a_record_survives_the_trip_through_a_row() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let uid = InstanceUid::new_v7();
        let mut r = AgentRecord::new(uid.clone(), Transport::Http, now);
        r.connected = true;
        r.connection_epoch = 7;
        r.capabilities = Capabilities(0b1011);
        r.description = Some(Arc::new(Description {
            identifying: [("service.name", "otelcol")].into_iter().collect(),
            non_identifying: [("host.name", "a"), ("os.type", "linux")].into_iter().collect(),
        }));
        let mut health = Health {
            healthy: false,
            status: "StatusRecoverableError".into(),
            last_error: "exporter down".into(),
            ..Health::default()
        };
        health.components.insert("pipeline:traces".into(), health.clone());
        r.health = Some(Arc::new(health));
        r.effective_config = Some(Arc::new(EffectiveFiles::from([(
            String::new(),
            ConfigFile {
                content_type: "text/yaml".into(),
                body: Bytes::from_static(b"receivers: {}\n\xff"),
            },
        )])));
        r.remote_config_status = Some(RemoteStatus {
            last_hash: Bytes::from(vec![9; 32]),
            hash: Some(ConfigHash([9; 32])),
            state: RemoteConfigState::Failed,
            error_message: "bad".into(),
        });
        r.unhealthy_since = Some(now);
        r.delivered = Some(Delivery {
            hash: ConfigHash([9; 32]),
            at: now,
            epoch: 7,
        });
        r.identity = Some(Identity {
            name: "edge".into(),
            groups: Some(vec![GroupName::new("edge")].into()),
        });
        r.push_drops = Some((ConfigHash([9; 32]), 2));

        let json = serde_json::to_value(Row::of(&r)).unwrap();
        let back = serde_json::from_value::<Row>(json).unwrap().record(uid, 42, true);
        let mut expected = r.clone();
        expected.connection_epoch = global_epoch(42, 7);
        expected.delivered.as_mut().unwrap().epoch = global_epoch(42, 7);
        assert_eq!(back.liveness.last_seen(), r.liveness.last_seen());
        expected.liveness = back.liveness.clone();
        assert_eq!(back, expected);
        assert!(back.delivered_now().is_some(), "a delivery stays on its connection");
    }

    #[test]
    fn an_agent_of_a_replica_that_is_gone_is_offline_since_last_heard_of() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut r = AgentRecord::new(InstanceUid::new_v7(), Transport::WebSocket, now);
        r.connected = true;
        let row = serde_json::from_value::<Row>(serde_json::to_value(Row::of(&r)).unwrap()).unwrap();
        let back = row.record(r.uid.clone(), 1, false);
        assert!(!back.connected);
        assert_eq!(back.disconnected_at, Some(now));
    }

    #[test]
    fn epochs_of_two_runs_never_meet() {
        assert_ne!(global_epoch(1, 5), global_epoch(2, 5));
        assert_ne!(global_epoch(1, 5), global_epoch(1, 6));
    }
}
