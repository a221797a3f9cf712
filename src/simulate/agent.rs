//! One simulated agent's protocol behaviour as a pure state machine: it takes
//! what the server sent or which timer fired, and returns the message to send
//! and the timers to arm. No I/O, no clock: the transports feed it.
//!
//! It behaves like the OpAMP supervisor of opentelemetry-collector-contrib with
//! remote configuration switched on: full state on connect and on request,
//! APPLYING then APPLIED (or FAILED) for every new remote config hash, the
//! same status again for a hash it already has, heartbeats, and
//! `agent_disconnect` on exit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::opamp::proto::{
    AgentCapabilities, AgentConfigMap, AgentDescription, AgentDisconnect, AgentRemoteConfig, AgentToServer, AnyValue,
    ComponentHealth, EffectiveConfig, KeyValue, RemoteConfigStatus, RemoteConfigStatuses, ServerToAgent,
    ServerToAgentFlags, any_value,
};

/// The capabilities every simulated agent reports.
pub const CAPABILITIES: u64 = AgentCapabilities::ReportsStatus as u64
    | AgentCapabilities::AcceptsRemoteConfig as u64
    | AgentCapabilities::ReportsEffectiveConfig as u64
    | AgentCapabilities::ReportsHealth as u64
    | AgentCapabilities::ReportsRemoteConfig as u64
    | AgentCapabilities::ReportsHeartbeat as u64;

/// What every agent of one simulation shares: attributes and behaviour knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Identifying attributes besides `service.instance.id` (which is the uid).
    /// Values may hold `{index}`, replaced by the agent's index.
    pub identifying: BTreeMap<String, String>,
    /// Non-identifying attributes; values may hold `{index}` too.
    pub non_identifying: BTreeMap<String, String>,
    /// A config file whose body holds this text fails to apply.
    pub fail_if_contains: Option<String>,
    /// Time between APPLYING and the final status.
    pub apply_delay: Duration,
    /// Heartbeat (WebSocket) or polling (HTTP) interval; zero turns WebSocket heartbeats off.
    pub heartbeat: Duration,
}

/// Something that happened to the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A connection is up (WebSocket), or the server answered again after a failure (HTTP).
    Connected,
    /// The connection is gone; nothing is sent until the next `Connected`.
    Disconnected,
    /// The server sent this.
    Received(Box<ServerToAgent>),
    /// The apply timer armed by an earlier [`Output::apply_timer`] fired.
    ApplyTimer,
    /// The heartbeat timer fired.
    HeartbeatTimer,
    /// The agent is stopping.
    Shutdown,
}

/// What the transport must do after an input.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Output {
    /// The message to send, if any.
    pub send: Option<AgentToServer>,
    /// Arm the apply timer to fire this long from now, replacing any armed one.
    pub apply_timer: Option<Duration>,
    /// Arm the heartbeat timer to fire this long from now, replacing any armed one.
    pub heartbeat_timer: Option<Duration>,
}

/// Where the agent stands with its remote config, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No remote config received yet.
    None,
    Applying,
    Applied,
    Failed,
}

/// One simulated agent.
#[derive(Debug, Clone)]
pub struct Agent {
    profile: Arc<Profile>,
    index: usize,
    uid: [u8; 16],
    next_seq: u64,
    connected: bool,
    started_unix_nano: u64,
    heartbeat: Duration,
    /// The config the agent runs: empty until a remote config applies.
    effective: AgentConfigMap,
    /// The last status reported for the last remote config received.
    remote_status: Option<RemoteConfigStatus>,
    /// The remote config being applied, until the apply timer fires.
    pending: Option<AgentConfigMap>,
}

impl Agent {
    pub fn new(profile: Arc<Profile>, index: usize, uid: [u8; 16], started_unix_nano: u64) -> Self {
        let heartbeat = profile.heartbeat;
        Agent {
            profile,
            index,
            uid,
            next_seq: 0,
            connected: false,
            started_unix_nano,
            heartbeat,
            effective: AgentConfigMap::default(),
            remote_status: None,
            pending: None,
        }
    }

