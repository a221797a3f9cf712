//! Identity newtypes shared by every module (agents, config hashes, commits,
//! groups) and the small plain enums the layers above all speak of.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An agent's `instance_uid` exactly as it sent it.
///
/// Current agents send 16 bytes (a UUID); agents older than spec v0.10 send a
/// 26-character ULID string. Both are kept byte for byte so replies echo them
/// unchanged; the 16-byte form is stored inline to keep the inventory small.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InstanceUid {
    Uuid([u8; 16]),
    Other(Box<[u8]>),
}

/// Why an `instance_uid` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidError {
    #[error("instance_uid is empty")]
    Empty,
    #[error("instance_uid has {0} bytes; expected 16 (UUID) or 26 (legacy ULID text)")]
    BadLength(usize),
    #[error("26-byte instance_uid is not ULID text")]
    NotUlid,
}

impl InstanceUid {
    /// Accepts a 16-byte uid, or a 26-character legacy ULID in Crockford base32.
    pub fn from_wire(bytes: &[u8]) -> Result<Self, UidError> {
        match bytes.len() {
            0 => Err(UidError::Empty),
            16 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(bytes);
                Ok(InstanceUid::Uuid(b))
            }
            26 if bytes.iter().all(|c| is_crockford(*c)) => Ok(InstanceUid::Other(bytes.into())),
            26 => Err(UidError::NotUlid),
            n => Err(UidError::BadLength(n)),
        }
    }

    /// The bytes to echo on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            InstanceUid::Uuid(b) => b,
            InstanceUid::Other(b) => b,
        }
    }

    /// A fresh UUID v7, for `agent_identification.new_instance_uid`.
    pub fn new_v7() -> Self {
        InstanceUid::Uuid(*uuid::Uuid::now_v7().as_bytes())
    }

    /// Parses the text form that [`fmt::Display`] writes (UUID, printable text, or hex).
    pub fn parse_text(s: &str) -> Option<Self> {
        if let Ok(u) = uuid::Uuid::parse_str(s) {
            return Some(InstanceUid::Uuid(*u.as_bytes()));
        }
        InstanceUid::from_wire(s.as_bytes()).ok()
    }
}

fn is_crockford(c: u8) -> bool {
    c.is_ascii_digit() || (c.is_ascii_alphabetic() && !matches!(c.to_ascii_uppercase(), b'I' | b'L' | b'O' | b'U'))
}

impl fmt::Display for InstanceUid {
    /// A 16-byte uid as a UUID, any other as its text when printable, else hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstanceUid::Uuid(b) => write!(f, "{}", uuid::Uuid::from_bytes(*b)),
            InstanceUid::Other(b) => match std::str::from_utf8(b) {
                Ok(s) if s.chars().all(|c| c.is_ascii_graphic()) => f.write_str(s),
                _ => f.write_str(&hex::encode(b)),
            },
        }
    }
}

impl fmt::Debug for InstanceUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceUid({self})")
    }
}

impl Serialize for InstanceUid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for InstanceUid {
    /// Reads the text form that `Serialize` writes (see [`InstanceUid::parse_text`]).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        InstanceUid::parse_text(&s).ok_or_else(|| serde::de::Error::custom(format!("bad instance uid {s:?}")))
    }
}

/// SHA-256 of a group's config map in canonical form (see `desired::ConfigBundle`).
/// Sent to agents as 32 raw bytes, shown to humans as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConfigHash(pub [u8; 32]);

impl ConfigHash {
    /// The hash an agent reported, if it is one of ours (32 bytes).
    pub fn from_wire(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(ConfigHash)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(ConfigHash(b))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The first 12 hex digits, for messages and logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Display for ConfigHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ConfigHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConfigHash({})", self.short())
    }
}

impl Serialize for ConfigHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConfigHash {
    /// Reads the 64 hex digits that `Serialize` writes.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ConfigHash::from_hex(&s).ok_or_else(|| serde::de::Error::custom(format!("bad config hash {s:?}")))
    }
}

/// The commit's author, committer and subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// `Name <email>`.
    pub author: String,
    pub committer: String,
    /// The author's time.
    #[serde(with = "crate::rfc3339")]
    pub time: std::time::SystemTime,
    pub subject: String,
}

/// Who an agent's connection authenticated as: a token's name or a client
/// certificate's subject, with the groups the token limits its agents to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: std::sync::Arc<str>,
    /// `None`: any group.
    pub groups: Option<std::sync::Arc<[GroupName]>>,
}

impl Identity {
    /// An identity with no group limit.
    pub fn named(name: std::sync::Arc<str>) -> Identity {
        Identity { name, groups: None }
    }

    /// Whether an agent of this identity may join `group`.
    pub fn may_join(&self, group: &GroupName) -> bool {
        self.groups.as_ref().is_none_or(|g| g.contains(group))
    }
}

/// A git commit id as lowercase hex (40 digits for SHA-1 repositories).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct CommitId(String);

impl CommitId {
    pub fn new(hex: impl Into<String>) -> Self {
        CommitId(hex.into().to_ascii_lowercase())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 digits, for logs and tables.
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(12)]
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommitId({})", self.short())
    }
}

/// A group's name: the stem of its `groups/<name>.yaml` file. Shared, so
/// that each agent's assignment names its group without a copy.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupName(Arc<str>);

impl GroupName {
    pub fn new(name: impl Into<String>) -> Self {
        GroupName(Arc::from(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for GroupName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for GroupName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(GroupName::new)
    }
}

impl fmt::Display for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupName({})", self.0)
    }
}

