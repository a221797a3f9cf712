//! One agent's record in the inventory, and [`apply`]: the pure rule that
//! folds an `AgentToServer` into it and decides what the reply must ask for.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::capabilities::Capabilities;
use crate::desired::{AgentAttributes, ConfigFile};
pub use crate::desired::{Attributes, Description};
pub use crate::model::RemoteConfigState;
use crate::model::{ConfigHash, Identity, InstanceUid, Transport};
use crate::proto;

/// Health as the agent reported it (`ComponentHealth`), components included.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    pub status: String,
    pub last_error: String,
    /// 0 means not running.
    pub start_time_unix_nano: u64,
    pub components: BTreeMap<String, Health>,
}

/// The agent's last `RemoteConfigStatus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteStatus {
    /// `last_remote_config_hash` exactly as sent.
    pub last_hash: Bytes,
    /// The same hash when it has our 32-byte form.
    pub hash: Option<ConfigHash>,
    pub state: RemoteConfigState,
    pub error_message: String,
}

/// An effective config: file name to file (`""` is the main file).
pub type EffectiveFiles = BTreeMap<String, ConfigFile>;

/// Everything we know about one agent. Records are shared by snapshots
/// (`Arc<AgentRecord>`) and replaced, never mutated in place, except for
/// their [`Liveness`]; the bulky parts sit behind their own `Arc` so that a
/// new record costs little.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRecord {
    pub uid: InstanceUid,
    pub connected: bool,
    pub transport: Transport,
    /// Grows on every new connection, and when an offline agent comes back.
    pub connection_epoch: u64,
    pub liveness: Arc<Liveness>,
    /// When the agent last went offline; `None` while it never has.
    pub disconnected_at: Option<SystemTime>,
    pub capabilities: Capabilities,
    /// `None` until the agent sends an `AgentDescription`.
    pub description: Option<Arc<Description>>,
    pub health: Option<Arc<Health>>,
    pub effective_config: Option<Arc<EffectiveFiles>>,
    pub remote_config_status: Option<RemoteStatus>,
    /// Since when the agent has reported itself unhealthy, counted from the
    /// start of its current connection at the earliest; `None` while healthy
    /// or before it reports health.
    pub unhealthy_since: Option<SystemTime>,
    /// The last config handed to the agent on its current connection, and when.
    pub delivered: Option<Delivery>,
    /// The identity (token name, client certificate subject) the agent was
    /// first seen under: only that identity may report for its uid.
    pub identity: Option<Identity>,
    /// A config whose delivery was followed, this many times in a row, by the
    /// connection closing before the agent said anything of it (an agent
    /// that refuses a config it cannot take may just drop the connection).
    pub push_drops: Option<(ConfigHash, u32)>,
}

/// When the agent last reported and the sequence number it sent. Both change
/// with every heartbeat and nothing the planner reads depends on them, so a
/// heartbeat updates them in place, seen at once by every snapshot that holds
/// the record, instead of making a new record and a new snapshot. A record
/// made by [`apply`] gets a cell of its own; the fleet hands it to the
/// agent's WebSocket session, which records heartbeats itself (see
/// [`is_heartbeat`]).
#[derive(Debug, Default)]
pub struct Liveness {
    /// Milliseconds since the Unix epoch.
    seen_ms: AtomicU64,
    sequence_num: AtomicU64,
}

impl Liveness {
    pub fn new(seen: SystemTime, sequence_num: u64) -> Self {
        let l = Liveness::default();
        l.touch(seen, sequence_num);
        l
    }

    pub fn last_seen(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.seen_ms.load(Ordering::Relaxed))
    }

    pub fn sequence_num(&self) -> u64 {
        self.sequence_num.load(Ordering::Relaxed)
    }

    /// The agent reported at `seen` with `sequence_num`.
    pub fn touch(&self, seen: SystemTime, sequence_num: u64) {
        let ms = seen.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        self.seen_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.sequence_num.store(sequence_num, Ordering::Relaxed);
    }
}

impl PartialEq for Liveness {
    fn eq(&self, other: &Self) -> bool {
        self.last_seen() == other.last_seen() && self.sequence_num() == other.sequence_num()
    }
}

/// A config that left for the agent: over WebSocket when the frame was
/// written, over plain HTTP when the first reply that carried it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub hash: ConfigHash,
    pub at: SystemTime,
    /// The connection it went out on (see [`AgentRecord::connection_epoch`]).
    pub epoch: u64,
}

