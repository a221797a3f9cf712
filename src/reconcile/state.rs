//! The rollout state that [`super::plan`] carries from one call to the next:
//! per group the stable config and the current rollout, per agent what was
//! pushed. Persisted by the driver (serde) so a restart resumes every rollout
//! where it was; holds the config bundles themselves so no old commit is needed.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::input::RemoteConfigState;
use super::waves::Members;
use crate::desired::{ConfigBundle, ConfigFile};
use crate::model::{CommitId, ConfigHash, GroupName, InstanceUid};

/// Wall-clock time in milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// The time `t`, to the millisecond.
    pub fn of(t: std::time::SystemTime) -> Self {
        let ms = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// `d` later.
    pub fn after(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }

    pub fn millis(self) -> u64 {
        self.0
    }

    /// Time since `earlier`, zero when `earlier` is later (a clock step back).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// Whether at least `d` has passed since `earlier`.
    pub fn reached(self, earlier: Timestamp, d: Duration) -> bool {
        self.since(earlier) >= d
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// Everything needed to resume: per group the stable config and the current
/// (or last) rollout, per agent what was pushed to it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    #[serde(default)]
    pub groups: BTreeMap<GroupName, GroupState>,
    #[serde(default)]
    pub agents: AgentMemories,
    /// Rollouts started so far; the next one gets this number as its id.
    #[serde(default)]
    pub rollouts: u64,
}

/// One group's history as far as rollouts need it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupState {
    /// The config the last completed rollout reached; `None` before the first
    /// rollout of the group completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<Stable>,
    /// The current rollout, or the last one when it has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stable {
    #[serde(with = "bundle_serde")]
    pub bundle: Arc<ConfigBundle>,
    pub commit: Option<CommitId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutKind {
    /// A change rolled out in canary waves.
    Waves,
    /// Back to the stable config: pushed to every agent at once.
    Revert,
}

/// A rollout's own phase; `paused` is a separate flag on a progressing rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutPhase {
    Progressing,
    Halted,
    Complete,
}

/// One rollout of one group's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Unique among this controller's rollouts; ties agent records' membership to it.
    pub id: u64,
    pub kind: RolloutKind,
    #[serde(with = "bundle_serde")]
    pub target: Arc<ConfigBundle>,
    /// The commit that brought the target.
    pub commit: Option<CommitId>,
    pub phase: RolloutPhase,
    #[serde(default)]
    pub paused: bool,
    /// The operator asked to skip the rest of the current wave's bake.
    #[serde(default)]
    pub promote: bool,
    /// Cumulative member counts per wave, fixed at start; the last is all members.
    pub cuts: Vec<u32>,
    /// Waves opened so far (1-based; 0 never occurs once started).
    pub opened: u32,
    /// Since when every agent of the opened waves has been APPLIED and healthy
    /// (the bake clock of the current wave); `None` while some are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_since: Option<Timestamp>,
    /// When the current wave opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_opened: Option<Timestamp>,
    /// Since when the current wave has waited for its agents (`None` while
    /// it is settled, and once the rollout ended): a wave that waits for
    /// long is stalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<Timestamp>,
    /// The agents counted when the rollout started, in canary order (shared:
    /// it never changes during the rollout, so plans do not copy it).
    #[serde(with = "arc_members")]
    pub members: Arc<Members>,
    pub started: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<Timestamp>,
    /// Members of the opened waves that the fleet does not list, or lists as
    /// disconnected without a time, and since when (they block a wave until
    /// apply_timeout has passed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub missing: BTreeMap<InstanceUid, Timestamp>,
    /// Every agent that failed this rollout, with why and when.
    #[serde(default)]
    pub failures: BTreeMap<InstanceUid, FailureRecord>,
    /// Operator actions, oldest first.
    #[serde(default)]
    pub actions: Vec<ControlAction>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub error: String,
    pub at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    Pause,
    Resume,
    Promote,
}

impl Control {
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Pause => "pause",
            Control::Resume => "resume",
            Control::Promote => "promote",
        }
    }
}

/// An operator action, recorded so the notes can show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlAction {
    pub action: Control,
    pub at: Timestamp,
    /// Who: the name of the operator's API token, when tokens are required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// Operator actions kept per rollout; older ones are dropped.