    pub fn uid(&self) -> [u8; 16] {
        self.uid
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// The heartbeat or polling interval in force (the server may change it).
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    pub fn status(&self) -> Status {
        match self.remote_status.as_ref().map(RemoteConfigStatus::status) {
            None | Some(RemoteConfigStatuses::Unset) => Status::None,
            Some(RemoteConfigStatuses::Applying) => Status::Applying,
            Some(RemoteConfigStatuses::Applied) => Status::Applied,
            Some(RemoteConfigStatuses::Failed) => Status::Failed,
        }
    }

    /// The config the agent runs.
    pub fn effective_config(&self) -> &AgentConfigMap {
        &self.effective
    }

    /// Feeds one input; `now_unix_nano` stamps health reports.
    pub fn handle(&mut self, input: Input, now_unix_nano: u64) -> Output {
        let mut out = Output::default();
        let report = match input {
            Input::Connected => {
                self.connected = true;
                Report::full()
            }
            Input::Disconnected => {
                self.connected = false;
                Report::default()
            }
            Input::Received(msg) => self.received(*msg, &mut out),
            Input::ApplyTimer => self.apply_pending(),
            Input::HeartbeatTimer => Report {
                heartbeat: true,
                ..Report::default()
            },
            Input::Shutdown => Report {
                disconnect: true,
                ..Report::default()
            },
        };
        if self.connected && !report.is_empty() {
            out.send = Some(self.message(&report, now_unix_nano));
            if !self.heartbeat.is_zero() {
                out.heartbeat_timer = Some(self.heartbeat);
            }
        }
        if matches!(report, Report { disconnect: true, .. }) {
            self.connected = false;
            out.heartbeat_timer = None;
        }
        out
    }

    fn received(&mut self, msg: ServerToAgent, out: &mut Output) -> Report {
        let mut report = Report::default();
        if msg.error_response.is_some() {
            // An error response carries nothing else; the transport handles retries.
            return report;
        }
        if let Some(id) = msg.agent_identification
            && let Ok(uid) = <[u8; 16]>::try_from(&id.new_instance_uid[..])
            && uid != self.uid
        {
            // The server knows nothing under the new uid yet: tell it everything.
            self.uid = uid;
            report.full = true;
        }
        if let Some(opamp) = msg.connection_settings.and_then(|c| c.opamp)
            && opamp.heartbeat_interval_seconds != 0
        {
            let offered = Duration::from_secs(opamp.heartbeat_interval_seconds);
            if offered != self.heartbeat {
                self.heartbeat = offered;
                out.heartbeat_timer = Some(offered);
            }
        }
        if let Some(remote) = msg.remote_config {
            report.remote_status |= self.remote_config(remote, out);
        }
        if msg.flags & ServerToAgentFlags::ReportFullState as u64 != 0 {
            report.full = true;
        }
        report
    }

    /// Starts applying a new config, or repeats the status of the one it has.
    fn remote_config(&mut self, remote: AgentRemoteConfig, out: &mut Output) -> bool {
        let same = self
            .remote_status
            .as_ref()
            .is_some_and(|s| s.last_remote_config_hash == remote.config_hash);
        if same {
            // Already received: no new apply; the status reached for it (or
            // APPLYING, with the apply still on its timer) is repeated.
            return true;
        }
        self.remote_status = Some(RemoteConfigStatus {
            last_remote_config_hash: remote.config_hash,
            status: RemoteConfigStatuses::Applying as i32,
            error_message: String::new(),
        });
        self.pending = Some(remote.config.unwrap_or_default());
        out.apply_timer = Some(self.profile.apply_delay);
        true
    }

    fn apply_pending(&mut self) -> Report {
        let (Some(config), Some(status)) = (self.pending.take(), self.remote_status.as_mut()) else {
            return Report::default();
        };
        match check_config(&config, self.profile.fail_if_contains.as_deref()) {
            Ok(()) => {
                status.status = RemoteConfigStatuses::Applied as i32;
                self.effective = config;
                Report {
                    remote_status: true,
                    effective: true,
                    health: true,
                    ..Report::default()
                }
            }
            Err(error) => {
                // Like the supervisor, a failed config leaves the previous one running.
                status.status = RemoteConfigStatuses::Failed as i32;
                status.error_message = error;
                Report {
                    remote_status: true,
                    ..Report::default()
                }
            }
        }
    }

    fn message(&mut self, report: &Report, now_unix_nano: u64) -> AgentToServer {
        let mut msg = AgentToServer {
            instance_uid: Bytes::copy_from_slice(&self.uid),
            sequence_num: self.next_seq,
            capabilities: CAPABILITIES,
            ..AgentToServer::default()
        };
        self.next_seq += 1;
        if report.full {
            msg.agent_description = Some(self.description());
        }
        if report.full || report.health {
            msg.health = Some(ComponentHealth {
                healthy: true,
                start_time_unix_nano: self.started_unix_nano,
                status: "StatusOK".to_string(),
                status_time_unix_nano: now_unix_nano,
                ..ComponentHealth::default()
            });
        }
        if report.full || report.effective {
            msg.effective_config = Some(EffectiveConfig {
                config_map: Some(self.effective.clone()),
            });
        }
        if report.full || report.remote_status {
            msg.remote_config_status = self.remote_status.clone();
        }
        if report.disconnect {
            msg.agent_disconnect = Some(AgentDisconnect {});
        }
        msg
    }

    fn description(&self) -> AgentDescription {
        let index = self.index.to_string();
        let attr = |k: &str, v: &str| KeyValue {
            key: k.to_string(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.replace("{index}", &index))),
            }),
        };
        let mut identifying: Vec<KeyValue> = self.profile.identifying.iter().map(|(k, v)| attr(k, v)).collect();
        let uid = uuid::Uuid::from_bytes(self.uid).to_string();
        identifying.push(attr("service.instance.id", &uid));
        AgentDescription {
            identifying_attributes: identifying,
            non_identifying_attributes: self.profile.non_identifying.iter().map(|(k, v)| attr(k, v)).collect(),
        }
    }
}