impl AgentRecord {
    /// A record for an agent first seen at `now`, with nothing reported yet.
    pub fn new(uid: InstanceUid, transport: Transport, now: SystemTime) -> Self {
        AgentRecord {
            uid,
            connected: true,
            transport,
            connection_epoch: 0,
            liveness: Arc::new(Liveness::new(now, 0)),
            disconnected_at: None,
            capabilities: Capabilities::default(),
            description: None,
            health: None,
            effective_config: None,
            remote_config_status: None,
            unhealthy_since: None,
            delivered: None,
            identity: None,
            push_drops: None,
        }
    }

    /// The config delivered on the current connection, if any.
    pub fn delivered_now(&self) -> Option<Delivery> {
        self.delivered.filter(|d| d.epoch == self.connection_epoch)
    }

    pub fn identifying_attributes(&self) -> Option<&Attributes> {
        self.description.as_deref().map(|d| &d.identifying)
    }

    pub fn non_identifying_attributes(&self) -> Option<&Attributes> {
        self.description.as_deref().map(|d| &d.non_identifying)
    }

    /// True when something the agent's capabilities promise (or its
    /// description) has never arrived. An agent at the very start of its
    /// sequence that was never given a config has no remote config status to
    /// report (the supervisor sends none), so that one is not missing then.
    pub fn missing_state(&self, fresh: bool) -> bool {
        let caps = self.capabilities;
        self.description.is_none()
            || (caps.has(Capabilities::REPORTS_EFFECTIVE_CONFIG) && self.effective_config.is_none())
            || (caps.has(Capabilities::REPORTS_REMOTE_CONFIG) && self.remote_config_status.is_none() && !fresh)
            || (caps.has(Capabilities::REPORTS_HEALTH) && self.health.is_none())
    }

    /// Marks the agent offline at `now` (idempotent).
    pub fn set_offline(&mut self, now: SystemTime) {
        if self.connected {
            self.connected = false;
            self.disconnected_at = Some(now);
            // A push delivered on this connection that the agent never spoke
            // of: the connection ended because of it, perhaps.
            if let Some(d) = self.delivered_now()
                && self.remote_config_status.as_ref().and_then(|s| s.hash) != Some(d.hash)
            {
                let times = match self.push_drops {
                    Some((hash, n)) if hash == d.hash => n + 1,
                    _ => 1,
                };
                self.push_drops = Some((d.hash, times));
            }
        }
    }
}

impl AgentAttributes for AgentRecord {
    fn uid(&self) -> &InstanceUid {
        &self.uid
    }

    fn attribute(&self, key: &str) -> Option<&str> {
        self.description.as_deref()?.attribute(key)
    }
}

/// How a message reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contact {
    pub now: SystemTime,
    pub transport: Transport,
    /// The message is the first of a new connection (a new WebSocket). Plain
    /// HTTP has no connections: an HTTP agent starts one when it comes back
    /// from offline, which [`apply`] works out itself.
    pub new_connection: bool,
}

/// What the reply to a message must carry, as far as the agent's own state goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplyDecision {
    /// Set `ReportFullState`: we miss something after a sequence gap or for an unknown agent.
    pub report_full_state: bool,
    /// The agent asked for a new instance uid.
    pub new_instance_uid: bool,
    /// The agent said goodbye (`agent_disconnect`).
    pub disconnected: bool,
    /// Something besides liveness (last seen, sequence number) changed.
    pub changed: bool,
}

const FLAG_REQUEST_INSTANCE_UID: u64 = 0x1;

/// True when `msg` from a known agent changes nothing but its [`Liveness`]
/// (a heartbeat): then [`apply`] would answer `changed: false`, no full state
/// and no new uid, and the caller only touches the liveness. Cheap: it reads
/// the message and builds nothing.
pub fn liveness_only(prev: &AgentRecord, msg: &proto::AgentToServer, contact: Contact) -> bool {
    !new_connection(Some(prev), msg, contact) && is_heartbeat(msg, prev.capabilities.0, prev.liveness.sequence_num())
}