const MAX_ACTIONS: usize = 50;

impl Rollout {
    /// Progressing or paused: waves may still open.
    pub fn in_progress(&self) -> bool {
        self.phase == RolloutPhase::Progressing
    }

    /// The cumulative member count of the opened waves.
    pub fn opened_cut(&self) -> u32 {
        let i = (self.opened as usize).clamp(1, self.cuts.len().max(1)) - 1;
        self.cuts.get(i).copied().unwrap_or(0)
    }

    pub fn waves(&self) -> u32 {
        u32::try_from(self.cuts.len()).unwrap_or(u32::MAX)
    }

    fn record(&mut self, action: Control, now: Timestamp, by: Option<&str>) {
        if self.actions.len() >= MAX_ACTIONS {
            self.actions.remove(0);
        }
        self.actions.push(ControlAction {
            action,
            at: now,
            by: by.map(str::to_string),
        });
    }
}

/// What the controller remembers of one agent: what it pushed, what the
/// agent failed, and its place in its group's rollout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMemory {
    /// The last push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed: Option<Pushed>,
    /// The last hash the agent reported FAILED for; never pushed to it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<ConfigHash>,
    /// The one it failed before that (a rollback must not bring it back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_before: Option<ConfigHash>,
    /// Its place among the members of its group's rollout in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<Membership>,
    /// Since when the fleet has not listed the agent (see [`AgentMemories::forget_absent`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absent_since: Option<Timestamp>,
}

impl AgentMemory {
    /// Nothing worth keeping (whether the agent is absent alone is not).
    pub fn is_empty(&self) -> bool {
        self.pushed.is_none() && self.failed.is_none() && self.failed_before.is_none() && self.member.is_none()
    }

    /// Whether the agent reported FAILED for `hash` (one of its last two).
    pub fn has_failed(&self, hash: ConfigHash) -> bool {
        self.failed == Some(hash) || self.failed_before == Some(hash)
    }

    /// What the agent reported for `hash`: FAILED is remembered, APPLIED
    /// clears an earlier failure of it. Answers whether the record changed.
    pub fn note_report(&mut self, hash: ConfigHash, status: RemoteConfigState) -> bool {
        match status {
            RemoteConfigState::Failed => self.note_failed(hash),
            RemoteConfigState::Applied => self.forget_failed(hash),
            RemoteConfigState::Unset | RemoteConfigState::Applying => false,
        }
    }

    /// The agent reported FAILED for `hash`; answers whether that is news.
    pub fn note_failed(&mut self, hash: ConfigHash) -> bool {
        if self.failed == Some(hash) {
            return false;
        }
        self.failed_before = self.failed.replace(hash).filter(|h| *h != hash);
        true
    }

    /// The agent applied `hash`: it no longer counts as failed for it.
    /// Answers whether it did.
    pub fn forget_failed(&mut self, hash: ConfigHash) -> bool {
        if self.failed == Some(hash) {
            self.failed = self.failed_before.take();
        } else if self.failed_before == Some(hash) {
            self.failed_before = None;
        } else {
            return false;
        }
        true
    }

    /// The agent's rank among the members of rollout `id`, if it is one.
    pub fn rank_in(&self, id: u64) -> Option<u32> {
        self.member.filter(|m| m.rollout == id).map(|m| m.rank)
    }
}

/// An agent counted by a rollout when it started, and its rank in the
/// canary order. Stored as `[rollout, rank]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(u64, u32)", into = "(u64, u32)")]
pub struct Membership {
    pub rollout: u64,
    pub rank: u32,
}

impl From<(u64, u32)> for Membership {
    fn from((rollout, rank): (u64, u32)) -> Self {
        Membership { rollout, rank }
    }
}