/// Which parts the next message carries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Report {
    full: bool,
    remote_status: bool,
    effective: bool,
    health: bool,
    heartbeat: bool,
    disconnect: bool,
}

impl Report {
    fn full() -> Self {
        Report {
            full: true,
            ..Report::default()
        }
    }

    fn is_empty(&self) -> bool {
        *self == Report::default()
    }
}

/// Whether a received config would start: no file holds `fail_if_contains`,
/// and every YAML file parses. The error names the file, never its body.
pub fn check_config(config: &AgentConfigMap, fail_if_contains: Option<&str>) -> Result<(), String> {
    let mut files: Vec<_> = config.config_map.iter().collect();
    files.sort_by(|a, b| a.0.cmp(b.0));
    for (name, file) in files {
        if let Some(text) = fail_if_contains.filter(|t| !t.is_empty())
            && contains(&file.body, text.as_bytes())
        {
            return Err(format!("config file {name:?} contains {text:?}: refusing to start"));
        }
        if is_yaml(name, &file.content_type)
            && let Err(e) = serde_yaml_ng::from_slice::<serde_yaml_ng::Value>(&file.body)
        {
            return Err(format!("config file {name:?} is not valid YAML: {e}"));
        }
    }
    Ok(())
}

fn is_yaml(name: &str, content_type: &str) -> bool {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    name.is_empty()
        || name.ends_with(".yaml")
        || name.ends_with(".yml")
        || ct.eq_ignore_ascii_case("text/yaml")
        || ct.eq_ignore_ascii_case("application/yaml")
        || ct.eq_ignore_ascii_case("application/x-yaml")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opamp::proto::{
        AgentConfigFile, AgentIdentification, ConnectionSettingsOffers, OpAmpConnectionSettings, ServerErrorResponse,
    };

    const NOW: u64 = 1_700_000_000_000_000_000;
    const START: u64 = 1_600_000_000_000_000_000;
    const UID: [u8; 16] = [7; 16];

    fn profile() -> Profile {
        Profile {
            identifying: BTreeMap::from([("service.name".into(), "otelcol-sim".into())]),
            non_identifying: BTreeMap::from([("host.name".into(), "sim-{index}".into())]),
            fail_if_contains: Some("BOOM".into()),
            apply_delay: Duration::from_millis(200),
            heartbeat: Duration::from_secs(30),
        }
    }

    fn agent() -> Agent {
        Agent::new(Arc::new(profile()), 3, UID, START)
    }

    fn connected() -> Agent {
        let mut a = agent();
        a.handle(Input::Connected, NOW);
        a
    }

    fn files(entries: &[(&str, &str, &str)]) -> AgentConfigMap {
        AgentConfigMap {
            config_map: entries
                .iter()
                .map(|(k, ct, body)| {
                    (
                        k.to_string(),
                        AgentConfigFile {
                            body: Bytes::copy_from_slice(body.as_bytes()),
                            content_type: ct.to_string(),
                        },
                    )
                })
                .collect(),
        }
    }

    fn recv(msg: ServerToAgent) -> Input {
        Input::Received(Box::new(msg))
    }

    fn full_state_request() -> Input {
        recv(ServerToAgent {
            flags: ServerToAgentFlags::ReportFullState as u64,
            ..ServerToAgent::default()
        })
    }

    fn push(hash: u8, config: AgentConfigMap) -> Input {
        recv(ServerToAgent {
            remote_config: Some(AgentRemoteConfig {
                config: Some(config),
                config_hash: Bytes::from(vec![hash; 32]),
            }),
            ..ServerToAgent::default()
        })
    }

    fn good() -> AgentConfigMap {
        files(&[("", "text/yaml", "receivers: {otlp: {}}\n")])
    }

    fn status_of(msg: &AgentToServer) -> (RemoteConfigStatuses, u8, String) {
        let s = msg.remote_config_status.as_ref().expect("has remote_config_status");
        (
            s.status(),
            s.last_remote_config_hash.first().copied().unwrap_or(0),
            s.error_message.clone(),
        )
    }

    fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
        kvs.iter()
            .map(|kv| {
                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    other => panic!("unexpected value {other:?}"),
                };
                (kv.key.clone(), v)
            })
            .collect()
    }

    #[test]
    fn first_message_is_full_state_with_sequence_zero() {
        let mut a = agent();
        let out = a.handle(Input::Connected, NOW);
        let msg = out.send.expect("sends on connect");
        assert_eq!(msg.sequence_num, 0);
        assert_eq!(&msg.instance_uid[..], &UID);
        assert_eq!(msg.capabilities, 0x3807);
        let desc = msg.agent_description.expect("description");
        let ident = attrs(&desc.identifying_attributes);
        assert_eq!(ident["service.name"], "otelcol-sim");
        assert_eq!(ident["service.instance.id"], uuid::Uuid::from_bytes(UID).to_string());
        assert_eq!(attrs(&desc.non_identifying_attributes)["host.name"], "sim-3");
        let health = msg.health.expect("health");
        assert!(health.healthy);
        assert_eq!(health.start_time_unix_nano, START);
        assert_eq!(
            msg.effective_config.and_then(|e| e.config_map),
            Some(AgentConfigMap::default())
        );
        assert_eq!(msg.remote_config_status, None, "no status before any remote config");
        assert_eq!(out.heartbeat_timer, Some(Duration::from_secs(30)));
        assert_eq!(out.apply_timer, None);
    }

    #[test]
    fn sequence_numbers_increase_by_one_per_message() {
        let mut a = agent();
        let mut seqs = Vec::new();
        for input in [
            Input::Connected,
            Input::HeartbeatTimer,
            push(1, good()),
            Input::ApplyTimer,
            Input::HeartbeatTimer,
        ] {
            seqs.push(a.handle(input, NOW).send.expect("sends").sequence_num);
        }
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
    }

    /// A table of remote configs and the statuses they end in.
    #[test]
    fn remote_config_outcomes() {
        struct Case {
            name: &'static str,
            config: AgentConfigMap,
            status: RemoteConfigStatuses,
            error: &'static str,
        }
        let cases = [
            Case {
                name: "valid yaml",
                config: good(),
                status: RemoteConfigStatuses::Applied,
                error: "",
            },
            Case {
                name: "empty map applies",
                config: AgentConfigMap::default(),
                status: RemoteConfigStatuses::Applied,
                error: "",
            },
            Case {
                name: "fail text in a named file",
                config: files(&[("", "text/yaml", "a: 1\n"), ("extra.yaml", "text/yaml", "x: BOOM\n")]),
                status: RemoteConfigStatuses::Failed,
                error: "config file \"extra.yaml\" contains \"BOOM\"",
            },
            Case {
                name: "fail text in a non-yaml file",
                config: files(&[("notes.txt", "text/plain", "BOOM")]),
                status: RemoteConfigStatuses::Failed,
                error: "contains \"BOOM\"",
            },
            Case {
                name: "invalid yaml under the main key",
                config: files(&[("", "", "a: [1, 2\n")]),
                status: RemoteConfigStatuses::Failed,
                error: "config file \"\" is not valid YAML",
            },
            Case {
                name: "invalid yaml by extension",
                config: files(&[("x.yml", "", "a: b: c\n")]),
                status: RemoteConfigStatuses::Failed,
                error: "config file \"x.yml\" is not valid YAML",
            },
            Case {
                name: "invalid yaml by content type",
                config: files(&[("x", "text/yaml", "{")]),
                status: RemoteConfigStatuses::Failed,
                error: "config file \"x\" is not valid YAML",
            },
            Case {
                name: "non-yaml files are not parsed",
                config: files(&[("x.json", "application/json", "{"), ("", "text/yaml", "a: 1")]),
                status: RemoteConfigStatuses::Applied,
                error: "",
            },
        ];
        for case in cases {
            let mut a = connected();
            let out = a.handle(push(9, case.config.clone()), NOW);
            let msg = out.send.expect("reports APPLYING");
            assert_eq!(
                status_of(&msg),
                (RemoteConfigStatuses::Applying, 9, String::new()),
                "{}",
                case.name
            );
            assert_eq!(msg.effective_config, None, "{}", case.name);
            assert_eq!(out.apply_timer, Some(Duration::from_millis(200)), "{}", case.name);
            assert_eq!(a.status(), Status::Applying, "{}", case.name);

            let msg = a.handle(Input::ApplyTimer, NOW).send.expect("reports the outcome");
            let (status, hash, error) = status_of(&msg);
            assert_eq!((status, hash), (case.status, 9), "{}", case.name);
            assert!(error.contains(case.error), "{}: {error}", case.name);
            if case.status == RemoteConfigStatuses::Applied {
                assert!(error.is_empty(), "{}", case.name);
                let effective = msg.effective_config.and_then(|e| e.config_map);
                assert_eq!(effective.as_ref(), Some(&case.config), "{}", case.name);
                assert!(msg.health.is_some_and(|h| h.healthy), "{}", case.name);
                assert_eq!(a.status(), Status::Applied, "{}", case.name);
            } else {
                assert_eq!(msg.effective_config, None, "{}: effective unchanged", case.name);
                assert_eq!(a.effective_config(), &AgentConfigMap::default(), "{}", case.name);
                assert_eq!(a.status(), Status::Failed, "{}", case.name);
            }
        }
    }

    #[test]
    fn failed_config_keeps_the_previous_one_and_records_its_hash() {
        let mut a = connected();
        a.handle(push(1, good()), NOW);
        a.handle(Input::ApplyTimer, NOW);
        a.handle(push(2, files(&[("", "text/yaml", "BOOM: 1")])), NOW);
        let msg = a.handle(Input::ApplyTimer, NOW).send.expect("sends FAILED");
        assert_eq!(status_of(&msg).0, RemoteConfigStatuses::Failed);
        assert_eq!(a.effective_config(), &good());
        // A full report shows the old config, healthy, and FAILED for the new hash.
        let full = a.handle(full_state_request(), NOW).send.expect("full report");
        assert_eq!(full.effective_config.clone().and_then(|e| e.config_map), Some(good()));
        assert!(full.health.as_ref().is_some_and(|h| h.healthy));
        assert_eq!(status_of(&full).0, RemoteConfigStatuses::Failed);
        assert_eq!(status_of(&full).1, 2);
    }

    #[test]
    fn same_hash_repeats_the_status_without_reapplying() {
        let mut a = connected();
        a.handle(push(1, good()), NOW);
        // Again while applying: APPLYING again, no new apply timer.
        let out = a.handle(push(1, good()), NOW);
        assert_eq!(status_of(&out.send.expect("repeats")).0, RemoteConfigStatuses::Applying);
        assert_eq!(out.apply_timer, None);
        a.handle(Input::ApplyTimer, NOW);
        // Again once applied: APPLIED, no apply timer, effective config not resent.
        let out = a.handle(push(1, good()), NOW);
        let msg = out.send.expect("repeats");
        assert_eq!(status_of(&msg).0, RemoteConfigStatuses::Applied);
        assert_eq!(msg.effective_config, None);
        assert_eq!(out.apply_timer, None);
        // A failed hash again: FAILED with the same error, not retried.
        a.handle(push(2, files(&[("", "", "{")])), NOW);
        a.handle(Input::ApplyTimer, NOW);
        let out = a.handle(push(2, files(&[("", "", "{")])), NOW);
        let (status, hash, error) = status_of(&out.send.expect("repeats"));
        assert_eq!((status, hash), (RemoteConfigStatuses::Failed, 2));
        assert!(error.contains("not valid YAML"));
        assert_eq!(out.apply_timer, None);
    }

    #[test]
    fn a_newer_config_supersedes_one_being_applied() {
        let mut a = connected();
        a.handle(push(1, files(&[("", "", "BOOM: 1")])), NOW);
        let out = a.handle(push(2, good()), NOW);
        assert_eq!(status_of(&out.send.expect("APPLYING")).1, 2);
        assert_eq!(out.apply_timer, Some(Duration::from_millis(200)));
        let msg = a.handle(Input::ApplyTimer, NOW).send.expect("outcome");
        assert_eq!(status_of(&msg), (RemoteConfigStatuses::Applied, 2, String::new()));
        // A stale timer does nothing.
        assert_eq!(a.handle(Input::ApplyTimer, NOW), Output::default());
    }

    #[test]
    fn nothing_to_say_sends_nothing() {
        let mut a = connected();
        // A plain reply (capabilities only) must not be answered, or the two sides ping-pong.
        let reply = ServerToAgent {
            instance_uid: Bytes::copy_from_slice(&UID),
            capabilities: 0x7,
            ..ServerToAgent::default()
        };
        assert_eq!(a.handle(recv(reply), NOW), Output::default());
        let error = ServerToAgent {
            error_response: Some(ServerErrorResponse::default()),
            flags: ServerToAgentFlags::ReportFullState as u64,
            ..ServerToAgent::default()
        };
        assert_eq!(a.handle(recv(error), NOW), Output::default());
    }

    #[test]
    fn full_state_on_request_and_on_reconnect() {
        let mut a = connected();
        a.handle(push(1, good()), NOW);
        a.handle(Input::ApplyTimer, NOW);
        let full = a.handle(full_state_request(), NOW).send.expect("full report");
        assert!(full.agent_description.is_some() && full.health.is_some());
        assert_eq!(status_of(&full).0, RemoteConfigStatuses::Applied);
        assert_eq!(full.effective_config.and_then(|e| e.config_map), Some(good()));

        assert_eq!(a.handle(Input::Disconnected, NOW), Output::default());
        let again = a.handle(Input::Connected, NOW).send.expect("full report on reconnect");
        assert!(again.agent_description.is_some());
        assert_eq!(again.sequence_num, full.sequence_num + 1, "sequence continues");
        assert_eq!(status_of(&again).0, RemoteConfigStatuses::Applied);
    }

    #[test]
    fn offline_the_state_moves_on_and_nothing_is_sent() {
        let mut a = connected();
        a.handle(push(1, good()), NOW);
        a.handle(Input::Disconnected, NOW);
        let out = a.handle(Input::ApplyTimer, NOW);
        assert_eq!(out.send, None);
        assert_eq!(a.status(), Status::Applied);
        assert_eq!(a.handle(Input::HeartbeatTimer, NOW), Output::default());
        let msg = a.handle(Input::Connected, NOW).send.expect("full state");
        assert_eq!(msg.sequence_num, 2, "no sequence number spent while offline");
        assert_eq!(status_of(&msg).0, RemoteConfigStatuses::Applied);
    }

    #[test]
    fn heartbeat_is_an_otherwise_empty_message() {
        let mut a = connected();
        let out = a.handle(Input::HeartbeatTimer, NOW);
        let msg = out.send.expect("heartbeat");
        assert_eq!(
            msg,
            AgentToServer {
                instance_uid: Bytes::copy_from_slice(&UID),
                sequence_num: 1,
                capabilities: CAPABILITIES,
                ..AgentToServer::default()
            }
        );
        assert_eq!(out.heartbeat_timer, Some(Duration::from_secs(30)));
    }

    #[test]
    fn server_offered_heartbeat_interval() {
        let offer = |secs| {
            recv(ServerToAgent {
                connection_settings: Some(ConnectionSettingsOffers {
                    hash: Bytes::from_static(b"h"),
                    opamp: Some(OpAmpConnectionSettings {
                        heartbeat_interval_seconds: secs,
                        ..OpAmpConnectionSettings::default()
                    }),
                    ..ConnectionSettingsOffers::default()
                }),
                ..ServerToAgent::default()
            })
        };
        let mut a = connected();
        let out = a.handle(offer(5), NOW);
        assert_eq!(out.send, None);
        assert_eq!(out.heartbeat_timer, Some(Duration::from_secs(5)));
        assert_eq!(a.heartbeat(), Duration::from_secs(5));
        assert_eq!(
            a.handle(Input::HeartbeatTimer, NOW).heartbeat_timer,
            Some(Duration::from_secs(5))
        );
        // Zero is ignored; the same offer again changes nothing.
        assert_eq!(a.handle(offer(0), NOW), Output::default());
        assert_eq!(a.handle(offer(5), NOW), Output::default());
        assert_eq!(a.heartbeat(), Duration::from_secs(5));
    }

    #[test]
    fn zero_heartbeat_arms_no_timer() {
        let mut p = profile();
        p.heartbeat = Duration::ZERO;
        let mut a = Agent::new(Arc::new(p), 0, UID, START);
        let out = a.handle(Input::Connected, NOW);
        assert!(out.send.is_some());
        assert_eq!(out.heartbeat_timer, None);
    }

    #[test]
    fn new_instance_uid_is_adopted_with_a_full_report() {
        let mut a = connected();
        let new = [9u8; 16];
        let out = a.handle(
            recv(ServerToAgent {
                agent_identification: Some(AgentIdentification {
                    new_instance_uid: Bytes::copy_from_slice(&new),
                }),
                ..ServerToAgent::default()
            }),
            NOW,
        );
        let msg = out.send.expect("full report under the new uid");
        assert_eq!(&msg.instance_uid[..], &new);
        let ident = attrs(&msg.agent_description.expect("description").identifying_attributes);
        assert_eq!(ident["service.instance.id"], uuid::Uuid::from_bytes(new).to_string());
        assert_eq!(a.uid(), new);
        // A uid of the wrong length is ignored.
        let out = a.handle(
            recv(ServerToAgent {
                agent_identification: Some(AgentIdentification {
                    new_instance_uid: Bytes::from_static(b"short"),
                }),
                ..ServerToAgent::default()
            }),
            NOW,
        );
        assert_eq!(out, Output::default());
        assert_eq!(a.uid(), new);
    }

    #[test]
    fn shutdown_sends_agent_disconnect_once() {
        let mut a = connected();
        let out = a.handle(Input::Shutdown, NOW);
        let msg = out.send.expect("disconnect");
        assert_eq!(msg.agent_disconnect, Some(AgentDisconnect {}));
        assert_eq!(msg.sequence_num, 1);
        assert_eq!(out.heartbeat_timer, None);
        assert_eq!(a.handle(Input::Shutdown, NOW), Output::default());
        let mut offline = agent();
        assert_eq!(offline.handle(Input::Shutdown, NOW), Output::default());
    }

    #[test]
    fn index_placeholder_in_attributes() {
        let mut p = profile();
        p.identifying.insert("service.name".into(), "edge-{index}".into());
        let mut a = Agent::new(Arc::new(p), 42, UID, START);
        let msg = a.handle(Input::Connected, NOW).send.expect("full");
        let desc = msg.agent_description.expect("description");
        assert_eq!(attrs(&desc.identifying_attributes)["service.name"], "edge-42");
        assert_eq!(attrs(&desc.non_identifying_attributes)["host.name"], "sim-42");
    }
}