/// True when `msg` carries nothing but liveness for an agent on a
/// connection that goes on, whose last message had `capabilities` and
/// sequence number `last`: no part, no flag, no gap in the sequence.
pub fn is_heartbeat(msg: &proto::AgentToServer, capabilities: u64, last: u64) -> bool {
    msg.capabilities == capabilities
        && (msg.sequence_num == last.wrapping_add(1) || msg.sequence_num == last)
        && msg.flags & FLAG_REQUEST_INSTANCE_UID == 0
        && msg.agent_description.is_none()
        && msg.health.is_none()
        && msg.effective_config.is_none()
        && msg.remote_config_status.is_none()
        && msg.agent_disconnect.is_none()
}

/// Whether `msg` starts a new connection of the agent.
fn new_connection(prev: Option<&AgentRecord>, msg: &proto::AgentToServer, contact: Contact) -> bool {
    // A sequence that starts again at 0 means the agent's process restarted:
    // over plain HTTP that is the only sign of a new connection. (A number
    // that merely goes back can be a request overtaken by the next one.)
    let restarted = prev.is_some_and(|p| msg.sequence_num == 0 && p.liveness.sequence_num() > 0);
    contact.new_connection || restarted || prev.is_none_or(|p| !p.connected || p.transport != contact.transport)
}

/// Whether messages of a known agent went missing before `msg`. A repeated
/// number is a resend, not a lost message.
fn gap(prev: Option<&AgentRecord>, msg: &proto::AgentToServer) -> bool {
    prev.is_some_and(|p| {
        let last = p.liveness.sequence_num();
        msg.sequence_num != last.wrapping_add(1) && msg.sequence_num != last
    })
}

/// Folds `msg` from agent `uid` into its previous record (`None` for an
/// unknown agent). An absent sub-message leaves that part unchanged; a
/// present one replaces it. Capabilities come from every message.
pub fn apply(
    prev: Option<&AgentRecord>,
    uid: &InstanceUid,
    msg: proto::AgentToServer,
    contact: Contact,
) -> (AgentRecord, ReplyDecision) {
    let mut rec = match prev {
        Some(p) => p.clone(),
        None => AgentRecord::new(uid.clone(), contact.transport, contact.now),
    };
    let new_connection = new_connection(prev, &msg, contact);
    let gap = gap(prev, &msg);

    let mut changed = new_connection || rec.capabilities.0 != msg.capabilities;
    if new_connection {
        rec.connection_epoch = prev.map_or(0, |p| p.connection_epoch + 1);
    }
    rec.connected = true;
    rec.transport = contact.transport;
    rec.liveness = Arc::new(Liveness::new(contact.now, msg.sequence_num));
    rec.capabilities = Capabilities(msg.capabilities);

    // A part sent again unchanged is no change.
    if let Some(d) = msg.agent_description {
        let d = Description {
            identifying: attributes(d.identifying_attributes),
            non_identifying: attributes(d.non_identifying_attributes),
        };
        if rec.description.as_deref() != Some(&d) {
            rec.description = Some(Arc::new(d));
            changed = true;
        }
    }
    if let Some(h) = msg.health {
        let h = health(h);
        if rec.health.as_deref() != Some(&h) {
            rec.health = Some(Arc::new(h));
            changed = true;
        }
    }
    // The unhealthy clock starts at the first unhealthy report, and again at
    // a new connection: a supervisor reports unhealthy while its collector
    // (re)starts, so only a lasting unhealthy state is a verdict.
    rec.unhealthy_since = match rec.health.as_deref() {
        Some(h) if !h.healthy => match rec.unhealthy_since {
            Some(t) if !new_connection => Some(t),
            _ => Some(contact.now),
        },
        _ => None,
    };
    if let Some(ec) = msg.effective_config {
        let files = config_files(ec.config_map);
        if rec.effective_config.as_deref() != Some(&files) {
            rec.effective_config = Some(Arc::new(files));
            changed = true;
        }
    }
    if let Some(s) = msg.remote_config_status {
        let status = remote_status(s);
        changed |= rec.remote_config_status != status;
        rec.remote_config_status = status;
        // The agent spoke of the config that dropped its connections.
        if rec
            .push_drops
            .is_some_and(|(h, _)| rec.remote_config_status.as_ref().and_then(|s| s.hash) == Some(h))
        {
            rec.push_drops = None;
            changed = true;
        }
    }

    let disconnected = msg.agent_disconnect.is_some();
    if disconnected {
        rec.set_offline(contact.now);
        changed = true;
    }
    let decision = ReplyDecision {
        // A gap in a known agent's sequence may hide a lost report: the
        // specification asks for the full state then. An unknown agent is
        // asked only when something is missing; sequences start at 0 (or 1
        // for some clients), so a low one is a new agent, not a known one
        // that reconnects to a controller that forgot it.
        report_full_state: !disconnected && (gap || (prev.is_none() && rec.missing_state(msg.sequence_num <= 1))),
        new_instance_uid: msg.flags & FLAG_REQUEST_INSTANCE_UID != 0,
        disconnected,
        changed,
    };
    (rec, decision)
}