/// Where an agent stands against what it should run, as the API and notes show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Runs the config it should.
    InSync,
    /// Waits for its rollout wave.
    Pending,
    /// Was given its config and has not confirmed it yet.
    Applying,
    /// Reported FAILED for its config, did not apply it in time, or is unhealthy after applying.
    Failed,
    /// Runs something other than it should, outside a rollout in progress.
    Drifted,
    /// Matched by no group: listed, never pushed to.
    Unmanaged,
    /// Lacks the AcceptsRemoteConfig capability: listed, never pushed to.
    Unsupported,
    /// Not connected.
    Offline,
}

impl AgentState {
    /// Every state, in the order the metrics list them.
    pub const ALL: [AgentState; 8] = [
        AgentState::InSync,
        AgentState::Pending,
        AgentState::Applying,
        AgentState::Failed,
        AgentState::Drifted,
        AgentState::Unmanaged,
        AgentState::Unsupported,
        AgentState::Offline,
    ];

    /// The name the API, metrics and commands show (`in_sync`, `pending`...).
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::InSync => "in_sync",
            AgentState::Pending => "pending",
            AgentState::Applying => "applying",
            AgentState::Failed => "failed",
            AgentState::Drifted => "drifted",
            AgentState::Unmanaged => "unmanaged",
            AgentState::Unsupported => "unsupported",
            AgentState::Offline => "offline",
        }
    }
}

/// A connection epoch unique across processes: the process's start (ms,
/// `boot`) above the bits of its own count, which starts from zero in every
/// process. The planner remembers pushes per connection, also across
/// restarts and, in a cluster, across replicas.
pub fn global_epoch(boot: u64, epoch: u64) -> u64 {
    const EPOCH_BITS: u32 = 20;
    (boot << EPOCH_BITS) | (epoch & ((1 << EPOCH_BITS) - 1))
}

/// How an agent talks to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    WebSocket,
    Http,
}

impl Transport {
    /// Both, in the order the metrics list them.
    pub const ALL: [Transport; 2] = [Transport::WebSocket, Transport::Http];

    /// The name the API and metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Http => "http",
        }
    }
}

/// What became of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PushOutcome {
    /// Handed to the agent's WebSocket (a newer push replaces it if it has
    /// not gone out yet).
    Sent,
    /// Plain HTTP: goes out in the reply to the agent's next message, and in
    /// every reply after until the agent reports its hash. A newer push replaces it.
    Queued,
    /// Unknown or offline agent; nothing was kept.
    NotConnected,
    /// The agent lacks AcceptsRemoteConfig (it must not be offered a config)
    /// or ReportsRemoteConfig (it would never say whether it applied one).
    NotAccepted,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The planner counts states in an array indexed by `state as usize`.
    #[test]
    fn all_states_are_listed_in_their_declared_order() {
        // A state added to the enum fails to compile here until it is
        // placed in this chain, and then the assertion wants it in ALL.
        let next = |s: AgentState| match s {
            AgentState::InSync => Some(AgentState::Pending),
            AgentState::Pending => Some(AgentState::Applying),
            AgentState::Applying => Some(AgentState::Failed),
            AgentState::Failed => Some(AgentState::Drifted),
            AgentState::Drifted => Some(AgentState::Unmanaged),
            AgentState::Unmanaged => Some(AgentState::Unsupported),
            AgentState::Unsupported => Some(AgentState::Offline),
            AgentState::Offline => None,
        };
        let chain: Vec<AgentState> = std::iter::successors(Some(AgentState::InSync), |&s| next(s)).collect();
        assert_eq!(chain, AgentState::ALL);
        for (i, s) in AgentState::ALL.into_iter().enumerate() {
            assert_eq!(s as usize, i, "{s:?}");
        }
    }

    #[test]
    fn uid_forms() {
        let u = InstanceUid::from_wire(&[0x01; 16]).unwrap();
        assert_eq!(u.to_string(), "01010101-0101-0101-0101-010101010101");
        assert_eq!(InstanceUid::parse_text(&u.to_string()), Some(u));

        let legacy = b"01ARZ3NDEKTSV4RRFFQ69G5FAV";
        let l = InstanceUid::from_wire(legacy).unwrap();
        assert_eq!(l.as_bytes(), legacy);
        assert_eq!(l.to_string(), "01ARZ3NDEKTSV4RRFFQ69G5FAV");

        assert_eq!(InstanceUid::from_wire(b""), Err(UidError::Empty));
        assert_eq!(InstanceUid::from_wire(&[1; 5]), Err(UidError::BadLength(5)));
        assert_eq!(InstanceUid::from_wire(&[0xff; 26]), Err(UidError::NotUlid));
    }

    #[test]
    fn state_names_are_the_serialized_names() {
        for s in AgentState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn hash_hex_round_trip() {
        let h = ConfigHash([0xab; 32]);
        assert_eq!(h.to_string().len(), 64);
        assert_eq!(ConfigHash::from_hex(&h.to_string()), Some(h));
        assert_eq!(ConfigHash::from_wire(&[0; 31]), None);
    }
}

/// `RemoteConfigStatuses`, in our own words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemoteConfigState {
    Unset,
    Applied,
    Applying,
    Failed,
}

impl RemoteConfigState {
    /// From the proto's `RemoteConfigStatuses` number; unknown numbers are `Unset`.
    pub fn from_wire(v: i32) -> Self {
        match v {
            1 => RemoteConfigState::Applied,
            2 => RemoteConfigState::Applying,
            3 => RemoteConfigState::Failed,
            _ => RemoteConfigState::Unset,
        }
    }

    /// The proto's name, as the API shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            RemoteConfigState::Unset => "UNSET",
            RemoteConfigState::Applied => "APPLIED",
            RemoteConfigState::Applying => "APPLYING",
            RemoteConfigState::Failed => "FAILED",
        }
    }
}