impl From<Membership> for (u64, u32) {
    fn from(m: Membership) -> Self {
        (m.rollout, m.rank)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pushed {
    pub hash: ConfigHash,
    pub at: Timestamp,
    /// The agent's connection epoch at the push; a new epoch means a reconnect.
    pub epoch: u64,
    /// Nothing was sent: the agent was found applying this hash on a
    /// connection where it had not been given it, and is watched from `at`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub observed: bool,
}

/// Why an operator control was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("no group named {0}")]
    UnknownGroup(GroupName),
    #[error("group {0} has no rollout in progress")]
    Idle(GroupName),
}

impl GroupState {
    /// The config the group's current (or last) rollout delivers, else its
    /// stable config.
    pub fn delivering(&self) -> Option<ConfigHash> {
        match (&self.rollout, &self.stable) {
            (Some(r), _) => Some(r.target.hash()),
            (None, Some(s)) => Some(s.bundle.hash()),
            (None, None) => None,
        }
    }
}

impl RolloutState {
    /// Stops opening waves of `group`'s rollout (failures still halt it).
    /// Pausing a paused rollout changes nothing.
    pub fn pause(&mut self, group: &GroupName, now: Timestamp, by: Option<&str>) -> Result<(), ControlError> {
        let r = self.controllable(group)?;
        if !r.paused {
            r.paused = true;
            r.record(Control::Pause, now, by);
        }
        Ok(())
    }

    /// Lets a paused rollout open waves again; bake time served while paused counts.
    pub fn resume(&mut self, group: &GroupName, now: Timestamp, by: Option<&str>) -> Result<(), ControlError> {
        let r = self.controllable(group)?;
        if r.paused {
            r.paused = false;
            r.record(Control::Resume, now, by);
        }
        Ok(())
    }

    /// Skips the rest of the current wave's bake: the next wave opens as soon
    /// as every agent of the current one is APPLIED and healthy.
    pub fn promote(&mut self, group: &GroupName, now: Timestamp, by: Option<&str>) -> Result<(), ControlError> {
        let r = self.controllable(group)?;
        r.promote = true;
        r.record(Control::Promote, now, by);
        Ok(())
    }

    fn controllable(&mut self, group: &GroupName) -> Result<&mut Rollout, ControlError> {
        let g = self
            .groups
            .get_mut(group)
            .ok_or_else(|| ControlError::UnknownGroup(group.clone()))?;
        match &mut g.rollout {
            Some(r) if r.kind == RolloutKind::Waves && r.in_progress() => Ok(r),
            _ => Err(ControlError::Idle(group.clone())),
        }
    }
}

/// Per-agent records sorted by uid, one per uid, so that a plan joins them
/// with a uid-sorted fleet in one sequential pass instead of tens of
/// thousands of hash lookups. Serialized as a map from uid to record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentMemories(Vec<(InstanceUid, AgentMemory)>);

impl AgentMemories {
    /// `entries` must be sorted by uid without repeats.
    pub(super) fn from_sorted(entries: Vec<(InstanceUid, AgentMemory)>) -> Self {
        debug_assert!(entries.windows(2).all(|w| w[0].0 < w[1].0));
        AgentMemories(entries)
    }

    pub fn get(&self, uid: &InstanceUid) -> Option<&AgentMemory> {
        self.0.binary_search_by(|(u, _)| u.cmp(uid)).ok().map(|i| &self.0[i].1)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The records in uid order.
    pub fn entries(&self) -> &[(InstanceUid, AgentMemory)] {
        &self.0
    }

    pub(super) fn into_entries(self) -> Vec<(InstanceUid, AgentMemory)> {
        self.0
    }

    /// Keeps the records of agents the fleet lists (`present`, in uid order)
    /// and, for a while, of those it does not: after a restart the fleet fills
    /// up again as agents reconnect. A record whose agent has been absent for
    /// longer than `forget_after` (the time after which the fleet forgets an
    /// agent that left) is dropped, so agents that come and go under new uids
    /// do not grow the state without bound.
    pub fn forget_absent<'a>(
        &mut self,
        present: impl IntoIterator<Item = &'a InstanceUid>,
        now: Timestamp,
        forget_after: Duration,
    ) {
        let mut present = present.into_iter().peekable();
        self.0.retain_mut(|(uid, r)| {
            while present.next_if(|p| *p < uid).is_some() {}
            let here = present.next_if(|p| *p == uid).is_some();
            r.absent_since = if here {
                None
            } else {
                Some(r.absent_since.unwrap_or(now))
            };
            r.absent_since.is_none_or(|t| !now.reached(t, forget_after))
        });
    }
}

impl Serialize for AgentMemories {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(u, r)| (u, r)))
    }
}