/// True when an HTTP agent has been silent (for `silence`) longer than three
/// heartbeat intervals and so counts as gone. WebSocket agents go offline when
/// their connection closes.
pub fn is_stale(rec: &AgentRecord, silence: Duration, heartbeat: Duration) -> bool {
    rec.connected && rec.transport == Transport::Http && silence > heartbeat.saturating_mul(3)
}

fn attributes(kvs: Vec<proto::KeyValue>) -> Attributes {
    kvs.into_iter()
        .map(|kv| (kv.key, kv.value.map(any_value_text).unwrap_or_default()))
        .collect()
}

/// A string value as is; anything else rendered as text (arrays and lists as
/// JSON, bytes as hex).
pub fn any_value_text(v: proto::AnyValue) -> String {
    use proto::any_value::Value;
    match v.value {
        Some(Value::StringValue(s)) => s,
        other => match any_value_json(other) {
            serde_json::Value::String(s) => s,
            json => json.to_string(),
        },
    }
}

fn any_value_json(v: Option<proto::any_value::Value>) -> serde_json::Value {
    use proto::any_value::Value;
    use serde_json::Value as J;
    match v {
        None => J::String(String::new()),
        Some(Value::StringValue(s)) => J::String(s),
        Some(Value::BoolValue(b)) => J::Bool(b),
        Some(Value::IntValue(i)) => J::from(i),
        Some(Value::DoubleValue(d)) => {
            serde_json::Number::from_f64(d).map_or_else(|| J::String(d.to_string()), J::Number)
        }
        Some(Value::BytesValue(b)) => J::String(hex::encode(b)),
        Some(Value::ArrayValue(a)) => J::Array(a.values.into_iter().map(|x| any_value_json(x.value)).collect()),
        Some(Value::KvlistValue(l)) => J::Object(
            l.values
                .into_iter()
                .map(|kv| (kv.key, any_value_json(kv.value.and_then(|v| v.value))))
                .collect(),
        ),
    }
}

fn health(h: proto::ComponentHealth) -> Health {
    Health {
        healthy: h.healthy,
        status: h.status,
        last_error: h.last_error,
        start_time_unix_nano: h.start_time_unix_nano,
        components: h
            .component_health_map
            .into_iter()
            .map(|(k, v)| (k, health(v)))
            .collect(),
    }
}

fn config_files(map: Option<proto::AgentConfigMap>) -> EffectiveFiles {
    map.map(|m| m.config_map)
        .unwrap_or_default()
        .into_iter()
        .map(|(name, f)| {
            (
                name,
                ConfigFile {
                    content_type: f.content_type,
                    body: f.body,
                },
            )
        })
        .collect()
}

/// UNSET with an empty hash (what Node agents send before any config) means
/// no status at all.
fn remote_status(s: proto::RemoteConfigStatus) -> Option<RemoteStatus> {
    let state = RemoteConfigState::from_wire(s.status);
    if state == RemoteConfigState::Unset && s.last_remote_config_hash.is_empty() && s.error_message.is_empty() {
        return None;
    }
    Some(RemoteStatus {
        hash: ConfigHash::from_wire(&s.last_remote_config_hash),
        last_hash: s.last_remote_config_hash,
        state,
        error_message: s.error_message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        AgentConfigFile, AgentConfigMap, AgentDescription, AgentDisconnect, AgentToServer, AnyValue, ComponentHealth,
        EffectiveConfig, KeyValue, RemoteConfigStatus, any_value::Value,
    };

    const T0: Duration = Duration::from_secs(1_800_000_000);
    const FULL_CAPS: u64 = 0x1 | 0x2 | 0x4 | 0x800 | 0x1000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    fn uid() -> InstanceUid {
        InstanceUid::Uuid([9; 16])
    }

    fn kv(k: &str, v: Value) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
        }
    }

    fn description() -> AgentDescription {
        AgentDescription {
            identifying_attributes: vec![kv("service.name", Value::StringValue("otelcol".into()))],
            non_identifying_attributes: vec![kv("host.name", Value::StringValue("a".into()))],
        }
    }

    fn health_msg(healthy: bool) -> ComponentHealth {
        ComponentHealth {
            healthy,
            ..Default::default()
        }
    }

    fn effective() -> EffectiveConfig {
        EffectiveConfig {
            config_map: Some(AgentConfigMap {
                config_map: [(
                    String::new(),
                    AgentConfigFile {
                        body: Bytes::from_static(b"receivers: {}\n"),
                        content_type: "text/yaml".into(),
                    },
                )]
                .into(),
            }),
        }
    }

    fn status(hash: &[u8], state: i32) -> RemoteConfigStatus {
        RemoteConfigStatus {
            last_remote_config_hash: Bytes::copy_from_slice(hash),
            status: state,
            error_message: String::new(),
        }
    }

    /// Everything FULL_CAPS promises.
    fn full(seq: u64) -> AgentToServer {
        AgentToServer {
            instance_uid: Bytes::copy_from_slice(uid().as_bytes()),
            sequence_num: seq,
            capabilities: FULL_CAPS,
            agent_description: Some(description()),
            health: Some(health_msg(true)),
            effective_config: Some(effective()),
            remote_config_status: Some(status(&[7; 32], 1)),
            ..Default::default()
        }
    }

    fn heartbeat(seq: u64) -> AgentToServer {
        AgentToServer {
            instance_uid: Bytes::copy_from_slice(uid().as_bytes()),
            sequence_num: seq,
            capabilities: FULL_CAPS,
            ..Default::default()
        }
    }

    fn ws(secs: u64, new_connection: bool) -> Contact {
        Contact {
            now: at(secs),
            transport: Transport::WebSocket,
            new_connection,
        }
    }

    fn http(secs: u64) -> Contact {
        Contact {
            now: at(secs),
            transport: Transport::Http,
            new_connection: false,
        }
    }

    fn known() -> AgentRecord {
        apply(None, &uid(), full(0), ws(0, true)).0
    }

    #[test]
    fn report_full_state_table() {
        struct Case {
            name: &'static str,
            prev: Option<AgentRecord>,
            msg: AgentToServer,
            want: bool,
        }
        let mut no_health = known();
        no_health.health = None;
        let mut no_description = known();
        no_description.description = None;
        let cases = [
            Case {
                name: "unknown agent with its full state",
                prev: None,
                msg: full(0),
                want: false,
            },
            Case {
                name: "unknown agent mid-sequence (a controller restart) without its state",
                prev: None,
                msg: heartbeat(41),
                want: true,
            },
            Case {
                name: "new agent never given a config: no remote config status to report",
                prev: None,
                msg: AgentToServer {
                    remote_config_status: None,
                    ..full(0)
                },
                want: false,
            },
            Case {
                name: "unknown agent mid-sequence without its remote config status",
                prev: None,
                msg: AgentToServer {
                    remote_config_status: None,
                    ..full(17)
                },
                want: true,
            },
            Case {
                name: "unknown agent without a description",
                prev: None,
                msg: AgentToServer {
                    agent_description: None,
                    capabilities: 0x1,
                    ..full(0)
                },
                want: true,
            },
            Case {
                name: "ordinary heartbeat",
                prev: Some(known()),
                msg: heartbeat(1),
                want: false,
            },
            Case {
                name: "gap with nothing missing: a lost report may hide anything",
                prev: Some(known()),
                msg: heartbeat(5),
                want: true,
            },
            Case {
                name: "sequence restarted at 0 (the agent's process restarted)",
                prev: Some(AgentRecord {
                    liveness: Arc::new(Liveness::new(at(0), 41)),
                    ..known()
                }),
                msg: heartbeat(0),
                want: true,
            },
            Case {
                name: "repeated sequence number (a resend) with nothing missing",
                prev: Some(known()),
                msg: heartbeat(0),
                want: false,
            },
            Case {
                name: "gap with health missing",
                prev: Some(no_health.clone()),
                msg: heartbeat(5),
                want: true,
            },
            Case {
                name: "no gap with health missing (asked before)",
                prev: Some(no_health.clone()),
                msg: heartbeat(1),
                want: false,
            },
            Case {
                name: "gap, even when the message itself fills one hole",
                prev: Some(no_health),
                msg: AgentToServer {
                    health: Some(health_msg(false)),
                    ..heartbeat(5)
                },
                want: true,
            },
            Case {
                name: "gap with the description missing",
                prev: Some(no_description),
                msg: heartbeat(3),
                want: true,
            },
            Case {
                name: "gap, promised effective config missing after a capability change",
                prev: Some(AgentRecord {
                    capabilities: Capabilities(0x1),
                    effective_config: None,
                    ..known()
                }),
                msg: heartbeat(9),
                want: true,
            },
            Case {
                name: "a goodbye never asks for more",
                prev: None,
                msg: AgentToServer {
                    agent_disconnect: Some(AgentDisconnect {}),
                    ..heartbeat(3)
                },
                want: false,
            },
        ];
        for c in cases {
            let (_, d) = apply(c.prev.as_ref(), &uid(), c.msg, ws(10, false));
            assert_eq!(d.report_full_state, c.want, "{}", c.name);
        }
    }

    #[test]
    fn a_connection_that_ends_after_a_push_the_agent_never_spoke_of_counts_as_a_drop() {
        let h = ConfigHash([6; 32]);
        let mut rec = known();
        let deliver = |rec: &mut AgentRecord| {
            rec.connected = true;
            rec.connection_epoch += 1;
            rec.delivered = Some(Delivery {
                hash: h,
                at: at(1),
                epoch: rec.connection_epoch,
            });
        };
        for times in 1..=3 {
            deliver(&mut rec);
            rec.set_offline(at(2));
            assert_eq!(rec.push_drops, Some((h, times)));
        }
        // Once it speaks of the config, the count is over.
        deliver(&mut rec);
        let msg = AgentToServer {
            remote_config_status: Some(status(&h.0, 2)),
            ..heartbeat(rec.liveness.sequence_num() + 1)
        };
        let (mut rec, _) = apply(Some(&rec), &uid(), msg, ws(3, false));
        assert_eq!(rec.push_drops, None);
        rec.set_offline(at(4));
        assert_eq!(
            rec.push_drops, None,
            "it reported on the config before the connection ended"
        );
    }

    #[test]
    fn a_message_judged_liveness_only_changes_nothing_but_liveness() {
        let prev = known();
        let again = |m: AgentToServer| AgentToServer { sequence_num: 1, ..m };
        let cases = [
            ("a heartbeat", heartbeat(1), ws(5, false), true),
            ("a resend", heartbeat(0), ws(5, false), true),
            ("everything sent again unchanged", again(full(0)), ws(5, false), false),
            ("a gap", heartbeat(3), ws(5, false), false),
            ("a new connection", heartbeat(1), ws(5, true), false),
            ("another transport", heartbeat(1), http(5), false),
            (
                "new capabilities",
                AgentToServer {
                    capabilities: 0x1,
                    ..heartbeat(1)
                },
                ws(5, false),
                false,
            ),
            (
                "asks for a uid",
                AgentToServer {
                    flags: FLAG_REQUEST_INSTANCE_UID,
                    ..heartbeat(1)
                },
                ws(5, false),
                false,
            ),
            (
                "a goodbye",
                AgentToServer {
                    agent_disconnect: Some(AgentDisconnect {}),
                    ..heartbeat(1)
                },
                ws(5, false),
                false,
            ),
        ];
        for (name, msg, contact, want) in cases {
            let fast = liveness_only(&prev, &msg, contact);
            assert_eq!(fast, want, "{name}");
            let (rec, d) = apply(Some(&prev), &uid(), msg, contact);
            let same = AgentRecord {
                liveness: prev.liveness.clone(),
                ..rec.clone()
            } == prev;
            if fast {
                assert!(
                    same && !d.changed && !d.report_full_state && !d.new_instance_uid,
                    "{name}"
                );
            }
            // Parts sent again unchanged are no change either.
            assert_eq!(d.changed, !same, "{name}");
        }
    }

    #[test]
    fn absent_means_unchanged_present_replaces() {
        let prev = known();
        let (rec, d) = apply(Some(&prev), &uid(), heartbeat(1), ws(5, false));
        assert!(!d.changed, "a heartbeat changes liveness only");
        assert_eq!(rec.description, prev.description);
        assert_eq!(rec.health, prev.health);
        assert_eq!(rec.effective_config, prev.effective_config);
        assert_eq!(rec.remote_config_status, prev.remote_config_status);
        assert_eq!(rec.liveness.last_seen(), at(5));
        assert_eq!(rec.liveness.sequence_num(), 1);

        let msg = AgentToServer {
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![kv("service.name", Value::StringValue("gw".into()))],
                non_identifying_attributes: vec![],
            }),
            health: Some(ComponentHealth {
                healthy: false,
                last_error: "boom".into(),
                ..Default::default()
            }),
            remote_config_status: Some(RemoteConfigStatus {
                error_message: "bad".into(),
                ..status(&[8; 32], 3)
            }),
            ..heartbeat(2)
        };
        let (rec2, d2) = apply(Some(&rec), &uid(), msg, ws(6, false));
        assert!(d2.changed);
        let desc = rec2.description.as_deref().unwrap();
        assert_eq!(desc.identifying.get("service.name"), Some("gw"));
        assert!(
            desc.non_identifying.is_empty(),
            "a present description replaces the old one entirely"
        );
        assert_eq!(rec2.health.as_deref().map(|h| h.last_error.as_str()), Some("boom"));
        let s = rec2.remote_config_status.as_ref().unwrap();
        assert_eq!(s.state, RemoteConfigState::Failed);
        assert_eq!(s.hash, Some(ConfigHash([8; 32])));
        assert_eq!(s.error_message, "bad");
        assert_eq!(
            rec2.effective_config, prev.effective_config,
            "still the old effective config"
        );
    }

    #[test]
    fn a_restarted_http_agent_is_on_a_new_connection() {
        let (rec, _) = apply(None, &uid(), full(0), http(0));
        let (rec, _) = apply(Some(&rec), &uid(), heartbeat(1), http(1));
        let (same, _) = apply(Some(&rec), &uid(), heartbeat(1), http(2));
        assert_eq!(
            same.connection_epoch, rec.connection_epoch,
            "a resend is the same connection"
        );
        let (again, d) = apply(Some(&rec), &uid(), full(0), http(3));
        assert_eq!(
            again.connection_epoch,
            rec.connection_epoch + 1,
            "its sequence started again"
        );
        assert!(d.changed);
    }

    #[test]
    fn unhealthy_clock_starts_at_the_first_unhealthy_report_and_at_each_connection() {
        let unhealthy = |seq| AgentToServer {
            health: Some(health_msg(false)),
            ..heartbeat(seq)
        };
        let (rec, _) = apply(Some(&known()), &uid(), unhealthy(1), ws(5, false));
        assert_eq!(rec.unhealthy_since, Some(at(5)));
        let (rec, _) = apply(Some(&rec), &uid(), heartbeat(2), ws(9, false));
        assert_eq!(rec.unhealthy_since, Some(at(5)), "still unhealthy: the clock runs on");
        let (rec, _) = apply(Some(&rec), &uid(), unhealthy(3), ws(12, false));
        assert_eq!(
            rec.unhealthy_since,
            Some(at(5)),
            "a repeated unhealthy report keeps the start"
        );
        let (rec, _) = apply(Some(&rec), &uid(), heartbeat(4), ws(20, true));
        assert_eq!(
            rec.unhealthy_since,
            Some(at(20)),
            "a new connection starts the clock again"
        );
        let healthy = AgentToServer {
            health: Some(health_msg(true)),
            ..heartbeat(5)
        };
        let (rec, _) = apply(Some(&rec), &uid(), healthy, ws(21, false));
        assert_eq!(rec.unhealthy_since, None);
    }

    #[test]
    fn capabilities_come_from_every_message() {
        let (rec, d) = apply(
            Some(&known()),
            &uid(),
            AgentToServer {
                capabilities: 0x1,
                ..heartbeat(1)
            },
            ws(1, false),
        );
        assert_eq!(rec.capabilities, Capabilities(0x1));
        assert!(d.changed);
    }

    #[test]
    fn remote_status_forms() {
        let run = |s: RemoteConfigStatus| {
            apply(
                None,
                &uid(),
                AgentToServer {
                    remote_config_status: Some(s),
                    ..full(0)
                },
                ws(0, true),
            )
            .0
            .remote_config_status
        };
        assert_eq!(run(status(b"", 0)), None, "Node's UNSET with no hash is no status");
        let short = run(status(b"abc", 2)).unwrap();
        assert_eq!((short.hash, short.state), (None, RemoteConfigState::Applying));
        assert_eq!(&short.last_hash[..], b"abc");
        assert_eq!(run(status(&[1; 32], 1)).unwrap().hash, Some(ConfigHash([1; 32])));
    }

    #[test]
    fn connections_epochs_and_disconnect() {
        let first = known();
        assert_eq!((first.connection_epoch, first.connected), (0, true));
        let (same, _) = apply(Some(&first), &uid(), heartbeat(1), ws(1, false));
        assert_eq!(same.connection_epoch, 0);
        let (second, _) = apply(Some(&same), &uid(), heartbeat(2), ws(2, true));
        assert_eq!(second.connection_epoch, 1, "a new WebSocket starts a new epoch");

        let bye = AgentToServer {
            agent_disconnect: Some(AgentDisconnect {}),
            ..heartbeat(3)
        };
        let (gone, d) = apply(Some(&second), &uid(), bye, ws(3, false));
        assert!(d.disconnected && !gone.connected);
        assert_eq!(gone.disconnected_at, Some(at(3)));

        // An HTTP agent: one epoch while it keeps polling, a new one when it returns from offline.
        let (h1, _) = apply(Some(&gone), &uid(), heartbeat(0), http(10));
        assert!(h1.connected);
        assert_eq!((h1.connection_epoch, h1.transport), (2, Transport::Http));
        let (h2, _) = apply(Some(&h1), &uid(), heartbeat(1), http(20));
        assert_eq!(h2.connection_epoch, 2);
        let mut off = h2.clone();
        off.set_offline(at(200));
        let (h3, _) = apply(Some(&off), &uid(), heartbeat(2), http(210));
        assert_eq!(h3.connection_epoch, 3);
        assert_eq!(h3.disconnected_at, Some(at(200)), "when it last went offline");
    }

    #[test]
    fn request_instance_uid_flag() {
        let (_, d) = apply(
            Some(&known()),
            &uid(),
            AgentToServer {
                flags: 0x1,
                ..heartbeat(1)
            },
            ws(1, false),
        );
        assert!(d.new_instance_uid);
        let (_, d) = apply(Some(&known()), &uid(), heartbeat(1), ws(1, false));
        assert!(!d.new_instance_uid);
    }

    #[test]
    fn attribute_rendering() {
        let msg = AgentToServer {
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![
                    kv("s", Value::StringValue("plain \"text\"".into())),
                    kv("b", Value::BoolValue(true)),
                    kv("i", Value::IntValue(-42)),
                    kv("d", Value::DoubleValue(1.5)),
                    kv("x", Value::BytesValue(Bytes::from_static(&[0xab, 0x01]))),
                    kv(
                        "a",
                        Value::ArrayValue(proto::ArrayValue {
                            values: vec![
                                AnyValue {
                                    value: Some(Value::StringValue("p".into())),
                                },
                                AnyValue {
                                    value: Some(Value::IntValue(1)),
                                },
                            ],
                        }),
                    ),
                    KeyValue {
                        key: "none".into(),
                        value: None,
                    },
                ],
                non_identifying_attributes: vec![kv("s", Value::StringValue("other".into()))],
            }),
            ..full(0)
        };
        let (rec, _) = apply(None, &uid(), msg, ws(0, true));
        let attr = |k: &str| rec.attribute(k).map(str::to_string);
        assert_eq!(attr("s").as_deref(), Some("plain \"text\""), "identifying wins");
        assert_eq!(attr("b").as_deref(), Some("true"));
        assert_eq!(attr("i").as_deref(), Some("-42"));
        assert_eq!(attr("d").as_deref(), Some("1.5"));
        assert_eq!(attr("x").as_deref(), Some("ab01"));
        assert_eq!(attr("a").as_deref(), Some(r#"["p",1]"#));
        assert_eq!(attr("none").as_deref(), Some(""));
        assert_eq!(attr("missing"), None);
    }

    #[test]
    fn staleness() {
        let hb = Duration::from_secs(30);
        let (h, _) = apply(None, &uid(), full(0), http(0));
        assert!(
            !is_stale(&h, Duration::from_secs(90), hb),
            "exactly three intervals is not yet stale"
        );
        assert!(is_stale(&h, Duration::from_secs(91), hb));
        assert!(
            !is_stale(&known(), Duration::from_secs(1000), hb),
            "WebSocket agents go offline on close"
        );
        let mut off = h.clone();
        off.set_offline(at(95));
        assert!(!is_stale(&off, Duration::from_secs(1000), hb));
    }
}