impl<'de> Deserialize<'de> for AgentMemories {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<InstanceUid, AgentMemory>::deserialize(d)?;
        Ok(AgentMemories(map.into_iter().collect()))
    }
}

mod arc_members {
    use super::*;

    pub fn serialize<S: Serializer>(m: &Arc<Members>, s: S) -> Result<S::Ok, S::Error> {
        m.as_ref().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Members>, D::Error> {
        Members::deserialize(d).map(Arc::new)
    }
}

/// A config bundle as its files (content type and body) plus its hash, which
/// is checked on load. Bodies are text when they are UTF-8, else hex.
/// A config map as JSON: each file's body as text when it is UTF-8, else as
/// hex.
pub(crate) mod files_serde {
    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawFile {
        content_type: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hex: Option<String>,
    }

    pub fn serialize<S: Serializer>(files: &BTreeMap<String, ConfigFile>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(files.iter().map(|(k, f)| {
            let (text, hex) = match std::str::from_utf8(&f.body) {
                Ok(t) => (Some(t.to_owned()), None),
                Err(_) => (None, Some(hex::encode(&f.body))),
            };
            let raw = RawFile {
                content_type: f.content_type.clone(),
                text,
                hex,
            };
            (k, raw)
        }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, ConfigFile>, D::Error> {
        use serde::de::Error;
        let raw = BTreeMap::<String, RawFile>::deserialize(d)?;
        let mut files = BTreeMap::new();
        for (k, f) in raw {
            let body = match (f.text, f.hex) {
                (Some(t), None) => Bytes::from(t),
                (None, Some(h)) => {
                    Bytes::from(hex::decode(&h).map_err(|e| D::Error::custom(format!("file {k:?}: {e}")))?)
                }
                _ => {
                    return Err(D::Error::custom(format!(
                        "file {k:?}: needs exactly one of text and hex"
                    )));
                }
            };
            files.insert(
                k,
                ConfigFile {
                    content_type: f.content_type,
                    body,
                },
            );
        }
        Ok(files)
    }
}

/// A config bundle as JSON: its files (see [`files_serde`]) and its hash,
/// checked when read back.
pub(crate) mod bundle_serde {
    use super::*;

    #[derive(Serialize)]
    struct Out<'a> {
        hash: ConfigHash,
        #[serde(serialize_with = "files_serde::serialize")]
        files: &'a BTreeMap<String, ConfigFile>,
    }

    #[derive(Deserialize)]
    struct In {
        hash: ConfigHash,
        #[serde(deserialize_with = "files_serde::deserialize")]
        files: BTreeMap<String, ConfigFile>,
    }

    pub fn serialize<S: Serializer>(b: &Arc<ConfigBundle>, s: S) -> Result<S::Ok, S::Error> {
        Out {
            hash: b.hash(),
            files: b.files(),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<ConfigBundle>, D::Error> {
        use serde::de::Error;
        let raw = In::deserialize(d)?;
        let bundle = ConfigBundle::new(raw.files);
        if bundle.hash() != raw.hash {
            return Err(D::Error::custom(format!(
                "bundle content hashes to {}, recorded as {}",
                bundle.hash(),
                raw.hash
            )));
        }
        Ok(Arc::new(bundle))
    }
}

#[cfg(test)]
mod failed_tests {
    use super::*;

    #[test]
    fn an_agent_remembers_its_last_two_failed_hashes() {
        let (a, b, c) = (ConfigHash([1; 32]), ConfigHash([2; 32]), ConfigHash([3; 32]));
        let mut r = AgentMemory::default();
        r.note_failed(a);
        r.note_failed(b);
        assert!(
            r.has_failed(a) && r.has_failed(b),
            "a rollback must not bring back the older one"
        );
        r.note_failed(b);
        assert!(r.has_failed(a), "a repeated report does not push the older one out");
        r.note_failed(c);
        assert!(!r.has_failed(a) && r.has_failed(b) && r.has_failed(c));
        r.forget_failed(c);
        assert!(r.has_failed(b) && !r.has_failed(c));
        r.forget_failed(b);
        assert!(r.is_empty());
    }
}
